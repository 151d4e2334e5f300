"""rgbt.summary: counts, day/night and the class pixel histogram of a dataset folder."""
from __future__ import annotations

import numpy as np

from rgbt.classes import CLASSES
from rgbt.dataset import RGBTDataset
from rgbt.summary import format_summary, main, summarize


def test_summarize_synthetic(synthetic_root):
    s = summarize(synthetic_root)
    assert s["layout"] == "msrs" and list(s["splits"]) == ["train", "val", "test"]
    train = s["splits"]["train"]
    assert train["n"] == 6 and dict(train["time"]) == {"day": 3, "night": 3}
    assert dict(train["sizes"]) == {(64, 80): 6}
    assert train["pixels"].sum() == 6 * 64 * 80
    ds = RGBTDataset(synthetic_root, split="train")
    expected = sum(np.bincount(ds[i]["label"].numpy().ravel(), minlength=9) for i in range(len(ds)))
    np.testing.assert_array_equal(train["pixels"][:9], expected)
    text = format_summary(s)
    assert "[train] 6 samples, labelled; day 3, night 3" in text
    assert all(name in text for name in CLASSES) and "64x80 (6)" in text


def test_cli_prints_and_fails_cleanly(synthetic_root, tmp_path, capsys):
    main([str(synthetic_root)])
    assert "[val] 2 samples" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2  # the error boundary (trainer.errors.entry_point)
    assert "missing: expected a dataset folder" in capsys.readouterr().err


def test_unlabelled_flat_pairs(tmp_path):
    from PIL import Image

    for name in ("x_00001D", "x_00002N"):
        (tmp_path / "vi").mkdir(exist_ok=True)
        (tmp_path / "ir").mkdir(exist_ok=True)
        Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(tmp_path / "vi" / f"{name}.png")
        Image.fromarray(np.zeros((8, 10), np.uint8)).save(tmp_path / "ir" / f"{name}.png")
    s = summarize(tmp_path)
    assert s["layout"] == "pairs" and s["splits"]["all"]["n"] == 2 and not s["splits"]["all"]["labelled"]
    assert "unlabelled; day 1, night 1" in format_summary(s)
