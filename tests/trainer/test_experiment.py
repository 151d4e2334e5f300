"""trainer.experiment: job plan, statistics over seeds, table and plot (the jobs themselves are retrain + evaluate,
tested in their own modules)."""
from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
from PIL import Image

from trainer.config import ConfigError, load_config
from trainer.experiment import (ExperimentConfig, aggregate, check_claims, cost_summary, extract, finished_note, main,
                                mean_std, paired_differences, plan, plot_curves, render_table, run_order,
                                sweep_pairs, write_outputs)


def _result(label: str, seed: int, clean: float, paif: float) -> dict:
    return {"job": {"label": label, "genotype": "paif", "mode": "aat", "seed": seed}, "clean": clean, "paif": paif,
            "curves": {"paif": [[0.0, clean], [8.0, paif]]}}


def test_mean_std_is_the_sample_std():
    vals = [0.31, 0.42, 0.37]
    m, s = mean_std(vals)
    assert m == pytest.approx(statistics.mean(vals)) and s == pytest.approx(statistics.stdev(vals))
    assert mean_std([0.5]) == (0.5, 0.0)
    assert mean_std([float("nan"), 0.2]) == (0.2, 0.0)
    assert all(math.isnan(x) for x in mean_std([]))


def test_aggregate_groups_by_label_in_first_seen_order():
    res = [_result("b", 0, 0.5, 0.1), _result("a", 0, 0.4, 0.3), _result("b", 1, 0.7, 0.3)]
    rows = aggregate(res, ["clean", "paif"])
    assert [r["label"] for r in rows] == ["b", "a"]
    assert rows[0]["seeds"] == [0, 1]
    assert rows[0]["stats"]["clean"] == pytest.approx((0.6, statistics.stdev([0.5, 0.7])))
    table = render_table(rows, ["clean", "paif"])
    assert "| b | 2 | 60.0 ± 14.1 | 20.0 ± 14.1 |" in table
    assert "| a | 1 | 40.0 | 30.0 |" in table  # one seed: no spread shown


def test_plan_seeds_outermost_and_unique_keys():
    cfg = load_config(ExperimentConfig, overrides=["seeds=[3,4]", 'runs=[["a","paif","clean"],["b","paif","aat"]]'])
    jobs = plan(cfg)
    assert [(j.label, j.seed) for j in jobs] == [("a", 3), ("b", 3), ("a", 4), ("b", 4)]
    assert len({j.key for j in jobs}) == len(jobs)


def test_run_order_resumes_begun_jobs_then_adversarial_arms_first_within_a_seed(tmp_path):
    cfg = load_config(ExperimentConfig, overrides=[
        "seeds=[0,1]", 'runs=[["n","paif","clean"],["a","paif","aat"],["t","paif","at"],["i","paif","clean","1"]]'])
    jobs = plan(cfg)
    keys = lambda js: [j.key for j in js]  # noqa: E731
    assert keys(jobs) == ["n-s0", "a-s0", "t-s0", "i-s0", "n-s1", "a-s1", "t-s1"]
    assert keys(run_order(jobs, tmp_path)) == ["a-s0", "t-s0", "n-s0", "i-s0", "a-s1", "t-s1", "n-s1"]
    # begun by an earlier invocation: an interrupted training (resume.ckpt) or a trained, unevaluated arm
    (tmp_path / "jobs" / "n-s1" / "train" / "run-1").mkdir(parents=True)
    (tmp_path / "jobs" / "n-s1" / "train" / "run-1" / "resume.ckpt").write_bytes(b"")
    (tmp_path / "jobs" / "t-s1").mkdir(parents=True)
    (tmp_path / "jobs" / "t-s1" / "train_done.json").write_text("{}")
    (tmp_path / "jobs" / "a-s1" / "train").mkdir(parents=True)  # a folder alone is no progress
    assert keys(run_order(jobs, tmp_path)) == ["t-s1", "n-s1", "a-s0", "t-s0", "n-s0", "i-s0", "a-s1"]
    assert sorted(keys(run_order(jobs, tmp_path))) == sorted(keys(jobs))


def test_plan_a_run_may_use_only_the_first_seeds():
    cfg = load_config(ExperimentConfig, overrides=["seeds=[0,1,2]", 'runs=[["a","paif","aat"],["b","baseline","aat","1"]]'])
    assert [(j.label, j.seed) for j in plan(cfg)] == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]


def test_bad_run_triple_is_a_config_error(capsys):
    with pytest.raises(ConfigError, match="expected \\[label, genotype, mode, \\(n_seeds\\)"):
        plan(load_config(ExperimentConfig, overrides=['runs=[["only label"]]']))
    with pytest.raises(ConfigError, match="'uniform' is neither a seed count nor key=value"):
        plan(load_config(ExperimentConfig, overrides=['runs=[["a","paif","aat","uniform"]]']))
    with pytest.raises(ConfigError, match="expected distinct labels"):
        plan(load_config(ExperimentConfig, overrides=['runs=[["A a","paif","aat"],["a-A","paif","clean"]]']))
    assert main(["--plan", "colour=1"]) == 2
    assert "unknown config key(s) colour" in capsys.readouterr().err


def test_plan_flag_lists_jobs(capsys):
    assert main(["--plan", "seeds=[0]"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[0] == "no-aat-s0" and len(lines) == len(ExperimentConfig().runs)
    assert main(["--plan"]) == 0  # default: 3 seeds of the 4 training modes, 1 seed of IR-only and VIS-only
    assert len(capsys.readouterr().out.strip().splitlines()) == 3 * 4 + 2


def test_plan_carries_per_run_overrides():
    cfg = load_config(ExperimentConfig, overrides=[
        "seeds=[0,1]", 'runs=[["AAT, uniform eps","paif","aat","aat.prob_mode=uniform"],["IR","paif","clean","1","inputs=ir"]]'])
    jobs = plan(cfg)
    assert [(j.key, j.overrides) for j in jobs] == [("aat-uniform-eps-s0", ("aat.prob_mode=uniform",)),
                                                    ("ir-s0", ("inputs=ir",)),
                                                    ("aat-uniform-eps-s1", ("aat.prob_mode=uniform",))]


def test_paired_differences_and_claims():
    def r(label, seed, clean, strong):
        return {"job": {"label": label, "seed": seed}, "clean": clean, "strong": strong}

    res = [r("no AAT", 0, 0.80, 0.10), r("no AAT", 1, 0.78, 0.05), r("AAT", 0, 0.79, 0.40), r("AAT", 1, 0.74, 0.30),
           r("AAT", 2, 0.70, 0.20), r("plain AT", 0, 0.70, 0.35), r("plain AT", 1, 0.72, 0.36),
           r("IR only / no AAT", 0, 0.50, 0.0), r("VIS only / no AAT", 0, 0.81, 0.0)]
    d = paired_differences(res, "AAT", "no AAT", "strong")
    assert d["seeds"] == [0, 1] and d["diffs"] == pytest.approx([0.30, 0.25])  # seed 2 has no partner
    assert d["mean"] == pytest.approx(0.275) and d["std"] == pytest.approx(statistics.stdev([0.30, 0.25]))
    claims = {c["id"]: c for c in check_claims(res, "strong")}
    assert claims["aat_vs_none"]["holds"] is True
    assert claims["clean_cost"]["value"] == pytest.approx(0.025) and claims["clean_cost"]["holds"]
    at = claims["aat_vs_at"]  # AAT − AT per seed: strong +0.05, -0.06; clean +0.09, +0.02
    assert at["value"] == pytest.approx([-0.005, 0.055]) and at["holds"] is False
    assert claims["fused_vs_ir"]["holds"] is True
    assert claims["fused_vs_vis"]["holds"] is False
    assert all(c["holds"] is None for c in check_claims([], "strong"))


def test_paired_differences_along_the_eps_sweep(tmp_path):
    """Per ε the same pairing as the tables (seeds both runs have), only at the ε both curves share; the report
    gets one row per pair and the JSON every seed's difference."""
    def r(label, seed, curve):
        return {"job": {"label": label, "genotype": "paif", "mode": "aat", "seed": seed}, "clean": curve[0][1],
                "paif": curve[-1][1], "curves": {"paif": curve}}

    res = [r("AAT", 0, [[0.0, 0.70], [2.0, 0.60], [8.0, 0.40]]), r("AAT", 1, [[0.0, 0.72], [2.0, 0.58], [8.0, 0.36]]),
           r("AAT", 2, [[0.0, 0.9], [2.0, 0.9], [8.0, 0.9]]),  # no partner for seed 2
           r("plain AT", 0, [[0.0, 0.69], [2.0, 0.55], [4.0, 0.5], [8.0, 0.42]]),
           r("plain AT", 1, [[0.0, 0.70], [2.0, 0.56], [4.0, 0.5], [8.0, 0.40]])]
    sweep = sweep_pairs(res, [["AAT", "plain AT"], ["AAT", "absent"]], "paif")
    assert list(sweep) == ["AAT − plain AT"]  # a pair without data has no row
    per = sweep["AAT − plain AT"]
    assert list(per) == [0.0, 2.0, 8.0]  # 4/255 only in one run's curve
    assert per[2.0]["seeds"] == [0, 1] and per[2.0]["diffs"] == pytest.approx([0.05, 0.02])
    assert per[8.0]["mean"] == pytest.approx(-0.03) and per[8.0]["std"] == pytest.approx(statistics.stdev([-0.02, -0.04]))
    cfg = load_config(ExperimentConfig, overrides=["threats=[paif]", "sweep_threats=[paif]",
                                                   'pairs=[["AAT","plain AT"]]'])
    md = write_outputs(cfg, tmp_path, [x | {"clean_objects": 0.5, "paif_objects": 0.3} for x in res], None, 1.0
                       ).read_text()
    assert "| pair | seeds | ε 0/255 | ε 2/255 | ε 8/255 |" in md
    assert "| AAT − plain AT | s0, s1 | +1.5 ± 0.7 | +3.5 ± 2.1 | -3.0 ± 1.4 |" in md
    saved = json.loads((tmp_path / "results.json").read_text())["paired_sweep"]
    assert saved["threat"] == "paif" and saved["pairs"]["AAT − plain AT"]["2"]["diffs"] == pytest.approx([0.05, 0.02])


def test_extract_reads_an_evaluation_report():
    seg = {"miou": 0.4, "miou_objects": 0.3}
    report = {"clean": {"segmentation": seg},
              "threats": {"paif": {"segmentation": {"miou": 0.2, "miou_objects": 0.1}}},
              "eps_sweep": {"paif": [{"eps_255": 0.0, "miou": 0.4}, {"eps_255": 8.0, "miou": 0.2}]}}
    assert extract(report) == {"clean": 0.4, "clean_objects": 0.3, "paif": 0.2, "paif_objects": 0.1,
                               "curves": {"paif": [[0.0, 0.4], [8.0, 0.2]]}, "iou": {"clean": {}, "paif": {}},
                               "fusion": {}}


def test_outputs_table_json_and_plot(tmp_path):
    cfg = load_config(ExperimentConfig, overrides=["threats=[paif]", "sweep_threats=[paif]"])
    res = [_result("x", s, 0.5 + 0.1 * s, 0.2) | {"clean_objects": 0.4, "paif_objects": 0.1} for s in range(3)]
    md = write_outputs(cfg, tmp_path, res, {"rule": "max"}, 60.0).read_text()
    assert "| x | 3 | 60.0 ± 10.0 | 20.0 ± 0.0 |" in md
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["summary"][0]["clean"]["mean"] == pytest.approx(0.6)
    with Image.open(tmp_path / "miou_vs_eps.png") as im:
        assert im.format == "PNG" and im.size[0] > 400
    plot_curves(res, "nosuch", tmp_path / "empty.png")  # no curve for that threat: an empty plot, no crash


def test_cost_replays_the_arms_in_run_order_after_the_warm_start(tmp_path):
    """Arm times add up; the wall-time estimate replays them seed by seed, adversarial arms first, on the workers
    (by hand: worker 1 takes s0-adv 150 s, worker 2 s0-clean 50 s then s1-adv 180 s -> 230 s), after the warm start
    (a segmenter shared by two genotypes counts once: 500 s, + 40 + 60 s of fusion warm-ups)."""
    def arm(label, mode, seed, train, ev):
        return {"job": {"label": label, "genotype": "paif", "mode": mode, "seed": seed}, "train_seconds": train,
                "eval_seconds": ev, "clean": 0.5, "paif": 0.2, "curves": {"paif": [[0.0, 0.5], [8.0, 0.2]]}}

    res = [arm("clean", "clean", 0, 30, 20), arm("adv", "aat", 1, 120, 60), arm("adv", "aat", 0, 100, 50)]
    seg = {"recipe": {"steps": 2000}, "seconds": 500.0}
    starts = {"paif": {"segmenter": seg, "fusion_seconds": 40.0}, "other": {"segmenter": seg, "fusion_seconds": 60.0}}
    cost = cost_summary(res, starts, workers=2)
    assert cost["arm_s"] == 380 and cost["train_s"] == 250 and cost["eval_s"] == 130
    assert cost["warm_start_s"] == 600 and cost["estimated_wall_s"] == 600 + 230
    assert cost_summary(res, {}, workers=1)["estimated_wall_s"] == 380  # one worker: the sum
    cfg = load_config(ExperimentConfig, overrides=["threats=[paif]", "sweep_threats=[paif]", "workers=2"])
    md = write_outputs(cfg, tmp_path, res, None, 60.0, extras={"warm_start": starts}).read_text()
    assert "| adv | 2 | 110 | 55 |" in md and "| clean | 1 | 30 | 20 |" in md
    assert "on 2 workers after the warm start, these arms take **≈ 0.2 h**" in md
    assert json.loads((tmp_path / "results.json").read_text())["cost"]["estimated_wall_s"] == 830


TINY = ["seeds=[0]", "workers=1", "channels=4", "threats=[paif]", "sweep_threats=[paif]", "eps_sweep=[0,8]",
        "eval_batch_size=2", "data.size=[32,48]", "data.n_train=4", "data.n_val=2", "data.n_test=2",
        'runs=[["no AAT","paif","clean"],["AAT","paif","aat"]]',
        'warmstart=["seg.steps=2","seg.batch_size=2","fusion.steps=1","fusion.batch_size=2","fusion.crop=[24,32]"]',
        'retrain=["max_steps=2","data.batch_size=2","data.val_limit=1","val.attack_steps=1","val.num_images=0",'
        '"aat.meta_iters=1","aat.inner_steps=1","attack.steps=1","save_every_steps=1"]']


@pytest.mark.slow
def test_experiment_resumes_per_arm_after_kill(tmp_path):
    """Kill -9 the experiment once its first arm is done: the rerun finishes the rest and never redoes that arm."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "trainer.experiment", "--out", str(out), *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = out / "jobs" / "no-aat-s0" / "done.json"
    deadline = time.time() + 600
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert first.is_file(), "the first arm did not finish"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.md").is_file()
    before = (first.read_text(), first.stat().st_mtime_ns)
    # an arm's training time is its checkpoint's (over every invocation of the retraining), within the wall time
    arm = json.loads(first.read_text())
    from trainer.checkpoint import load_checkpoint

    recorded = load_checkpoint(arm["checkpoint"])["state"]["train_seconds"]  # --out is absolute here
    assert 0 < arm["train_seconds"] == recorded <= arm["train_wall_seconds"]

    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (first.read_text(), first.stat().st_mtime_ns) == before
    log = (out / "jobs" / "no-aat-s0" / "job.log").read_text()
    assert log.count("trainer/retrain.py") == 1 and log.count("trainer/evaluate.py") == 1
    assert (out / "jobs" / "aat-s0" / "done.json").is_file()
    results = json.loads((out / "results.json").read_text())
    assert [j["job"]["label"] for j in results["jobs"]] == ["no AAT", "AAT"]
    assert results["warm_start"]["paif"]["start"].startswith(str(out / "cache"))
    from trainer.warmstart import start_weights_sha256  # each arm names the start it was retrained from

    start = results["warm_start"]["paif"]["start"]
    assert {json.dumps(j["start"]) for j in results["jobs"]} == {json.dumps(
        {"file": Path(start).name, "weights_sha256": start_weights_sha256(start)})}
    md = (out / "results.md").read_text()
    assert "## Claims tested" in md and "max rule `max(IR, Y)`" in md
    assert "![no AAT vs AAT, clean and under paif](grid.png)" in md and (out / "grid.png").stat().st_size > 10_000

    # an arm evaluated under an older definition of a threat (here: another step count of `paif`) is evaluated
    # again on the next run, its training kept; an arm evaluated under the current definitions is left alone
    stored = json.loads(first.read_text())
    assert stored["threat_specs"]["paif"]["steps"] == 5
    stored["threat_specs"]["paif"]["steps"] = 4
    first.write_text(json.dumps(stored))
    other = out / "jobs" / "aat-s0" / "done.json"
    other_before = (other.read_text(), other.stat().st_mtime_ns)
    again = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    log = (out / "jobs" / "no-aat-s0" / "job.log").read_text()
    assert log.count("trainer/retrain.py") == 1 and log.count("trainer/evaluate.py") == 2
    redone = json.loads(first.read_text())
    assert redone["threat_specs"]["paif"]["steps"] == 5 and redone["train_seconds"] == stored["train_seconds"]
    assert (other.read_text(), other.stat().st_mtime_ns) == other_before

    # --archive: the finished arms' result files and their start, no checkpoints; another machine (another --out,
    # holding only the archive's cache/ and jobs/) continues the run without training or evaluating anything again
    arch = tmp_path / "archive"
    archived = subprocess.run([*cmd, "--archive", str(arch)], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=300)
    assert archived.returncode == 0, archived.stderr[-2000:]
    assert "archived 2 of 2 finished arms and 1 start(s)" in archived.stderr
    files = sorted(str(p.relative_to(arch)) for p in arch.rglob("*") if p.is_file())
    assert [f for f in files if f.endswith(".pt")] == [f"cache/{Path(start).name}"]
    assert {"jobs/no-aat-s0/done.json", "jobs/aat-s0/eval/report.json", "jobs/aat-s0/eval/grid_paif.npz",
            "results.md", "results.json", "config.yaml"} <= set(files)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for part in ("cache", "jobs"):
        shutil.copytree(arch / part, elsewhere / part)
    moved = subprocess.run([sys.executable, "-m", "trainer.experiment", "--out", str(elsewhere), *TINY], cwd=repo,
                           env=env, capture_output=True, text=True, timeout=600)
    assert moved.returncode == 0, moved.stderr[-2000:]
    assert not list((elsewhere / "jobs").glob("*/job.log")) and not list((elsewhere / "cache").glob("segformer-*"))
    table = [{k: v for k, v in j.items() if k in ("job", "clean", "paif", "start")}
             for j in json.loads((out / "results.json").read_text())["jobs"]]
    assert [{k: v for k, v in j.items() if k in ("job", "clean", "paif", "start")}
            for j in json.loads((elsewhere / "results.json").read_text())["jobs"]] == table


def test_report_only_rebuilds_tables_from_finished_jobs(tmp_path, capsys):
    out = tmp_path / "exp"
    args = ["--out", str(out), "seeds=[0,1]", "threats=[paif]", "sweep_threats=[paif]",
            'runs=[["no AAT","paif","clean"],["AAT","paif","aat"]]']
    assert main(["--report", *args]) == 2 and "no finished job" in capsys.readouterr().err
    for key, label, clean in (("no-aat-s0", "no AAT", 0.7), ("aat-s0", "AAT", 0.6)):
        (out / "jobs" / key).mkdir(parents=True)
        (out / "jobs" / key / "done.json").write_text(json.dumps(
            {**_result(label, 0, clean, 0.3), "iou": {"clean": {"car": clean}}}))
    assert main(["--report", *args]) == 0
    md = (out / "results.md").read_text()
    assert "**Partial: 2 of 4 jobs finished**" in md and "| AAT − no AAT | clean | s0: -10.0 | -10.0 (one seed) |" in md
    assert "(Picture grid no AAT vs AAT: needs both runs' `eval/grid_paif.npz`" in md  # no evaluation folders here
    assert main(["--report", *args[:2], "seeds=[0]", *args[3:]]) == 0  # every planned job finished
    md = (out / "results.md").read_text()
    assert "All 2 of 2 jobs finished (tables rebuilt with `--report`, so no wall time)" in md and "Partial" not in md


def test_archive_refuses_without_finished_arms_or_their_start(tmp_path, capsys):
    out, dest = tmp_path / "exp", tmp_path / "archive"
    args = ["--out", str(out), "--archive", str(dest), "seeds=[0]", "threats=[paif]", "sweep_threats=[paif]",
            'runs=[["no AAT","paif","clean"]]']
    assert main(args) == 2 and "no finished job" in capsys.readouterr().err
    (out / "jobs" / "no-aat-s0").mkdir(parents=True)
    (out / "jobs" / "no-aat-s0" / "done.json").write_text(json.dumps(
        {**_result("no AAT", 0, 0.7, 0.3), "start": {"file": "start-aaaa.pt", "weights_sha256": "1" * 64}}))
    assert main(args) == 2
    assert f"retrained from start-aaaa.pt, not found (with its .json record) in {out / 'cache'}" in \
        capsys.readouterr().err
    assert not dest.exists()
    (out / "cache").mkdir()
    (out / "cache" / "start-aaaa.pt").write_bytes(b"weights")
    (out / "cache" / "start-aaaa.json").write_text("{}")
    assert main(args) == 0
    assert (dest / "cache" / "start-aaaa.pt").read_bytes() == b"weights"
    assert json.loads((dest / "jobs" / "no-aat-s0" / "done.json").read_text())["clean"] == 0.7
    assert "All 1 of 1 jobs finished" in (dest / "results.md").read_text()
    assert main([*args, "report=search_quality"]) == 2 and "searches, which are not archived" in capsys.readouterr().err


def test_finished_note_says_partial_only_when_jobs_are_missing():  # both reports' (robustness, search quality) line
    assert finished_note("2 of 4") == "**Partial: 2 of 4 jobs finished**"
    assert finished_note("14 of 14") == "All 14 of 14 jobs finished"


def test_warm_start_cache_defaults_to_the_out_folder_and_may_be_shared(tmp_path):
    from trainer.experiment import _warm_config

    cfg = load_config(ExperimentConfig)
    assert _warm_config(cfg, tmp_path / "exp", "paif").cache == str(tmp_path / "exp" / "cache")
    cfg = load_config(ExperimentConfig, overrides=[f"cache={tmp_path / 'shared'}"])
    assert _warm_config(cfg, tmp_path / "exp", "paif").cache == str(tmp_path / "shared")


def test_arms_retrained_from_another_start_are_refused(tmp_path):
    """A finished arm keeps its training; when the starting point changed (new warm-start recipe), continuing the
    folder would mix arms from two starts, so the experiment stops with a message naming the arms."""
    from trainer.experiment import Job, check_starts, trained_from

    job = Job(label="AAT", genotype="paif", mode="aat", seed=0)
    run = tmp_path / "jobs" / job.key / "train" / "aat-s0-aat-1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("mode: aat\ninit_from: /elsewhere/cache/start-aaaa.pt\n")
    assert trained_from(tmp_path / "jobs" / job.key) == "/elsewhere/cache/start-aaaa.pt"
    check_starts([job], tmp_path, {"paif": {"start": "runs/cache/start-aaaa.pt"}})  # same start, other folder
    check_starts([Job(label="x", genotype="paif", mode="clean", seed=1)], tmp_path,
                 {"paif": {"start": "runs/cache/start-bbbb.pt"}})  # not trained yet
    with pytest.raises(ConfigError, match=r"aat-s0 \(start-aaaa.pt\).*another --out, or delete"):
        check_starts([job], tmp_path, {"paif": {"start": "runs/cache/start-bbbb.pt"}})


def test_arms_copied_in_are_checked_against_the_start_in_their_done_json(tmp_path):
    """An arm whose result files came from another machine (done.json, no train folder) names its start there: a start
    of another name is refused, and so is one of the same name whose weights differ (a recomputed start)."""
    from trainer.experiment import Job, check_starts

    job = Job(label="AAT", genotype="paif", mode="aat", seed=0)
    (tmp_path / "jobs" / job.key).mkdir(parents=True)
    (tmp_path / "jobs" / job.key / "done.json").write_text(json.dumps(
        {"start": {"file": "start-aaaa.pt", "weights_sha256": "1" * 64}}))
    check_starts([job], tmp_path, {"paif": {"start": "cache/start-aaaa.pt", "weights_sha256": "1" * 64}})
    with pytest.raises(ConfigError, match=r"aat-s0 \(start-aaaa.pt\)"):
        check_starts([job], tmp_path, {"paif": {"start": "cache/start-bbbb.pt", "weights_sha256": "1" * 64}})
    with pytest.raises(ConfigError, match=r"same name but other weights than the one here: aat-s0 \(start-aaaa.pt\); "
                                          r"the start was recomputed"):
        check_starts([job], tmp_path, {"paif": {"start": "cache/start-aaaa.pt", "weights_sha256": "2" * 64}})


def test_weights_hash_is_over_names_and_bytes_and_ignores_the_file(tmp_path):
    """The start's weights hash equals one computed by hand (sorted names, then each tensor's bytes), is the same
    for two files of the same weights, and changes with the weights."""
    import hashlib

    import torch

    from trainer.checkpoint import init_checkpoint
    from trainer.warmstart import start_weights_sha256, weights_sha256

    sd = {"b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(), "a.count": torch.tensor(7)}
    h = hashlib.sha256()
    for k in ("a.count", "b.weight"):
        h.update(k.encode())
        h.update(sd[k].contiguous().numpy().tobytes())
    assert weights_sha256(sd) == h.hexdigest()
    one = init_checkpoint(tmp_path / "one.pt", "paif", channels=4, seed=0)
    two = init_checkpoint(tmp_path / "two.pt", "paif", channels=4, seed=0)
    other = init_checkpoint(tmp_path / "three.pt", "paif", channels=4, seed=1)
    assert start_weights_sha256(one) == start_weights_sha256(two) != start_weights_sha256(other)


def test_warm_starts_run_per_genotype_in_worker_processes_and_are_cached(tmp_path):
    """Two genotypes' fusion nets warm up in their own `python -m trainer.warmstart` processes (one log each); the
    starts match what trainer.warmstart computes for the same recipe, and a second call starts no process."""
    from rgbt.synthetic import generate_dataset
    from trainer.experiment import BASELINE_GENOTYPE, TINY, _warm_config, warm_starts
    from trainer.warmstart import warm_start

    generate_dataset(tmp_path / "data", n_train=6, n_val=2, n_test=2, size=(32, 40), seed=0)
    baseline = tmp_path / "baseline_genotype.json"
    baseline.write_text(json.dumps({**BASELINE_GENOTYPE, "channels": 4}))
    runs = 'runs=[["no AAT","paif","clean"],["base","baseline","clean"]]'
    cfg = load_config(ExperimentConfig, overrides=[o for o in TINY if not o.startswith("runs=")] + [runs])
    genotypes = {"paif": "paif", "baseline": str(baseline)}
    starts = warm_starts(cfg, tmp_path, genotypes)
    assert list(starts) == ["paif", "baseline"] and starts["paif"]["start"] != starts["baseline"]["start"]
    logs = sorted(p.name for p in (tmp_path / "warmstarts").glob("*.log"))
    assert logs == ["baseline.log", "paif.log"]
    assert "warming up the fusion net" in (tmp_path / "warmstarts" / "paif.log").read_text()
    for name, geno in genotypes.items():
        assert warm_start(_warm_config(cfg, tmp_path, geno), compute=False) == starts[name]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "warmstarts").glob("*.log")}
    assert warm_starts(cfg, tmp_path, genotypes) == starts
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "warmstarts").glob("*.log")} == stamps

    # another machine continues the run from the start files alone (its own arithmetic would give other weights):
    # nothing is pretrained, fitted or started, and the records name the copies
    import trainer.experiment as experiment
    import trainer.warmstart as warmstart

    other = tmp_path / "elsewhere"
    (other / "cache").mkdir(parents=True)
    shutil.copytree(tmp_path / "data", other / "data")
    for info in starts.values():
        for suffix in (".pt", ".json"):
            shutil.copy(Path(info["start"]).with_suffix(suffix), other / "cache")

    def boom(*args, **kwargs):
        raise AssertionError("a cached start was computed again")

    mp = pytest.MonkeyPatch()
    for mod, name in ((warmstart, "pretrain_segmenter"), (warmstart, "warm_fusion"), (experiment, "_run"),
                      (experiment, "common_segmenter")):
        mp.setattr(mod, name, boom)
    try:
        moved = warm_starts(cfg, other, genotypes)
    finally:
        mp.undo()
    assert not (other / "cache" / Path(starts["paif"]["segmenter_dir"]).name).exists()
    for name, info in starts.items():
        assert moved[name]["start"] == str(other / "cache" / Path(info["start"]).name)
        assert moved[name]["weights_sha256"] == info["weights_sha256"]
        assert {k: v for k, v in moved[name].items() if k not in ("start", "segmenter_dir")} == \
            {k: v for k, v in info.items() if k not in ("start", "segmenter_dir")}


def test_seg_scale_reaches_the_warm_start_every_retraining_and_the_searches(tmp_path):
    """One experiment-wide seg_scale: the segmenter is pretrained (seg.scale), retrained (seg_scale) and searched
    (space.seg_scale) at the same factor; setting one of those in the overrides instead is refused."""
    from trainer.experiment import Job, _warm_config, retrain_command, warmstart_overrides
    from trainer.retrain import RetrainConfig

    job = Job(label="AAT", genotype="paif", mode="aat", seed=1, overrides=("inputs=both",))
    plain = load_config(ExperimentConfig, overrides=["seg_scale=1"])
    assert warmstart_overrides(plain) == plain.warmstart and _warm_config(plain, tmp_path, "paif").seg.scale == 1
    assert not any(a.startswith("seg_scale=") for a in retrain_command(job, plain, tmp_path, {"paif": "paif"}, None))
    cfg = load_config(ExperimentConfig, overrides=["seg_scale=2"])
    assert _warm_config(cfg, tmp_path, "paif").seg.scale == 2
    cmd = retrain_command(job, cfg, tmp_path, {"paif": "paif"}, "cache/start-x.pt")
    assert cmd[1].endswith("trainer/retrain.py") and "init_from=cache/start-x.pt" in cmd
    items = [a for a in cmd[4:] if "=" in a]
    retrain = load_config(RetrainConfig, None, [a for a in items if not a.startswith(("init_from=", "data.root="))])
    assert retrain.seg_scale == 2 and retrain.mode == "aat" and retrain.seed == 1
    for bad, key in (('warmstart=["seg.steps=2","seg.scale=2"]', "seg.scale"), ('retrain=["seg_scale=2"]', "seg_scale"),
                     ('search_extra=["space.seg_scale=4"]', "space.seg_scale")):
        with pytest.raises(ConfigError, match=f"{key} is set by the experiment's seg_scale"):
            load_config(ExperimentConfig, overrides=[bad])
    with pytest.raises(ConfigError, match="seg_scale"):
        load_config(ExperimentConfig, overrides=["seg_scale=3"])


def test_aat_ablation_config_shares_the_experiments_arms_and_adds_mixed_eps_at():
    """configs/aat_ablation.yaml: the four training modes of `make experiment` with the same job keys and overrides
    (so their archived result files can be copied in), the same recipe, plus AT with uniform eps over AAT's tasks and
    no pretext stage; every pair names a planned run."""
    default, ablation = ExperimentConfig(), load_config(ExperimentConfig, "configs/aat_ablation.yaml", [])
    base = {j.key: j for j in plan(default)}
    jobs = plan(ablation)
    shared = [j for j in jobs if j.key in base]
    assert {j.label for j in shared} == {"no AAT", "plain AT", "AAT", "AAT, uniform eps"} and len(shared) == 12
    assert all((j.mode, j.seed, j.overrides) == (base[j.key].mode, base[j.key].seed, base[j.key].overrides)
               for j in shared)
    new = [j for j in jobs if j.key not in base]
    assert [j.key for j in new] == [f"mixed-eps-at-no-pretext-s{s}" for s in (0, 1, 2)]
    assert all(j.mode == "aat" and j.overrides == ("aat.meta_iters=0", "aat.prob_mode=uniform") for j in new)
    assert (ablation.retrain, ablation.warmstart, ablation.data, ablation.threats) == \
        (default.retrain, default.warmstart, default.data, default.threats)
    labels = {j.label for j in jobs}
    assert all(a in labels and b in labels for a, b in ablation.pairs)
