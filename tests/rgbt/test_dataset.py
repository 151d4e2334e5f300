"""RGBTDataset: every layout, pairing by name, augmentation, and every bad-input case (message names the file)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rgbt.dataset import RGBTDataset
from rgbt.io import DataError, MissingDataError

REAL_RGBT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real_rgbt"
H, W = 32, 40


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _sample(seed: int, h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vis = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ir = rng.integers(0, 256, (h, w), dtype=np.uint8)
    label = rng.integers(0, 9, (h, w), dtype=np.uint8)
    label[0, :3] = 255
    return vis, ir, label


def make_msrs(root: Path, split: str = "train", names=("00001D", "00002N", "00003D"), dirs=("vi", "ir", "Segmentation_labels"),
              labels: bool = True) -> dict[str, tuple]:
    """Write an MSRS-layout split; returns the arrays by name."""
    out = {}
    for k, name in enumerate(names):
        vis, ir, label = _sample(k)
        _save(root / split / dirs[0] / f"{name}.png", vis)
        _save(root / split / dirs[1] / f"{name}.png", ir)
        if labels:
            _save(root / split / dirs[2] / f"{name}.png", label)
        out[name] = (vis, ir, label)
    return out


def _assert_item(item: dict, vis: np.ndarray, ir: np.ndarray, label: np.ndarray | None) -> None:
    assert item["vis"].shape == (3, *vis.shape[:2]) and item["vis"].dtype == torch.float32
    assert item["ir"].shape == (1, *ir.shape) and item["ir"].dtype == torch.float32
    torch.testing.assert_close(item["vis"], torch.from_numpy(vis).permute(2, 0, 1).float() / 255)
    torch.testing.assert_close(item["ir"][0], torch.from_numpy(ir).float() / 255)
    if label is None:
        assert "label" not in item
    else:
        assert item["label"].dtype == torch.int64
        assert torch.equal(item["label"], torch.from_numpy(label).long())


# ----------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("dirs", [("vi", "ir", "Segmentation_labels"), ("vi", "ir", "label"),
                                  ("Visible", "Infrared", "Label")])
def test_msrs_layout(tmp_path, dirs):
    arrays = make_msrs(tmp_path, "test", dirs=dirs)
    ds = RGBTDataset(tmp_path, split="test")
    assert ds.layout == "msrs" and ds.has_labels and ds.names == sorted(arrays)
    for i, name in enumerate(ds.names):
        item = ds[i]
        assert item["name"] == name
        _assert_item(item, *arrays[name])
    assert ds.check() == 3


def test_msrs_unlabelled_split_and_require_labels(tmp_path):
    arrays = make_msrs(tmp_path, "val", labels=False)
    ds = RGBTDataset(tmp_path, split="val")
    assert not ds.has_labels
    _assert_item(ds[0], arrays[ds.names[0]][0], arrays[ds.names[0]][1], None)
    with pytest.raises(MissingDataError, match="require_labels"):
        RGBTDataset(tmp_path, split="val", require_labels=True)


def test_pairing_is_by_name_not_order(tmp_path):
    """Each IR image is constant = its own number; files differ in extension so sorted file lists differ."""
    names = ["9", "10", "a", "b"]
    for k, name in enumerate(names):
        _save(tmp_path / "vi" / f"{name}.png", np.full((8, 8, 3), 10 * k, np.uint8))
        ext = ".bmp" if k % 2 else ".png"
        _save(tmp_path / "ir" / f"{name}{ext}", np.full((8, 8), 10 * k, np.uint8))
    ds = RGBTDataset(tmp_path, split=None)
    assert ds.layout == "pairs"
    for i in range(len(ds)):
        item = ds[i]
        k = names.index(item["name"])
        assert torch.all(item["ir"] * 255 == 10 * k) and torch.all(item["vis"] * 255 == 10 * k)


def _mfnet(root: Path, names=("00001D", "00002N", "00003N")) -> dict:
    out = {}
    for k, name in enumerate(names):
        vis, ir, label = _sample(k)
        _save(root / "images" / f"{name}.png", np.dstack([vis, ir]))
        _save(root / "labels" / f"{name}.png", label)
        out[name] = (vis, ir, label)
    (root / "train.txt").write_text("00001D\n00003N\n\n")
    (root / "test_night.txt").write_text("00002N.png\n")
    return out


def test_mfnet_layout(tmp_path):
    arrays = _mfnet(tmp_path)
    ds = RGBTDataset(tmp_path, split="train")
    assert ds.layout == "mfnet" and ds.names == ["00001D", "00003N"] and ds.has_labels
    for i, name in enumerate(ds.names):
        _assert_item(ds[i], *arrays[name])
    assert RGBTDataset(tmp_path, split="test_night").names == ["00002N"]
    assert len(RGBTDataset(tmp_path, split=None)) == 3
    with pytest.raises(MissingDataError, match=r"val\.txt.*lists found: \['test_night.txt', 'train.txt'\]"):
        RGBTDataset(tmp_path, split="val")


def test_mfnet_bad_inputs(tmp_path):
    _mfnet(tmp_path)
    (tmp_path / "val.txt").write_text("00009D\n")
    with pytest.raises(DataError, match=r"00009D\.png: listed in val\.txt but missing"):
        RGBTDataset(tmp_path, split="val")
    _save(tmp_path / "images" / "00004D.png", _sample(0)[0])  # RGB, not RGB + thermal
    (tmp_path / "val.txt").write_text("00004D\n")
    (tmp_path / "labels" / "00004D.png").write_bytes((tmp_path / "labels" / "00001D.png").read_bytes())
    ds = RGBTDataset(tmp_path, split="val")
    with pytest.raises(DataError, match=r"00004D\.png: expected a 4-channel MFNet image.*got PIL mode 'RGB'"):
        ds[0]


def test_flat_pairs_split_none_and_auto(tmp_path, caplog):
    make_msrs(tmp_path, "flat", labels=False)
    flat = tmp_path / "flat"
    assert RGBTDataset(flat, split=None).layout == "pairs"
    with caplog.at_level(logging.WARNING, logger="rgbt.dataset"):
        ds = RGBTDataset(flat)  # split="train" on a flat folder: every pair, with a warning
    assert len(ds) == 3 and "no split folders" in caplog.text
    with pytest.raises(DataError, match="needs a split"):
        RGBTDataset(flat, split=None, layout="msrs")


def test_real_pairs_load_through_unlabelled_path():
    if not (REAL_RGBT / "vi").is_dir():
        pytest.skip(f"real RGB-T pairs not found at {REAL_RGBT} (expected ../shared/data/real_rgbt next to the clone)")
    ds = RGBTDataset(REAL_RGBT, split=None)
    assert ds.layout == "pairs" and not ds.has_labels and len(ds) == 60
    for name in ("MSRS_00003N", "RoadScene_FLIR_00211"):
        item = ds[ds.names.index(name)]
        assert item["name"] == name and "label" not in item
        assert item["vis"].shape[0] == 3 and item["ir"].shape[0] == 1
        assert item["vis"].shape[1:] == item["ir"].shape[1:]
        for key in ("vis", "ir"):
            assert 0.0 <= item[key].min() and item[key].max() <= 1.0 and item[key].std() > 0.01
    assert ds[ds.names.index("MSRS_00003N")]["ir"].shape == (1, 480, 640)
    cropped = RGBTDataset(REAL_RGBT, split=None, crop=(64, 64), flip=True)
    assert cropped[0]["vis"].shape == (3, 64, 64)


def test_synthetic_root_fixture_loads(synthetic_root):
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        ds = RGBTDataset(synthetic_root, split=split, require_labels=True)
        assert len(ds) == n and ds.check() == n
        assert ds[0]["vis"].shape == (3, 64, 80)


# ----------------------------------------------------------------------------------------------- augmentation
def _coded(root: Path) -> None:
    """vis R = 6x, G = 7y; ir = 6x; label = x mod 9: any mismatch between modalities after augmentation shows."""
    yy, xx = np.mgrid[0:H, 0:W]
    vis = np.dstack([6 * xx, 7 * yy, np.zeros_like(xx)]).astype(np.uint8)
    for k in range(6):
        _save(root / "train" / "vi" / f"{k}.png", vis)
        _save(root / "train" / "ir" / f"{k}.png", (6 * xx).astype(np.uint8))
        _save(root / "train" / "label" / f"{k}.png", (xx % 9).astype(np.uint8))


def test_crop_flip_identical_on_all_modalities_and_reproducible(tmp_path):
    _coded(tmp_path)
    ds = RGBTDataset(tmp_path, crop=(16, 24), flip=True, seed=3)
    flips = 0
    for i in range(len(ds)):
        item = ds[i]
        assert item["vis"].shape == (3, 16, 24) and item["ir"].shape == (1, 16, 24) and item["label"].shape == (16, 24)
        x = torch.round(item["vis"][0] * 255 / 6).long()
        assert torch.equal(torch.round(item["ir"][0] * 255).long(), x * 6)
        assert torch.equal(item["label"], x % 9)
        flips += int(x[0, 0] > x[0, -1])
        again = ds[i]
        assert torch.equal(again["vis"], item["vis"]) and torch.equal(again["label"], item["label"])
    assert 0 < flips < len(ds)
    other = RGBTDataset(tmp_path, crop=(16, 24), flip=True, seed=4)
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i]["vis"], other[i]["vis"]) for i in range(len(ds)))


def test_crop_larger_than_image_pads_with_zero_and_ignore(tmp_path):
    _coded(tmp_path)
    item = RGBTDataset(tmp_path, crop=(H + 8, W + 4))[0]
    assert item["vis"].shape == (3, H + 8, W + 4)
    assert torch.all(item["label"][H:] == 255) and torch.all(item["label"][:, W:] == 255)
    assert torch.all(item["vis"][:, H:] == 0) and torch.all(item["ir"][:, :, W:] == 0)
    assert torch.equal(item["label"][:H, :W], torch.from_numpy(np.mgrid[0:H, 0:W][1] % 9))


def test_bad_crop_argument(tmp_path):
    _coded(tmp_path)
    with pytest.raises(DataError, match=r"crop: expected positive"):
        RGBTDataset(tmp_path, crop=(0, 5))
    with pytest.raises(DataError, match=r"crop: expected None or \(height, width\)"):
        RGBTDataset(tmp_path, crop=16)


def test_dataloader_batches(tmp_path):
    _coded(tmp_path)
    batch = next(iter(torch.utils.data.DataLoader(RGBTDataset(tmp_path, crop=(16, 16)), batch_size=4)))
    assert batch["vis"].shape == (4, 3, 16, 16) and batch["label"].shape == (4, 16, 16)
    assert batch["name"] == ["0", "1", "2", "3"]


# ----------------------------------------------------------------------------------------------- bad input
def test_missing_partner_names_the_file(tmp_path):
    make_msrs(tmp_path)
    (tmp_path / "train" / "ir" / "00002N.png").unlink()
    with pytest.raises(DataError, match=r"vi/00002N\.png: missing partner ir file .*ir/00002N\.png"):
        RGBTDataset(tmp_path)


def test_missing_label_names_the_file(tmp_path):
    make_msrs(tmp_path)
    (tmp_path / "train" / "Segmentation_labels" / "00003D.png").unlink()
    with pytest.raises(DataError, match=r"00003D\.png: missing partner label file .*Segmentation_labels/00003D\.png"):
        RGBTDataset(tmp_path)


def test_size_mismatch_names_both_files(tmp_path):
    make_msrs(tmp_path)
    _save(tmp_path / "train" / "ir" / "00001D.png", np.zeros((H, W + 1), np.uint8))
    ds = RGBTDataset(tmp_path)
    with pytest.raises(DataError, match=r"size mismatch .*vi/00001D\.png is 32x40.*ir/00001D\.png is 32x41"):
        ds[0]


def test_truncated_png_names_the_file(tmp_path):
    make_msrs(tmp_path)
    path = tmp_path / "train" / "vi" / "00002N.png"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    ds = RGBTDataset(tmp_path)  # lazy: construction only lists the files
    with pytest.raises(DataError, match=r"vi/00002N\.png: unreadable or truncated image"):
        ds[1]


def test_not_an_image_names_the_file(tmp_path):
    make_msrs(tmp_path)
    (tmp_path / "train" / "ir" / "00003D.png").write_text("not a png")
    with pytest.raises(DataError, match=r"ir/00003D\.png: unreadable or truncated image"):
        RGBTDataset(tmp_path)[2]


def test_label_out_of_range_names_the_file(tmp_path):
    make_msrs(tmp_path)
    label = _sample(0)[2]
    label[5, 5], label[6, 6] = 9, 200
    _save(tmp_path / "train" / "Segmentation_labels" / "00001D.png", label)
    ds = RGBTDataset(tmp_path)
    with pytest.raises(DataError, match=r"Segmentation_labels/00001D\.png: expected label values in 0\.\.8 or 255 "
                                        r"\(ignore\), got \[9, 200\] in 2 pixels"):
        ds[0]
    ds[1]  # other samples still load (255 is allowed)


def test_wrong_mode_names_the_file(tmp_path):
    make_msrs(tmp_path)
    _save(tmp_path / "train" / "vi" / "00001D.png", np.zeros((H, W), np.uint8))
    _save(tmp_path / "train" / "Segmentation_labels" / "00002N.png", np.zeros((H, W, 3), np.uint8))
    ds = RGBTDataset(tmp_path)
    with pytest.raises(DataError, match=r"vi/00001D\.png: expected an 8-bit RGB visible image.*got PIL mode 'L'"):
        ds[0]
    with pytest.raises(DataError, match=r"00002N\.png: expected a single-channel label map.*got PIL mode 'RGB'"):
        ds[1]


def test_check_reports_every_bad_sample(tmp_path):
    make_msrs(tmp_path)
    (tmp_path / "train" / "vi" / "00001D.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    _save(tmp_path / "train" / "ir" / "00003D.png", np.zeros((H + 2, W), np.uint8))
    ds = RGBTDataset(tmp_path)
    with pytest.raises(DataError, match=r"2 bad sample\(s\)") as info:
        ds.check()
    assert "vi/00001D.png: unreadable" in str(info.value) and "ir/00003D.png is 34x40" in str(info.value)


def test_empty_folder(tmp_path):
    (tmp_path / "train" / "vi").mkdir(parents=True)
    (tmp_path / "train" / "ir").mkdir()
    with pytest.raises(MissingDataError, match=r"train/vi: expected image files .* got an empty folder"):
        RGBTDataset(tmp_path)


def test_missing_root_and_split(tmp_path):
    with pytest.raises(MissingDataError, match=r"nope: expected a dataset folder, got no such directory"):
        RGBTDataset(tmp_path / "nope")
    make_msrs(tmp_path, "train")
    with pytest.raises(DataError, match=r"unknown dataset layout for split 'val'.*splits found: train"):
        RGBTDataset(tmp_path, split="val")
    with pytest.raises(MissingDataError, match=r"val: expected split folder 'val'"):
        RGBTDataset(tmp_path, split="val", layout="msrs")


def test_unknown_layout(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(DataError, match=r"unknown dataset layout.*got entries \['photos'\]"):
        RGBTDataset(tmp_path)
    with pytest.raises(DataError, match=r"layout: expected one of .*got 'kitti'"):
        RGBTDataset(tmp_path, layout="kitti")


def test_missing_ir_folder(tmp_path):
    _save(tmp_path / "vi" / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="unknown dataset layout"):
        RGBTDataset(tmp_path, split=None)
    with pytest.raises(MissingDataError, match=r"expected the infrared image folder \(one of ir, Infrared"):
        RGBTDataset(tmp_path, split=None, layout="pairs")
