"""A tiny constructed model space for the search tests (no project model needed).

``ToySpace`` mixes two candidates on the raw 4-channel input (IR + RGB): ``identity`` and ``fragile``,
``x + k·laplacian(x)``. On the piecewise-constant training images (dyadic values, replicate padding) the
Laplacian is exactly 0, so both candidates give the same clean output; a perturbation is amplified ~8k
times by ``fragile``. A robust objective must therefore move probability away from ``fragile`` while the
clean objective cannot tell the two apart.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.mutable import label_scope
from nni.nas.nn.pytorch import LayerChoice, ModelSpace


class ToyOut(NamedTuple):
    fused_y: torch.Tensor
    logits: torch.Tensor


class Fragile(nn.Module):
    """``x + k·laplacian(x)`` (8-neighbour, replicate padding): exact identity on constant images."""

    def __init__(self, k: float = 4.0) -> None:
        super().__init__()
        kernel = -torch.ones(1, 1, 3, 3)
        kernel[0, 0, 1, 1] = 8.0
        self.register_buffer("kernel", kernel, persistent=False)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        lap = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.kernel.expand(c, 1, 3, 3), groups=c)
        return x + self.k * lap


class ToySpace(ModelSpace):
    """(ir, vis) -> LayerChoice{identity, fragile} -> 1x1 conv head -> (fused_y, logits of 2 classes)."""

    def __init__(self, k: float = 4.0, head_choice: bool = False) -> None:
        super().__init__()
        with label_scope("toy"):
            self.op = LayerChoice({"identity": nn.Identity(), "fragile": Fragile(k)}, label="op1")
            if head_choice:  # a second α of another size (resume must restore each α's optimiser state)
                self.head = LayerChoice({"k1": nn.Conv2d(4, 2, 1), "k3": nn.Conv2d(4, 2, 3, padding=1),
                                         "k5": nn.Conv2d(4, 2, 5, padding=2)}, label="head")
            else:
                self.head = nn.Conv2d(4, 2, 1)

    def forward(self, ir: torch.Tensor, vis: torch.Tensor) -> ToyOut:
        x = self.op(torch.cat([ir, vis], 1))
        return ToyOut(x[:, :1].clamp(0, 1), self.head(x))


class ToyData(torch.utils.data.Dataset):
    """Constant images with dyadic values m/16; label = 1 where the IR value is above 1/2."""

    def __init__(self, n: int, size: tuple[int, int] = (8, 8), seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        values = torch.randint(2, 15, (n, 4), generator=g).float() / 16
        self.x = values[:, :, None, None].expand(n, 4, *size).contiguous()
        self.y = (self.x[:, 0] > 0.5).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"ir": self.x[i, :1], "vis": self.x[i, 1:], "label": self.y[i], "name": str(i)}


def toy_objective(out: ToyOut, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ce = F.cross_entropy(out.logits, batch["label"])
    return ce, {"seg": ce}


def toy_attack_factory(eps: float = 8 / 255, steps: int = 2):
    """A small in-test L∞ PGD with random start (gradients by autograd.grad, model left untouched)."""

    def factory(model: nn.Module):
        def attack(ir, vis, label):
            x0 = torch.cat([ir, vis], 1)
            x = (x0 + torch.empty_like(x0).uniform_(-eps, eps)).clamp(0, 1)
            for _ in range(steps):
                x = x.detach().requires_grad_(True)
                loss = F.cross_entropy(model(x[:, :1], x[:, 1:]).logits, label)
                (g,) = torch.autograd.grad(loss, [x])
                x = torch.min(torch.max(x + 2.5 * eps / steps * g.sign(), x0 - eps), x0 + eps).clamp(0, 1)
            x = x.detach()
            return x[:, :1], x[:, 1:]

        return attack

    return factory
