"""scripts/demo_summary.py: the demo's verdicts come from the run's own numbers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("demo_summary", ROOT / "scripts" / "demo_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path: Path, clean: float, total: int, ssim_fused: float) -> Path:
    from rgbt.synthetic import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, n_train=2, n_val=1, n_test=3, size=(32, 48), seed=0)
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    iou = {"unlabeled": 0.9, "car": 0.6, "person": 0.45, "bike": 0.0, "curve": 0.05, "car_stop": 0.0,
           "guardrail": 0.2, "color_cone": 0.35, "bump": 0.0}
    report = {"data": {"root": str(data), "split": "test", "num_images": 2},
              "clean": {"segmentation": {"miou": clean, "miou_objects": clean - 0.05, "iou": iou},
                        "fusion": {"SSIM": ssim_fused, "Qabf": 0.0}},
              "threats": {"strong": {"segmentation": {"miou": 0.12}}},
              "pictures": {"grids": {"paif": "grid_paif.png"}, "curves": "eps_curve.png"}}
    (run / "eval" / "report.json").write_text(json.dumps(report))
    (run / "stage_times.txt").write_text(f"data 3 s\nsearch 100 s\ntotal {total} s\n")
    (run / "warmstart.json").write_text(json.dumps({"segmenter_val_miou": 0.515}))
    return run


def test_verdicts_follow_the_numbers(tmp_path):
    mod = _module()
    ok = mod.summarize(_run(tmp_path / "a", clean=0.42, total=590, ssim_fused=5.0))
    assert "Clean mIoU** 42.0 %" in ok and "target >= 40.0 %: met" in ok and "target <= 600 s on 2 cores: met" in ok
    assert "found (IoU >= 30 %): car 60, person 45, color_cone 35" in ok and "bike, bump, car_stop, curve" in ok
    assert "`strong` 12.0 %" in ok and "SSIM 5.000 vs" in ok and "(at least the max rule)" in ok
    assert "Qabf 0.000 vs" in ok and "(below the max rule)" in ok  # Qabf of max(IR, Y) is > 0
    bad = mod.summarize(_run(tmp_path / "b", clean=0.39, total=601, ssim_fused=0.0))
    assert "target >= 40.0 %: NOT met" in bad and "target <= 600 s on 2 cores: NOT met" in bad


def test_max_rule_reference_is_computed_on_the_reported_images(tmp_path):
    """The max rule's SSIM on the first N test images equals the sum of SSIMs of max(IR, Y) to both sources."""
    import torch

    from rgbt.color import rgb_to_y
    from rgbt.dataset import RGBTDataset
    from trainer.metrics import ssim

    run = _run(tmp_path, clean=0.5, total=1, ssim_fused=1.0)
    ref = _module().max_rule_metrics(tmp_path / "data", "test", 2)
    ds = RGBTDataset(tmp_path / "data", "test")
    values = []
    for i in range(2):
        ir, y = ds[i]["ir"][0], rgb_to_y(ds[i]["vis"][None])[0, 0]
        fused = torch.maximum(ir, y)
        values.append(ssim(fused, ir) + ssim(fused, y))
    assert ref["SSIM"] == pytest.approx(sum(values) / 2, abs=1e-6)
    assert run.is_dir()


def test_refuses_a_folder_without_a_report(tmp_path, capsys):
    assert _module().main([str(tmp_path)]) == 2
    assert "expected eval/report.json" in capsys.readouterr().err
