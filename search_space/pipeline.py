"""Fusion → segmentation pipeline of PAIF (Liu et al., ACM MM 2023).

``FusionSegModel(ir, vis)``: VIS RGB → Y, Cb, Cr (``rgbt.color``); fusion(IR, Y) → fused Y; fused Y with the
visible Cb, Cr → RGB, clamped to [0, 1]; per-image normalisation; SegFormer; logits upsampled (bilinear) to the
input size. Normalisation is per image (the reference normalised with whole-batch statistics, which couples the
images of a batch and lets an attack on one image move the others). The normalised image is replicate-padded
at the bottom/right to a multiple of 32 for SegFormer (480×640 needs none) and the logits cropped back
(:func:`segment`, the one place where the segmenter meets an image). ``seg_scale`` (1, 2 or 4; default 1) lets
SegFormer see the image upsampled by that factor: its logits, at 1/4 of its input, then live at 1/2 (factor 2) or
full (factor 4) resolution of the fused image, for ~seg_scale² the segmenter's work.

Options that reproduce the published PAIF forward (used by checkpoints converted with
``search_space.convert_reference``; see :data:`MODEL_OPTIONS`): ``seg_norm="published"`` (whole-batch min-max,
×255, ImageNet mean/std: :func:`normalize_published`), ``color="published"`` (the published code's rounded
YCbCr coefficients, ``rgbt.color``), ``fusion_output="tanh"`` (the fusion head's raw tanh is the fused Y) and
``mit_norm_eps=1e-6`` (the published MiT's LayerNorm eps in its blocks and stage outputs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rgbt.classes import NUM_CLASSES
from rgbt.color import COLOR_STANDARDS, rgb_to_ycbcr, ycbcr_to_rgb
from search_space.genotype import Genotype, build_fusion_net, get_genotype
from search_space.segmenter import build_segmenter, set_mit_norm_eps

__all__ = ["FusionSegOutput", "FusionSegModel", "FusionOnly", "normalize_per_image", "normalize_published", "build_model",
           "SEG_MULTIPLE", "SEG_NORMS", "SEG_SCALES", "MODEL_OPTIONS", "INPUTS", "IMAGENET_MEAN", "IMAGENET_STD",
           "segment", "check_seg_scale"]

SEG_MULTIPLE = 32
"""The segmenter input is replicate-padded (bottom/right) to a multiple of this; logits are cropped back."""

SEG_NORMS = ("per_image", "published")
"""Segmenter input normalisations: :func:`normalize_per_image` (default) and :func:`normalize_published`."""

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
"""ImageNet RGB statistics on the 0..255 scale, as used by the published PAIF forward."""

SEG_SCALES: tuple[int, ...] = (1, 2, 4)
"""Factors by which :func:`segment` may upsample the segmenter's input (1: the image as it is)."""

MODEL_OPTIONS: dict[str, Any] = {"seg_norm": "per_image", "color": "bt601", "fusion_output": "unit",
                                 "mit_norm_eps": None, "inputs": "both", "seg_scale": 1}
"""Forward options of :func:`build_model` with their defaults (ours); checkpoints record them under ``model``."""

INPUTS: tuple[str, ...] = ("both", "ir", "vis")
"""Which modalities reach the fusion net: ``"both"``; ``"ir"`` (the visible image is zeroed inside the model:
an IR-only baseline) or ``"vis"`` (the infrared image is zeroed). Zeroing inside the model keeps training,
attacks and evaluation consistent: a perturbation of the dropped modality has no effect."""


class FusionSegOutput(NamedTuple):
    """Outputs of :class:`FusionSegModel`.

    fused_y: (B, 1, H, W) in [0, 1] ([-1, 1] with ``fusion_output="tanh"``); fused_rgb: (B, 3, H, W) in [0, 1];
    logits: (B, K, H, W).
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


def normalize_published(x: torch.Tensor) -> torch.Tensor:
    """The published PAIF segmenter input: clamp to [0, 1], min-max with the min and max of the WHOLE BATCH,
    ×255, then per channel ``(x − mean) / std`` with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`.

    Couples the images of a batch (an image's result depends on the others); use it only to reproduce the
    published checkpoints. A constant batch (max = min) divides by 1e-12 instead of 0.

    Args:
        x: (B, 3, H, W) RGB.
    Returns:
        (B, 3, H, W), ImageNet-standardised.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"normalize_published: expected (B, 3, H, W), got {tuple(x.shape)}")
    x = x.clamp(0.0, 1.0)
    lo, hi = x.min(), x.max()
    x = (x - lo) / (hi - lo).clamp_min(1e-12) * 255.0
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def check_seg_scale(seg_scale: Any, where: str = "seg_scale") -> int:
    """``seg_scale`` as an int if it is one of :data:`SEG_SCALES`; otherwise ValueError naming ``where``."""
    if isinstance(seg_scale, bool) or not isinstance(seg_scale, int) or seg_scale not in SEG_SCALES:
        raise ValueError(f"{where}: expected one of {', '.join(map(str, SEG_SCALES))} (the segmenter's input "
                         f"upsampling factor), got {seg_scale!r}")
    return int(seg_scale)


def segment(segmenter: nn.Module, x: torch.Tensor, seg_scale: int = 1) -> torch.Tensor:
    """Logits of ``segmenter`` for the normalised images ``x``, at the size of ``x``.

    With ``seg_scale`` s > 1, ``x`` is first upsampled (bilinear, ``align_corners=False``) to (s·H, s·W). The image
    is replicate-padded at the bottom/right to a multiple of :data:`SEG_MULTIPLE` (MiT's strides and reduction convs
    need it), segmented, the logits upsampled (bilinear) to the padded size divided by s, and cropped to (H, W).
    s = 1 is the plain forward: pad, segment, upsample to the padded size, crop.

    Args:
        segmenter: ``(B, 3, h, w) -> (B, K, h', w')`` logits at any lower resolution (SegFormer: h/4 × w/4).
        x: (B, 3, H, W) normalised RGB.
        seg_scale: one of :data:`SEG_SCALES`.
    Returns:
        (B, K, H, W) logits.
    """
    seg_scale = check_seg_scale(seg_scale)
    if x.dim() != 4:
        raise ValueError(f"segment: expected x of shape (B, C, H, W), got {tuple(x.shape)}")
    height, width = x.shape[-2:]
    if seg_scale > 1:
        x = F.interpolate(x, size=(height * seg_scale, width * seg_scale), mode="bilinear", align_corners=False)
    ph, pw = (-x.shape[-2]) % SEG_MULTIPLE, (-x.shape[-1]) % SEG_MULTIPLE
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    logits = segmenter(x)
    size = (x.shape[-2] // seg_scale, x.shape[-1] // seg_scale)  # the padded grid at the input's scale
    if logits.shape[-2:] != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits[..., :height, :width]


class FusionSegModel(nn.Module):
    """Fusion net followed by a segmenter.

    Args:
        fusion: ``(ir (B,1,H,W), y (B,1,H,W)) -> fused_y (B,1,H,W)`` (in [0, 1], or [-1, 1] for a fusion net
            built with ``output="tanh"``).
        segmenter: ``rgb_normalised (B,3,H,W) -> logits (B,K,h,w)`` at any lower resolution.
        genotype: the fusion genotype, kept for checkpoints (optional).
        seg_norm: segmenter input normalisation, one of :data:`SEG_NORMS`.
        color: RGB↔YCbCr coefficients, one of ``rgbt.color.COLOR_STANDARDS``.
        inputs: the modalities used, one of :data:`INPUTS` (single-modality baselines).
        seg_scale: the segmenter sees the fused image upsampled by this factor, one of :data:`SEG_SCALES`
            (:func:`segment`).
    """

    def __init__(self, fusion: nn.Module, segmenter: nn.Module, genotype: Genotype | None = None,
                 seg_norm: str = "per_image", color: str = "bt601", inputs: str = "both",
                 seg_scale: int = 1) -> None:
        super().__init__()
        if seg_norm not in SEG_NORMS:
            raise ValueError(f"FusionSegModel: expected seg_norm in {SEG_NORMS}, got {seg_norm!r}")
        if color not in COLOR_STANDARDS:
            raise ValueError(f"FusionSegModel: expected color in {COLOR_STANDARDS}, got {color!r}")
        if inputs not in INPUTS:
            raise ValueError(f"FusionSegModel: expected inputs in {INPUTS}, got {inputs!r}")
        seg_scale = check_seg_scale(seg_scale, "FusionSegModel: seg_scale")
        self.fusion = fusion
        self.segmenter = segmenter
        self.genotype = genotype
        self.seg_norm = seg_norm
        self.color = color
        self.inputs = inputs
        self.seg_scale = seg_scale
        self.build_options: dict[str, Any] = dict(MODEL_OPTIONS, seg_norm=seg_norm, color=color, inputs=inputs,
                                                  seg_scale=seg_scale)

    def fuse(self, ir: torch.Tensor, vis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused_y (B,1,H,W), fused_rgb (B,3,H,W)), both in [0, 1]."""
        if ir.dim() != 4 or ir.shape[1] != 1 or vis.dim() != 4 or vis.shape[1] != 3 \
                or ir.shape[0] != vis.shape[0] or ir.shape[-2:] != vis.shape[-2:]:
            raise ValueError(f"FusionSegModel: expected ir (B,1,H,W) and vis (B,3,H,W) of one size, got "
                             f"{tuple(ir.shape)} and {tuple(vis.shape)}")
        if self.inputs == "ir":
            vis = torch.zeros_like(vis)
        elif self.inputs == "vis":
            ir = torch.zeros_like(ir)
        ycbcr = rgb_to_ycbcr(vis, standard=self.color)
        fused_y = self.fusion(ir, ycbcr[:, :1])
        fused_rgb = ycbcr_to_rgb(torch.cat((fused_y, ycbcr[:, 1:]), 1), standard=self.color).clamp(0.0, 1.0)
        return fused_y, fused_rgb

    def forward(self, ir: torch.Tensor, vis: torch.Tensor) -> FusionSegOutput:
        """ir (B,1,H,W), vis (B,3,H,W) RGB, both in [0, 1] -> :class:`FusionSegOutput` (logits at (H, W))."""
        fused_y, fused_rgb = self.fuse(ir, vis)
        x = normalize_published(fused_rgb) if self.seg_norm == "published" else normalize_per_image(fused_rgb)
        return FusionSegOutput(fused_y, fused_rgb, segment(self.segmenter, x, self.seg_scale))


class FusionOnly(nn.Module):
    """The fusion half of a :class:`FusionSegModel` as a model of its own: the segmenter never runs.

    ``forward(ir, vis)`` returns a :class:`FusionSegOutput` whose ``logits`` are empty, (B, 0, H, W), so the
    label-free attacks (``robustness.attacks`` with ``loss="fusion"``) and the fusion loss work on it unchanged:
    fusion-only training on unlabelled pairs (``trainer/retrain.py mode=fusion``) and the fusion-only ONNX export.
    Shares the wrapped model's parameters (``self.model``).
    """

    def __init__(self, model: FusionSegModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, ir: torch.Tensor, vis: torch.Tensor) -> FusionSegOutput:
        """ir (B,1,H,W), vis (B,3,H,W) RGB in [0, 1] -> fused_y, fused_rgb and empty logits (B, 0, H, W)."""
        fused_y, fused_rgb = self.model.fuse(ir, vis)
        return FusionSegOutput(fused_y, fused_rgb, fused_y.new_zeros(fused_y.shape[0], 0, *fused_y.shape[-2:]))


def build_model(genotype: Genotype | str | Path | Mapping[str, Any], segmenter: str = "b0",
                num_classes: int = NUM_CLASSES, pretrained: str | Path | None = None, *,
                decoder_hidden_size: int | None = None, seg_norm: str = "per_image", color: str = "bt601",
                fusion_output: str = "unit", mit_norm_eps: float | None = None,
                inputs: str = "both", seg_scale: int = 1) -> FusionSegModel:
    """Frozen fusion net of ``genotype`` (a Genotype, a name in GENOTYPES, JSON path/text) + SegFormer.

    Args:
        genotype, segmenter, num_classes, pretrained, decoder_hidden_size: the architecture (see
            :func:`search_space.segmenter.build_segmenter`).
        seg_norm: :data:`SEG_NORMS`; ``"published"`` reproduces the published whole-batch normalisation.
        color: ``"bt601"`` or ``"published"`` (``rgbt.color.COLOR_STANDARDS``).
        fusion_output: the fusion head's output, ``"unit"`` ((tanh + 1) / 2) or ``"tanh"`` (published).
        mit_norm_eps: eps of the MiT blocks' and stage outputs' LayerNorms (published: 1e-6); None keeps
            transformers' default (1e-5).
        inputs: :data:`INPUTS`; ``"ir"`` / ``"vis"`` build a single-modality baseline.
        seg_scale: :data:`SEG_SCALES`; the segmenter's input upsampling factor (:func:`segment`).
    Returns:
        The model; ``model.build_options`` holds the options (recorded in checkpoints under ``model``).
    """
    g = get_genotype(genotype)
    check_seg_scale(seg_scale, "build_model: seg_scale")  # before building anything
    seg = build_segmenter(segmenter, num_classes, pretrained, decoder_hidden_size=decoder_hidden_size)
    if mit_norm_eps is not None:
        set_mit_norm_eps(seg, float(mit_norm_eps))
    model = FusionSegModel(build_fusion_net(g, output=fusion_output), seg, g, seg_norm=seg_norm, color=color,
                           inputs=inputs, seg_scale=seg_scale)
    model.build_options.update(fusion_output=fusion_output,
                               mit_norm_eps=None if mit_norm_eps is None else float(mit_norm_eps))
    return model
