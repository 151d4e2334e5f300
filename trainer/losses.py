"""Training losses: a reference-free fusion loss and the fusion + segmentation task loss.

The fusion loss follows SeAFusion (Tang et al., "Image fusion in the loop of high-level vision tasks",
Information Fusion 2022) — intensity and Sobel-gradient L1 terms against the per-pixel maximum of the
two sources — plus an SSIM term to both sources (Wang et al., "Image quality assessment: from error
visibility to structural similarity", IEEE TIP 2004), as used by PAIF (Liu et al., ACM MM 2023,
arXiv 2308.03979), whose task loss is ``L = λ_f·L_fusion + λ_s·CE`` with λ_f = 0.1 and λ_s = 4.

Conventions:
    * Images are float tensors in [0, 1]; the luminance of the visible image comes from
      :func:`rgbt.color.rgb_to_y` (the only home of colour conversion).
    * SSIM uses a sampled Gaussian window (11 taps, σ = 1.5), C1 = (0.01)², C2 = (0.03)² (data range 1)
      and ``'valid'`` filtering (the MATLAB reference of Wang et al.): the SSIM map has size
      (H - window + 1, W - window + 1) and its mean is the SSIM of the image.
    * The Sobel magnitude is ``|gx| + |gy|`` (SeAFusion's ``Sobelxy``) with the un-normalised 3×3 Sobel
      kernels and replicate padding, so flat borders do not produce false edges.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from rgbt.color import rgb_to_y

__all__ = ["ssim", "sobel_magnitude", "fusion_loss", "FUSION_WEIGHTS", "TaskLoss"]

logger = logging.getLogger(__name__)

#: Default weights of the fusion-loss terms (intensity, gradient, ssim). The intensity/gradient ratio
#: 1:10 is SeAFusion's; the SSIM term has weight 1 (it is bounded in [0, 1]).
FUSION_WEIGHTS: dict[str, float] = {"intensity": 1.0, "gradient": 10.0, "ssim": 1.0}

_C1 = 0.01 ** 2
_C2 = 0.03 ** 2


def _check_image(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected shape (B, C, H, W), got {tuple(x.shape)}; add batch/channel dims")


def _gaussian_kernel1d(window: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(window, dtype=like.dtype, device=like.device) - (window - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def _filter_valid(x: torch.Tensor, k1d: torch.Tensor) -> torch.Tensor:
    """Separable depthwise 'valid' filtering of (B, C, H, W) with a 1-D kernel."""
    c = x.shape[1]
    kw = k1d.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    kh = k1d.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    return F.conv2d(F.conv2d(x, kw, groups=c), kh, groups=c)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    window: int = 11,
    sigma: float = 1.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Differentiable SSIM with a Gaussian window and 'valid' filtering (Wang et al. 2004).

    Args:
        x, y: (B, C, H, W), range [0, 1] (data range 1), with H, W >= ``window``.
        window: odd number of taps of the Gaussian window.
        sigma: standard deviation of the window.
        reduction: ``"mean"`` (scalar over the batch), ``"none"`` (per image, shape (B,)) or
            ``"map"`` (the SSIM map, (B, C, H - window + 1, W - window + 1)).
    Returns:
        SSIM in [-1, 1]; 1 for identical images. Half-precision inputs (or autocast) are computed in
        float32 and returned as float32.
    """
    _check_image(x, "ssim")
    if x.shape != y.shape:
        raise ValueError(f"ssim: expected x and y of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if window % 2 != 1 or window < 1:
        raise ValueError(f"ssim: expected an odd window, got {window}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim: expected H and W >= window={window}, got {tuple(x.shape[-2:])}; use a smaller window")
    if reduction not in ("mean", "none", "map"):
        raise ValueError(f"ssim: expected reduction 'mean', 'none' or 'map', got {reduction!r}")
    # E[x²] - μ² cancels badly in half precision: compute in float32 at least, outside autocast.
    with torch.autocast(device_type=x.device.type, enabled=False):
        if x.dtype in (torch.float16, torch.bfloat16):
            x, y = x.float(), y.float()
        y = y.to(x.dtype)
        k = _gaussian_kernel1d(window, sigma, x)
        mu_x, mu_y = _filter_valid(x, k), _filter_valid(y, k)
        sxx = _filter_valid(x * x, k) - mu_x ** 2
        syy = _filter_valid(y * y, k) - mu_y ** 2
        sxy = _filter_valid(x * y, k) - mu_x * mu_y
        num = (2 * mu_x * mu_y + _C1) * (2 * sxy + _C2)
        den = (mu_x ** 2 + mu_y ** 2 + _C1) * (sxx + syy + _C2)
        smap = num / den
    if reduction == "map":
        return smap
    per_image = smap.flatten(1).mean(1)
    return per_image if reduction == "none" else per_image.mean()


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude ``|gx| + |gy|`` (un-normalised 3×3 kernels, replicate padding).

    Args:
        x: (B, C, H, W), any range.
    Returns:
        (B, C, H, W), >= 0 (at most 8 per unit of input range).
    """
    _check_image(x, "sobel_magnitude")
    c = x.shape[1]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    kernels = torch.stack((kx, kx.t())).unsqueeze(1).repeat(c, 1, 1, 1)  # (2C, 1, 3, 3)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels, groups=c)
    return g.abs().view(x.shape[0], c, 2, *x.shape[-2:]).sum(2)


def fusion_loss(
    ir: torch.Tensor,
    vis_y: torch.Tensor,
    fused_y: torch.Tensor,
    weights: dict[str, float] | None = None,
    per_image: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference-free fusion loss (SeAFusion intensity + gradient terms, plus SSIM to both sources).

    ``L = w_int·|F - max(IR, Y)|₁ + w_grad·| |∇F| - max(|∇IR|, |∇Y|) |₁ + w_ssim·((1-SSIM(F,IR)) + (1-SSIM(F,Y)))/2``
    with means over pixels; ``|∇·|`` is :func:`sobel_magnitude`.

    Args:
        ir: (B, 1, H, W) infrared, [0, 1].
        vis_y: (B, 1, H, W) visible luminance, [0, 1].
        fused_y: (B, 1, H, W) fused luminance, [0, 1]; H, W >= 11 (SSIM window).
        weights: term weights, keys among ``intensity``, ``gradient``, ``ssim``; missing keys take
            :data:`FUSION_WEIGHTS`.
        per_image: return per-image losses of shape (B,) instead of batch means.
    Returns:
        ``(loss, parts)``: the weighted total (scalar, or (B,)) and the unweighted terms
        ``{"intensity", "gradient", "ssim"}`` with the same shape.
    """
    for name, t in (("ir", ir), ("vis_y", vis_y), ("fused_y", fused_y)):
        _check_image(t, f"fusion_loss({name})")
    if not (ir.shape == vis_y.shape == fused_y.shape):
        raise ValueError(
            "fusion_loss: expected ir, vis_y and fused_y of the same shape (B, 1, H, W), got "
            f"{tuple(ir.shape)}, {tuple(vis_y.shape)}, {tuple(fused_y.shape)}"
        )
    w = dict(FUSION_WEIGHTS)
    if weights:
        unknown = set(weights) - set(FUSION_WEIGHTS)
        if unknown:
            raise ValueError(f"fusion_loss: expected weight keys in {sorted(FUSION_WEIGHTS)}, got {sorted(unknown)}")
        w.update(weights)

    def _per_image(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).mean(1)

    intensity = _per_image((fused_y - torch.maximum(ir, vis_y)).abs())
    grad_target = torch.maximum(sobel_magnitude(ir), sobel_magnitude(vis_y))
    gradient = _per_image((sobel_magnitude(fused_y) - grad_target).abs())
    ssim_term = 0.5 * ((1 - ssim(fused_y, ir, reduction="none")) + (1 - ssim(fused_y, vis_y, reduction="none")))
    parts = {"intensity": intensity, "gradient": gradient, "ssim": ssim_term}
    total = w["intensity"] * intensity + w["gradient"] * gradient + w["ssim"] * ssim_term
    if not per_image:
        total = total.mean()
        parts = {k: v.mean() for k, v in parts.items()}
    return total, parts


class TaskLoss:
    """PAIF task loss ``L = λ_f·L_fusion + λ_s·CE`` (Liu et al. 2023).

    Args:
        lambda_fusion: weight λ_f of :func:`fusion_loss` (paper: 0.1).
        lambda_seg: weight λ_s of the cross-entropy (paper: 4).
        ignore_index: label value excluded from the cross-entropy.
        fusion_weights: term weights passed to :func:`fusion_loss`.

    Calling it with ``(out, ir, vis, label=None, per_image=False)`` — ``out`` has ``.fused_y``
    (B, 1, H, W) and ``.logits`` (B, K, H, W); ``ir`` (B, 1, H, W) and ``vis`` (B, 3, H, W) RGB in [0, 1];
    ``label`` (B, H, W) int64 or ``None`` — returns ``(loss, {"fusion": L_fusion, "seg": CE})`` with
    unweighted parts. Without a label the loss is ``λ_f·L_fusion`` and ``seg`` is 0.

    Reduction: by default the CE is the mean over all non-ignored pixels of the batch
    (``F.cross_entropy``); with ``per_image=True`` every term is reduced per image (shape (B,)) —
    the CE over each image's own non-ignored pixels (0 for an image with none) — so the loss of an
    image does not depend on the rest of its batch (for attacks and adversarial training).
    """

    def __init__(
        self,
        lambda_fusion: float = 0.1,
        lambda_seg: float = 4.0,
        ignore_index: int = 255,
        fusion_weights: dict[str, float] | None = None,
    ) -> None:
        self.lambda_fusion = float(lambda_fusion)
        self.lambda_seg = float(lambda_seg)
        self.ignore_index = int(ignore_index)
        self.fusion_weights = dict(fusion_weights) if fusion_weights else None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lambda_fusion={self.lambda_fusion}, lambda_seg={self.lambda_seg}, "
            f"ignore_index={self.ignore_index}, fusion_weights={self.fusion_weights})"
        )

    def segmentation(self, logits: torch.Tensor, label: torch.Tensor, per_image: bool = False) -> torch.Tensor:
        """Cross-entropy with ``ignore_index``: scalar batch pixel-mean, or (B,) per-image means."""
        if logits.dim() != 4 or label.dim() != 3 or logits.shape[0] != label.shape[0] or logits.shape[-2:] != label.shape[-2:]:
            raise ValueError(
                f"TaskLoss: expected logits (B, K, H, W) and label (B, H, W), got {tuple(logits.shape)} and "
                f"{tuple(label.shape)}; upsample the logits to the label size"
            )
        label = label.long()
        ce = F.cross_entropy(logits, label, ignore_index=self.ignore_index, reduction="none")  # (B, H, W)
        valid = (label != self.ignore_index).to(ce.dtype)
        if per_image:
            return ce.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1.0)
        return ce.sum() / valid.sum().clamp_min(1.0)

    def __call__(
        self,
        out: Any,
        ir: torch.Tensor,
        vis: torch.Tensor,
        label: torch.Tensor | None = None,
        per_image: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fused_y = out.fused_y
        fusion, _ = fusion_loss(ir, rgb_to_y(vis), fused_y, self.fusion_weights, per_image=per_image)
        loss = self.lambda_fusion * fusion
        if label is None:
            seg = torch.zeros_like(fusion)
        else:
            seg = self.segmentation(out.logits, label, per_image=per_image)
            loss = loss + self.lambda_seg * seg
        return loss, {"fusion": fusion, "seg": seg}
