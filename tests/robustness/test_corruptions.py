"""Corruptions, sensor faults and misregistration (robustness/corruptions.py) on tiny images."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rgbt.dataset import RGBTDataset
from robustness.corruptions import (
    CORRUPTIONS, FAULTS, MISREGISTRATIONS, SEVERITIES, CorruptionError, corrupt, fault, image_seed, misregister,
)

@pytest.fixture(scope="module")
def scenes(synthetic_root) -> dict[str, torch.Tensor]:
    """Four 64x80 synthetic scenes (day and night): structured images, unlike uniform noise."""
    data = RGBTDataset(synthetic_root, split="train")
    items = [data[i] for i in range(4)]
    return {"ir": torch.stack([s["ir"] for s in items]), "vis": torch.stack([s["vis"] for s in items]),
            "names": [s["name"] for s in items]}


def _psnr_np(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-image PSNR (dB) in float64 NumPy: a reference independent of the module's helper."""
    d = a.numpy().astype(np.float64) - b.numpy().astype(np.float64)
    mse = (d ** 2).reshape(len(d), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(1.0 / mse)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_severity_zero_is_the_identity(name, scenes):
    x = scenes[CORRUPTIONS[name].modality]
    out = corrupt(x, name, 0, [1, 2, 3, 4])
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_psnr_to_clean_falls_with_every_severity(name, scenes):
    x = scenes[CORRUPTIONS[name].modality]
    seeds = [image_seed(0, name, n) for n in scenes["names"]]
    psnrs = np.stack([_psnr_np(corrupt(x, name, s, seeds), x) for s in range(SEVERITIES + 1)], 1)
    assert np.isinf(psnrs[:, 0]).all()
    assert (np.diff(psnrs, axis=1) < 0).all(), f"{name}: PSNR per image and severity\n{psnrs}"
    assert (psnrs[:, 1:] < 60).all()  # every severity really changes the image


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_seeded_range_and_shape(name, scenes):
    x = scenes[CORRUPTIONS[name].modality]
    a = corrupt(x, name, 3, [5, 6, 7, 8])
    torch.testing.assert_close(a, corrupt(x, name, 3, [5, 6, 7, 8]), atol=0, rtol=0)
    assert a.min() >= 0 and a.max() <= 1
    # image 0 alone with its seed gives the same result as inside the batch: no dependence on batch composition
    torch.testing.assert_close(corrupt(x[:1], name, 3, [5]), a[:1], atol=0, rtol=0)


def test_random_corruptions_depend_on_the_seed(scenes):
    x = scenes["vis"][:1]
    assert not torch.equal(corrupt(x, "gaussian-noise", 2, [1]), corrupt(x, "gaussian-noise", 2, [2]))


def test_gaussian_noise_has_the_stated_sigma():
    x = torch.full((1, 3, 64, 64), 0.5)  # 5 sigma of the highest level tested stays inside [0, 1]
    for s, sigma in ((1, 0.04), (2, 0.08)):
        std = (corrupt(x, "gaussian-noise", s, [0]) - x).std().item()
        assert std == pytest.approx(sigma, rel=0.05)


def test_low_contrast_scales_deviations_from_the_mean():
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(1, 1, 20, 24, generator=g)  # no clipping at any factor
    for s, c in enumerate((0.7, 0.5, 0.35, 0.2, 0.1), start=1):
        y = corrupt(x, "low-contrast", s, [0])
        assert y.mean().item() == pytest.approx(x.mean().item(), abs=1e-6)
        assert y.std().item() == pytest.approx(c * x.std().item(), rel=1e-4)


def test_dead_pixels_fraction_and_nesting():
    x = torch.full((1, 1, 100, 100), 0.5)
    changed = [(corrupt(x, "dead-pixels", s, [3]) != 0.5)[0, 0] for s in range(1, SEVERITIES + 1)]
    for s, (mask, f) in enumerate(zip(changed, (0.002, 0.005, 0.01, 0.03, 0.06)), start=1):
        n = mask.sum().item()
        assert abs(n - f * 1e4) <= 4 * math.sqrt(f * 1e4) + 2, (s, n)  # binomial tolerance
        if s > 1:
            assert not (changed[s - 2] & ~mask).any()  # the defects of severity s-1 are still there
    y = corrupt(x, "dead-pixels", 5, [3])
    assert set(torch.unique(y).tolist()) == {0.0, 0.5, 1.0}


def test_stripe_noise_is_column_structured():
    x = torch.full((1, 1, 48, 64), 0.5)
    d = (corrupt(x, "stripe-noise", 3, [1]) - x)[0, 0]
    assert d.mean(0).var() > 5 * d.mean(1).var()  # column means vary, row means hardly


def test_fog_mixes_each_pixel_towards_the_airlight(scenes):
    x = scenes["vis"][:2]
    y = corrupt(x, "fog", 4, [1, 2])
    lo, hi = torch.minimum(x, torch.tensor(0.8)), torch.maximum(x, torch.tensor(0.8))
    assert (y >= lo - 1e-6).all() and (y <= hi + 1e-6).all()


def test_corrupt_rejects_bad_input(scenes):
    with pytest.raises(CorruptionError, match="unknown corruption 'rain'"):
        corrupt(scenes["vis"], "rain", 1, [0] * 4)
    with pytest.raises(CorruptionError, match=r"fog: expected severity an integer in 0..5, got 6"):
        corrupt(scenes["vis"], "fog", 6, [0] * 4)
    with pytest.raises(CorruptionError, match=r"ir-noise: expected a float IR batch \(B, 1, H, W\)"):
        corrupt(scenes["vis"], "ir-noise", 1, [0] * 4)
    with pytest.raises(CorruptionError, match="expected one seed per image"):
        corrupt(scenes["ir"], "ir-noise", 1, [0])


# ------------------------------------------------------------------------------------------ sensor faults
def test_faults(scenes):
    x, prev = scenes["ir"][1:3], scenes["ir"][0:2]
    assert torch.equal(fault(x, "zeros"), torch.zeros_like(x))
    assert torch.equal(fault(x, "saturated"), torch.ones_like(x))
    assert torch.equal(fault(x, "frozen", prev), prev)
    grey = fault(scenes["vis"], "mean-grey")
    means = scenes["vis"].mean(dim=(2, 3))
    torch.testing.assert_close(grey[:, :, 5, 7], means)
    assert (grey.flatten(2).std(2) == 0).all()
    with pytest.raises(CorruptionError, match="frozen: expected the previous frames"):
        fault(x, "frozen")
    with pytest.raises(CorruptionError, match="unknown sensor fault"):
        fault(x, "smoke")
    assert set(FAULTS) == {"zeros", "mean-grey", "frozen", "saturated"}


# -------------------------------------------------------------------------------------- misregistration
def _delta(h: int = 33, w: int = 41, y: int = 16, x: int = 20) -> torch.Tensor:
    d = torch.zeros(1, 1, h, w)
    d[0, 0, y, x] = 1.0
    return d


def _peak(t: torch.Tensor) -> tuple[int, int]:
    return divmod(int(t.flatten().argmax()), t.shape[-1])


def test_misregistration_by_zero_is_the_identity(scenes):
    for x in (scenes["ir"], scenes["vis"]):
        torch.testing.assert_close(misregister(x), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("d", [1, 2, 4, 8])
def test_shift_moves_a_delta_by_d(d):
    src = _delta()
    right = misregister(src, dx=d)
    assert _peak(right) == (16, 20 + d) and right.max().item() == pytest.approx(1.0, abs=1e-5)
    assert right.sum().item() == pytest.approx(1.0, abs=1e-5)
    down = misregister(src, dy=d)
    assert _peak(down) == (16 + d, 20)


def test_rotation_and_scale_about_the_centre():
    # centre of a 33x41 image: (x, y) = (20, 16); a delta 8 px right of it
    src = _delta(y=16, x=28)
    # 90 degrees counter-clockwise as displayed (y down): right of the centre goes above it
    assert _peak(misregister(src, angle=90.0)) == (8, 20)
    assert _peak(misregister(src, scale=1.5)) == (16, 32)  # 8 px from the centre become 12 px


def test_card_misregistration_levels():
    assert [lv for lv, _ in MISREGISTRATIONS["shift"]] == ["1 px", "2 px", "4 px", "8 px"]
    assert [p[2] for _, p in MISREGISTRATIONS["rotate"]] == [1.0, 2.0]
    assert [p[3] for _, p in MISREGISTRATIONS["scale"]] == [0.98, 1.02]


def test_misregister_rejects_bad_input():
    with pytest.raises(CorruptionError, match="expected finite dx, dy, angle and scale > 0"):
        misregister(_delta(), scale=0.0)
    with pytest.raises(CorruptionError, match=r"expected a \(B, C, H, W\) tensor"):
        misregister(torch.zeros(3, 4))


def test_modalities_of_the_registry():
    vis = {n for n, c in CORRUPTIONS.items() if c.modality == "vis"}
    ir = {n for n, c in CORRUPTIONS.items() if c.modality == "ir"}
    assert vis == {"gaussian-noise", "motion-blur", "fog", "low-light", "glare", "jpeg"}
    assert ir == {"ir-noise", "ir-blur", "stripe-noise", "low-contrast", "dead-pixels"}
    assert all(len(c.levels) == SEVERITIES for c in CORRUPTIONS.values())
