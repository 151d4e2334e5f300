"""The PAIF fusion search space as an NNI 3.0 ``ModelSpace`` (Liu et al., ACM MM 2023).

Data flow (all features C channels, full resolution), as in the published ``Network_Fusion_Searched``::

    ir (B,1,H,W) ─ stem ─┬─ GuidedDecomposition ─ ChainCell "ir"  ─(+)─┐
                         └──────────────────────────────────────────┘   ├─ rule ─ ChainCell "fused" ─ head ─ fused_y
    y  (B,1,H,W) ─ stem ─┬─ GuidedDecomposition ─ ChainCell "vis" ─(+)─┘
                         └──────────────────────────────────────────┘

Each modality's decomposition cell ends with a skip from its stem features (``branch + stem``), and every chain
cell has its own identity path (``x + ops(x)``). Stems and head follow the published code (convs without bias,
PReLU with one slope); the published net has 259,872 parameters at C=32, 259,871 of them used (its
decomposition cell holds a PReLU that its forward never calls; this space has no such dead parameter).

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

from search_space.activations import PReLU
from search_space.cells import DEFAULT_RULES, ChainCell, make_rule_choice
from search_space.decompose import EPS, RADIUS, GuidedDecomposition
from search_space.ops import DEFAULT_CANDIDATES, check_candidates

__all__ = ["FusionSpace", "Stem", "Head", "CELL_SCOPES", "HEAD_OUTPUTS"]

CELL_SCOPES: tuple[str, ...] = ("ir", "vis", "fused")


HEAD_OUTPUTS: tuple[str, ...] = ("unit", "tanh")
"""How the head's ``tanh`` becomes the fused luminance: ``"unit"`` maps it to [0, 1] by ``(t + 1) / 2`` (this
project's default: the fused Y is a proper image for the fusion loss and the pictures); ``"tanh"`` returns ``t``
in (−1, 1) as the published code does (its negative part is clipped only after conversion to RGB)."""


class Stem(nn.Module):
    """conv3×3 1→C (no bias) + PReLU (one slope): (B, 1, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.act = PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class Head(nn.Module):
    """conv3×3 C→C/2 → conv3×3 C/2→1 (no biases, no activation between) → PReLU → tanh, as published.

    Args:
        channels: C (even).
        output: ``"unit"`` (``(tanh + 1) / 2`` in [0, 1]) or ``"tanh"`` (the published raw tanh); see
            :data:`HEAD_OUTPUTS`.
    """

    def __init__(self, channels: int, output: str = "unit") -> None:
        super().__init__()
        if output not in HEAD_OUTPUTS:
            raise ValueError(f"Head: expected output in {HEAD_OUTPUTS}, got {output!r}")
        self.output = output
        self.conv1 = nn.Conv2d(channels, channels // 2, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels // 2, 1, 3, padding=1, bias=False)
        self.act = PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(self.act(self.conv2(self.conv1(x))))
        return 0.5 * (t + 1.0) if self.output == "unit" else t

    def extra_repr(self) -> str:
        return f"output={self.output!r}"


class FusionSpace(ModelSpace):
    """Searchable IR-visible fusion network.

    Args:
        channels: feature channels C (even, >= 2).
        steps: ops per chain cell (same for the three cells).
        candidates: op names from :data:`search_space.ops.OPS` offered at every step.
        rules: fusion-rule names from :data:`search_space.cells.FUSION_RULES`.
        eps: guided-filter regularisers of the decomposition.
        radius: guided-filter box radius.
        output: the head's output convention, ``"unit"`` or ``"tanh"`` (:data:`HEAD_OUTPUTS`).
    """

    def __init__(self, channels: int = 32, steps: int = 2, candidates: Sequence[str] = DEFAULT_CANDIDATES,
                 rules: Sequence[str] = DEFAULT_RULES, eps: Sequence[float] = EPS, radius: int = RADIUS,
                 output: str = "unit") -> None:
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
        self.head = Head(channels, output)

    def forward(self, ir: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Fuse the infrared image and the visible luminance.

        Args:
            ir: (B, 1, H, W) in [0, 1].
            y: (B, 1, H, W) in [0, 1], luminance of the visible image.
        Returns:
            fused luminance (B, 1, H, W): in [0, 1] with ``output="unit"``, in (−1, 1) with ``"tanh"``.
        """
        if ir.dim() != 4 or ir.shape[1] != 1 or y.shape != ir.shape:
            raise ValueError(f"FusionSpace: expected ir and y of the same shape (B, 1, H, W), got "
                             f"{tuple(ir.shape)} and {tuple(y.shape)}")
        s_ir, s_vis = self.stem_ir(ir), self.stem_vis(y)
        f_ir = s_ir + self.cell_ir(self.decomp_ir(s_ir))
        f_vis = s_vis + self.cell_vis(self.decomp_vis(s_vis))
        return self.head(self.cell_fused(self.rule(f_ir, f_vis)))
