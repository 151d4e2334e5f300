"""The Lightning module of the robust search: one module, one optimiser, NNI's DARTS drives it.

PAIF: Liu et al., ACM MM 2023 (arXiv 2308.03979), bi-level "harmonised" search. NNI 3.0's
``DartsLightningModule`` (nni/nas/oneshot/pytorch/differentiable.py) wraps this module and, for every pair
of batches ``{"train": ..., "val": ...}`` from its combined loader, calls

* ``training_step(val_batch, 2·k)``   — the architecture step (DARTS back-propagates, its Adam steps α),
* ``training_step(train_batch, 2·k+1)`` — the weight step (DARTS calls our optimiser, α excluded).

So the parity of ``batch_idx`` tells which step this is; the adversarial example is made here, inside
``training_step`` (the strategy stays NNI's). A non-finite loss or gradient norm stops the search
(:class:`trainer.finite.NonFiniteError`, naming the step, the loss parts and the last epoch checkpoint), or, with
``nan_policy="skip"``, skips that step (its gradients are dropped) until ``nan_max_skips`` in a row.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn as nn
from nni.nas.evaluator.pytorch import LightningModule

from trainer.finite import StepGuard, grad_norm
from trainer.robust_objective import AttackFactory, AttackFn, Objective, convex_weights, robust_loss

__all__ = ["RobustSearchModule", "is_architecture_step"]

log = logging.getLogger(__name__)


def is_architecture_step(batch_idx: int) -> bool:
    """True for NNI DARTS' architecture step (even ``batch_idx``), False for the weight step (odd)."""
    return batch_idx % 2 == 0


class RobustSearchModule(LightningModule):
    """Robust objective ``(1-w)·L(u) + w·L(u+δ)`` with ``w`` for weights and ``w_arch`` for α.

    The loss is :func:`trainer.robust_objective.robust_loss` (the one retraining uses): fusion targets of
    ``L(u+δ)`` are the clean sources; build the attack with ``model_mode="keep"`` (the supernet's training mode).

    Args:
        objective: ``objective(model(ir, vis), batch) -> (loss, parts)``.
        attack_factory: ``factory(model) -> attack(ir, vis, label) -> (ir_adv, vis_adv)``; None disables δ
            (then ``w`` and ``w_arch`` must be 0).
        w: robustness weight of the weight step (training split).
        w_arch: robustness weight of the architecture step (held-out split).
        lr, weight_decay, betas: the one optimiser (Adam) of the network weights.
        nan_policy, nan_max_skips: at a non-finite loss or gradient norm, "stop" or "skip" the step (stopping after
            ``nan_max_skips`` skipped steps in a row), :class:`trainer.finite.StepGuard`.
    """

    def __init__(
        self,
        objective: Objective,
        attack_factory: AttackFactory | None,
        w: float = 0.5,
        w_arch: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        nan_policy: str = "stop",
        nan_max_skips: int = 10,
    ) -> None:
        super().__init__()
        for name, value in (("w", w), ("w_arch", w_arch)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"RobustSearchModule: expected {name} in [0, 1], got {value}")
        if attack_factory is None and (w > 0 or w_arch > 0):
            raise ValueError(
                f"RobustSearchModule: expected an attack when w or w_arch > 0, got none (w={w}, w_arch={w_arch}); "
                "set attack.eps > 0 or both weights to 0"
            )
        self.objective = objective
        self.attack_factory = attack_factory
        self.w = float(w)
        self.w_arch = float(w_arch)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.betas = tuple(betas)
        # (model, attack) in a tuple: not registered as a submodule, so not in the state dict
        self._attack_cache: tuple[nn.Module, AttackFn] | None = None
        self.epoch_sums: dict[str, float] = {}
        self.epoch_counts: dict[str, int] = {}
        self.guard = StepGuard(nan_policy, nan_max_skips)
        self._step_ok = True  # the loss of the step being taken was finite
        self._parts: dict[str, torch.Tensor] = {}
        self._where = ""

    def forward(self, ir: torch.Tensor, vis: torch.Tensor) -> Any:
        return self.model(ir, vis)

    def attack(self) -> AttackFn | None:
        """The attack bound to the current model (built once per model)."""
        if self.attack_factory is None:
            return None
        if self._attack_cache is None or self._attack_cache[0] is not self.model:
            self._attack_cache = (self.model, self.attack_factory(self.model))
        return self._attack_cache[1]

    def robust_step(self, batch: Mapping[str, Any], architecture: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted loss of one step; ``architecture`` selects ``w_arch`` (else ``w``)."""
        w = self.w_arch if architecture else self.w
        out = robust_loss(self.model, self.objective, batch, self.attack() if w > 0 else None, *convex_weights(w))
        return out.loss, out.parts

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        architecture = is_architecture_step(batch_idx)
        loss, parts = self.robust_step(batch, architecture)
        phase = "arch" if architecture else "weight"
        self._where = f"search {phase} step (epoch {self._epoch()}, batch {batch_idx})"
        self._parts = parts
        self._step_ok = self.guard.check(loss, parts, self._where, self._last_good())
        if self._step_ok:  # a skipped step (nan_policy=skip) logs no NaN
            batch_size = int(batch["ir"].shape[0])
            self.log(f"search/{phase}_loss", loss.detach(), prog_bar=True, batch_size=batch_size)
            for k, v in parts.items():
                self.log(f"search/{phase}_{k}", v, batch_size=batch_size)
            self._accumulate(phase, loss.detach(), parts)
        return {"loss": loss}

    def guard_gradients(self, params: list[torch.Tensor], architecture: bool) -> None:
        """Before an optimiser step: apply the ``nan_policy`` to the gradient norm of ``params``.

        A skipped step (non-finite loss or gradient norm under ``nan_policy="skip"``) drops the gradients of
        ``params``: Adam then leaves them and their moments unchanged.
        """
        ok = self._step_ok and self.guard.check(grad_norm(params), self._parts, self._where, self._last_good(),
                                                what="gradient norm")
        if ok:
            self.guard.good_step()
        else:
            for p in params:
                p.grad = None

    def _epoch(self) -> int:
        return int(self.trainer.current_epoch) if self._trainer is not None else 0

    def _last_good(self) -> str | None:
        """The newest epoch checkpoint Lightning wrote (checkpoints hold finite weights: the loss was checked)."""
        if self._trainer is None:
            return None
        for callback in self._trainer.checkpoint_callbacks:  # the every-epoch last.ckpt callback (strategies.darts)
            if getattr(callback, "filename", None) == "last":
                return getattr(callback, "best_model_path", None) or None
        return None

    def _accumulate(self, phase: str, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        for k, v in {"loss": loss, **parts}.items():
            key = f"{phase}_{k}"
            self.epoch_sums[key] = self.epoch_sums.get(key, 0.0) + float(v)
            self.epoch_counts[key] = self.epoch_counts.get(key, 0) + 1

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # not on_train_epoch_start: Lightning skips it for the first epoch after an epoch-end resume
        if batch_idx == 0:
            self.epoch_sums, self.epoch_counts = {}, {}

    def epoch_means(self) -> dict[str, float]:
        """Means of the logged losses over the current epoch (``arch_loss``, ``weight_adv``, ...)."""
        return {k: self.epoch_sums[k] / self.epoch_counts[k] for k in sorted(self.epoch_sums)}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # DARTS removes the architecture parameters from this optimiser (postprocess_weight_optimizers).
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
