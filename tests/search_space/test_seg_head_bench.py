"""bench/seg_head_cost.py runs as a script on a tiny size and prints parseable JSON with the promised fields."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "seg_head_cost.py"


def test_seg_head_bench_prints_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--size", "32", "40", "--batch", "1", "--channels", "4",
                                      "--widths", "32", "8", "--repeat", "1", "--warmup", "0"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert done.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["size"] == [32, 40] and result["batch"] == 1 and result["seg_scale"] == 2 and result["threads"] == 1
    for name in ("attack_step_s", "train_s"):
        assert set(result["results"][name]) == {"32", "8"} and min(result["results"][name].values()) > 0
        assert result["ratio_vs_width_32"][name]["32"] == 1.0
    # the head's parameters, counted: per stage a width x stage-channels linear (+ bias), the 1x1 fuse conv
    # (4 width -> width, no bias) + batch norm, the classifier (width -> 9 + bias); MiT-b0 stages 32, 64, 160, 256
    for width in (32, 8):
        expected = sum(width * c + width for c in (32, 64, 160, 256)) + 4 * width * width + 2 * width + 9 * width + 9
        assert result["head_params"][str(width)] == expected


def test_seg_head_bench_refuses_a_zero_width(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    module = runpy.run_path(str(SCRIPT))
    with pytest.raises(SystemExit):
        module["parse_args"](["--widths", "64", "0"])
    assert "--widths: expected integers >= 1, got [64, 0]" in capsys.readouterr().err
