"""The PAIF fusion search space as an NNI 3.0 ``ModelSpace`` (Liu et al., ACM MM 2023).

Data flow (all features C channels, full resolution)::

    ir (B,1,H,W) ─ stem ─ GuidedDecomposition ─ ChainCell "ir"  ─┐
                                                                  ├─ rule ─ ChainCell "fused" ─ head ─ fused_y
    y  (B,1,H,W) ─ stem ─ GuidedDecomposition ─ ChainCell "vis" ─┘

Labels: ``ir/op1..ir/opN``, ``vis/op1..``, ``fused/op1..``, ``rule``. A fixed network is this space frozen with
a sample (``space.freeze(genotype.to_sample())``); under ``nni.nas.strategy.DARTS().mutate_model(space)``
every ``LayerChoice`` becomes a ``DifferentiableMixedLayer`` and the space is a supernet.

Usage::

    space = FusionSpace(channels=32, steps=2)
    net = space.freeze({"ir/op1": "dense_k3_d1", ..., "rule": "spatial_attention"})
    fused_y = net(ir, y)
"""
from __future__ import annotations

from typing import Sequence

import torch
from nni.nas.nn.pytorch import ModelSpace
from torch import nn

from search_space.cells import DEFAULT_RULES, ChainCell, make_rule_choice
from search_space.decompose import EPS, RADIUS, GuidedDecomposition
from search_space.ops import DEFAULT_CANDIDATES, check_candidates

__all__ = ["FusionSpace", "Stem", "Head", "CELL_SCOPES"]

CELL_SCOPES: tuple[str, ...] = ("ir", "vis", "fused")


class Stem(nn.Module):
    """conv3×3 1→C + LeakyReLU(0.2): (B, 1, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class Head(nn.Module):
    """conv3×3 C→C/2 + LeakyReLU → conv3×3 C/2→1 → tanh, mapped to [0, 1] by ``(t + 1) / 2``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels // 2, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)
        self.conv2 = nn.Conv2d(channels // 2, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (torch.tanh(self.conv2(self.act(self.conv1(x)))) + 1.0)


class FusionSpace(ModelSpace):
    """Searchable IR-visible fusion network.

    Args:
        channels: feature channels C (even, >= 2).
        steps: ops per chain cell (same for the three cells).
        candidates: op names from :data:`search_space.ops.OPS` offered at every step.
        rules: fusion-rule names from :data:`search_space.cells.FUSION_RULES`.
        eps: guided-filter regularisers of the decomposition.
        radius: guided-filter box radius.
    """

    def __init__(self, channels: int = 32, steps: int = 2, candidates: Sequence[str] = DEFAULT_CANDIDATES,
                 rules: Sequence[str] = DEFAULT_RULES, eps: Sequence[float] = EPS, radius: int = RADIUS) -> None:
        super().__init__()
        if channels < 2 or channels % 2:
            raise ValueError(f"FusionSpace: expected an even channels >= 2 (the head halves it), got {channels}")
        candidates = check_candidates(tuple(candidates))
        self.channels, self.steps, self.candidates, self.rules = channels, steps, candidates, tuple(rules)
        self.stem_ir, self.stem_vis = Stem(channels), Stem(channels)
        self.decomp_ir = GuidedDecomposition(channels, eps, radius)
        self.decomp_vis = GuidedDecomposition(channels, eps, radius)
        self.cell_ir = ChainCell("ir", channels, steps, candidates)
        self.cell_vis = ChainCell("vis", channels, steps, candidates)
        self.rule = make_rule_choice(channels, rules, label="rule")
        self.cell_fused = ChainCell("fused", channels, steps, candidates)
        self.head = Head(channels)

    def forward(self, ir: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Fuse the infrared image and the visible luminance.

        Args:
            ir: (B, 1, H, W) in [0, 1].
            y: (B, 1, H, W) in [0, 1], luminance of the visible image.
        Returns:
            fused luminance (B, 1, H, W) in [0, 1].
        """
        if ir.dim() != 4 or ir.shape[1] != 1 or y.shape != ir.shape:
            raise ValueError(f"FusionSpace: expected ir and y of the same shape (B, 1, H, W), got "
                             f"{tuple(ir.shape)} and {tuple(y.shape)}")
        f_ir = self.cell_ir(self.decomp_ir(self.stem_ir(ir)))
        f_vis = self.cell_vis(self.decomp_vis(self.stem_vis(y)))
        return self.head(self.cell_fused(self.rule(f_ir, f_vis)))
