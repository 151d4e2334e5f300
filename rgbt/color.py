"""Colour conversion between RGB and YCbCr (ITU-R BT.601, full range) — the one home of these formulas.

The fusion networks of the IVIF literature (SeAFusion, PAIF) fuse the infrared image with the luminance Y
of the visible image and recombine the fused luminance with the visible chroma. The functions here are
pure, differentiable (no clamp inside) and exact inverses of each other.

``standard="published"`` selects the rounded coefficients of the published PAIF code (``RGB2YCrCb`` /
``YCrCb2RGB`` in LiuZhu-CV/PAIF ``core/model_fusion_auto.py``): Cb = (B − Y)·0.564 + 0.5,
Cr = (R − Y)·0.713 + 0.5 and the inverse R = Y + 1.403·Cr', G = Y − 0.714·Cr' − 0.344·Cb',
B = Y + 1.773·Cb' (Cb' = Cb − 0.5, Cr' = Cr − 0.5). Y is the same; the two directions are not exact inverses
(round trip error up to ≈ 2e-3). It exists to reproduce the published checkpoints; the channel order here
is (Y, Cb, Cr) for both standards.
"""
from __future__ import annotations

import torch

__all__ = ["rgb_to_ycbcr", "ycbcr_to_rgb", "rgb_to_y", "KR", "KB", "COLOR_STANDARDS"]

KR = 0.299
KB = 0.114
KG = 1.0 - KR - KB
_CB_SCALE = 2.0 * (1.0 - KB)  # 1.772
_CR_SCALE = 2.0 * (1.0 - KR)  # 1.402

COLOR_STANDARDS = ("bt601", "published")
"""``bt601``: exact BT.601 full range (the default); ``published``: the published PAIF code's rounded numbers."""
# published PAIF: forward chroma scales (Cb, Cr) and inverse coefficients (R←Cr', G←Cr', G←Cb', B←Cb')
_PUB_CB, _PUB_CR = 0.564, 0.713
_PUB_R_CR, _PUB_G_CR, _PUB_G_CB, _PUB_B_CB = 1.403, -0.714, -0.344, 1.773


def _check(image: torch.Tensor, name: str) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(image).__name__}")
    if image.dim() < 3 or image.shape[-3] != 3:
        raise ValueError(f"{name}: expected shape (*, 3, H, W), got {tuple(image.shape)}")


def rgb_to_y(rgb: torch.Tensor) -> torch.Tensor:
    """Luminance of an RGB image.

    Args:
        rgb: (*, 3, H, W), range [0, 1].
    Returns:
        (*, 1, H, W), range [0, 1].
    """
    _check(rgb, "rgb_to_y")
    r, g, b = rgb.unbind(-3)
    return (KR * r + KG * g + KB * b).unsqueeze(-3)


def _check_standard(standard: str, name: str) -> None:
    if standard not in COLOR_STANDARDS:
        raise ValueError(f"{name}: expected standard in {COLOR_STANDARDS}, got {standard!r}")


def rgb_to_ycbcr(rgb: torch.Tensor, standard: str = "bt601") -> torch.Tensor:
    """RGB → YCbCr with chroma offset 0.5 (JPEG / BT.601 full range).

    Args:
        rgb: (*, 3, H, W), range [0, 1].
        standard: ``"bt601"`` (exact) or ``"published"`` (the PAIF code's rounded chroma scales).
    Returns:
        (*, 3, H, W) with channels (Y, Cb, Cr), each in [0, 1] for inputs in [0, 1].
    """
    _check(rgb, "rgb_to_ycbcr")
    _check_standard(standard, "rgb_to_ycbcr")
    r, g, b = rgb.unbind(-3)
    y = KR * r + KG * g + KB * b
    if standard == "published":
        cb = (b - y) * _PUB_CB + 0.5
        cr = (r - y) * _PUB_CR + 0.5
    else:
        cb = (b - y) / _CB_SCALE + 0.5
        cr = (r - y) / _CR_SCALE + 0.5
    return torch.stack((y, cb, cr), dim=-3)


def ycbcr_to_rgb(ycbcr: torch.Tensor, standard: str = "bt601") -> torch.Tensor:
    """YCbCr (channels Y, Cb, Cr; chroma offset 0.5) → RGB; the exact inverse of :func:`rgb_to_ycbcr`.

    Args:
        ycbcr: (*, 3, H, W).
        standard: ``"bt601"`` (exact inverse) or ``"published"`` (the PAIF code's rounded matrix, which is
            not the exact inverse of its forward conversion).
    Returns:
        (*, 3, H, W) RGB, not clamped (a fused Y can leave the RGB gamut; clamp where an image is needed).
    """
    _check(ycbcr, "ycbcr_to_rgb")
    _check_standard(standard, "ycbcr_to_rgb")
    y, cb, cr = ycbcr.unbind(-3)
    if standard == "published":
        cb, cr = cb - 0.5, cr - 0.5
        return torch.stack((y + _PUB_R_CR * cr, y + _PUB_G_CR * cr + _PUB_G_CB * cb, y + _PUB_B_CB * cb), dim=-3)
    r = y + _CR_SCALE * (cr - 0.5)
    b = y + _CB_SCALE * (cb - 0.5)
    g = (y - KR * r - KB * b) / KG
    return torch.stack((r, g, b), dim=-3)
