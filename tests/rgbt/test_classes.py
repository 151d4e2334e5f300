"""rgbt.classes: the MFNet class list and palette, and colorize."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rgbt.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES, PALETTE, colorize


def test_class_list_matches_mfnet():
    assert CLASSES == ("unlabeled", "car", "person", "bike", "curve", "car_stop", "guardrail", "color_cone", "bump")
    assert NUM_CLASSES == 9 and IGNORE_INDEX == 255
    assert PALETTE.shape == (9, 3) and PALETTE.dtype == np.uint8
    assert len({tuple(c) for c in PALETTE.tolist()}) == 9


def test_colorize_every_class_and_ignore():
    label = np.array([[0, 1, 2, 3, 4], [5, 6, 7, 8, 255]])
    out = colorize(label)
    assert out.shape == (2, 5, 3) and out.dtype == np.uint8
    for k in range(9):
        assert out.reshape(-1, 3)[k].tolist() == PALETTE[k].tolist()
    assert out[1, 4].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [64, 0, 128]  # car in the MFNet palette
    np.testing.assert_array_equal(colorize(torch.from_numpy(label)), out)


def test_colorize_errors():
    with pytest.raises(ValueError, match=r"label values must be in 0\.\.8 or 255, got \[9, 12\]"):
        colorize(np.array([[9, 12], [0, 1]]))
    with pytest.raises(ValueError, match=r"expected a \(H, W\) label map, got shape \(1, 2, 2\)"):
        colorize(np.zeros((1, 2, 2), np.int64))
