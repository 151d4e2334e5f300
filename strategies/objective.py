"""The search's attack configuration; the robust objective itself is :mod:`trainer.robust_objective`.

PAIF: Liu et al., "PAIF: Perception-Aware Infrared-Visible Image Fusion for Attack-Tolerant Semantic
Segmentation", ACM MM 2023 (arXiv 2308.03979), §3.3 "harmonised" search. The network weights minimise
``(1 - w)·L(u) + w·L(u + δ)`` on the training split, the architecture parameters the same form with ``w_arch``
on the held-out split; ``δ`` is an on-the-fly attack against the current supernet and ``L`` the task loss
``λ_f·L_fusion + λ_s·CE`` (:class:`trainer.losses.TaskLoss`).

The loss is the one retraining uses (:func:`trainer.robust_objective.robust_loss` with
``convex_weights(w) = (1 - w, w)``; re-exported here): fusion targets of ``L(u + δ)`` are the clean sources,
and the attack runs in the training mode with BatchNorm buffers restored (``model_mode="keep"``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
import torch.nn as nn

from trainer.robust_objective import (TRAIN_ATTACK_MODE, AttackFactory, AttackFn, Objective, RobustLoss,
                                      convex_weights, robust_loss, task_objective)

__all__ = [
    "Objective",
    "AttackFn",
    "AttackFactory",
    "AttackConfig",
    "RobustLoss",
    "task_objective",
    "build_attack_factory",
    "convex_weights",
    "robust_loss",
]

log = logging.getLogger(__name__)


@dataclass
class AttackConfig:
    """The on-the-fly attack that produces ``δ`` during the search."""

    name: str = "pgd"  # "pgd" (default, few steps) or "fgsm" (one step from a random start: the fast option)
    eps: float = 8 / 255  # L∞ budget on images in [0, 1]
    steps: int = 3  # PGD steps (ignored by fgsm)
    alpha: float | None = None  # step size; None -> 2.5·eps/steps (PGD), 1.25·eps (FGSM, as in "fast AT")
    targets: tuple[str, ...] = ("ir", "vis")  # perturbed modalities
    loss: str = "seg"  # attacked loss: "seg" (CE, needs labels) or "fusion" (label-free)
    #: "keep": attack the supernet in its training mode, BatchNorm buffers restored (as retraining does);
    #: "eval": eval mode
    model_mode: str = TRAIN_ATTACK_MODE

    def __post_init__(self) -> None:
        if self.name not in ("pgd", "fgsm"):
            raise ValueError(f"attack.name: expected 'pgd' or 'fgsm', got {self.name!r}")
        if not self.eps >= 0:
            raise ValueError(f"attack.eps: expected a budget >= 0, got {self.eps}")
        if self.steps < 1:
            raise ValueError(f"attack.steps: expected >= 1, got {self.steps}")
        if self.model_mode not in ("keep", "eval"):
            raise ValueError(f"attack.model_mode: expected 'keep' or 'eval', got {self.model_mode!r}")

    def step_size(self) -> float:
        """The step size actually used."""
        if self.alpha is not None:
            return float(self.alpha)
        return 1.25 * self.eps if self.name == "fgsm" else 2.5 * self.eps / self.steps


def build_attack_factory(cfg: AttackConfig) -> AttackFactory | None:
    """A factory binding :mod:`robustness.attacks` PGD/FGSM (random start) to a model; None when ``eps == 0``."""
    if cfg.eps == 0:
        return None

    def factory(model: nn.Module) -> AttackFn:
        from robustness.attacks import FGSM, PGD

        if cfg.name == "pgd":
            return PGD(model, eps=cfg.eps, alpha=cfg.step_size(), steps=cfg.steps, norm="linf",
                       random_start=True, targets=tuple(cfg.targets), loss=cfg.loss,
                       model_mode=cfg.model_mode)
        return FGSM(model, eps=cfg.eps, alpha=cfg.step_size(), random_start=True, targets=tuple(cfg.targets),
                    loss=cfg.loss, model_mode=cfg.model_mode)

    return factory
