"""Fusion → segmentation pipeline of PAIF (Liu et al., ACM MM 2023).

``FusionSegModel(ir, vis)``: VIS RGB → Y, Cb, Cr (``rgbt.color``); fusion(IR, Y) → fused Y; fused Y with the
visible Cb, Cr → RGB, clamped to [0, 1]; per-image normalisation; SegFormer; logits upsampled (bilinear) to the
input size. Normalisation is per image (the reference normalised with whole-batch statistics, which couples the
images of a batch and lets an attack on one image move the others). The normalised image is replicate-padded
at the bottom/right to a multiple of 32 for SegFormer (480×640 needs none) and the logits cropped back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rgbt.classes import NUM_CLASSES
from rgbt.color import rgb_to_ycbcr, ycbcr_to_rgb
from search_space.genotype import Genotype, build_fusion_net, get_genotype
from search_space.segmenter import build_segmenter

__all__ = ["FusionSegOutput", "FusionSegModel", "normalize_per_image", "build_model", "SEG_MULTIPLE"]

SEG_MULTIPLE = 32
"""The segmenter input is replicate-padded (bottom/right) to a multiple of this; logits are cropped back."""


class FusionSegOutput(NamedTuple):
    """Outputs of :class:`FusionSegModel`.

    fused_y: (B, 1, H, W) in [0, 1]; fused_rgb: (B, 3, H, W) in [0, 1]; logits: (B, K, H, W).
    """

    fused_y: torch.Tensor
    fused_rgb: torch.Tensor
    logits: torch.Tensor


def normalize_per_image(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Standardise each image with its own mean and std over (C, H, W): ``(x − μ_b) / (σ_b + eps)``.

    One mean and one std per image (over all three channels, so the colour balance is kept). Pure; no
    statistic crosses images, so the result for an image does not depend on the rest of the batch.

    Args:
        x: (B, C, H, W).
    Returns:
        (B, C, H, W), each image with mean 0 and std ≈ 1.
    """
    if x.dim() != 4:
        raise ValueError(f"normalize_per_image: expected (B, C, H, W), got {tuple(x.shape)}")
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)


class FusionSegModel(nn.Module):
    """Fusion net followed by a segmenter.

    Args:
        fusion: ``(ir (B,1,H,W), y (B,1,H,W)) -> fused_y (B,1,H,W)`` in [0, 1].
        segmenter: ``rgb_normalised (B,3,H,W) -> logits (B,K,h,w)`` at any lower resolution.
        genotype: the fusion genotype, kept for checkpoints (optional).
    """

    def __init__(self, fusion: nn.Module, segmenter: nn.Module, genotype: Genotype | None = None) -> None:
        super().__init__()
        self.fusion = fusion
        self.segmenter = segmenter
        self.genotype = genotype

    def fuse(self, ir: torch.Tensor, vis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused_y (B,1,H,W), fused_rgb (B,3,H,W)), both in [0, 1]."""
        if ir.dim() != 4 or ir.shape[1] != 1 or vis.dim() != 4 or vis.shape[1] != 3 \
                or ir.shape[0] != vis.shape[0] or ir.shape[-2:] != vis.shape[-2:]:
            raise ValueError(f"FusionSegModel: expected ir (B,1,H,W) and vis (B,3,H,W) of one size, got "
                             f"{tuple(ir.shape)} and {tuple(vis.shape)}")
        ycbcr = rgb_to_ycbcr(vis)
        fused_y = self.fusion(ir, ycbcr[:, :1])
        fused_rgb = ycbcr_to_rgb(torch.cat((fused_y, ycbcr[:, 1:]), 1)).clamp(0.0, 1.0)
        return fused_y, fused_rgb

    def forward(self, ir: torch.Tensor, vis: torch.Tensor) -> FusionSegOutput:
        """ir (B,1,H,W), vis (B,3,H,W) RGB, both in [0, 1] -> :class:`FusionSegOutput` (logits at (H, W))."""
        fused_y, fused_rgb = self.fuse(ir, vis)
        x = normalize_per_image(fused_rgb)
        height, width = x.shape[-2:]
        ph, pw = (-height) % SEG_MULTIPLE, (-width) % SEG_MULTIPLE
        if ph or pw:  # MiT's strides and reduction convs need sizes that are multiples of 32
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        logits = self.segmenter(x)
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return FusionSegOutput(fused_y, fused_rgb, logits[..., :height, :width])


def build_model(genotype: Genotype | str | Path | Mapping[str, Any], segmenter: str = "b0",
                num_classes: int = NUM_CLASSES, pretrained: str | Path | None = None) -> FusionSegModel:
    """Frozen fusion net of ``genotype`` (a Genotype, a name in GENOTYPES, JSON path/text) + SegFormer."""
    g = get_genotype(genotype)
    return FusionSegModel(build_fusion_net(g), build_segmenter(segmenter, num_classes, pretrained), g)
