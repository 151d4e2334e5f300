"""rgbt.io: conversion rules, and errors that name the file and the problem."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rgbt.io import DataError, MissingDataError, image_size, read_gray, read_label, read_rgb, read_rgbt, write_png


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path)
    return path


def test_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    write_png(tmp_path / "sub" / "rgb.png", rgb)
    write_png(tmp_path / "gray.png", gray)
    np.testing.assert_array_equal(read_rgb(tmp_path / "sub" / "rgb.png"), rgb)
    np.testing.assert_array_equal(read_gray(tmp_path / "gray.png"), gray)
    np.testing.assert_array_equal(read_label(tmp_path / "gray.png"), gray)
    assert image_size(tmp_path / "gray.png") == (5, 7)
    assert read_rgb(tmp_path / "sub" / "rgb.png").flags.writeable


def test_write_png_is_deterministic(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", arr)
    write_png(tmp_path / "b.png", arr)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_write_png_rejects_bad_arrays(tmp_path):
    with pytest.raises(DataError, match=r"x\.png: expected a uint8 array.*float64"):
        write_png(tmp_path / "x.png", np.zeros((4, 4)))
    with pytest.raises(DataError, match=r"x\.png: expected shape .*got \(4, 4, 2\)"):
        write_png(tmp_path / "x.png", np.zeros((4, 4, 2), np.uint8))


def test_rgb_infrared_becomes_bt601_luma(tmp_path):
    """RGB IR -> 0.299 R + 0.587 G + 0.114 B, rounded; identical channels stay exactly the same."""
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [100, 100, 100], [10, 200, 30]]], np.uint8)
    expected = np.rint(rgb.astype(float) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    np.testing.assert_array_equal(read_gray(_save(tmp_path / "ir.png", rgb)), expected)
    assert expected.tolist() == [[76, 150, 29, 100, 124]]  # 2.99 + 117.4 + 3.42 = 123.81
    la = np.dstack([rgb[..., 0], np.full(rgb.shape[:2], 255, np.uint8)])
    np.testing.assert_array_equal(read_gray(_save(tmp_path / "la.png", la)), rgb[..., 0])


def test_rgba_and_palette_visible(tmp_path):
    rgba = np.random.default_rng(2).integers(0, 256, (4, 4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(read_rgb(_save(tmp_path / "a.png", rgba)), rgba[..., :3])
    vis, thermal = read_rgbt(tmp_path / "a.png")
    np.testing.assert_array_equal(vis, rgba[..., :3])
    np.testing.assert_array_equal(thermal, rgba[..., 3])
    pal = _save(tmp_path / "p.png", rgba[..., :3], mode="P")
    assert read_rgb(pal).shape == (4, 4, 3)


def test_palette_label_keeps_indices(tmp_path):
    ids = np.array([[0, 1, 8], [255, 4, 2]], np.uint8)
    image = Image.fromarray(ids, mode="L").convert("P")  # identity palette
    image.putpalette(np.repeat(np.arange(256, dtype=np.uint8), 3).tolist())
    image.save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_label(tmp_path / "l.png"), ids)
    Image.fromarray(ids.astype(np.uint16)).save(tmp_path / "l16.png")
    np.testing.assert_array_equal(read_label(tmp_path / "l16.png"), ids)


def test_missing_file(tmp_path):
    with pytest.raises(MissingDataError, match=r"nothing\.png: expected an image file, got nothing at this path"):
        read_rgb(tmp_path / "nothing.png")
    with pytest.raises(FileNotFoundError):
        read_gray(tmp_path / "nothing.png")


def test_truncated_png(tmp_path):
    path = _save(tmp_path / "t.png", np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(DataError, match=r"t\.png: unreadable or truncated image \(OSError"):
        read_rgb(path)


def test_garbage_file(tmp_path):
    (tmp_path / "g.png").write_bytes(b"hello")
    for reader in (read_rgb, read_gray, read_label, read_rgbt, image_size):
        with pytest.raises(DataError, match=r"g\.png: unreadable"):
            reader(tmp_path / "g.png")


def test_wrong_modes(tmp_path):
    gray = _save(tmp_path / "gray.png", np.zeros((4, 4), np.uint8))
    rgb = _save(tmp_path / "rgb.png", np.zeros((4, 4, 3), np.uint8))
    deep = tmp_path / "deep.png"
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(deep)
    with pytest.raises(DataError, match=r"gray\.png: expected an 8-bit RGB visible image .*got PIL mode 'L' \(1 channel\)"):
        read_rgb(gray)
    with pytest.raises(DataError, match=r"rgb\.png: expected a single-channel label map.*'RGB' \(3 channels\)"):
        read_label(rgb)
    with pytest.raises(DataError, match=r"deep\.png: expected an 8-bit infrared image"):
        read_gray(deep)
    with pytest.raises(DataError, match=r"rgb\.png: expected a 4-channel MFNet image"):
        read_rgbt(rgb)
