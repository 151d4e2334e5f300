"""Physical-style attacks: a universal adversarial patch on the visible image, a thermal patch on the infrared.

An attacker who cannot touch the pixels of the camera can still put something in front of it: a printed
patch in front of the visible camera (Brown et al., "Adversarial Patch", arXiv 1712.09665, 2017) or a
heating / cooling pad in front of the thermal one (Zhu et al., "Fooling Thermal Infrared Pedestrian
Detectors in Real World Using Small Bulbs", AAAI 2021; Wei et al., "HOTCOLD Block", AAAI 2023). Here the
patch is *universal*: one set of values, optimised once on the training split, then placed at random
positions on objects of every test image.

* Size budget: a square of ``patch_side(h, w, area)`` px whose area is at most ``area`` of the image (e.g. 2 %
  or 5 %); the patch always lies wholly inside the image.
* Values: a VIS patch is any printable colour, [0, 1]; a thermal patch stays in ``value_range``, by default
  the 1st-99th percentile of the training infrared images (:func:`thermal_range`): a pad no hotter or colder
  than what the scenes already contain.
* Optimisation (:func:`optimise_patch`): signed-gradient ascent on the segmentation cross-entropy over the
  pixels the patch does not cover, each step on a batch of training images with fresh random placements
  (expectation over positions), the step size decaying on a cosine from ``step_size`` to a tenth of it.
* Evaluation: pixels under the patch are excluded from the metric (their label is set to the ignore index);
  the question is what the patch does to the rest of the scene.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from robustness.attacks import model_guard, pixel_ce
from robustness.corruptions import MODALITY_CHANNELS, CorruptionError

__all__ = ["Patch", "patch_side", "place_on_objects", "paste", "thermal_range", "optimise_patch", "IGNORE_INDEX"]

IGNORE_INDEX = 255
OBJECT_CLASSES = tuple(range(1, 9))  # MFNet classes 1..8 (0 is 'unlabeled')


@dataclass
class Patch:
    """An optimised universal patch: ``pixels`` ``(C, side, side)`` within ``value_range``."""

    modality: str
    area: float
    pixels: Tensor
    value_range: tuple[float, float]
    losses: list[float] = field(default_factory=list)  # mean training loss per step

    @property
    def side(self) -> int:
        return int(self.pixels.shape[-1])

    def state(self) -> dict[str, Any]:
        return {"modality": self.modality, "area": self.area, "pixels": self.pixels.detach().cpu(),
                "value_range": list(self.value_range), "losses": list(self.losses)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Patch":
        return cls(state["modality"], float(state["area"]), state["pixels"], tuple(state["value_range"]),
                   list(state.get("losses", [])))


def patch_side(h: int, w: int, area: float) -> int:
    """Side of the largest square patch whose area is at most ``area`` (a fraction) of an h×w image."""
    if not 0 < area < 1:
        raise CorruptionError(f"patch area: expected a fraction in (0, 1), got {area!r}")
    side = int(math.floor(math.sqrt(area * h * w)))
    if side < 1 or side > min(h, w):
        raise CorruptionError(f"patch area {area}: expected a square of 1..{min(h, w)} px on a {h}x{w} image, "
                              f"got side {side}")
    return side


def place_on_objects(label: Tensor, side: int, g: torch.Generator,
                     objects: Sequence[int] = OBJECT_CLASSES) -> tuple[int, int]:
    """(top, left) of a ``side``-px square centred on a random object pixel of ``label`` (H, W), moved inside
    the image where needed; a uniformly random position when the image has no object pixel."""
    h, w = label.shape[-2:]
    if side > min(h, w):
        raise CorruptionError(f"patch of {side} px: expected at most the image's shorter side, got {h}x{w}")
    mask = torch.isin(label.cpu(), torch.tensor(list(objects)))
    idx = mask.flatten().nonzero().flatten()
    if idx.numel():
        pick = int(idx[int(torch.randint(idx.numel(), (1,), generator=g))])
        cy, cx = divmod(pick, w)
    else:
        cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
    top = min(max(cy - side // 2, 0), h - side)
    left = min(max(cx - side // 2, 0), w - side)
    return top, left


def paste(x: Tensor, pixels: Tensor, boxes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Put ``pixels`` ``(C, s, s)`` on each image of ``x`` ``(B, C, H, W)`` at its (top, left).

    Returns ``(patched, mask)``, mask ``(B, 1, H, W)`` bool (True under the patch). Differentiable in
    ``pixels``.
    """
    b, c, h, w = x.shape
    if pixels.ndim != 3 or pixels.shape[0] != c or pixels.shape[1] != pixels.shape[2]:
        raise CorruptionError(f"paste: expected a square patch ({c}, s, s), got {tuple(pixels.shape)}")
    if len(boxes) != b:
        raise CorruptionError(f"paste: expected one (top, left) per image ({b}), got {len(boxes)}")
    s = pixels.shape[-1]
    canvas = torch.zeros_like(x)
    mask = torch.zeros(b, 1, h, w, dtype=torch.bool, device=x.device)
    for i, (top, left) in enumerate(boxes):
        if not (0 <= top <= h - s and 0 <= left <= w - s):
            raise CorruptionError(f"paste: expected the {s}-px patch inside the {h}x{w} image, got top={top}, "
                                  f"left={left}")
        mask[i, :, top:top + s, left:left + s] = True
    index = mask.expand(b, c, h, w)
    canvas = canvas.masked_scatter(index, pixels.to(x.dtype).unsqueeze(0).expand(b, c, s, s).contiguous())
    return torch.where(index, canvas, x), mask


def thermal_range(ir_images: Iterable[Tensor], percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[float, float]:
    """(low, high) percentiles of the infrared pixel values in ``ir_images`` (each ``(…, H, W)`` in [0, 1])."""
    lo_p, hi_p = percentiles
    if not 0 <= lo_p < hi_p <= 100:
        raise CorruptionError(f"thermal percentiles: expected 0 <= low < high <= 100, got {percentiles}")
    values = torch.cat([t.detach().float().flatten().cpu() for t in ir_images])
    if values.numel() == 0:
        raise CorruptionError("thermal range: expected infrared images, got none")
    if values.numel() > 2_000_000:  # quantile has a size limit; a strided subsample estimates it well
        values = values[:: values.numel() // 2_000_000 + 1]
    lo, hi = torch.quantile(values, torch.tensor([lo_p / 100, hi_p / 100])).tolist()
    return float(lo), float(hi)


def _cycle(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise CorruptionError("optimise_patch: expected training batches, got an empty data source")


def optimise_patch(model: nn.Module, batches: Iterable[dict[str, Any]], modality: str, side: int,
                   value_range: tuple[float, float] = (0.0, 1.0), steps: int = 60, step_size: float = 0.05,
                   seed: int = 0, area: float = 0.0, progress: bool = False) -> Patch:
    """Optimise one universal patch against ``model`` on ``batches`` (dicts with ``ir``, ``vis``, ``label``).

    Args:
        modality: "vis" (the patch covers part of the visible image) or "ir".
        side: patch side in px (:func:`patch_side`).
        value_range: (low, high) every patch value stays in.
        steps: signed-gradient steps, one training batch each (the batches are cycled).
        step_size: first step, as a fraction of ``high - low``; it decays on a cosine to a tenth.
    Returns:
        the :class:`Patch`, with the mean loss of every step.
    """
    if modality not in MODALITY_CHANNELS:
        raise CorruptionError(f"optimise_patch: expected modality 'ir' or 'vis', got {modality!r}")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not 0 <= lo < hi <= 1:
        raise CorruptionError(f"optimise_patch: expected 0 <= low < high <= 1, got value_range {value_range}")
    if steps < 1 or not step_size > 0:
        raise CorruptionError(f"optimise_patch: expected steps >= 1 and step_size > 0, got {steps}, {step_size}")
    g = torch.Generator().manual_seed(int(seed))
    c = MODALITY_CHANNELS[modality]
    pixels = lo + (hi - lo) * torch.rand(c, side, side, generator=g)
    losses: list[float] = []
    source = _cycle(batches)
    with model_guard(model, "eval"):
        for t in tqdm(range(steps), desc=f"patch {modality} {side}px", unit="step", disable=not progress,
                      leave=False):
            batch = next(source)
            device = batch[modality].device
            p = pixels.to(device).requires_grad_(True)
            label = batch["label"]
            boxes = [place_on_objects(label[i], side, g) for i in range(label.shape[0])]
            patched, mask = paste(batch[modality], p, boxes)
            inputs = {"ir": batch["ir"], "vis": batch["vis"], modality: patched}
            out = model(inputs["ir"], inputs["vis"])
            target = label.masked_fill(mask[:, 0], IGNORE_INDEX)
            valid = (target != IGNORE_INDEX).sum().clamp_min(1)
            loss = pixel_ce(out.logits, target, IGNORE_INDEX).sum() / valid
            (grad,) = torch.autograd.grad(loss, p)
            alpha = step_size * (hi - lo) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / steps)))
            pixels = (pixels + alpha * grad.sign().cpu()).clamp(lo, hi).detach()
            losses.append(float(loss.detach()))
    return Patch(modality, float(area), pixels, (lo, hi), losses)
