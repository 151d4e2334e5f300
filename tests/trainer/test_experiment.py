"""trainer.experiment: job plan, statistics over seeds, table and plot (the jobs themselves are retrain + evaluate,
tested in their own modules)."""
from __future__ import annotations

import json
import math
import statistics

import pytest
from PIL import Image

from trainer.config import ConfigError, load_config
from trainer.experiment import (ExperimentConfig, aggregate, extract, main, mean_std, plan, plot_curves,
                                render_table, write_outputs)


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
    assert "| a | 1 | 40.0 ± 0.0 | 30.0 ± 0.0 |" in table


def test_plan_seeds_outermost_and_unique_keys():
    cfg = load_config(ExperimentConfig, overrides=["seeds=[3,4]", 'runs=[["a","paif","clean"],["b","paif","aat"]]'])
    jobs = plan(cfg)
    assert [(j.label, j.seed) for j in jobs] == [("a", 3), ("b", 3), ("a", 4), ("b", 4)]
    assert len({j.key for j in jobs}) == len(jobs)


def test_plan_a_run_may_use_only_the_first_seeds():
    cfg = load_config(ExperimentConfig, overrides=["seeds=[0,1,2]", 'runs=[["a","paif","aat"],["b","baseline","aat","1"]]'])
    assert [(j.label, j.seed) for j in plan(cfg)] == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]


def test_bad_run_triple_is_a_config_error(capsys):
    with pytest.raises(ConfigError, match="expected \\[label, genotype, mode\\] or"):
        plan(load_config(ExperimentConfig, overrides=['runs=[["only label"]]']))
    assert main(["--plan", "colour=1"]) == 2
    assert "unknown config key(s) colour" in capsys.readouterr().err


def test_plan_flag_lists_jobs(capsys):
    assert main(["--plan", "seeds=[0]"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[0] == "paif-clean-s0" and len(lines) == len(ExperimentConfig().runs)
    assert main(["--plan"]) == 0  # default: 3 seeds of the paif modes, 1 seed of the genotype comparison
    assert len(capsys.readouterr().out.strip().splitlines()) == 3 * 3 + 2


def test_extract_reads_an_evaluation_report():
    seg = {"miou": 0.4, "miou_objects": 0.3}
    report = {"clean": {"segmentation": seg},
              "threats": {"paif": {"segmentation": {"miou": 0.2, "miou_objects": 0.1}}},
              "eps_sweep": {"paif": [{"eps_255": 0.0, "miou": 0.4}, {"eps_255": 8.0, "miou": 0.2}]}}
    assert extract(report) == {"clean": 0.4, "clean_objects": 0.3, "paif": 0.2, "paif_objects": 0.1,
                               "curves": {"paif": [[0.0, 0.4], [8.0, 0.2]]}}


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
