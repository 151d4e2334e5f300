"""Finiteness guards: a training run stops at its first non-finite loss or gradient, and no checkpoint holds NaN.

A diverged run (too large a learning rate or loss weight) otherwise keeps going: its NaN model still gets a
finite mIoU (a constant prediction), so it could be chosen as ``best.pt``. The guards here turn that into an
error naming the step, the loss parts and the last good checkpoint.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["NonFiniteError", "nonfinite_tensors", "check_loss", "grad_norm", "describe_parts", "last_good_text"]

ADVICE = "the training diverged: lower optim.lr or the loss weights (lambda_seg, lambda_fusion) and start again"


class NonFiniteError(FloatingPointError):
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
