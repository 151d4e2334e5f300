"""Common corruptions, sensor faults and misregistration of infrared-visible pairs, each at fixed seeds.

What an RGB-T rig on a vehicle meets besides an L∞ attacker: one camera degrades (noise, blur, fog,
night, glare, compression; a microbolometer's stripes, thermal crossover, dead pixels), one sensor fails,
or the two cameras drift out of registration. The corruptions follow the recipe of ImageNet-C (Hendrycks &
Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019)
and its segmentation counterpart (Kamann & Rother, "Benchmarking the Robustness of Semantic Segmentation
Models", CVPR 2020): five severities per corruption, severity 0 is the clean image.

Conventions
    * Images are ``(B, C, H, W)`` float tensors in [0, 1]; VIS has C = 3 (RGB), IR has C = 1. Every function
      returns a new tensor of the same shape, dtype and device, clipped to [0, 1].
    * Randomness (noise draws, blur directions, fog maps, dead-pixel positions) comes from a
      ``torch.Generator`` seeded per image (:func:`image_seed` of the run seed, the corruption and the image
      name). The severity is *not* part of the seed, so every severity scales the same draw: a higher severity
      moves each image further from the clean one (PSNR to the clean image falls monotonically).
    * Kornia ops where they fit: ``kornia.filters.motion_blur`` and ``gaussian_blur2d``,
      ``kornia.enhance.jpeg_codec_differentiable``, ``kornia.contrib.diamond_square`` (the fog's plasma
      fractal) and ``kornia.geometry.transform.warp_affine`` (misregistration). The IR-specific corruptions
      are written here.

Registries: ``CORRUPTIONS`` (name → :class:`Corruption`), ``FAULTS`` (name → :class:`Fault`) and
``MISREGISTRATIONS`` (name → the levels of :func:`misregister`).
"""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from kornia.contrib import diamond_square
from kornia.enhance import jpeg_codec_differentiable
from kornia.filters import gaussian_blur2d, motion_blur
from kornia.geometry.transform import get_rotation_matrix2d, warp_affine
from torch import Tensor

from trainer.errors import PaifError

__all__ = [
    "SEVERITIES", "CORRUPTIONS", "FAULTS", "MISREGISTRATIONS", "Corruption", "Fault", "CorruptionError",
    "image_seed", "corrupt", "fault", "misregister", "psnr",
    "gaussian_noise", "motion_blur_vis", "fog", "low_light", "glare", "jpeg",
    "ir_noise", "ir_blur", "stripe_noise", "low_contrast", "dead_pixels",
]

SEVERITIES = 5
MODALITY_CHANNELS = {"ir": 1, "vis": 3}


class CorruptionError(PaifError, ValueError):
    """A corruption, fault or misregistration was asked for with invalid arguments."""


# ---------------------------------------------------------------------------------------------- helpers
def image_seed(seed: int, *parts: str) -> int:
    """A stable 31-bit seed from the run seed and names (e.g. the corruption and the image name).

    ``zlib.crc32`` rather than ``hash``: the same inputs give the same seed in every process.
    """
    return (zlib.crc32("/".join(parts).encode("utf-8")) + 7919 * int(seed)) % (2**31 - 1)


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR in dB of two ``(B, C, H, W)`` images in [0, 1]; identical images give ``inf``."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def _level(table: Sequence[float], severity: int) -> float:
    """The parameter of ``severity`` (0..SEVERITIES) in a table whose entry 0 is the neutral value."""
    return float(table[severity])


def _randn(x: Tensor, g: torch.Generator, shape: Sequence[int] | None = None) -> Tensor:
    """Standard normal draws from ``g`` (on the CPU, so a seed gives the same draw on every device)."""
    return torch.randn(tuple(shape or x.shape), generator=g).to(x.device, x.dtype)


def _rand(x: Tensor, g: torch.Generator, shape: Sequence[int] | None = None) -> Tensor:
    return torch.rand(tuple(shape or x.shape), generator=g).to(x.device, x.dtype)


# --------------------------------------------------------------------------------------- VIS corruptions
NOISE_SIGMA = (0.0, 0.04, 0.08, 0.12, 0.18, 0.26)
MOTION_KERNEL = (1, 3, 5, 9, 13, 17)
FOG_BETA = (0.0, 0.6, 1.2, 1.8, 2.6, 3.6)
FOG_AIRLIGHT = 0.8
LOW_LIGHT_GAIN = (1.0, 0.5, 0.35, 0.25, 0.15, 0.08)
LOW_LIGHT_PHOTONS = (math.inf, 400.0, 200.0, 100.0, 50.0, 25.0)  # photons at full scale before darkening
GLARE_GAIN = (1.0, 1.15, 1.3, 1.5, 1.75, 2.0)
GLARE_BLOOM = (0.0, 0.1, 0.2, 0.3, 0.45, 0.6)
JPEG_QUALITY = (100, 80, 50, 30, 15, 8)


def gaussian_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """Additive Gaussian noise, σ = 0.04 … 0.26 of the range (sensor read noise). ``(B, C, H, W)`` in [0, 1]."""
    return (x + _level(NOISE_SIGMA, severity) * _randn(x, g)).clamp(0, 1)


def motion_blur_vis(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """Linear motion blur (``kornia.filters.motion_blur``), kernel 3 … 17 px, one random angle per image."""
    k = int(MOTION_KERNEL[severity])
    angle = float(torch.empty(1).uniform_(-45.0, 45.0, generator=g))
    if k <= 1:
        return x.clone()
    return motion_blur(x, k, angle, 0.0, border_type="replicate", mode="bilinear").clamp(0, 1)


def _depth(x: Tensor, g: torch.Generator) -> Tensor:
    """A pseudo-depth map (B, 1, H, W) in [0, 1]: far at the top of a road scene, plus a plasma fractal."""
    b, _, h, w = x.shape
    plasma = diamond_square((b, 1, h, w), roughness=0.6, random_fn=functools.partial(torch.rand, generator=g),
                            normalize_range=(0.0, 1.0)).to(x.device, x.dtype)
    ramp = torch.linspace(1.0, 0.0, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1)
    return 0.6 * ramp + 0.4 * plasma


def fog(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """Fog / haze by the atmospheric scattering model I = J·t + A·(1 − t), t = exp(−β·d).

    d is :func:`_depth` (plasma fractal from ``kornia.contrib.diamond_square``), A = 0.8, β = 0.6 … 3.6.
    """
    t = torch.exp(-_level(FOG_BETA, severity) * _depth(x, g))
    return (x * t + FOG_AIRLIGHT * (1 - t)).clamp(0, 1)


def low_light(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """Night: darkening by a gain 0.5 … 0.08 plus shot noise of a photon count 400 … 25 at full scale.

    Shot noise is Poisson; its Gaussian approximation (variance = signal / photons) keeps one draw per image
    for all severities.
    """
    gain, photons = _level(LOW_LIGHT_GAIN, severity), _level(LOW_LIGHT_PHOTONS, severity)
    dark = x * gain
    n = _randn(x, g)
    if math.isinf(photons):
        return dark.clamp(0, 1)
    return (dark + (dark / photons).sqrt() * n).clamp(0, 1)


def glare(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """Over-exposure (gain 1.15 … 2) plus veiling glare: a Gaussian bloom (amplitude 0.1 … 0.6, radius a
    quarter of the longer side) around a random light source in the upper 60 % of the image."""
    b, _, h, w = x.shape
    cy = torch.rand(b, generator=g) * 0.6 * (h - 1)
    cx = torch.rand(b, generator=g) * (w - 1)
    yy = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xx = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    r2 = (yy - cy.view(b, 1, 1)) ** 2 + (xx - cx.view(b, 1, 1)) ** 2
    bloom = torch.exp(-r2 / (2 * (0.25 * max(h, w)) ** 2)).unsqueeze(1).to(x.device, x.dtype)
    return (x * _level(GLARE_GAIN, severity) + _level(GLARE_BLOOM, severity) * bloom).clamp(0, 1)


def jpeg(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """JPEG compression at quality 80, 50, 30, 15, 8 (``kornia.enhance.jpeg_codec_differentiable``); RGB only."""
    del g
    if severity == 0:
        return x.clone()
    if x.shape[1] != 3:
        raise CorruptionError(f"jpeg: expected RGB images (B, 3, H, W), got shape {tuple(x.shape)}")
    q = torch.tensor([float(JPEG_QUALITY[severity])], device=x.device, dtype=x.dtype)
    return jpeg_codec_differentiable(x, q).clamp(0, 1)


# ---------------------------------------------------------------------------------------- IR corruptions
IR_NOISE_SIGMA = (0.0, 0.02, 0.04, 0.07, 0.10, 0.15)
IR_BLUR_SIGMA = (0.0, 0.6, 1.0, 1.5, 2.0, 3.0)
STRIPE_AMPLITUDE = (0.0, 0.02, 0.04, 0.06, 0.09, 0.12)
CONTRAST = (1.0, 0.7, 0.5, 0.35, 0.2, 0.1)
DEAD_FRACTION = (0.0, 0.002, 0.005, 0.01, 0.03, 0.06)


def ir_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """Temporal noise of a thermal camera (NETD): additive Gaussian, σ = 0.02 … 0.15 of the range."""
    return (x + _level(IR_NOISE_SIGMA, severity) * _randn(x, g)).clamp(0, 1)


def ir_blur(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """Defocus / thermal optics blur: Gaussian, σ = 0.6 … 3 px (``kornia.filters.gaussian_blur2d``)."""
    del g
    sigma = _level(IR_BLUR_SIGMA, severity)
    if sigma == 0:
        return x.clone()
    k = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur2d(x, (k, k), (sigma, sigma), border_type="reflect").clamp(0, 1)


def stripe_noise(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """Fixed-pattern noise of an uncooled microbolometer: per-column offset (amplitude a = 0.02 … 0.12) and
    gain (a / 2) from the column read-out, plus a per-pixel offset pattern (a / 3)."""
    b, c, h, w = x.shape
    a = _level(STRIPE_AMPLITUDE, severity)
    col_offset = _randn(x, g, (b, 1, 1, w))
    col_gain = _randn(x, g, (b, 1, 1, w))
    pixel = _randn(x, g)
    return (x * (1 + 0.5 * a * col_gain) + a * col_offset + (a / 3) * pixel).clamp(0, 1)


def low_contrast(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """Thermal crossover (objects and background near the same temperature): contrast around the image mean
    scaled by 0.7 … 0.1."""
    del g
    c = _level(CONTRAST, severity)
    if c == 1.0:
        return x.clone()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + c * (x - mean)).clamp(0, 1)


def dead_pixels(x: Tensor, severity: int, g: torch.Generator) -> Tensor:
    """Dead (stuck at 0) and hot (stuck at 1) pixels, half each, on 0.2 … 6 % of the pixels.

    The positions come from one ranking per image, so each severity's defects include the previous ones'.
    """
    b, _, h, w = x.shape
    rank = _rand(x, g, (b, 1, h, w))
    hot = _rand(x, g, (b, 1, h, w)) < 0.5
    dead = rank < _level(DEAD_FRACTION, severity)
    stuck = hot.to(x.dtype).expand_as(x)
    return torch.where(dead.expand_as(x), stuck, x).clamp(0, 1)


# ------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Corruption:
    """One corruption: the modality it degrades, a sentence for the report, the parameter per severity 1-5."""

    modality: str  # "ir" | "vis"
    fn: Callable[[Tensor, int, torch.Generator], Tensor]
    description: str
    levels: tuple  # the parameter at severities 1..5, for the report


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian-noise": Corruption("vis", gaussian_noise, "additive Gaussian noise (σ of the [0, 1] range)",
                                 NOISE_SIGMA[1:]),
    "motion-blur": Corruption("vis", motion_blur_vis, "linear motion blur (kernel length in px, random angle)",
                              MOTION_KERNEL[1:]),
    "fog": Corruption("vis", fog, "fog / haze, scattering model with a plasma-fractal depth (β)", FOG_BETA[1:]),
    "low-light": Corruption("vis", low_light, "night: darkening (gain) plus photon shot noise",
                            LOW_LIGHT_GAIN[1:]),
    "glare": Corruption("vis", glare, "over-exposure (gain) plus a veiling-glare bloom", GLARE_GAIN[1:]),
    "jpeg": Corruption("vis", jpeg, "JPEG compression (quality)", JPEG_QUALITY[1:]),
    "ir-noise": Corruption("ir", ir_noise, "thermal temporal noise (σ)", IR_NOISE_SIGMA[1:]),
    "ir-blur": Corruption("ir", ir_blur, "thermal optics defocus, Gaussian blur (σ in px)", IR_BLUR_SIGMA[1:]),
    "stripe-noise": Corruption("ir", stripe_noise, "microbolometer column stripes and fixed-pattern noise "
                               "(amplitude)", STRIPE_AMPLITUDE[1:]),
    "low-contrast": Corruption("ir", low_contrast, "thermal crossover, contrast scaled around the mean (factor)",
                               CONTRAST[1:]),
    "dead-pixels": Corruption("ir", dead_pixels, "dead and hot pixels (fraction of pixels)", DEAD_FRACTION[1:]),
}


def _check_image(x: Tensor, modality: str, where: str) -> None:
    if modality not in MODALITY_CHANNELS:
        raise CorruptionError(f"{where}: expected modality 'ir' or 'vis', got {modality!r}")
    c = MODALITY_CHANNELS[modality]
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != c or not x.is_floating_point():
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise CorruptionError(f"{where}: expected a float {modality.upper()} batch (B, {c}, H, W) in [0, 1], got {got}")


def corrupt(x: Tensor, name: str, severity: int, seeds: Sequence[int]) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (0 = clean copy, 1..5) to each image with its own seed.

    Args:
        x: ``(B, C, H, W)`` in [0, 1], C = 3 for a VIS corruption, 1 for an IR one.
        seeds: one seed per image (see :func:`image_seed`); the same seed gives the same corruption.
    """
    if name not in CORRUPTIONS:
        raise CorruptionError(f"unknown corruption {name!r}; expected one of {sorted(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 0 <= severity <= SEVERITIES:
        raise CorruptionError(f"{name}: expected severity an integer in 0..{SEVERITIES}, got {severity!r}")
    c = CORRUPTIONS[name]
    _check_image(x, c.modality, name)
    if len(seeds) != x.shape[0]:
        raise CorruptionError(f"{name}: expected one seed per image ({x.shape[0]}), got {len(seeds)}")
    out = []
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s))
        out.append(c.fn(x[i:i + 1], severity, g))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------- sensor faults
@dataclass(frozen=True)
class Fault:
    """A failed sensor: the frame it delivers, from the true frame and the frame before it."""

    fn: Callable[[Tensor, Tensor], Tensor]
    description: str


FAULTS: dict[str, Fault] = {
    "zeros": Fault(lambda x, prev: torch.zeros_like(x), "missing: the frame is all zeros (no signal)"),
    "mean-grey": Fault(lambda x, prev: x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone(),
                       "missing: a uniform frame at the image's mean level per channel"),
    "frozen": Fault(lambda x, prev: prev.clone(), "frozen: the sensor repeats the previous frame of the "
                    "sequence (the previous image of the split)"),
    "saturated": Fault(lambda x, prev: torch.ones_like(x), "saturated / blinded: every pixel at full scale"),
}


def fault(x: Tensor, name: str, previous: Tensor | None = None) -> Tensor:
    """The frame a failed sensor delivers instead of ``x`` ``(B, C, H, W)``; ``previous`` (same shape) is
    needed by ``frozen``."""
    if name not in FAULTS:
        raise CorruptionError(f"unknown sensor fault {name!r}; expected one of {sorted(FAULTS)}")
    if name == "frozen" and (previous is None or previous.shape != x.shape):
        got = None if previous is None else tuple(previous.shape)
        raise CorruptionError(f"frozen: expected the previous frames with shape {tuple(x.shape)}, got {got}")
    return FAULTS[name].fn(x, previous if previous is not None else x)


# -------------------------------------------------------------------------------------- misregistration
#: name -> levels as (label, (dx px, dy px, angle deg, scale)) of :func:`misregister`
MISREGISTRATIONS: dict[str, tuple[tuple[str, tuple[float, float, float, float]], ...]] = {
    "shift": tuple((f"{d} px", (float(d), 0.0, 0.0, 1.0)) for d in (1, 2, 4, 8)),
    "rotate": tuple((f"{a}°", (0.0, 0.0, float(a), 1.0)) for a in (1, 2)),
    "scale": (("−2 %", (0.0, 0.0, 0.0, 0.98)), ("+2 %", (0.0, 0.0, 0.0, 1.02))),
}


def misregister(x: Tensor, dx: float = 0.0, dy: float = 0.0, angle: float = 0.0, scale: float = 1.0) -> Tensor:
    """Move ``x`` ``(B, C, H, W)`` relative to the other camera (``kornia.geometry.transform.warp_affine``).

    The content is rotated by ``angle`` degrees (counter-clockwise as displayed) and scaled by ``scale`` about
    the image centre, then shifted by ``dx`` px to the right and ``dy`` px down. Bilinear sampling; pixels
    that come from outside the frame repeat the border.
    """
    if not torch.is_tensor(x) or x.ndim != 4:
        raise CorruptionError(f"misregister: expected a (B, C, H, W) tensor, got "
                              f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if not (scale > 0 and all(math.isfinite(v) for v in (dx, dy, angle, scale))):
        raise CorruptionError(f"misregister: expected finite dx, dy, angle and scale > 0, got "
                              f"{(dx, dy, angle, scale)}")
    b, _, h, w = x.shape
    center = torch.tensor([[(w - 1) / 2, (h - 1) / 2]], dtype=torch.float32).expand(b, 2)
    m = get_rotation_matrix2d(center, torch.full((b,), float(angle)), torch.full((b, 2), float(scale)))
    m = m + torch.tensor([[0.0, 0.0, dx], [0.0, 0.0, dy]])
    out = warp_affine(x.float(), m.to(x.device), (h, w), mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(x.dtype).clamp(0, 1)
