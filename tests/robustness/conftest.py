"""Tiny models implementing the fusion+segmentation interface: model(ir, vis) -> (fused_y, fused_rgb, logits)."""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

H, W, K = 32, 40, 9


class Out(NamedTuple):
    fused_y: torch.Tensor
    fused_rgb: torch.Tensor
    logits: torch.Tensor


class ToyNet(nn.Module):
    """conv-BN-ReLU-conv with a fusion head and a segmentation head; channels 8, 9 classes."""

    def __init__(self, k: int = K, c: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1))
        self.fuse = nn.Conv2d(c, 1, 1)
        self.seg = nn.Conv2d(c, k, 1)

    def forward(self, ir: torch.Tensor, vis: torch.Tensor) -> Out:
        f = self.body(torch.cat([ir, vis], 1))
        fused_y = torch.sigmoid(self.fuse(f))
        return Out(fused_y, fused_y.expand(-1, 3, -1, -1), self.seg(f))


class LinearNet(nn.Module):
    """Two classes; logit_1 = <w_ir, ir> + <w_vis, vis> at every pixel, logit_0 = 0.

    With label 0 everywhere the CE is softplus(s), increasing in s, so the worst case over an L-inf
    ball is delta = eps * sign(w) and over an L2 ball delta = eps * w / ||w|| (per modality).
    """

    def __init__(self, h: int = 8, w: int = 10, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w_ir = nn.Parameter(torch.randn(1, 1, h, w, generator=g) / 10)
        self.w_vis = nn.Parameter(torch.randn(1, 3, h, w, generator=g) / 10)

    def forward(self, ir: torch.Tensor, vis: torch.Tensor) -> Out:
        s = (self.w_ir * ir).flatten(1).sum(1) + (self.w_vis * vis).flatten(1).sum(1)
        b, _, h, w = ir.shape
        logits = torch.stack([torch.zeros_like(s), s], 1)[:, :, None, None].expand(b, 2, h, w)
        fused = 0.5 * ir + 0.5 * vis.mean(1, keepdim=True)
        return Out(fused, vis, logits)


@pytest.fixture
def toy_cls() -> type[ToyNet]:
    """The ToyNet class (test modules cannot import conftest under --import-mode=importlib)."""
    return ToyNet


@pytest.fixture
def linear_net() -> LinearNet:
    return LinearNet()


@pytest.fixture
def out_cls() -> type[Out]:
    return Out


@pytest.fixture
def toy() -> ToyNet:
    torch.manual_seed(0)
    return ToyNet().eval()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ir = torch.rand(3, 1, H, W, generator=g)
    vis = torch.rand(3, 3, H, W, generator=g)
    ir[:, :, :4] = 0.0  # saturated regions exercise the [0, 1] projection
    vis[:, :, -4:] = 1.0
    label = torch.randint(0, K, (3, H, W), generator=g)
    label[:, :2] = 255
    return {"ir": ir, "vis": vis, "label": label}
