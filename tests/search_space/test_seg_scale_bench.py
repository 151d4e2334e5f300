"""bench/seg_scale_cost.py runs as a script on a tiny size and prints parseable JSON with the promised fields."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "seg_scale_cost.py"


def test_seg_scale_bench_prints_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--size", "32", "40", "--batch", "1", "--scales", "1", "2",
                                      "--repeat", "1", "--warmup", "0"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert done.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["size"] == [32, 40] and result["batch"] == 1 and result["threads"] == 1
    for name in ("forward_s", "train_s"):
        assert set(result["results"][name]) == {"1", "2"} and min(result["results"][name].values()) > 0
        assert result["ratio_vs_scale_1"][name]["1"] == 1.0
    memory = result["activation_gb"]
    assert 0 < memory["1"] < memory["2"]  # the upsampled segmenter keeps more activations
