"""MFNet / MSRS semantic classes, palette and label colouring (Ha et al., IROS 2017)."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["CLASSES", "NUM_CLASSES", "IGNORE_INDEX", "PALETTE", "colorize"]

CLASSES: tuple[str, ...] = (
    "unlabeled", "car", "person", "bike", "curve", "car_stop", "guardrail", "color_cone", "bump",
)
NUM_CLASSES = len(CLASSES)
IGNORE_INDEX = 255

# The MFNet palette as used by the RGB-T segmentation literature (RTFNet, SeAFusion), RGB uint8.
PALETTE = np.array(
    [
        [0, 0, 0],        # unlabeled
        [64, 0, 128],     # car
        [64, 64, 0],      # person
        [0, 128, 192],    # bike
        [0, 0, 192],      # curve
        [128, 128, 0],    # car_stop
        [64, 64, 128],    # guardrail
        [192, 128, 128],  # color_cone
        [192, 64, 0],     # bump
    ],
    dtype=np.uint8,
)
IGNORE_COLOR = np.array([255, 255, 255], dtype=np.uint8)


def colorize(label: np.ndarray | torch.Tensor) -> np.ndarray:
    """Colour a label map with the MFNet palette.

    Args:
        label: (H, W) integer class ids in 0..8, or 255 for ignored pixels (drawn white).
    Returns:
        (H, W, 3) uint8 RGB image.
    """
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"colorize: expected a (H, W) label map, got shape {label.shape}")
    bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= NUM_CLASSES))
    if bad.any():
        raise ValueError(
            f"colorize: label values must be in 0..{NUM_CLASSES - 1} or {IGNORE_INDEX}, "
            f"got {sorted(np.unique(label[bad]).tolist())[:5]}"
        )
    out = np.empty(label.shape + (3,), dtype=np.uint8)
    ignore = label == IGNORE_INDEX
    out[~ignore] = PALETTE[label[~ignore].astype(np.int64)]
    out[ignore] = IGNORE_COLOR
    return out
