"""The robust search objective of PAIF: ``(1 - w)·L(u) + w·L(u + δ)``.

PAIF: Liu et al., "PAIF: Perception-Aware Infrared-Visible Image Fusion for Attack-Tolerant Semantic
Segmentation", ACM MM 2023 (arXiv 2308.03979), §3.3 "harmonised" search. The network weights minimise the
form with weight ``w`` on the training split, the architecture parameters with ``w_arch`` on the held-out
split; ``δ`` is an on-the-fly attack against the current supernet and ``L`` the task loss
``λ_f·L_fusion + λ_s·CE`` (:class:`trainer.losses.TaskLoss`).

Everything here is a pure function of (model, batch) so that the Lightning module stays thin and the
objective can be swapped (tests plug in a toy loss and a toy attack).
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
    "AttackConfig",
    "RobustLoss",
    "task_objective",
    "build_attack_factory",
    "robust_loss",
    "supernet_state_guard",
]

log = logging.getLogger(__name__)

#: ``objective(out, batch) -> (loss scalar, {name: scalar})``; ``out`` is what ``model(ir, vis)`` returns.
Objective = Callable[[Any, Mapping[str, Any]], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]
#: ``attack(ir, vis, label) -> (ir_adv, vis_adv)`` bound to one model.
AttackFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor]"]
#: ``factory(model) -> attack`` (the supernet is only known once NNI has mutated the space).
AttackFactory = Callable[[nn.Module], AttackFn]


@dataclass
class AttackConfig:
    """The on-the-fly attack that produces ``δ`` during the search."""

    name: str = "pgd"  # "pgd" (default, few steps) or "fgsm" (one step from a random start: the fast option)
    eps: float = 8 / 255  # L∞ budget on images in [0, 1]
    steps: int = 3  # PGD steps (ignored by fgsm)
    alpha: float | None = None  # step size; None -> 2.5·eps/steps (PGD), 1.25·eps (FGSM, as in "fast AT")
    targets: tuple[str, ...] = ("ir", "vis")  # perturbed modalities
    loss: str = "seg"  # attacked loss: "seg" (CE, needs labels) or "fusion" (label-free)

    def __post_init__(self) -> None:
        if self.name not in ("pgd", "fgsm"):
            raise ValueError(f"attack.name: expected 'pgd' or 'fgsm', got {self.name!r}")
        if not self.eps >= 0:
            raise ValueError(f"attack.eps: expected a budget >= 0, got {self.eps}")
        if self.steps < 1:
            raise ValueError(f"attack.steps: expected >= 1, got {self.steps}")

    def step_size(self) -> float:
        """The step size actually used."""
        if self.alpha is not None:
            return float(self.alpha)
        return 1.25 * self.eps if self.name == "fgsm" else 2.5 * self.eps / self.steps


@dataclass
class RobustLoss:
    """Result of :func:`robust_loss`: the weighted loss and its detached parts."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]


def task_objective(task_loss: Callable[..., Any]) -> Objective:
    """Adapt a :class:`trainer.losses.TaskLoss` to the ``objective(out, batch)`` form."""

    def objective(out: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return task_loss(out, batch["ir"], batch["vis"], batch.get("label"))

    objective.__qualname__ = f"task_objective({task_loss!r})"
    return objective


def build_attack_factory(cfg: AttackConfig) -> AttackFactory | None:
    """A factory binding :mod:`robustness.attacks` PGD/FGSM (random start) to a model; None when ``eps == 0``."""
    if cfg.eps == 0:
        return None

    def factory(model: nn.Module) -> AttackFn:
        from robustness.attacks import FGSM, PGD

        if cfg.name == "pgd":
            return PGD(model, eps=cfg.eps, alpha=cfg.step_size(), steps=cfg.steps, norm="linf",
                       random_start=True, targets=tuple(cfg.targets), loss=cfg.loss)
        return _fgsm(FGSM, model, cfg)

    return factory


def _fgsm(cls: Any, model: nn.Module, cfg: AttackConfig) -> AttackFn:
    """FGSM with a random start; tolerate FGSM signatures with or without ``alpha``/``random_start``."""
    kwargs = dict(eps=cfg.eps, targets=tuple(cfg.targets), loss=cfg.loss)
    try:
        return cls(model, alpha=cfg.step_size(), random_start=True, **kwargs)
    except TypeError:
        log.warning("robustness.attacks.FGSM takes no alpha/random_start; using its defaults")
        return cls(model, **kwargs)


@contextlib.contextmanager
def supernet_state_guard(model: nn.Module) -> Iterator[None]:
    """Run an attack without touching the supernet: mode, BatchNorm statistics and ``.grad`` are restored.

    The attack objects already promise this; the guard makes the search independent of that promise
    (restoring costs one copy of the BN buffers, tiny next to a forward pass).
    """
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = {p: p.grad for p in model.parameters()}
    grads = {p: (g.detach().clone() if g is not None else None) for p, g in grads.items()}
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
    w: float,
    attack: AttackFn | None,
) -> RobustLoss:
    """``(1 - w)·L(u) + w·L(u + δ)`` for one batch (u = the clean ``ir``/``vis``; δ from ``attack``).

    Args:
        model: ``model(ir (B,1,H,W), vis (B,3,H,W)) -> out`` (images in [0, 1]).
        objective: ``objective(out, batch) -> (loss, parts)``.
        batch: dict with ``ir``, ``vis`` and optionally ``label`` (B,H,W).
        w: robustness weight in [0, 1]; ``w = 0`` skips the attack, ``w = 1`` the clean pass.
        attack: ``attack(ir, vis, label) -> (ir_adv, vis_adv)``; required when ``w > 0``.

    Returns:
        :class:`RobustLoss` with ``loss`` (differentiable scalar) and detached parts ``clean``/``adv`` and
        the objective's own parts prefixed with ``clean_``/``adv_``.
    """
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"robust_loss: expected w in [0, 1], got {w}")
    if w > 0 and attack is None:
        raise ValueError("robust_loss: expected an attack for w > 0, got None; set attack.eps > 0 or w = 0")
    ir, vis, label = batch["ir"], batch["vis"], batch.get("label")
    total: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = {}
    adv_batch = None
    if w > 0:  # δ first: restoring BN buffers after the attack must not touch a graph in use
        assert attack is not None
        with supernet_state_guard(model):
            ir_adv, vis_adv = attack(ir, vis, label)
        adv_batch = dict(batch, ir=ir_adv.detach(), vis=vis_adv.detach())
    if w < 1:
        clean, clean_parts = objective(model(ir, vis), batch)
        total = (1 - w) * clean
        parts["clean"] = clean.detach()
        parts.update({f"clean_{k}": v.detach() for k, v in clean_parts.items()})
    if adv_batch is not None:
        adv, adv_parts = objective(model(adv_batch["ir"], adv_batch["vis"]), adv_batch)
        total = w * adv if total is None else total + w * adv
        parts["adv"] = adv.detach()
        parts.update({f"adv_{k}": v.detach() for k, v in adv_parts.items()})
    assert total is not None
    return RobustLoss(total, parts)
