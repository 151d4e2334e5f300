"""Candidate operations of the PAIF fusion search space, as one registry ``name -> builder(C)``.

PAIF: "PAIF: Perception-Aware Infrared-Visible Image Fusion for Attack-Tolerant Semantic Segmentation"
(Liu et al., ACM MM 2023). The op families follow the paper's code: residual dense block, residual module,
dilated depthwise-separable conv with residual, DARTS separable conv (Liu et al., ICLR 2019), ECA channel
attention (Wang et al., CVPR 2020), spatial-attention block (CBAM, Woo et al., ECCV 2018), plus a windowed
multi-head self-attention (Swin-style windows, Liu et al., ICCV 2021) that fits memory at full resolution.

The blocks are the published ones (``operations_m.py`` of LiuZhu-CV/PAIF, read for facts): convs without
bias, one PReLU slope per activation, and the ECA / spatial-attention candidates as full blocks around their
gate (not bare gates), so their parameter counts match the published net (``eca_k3`` 18,436 at C=32).

Every op maps (B, C, H, W) -> (B, C, H, W) for any H, W (odd or even). The registry name carries every
parameter (``dense_k3_d1``); names are never parsed at build time — each entry is a ``functools.partial``.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from search_space.activations import PReLU

__all__ = [
    "OPS", "DEFAULT_CANDIDATES", "get_padding", "check_candidates",
    "ResidualDenseBlock", "ResidualModule", "DilatedSepConvResidual", "SepConv",
    "ECABlock", "SpatialAttentionBlock", "WindowSelfAttention",
]


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding of a stride-1 convolution: ``(k - 1) // 2 * d`` (odd ``k`` only)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"get_padding: expected an odd kernel size >= 1, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"get_padding: expected dilation >= 1, got {dilation}")
    return (kernel_size - 1) // 2 * dilation


def _conv(c_in: int, c_out: int, k: int, d: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """Stride-1 'same' convolution; without bias by default, as every conv of the published op blocks."""
    return nn.Conv2d(c_in, c_out, k, padding=get_padding(k, d), dilation=d, groups=groups, bias=bias)


class ResidualDenseBlock(nn.Module):
    """Three k×k (dilation d) convs with dense concatenation; ``x + x3 / 3``.

    x1 = act(conv1(x)); x2 = act(conv2([x, x1])); x3 = act(conv3([x, x1, x2])); out = x + x3 / 3, with one
    PReLU (a single slope, shared by the three convs) and convs C→C, 2C→C, 3C→C without bias, as published.
    Parameters: 6·k²·C² + 1 (55,297 at k=3, C=32).
    """

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1) -> None:
        super().__init__()
        c = channels
        self.conv1 = _conv(c, c, kernel_size, dilation)
        self.conv2 = _conv(2 * c, c, kernel_size, dilation)
        self.conv3 = _conv(3 * c, c, kernel_size, dilation)
        self.act = PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.act(self.conv1(x))
        x2 = self.act(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.act(self.conv3(torch.cat((x, x1, x2), 1)))
        return x + x3 / 3.0


class ResidualModule(nn.Module):
    """k×k dilated conv → 3×3 d2 conv → 1×1 conv → BN → PReLU, plus identity (published residual module).

    No activation between the convs, no conv bias, one PReLU slope.
    Parameters: k²C² + 9C² + C² + 2C + 1 (60,481 at k=7, C=32).
    """

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1) -> None:
        super().__init__()
        c = channels
        self.body = nn.Sequential(
            _conv(c, c, kernel_size, dilation),
            _conv(c, c, 3, 2),
            _conv(c, c, 1),
            nn.BatchNorm2d(c),
            PReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class DilatedSepConvResidual(nn.Module):
    """Dilated depthwise-separable conv with residual: ``x + BN(pw(dw_kxk_d(relu(x))))``.

    Parameters: k²C + C² + 2C (1,376 at k=3, C=32).
    """

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 2) -> None:
        super().__init__()
        c = channels
        self.body = nn.Sequential(
            nn.ReLU(inplace=False),
            _conv(c, c, kernel_size, dilation, groups=c),
            _conv(c, c, 1),
            nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SepConv(nn.Module):
    """DARTS separable conv: (ReLU → dw k×k → pw 1×1 → BN) twice, no residual (the chain cell adds one)."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        c = channels

        def half() -> list[nn.Module]:
            return [nn.ReLU(inplace=False), _conv(c, c, kernel_size, groups=c), _conv(c, c, 1),
                    nn.BatchNorm2d(c)]

        self.body = nn.Sequential(*half(), *half())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _GatedConvBlock(nn.Module):
    """The published attention *block* around a gate: ``act(gate(conv2(act(f))) + f)`` with ``f = conv1(x)``.

    conv1 is 3×3 C→C, conv2 k×k C→C (no biases), ``act`` one PReLU slope shared by both uses. Subclasses
    set ``self.gate`` (B, C, H, W) -> (B, C, H, W). The block has no identity path of its own: the chain
    cell adds one around its ops.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv1 = _conv(channels, channels, 3)
        self.conv2 = _conv(channels, channels, kernel_size)
        self.act = PReLU()

    def gate(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv1(x)
        return self.act(self.gate(self.conv2(self.act(f))) + f)


class ECABlock(_GatedConvBlock):
    """ECA block (Wang et al., CVPR 2020) as published: the gate is ``x · sigmoid(conv1d_k(avgpool(x)))``.

    Parameters: 9C² + k²C² + k + 1 (18,436 at k=3, C=32).
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__(channels, kernel_size)
        self.eca = nn.Conv1d(1, 1, kernel_size, padding=get_padding(kernel_size), bias=False)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        w = self.eca(x.mean(dim=(2, 3)).unsqueeze(1)).squeeze(1)  # (B, C)
        return x * torch.sigmoid(w)[:, :, None, None]


class SpatialAttentionBlock(_GatedConvBlock):
    """Spatial-attention block (CBAM's spatial gate, Woo et al., ECCV 2018) as published: the gate is
    ``x · sigmoid(conv_kxk([max_c x, mean_c x]))`` (conv 2→1, no bias).

    Parameters: 9C² + k²C² + 2k² + 1.
    """

    def __init__(self, channels: int, kernel_size: int = 7) -> None:
        super().__init__(channels, kernel_size)
        self.spatial = _conv(2, 1, kernel_size)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.cat((x.amax(1, keepdim=True), x.mean(1, keepdim=True)), 1)
        return x * torch.sigmoid(self.spatial(s))


class WindowSelfAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping w×w windows, with residual.

    ``x + proj(attn(qkv(GroupNorm(x))))``. Sizes not divisible by ``w`` are zero-padded at the bottom/right
    and the padded keys are masked out, so the result for real pixels does not depend on the padding.
    Memory is O(H·W·w²) instead of O((H·W)²) for global attention.
    """

    def __init__(self, channels: int, window: int = 8, heads: int = 2) -> None:
        super().__init__()
        if channels % heads != 0:
            raise ValueError(f"WindowSelfAttention: expected channels divisible by heads={heads}, got {channels}")
        self.window, self.heads = window, heads
        self.norm = nn.GroupNorm(1, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def _to_windows(self, t: torch.Tensor) -> torch.Tensor:
        """(B, C', Hp, Wp) -> (B·nW, heads, w², C'/heads)."""
        b, c, hp, wp = t.shape
        w, h = self.window, self.heads
        t = t.view(b, h, c // h, hp // w, w, wp // w, w)
        return t.permute(0, 3, 5, 1, 4, 6, 2).reshape(b * (hp // w) * (wp // w), h, w * w, c // h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        w = self.window
        ph, pw = (-height) % w, (-width) % w
        qkv = self.qkv(self.norm(x))
        if ph or pw:
            qkv = F.pad(qkv, (0, pw, 0, ph))
        hp, wp = height + ph, width + pw
        q, k, v = (self._to_windows(t) for t in qkv.chunk(3, dim=1))
        mask = None
        if ph or pw:
            valid = torch.zeros(1, 1, hp, wp, dtype=torch.bool, device=x.device)
            valid[..., :height, :width] = True
            valid = valid.view(1, 1, hp // w, w, wp // w, w).permute(0, 2, 4, 1, 3, 5)
            # (nW, 1, 1, w²) -> broadcast over batch-major window index and heads/queries
            mask = valid.reshape(1, -1, 1, 1, w * w).expand(b, -1, 1, 1, w * w).reshape(-1, 1, 1, w * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B·nW, heads, w², c/heads)
        out = out.view(b, hp // w, wp // w, self.heads, w, w, c // self.heads)
        out = out.permute(0, 3, 6, 1, 4, 2, 5).reshape(b, c, hp, wp)[..., :height, :width]
        return x + self.proj(out)


def _registry() -> dict[str, Callable[[int], nn.Module]]:
    ops: dict[str, Callable[[int], nn.Module]] = {}
    for k in (3, 5):
        for d in (1, 2):
            ops[f"dense_k{k}_d{d}"] = partial(ResidualDenseBlock, kernel_size=k, dilation=d)
    for k in (3, 5, 7):
        for d in (1, 2):
            ops[f"residual_k{k}_d{d}"] = partial(ResidualModule, kernel_size=k, dilation=d)
    for k in (3, 5):
        for d in (1, 2):
            ops[f"dilconv_k{k}_d{d}"] = partial(DilatedSepConvResidual, kernel_size=k, dilation=d)
    for k in (3, 5, 7):
        ops[f"sepconv_k{k}"] = partial(SepConv, kernel_size=k)
    for k in (3, 5):
        ops[f"eca_k{k}"] = partial(ECABlock, kernel_size=k)
    for k in (3, 5, 7):
        ops[f"spatial_k{k}"] = partial(SpatialAttentionBlock, kernel_size=k)
    for w, h in ((8, 2), (16, 4)):
        ops[f"selfattn_w{w}_h{h}"] = partial(WindowSelfAttention, window=w, heads=h)
    return ops


OPS: dict[str, Callable[[int], nn.Module]] = _registry()
"""Registry of candidate ops: ``OPS[name](C)`` returns a module (B, C, H, W) -> (B, C, H, W)."""

DEFAULT_CANDIDATES: tuple[str, ...] = (
    "dense_k3_d1", "dense_k3_d2", "residual_k3_d1", "residual_k7_d1", "dilconv_k3_d2", "dilconv_k5_d2",
    "sepconv_k3", "sepconv_k5", "eca_k3", "spatial_k7", "selfattn_w8_h2",
)
"""The default candidate set (11 ops; the PAIF genotype's four ops included). Override per search in YAML."""


def check_candidates(candidates: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate a candidate list against :data:`OPS`; returns it as a tuple without duplicates (order kept)."""
    if isinstance(candidates, str) or not candidates:
        raise ValueError(f"candidates: expected a non-empty list of op names, got {candidates!r}")
    unknown = [c for c in candidates if c not in OPS]
    if unknown:
        raise ValueError(f"candidates: unknown op(s) {unknown}; expected names from search_space.ops.OPS: "
                         f"{sorted(OPS)}")
    return tuple(dict.fromkeys(candidates))

