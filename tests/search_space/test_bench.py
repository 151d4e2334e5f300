"""bench/fusion_forward.py --quick runs as a script and prints parseable JSON with the promised fields."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "fusion_forward.py"


def test_bench_quick_prints_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--quick"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    result = json.loads(capsys.readouterr().out)
    for key in ("fusion", "model"):
        (row,) = result[key]
        assert row["size"] == [32, 40] and row["batch"] == 1
        assert row["forward_img_s"] > 0 and row["forward_backward_img_s"] > 0
    decomposition = result["decomposition"]["x_conv3x3"]
    assert decomposition["conv3x3"] == 1.0 and {"decomposition", "box_filter"} <= set(decomposition)
    assert result["genotype"]["ir"] == ["dense_k3_d1", "dilconv_k3_d2"]
