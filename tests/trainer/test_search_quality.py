"""The search-quality comparison: arm kinds, rank and targets against hand-computed numbers, best-random selection
on the validation split, job reuse, config checks, the report files, and (slow) the whole command at --tiny size."""
from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from trainer.config import ConfigError, load_config
from trainer.experiment import (ExperimentConfig, Job, plan, reuse_job, searched_space, select_best_random,
                                tiny_runs)
from trainer.search_quality import arm_kinds, rank_among, search_targets, signal_noise, write_search_quality

SEARCHES = {"s-rob": {"config": {"w_arch": 0.5, "seed": 0, "epochs": 4, "warmup_epochs": 1, "max_train_batches": 5,
                                 "arch_lr": 0.02},
                      "epoch": 4, "complete": True, "architecture": {"ir/op1": "a", "ir/op2": "b", "rule": "add"},
                      "cost": {"cpu_minutes": 12.5},
                      "convergence": {"argmax_last_changed": 3, "stable_epochs": 1, "mean_entropy_norm": 0.6,
                                      "top": {"ir/op1": 0.5, "ir/op2": 0.3, "rule": 0.4},
                                      "light_share": [1, 2]}},
            "s-cln": {"config": {"w_arch": 0.0, "seed": 0}, "epoch": 4, "complete": True,
                      "architecture": {"ir/op1": "a", "ir/op2": "c", "rule": "max"}, "convergence": {}}}


def _r(label: str, spec: str, seed: int, clean: float, strong: float) -> dict:
    return {"job": {"label": label, "genotype": spec, "mode": "aat", "seed": seed, "overrides": []},
            "clean": clean, "strong": strong,
            "genotype": {"ir": ["dense_k3_d1", "sepconv_k3"], "vis": ["eca_k3", "eca_k3"],
                         "fused": ["sepconv_k5", "residual_k3_d1"], "rule": "add", "channels": 16, "version": 1}}


RESULTS = [
    _r("robust", "s-rob", 0, 0.60, 0.30), _r("robust", "s-rob", 1, 0.62, 0.26),
    _r("clean", "s-cln", 0, 0.63, 0.22), _r("paif", "paif", 0, 0.61, 0.20),
    _r("random 0", "random:0", 0, 0.55, 0.18), _r("random 1", "random:1", 0, 0.58, 0.25),
    _r("random 2", "random:2", 0, 0.50, 0.29),
    _r("best random", "best-random", 0, 0.50, 0.29), _r("best random", "best-random", 1, 0.52, 0.27),
]


def test_arm_kinds_follow_the_genotype_spec_and_the_search_objective():
    kinds = arm_kinds(RESULTS, SEARCHES)
    assert kinds == {"robust": "robust", "clean": "clean", "paif": "reference", "random 0": "random",
                     "random 1": "random", "random 2": "random", "best random": "best-random"}


def test_rank_among():
    assert rank_among(0.5, [0.1, 0.6, 0.4]) == (2, 2)
    assert rank_among(0.7, [0.1, 0.6]) == (1, 2)
    assert rank_among(0.6, [0.6]) == (1, 0)  # a tie is not beaten and does not rank above


def test_targets_against_hand_computed_numbers():
    summary, targets = search_targets(RESULTS, arm_kinds(RESULTS, SEARCHES), "strong")
    assert summary["robust_mean"] == pytest.approx(0.28)
    assert summary["robust_std"] == pytest.approx(math.sqrt(2 * 0.02 ** 2))  # sample std of 0.30, 0.26
    assert summary["randoms"] == [0.18, 0.25, 0.29] and summary["random_median"] == 0.25
    assert (summary["rank"], summary["of"], summary["beats"]) == (2, 4, 2)  # random 2 (0.29) is above 0.28
    assert summary["best_random_mean"] == pytest.approx(0.28)
    by = {t["id"]: t for t in targets}
    assert by["above_every_random"]["holds"] is False
    # 0.28 - 0.25 = 0.03 > spread max(0.0283, 0.0141)
    assert by["above_median_by_spread"]["holds"] is True
    assert by["above_median_by_spread"]["value"][1] == pytest.approx(math.sqrt(2 * 0.02 ** 2))
    assert by["robust_vs_clean"]["holds"] is True  # 0.28 > 0.22
    _, missing = search_targets([r for r in RESULTS if r["job"]["label"] != "robust"],
                                arm_kinds(RESULTS, SEARCHES), "strong")
    assert all(t["holds"] is None for t in missing)


def test_signal_noise_against_hand_computed_numbers():
    noise = signal_noise(RESULTS, arm_kinds(RESULTS, SEARCHES), "strong")
    # randoms 0.18, 0.25, 0.29: mean 0.24, sample variance (0.0036 + 0.0001 + 0.0025) / 2 = 0.0031
    assert noise["between"] == pytest.approx(math.sqrt(0.0031))
    # seeds: robust 0.30 / 0.26 (variance 0.0008), best random 0.29 / 0.27 (0.0002); pooled over 2 dof
    assert noise["within"] == pytest.approx(math.sqrt(0.0005)) and noise["within_dof"] == 2
    assert noise["genotype_std"] == pytest.approx(math.sqrt(0.0026))
    assert noise["ratio"] == pytest.approx(math.sqrt(0.0031 / 0.0005))
    assert (noise["random_min"], noise["random_max"], noise["n_random"]) == (0.18, 0.29, 3)
    # seed noise larger than the genotypes' spread: nothing left for the architecture
    flat = [r for r in RESULTS if r["job"]["label"] != "random 0"] + [_r("robust", "s-rob", 2, 0.6, 0.40)]
    assert signal_noise(flat, arm_kinds(flat, SEARCHES), "strong")["genotype_std"] == 0.0
    single = [r for r in RESULTS if r["job"]["label"] in ("random 0", "random 1", "paif")]
    noise = signal_noise(single, arm_kinds(single, SEARCHES), "strong")
    assert math.isnan(noise["within"]) and math.isnan(noise["ratio"]) and noise["within_dof"] == 0


def test_report_without_repeated_seeds_shows_dashes_not_nan(tmp_path):
    cfg = load_config(ExperimentConfig, None, ["report=search_quality", "threats=[strong]", "channels=16"])
    single = [r for r in RESULTS if r["job"]["label"] in ("random 0", "random 1", "paif")]
    md = write_search_quality(cfg, tmp_path, single, {}, None, 1.0).read_text()
    assert "between / within = –" in md and "nan" not in md


def test_report_files(tmp_path):
    cfg = load_config(ExperimentConfig, None, ["report=search_quality", "threats=[strong]", "channels=16",
                                               "searches={s-rob: [w_arch=0.5], s-cln: [w_arch=0]}",
                                               "stability=[s-rob,s-cln]"])
    (tmp_path / "searches" / "s-rob").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "searches" / "s-rob" / "alpha.png")
    selection = {"split": "val", "threat": "strong", "limit": 16, "best": {"label": "random 2", "genotype": "random:2"},
                 "values": {"random 0": {"miou": 0.1}, "random 1": {"miou": 0.2}, "random 2": {"miou": 0.3}}}
    path = write_search_quality(cfg, tmp_path, RESULTS, SEARCHES, selection, 60.0)
    md = path.read_text()
    assert "ranks **2 of 4**" in md and "| robust-searched above clean-searched under `strong` | 28.0 / 22.0 | yes |" in md
    assert "agree on 1 of 3 slots (differ: ir/op2, rule)" in md
    assert "| s-rob | 0.5 | 0 | 12.5 | 4/4 (1) | 15 | 0.02 | 3 | 0.600 | 0.30–0.50 | 1/2 |" in md
    assert "**random 2**" in md and "![alpha s-rob](alpha_s-rob.png)" in md
    # paired per seed against best random: strong +1.0 / -1.0, clean +10.0 / +10.0
    assert "(s0, s1), robust-searched − best random under `strong`: +1.0 / -1.0 = **+0.0 ± 1.4**; clean +10.0 ± 0.0" in md
    assert "span 18.0–29.0 (std 5.6, one seed each)" in md and "varies by 2.2 (pooled std, 2 degrees" in md
    assert (tmp_path / "alpha_s-rob.png").is_file()
    with Image.open(tmp_path / "scatter.png") as im:
        assert im.format == "PNG" and im.size[0] > 400
    data = json.loads((tmp_path / "search_quality.json").read_text())
    assert data["rank"]["rank"] == 2 and data["stability"]["agree"] == 1
    assert data["paired_vs_best_random"]["strong"]["diffs"] == pytest.approx([0.01, -0.01])
    assert data["signal_noise"]["within_dof"] == 2


def test_select_best_random_uses_the_validation_reports_and_caches(tmp_path):
    cfg = load_config(ExperimentConfig, None, ["seeds=[0,1]"])
    for label, miou in (("random 0", 0.2), ("random 1", 0.4)):
        key = Job(label, "x", "aat", 0).key
        (tmp_path / "jobs" / key / "val_eval").mkdir(parents=True)
        (tmp_path / "jobs" / key / "val_eval" / "report.json").write_text(json.dumps(
            {"clean": {"segmentation": {"miou": 0.9}}, "threats": {"strong": {"segmentation": {"miou": miou}}}}))
    results = [_r("random 0", "random:0", 0, 0.5, 0.1), _r("random 1", "random:1", 0, 0.5, 0.1),
               _r("random 1", "random:1", 1, 0.5, 0.9), _r("paif", "paif", 0, 0.5, 0.9)]
    sel = select_best_random(cfg, tmp_path, results)
    assert sel["best"] == {"label": "random 1", "genotype": "random:1"} and sel["split"] == "val"
    assert sel["values"]["random 0"]["miou"] == 0.2
    assert json.loads((tmp_path / "selection.json").read_text()) == sel
    with pytest.raises(RuntimeError, match="random:<seed> arms"):
        select_best_random(cfg, tmp_path / "other", [_r("paif", "paif", 0, 0.5, 0.9)])


@pytest.mark.parametrize("threat", ["strong", "paif", "clean"])
def test_selection_evaluation_arguments_pass_evaluates_config_checks(tmp_path, threat):
    """The command select_best_random runs must load in trainer/evaluate.py (a per_modality threat that is not
    evaluated failed there once, after 12 trained arms)."""
    from trainer import evaluate
    from trainer.experiment import selection_eval_args

    cfg = load_config(ExperimentConfig, "configs/search_eval.yaml", [f"selection.threat={threat}"])
    args = selection_eval_args(cfg, "ckpt.pt", tmp_path, tmp_path / "val_eval", 0)
    ecfg = evaluate.load_command_config(evaluate.EvaluateConfig, evaluate.parse_args, args)
    assert ecfg.split == "val" and ecfg.limit == cfg.selection.limit and ecfg.per_modality == []
    assert ecfg.threats == ["paif" if threat == "clean" else threat] and ecfg.eps_sweep == []


def test_reuse_job_copies_the_chosen_arm_under_the_new_label(tmp_path):
    src = Job("random 1", "random:1", "aat", 0)
    (tmp_path / "jobs" / src.key).mkdir(parents=True)
    (tmp_path / "jobs" / src.key / "done.json").write_text(json.dumps(_r("random 1", "random:1", 0, 0.5, 0.3)))
    job = Job("best random", "best-random", "aat", 0)
    got = reuse_job(job, src, tmp_path)
    assert got["job"]["label"] == "best random" and got["reused_from"] == src.key and got["strong"] == 0.3
    assert json.loads((tmp_path / "jobs" / job.key / "done.json").read_text()) == got
    assert reuse_job(Job("best random", "best-random", "aat", 1), src, tmp_path) is None  # another seed
    assert reuse_job(Job("best random", "best-random", "clean", 0), src, tmp_path) is None  # another recipe


def test_config_checks():
    with pytest.raises(ConfigError, match="stability"):
        load_config(ExperimentConfig, None, ["searches={a: []}", "stability=[a,b]"])
    with pytest.raises(ConfigError, match="searches"):
        load_config(ExperimentConfig, None, ["searches={baseline: []}"])
    with pytest.raises(ConfigError, match="selection.split"):
        load_config(ExperimentConfig, None, ["selection.split=test"])
    with pytest.raises(ConfigError, match="report"):
        load_config(ExperimentConfig, None, ["report=nope"])


def test_search_eval_config_plan_and_space():
    cfg = load_config(ExperimentConfig, "configs/search_eval.yaml", [])
    jobs = plan(cfg)
    randoms = {j.genotype for j in jobs if j.genotype.startswith("random:")}
    assert len(randoms) >= 6
    seeds = {g: sorted(j.seed for j in jobs if j.genotype == g) for g in ("searched-robust", "best-random", "paif")}
    assert seeds == {"searched-robust": [0, 1, 2], "best-random": [0, 1, 2], "paif": [0]}
    candidates, rules, steps = searched_space(cfg)
    assert len(candidates) == 11 and len(rules) == 6 and steps == 2
    tiny = tiny_runs(load_config(ExperimentConfig, "configs/search_eval.yaml", []))
    assert sum(r[1].startswith("random:") for r in tiny.runs) == 2 and len(tiny.runs) == len(cfg.runs) - 4
    bad = load_config(ExperimentConfig, "configs/search_eval.yaml",
                      ['searches={a: ["space.steps=3"], b: ["space.steps=2"]}', "stability=[]"])
    with pytest.raises(ConfigError, match="one search space"):
        searched_space(bad)


@pytest.mark.slow
def test_search_eval_end_to_end_tiny_and_resumable(tmp_path):
    """The whole command at --tiny size: 3 searches, 6 arms + best random (seed 0 reused), report; a rerun redoes
    nothing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "se"
    cmd = [sys.executable, "-m", "trainer.experiment", "--config", "configs/search_eval.yaml", "--tiny", "--out",
           str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    md = (out / "search_quality.md").read_text()
    assert "## Rank of the searched genotype" in md and "**Stability**" in md
    sel = json.loads((out / "selection.json").read_text())
    assert set(sel["values"]) == {"random 0", "random 1"} and sel["split"] == "val"
    best0 = json.loads((out / "jobs" / "best-random-s0" / "done.json").read_text())
    assert best0["reused_from"] == Job(sel["best"]["label"], "", "aat", 0).key
    assert (out / "jobs" / "best-random-s1" / "done.json").is_file()
    for name in ("searched-robust", "searched-clean", "searched-robust-s1"):
        res = json.loads((out / "searches" / name / "search_result.json").read_text())
        assert res["complete"] and [h["arch"] for h in res["history"]] == [False, True]
        assert res["config"]["init_from"].startswith(str(out / "cache" / "segformer-"))
    data = json.loads((out / "search_quality.json").read_text())
    assert data["kinds"]["robust-searched"] == "robust" and data["kinds"]["clean-searched"] == "clean"
    assert (out / "scatter.png").is_file() and (out / "alpha_searched-robust.png").is_file()
    logs = {p: p.read_text() for p in (out / "jobs").glob("*/job.log")}
    again = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.read_text() for p in (out / "jobs").glob("*/job.log")} == logs  # nothing retrained or re-evaluated
