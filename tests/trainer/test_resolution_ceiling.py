"""The resolution ceiling: exact reconstructions where the geometry is known by hand, thin structures lost at 1/4,
errors, and the command on generated scenes against the library function."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainer.resolution_ceiling import main, pooled_reconstruction, resolution_ceiling


def _block(size: int = 32, lo: int = 8, hi: int = 24, cls: int = 2) -> torch.Tensor:
    lab = torch.zeros(size, size, dtype=torch.long)
    lab[lo:hi, lo:hi] = cls
    return lab


def test_factor_one_is_the_label_itself():
    lab = torch.randint(0, 9, (12, 20))
    assert torch.equal(pooled_reconstruction(lab, 1), lab)
    r = resolution_ceiling([lab.numpy()], [1])[1]
    assert all(v == 1.0 for v in r["iou"] if not np.isnan(v))


def test_a_cell_aligned_block_survives_but_its_corners():
    # Bilinear weights of the block along one axis: pixel 8's centre maps to 1.625 on the 1/4 grid (0.625 block),
    # pixel 9 to 1.875 (0.875), pixel 10 onwards 1.0; pixel 7 maps to 1.375 (0.375). The block's grid indicator is
    # separable, so its probability is wy * wx: 0.625² = 0.39 < 0.5 at the four corners, > 0.5 everywhere else inside.
    lab = _block()
    expected = lab.clone()
    for y, x in ((8, 8), (8, 23), (23, 8), (23, 23)):
        expected[y, x] = 0
    assert torch.equal(pooled_reconstruction(lab, 4), expected)
    assert resolution_ceiling([lab.numpy()], [4])[4]["iou"][2] == pytest.approx(252 / 256)


def test_thin_structures_vanish_at_a_quarter_and_return_at_full_resolution():
    lab = torch.zeros(32, 32, dtype=torch.long)
    lab[:, 13] = 4  # a 1-pixel line: at most 1/4 of any cell
    lab[20:22, 2:30] = 6  # a 2-pixel band that straddles two cells in height
    rec = pooled_reconstruction(lab, 4)
    assert not bool((rec == 4).any()) and not bool((rec == 6).any())
    res = resolution_ceiling([lab.numpy()], [4, 1])
    assert res[4]["iou"][4] == 0.0 and res[4]["iou"][6] == 0.0
    assert res[1]["iou"][4] == 1.0 and res[1]["iou"][6] == 1.0


def test_non_divisible_sizes_use_the_stem_grid_and_ignored_pixels_vote_for_nothing():
    lab = _block(size=30, lo=0, hi=30, cls=1)  # 30 -> ceil(30 / 4) = 8 cells, like MiT's stride-4 stem
    lab[0:2, 0:2] = 255
    rec = pooled_reconstruction(lab, 4)
    assert rec.shape == (30, 30) and bool((rec == 1).all())


def test_bad_input_is_refused_with_what_was_expected():
    with pytest.raises(ValueError, match="integer factor >= 1"):
        pooled_reconstruction(_block(), 0)
    with pytest.raises(ValueError, match=r"\(H, W\) label map"):
        pooled_reconstruction(_block()[None], 4)
    with pytest.raises(ValueError, match="ids in 0..8 or 255"):
        pooled_reconstruction(_block(cls=9), 4)


def test_command_on_generated_scenes(tmp_path, capsys):
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "rgbt.synthetic", "--out", str(data), "--n-train", "1", "--n-val", "1",
                    "--n-test", "3", "--seed", "0", "--size", "48", "64"], check=True, capture_output=True)
    out = tmp_path / "out"
    assert main(["--data", str(data), "--split", "test", "--factors", "4", "2", "--out", str(out)]) == 0
    got = json.loads((out / "resolution_ceiling.json").read_text())
    from rgbt.dataset import RGBTDataset

    ds = RGBTDataset(data, "test")
    ref = resolution_ceiling([ds.load_arrays(i)["label"] for i in range(len(ds))], [4, 2])
    assert got["images"] == 3 and got["results"]["4"]["miou"] == pytest.approx(ref[4]["miou"])
    assert got["results"]["2"]["miou"] >= got["results"]["4"]["miou"]
    assert "| 1/4 |" in (out / "resolution_ceiling.md").read_text()
    assert (out / "resolution_ceiling.png").stat().st_size > 1000
    assert main(["--data", str(tmp_path / "missing"), "--split", "test"]) == 2
    assert "error:" in capsys.readouterr().err
