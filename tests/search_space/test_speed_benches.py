"""bench/decompose_speed.py, bench/step_profile.py and bench/gpu_suite.py: quick runs on CPU print the promised
JSON (the CUDA suite runs the same device-agnostic code; without CUDA it says so and exits 2)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decompose_speed_quick() -> None:
    res = _load("decompose_speed").main(["--quick"])
    (row,) = res["sizes"].values()
    for mode in ("fwd", "fwd_bwd"):
        assert {"decomposition", "decomposition_unfused", "decomposition_autograd"} <= set(row[f"x_conv3x3_{mode}"])
    assert row["speedup_vs_autograd"]["fwd_bwd"] > 0
    json.dumps(res)


@pytest.mark.slow
def test_step_profile_quick() -> None:
    res = _load("step_profile").main(["--quick"])
    assert res["fusion_net"]["ratio_to_own_convs"] > 0 and res["fusion_net"]["convs"] > 0
    shares = res["training_step"]["share_of_aat_step"]
    assert {"fusion_convs", "decompositions", "segformer", "attack"} <= set(shares)
    json.dumps(res)
    # the robustness experiment's setting: fusion width 16, FGSM training attack, segmenter on 2x upsampled images
    res = _load("step_profile").main(["--quick", "--channels", "16", "--attack-kind", "fgsm", "--seg-scale", "2"])
    assert res["channels"] == 16 and res["training_step"]["attack"] == "FGSM" and res["training_step"]["seg_scale"] == 2


@pytest.mark.slow
def test_gpu_suite_cpu_smoke() -> None:
    res = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--device", "cpu", "--quick",
                          "--only", "decomposition", "step_profile"], capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert set(doc["benches"]) == {"decomposition", "step_profile"}
    assert doc["summary"]["fusion_net_ratio_to_own_convs"] > 0


def test_gpu_suite_without_cuda_says_so() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    res = subprocess.run(["bash", str(BENCH / "gpu_suite.sh")], capture_output=True, text=True, timeout=120,
                         env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2 and "CUDA is not available" in json.loads(res.stdout)["error"]
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_suite.sh")]).returncode == 0


def test_malloc_gain_ab_on_decompose_quick() -> None:
    mod = _load("malloc_gain")
    assert mod.leaves({"a": {"b": 1.5, "c": True}, "d": [1]}) == {"a/b": 1.5}
    res = mod.main(["--rounds", "1", "--", str(BENCH / "decompose_speed.py"), "--quick"])
    assert res["default_over_tuned"] and all(v > 0 for v in res["default_over_tuned"].values())
    assert set(res["default_s"]) == set(res["tuned_s"])
