"""Universal VIS / thermal patches (robustness/patches.py): geometry, value range, optimisation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from robustness.corruptions import CorruptionError
from robustness.patches import (
    IGNORE_INDEX, optimise_patch, paste, patch_side, place_on_objects, thermal_range,
)


@pytest.mark.parametrize("h,w,area", [(96, 128, 0.02), (96, 128, 0.05), (32, 40, 0.02), (480, 640, 0.05)])
def test_patch_side_is_the_largest_square_within_the_budget(h, w, area):
    s = patch_side(h, w, area)
    assert s * s <= area * h * w < (s + 1) ** 2


def test_patch_side_rejects_bad_budgets():
    with pytest.raises(CorruptionError, match=r"patch area: expected a fraction in \(0, 1\), got 1.5"):
        patch_side(32, 40, 1.5)
    with pytest.raises(CorruptionError, match="expected a square of 1..4 px"):
        patch_side(4, 4, 0.01)


def test_placement_is_inside_the_image_and_on_an_object():
    label = torch.zeros(32, 40, dtype=torch.long)
    label[20:26, 30:36] = 2  # one person near the bottom-right corner
    label[0:3] = IGNORE_INDEX
    for seed in range(20):
        top, left = place_on_objects(label, 9, torch.Generator().manual_seed(seed))
        assert 0 <= top <= 32 - 9 and 0 <= left <= 40 - 9
        assert (label[top:top + 9, left:left + 9] == 2).any()
    empty = torch.zeros(32, 40, dtype=torch.long)
    top, left = place_on_objects(empty, 9, torch.Generator().manual_seed(0))
    assert 0 <= top <= 23 and 0 <= left <= 31


def test_paste_replaces_exactly_the_box():
    x = torch.rand(2, 3, 20, 24)
    p = torch.rand(3, 5, 5)
    out, mask = paste(x, p, [(0, 0), (15, 19)])
    assert mask.shape == (2, 1, 20, 24) and mask.sum(dim=(1, 2, 3)).tolist() == [25, 25]
    assert torch.equal(out[0, :, :5, :5], p) and torch.equal(out[1, :, 15:, 19:], p)
    assert torch.equal(out[~mask.expand_as(x)], x[~mask.expand_as(x)])
    with pytest.raises(CorruptionError, match="expected the 5-px patch inside the 20x24 image"):
        paste(x, p, [(0, 0), (16, 0)])


def test_thermal_range_matches_numpy_percentiles():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 16, 20, generator=g) ** 2 for _ in range(3)]
    lo, hi = thermal_range(images, (1.0, 99.0))
    ref = np.percentile(torch.cat([i.flatten() for i in images]).numpy(), [1, 99])
    assert (lo, hi) == pytest.approx(tuple(ref), abs=1e-6)


@pytest.mark.parametrize("modality", ["vis", "ir"])
def test_optimised_patch_keeps_area_and_range_and_raises_the_loss(modality, toy, batch):
    torch.manual_seed(0)
    batches = [batch]
    value_range = (0.0, 1.0) if modality == "vis" else (0.3, 0.6)
    side = patch_side(32, 40, 0.05)
    p = optimise_patch(toy, batches, modality, side, value_range, steps=25, step_size=0.1, seed=1, area=0.05)
    assert p.pixels.shape == (3 if modality == "vis" else 1, side, side) and p.side == side
    assert p.pixels.min() >= value_range[0] and p.pixels.max() <= value_range[1]
    assert p.side ** 2 <= 0.05 * 32 * 40
    # pasted: the image keeps its shape, only side^2 pixels per image change, and they are within the range
    g = torch.Generator().manual_seed(0)
    boxes = [place_on_objects(batch["label"][i], side, g) for i in range(3)]
    x, mask = paste(batch[modality], p.pixels, boxes)
    changed = (x != batch[modality]).any(1, keepdim=True)
    assert not (changed & ~mask).any() and mask.flatten(1).sum(1).tolist() == [side * side] * 3
    inside = x[mask.expand_as(x)]
    assert inside.min() >= value_range[0] and inside.max() <= value_range[1]
    # the optimisation worked: later steps score a higher loss than the first ones (same batch throughout)
    assert np.mean(p.losses[-5:]) > np.mean(p.losses[:5])
    assert all(math.isfinite(v) for v in p.losses) and len(p.losses) == 25


def test_optimise_patch_rejects_bad_input(toy, batch):
    with pytest.raises(CorruptionError, match="expected modality 'ir' or 'vis', got 'radar'"):
        optimise_patch(toy, [batch], "radar", 4)
    with pytest.raises(CorruptionError, match=r"expected 0 <= low < high <= 1, got value_range \(0.5, 0.2\)"):
        optimise_patch(toy, [batch], "ir", 4, (0.5, 0.2))
    with pytest.raises(CorruptionError, match="expected training batches, got an empty data source"):
        optimise_patch(toy, [], "ir", 4, steps=1)
