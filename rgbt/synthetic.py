"""Deterministic procedural RGB-T road scenes in the MSRS layout (the embedded default dataset of PAIF).

PAIF (Liu et al., ACM MM 2023) fuses infrared and visible images for segmentation on MFNet / MSRS. Those
datasets are large and not redistributable here, so this module draws small seeded road scenes with the 9
MFNet classes (unlabeled, car, person, bike, curve, car_stop, guardrail, color_cone, bump) in which **fusion
is necessary**:

* day: clear, colourful visible image; low-contrast, slightly blurred infrared;
* night: dark, noisy visible image in which people and cars have (almost) the brightness of what is behind
  them, so they show only in the infrared, where they are hot;
* colour cones are colourful in the visible image but take the temperature of what is behind them in the
  infrared (cold, ≈ background), so they show only in the visible image.

Output (``generate_dataset``): ``<out>/{train,val,test}/{vi,ir,Segmentation_labels}/<NNNNN><D|N>.png``
(numbering runs across the splits, the D/N suffix follows MSRS) plus ``<out>/meta.json``. The same seed
gives byte-identical files: every scene draws from its own ``numpy.random.Generator`` seeded with
``(seed, split, index)``, so a split's scenes also do not depend on the size of the other splits.

CLI::

    python -m rgbt.synthetic --out data/synthetic --n-train 48 --n-val 16 --n-test 16 --seed 0 --size 128 160
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.ndimage import gaussian_filter

from rgbt.classes import CLASSES, NUM_CLASSES
from rgbt.io import write_png
from trainer.errors import entry_point, track_run_dir

__all__ = ["GENERATOR_VERSION", "SPLITS", "Scene", "render_scene", "generate_dataset", "main"]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
PARTIAL_META = "meta.partial.json"  # the scene list of a generation in progress (removed when it completes)
SPLITS = ("train", "val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
(UNLABELED, CAR, PERSON, BIKE, CURVE, CAR_STOP, GUARDRAIL, CONE, BUMP) = range(NUM_CLASSES)


@dataclass
class Scene:
    """One rendered scene: ``vis`` (H, W, 3) uint8 RGB, ``ir`` (H, W) uint8, ``label`` (H, W) uint8 ids 0..8."""

    vis: np.ndarray
    ir: np.ndarray
    label: np.ndarray
    night: bool
    objects: dict[str, int] = field(default_factory=dict)


class _Canvas:
    """Layers being painted: label ids, day albedo (RGB), temperature (IR before the sensor model)."""

    def __init__(self, h: int, w: int, night: bool, rng: np.random.Generator) -> None:
        self.h, self.w, self.night, self.rng = h, w, night, rng
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self.label = np.zeros((h, w), np.uint8)
        self.albedo = np.zeros((h, w, 3), np.float32)
        self.temp = np.zeros((h, w), np.float32)
        self.bg_albedo, self.bg_temp = self.albedo, self.temp

    def snapshot_background(self) -> None:
        """Remember the empty scene, smoothed: what camouflaged objects copy (its local average, so that they
        show neither the objects they occlude nor fine background structure such as lane markings)."""
        self.bg_albedo = gaussian_filter(self.albedo, (3.0, 3.0, 0.0))
        self.bg_temp = gaussian_filter(self.temp, 3.0)

    def paint(self, mask: np.ndarray, cls: int, rgb, temp: float | None, camouflage_vis: bool = False) -> None:
        """Paint ``mask`` with class ``cls``.

        ``temp=None`` copies the temperature of the empty scene behind the object (IR-invisible);
        ``camouflage_vis`` copies (a slightly dimmed) albedo of the empty scene behind the object — used for
        people and cars at night.
        """
        if not mask.any():
            return
        self.label[mask] = cls
        if camouflage_vis:
            self.albedo[mask] = self.bg_albedo[mask] * self.rng.uniform(0.9, 1.05)
        else:
            self.albedo[mask] = np.asarray(rgb, np.float32)
        self.temp[mask] = self.bg_temp[mask] if temp is None else temp


# ----------------------------------------------------------------------------------------------- geometry
@dataclass
class _Road:
    horizon: float
    vx: float  # vanishing point x
    half: float  # half road width at the bottom row, px
    h: int

    def depth(self, y: np.ndarray | float) -> np.ndarray | float:
        """0 at the horizon, 1 at the bottom row (proportional to 1 / distance)."""
        return np.clip((np.asarray(y, np.float32) - self.horizon) / (self.h - self.horizon), 0.0, 1.5)

    def edges(self, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        s = self.depth(y)
        return self.vx - self.half * s, self.vx + self.half * s


def _disc(c: _Canvas, cy: float, cx: float, r: float) -> np.ndarray:
    return (c.yy - cy) ** 2 + (c.xx - cx) ** 2 <= r * r


def _rect(c: _Canvas, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    return (c.yy >= y0) & (c.yy < y1) & (c.xx >= x0) & (c.xx < x1)


def _segment(c: _Canvas, p: tuple[float, float], q: tuple[float, float], width: float) -> np.ndarray:
    """Pixels within ``width / 2`` of the segment p→q (points are (y, x))."""
    py, px = p
    dy, dx = q[0] - py, q[1] - px
    t = np.clip(((c.yy - py) * dy + (c.xx - px) * dx) / max(dy * dy + dx * dx, 1e-6), 0.0, 1.0)
    return (c.yy - py - t * dy) ** 2 + (c.xx - px - t * dx) ** 2 <= (width / 2) ** 2


# ----------------------------------------------------------------------------------------------- background
def _background(c: _Canvas, road: _Road) -> None:
    rng, h = c.rng, c.h
    sky = c.yy < road.horizon
    t = c.yy / max(road.horizon, 1.0)
    sky_rgb = np.stack([0.45 + 0.3 * t, 0.65 + 0.2 * t, 0.95 - 0.05 * t], -1)
    c.albedo[sky] = sky_rgb[sky]
    c.temp[sky] = 0.12 if c.night else 0.35
    # buildings / trees on the horizon (class 0)
    for _ in range(int(rng.integers(3, 7))):
        x0 = rng.uniform(-0.1, 1.0) * c.w
        bw = rng.uniform(0.08, 0.25) * c.w
        top = road.horizon - rng.uniform(0.1, 0.3) * h
        m = _rect(c, top, road.horizon, x0, x0 + bw)
        tree = rng.random() < 0.4
        rgb = (0.2, rng.uniform(0.35, 0.5), 0.15) if tree else tuple(rng.uniform(0.35, 0.7) * np.array([1, 0.9, 0.8]))
        c.paint(m, UNLABELED, rgb, (0.22 if tree else 0.3) if c.night else (0.45 if tree else 0.55))
        if not tree and c.night:  # lit windows: a little structure in the night VIS
            win = m & ((c.xx.astype(int) // 3) % 2 == 0) & ((c.yy.astype(int) // 3) % 3 == 0)
            win &= rng.random((c.h, c.w)) < 0.5
            c.albedo[win] = (1.0, 0.85, 0.4)
            c.temp[win] = 0.36
    # ground: grass or pavement beside the road, asphalt on it
    ground = c.yy >= road.horizon
    side_rgb = (0.3, 0.5, 0.2) if rng.random() < 0.5 else (0.6, 0.57, 0.5)
    c.albedo[ground] = side_rgb
    c.temp[ground] = 0.22 if c.night else 0.5
    left, right = road.edges(c.yy)
    on_road = ground & (c.xx >= left) & (c.xx <= right)
    grey = rng.uniform(0.3, 0.42)
    c.albedo[on_road] = grey + 0.04 * rng.standard_normal((int(on_road.sum()), 1)).astype(np.float32)
    c.temp[on_road] = 0.3 if c.night else 0.58  # asphalt keeps the day's heat


def _road_markings(c: _Canvas, road: _Road) -> None:
    s = road.depth(c.yy)
    below = c.yy > road.horizon + 1
    left, right = road.edges(c.yy)
    width = 0.6 + 2.5 * s
    curbs = below & ((np.abs(c.xx - left) < width) | (np.abs(c.xx - right) < width))
    dash = np.sin(18.0 / np.maximum(s, 0.05)) > 0.0
    centre = below & (np.abs(c.xx - road.vx) < 0.6 * width) & dash
    lane_rgb = (0.95, 0.8, 0.2) if c.rng.random() < 0.3 else (0.92, 0.92, 0.9)
    c.paint(curbs, CURVE, (0.78, 0.78, 0.74), 0.27 if c.night else 0.55)
    c.paint(centre, CURVE, lane_rgb, 0.28 if c.night else 0.56)


def _guardrail(c: _Canvas, road: _Road, side: int) -> None:
    """A rail along one road side (side -1 left, +1 right), outside the curb, drawn in perspective."""
    offset = c.rng.uniform(0.1, 0.3) * road.half
    # ground line of the rail: x = vx + side * (half + offset) * s  ->  s(x)
    s = (c.xx - road.vx) * side / (road.half + offset)
    yg = road.horizon + s * (c.h - road.horizon)
    post, beam = 0.10 * c.h * s, 0.05 * c.h * s + 0.6
    valid = s > 0.03
    rail = valid & (c.yy <= yg - post) & (c.yy >= yg - post - beam)
    posts = valid & (c.yy <= yg) & (c.yy > yg - post) & (np.sin(9.0 / np.maximum(s, 0.03)) > 0.75)
    c.paint(rail | posts, GUARDRAIL, (0.72, 0.74, 0.76), 0.17 if c.night else 0.53)


def _bump(c: _Canvas, road: _Road, y: float) -> None:
    s = float(road.depth(y))
    left, right = road.edges(y)
    band = _rect(c, y - 0.5 - 1.5 * s, y + 0.5 + 1.5 * s, left, right)
    c.paint(band, BUMP, (0.9, 0.78, 0.1), 0.31 if c.night else 0.6)
    stripes = band & ((np.floor((c.xx - left) / (2 + 6 * s)) % 2) == 0)
    c.albedo[stripes] = (0.12, 0.12, 0.1)


# ----------------------------------------------------------------------------------------------- objects
def _car(c: _Canvas, road: _Road, yb: float, xc: float) -> None:
    s = float(road.depth(yb))
    hh = 0.34 * c.h * s + 3
    ww = hh * c.rng.uniform(1.3, 1.7)
    body = _rect(c, yb - 0.6 * hh, yb - 0.12 * hh, xc - ww / 2, xc + ww / 2)
    cabin = (c.yy >= yb - hh) & (c.yy < yb - 0.6 * hh) & (np.abs(c.xx - xc) < ww * (0.32 + 0.15 * (c.yy - yb + hh) / hh))
    wheels = (_rect(c, yb - 0.15 * hh, yb, xc - ww / 2, xc - ww / 2 + 0.2 * ww)
              | _rect(c, yb - 0.15 * hh, yb, xc + ww / 2 - 0.2 * ww, xc + ww / 2))
    colours = [(0.75, 0.1, 0.1), (0.1, 0.2, 0.6), (0.9, 0.9, 0.9), (0.08, 0.08, 0.08), (0.6, 0.62, 0.65)]
    body_rgb = colours[int(c.rng.integers(len(colours)))]
    night = c.night
    c.paint(body | cabin, CAR, body_rgb, 0.62 if night else 0.62, camouflage_vis=night)
    window = cabin & (np.abs(c.xx - xc) < ww * 0.3) & (c.yy > yb - 0.93 * hh)
    if not night:
        c.albedo[window] = (0.15, 0.2, 0.25)
    c.temp[window] = 0.45 if night else 0.6
    c.paint(wheels, CAR, (0.05, 0.05, 0.05), 0.85 if night else 0.66, camouflage_vis=night)
    engine = body & (c.yy > yb - 0.3 * hh)
    c.temp[engine] = 0.8 if night else 0.64


def _person(c: _Canvas, road: _Road, yb: float, xc: float) -> None:
    s = float(road.depth(yb))
    hh = 0.5 * c.h * s + 5
    ww = hh * 0.28
    head = _disc(c, yb - 0.9 * hh, xc, 0.1 * hh + 0.4)
    torso = _rect(c, yb - 0.8 * hh, yb - 0.45 * hh, xc - ww / 2, xc + ww / 2)
    stride = c.rng.uniform(0.0, 0.25) * ww
    legs = (_segment(c, (yb - 0.47 * hh, xc - 0.2 * ww), (yb, xc - 0.2 * ww - stride), 0.3 * ww + 0.5)
            | _segment(c, (yb - 0.47 * hh, xc + 0.2 * ww), (yb, xc + 0.2 * ww + stride), 0.3 * ww + 0.5))
    arms = _segment(c, (yb - 0.78 * hh, xc - 0.5 * ww), (yb - 0.5 * hh, xc - 0.6 * ww), 0.2 * ww + 0.5) | _segment(
        c, (yb - 0.78 * hh, xc + 0.5 * ww), (yb - 0.5 * hh, xc + 0.6 * ww), 0.2 * ww + 0.5)
    shirt = tuple(c.rng.uniform(0.1, 0.9, 3))
    trousers = tuple(c.rng.uniform(0.05, 0.4, 3))
    night = c.night
    body_t = 0.88 if night else 0.64
    c.paint(legs, PERSON, trousers, body_t - 0.05, camouflage_vis=night)
    c.paint(torso | arms, PERSON, shirt, body_t, camouflage_vis=night)
    c.paint(head, PERSON, (0.85, 0.65, 0.5), body_t + 0.07, camouflage_vis=night)


def _bike(c: _Canvas, road: _Road, yb: float, xc: float) -> None:
    s = float(road.depth(yb))
    hh = 0.3 * c.h * s + 4
    r = 0.3 * hh
    lw = 0.25 * r + 0.5
    wheels = np.zeros_like(c.label, dtype=bool)
    for dx in (-0.6 * hh, 0.6 * hh):
        d = np.sqrt((c.yy - (yb - r)) ** 2 + (c.xx - (xc + dx)) ** 2)
        wheels |= np.abs(d - r) <= lw
    a, b, top = (yb - r, xc - 0.6 * hh), (yb - r, xc + 0.6 * hh), (yb - 1.6 * r, xc)
    frame = _segment(c, a, top, lw * 1.5) | _segment(c, top, b, lw * 1.5) | _segment(c, a, (yb - r, xc), lw * 1.5)
    c.paint(wheels | frame, BIKE, (0.1, 0.1, 0.12), 0.2 if c.night else 0.52)
    if c.rng.random() < 0.5:  # a rider (class person) sitting on the bike
        _person(c, road, yb - 0.9 * r, xc)


def _cone(c: _Canvas, road: _Road, yb: float, xc: float) -> None:
    s = float(road.depth(yb))
    hh = 0.18 * c.h * s + 4
    half = 0.33 * hh * (c.yy - (yb - hh)) / hh + 0.3
    cone = (c.yy >= yb - hh) & (c.yy < yb) & (np.abs(c.xx - xc) <= half)
    orange = (1.0, c.rng.uniform(0.3, 0.5), 0.05)
    c.paint(cone, CONE, orange, None)  # temp=None: as cold as what lies behind it
    stripe = cone & (c.yy > yb - 0.62 * hh) & (c.yy < yb - 0.42 * hh)
    c.albedo[stripe] = (0.97, 0.97, 0.97)


def _car_stop(c: _Canvas, road: _Road, yb: float, xc: float) -> None:
    s = float(road.depth(yb))
    hh, ww = 0.05 * c.h * s + 2, 0.2 * c.w * s + 4
    block = _rect(c, yb - hh, yb, xc - ww / 2, xc + ww / 2)
    rgb = (0.85, 0.8, 0.2) if c.rng.random() < 0.5 else (0.75, 0.74, 0.7)
    c.paint(block, CAR_STOP, rgb, 0.26 if c.night else 0.56)


# ----------------------------------------------------------------------------------------------- scene
def _sensors(c: _Canvas, road: _Road) -> tuple[np.ndarray, np.ndarray]:
    rng = c.rng
    if c.night:
        light = np.full((c.h, c.w), rng.uniform(0.07, 0.11), np.float32)
        for _ in range(int(rng.integers(1, 4))):  # street lamps: local pools of light
            ly, lx = rng.uniform(0.2, 0.9) * c.h, rng.uniform(0, 1) * c.w
            light += rng.uniform(0.1, 0.25) * np.exp(-((c.yy - ly) ** 2 + (c.xx - lx) ** 2) / (2 * (0.15 * c.w) ** 2))
        vis = c.albedo * light[..., None] * np.array([1.0, 0.95, 1.1], np.float32)
        vis += rng.normal(0.0, 0.03, vis.shape).astype(np.float32)
        ir = c.temp + rng.normal(0.0, 0.02, c.temp.shape).astype(np.float32)
        ir = gaussian_filter(ir, 0.6)
    else:
        vis = c.albedo * rng.uniform(0.85, 1.05) + rng.normal(0.0, 0.01, c.albedo.shape).astype(np.float32)
        contrast = rng.uniform(0.3, 0.45)  # low-contrast IR by day
        ir = 0.5 + (c.temp - 0.5) * contrast + rng.normal(0.0, 0.015, c.temp.shape).astype(np.float32)
        ir = gaussian_filter(ir, 0.8)
    to_u8 = lambda a: np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)  # noqa: E731
    return to_u8(vis), to_u8(ir)


def render_scene(rng: np.random.Generator, size: tuple[int, int] = (128, 160), night: bool = False,
                 force: tuple[int, ...] = ()) -> Scene:
    """Draw one scene.

    Args:
        rng: the scene's random generator (all randomness comes from it).
        size: (H, W).
        night: night (dark noisy VIS, contrasty IR) or day (clear VIS, low-contrast IR).
        force: class ids that must appear (among bike, car_stop, bump, guardrail); a colour cone always does.
    Returns:
        a :class:`Scene` with uint8 arrays.
    """
    h, w = size
    c = _Canvas(h, w, night, rng)
    road = _Road(horizon=h * rng.uniform(0.33, 0.43), vx=w * rng.uniform(0.4, 0.6), half=w * rng.uniform(0.45, 0.65), h=h)
    _background(c, road)
    _road_markings(c, road)
    if BUMP in force or rng.random() < 0.35:
        _bump(c, road, road.horizon + rng.uniform(0.45, 0.85) * (h - road.horizon))
    if GUARDRAIL in force or rng.random() < 0.7:
        _guardrail(c, road, side=int(rng.choice([-1, 1])))
    c.snapshot_background()

    def on_road(margin: float) -> tuple[float, float]:
        yb = road.horizon + rng.uniform(0.3, 1.0) * (h - road.horizon)
        left, right = road.edges(yb)
        return yb, float(rng.uniform(left + margin * (right - left), right - margin * (right - left)))

    def off_road() -> tuple[float, float]:
        yb = road.horizon + rng.uniform(0.3, 1.0) * (h - road.horizon)
        left, right = road.edges(yb)
        side = rng.random() < 0.5
        xc = rng.uniform(left - 0.25 * w, left - 2) if side else rng.uniform(right + 2, right + 0.25 * w)
        return yb, float(np.clip(xc, 0.03 * w, 0.97 * w))

    draws: list[tuple[float, Callable, float]] = []
    counts = {"car": int(rng.integers(1, 4)), "person": int(rng.integers(1, 4)), "color_cone": int(rng.integers(1, 4)),
              "bike": int(rng.integers(0, 2)) + (BIKE in force), "car_stop": int(rng.integers(0, 3)) + (CAR_STOP in force)}
    for _ in range(counts["car"]):
        draws.append((*on_road(0.2), _car))
    for _ in range(counts["person"]):
        draws.append((*(off_road() if rng.random() < 0.6 else on_road(0.05)), _person))
    for _ in range(counts["color_cone"]):
        draws.append((*on_road(0.02), _cone))
    for _ in range(counts["bike"]):
        draws.append((*(off_road() if rng.random() < 0.5 else on_road(0.05)), _bike))
    for _ in range(counts["car_stop"]):
        draws.append((*off_road(), _car_stop))
    for yb, xc, fn in sorted(draws, key=lambda d: d[0]):  # painter's algorithm: far first
        fn(c, road, yb, xc)
    for cls in (*force, CONE):  # a forced class hidden behind nearer objects (or off-image) is drawn again in front
        if not (c.label == cls).any():
            yb = road.horizon + rng.uniform(0.75, 0.95) * (h - road.horizon)
            if cls == BUMP:
                _bump(c, road, yb)
            elif cls == GUARDRAIL:
                _guardrail(c, road, side=int(rng.choice([-1, 1])))
            elif cls == CONE:
                _cone(c, road, *on_road(0.02))
            else:
                {BIKE: _bike, CAR_STOP: _car_stop}[cls](c, road, yb, float(rng.uniform(0.2, 0.8) * w))
    vis, ir = _sensors(c, road)
    return Scene(vis=vis, ir=ir, label=c.label, night=night, objects=counts)


# ----------------------------------------------------------------------------------------------- dataset
def _clear_previous(out: Path) -> None:
    """Remove the files of an earlier generated dataset in ``out`` (only those listed in its meta.json, or in the
    ``meta.partial.json`` of a generation that failed or was interrupted) and its ``FAILED`` marker."""
    meta_path = out / "meta.json"
    if not out.exists():
        return
    (out / "FAILED").unlink(missing_ok=True)
    if not meta_path.is_file() and (out / PARTIAL_META).is_file():
        meta_path = out / PARTIAL_META
    if not meta_path.is_file():
        if any(out.iterdir()):
            raise FileExistsError(f"{out}: expected an empty folder or an earlier synthetic dataset (meta.json), "
                                  "got other files; choose another --out")
        return
    try:
        meta = json.loads(meta_path.read_text())
        scenes = meta["scenes"]
    except (ValueError, KeyError) as exc:
        raise FileExistsError(f"{meta_path}: expected a synthetic-dataset meta.json, got an unreadable one; "
                              "choose another --out or delete the folder") from exc
    for name, info in scenes.items():
        for sub in ("vi", "ir", "Segmentation_labels"):
            (out / info["split"] / sub / f"{name}.png").unlink(missing_ok=True)
    meta_path.unlink()


def _replaceable(out: Path) -> bool:
    """True for a missing or empty folder, or an earlier (possibly partial) synthetic dataset."""
    return (not out.exists() or (out / "meta.json").is_file() or (out / PARTIAL_META).is_file()
            or (out.is_dir() and not any(out.iterdir())))


def generate_dataset(out: str | Path, n_train: int = 48, n_val: int = 16, n_test: int = 16,
                     size: tuple[int, int] = (128, 160), seed: int = 0, progress: bool = False) -> dict:
    """Write a synthetic dataset in the MSRS layout (see the module docstring) and return its meta dict.

    Scene ``j`` of a split is a night scene when ``j`` is odd; scene 0 of each split has a bike and scene 1 a
    bump, so every split of two or more scenes holds all 9 classes.
    """
    out = Path(out)
    h, w = (int(v) for v in size)
    if h < 32 or w < 32:
        raise ValueError(f"size: expected at least 32x32 pixels, got {h}x{w}")
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 0:
            raise ValueError(f"{name}: expected a count >= 0, got {n}")
    _clear_previous(out)
    jobs = []
    number = 0
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
        for j in range(n):
            number += 1
            jobs.append((split, j, f"{number:05d}{'N' if j % 2 else 'D'}"))
    out.mkdir(parents=True, exist_ok=True)
    # the scenes to be written, listed first: a generation that fails part-way (full disk) is cleared by the next
    (out / PARTIAL_META).write_text(json.dumps({"scenes": {name: {"split": split} for split, _, name in jobs}}) + "\n")
    scenes: dict[str, dict] = {}
    iterator = jobs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(jobs, desc="synthetic scenes", unit="scene")
    for split, j, name in iterator:
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], j])
        force = {0: (BIKE, GUARDRAIL), 1: (BUMP, CAR_STOP)}.get(j % 4 if j >= 2 else j, ())
        scene = render_scene(rng, (h, w), night=bool(j % 2), force=force)
        write_png(out / split / "vi" / f"{name}.png", scene.vis)
        write_png(out / split / "ir" / f"{name}.png", scene.ir)
        write_png(out / split / "Segmentation_labels" / f"{name}.png", scene.label)
        present = np.flatnonzero(np.bincount(scene.label.ravel(), minlength=NUM_CLASSES))
        scenes[name] = {"split": split, "time": "night" if scene.night else "day",
                        "classes": [CLASSES[k] for k in present]}
    meta = {
        "generator": "rgbt.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": [h, w],
        "layout": "msrs",
        "splits": {s: n for s, n in zip(SPLITS, (n_train, n_val, n_test))},
        "classes": list(CLASSES),
        "scenes": scenes,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    (out / PARTIAL_META).unlink()
    logger.info("wrote %d synthetic scenes to %s", len(scenes), out)
    return meta


@entry_point
def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 with one line on stderr (bad arguments, a folder of other files, a file-system error)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; an earlier synthetic "
                        "dataset there is replaced)")
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--n-test", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if _replaceable(args.out):  # a failed generation marks its folder FAILED (never a folder of other files)
        track_run_dir(args.out, created=not args.out.exists())
    try:
        meta = generate_dataset(args.out, args.n_train, args.n_val, args.n_test, tuple(args.size), args.seed,
                                progress=True)
    except ValueError as exc:  # bad counts or size: nothing was written
        parser.exit(2, f"error: {exc}\n")
    n_night = sum(s["time"] == "night" for s in meta["scenes"].values())
    print(f"wrote {len(meta['scenes'])} scenes ({n_night} night) of {args.size[0]}x{args.size[1]} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
