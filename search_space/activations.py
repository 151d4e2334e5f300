"""PReLU (He et al., ICCV 2015) with a one-pass CPU backward, for the single-slope activations of the PAIF fusion
net (Liu et al., ACM MM 2023; every published block has one PReLU slope).

PyTorch's CPU ``prelu`` backward writes a full-size gradient of the slope and then sums it, which made it the
largest non-convolution cost of the fusion net's backward after the decomposition (issue 10). :class:`PReLU`
is ``nn.PReLU`` (same parameter, same state-dict key ``weight``, same result) whose backward, for one slope on
a CPU float tensor, is one pass of the compiled kernel (:mod:`search_space.cpp_ext`):
``gx = g·(x > 0 ? 1 : a)``, ``ga = Σ g·x`` over ``x <= 0``. Elsewhere (CUDA, bf16 autocast, several slopes,
``torch.compile``, ``PAIF_NO_CPP=1``, no compiler) it is ``nn.PReLU``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from search_space import cpp_ext

__all__ = ["PReLU", "prelu_cpp_usable"]


class _PReLUFn(torch.autograd.Function):
    """Single-slope PReLU: forward ``F.prelu``, backward one pass of ``prelu_backward`` (once differentiable)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.prelu(x, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        gx, gw = cpp_ext.load_extension().prelu_backward(x.contiguous(), grad.contiguous(), weight.detach())
        return gx, gw.view_as(weight)


def prelu_cpp_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :class:`PReLU` takes the compiled backward for ``x``: one slope, CPU, float32/float64 (as the
    slope), not under ``torch.compile``, ``PAIF_NO_CPP`` unset and the extension built."""
    return (weight.numel() == 1 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and weight.dtype == x.dtype and not torch.compiler.is_compiling()
            and cpp_ext.load_extension() is not None)


class PReLU(nn.PReLU):
    """``nn.PReLU`` with the one-pass CPU backward where :func:`prelu_cpp_usable` (same arguments, parameter
    and result)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and prelu_cpp_usable(x, self.weight):
            return _PReLUFn.apply(x, self.weight)
        return super().forward(x)
