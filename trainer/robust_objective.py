"""The one robust loss of PAIF, shared by the search (``strategies/``) and retraining (``trainer/``).

PAIF: Liu et al., "PAIF: Perception-Aware Infrared-Visible Image Fusion for Attack-Tolerant Semantic
Segmentation", ACM MM 2023 (arXiv 2308.03979). Both stages minimise

    ``a·L(u) + b·L(u + δ)``

with ``(a, b) = (1 - w, w)`` in the search (:func:`convex_weights`; ``w`` for the weights, ``w_arch`` for the
architecture) and ``(a, b) = (1, λ)`` in retraining (plain and adaptive adversarial training). One
implementation, :func:`robust_loss`, fixes the two choices that used to differ between the stages:

* **fusion targets are the clean sources**: ``L(u + δ)`` evaluates the objective on the output for the
  attacked inputs but with the *clean* batch, so the fusion term compares the fused image with the clean
  IR / visible luminance (the net must undo the perturbation, not reproduce it); the label is the same;
* **the attack runs in the training mode** (:data:`TRAIN_ATTACK_MODE` = ``"keep"``: the attack objects of
  :mod:`robustness.attacks` attack the model in the mode it is in, BatchNorm on batch statistics) and the
  model is left as found: every module's mode, every buffer (BatchNorm running statistics) and every
  ``.grad`` are restored after the attack (:func:`attack_state_guard`).

Everything is a pure function of (model, batch, attack) so the Lightning modules stay thin and tests can plug
in toy objectives and attacks.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn

__all__ = [
    "Objective",
    "AttackFn",
    "AttackFactory",
    "RobustLoss",
    "TRAIN_ATTACK_MODE",
    "task_objective",
    "fusion_objective",
    "convex_weights",
    "attack_state_guard",
    "robust_loss",
]

log = logging.getLogger(__name__)

#: ``objective(out, batch) -> (loss scalar, {name: scalar})``; ``out`` is what ``model(ir, vis)`` returns and
#: ``batch`` holds the *clean* ``ir``/``vis`` (the fusion targets) and the ``label``.
Objective = Callable[[Any, Mapping[str, Any]], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]
#: ``attack(ir, vis, label) -> (ir_adv, vis_adv)`` bound to one model.
AttackFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor]"]
#: ``factory(model) -> attack`` (the supernet is only known once NNI has mutated the space).
AttackFactory = Callable[[nn.Module], AttackFn]

#: ``model_mode`` of the training-time attacks of both stages (:class:`robustness.attacks.Attack`): attack the
#: model in the mode it is in (training: BatchNorm uses batch statistics); buffers are restored afterwards.
TRAIN_ATTACK_MODE = "keep"


@dataclass
class RobustLoss:
    """Result of :func:`robust_loss`: the weighted loss and its detached parts.

    ``parts`` holds ``clean`` / ``adv`` (the unweighted ``L(u)`` / ``L(u + δ)``, present when computed) and the
    objective's own parts prefixed with ``clean_`` / ``adv_`` (e.g. ``adv_fusion``, ``adv_seg``).
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]


def task_objective(task_loss: Callable[..., Any]) -> Objective:
    """Adapt a :class:`trainer.losses.TaskLoss` to the ``objective(out, batch)`` form.

    The fusion targets are ``batch["ir"]`` / ``batch["vis"]``; :func:`robust_loss` always passes the clean batch.
    """

    def objective(out: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return task_loss(out, batch["ir"], batch["vis"], batch.get("label"))

    objective.__qualname__ = f"task_objective({task_loss!r})"
    return objective


def fusion_objective(task_loss: Callable[..., Any]) -> Objective:
    """Like :func:`task_objective`, but labels are never used (fusion-only training on unlabelled pairs)."""

    def objective(out: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return task_loss(out, batch["ir"], batch["vis"], None)

    objective.__qualname__ = f"fusion_objective({task_loss!r})"
    return objective


def convex_weights(w: float) -> tuple[float, float]:
    """``(1 - w, w)``: the clean / adversarial weights of the search's ``(1-w)·L(u) + w·L(u+δ)``."""
    w = float(w)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"convex_weights: expected w in [0, 1], got {w}")
    return 1.0 - w, w


@contextlib.contextmanager
def attack_state_guard(model: nn.Module) -> Iterator[None]:
    """Run an attack without touching the model: mode, buffers (BatchNorm statistics) and ``.grad`` are restored.

    The attack objects already promise this; the guard makes the objective independent of that promise
    (restoring costs one copy of the buffers, tiny next to a forward pass).
    """
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = {p: (p.grad.detach().clone() if p.grad is not None else None) for p in model.parameters()}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for name, b in model.named_buffers():
                saved = buffers.get(name)
                if saved is not None and not torch.equal(b, saved):
                    b.copy_(saved)
        for p, g in grads.items():
            p.grad = g


def robust_loss(
    model: nn.Module,
    objective: Objective,
    batch: Mapping[str, Any],
    attack: AttackFn | None,
    clean_weight: float,
    adv_weight: float,
) -> RobustLoss:
    """``clean_weight·L(u) + adv_weight·L(u + δ)`` for one batch, fusion targets always the clean sources.

    Args:
        model: ``model(ir (B,1,H,W), vis (B,3,H,W)) -> out`` (images in [0, 1]), in the mode the step trains in.
        objective: ``objective(out, batch) -> (loss, parts)``; called with the clean ``batch`` for both terms.
        batch: dict with the clean ``ir``, ``vis`` and optionally ``label`` (B,H,W).
        attack: ``attack(ir, vis, label) -> (ir_adv, vis_adv)`` (δ = the difference), run under
            :func:`attack_state_guard`; None skips ``L(u + δ)``. Build it with ``model_mode=TRAIN_ATTACK_MODE``.
        clean_weight: weight ``a >= 0`` of ``L(u)``; 0 skips the clean forward pass.
        adv_weight: weight ``b >= 0`` of ``L(u + δ)``; needs an attack when > 0. The adversarial part is
            computed whenever an attack is given (also with ``b = 0``, for logging and the AAT sampler).

    Returns:
        :class:`RobustLoss` (differentiable scalar ``loss`` and detached parts).

    Search: ``robust_loss(..., *convex_weights(w))``; retraining: ``clean_weight=1, adv_weight=λ``.
    """
    a, b = float(clean_weight), float(adv_weight)
    if not (a >= 0 and b >= 0) or a + b == 0:
        raise ValueError(f"robust_loss: expected weights >= 0, not both 0, got clean_weight={a}, adv_weight={b}")
    if b > 0 and attack is None:
        raise ValueError(f"robust_loss: expected an attack for adv_weight={b} > 0, got None; "
                         "set the attack budget > 0 or the adversarial weight to 0")
    ir, vis, label = batch["ir"], batch["vis"], batch.get("label")
    adv_inputs = None
    if attack is not None:  # δ first: restoring BN buffers after the attack must not touch a graph in use
        with attack_state_guard(model):
            ir_adv, vis_adv = attack(ir, vis, label)
        adv_inputs = (ir_adv.detach(), vis_adv.detach())
    total: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = {}
    if a > 0:
        clean, clean_parts = objective(model(ir, vis), batch)
        total = a * clean
        parts["clean"] = clean.detach()
        parts.update({f"clean_{k}": v.detach() for k, v in clean_parts.items()})
    if adv_inputs is not None:
        adv, adv_parts = objective(model(*adv_inputs), batch)  # the clean batch: clean fusion targets
        total = b * adv if total is None else total + b * adv
        parts["adv"] = adv.detach()
        parts.update({f"adv_{k}": v.detach() for k, v in adv_parts.items()})
    assert total is not None  # a + b > 0 and b > 0 implies an attack
    return RobustLoss(total, parts)
