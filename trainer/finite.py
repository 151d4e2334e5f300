"""Finiteness guards: a training run stops at its first non-finite loss or gradient, and no checkpoint holds NaN.

A diverged run (too large a learning rate or loss weight) otherwise keeps going: its NaN model still gets a
finite mIoU (a constant prediction), so it could be chosen as ``best.pt``. The guards here turn that into an
error naming the step, the loss parts and the last good checkpoint.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from trainer.errors import PaifError

__all__ = ["NonFiniteError", "nonfinite_tensors", "check_loss", "grad_norm", "describe_parts", "last_good_text",
           "StepGuard"]

log = logging.getLogger(__name__)

ADVICE = "the training diverged: lower optim.lr or the loss weights (lambda_seg, lambda_fusion) and start again"


class NonFiniteError(PaifError, FloatingPointError):
    """A loss, gradient or state dict holds NaN or ±inf: the training diverged."""


def nonfinite_tensors(tensors: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating tensors in ``tensors`` holding at least one NaN or ±inf value."""
    return [k for k, t in tensors.items()
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def describe_parts(parts: Mapping[str, float | Tensor]) -> str:
    """``"seg=nan, fusion=0.12"``: the loss parts, for an error message."""
    return ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())


def last_good_text(last_good: str | None) -> str:
    """``"last good checkpoint: <path>"`` or ``"no checkpoint written yet"``."""
    return f"last good checkpoint: {last_good}" if last_good else "no checkpoint written yet"


def check_loss(loss: Tensor | float, parts: Mapping[str, float | Tensor], where: str,
               last_good: str | None = None, what: str = "loss") -> None:
    """Raise :class:`NonFiniteError` when ``loss`` is NaN or ±inf.

    Args:
        loss: the scalar loss of a step, or another scalar named by ``what`` (e.g. "gradient norm"); a
            tensor is read once (one device synchronisation).
        parts: its named parts (``seg``, ``fusion``, ``loss_adv``, ...), listed in the message.
        where: the step, e.g. ``"training step 12"``.
        last_good: the newest checkpoint written from finite weights, named in the message.
        what: what ``loss`` is, for the message.
    """
    value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
    if not math.isfinite(value):
        raise NonFiniteError(f"non-finite {what} {value} at {where} (loss parts: {describe_parts(parts)}); "
                             f"{last_good_text(last_good)}; {ADVICE}")


def grad_norm(params: Iterable[Tensor]) -> Tensor:
    """The total L2 norm of the gradients of ``params`` (0 when none has one)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


class StepGuard:
    """``nan_policy`` of a training loop: a non-finite loss or gradient norm stops the run, or skips the step.

    ``policy="stop"``: :meth:`check` raises :class:`NonFiniteError` (as :func:`check_loss`). ``policy="skip"``: it
    logs a warning, counts the step and returns False (the caller then leaves the weights unchanged); after
    ``max_skips`` skipped steps in a row it raises, naming the count and the last problem. :meth:`good_step` ends a
    streak. The counters go into checkpoints (:meth:`state_dict`) so a resumed run keeps them.

    Args:
        policy: "stop" or "skip" (``trainer.config.NAN_POLICIES``).
        max_skips: skipped steps in a row that stop the run (>= 1).
    """

    def __init__(self, policy: str = "stop", max_skips: int = 10) -> None:
        if policy not in ("stop", "skip") or max_skips < 1:
            raise ValueError(f"StepGuard: expected policy 'stop' or 'skip' and max_skips >= 1, got {policy!r}, "
                             f"{max_skips}")
        self.policy, self.max_skips = policy, int(max_skips)
        self.in_a_row = 0
        self.skipped = 0

    def check(self, value: Tensor | float, parts: Mapping[str, float | Tensor], where: str,
              last_good: str | None = None, what: str = "loss") -> bool:
        """True when ``value`` is finite; else raise (stop) or count the skip and return False (skip)."""
        try:
            check_loss(value, parts, where, last_good, what)
            return True
        except NonFiniteError as exc:
            if self.policy == "stop":
                raise
            self.in_a_row += 1
            self.skipped += 1
            if self.in_a_row >= self.max_skips:
                raise NonFiniteError(
                    f"{self.in_a_row} steps in a row skipped (nan_policy=skip, nan_max_skips={self.max_skips}); "
                    f"the last: {exc}") from exc
            log.warning("skipped %s: non-finite %s (%d in a row, %d in all; nan_policy=skip)", where, what,
                        self.in_a_row, self.skipped)
            return False

    def good_step(self) -> None:
        """A step went through: the streak of skipped steps ends."""
        self.in_a_row = 0

    def state_dict(self) -> dict[str, Any]:
        return {"in_a_row": self.in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.in_a_row, self.skipped = int(state.get("in_a_row", 0)), int(state.get("skipped", 0))
