"""trainer/fusion_compare.py: ours vs the max and average rules on the held-out pairs of a split file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rgbt.color import rgb_to_y
from trainer.checkpoint import init_checkpoint
from trainer.fusion_compare import average_rule, main, max_rule
from trainer.metrics import FUSION_METRIC_NAMES


def _entropy_u8(img: np.ndarray) -> float:
    """Shannon entropy (bits) of the 8-bit image, by numpy (independent of trainer.metrics)."""
    q = np.clip(np.rint(img * 255), 0, 255).astype(np.int64)
    p = np.bincount(q.ravel(), minlength=256) / q.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def test_rules_are_pixelwise_max_and_mean():
    ir, y = torch.rand(2, 1, 5, 7), torch.rand(2, 1, 5, 7)
    assert torch.equal(max_rule(ir, y), torch.where(ir > y, ir, y))
    torch.testing.assert_close(average_rule(ir, y), (ir + y) / 2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    rng = np.random.default_rng(3)
    for i in range(4):
        for sub, shape in (("vi", (24, 32, 3)), ("ir", (24, 32))):
            (root / "data" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / "data" / sub / f"n{i}.png")
    (root / "split.json").write_text(json.dumps({"train": ["n0", "n2"], "held_out": ["n1", "n3"],
                                                 "holdout_fraction": 0.5, "holdout_seed": 0}))
    return root


@pytest.mark.slow
def test_compare_scores_only_the_held_out_pairs_and_writes_table_and_picture(folder, capsys):
    ckpt = init_checkpoint(folder / "rand.pt", channels=8, seed=0)
    out = folder / "out"
    assert main(["--checkpoint", str(ckpt), "--data", str(folder / "data"), "--split-file", str(folder / "split.json"),
                 "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["names"] == ["n1", "n3"] and res["split"]["images"] == "held out" and res["example"] == "n1"
    assert list(res["methods"]) == ["ours", "max rule", "average rule"]
    assert all(set(v) == set(FUSION_METRIC_NAMES) for v in res["methods"].values())
    # the max rule's EN, recomputed with numpy from the files
    ens = []
    for name in ("n1", "n3"):
        vis = torch.from_numpy(np.asarray(Image.open(folder / "data" / "vi" / f"{name}.png"))).permute(2, 0, 1)[None] / 255
        ir = np.asarray(Image.open(folder / "data" / "ir" / f"{name}.png")) / 255
        y = rgb_to_y(vis.float())[0, 0].numpy()
        ens.append(_entropy_u8(np.maximum(ir, y)))
    assert res["per_image"]["max rule"]["EN"] == pytest.approx(ens, abs=1e-6)
    assert res["methods"]["max rule"]["EN"] == pytest.approx(np.mean(ens), abs=1e-6)
    table = (out / "results.md").read_text()
    assert "| max rule |" in table and "| ours |" in table and "2 held out pairs" in table
    with Image.open(out / "example.png") as im:
        assert im.size[0] > 3 * im.size[1]  # four panels side by side
    assert "| method | EN |" in capsys.readouterr().out


def test_bad_split_file_is_a_clear_error(folder, capsys):
    bad = folder / "bad_split.json"
    bad.write_text(json.dumps({"train": ["n0"]}))
    assert main(["--checkpoint", str(folder / "missing.pt"), "--data", str(folder / "data"),
                 "--split-file", str(bad), "--out", str(folder / "o2")]) == 2
    assert "expected a 'held_out' list of file names" in capsys.readouterr().err
