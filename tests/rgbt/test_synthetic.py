"""rgbt.synthetic: layout, all classes, determinism, CLI, and a measurement that the scenes need fusion."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation
from scipy.stats import rankdata

from rgbt.classes import CLASSES, NUM_CLASSES
from rgbt.color import rgb_to_ycbcr
from rgbt.dataset import RGBTDataset
from rgbt.synthetic import generate_dataset, main

CAR, PERSON, CONE = CLASSES.index("car"), CLASSES.index("person"), CLASSES.index("color_cone")
STATIC = [CLASSES.index(c) for c in ("unlabeled", "curve", "guardrail", "bump")]  # the scene without objects


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_names_and_meta(synthetic_root):
    meta = json.loads((synthetic_root / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["size"] == [64, 80] and meta["version"] >= 1
    assert meta["splits"] == {"train": 6, "val": 2, "test": 2}
    numbers = []
    for split in ("train", "val", "test"):
        for sub in ("vi", "ir", "Segmentation_labels"):
            assert (synthetic_root / split / sub).is_dir()
        ds = RGBTDataset(synthetic_root, split=split, require_labels=True)
        assert ds.layout == "msrs" and ds.check() == meta["splits"][split]
        for name in ds.names:
            assert len(name) == 6 and name[:5].isdigit() and name[5] in "DN"
            assert meta["scenes"][name] == {**meta["scenes"][name], "split": split,
                                            "time": {"D": "day", "N": "night"}[name[5]]}
            numbers.append(int(name[:5]))
        assert {meta["scenes"][n]["time"] for n in ds.names} == {"day", "night"}
    assert sorted(numbers) == list(range(1, 11))


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_all_classes_in_every_split(synthetic_root, split):
    ds = RGBTDataset(synthetic_root, split=split)
    counts = torch.zeros(NUM_CLASSES, dtype=torch.long)
    for i in range(len(ds)):
        counts += torch.bincount(ds[i]["label"].flatten(), minlength=NUM_CLASSES)
    assert (counts > 0).all(), f"classes missing from {split}: {[CLASSES[k] for k in torch.nonzero(counts == 0)]}"


def test_same_seed_byte_identical_different_seed_differs(tmp_path):
    kwargs = dict(n_train=2, n_val=1, n_test=1, size=(48, 64))
    generate_dataset(tmp_path / "a", seed=7, **kwargs)
    generate_dataset(tmp_path / "b", seed=7, **kwargs)
    generate_dataset(tmp_path / "c", seed=8, **kwargs)
    a, b, c = (_digest(tmp_path / k) for k in "abc")
    assert len(a) == 4 * 3 + 1 and a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in images)


def test_split_scenes_do_not_depend_on_other_split_sizes(tmp_path):
    generate_dataset(tmp_path / "a", n_train=1, n_val=2, n_test=0, size=(48, 64))
    generate_dataset(tmp_path / "b", n_train=3, n_val=2, n_test=0, size=(48, 64))
    va = sorted((tmp_path / "a" / "val" / "vi").iterdir())
    vb = sorted((tmp_path / "b" / "val" / "vi").iterdir())
    assert [p.read_bytes() for p in va] == [p.read_bytes() for p in vb]


def test_regenerate_replaces_and_refuses_foreign_folder(tmp_path):
    out = tmp_path / "syn"
    generate_dataset(out, n_train=3, n_val=0, n_test=0, size=(48, 64))
    generate_dataset(out, n_train=1, n_val=1, n_test=0, size=(48, 64))
    assert sorted(p.name for p in (out / "train" / "vi").iterdir()) == ["00001D.png"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"other: expected an empty folder or an earlier synthetic dataset"):
        generate_dataset(tmp_path / "other", n_train=1, n_val=0, n_test=0)
    with pytest.raises(ValueError, match=r"size: expected at least 32x32 pixels, got 16x64"):
        generate_dataset(tmp_path / "small", size=(16, 64))


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--n-train", "2", "--n-val", "1", "--n-test", "1", "--seed", "3",
          "--size", "48", "64"])
    assert "wrote 4 scenes (1 night) of 48x64" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "meta.json").read_text())["seed"] == 3


# ----------------------------------------------------------------------------------------------- fusion is needed
def separability(inside: np.ndarray, ring: np.ndarray) -> float:
    """|2 AUC - 1| of the Mann-Whitney AUC (rank-based): 0 = same distribution, 1 = perfectly separable."""
    ranks = rankdata(np.concatenate([inside, ring]))
    n1, n2 = len(inside), len(ring)
    auc = (ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n2)
    return abs(2.0 * auc - 1.0)


def _measure(root: Path, split: str = "train") -> dict[str, float]:
    stats: dict[str, list[float]] = {"night_obj_ir": [], "night_obj_vis_y": [], "day_cone_vis_cr": [], "day_cone_ir": []}
    ds = RGBTDataset(root, split=split)
    for i in range(len(ds)):
        item = ds[i]
        label = item["label"].numpy()
        ir = item["ir"][0].numpy()
        ycbcr = rgb_to_ycbcr(item["vis"]).numpy()
        night = item["name"].endswith("N")
        classes, keys = ((CAR, PERSON), ("night_obj_ir", "night_obj_vis_y")) if night else ((CONE,), ("day_cone_ir", "day_cone_vis_cr"))
        mask = np.isin(label, classes)
        if mask.sum() < 10:
            continue
        ring = binary_dilation(mask, iterations=3) & ~mask & np.isin(label, STATIC)
        if ring.sum() < 10:
            continue
        vis_feature = ycbcr[0] if night else ycbcr[2]
        stats[keys[0]].append(separability(ir[mask], ir[ring]))
        stats[keys[1]].append(separability(vis_feature[mask], vis_feature[ring]))
    assert all(len(v) >= 6 for v in stats.values()), {k: len(v) for k, v in stats.items()}
    return {k: float(np.mean(v)) for k, v in stats.items()}


def test_scenes_make_fusion_necessary(tmp_path, record_property):
    """Statistic: per image, separability = |2·AUC − 1| (Mann–Whitney AUC, 0 = indistinguishable, 1 = perfectly
    separable) between the pixels of the objects and the background pixels of a 3-px ring around them (binary
    dilation, 3 iterations, minus the objects, keeping only unlabeled / curve / guardrail / bump pixels, so that
    a cold cone in front of a hot car does not count as "visible"); averaged over 16 scenes at 128x160
    (seed 0; 8 day, 8 night).

    * night, person ∪ car: separable in IR (> 0.9), not in VIS luminance Y (< 0.25);
    * day, colour cones: separable in VIS chroma Cr (> 0.6), not in IR (< 0.3).

    Measured when written (seed 0): night IR 1.00 vs VIS-Y 0.06; day cones VIS-Cr 0.77 vs IR 0.16
    (seeds 1-4: IR >= 0.99, VIS-Y <= 0.10, VIS-Cr >= 0.80, cone IR <= 0.15).
    """
    generate_dataset(tmp_path, n_train=16, n_val=0, n_test=0, size=(128, 160), seed=0)
    s = _measure(tmp_path)
    for key, value in s.items():
        record_property(key, round(value, 3))
    assert s["night_obj_ir"] > 0.9 and s["night_obj_vis_y"] < 0.25, s
    assert s["day_cone_vis_cr"] > 0.6 and s["day_cone_ir"] < 0.3, s
