"""scripts/demo_summary.py (the demo's verdicts come from the run's own numbers) and scripts/clean_probe.py."""
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


def _run(tmp_path: Path, clean: float, total: int, ssim_fused: float, iou: dict[str, float] | None = None) -> Path:
    from rgbt.synthetic import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, n_train=2, n_val=1, n_test=3, size=(32, 48), seed=0)
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    iou = iou or {"unlabeled": 0.9, "car": 0.6, "person": 0.45, "bike": 0.0, "curve": 0.05, "car_stop": 0.0,
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
    assert "found (IoU >= 30 %): car 60, person 45, color_cone 35" in ok
    assert "mostly missed (< 10 %): bike, bump, car_stop, curve (thin or rare classes need longer training)." in ok
    assert "`strong` 12.0 %" in ok and "SSIM 5.000 vs" in ok and "(at least the max rule)" in ok
    assert "Qabf 0.000 vs" in ok and "(below the max rule)" in ok  # Qabf of max(IR, Y) is > 0
    bad = mod.summarize(_run(tmp_path / "b", clean=0.39, total=601, ssim_fused=0.0))
    assert "target >= 40.0 %: NOT met" in bad and "target <= 600 s on 2 cores: NOT met" in bad
    every = {"unlabeled": 0.9, "car": 0.8, "person": 0.7, "bike": 0.1, "curve": 0.4, "car_stop": 0.3,
             "guardrail": 0.2, "color_cone": 0.5, "bump": 0.15}
    none_missed = mod.summarize(_run(tmp_path / "c", clean=0.45, total=500, ssim_fused=1.0, iou=every))
    assert "mostly missed (< 10 %): none." in none_missed and "need longer training" not in none_missed


def test_max_rule_reference_is_computed_on_the_first_n_images(tmp_path):
    """The max rule's SSIM on the first N test images equals the sum of SSIMs of max(IR, Y) to both sources."""
    import torch

    from rgbt.color import rgb_to_y
    from rgbt.dataset import RGBTDataset
    from trainer.metrics import ssim

    run = _run(tmp_path, clean=0.5, total=1, ssim_fused=1.0)
    from trainer.experiment import max_rule_fusion_metrics

    ref = max_rule_fusion_metrics(tmp_path / "data", "test", 2)
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


def test_clean_probe_matches_a_direct_computation(tmp_path):
    """scripts/clean_probe.py: the mIoU equals a confusion matrix of the model's argmax built here, and the max
    rule's SSIM the per-image sum of SSIM(max(IR, Y), source) over the split."""
    import torch

    from rgbt.color import rgb_to_y
    from rgbt.dataset import RGBTDataset
    from rgbt.synthetic import generate_dataset
    from trainer.checkpoint import load_model
    from trainer.config import load_config
    from trainer.metrics import ssim
    from trainer.warmstart import WarmStartConfig, warm_start

    torch.set_num_threads(1)
    data = tmp_path / "data"
    generate_dataset(data, n_train=2, n_val=3, n_test=1, size=(32, 48), seed=1)
    cfg = load_config(WarmStartConfig, None, {"data": str(data), "cache": str(tmp_path / "c"), "channels": 4,
                                              "seg.steps": 1, "seg.batch_size": 2, "fusion.steps": 1,
                                              "fusion.batch_size": 2, "fusion.crop": [24, 32], "progress_bar": False})
    ckpt = warm_start(cfg)["start"]
    spec = importlib.util.spec_from_file_location("clean_probe", ROOT / "scripts" / "clean_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.probe(ckpt, str(data), "val", batch_size=2)

    model, _ = load_model(ckpt)
    model.eval()
    ds = RGBTDataset(data, "val")
    k = 9
    conf = torch.zeros(k, k, dtype=torch.int64)
    ssims = []
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            pred = model(item["ir"][None], item["vis"][None]).logits.argmax(1)[0]
            keep = item["label"] != 255
            conf += torch.bincount(item["label"][keep] * k + pred[keep], minlength=k * k).view(k, k)
            ir, y = item["ir"][0], rgb_to_y(item["vis"][None])[0, 0]
            ssims.append(ssim(torch.maximum(ir, y), ir) + ssim(torch.maximum(ir, y), y))
    tp = conf.diag().double()
    union = conf.sum(0) + conf.sum(1) - conf.diag()
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.zeros(()))
    assert r["miou"] == pytest.approx(float(iou.mean()), abs=1e-9)
    assert r["SSIM_max_rule"] == pytest.approx(sum(ssims) / len(ssims), abs=1e-6)
    assert 0 <= r["gap_max_rule"] <= 1 and 0 <= r["Qabf"] <= 1
