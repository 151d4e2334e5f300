"""Colour conversion between RGB and YCbCr (ITU-R BT.601, full range) — the one home of these formulas.

The fusion networks of the IVIF literature (SeAFusion, PAIF) fuse the infrared image with the luminance Y
of the visible image and recombine the fused luminance with the visible chroma. The functions here are
pure, differentiable (no clamp inside) and exact inverses of each other.
"""
from __future__ import annotations

import torch

__all__ = ["rgb_to_ycbcr", "ycbcr_to_rgb", "rgb_to_y", "KR", "KB"]

KR = 0.299
KB = 0.114
KG = 1.0 - KR - KB
_CB_SCALE = 2.0 * (1.0 - KB)  # 1.772
_CR_SCALE = 2.0 * (1.0 - KR)  # 1.402


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


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """RGB → YCbCr with chroma offset 0.5 (JPEG / BT.601 full range).

    Args:
        rgb: (*, 3, H, W), range [0, 1].
    Returns:
        (*, 3, H, W) with channels (Y, Cb, Cr), each in [0, 1] for inputs in [0, 1].
    """
    _check(rgb, "rgb_to_ycbcr")
    r, g, b = rgb.unbind(-3)
    y = KR * r + KG * g + KB * b
    cb = (b - y) / _CB_SCALE + 0.5
    cr = (r - y) / _CR_SCALE + 0.5
    return torch.stack((y, cb, cr), dim=-3)


def ycbcr_to_rgb(ycbcr: torch.Tensor) -> torch.Tensor:
    """YCbCr (channels Y, Cb, Cr; chroma offset 0.5) → RGB; the exact inverse of :func:`rgb_to_ycbcr`.

    Args:
        ycbcr: (*, 3, H, W).
    Returns:
        (*, 3, H, W) RGB, not clamped (a fused Y can leave the RGB gamut; clamp where an image is needed).
    """
    _check(ycbcr, "ycbcr_to_rgb")
    y, cb, cr = ycbcr.unbind(-3)
    r = y + _CR_SCALE * (cr - 0.5)
    b = y + _CB_SCALE * (cb - 0.5)
    g = (y - KR * r - KB * b) / KG
    return torch.stack((r, g, b), dim=-3)
