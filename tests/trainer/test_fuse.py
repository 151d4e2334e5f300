"""trainer/fuse.py (and `paif fuse`): real pairs at their own size, batching, layouts, resuming, atomic writes,
bad pairs."""
from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rgbt.classes import PALETTE
from rgbt.dataset import RGBTDataset
from trainer.checkpoint import init_checkpoint, load_model
from trainer.fuse import collect_pairs, fuse_folder, main

REPO = Path(__file__).resolve().parents[2]
REAL_RGBT = REPO.parent / "shared" / "data" / "real_rgbt"
# the two smallest real pairs (RoadScene, 211x447 and 227x483): real data at two sizes, cheap enough for the suite
REAL_NAMES = ("RoadScene_SF_085", "RoadScene_FLIR_05064")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_checkpoint(tmp_path_factory.mktemp("fuse") / "rand.pt", channels=8, seed=0)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt)[0]


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _pairs(root: Path, sizes: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, (h, w) in sizes.items():
        _png(root / "vi" / f"{name}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        _png(root / "ir" / f"{name}.png", rng.integers(0, 256, (h, w), dtype=np.uint8))
    return root


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _reference(model, root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fused uint8 RGB and class ids per pair, through the dataset reader and the model, one image at a time."""
    ds = RGBTDataset(root, split=None)
    out = {}
    for i in range(len(ds)):
        item = ds[i]
        with torch.no_grad():
            o = model(item["ir"][None], item["vis"][None])
        fused = (o.fused_rgb[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        out[item["name"]] = (fused, o.logits[0].argmax(0).numpy())
    return out


@pytest.mark.slow
def test_real_pairs_at_their_own_size_with_segmentation(ckpt, model, tmp_path, capsys):
    data = tmp_path / "real"
    for name in REAL_NAMES:
        for sub in ("vi", "ir"):
            (data / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(REAL_RGBT / sub / f"{name}.png", data / sub / f"{name}.png")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--seg", "--no-progress",
                 "--device", "cpu"]) == 0
    assert "fused 2 pairs" in capsys.readouterr().out
    ref = _reference(model, data)
    for name in REAL_NAMES:
        with Image.open(REAL_RGBT / "vi" / f"{name}.png") as im:
            w, h = im.size
        fused, seg, over = (_read(p) for p in (out / f"{name}.png", out / "seg" / f"{name}.png",
                                              out / "overlay" / f"{name}.png"))
        assert fused.shape == seg.shape == over.shape == (h, w, 3)  # no crop, no resize
        ref_fused, ref_pred = ref[name]
        assert np.abs(fused.astype(int) - ref_fused).max() <= 1
        assert (seg == PALETTE[ref_pred]).all(axis=-1).mean() > 0.999
        mask = ref_pred != 0  # overlay: half fused, half class colour on labelled pixels, fused elsewhere
        expect = np.where(mask[..., None], np.rint(0.5 * fused + 0.5 * PALETTE[ref_pred]), fused)
        assert np.abs(over.astype(int) - expect).max() <= 1
    summary = json.loads((out / "fuse_summary.json").read_text())
    assert summary["pairs"] == summary["fused"] == 2 and summary["bad"] == [] and summary["seg"] is True


def test_every_real_pair_is_listed():
    pairs, problems = collect_pairs(str(REAL_RGBT), None, None, "test")
    assert len(pairs) == 60 and problems == []
    assert {p.name for p in pairs} >= set(REAL_NAMES)


def test_equal_sizes_are_batched_and_batching_does_not_change_the_result(ckpt, tmp_path):
    data = _pairs(tmp_path / "d", {"a": (32, 40), "b": (24, 36), "c": (32, 40), "d": (32, 40), "e": (24, 36)})
    one = fuse_folder(ckpt, tmp_path / "one", data=str(data), batch_size=1, progress=False)
    three = fuse_folder(ckpt, tmp_path / "three", data=str(data), batch_size=3, progress=False)
    assert one["fused"] == three["fused"] == 5
    for name in "abcde":
        a, b = _read(tmp_path / "one" / f"{name}.png"), _read(tmp_path / "three" / f"{name}.png")
        assert a.shape == ((32, 40, 3) if name in "acd" else (24, 36, 3))
        assert np.abs(a.astype(int) - b).max() <= 1


def test_rerun_skips_written_pairs_and_finishes_the_rest(ckpt, tmp_path):
    data = _pairs(tmp_path / "d", {n: (32, 40) for n in "abcd"})
    out = tmp_path / "out"
    fuse_folder(ckpt, out, data=str(data), progress=False)
    (out / "c.png").unlink()
    stamps = {n: (out / f"{n}.png").stat().st_mtime_ns for n in "abd"}
    summary = fuse_folder(ckpt, out, data=str(data), progress=False)
    assert (summary["fused"], summary["already_written"]) == (1, 3)
    assert (out / "c.png").is_file()
    assert {n: (out / f"{n}.png").stat().st_mtime_ns for n in "abd"} == stamps
    again = fuse_folder(ckpt, out, data=str(data), progress=False, overwrite=True)
    assert again["fused"] == 4


def test_an_interrupted_run_leaves_no_partial_file_and_a_rerun_completes(ckpt, tmp_path, monkeypatch):
    import trainer.fuse as fuse_mod

    data = _pairs(tmp_path / "d", {n: (32, 40) for n in "abcde"})
    out = tmp_path / "out"
    real_write = fuse_mod.atomic_write_bytes
    calls = []

    def crash_on_fourth(payload, path):  # die in the middle of writing the 4th file (2nd pair with --seg)
        calls.append(path)
        if len(calls) == 4:
            Path(f"{path}.partial").write_bytes(payload[: len(payload) // 2])  # what a plain write would leave
            raise KeyboardInterrupt
        return real_write(payload, path)

    monkeypatch.setattr(fuse_mod, "atomic_write_bytes", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        fuse_folder(ckpt, out, data=str(data), seg=True, batch_size=2, progress=False)
    Path(f"{calls[3]}.partial").unlink()
    monkeypatch.setattr(fuse_mod, "atomic_write_bytes", real_write)
    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert not [p for p in written if p.name.startswith(".") or p.suffix == ".tmp"]
    for p in written:
        with Image.open(p) as im:
            im.load()  # complete PNGs only
    summary = fuse_folder(ckpt, out, data=str(data), seg=True, progress=False)
    assert summary["already_written"] == 1 and summary["fused"] == 4  # pair a was complete; b was cut short


def _bad_folder(root: Path) -> Path:
    _pairs(root, {"good1": (32, 40), "good2": (32, 40), "trunc": (32, 40), "sizes": (32, 40), "grey": (32, 40)})
    data = (root / "ir" / "trunc.png").read_bytes()
    (root / "ir" / "trunc.png").write_bytes(data[: len(data) // 2])
    _png(root / "ir" / "sizes.png", np.zeros((30, 40), np.uint8))
    _png(root / "vi" / "grey.png", np.zeros((32, 40), np.uint8))
    _png(root / "vi" / "lonely.png", np.zeros((32, 40, 3), np.uint8))
    return root


def test_bad_pairs_stop_the_run_with_the_file_named(ckpt, tmp_path, capsys):
    data = _bad_folder(tmp_path / "d")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lonely.png: missing partner ir file" in err and "--skip-bad" in err
    (data / "vi" / "lonely.png").unlink()
    assert main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad pair 'grey'" in err and "grey.png: expected an 8-bit RGB visible image" in err


def test_skip_bad_fuses_the_good_pairs_and_lists_the_bad_ones(ckpt, tmp_path, capsys):
    data = _bad_folder(tmp_path / "d")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--no-progress",
                 "--skip-bad"]) == 0
    assert "4 bad pairs skipped" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == ["good1.png", "good2.png"]
    bad = json.loads((out / "fuse_summary.json").read_text())["bad"]
    assert len(bad) == 4
    text = "\n".join(bad)
    assert "lonely.png: missing partner ir file" in text
    assert "trunc.png: unreadable or truncated image" in text
    assert "size mismatch for sample 'sizes'" in text and "is 30x40" in text
    assert "grey.png: expected an 8-bit RGB visible image" in text


def test_two_folders_msrs_and_mfnet_layouts(ckpt, tmp_path, synthetic_root):
    data = _pairs(tmp_path / "d", {"x": (32, 40), "y": (32, 40)})
    s = fuse_folder(ckpt, tmp_path / "o1", ir=str(data / "ir"), vis=str(data / "vi"), progress=False)
    assert s["fused"] == 2 and (tmp_path / "o1" / "x.png").is_file()
    s = fuse_folder(ckpt, tmp_path / "o2", data=str(synthetic_root), split="test", progress=False)
    names = RGBTDataset(synthetic_root, "test").names
    assert s["fused"] == len(names) and all((tmp_path / "o2" / f"{n}.png").is_file() for n in names)
    mf = tmp_path / "mfnet"
    rng = np.random.default_rng(1)
    for n in ("m1", "m2", "m3"):
        _png(mf / "images" / f"{n}.png", rng.integers(0, 256, (32, 40, 4), dtype=np.uint8))
    (mf / "test.txt").write_text("m1\nm3\n")
    s = fuse_folder(ckpt, tmp_path / "o3", data=str(mf), split="test", progress=False)
    assert s["fused"] == 2 and sorted(p.name for p in (tmp_path / "o3").glob("*.png")) == ["m1.png", "m3.png"]
    with pytest.raises(Exception, match="either --data DIR or --ir DIR --vis DIR, got both"):
        fuse_folder(ckpt, tmp_path / "o4", data=str(data), ir=str(data / "ir"), vis=str(data / "vi"))


def test_paif_console_script_runs_fuse(ckpt, tmp_path, capsys):
    from trainer import cli

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["paif"] == "trainer.cli:main"
    data = _pairs(tmp_path / "d", {"x": (32, 40)})
    assert cli.main(["fuse", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o"),
                     "--no-progress", "--amp"]) == 0
    assert (tmp_path / "o" / "x.png").is_file()
    assert cli.main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
