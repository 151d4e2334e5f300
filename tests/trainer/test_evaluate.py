"""End-to-end tests of trainer/evaluate.py on tiny synthetic scenes and on the shared unlabelled pairs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from rgbt.classes import CLASSES
from rgbt.dataset import RGBTDataset
from trainer.checkpoint import init_checkpoint, load_model
from trainer.evaluate import main
from trainer.metrics import ConfusionMatrix

REPO = Path(__file__).resolve().parents[2]
REAL_RGBT = REPO.parent / "shared" / "data" / "real_rgbt"
FUSION_KEYS = {"EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM"}




@pytest.fixture(scope="module")
def setup(tmp_path_factory, synthetic_root):
    """(work dir, the shared synthetic dataset: 2 labelled 64x80 test scenes, a random checkpoint)."""
    base = tmp_path_factory.mktemp("evaluate")
    ckpt = init_checkpoint(base / "rand.pt", genotype="paif", channels=8, seed=0)
    return base, synthetic_root, ckpt


def _valid_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= 200


@pytest.fixture(scope="module")
def labelled_run(setup):
    base, data, ckpt = setup
    out = base / "out"
    argv = ["--checkpoint", str(ckpt), "--data", str(data), "--split", "test", "--threat", "paif",
            "--batch-size", "2", "--device", "cpu", "--out", str(out), "--steps", "1", "--no-progress",
            "--eps-sweep", "0", "4", "8", "grid_samples=2"]  # key=value after --eps-sweep is handed back
    assert main(argv) == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_json_structure_and_ranges(labelled_run):
    out, rep = labelled_run
    assert {"config", "versions", "checkpoint", "data", "notes", "clean", "threats", "eps_sweep", "pictures"} <= set(rep)
    assert rep["data"] == {"root": rep["config"]["data"], "split": "test", "num_images": 2, "labelled": True}
    assert rep["miou_convention"] == "published" == rep["config"]["miou_convention"]
    # strong added although not asked for; paif also on one sensor at a time (per_modality default)
    assert list(rep["threats"]) == ["paif", "paif-ir-only", "paif-vis-only", "strong"]
    assert any("`strong` was added" in n for n in rep["notes"])
    assert any("overridden to 1" in n for n in rep["notes"])
    assert rep["checkpoint"]["genotype"]["channels"] == 8
    assert rep["checkpoint"]["model_options"]["seg_scale"] == 1
    for cond in [rep["clean"]] + list(rep["threats"].values()):
        seg = cond["segmentation"]
        for k in ("miou", "miou_objects", "macc"):
            assert 0.0 <= seg[k] <= 1.0
        assert list(seg["iou"]) == list(CLASSES)
        assert seg["miou_convention"] == "published" and seg["miou_by_convention"]["published"]["miou"] == seg["miou"]
        assert seg["miou_by_convention"]["present"]["miou"] >= seg["miou"]  # absent classes dropped, not 0
        assert all(v is None or 0.0 <= v <= 1.0 for v in seg["iou"].values())
        assert set(cond["fusion"]) == FUSION_KEYS
        assert all(v is None or math.isfinite(v) for v in cond["fusion"].values())
    paif = rep["threats"]["paif"]
    assert paif["eps_255"] == pytest.approx(8.0) and paif["attack_config"]["steps"] == 1
    assert rep["config"]["grid_samples"] == 2 and rep["config"]["eps_sweep"] == [0.0, 4.0, 8.0]
    assert paif["miou_drop"] == pytest.approx(rep["clean"]["segmentation"]["miou"] - paif["segmentation"]["miou"])
    assert "PGD" in paif["attack"] and "WorstCase" in rep["threats"]["strong"]["attack"]
    assert rep["threats"]["paif-ir-only"]["attack_config"]["targets"] == ["ir"]
    assert "only the infrared image" in rep["threats"]["paif-ir-only"]["description"]
    for name, pts in rep["eps_sweep"].items():
        assert [p["eps_255"] for p in pts] == [0.0, 4.0, 8.0]
        assert pts[0]["miou"] == rep["clean"]["segmentation"]["miou"]  # eps 0 is the clean run
        assert pts[2]["miou"] == rep["threats"][name]["segmentation"]["miou"]  # eps 8 is the threat itself
        assert all(0.0 <= p["miou"] <= 1.0 for p in pts)


def test_clean_miou_matches_a_direct_computation(setup, labelled_run):
    _, data, ckpt = setup
    model, _ = load_model(ckpt)
    cm = ConfusionMatrix()
    for item in RGBTDataset(data, split="test"):
        with torch.no_grad():
            cm.update(model(item["ir"][None], item["vis"][None]).logits.argmax(1), item["label"][None])
    seg = labelled_run[1]["clean"]["segmentation"]
    assert seg["miou"] == pytest.approx(cm.compute()["miou"], abs=1e-9)
    assert seg["miou_by_convention"]["present"]["miou"] == pytest.approx(cm.compute("present")["miou"], abs=1e-9)


def test_pictures_markdown_and_run_files(labelled_run):
    out, rep = labelled_run
    assert set(rep["pictures"]["grids"]) == {"paif", "paif-ir-only", "paif-vis-only", "strong"}
    for png in ["grid_paif.png", "grid_strong.png", "eps_curve.png"]:
        _valid_png(out / png)
    from trainer.report import load_grid_rows

    rows = load_grid_rows(out / "grid_strong.npz")  # the grid's rows, for comparison grids across models
    assert len(rows) == 2 * rep["config"]["grid_samples"] and rows[1]["label"].endswith("strong")
    assert rows[0]["delta"] is None and rows[1]["delta"].shape == rows[1]["pred"].shape
    md = (out / "report.md").read_text()
    for text in ["# PAIF evaluation report", "| condition | mIoU | drop", "![samples, paif](grid_paif.png)",
                 "(eps_curve.png)", "## How to read this report", "**mIoU**", "**Qabf**", "`strong` was added",
                 "mIoU convention: **published**", "Under the **present** convention"]:
        assert text in md, text
    assert (out / "config.yaml").is_file()
    assert "evaluating" in (out / "evaluate.log").read_text()


def test_sweep_threats_limits_the_sweep(setup, tmp_path):
    """sweep_threats=[paif]: the eps curve covers paif only; strong is still evaluated at its own budget."""
    base, data, ckpt = setup
    argv = ["--checkpoint", str(ckpt), "--data", str(data), "--limit", "1", "--device", "cpu", "--out",
            str(tmp_path), "--steps", "1", "--no-progress", "--eps-sweep", "0", "4", "sweep_threats=[paif]"]
    assert main(argv) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert list(rep["eps_sweep"]) == ["paif"]
    assert [p["eps_255"] for p in rep["eps_sweep"]["paif"]] == [0.0, 4.0]
    assert set(rep["threats"]) == {"paif", "paif-ir-only", "paif-vis-only", "strong"}


def test_cost_members_and_masking_checks(labelled_run):
    """Budget per threat, each member of strong alone, and the gradient-masking checks after strong."""
    out, rep = labelled_run
    strong = rep["threats"]["strong"]
    assert strong["cost"]["backward"] == 7  # 7 members x 1 step (--steps 1)
    assert strong["cost"]["masking_checks"]["forward"] == 101 + 2  # Square start + queries, scoring two results
    assert rep["threats"]["paif"]["cost"] == {"forward": 2, "backward": 1} and rep["threats"]["paif"]["seconds"] > 0
    members = strong["members"]
    assert list(members) == ["apgd-ce-bal-1", "apgd-mce-1", "apgd-msl-1", "apgd-js-1", "pgd-1", "segpgd-1", "cospgd-1"]
    # the worst case is never above any member, and the masking attacks can only lower it further
    assert strong["white_box_miou"] <= min(members.values()) + 1e-9
    assert strong["segmentation"]["miou"] <= strong["white_box_miou"] + 1e-9
    checks = {c["check"]: c for c in rep["masking"]["checks"]}
    assert list(checks) == ["loss_rise", "square", "transfer"]
    assert checks["transfer"]["status"] == "skipped"  # no surrogate configured
    assert checks["square"]["images"] == 2 and checks["square"]["status"] in ("passed", "FIRED")
    md = (out / "report.md").read_text()
    for text in ["## Attack budget and cost", "### Each attack of `strong` alone", "## One sensor attacked",
                 "## Gradient-masking checks", "| `square` |"]:
        assert text in md, text


def test_fired_check_is_a_visible_warning(labelled_run):
    from trainer.report import render_markdown

    rep = json.loads(json.dumps(labelled_run[1]))
    rep["masking"]["checks"][1].update(status="FIRED", fired_images=1)
    md = render_markdown(rep)
    assert "**⚠ Gradient-masking warning: check `square` fired** on 1 of 2 images" in md
    assert md.index("⚠") < md.index("## Segmentation under attack")  # at the top, before the tables


def test_report_says_when_the_segmenter_sees_an_upsampled_image(labelled_run):
    from trainer.report import render_markdown

    rep = json.loads(json.dumps(labelled_run[1]))
    assert "upsampled" not in render_markdown(rep)  # seg_scale 1
    rep["checkpoint"]["model_options"]["seg_scale"] = 2
    assert "segmenter MiT-b0 on the fused image upsampled x2," in render_markdown(rep)
    del rep["checkpoint"]["model_options"]  # a report written before the field existed
    assert "upsampled" not in render_markdown(rep)


def test_surrogate_transfer_check(setup, tmp_path):
    base, data, ckpt = setup
    other = init_checkpoint(base / "other.pt", genotype="paif", channels=8, seed=1)
    argv = ["--checkpoint", str(ckpt), "--data", str(data), "--limit", "1", "--device", "cpu", "--out", str(tmp_path),
            "--steps", "1", "--no-progress", "--eps-sweep", "--threat", "paif", "per_modality=[]",
            "masking.threat=paif", f"masking.surrogate={other}", "masking.queries=5"]
    assert main(argv) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    checks = {c["check"]: c for c in rep["masking"]["checks"]}
    assert checks["transfer"]["status"] in ("passed", "FIRED") and checks["transfer"]["images"] == 1
    assert rep["masking"]["config"]["transfer"]["attack"] == "worst_case"  # sea-lite on the surrogate


@pytest.mark.parametrize("extra, message", [
    (["--threat", "nosuch"], "unknown threat model 'nosuch'"),
    (["colour=1"], "unknown config key(s) colour"),
    (["sweep_threats=[a2rnet]"], "sweep_threats: expected names among the evaluated threats"),
    (["miou_convention=nan"], "miou_convention: expected one of ('published', 'present'), got 'nan'"),
    (["per_modality=[a2rnet]"], "per_modality: expected names among the evaluated threats"),
    (["masking.threat=a2rnet"], "masking.threat: expected one of the evaluated threats"),
])
def test_bad_input_gives_exit_code_2(setup, tmp_path, capsys, extra, message):
    base, data, ckpt = setup
    argv = ["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path), "--no-progress"] + extra
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint(setup, tmp_path, capsys):
    _, data, _ = setup
    assert main(["--checkpoint", str(tmp_path / "none.pt"), "--data", str(data), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not (REAL_RGBT / "vi").is_dir(), reason=f"{REAL_RGBT} not available")
def test_unlabelled_real_pairs_subprocess(setup, tmp_path):
    """The script as a user runs it, on real unlabelled pairs (resized so the test stays quick)."""
    _, _, ckpt = setup
    out = tmp_path / "real"
    cmd = [sys.executable, str(REPO / "trainer" / "evaluate.py"), "--checkpoint", str(ckpt), "--data", str(REAL_RGBT),
           "--limit", "2", "--threat", "paif", "--eps-sweep", "0", "8", "--device", "cpu", "--out", str(out),
           "--steps", "1", "resize=[96, 128]", "grid_samples=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # this checkout, not the installed one
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fused PSNR vs clean" in proc.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["labelled"] is False and rep["data"]["num_images"] == 2
    # label-free variants, no 'strong' forced, no masking checks (they need labels)
    assert list(rep["threats"]) == ["paif-fusion", "paif-fusion-ir-only", "paif-fusion-vis-only"]
    assert rep["masking"] is None
    assert rep["threats"]["paif-fusion"]["attack_config"]["loss"] == "fusion"
    assert rep["clean"]["segmentation"] is None and set(rep["clean"]["fusion"]) == FUSION_KEYS
    assert 0 < rep["threats"]["paif-fusion"]["fused_psnr"] < 100  # the attack changed the fused image
    assert rep["eps_sweep_metric"] == "fused_psnr"
    _valid_png(out / "grid_paif-fusion.png")
    _valid_png(out / "eps_curve.png")
    assert "unlabelled" in (out / "report.md").read_text()


def test_pooled_worst_case_is_never_above_any_candidate_run_alone():
    """Random per-image predictions of 3 candidates on 4 images: the pooled selection is at or below every
    candidate applied to all images (so `strong` is never above any member overall), its matrix is the sum of the
    chosen images' matrices, and an exhaustive search over all 81 assignments finds nothing more than 15 % lower."""
    import itertools

    from trainer.evaluate import PooledWorstCase
    from trainer.metrics import ConfusionMatrix

    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        label = torch.randint(0, 3, (4, 6, 6), generator=gen)
        preds = [torch.where(torch.rand(4, 6, 6, generator=gen) < 0.5, label,
                             torch.randint(0, 3, (4, 6, 6), generator=gen)) for _ in range(3)]
        pooled = PooledWorstCase(["a", "b"], num_classes=3)
        pooled.add(preds[0][:2], [p[:2] for p in preds[1:]], label[:2])  # two batches
        pooled.add(preds[0][2:], [p[2:] for p in preds[1:]], label[2:])
        cm, info = pooled.select()

        def miou(assign):
            m = ConfusionMatrix(3)
            for i, k in enumerate(assign):
                m.update(preds[k][i:i + 1], label[i:i + 1])
            return m.compute()["miou"], m.matrix

        alone = [miou([k] * 4)[0] for k in range(3)]
        assert info["miou"] <= min(alone) + 1e-12
        assert info["uniform_miou"] == pytest.approx(dict(zip(["per-image worst case", "a", "b"], alone)))
        value, matrix = miou(info["choice"])
        assert value == pytest.approx(info["miou"]) and torch.equal(cm.matrix, matrix)
        best = min(miou(a)[0] for a in itertools.product(range(3), repeat=4))
        assert best <= info["miou"] <= best + 0.15


def test_pooled_worst_case_select_follows_the_first_improvement_rule_exactly():
    """The batched select makes the same choices as the rule recorded as pooled-miou-v1, written here as a plain
    loop over ConfusionMatrix.compute: start from the lowest uniform assignment, then per image and candidate in
    order take every switch that lowers the pooled mIoU. 30 random cases of 8 images x 6 candidates, both conventions, with and without an extra start."""
    from trainer.evaluate import PooledWorstCase
    from trainer.metrics import ConfusionMatrix

    def reference(mats, convention, starts=()):
        def miou(matrix):
            cm = ConfusionMatrix(4)
            cm.matrix = matrix
            return cm.compute(convention)["miou"]

        n, c = mats.shape[:2]
        uniform = [miou(mats[:, k].sum(0)) for k in range(c)]
        first = min(range(c), key=lambda k: (uniform[k], k))
        choice, best = [first] * n, uniform[first]
        for start in starts:
            value = miou(mats[torch.arange(n), torch.as_tensor(start)].sum(0))
            if value < best:
                choice, best = list(start), value
        total = mats[torch.arange(n), torch.as_tensor(choice)].sum(0)
        for _ in range(5):
            improved = False
            for i in range(n):
                for k in range(c):
                    if k != choice[i]:
                        cand = total - mats[i, choice[i]] + mats[i, k]
                        value = miou(cand)
                        if value < best - 1e-12:
                            total, best, choice[i], improved = cand, value, k, True
            if not improved:
                break
        return choice, best, total

    gen = torch.Generator().manual_seed(1)
    switched = 0
    for trial in range(30):
        label = torch.randint(0, 4, (8, 5, 5), generator=gen)
        preds = [torch.where(torch.rand(8, 5, 5, generator=gen) < 0.4, label,
                             torch.randint(0, 4, (8, 5, 5), generator=gen)) for _ in range(6)]
        pooled = PooledWorstCase(["a", "b", "c", "d", "e"], num_classes=4)
        pooled.add(preds[0], preds[1:], label)
        convention = ("published", "present")[trial % 2]
        starts = [[k % 6 for k in range(trial, trial + 8)]] if trial % 3 == 0 else []
        cm, info = pooled.select(convention, starts=starts)
        choice, best, total = reference(torch.stack(pooled.mats), convention, starts)
        assert info["choice"] == choice
        assert info["miou"] == pytest.approx(best, abs=1e-12)
        assert torch.equal(cm.matrix, total)
        switched += len(set(choice)) > 1
    assert switched >= 10  # the cases exercise the switching loop, not only uniform assignments
