"""The metric that ranks finished searches: the held-out adversarial task loss of the final supernet.

PAIF (Liu et al., ACM MM 2023) sweeps the accuracy/robustness balance (``w``, ``w_arch``, ε) as trials of one
NNI experiment; picking the trial to export needs one number that means the same in every trial. The DARTS
losses do not: the architecture loss ``(1-w_arch)·L(u) + w_arch·L(u+δ)`` mixes in ``w_arch`` and the trial's own
ε. :func:`heldout_adv_loss` is computed once, at the end of each search, on the held-out split (the
architecture step's data, never a test split) with settings that no tuner parameter changes:

* the task loss ``L = λ_f·L_fusion + λ_s·CE`` with the fixed :class:`SelectionConfig` weights (paper: 0.1, 4),
  fusion targets the clean sources (:func:`trainer.robust_objective.task_objective`);
* ``δ`` from PGD L∞ (``SelectionConfig.eps``/``steps``, random start from a fixed seed) on both modalities,
  segmentation CE with labels, the label-free fusion distance without;
* the model in eval mode, deterministic inputs (no flips; crops from a fixed seed, so every trial sees the
  same pixels).

Lower is better. The value is stored in ``search_result.json`` under ``selection`` and reported to NNI as the
trial's final ``default`` metric; ``derive/export_genotype.py --experiment`` picks the finished trial with the
lowest value.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

from trainer.losses import TaskLoss
from trainer.robust_objective import task_objective

__all__ = ["SELECTION_METRIC", "SELECTION_MODE", "SelectionConfig", "heldout_adv_loss"]

log = logging.getLogger(__name__)

#: name of the selection metric in ``search_result.json`` and provenance files
SELECTION_METRIC = "heldout_adv_loss"
#: "min": lower is better
SELECTION_MODE = "min"


@dataclass
class SelectionConfig:
    """Fixed settings of the selection metric (keep them equal across the trials you compare)."""

    eps: float = 8 / 255  # PGD L∞ budget
    steps: int = 3
    alpha: float | None = None  # None: 2.5·eps/steps
    lambda_fusion: float = 0.1  # task-loss weights of the metric (not the search's own, which a sweep may vary)
    lambda_seg: float = 4.0
    seed: int = 0  # attack random start and held-out crops
    max_batches: int | None = None  # evaluate the first N held-out batches only (None: all)

    def __post_init__(self) -> None:
        if not self.eps > 0 or self.steps < 1:
            raise ValueError(f"selection: expected eps > 0 and steps >= 1, got eps={self.eps}, steps={self.steps}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"selection.max_batches: expected None or >= 1, got {self.max_batches}")

    def step_size(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.5 * self.eps / self.steps


def heldout_adv_loss(model: nn.Module, batches: Iterable[dict[str, Any]], cfg: SelectionConfig,
                     has_labels: bool = True) -> dict[str, Any]:
    """The selection metric of a searched model on held-out batches.

    Args:
        model: ``model(ir (B,1,H,W), vis (B,3,H,W)) -> out`` with ``.fused_y`` and ``.logits``; its mode,
            buffers and gradients are left as found.
        batches: dicts with clean ``ir``, ``vis`` in [0, 1] and ``label`` (B,H,W) when ``has_labels``.
        cfg: the fixed attack and loss weights.
        has_labels: attack the segmentation CE (True) or the label-free fusion distance (False).

    Returns:
        ``{"metric", "mode", "value", "clean_loss", "images", "settings"}`` where ``value`` is the mean of
        ``L(u + δ)`` over the batches weighted by their number of images (``clean_loss`` the same for ``L(u)``).
    """
    from robustness.attacks import PGD, model_guard

    objective = task_objective(TaskLoss(cfg.lambda_fusion, cfg.lambda_seg))
    attack = PGD(model, eps=cfg.eps, alpha=cfg.step_size(), steps=cfg.steps, random_start=True,
                 loss="seg" if has_labels else "fusion", seed=cfg.seed, model_mode="eval")
    device = next(model.parameters()).device
    adv_sum = clean_sum = 0.0
    images = 0
    with model_guard(model, "eval"):
        for i, batch in enumerate(batches):
            if cfg.max_batches is not None and i >= cfg.max_batches:
                break
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if not has_labels:
                batch.pop("label", None)
            ir_adv, vis_adv = attack(batch["ir"], batch["vis"], batch.get("label"))
            with torch.no_grad():
                adv, _ = objective(model(ir_adv, vis_adv), batch)
                clean, _ = objective(model(batch["ir"], batch["vis"]), batch)
            n = int(batch["ir"].shape[0])
            adv_sum += float(adv) * n
            clean_sum += float(clean) * n
            images += n
    if images == 0:
        raise ValueError("heldout_adv_loss: expected at least one held-out batch, got none; check data.val_split")
    value = adv_sum / images
    log.info("selection metric %s = %.4f (clean %.4f) on %d held-out images", SELECTION_METRIC, value,
             clean_sum / images, images)
    return {"metric": SELECTION_METRIC, "mode": SELECTION_MODE, "value": value, "clean_loss": clean_sum / images,
            "images": images, "settings": asdict(cfg)}
