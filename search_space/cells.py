"""Chain cells and the searchable fusion rule of the PAIF search space (Liu et al., ACM MM 2023).

A chain cell is ``x + o_n(…o_1(x))``; each ``o_i`` is an NNI ``LayerChoice`` over candidate ops, labelled
``op{i}`` inside ``label_scope(scope)`` so its full label is ``"{scope}/op{i}"`` (NNI 3.0 forbids '/' in a
label itself). The choice value is the op name, so a sampled architecture is readable JSON.

The fusion rule combines the IR and VIS feature maps (B, C, H, W) into one. The paper's rule is the
spatial-attention weighted average ``s·F_ir + (1−s)·F_vis`` with
``s = sigmoid(conv5x5([max_c F_ir, mean_c F_ir, max_c F_vis, mean_c F_vis]))``; the alternatives the paper
analysed (add, weighted add, max, mean, concat) are candidates of a ``LayerChoice`` labelled ``"rule"``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from nni.mutable import label_scope
from nni.nas.nn.pytorch import LayerChoice
from torch import nn

from search_space.ops import OPS, check_candidates, get_padding

__all__ = ["ChainCell", "FUSION_RULES", "DEFAULT_RULES", "FusionRule", "make_rule_choice",
           "SpatialAttentionFusion", "ConcatConvFusion", "WeightedAddFusion", "ElementwiseFusion"]


class ChainCell(nn.Module):
    """``x + o_n(…o_1(x))`` with each ``o_i`` a ``LayerChoice`` labelled ``"{scope}/op{i}"``.

    Args:
        scope: label scope, e.g. ``"ir"``, ``"vis"``, ``"fused"`` (no '/').
        channels: C.
        steps: number of chained ops n >= 1.
        candidates: op names from :data:`search_space.ops.OPS`.
    """

    def __init__(self, scope: str, channels: int, steps: int, candidates: Sequence[str]) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"ChainCell {scope}: expected steps >= 1, got {steps}")
        candidates = check_candidates(tuple(candidates))
        with label_scope(scope):
            self.ops = nn.ModuleList(
                LayerChoice({name: OPS[name](channels) for name in candidates}, label=f"op{i + 1}")
                for i in range(steps)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        y = x
        for op in self.ops:
            y = op(y)
        return x + y


class SpatialAttentionFusion(nn.Module):
    """PAIF rule: ``s·F_ir + (1−s)·F_vis``, ``s = sigmoid(conv_k([max F_ir, mean F_ir, max F_vis, mean F_vis]))``.

    The conv 4→1 has no bias, as published (100 parameters at k=5).
    """

    def __init__(self, channels: int, kernel_size: int = 5) -> None:
        super().__init__()
        del channels
        self.conv = nn.Conv2d(4, 1, kernel_size, padding=get_padding(kernel_size), bias=False)

    def forward(self, f_ir: torch.Tensor, f_vis: torch.Tensor) -> torch.Tensor:
        stats = torch.cat((f_ir.amax(1, keepdim=True), f_ir.mean(1, keepdim=True),
                           f_vis.amax(1, keepdim=True), f_vis.mean(1, keepdim=True)), 1)
        s = torch.sigmoid(self.conv(stats))
        return f_vis + s * (f_ir - f_vis)


class ElementwiseFusion(nn.Module):
    """Parameter-free rule: ``"add"``, ``"max"`` or ``"mean"``."""

    _FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "add": torch.add, "max": torch.maximum, "mean": lambda a, b: 0.5 * (a + b),
    }

    def __init__(self, channels: int, mode: str) -> None:
        super().__init__()
        del channels
        if mode not in self._FNS:
            raise ValueError(f"ElementwiseFusion: expected mode in {sorted(self._FNS)}, got {mode!r}")
        self.mode = mode

    def forward(self, f_ir: torch.Tensor, f_vis: torch.Tensor) -> torch.Tensor:
        return self._FNS[self.mode](f_ir, f_vis)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class ConcatConvFusion(nn.Module):
    """``conv1x1([F_ir, F_vis])``: 2C → C."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, f_ir: torch.Tensor, f_vis: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat((f_ir, f_vis), 1))


class WeightedAddFusion(nn.Module):
    """``w·F_ir + (1−w)·F_vis`` with one learnt scalar ``w = sigmoid(θ)``, θ initialised to 0 (w = 0.5)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        del channels
        self.theta = nn.Parameter(torch.zeros(()))

    def forward(self, f_ir: torch.Tensor, f_vis: torch.Tensor) -> torch.Tensor:
        return f_vis + torch.sigmoid(self.theta) * (f_ir - f_vis)


FUSION_RULES: dict[str, Callable[[int], nn.Module]] = {
    "spatial_attention": SpatialAttentionFusion,
    "add": lambda c: ElementwiseFusion(c, "add"),
    "max": lambda c: ElementwiseFusion(c, "max"),
    "mean": lambda c: ElementwiseFusion(c, "mean"),
    "concat_conv": ConcatConvFusion,
    "weighted_add": WeightedAddFusion,
}
"""Registry of fusion rules: ``FUSION_RULES[name](C)`` -> module ``(F_ir, F_vis) -> F`` (all (B, C, H, W))."""

DEFAULT_RULES: tuple[str, ...] = tuple(FUSION_RULES)


def make_rule_choice(channels: int, rules: Sequence[str] = DEFAULT_RULES, label: str = "rule") -> LayerChoice:
    """The searchable fusion rule: a ``LayerChoice`` labelled ``label`` over ``rules``."""
    if isinstance(rules, str) or not rules:
        raise ValueError(f"rules: expected a non-empty list of rule names, got {rules!r}")
    unknown = [r for r in rules if r not in FUSION_RULES]
    if unknown:
        raise ValueError(f"rules: unknown fusion rule(s) {unknown}; expected names from {sorted(FUSION_RULES)}")
    return LayerChoice({r: FUSION_RULES[r](channels) for r in dict.fromkeys(rules)}, label=label)


FusionRule = make_rule_choice
"""Alias named in the contract: ``FusionRule(C, rules)`` builds the ``"rule"`` ``LayerChoice``."""
