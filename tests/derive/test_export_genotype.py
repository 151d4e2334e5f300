"""derive/export_genotype.py: argmax with exclusions, latest-result lookup, table, heat-map, errors."""
from __future__ import annotations

import json
import os
import time

import pytest

from derive.export_genotype import (export_genotype, find_latest_result, main, pick_architecture,
                                    probability_table)
from search_space.genotype import Genotype


def fake_result(channels=8):
    probs = {
        "ir/op1": {"dense_k3_d1": 0.5, "eca_k3": 0.3, "sepconv_k3": 0.2},
        "ir/op2": {"dense_k3_d1": 0.1, "eca_k3": 0.6, "sepconv_k3": 0.3},
        "vis/op1": {"dense_k3_d1": 0.2, "eca_k3": 0.2, "sepconv_k3": 0.6},
        "vis/op2": {"dense_k3_d1": 0.4, "eca_k3": 0.35, "sepconv_k3": 0.25},
        "rule": {"add": 0.3, "spatial_attention": 0.7},
        "fused/op1": {"dense_k3_d1": 0.3, "eca_k3": 0.3, "sepconv_k3": 0.4},
        "fused/op2": {"dense_k3_d1": 0.34, "eca_k3": 0.33, "sepconv_k3": 0.33},
    }
    return {"version": 1, "epoch": 3, "probabilities": probs, "channels": channels, "config": {}}


def write(path, result):
    path.mkdir(parents=True, exist_ok=True)
    (path / "search_result.json").write_text(json.dumps(result))
    return path / "search_result.json"


def test_argmax_and_exclusion():
    result = fake_result()
    g = export_genotype(result)
    assert g == Genotype(ir=("dense_k3_d1", "eca_k3"), vis=("sepconv_k3", "dense_k3_d1"),
                         fused=("sepconv_k3", "dense_k3_d1"), rule="spatial_attention", channels=8)
    g2 = export_genotype(result, exclude=["dense_k3_d1", "spatial_attention"])
    assert g2.ir == ("eca_k3", "eca_k3") and g2.vis == ("sepconv_k3", "eca_k3") and g2.rule == "add"
    assert "dense_k3_d1" not in g2.ops
    with pytest.raises(ValueError, match="rule"):
        pick_architecture(result["probabilities"], exclude=["add", "spatial_attention"])


def test_table_marks_the_pick():
    result = fake_result()
    arch = pick_architecture(result["probabilities"])
    table = probability_table(result["probabilities"], arch).splitlines()
    assert table[0].split()[0] == "slot" and len(table) == 8
    row = next(line for line in table if line.startswith("rule"))
    assert "0.700*" in row and "0.300 " in row


def test_cli_latest_result_out_and_png(tmp_path, capsys, monkeypatch):
    old = write(tmp_path / "runs" / "a", fake_result())
    newer = fake_result(channels=16)
    newer["probabilities"]["rule"] = {"add": 0.9, "spatial_attention": 0.1}
    new = write(tmp_path / "runs" / "nni" / "x" / "search", newer)
    past = time.time() - 100
    os.utime(old, (past, past))
    assert find_latest_result(tmp_path / "runs") == new
    monkeypatch.chdir(tmp_path)
    assert main(["--exclude", "eca_k3"]) == 0  # defaults: --root runs, --out out.json
    g = Genotype.from_json(tmp_path / "out.json")
    assert g.rule == "add" and g.channels == 16 and "eca_k3" not in g.ops
    prov = json.loads((tmp_path / "out.provenance.json").read_text())  # sidecar; no experiment for a plain run
    assert prov["experiment_id"] is None and prov["result"] == "runs/nni/x/search/search_result.json"
    png = (tmp_path / "out.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "runs/nni/x/search/search_result.json" in out and "fused/op2" in out
    assert main(["--run", str(old.parent), "--out", "b.json", "--png", "maps/b.png"]) == 0
    assert Genotype.from_json(tmp_path / "b.json").rule == "spatial_attention"
    assert (tmp_path / "maps" / "b.png").is_file()


def test_cli_errors(tmp_path, capsys):
    assert main(["--root", str(tmp_path / "nothing")]) == 2
    assert "expected a search_result.json" in capsys.readouterr().err
    bad = fake_result()
    bad["probabilities"]["ir/op1"] = {"not_an_op": 1.0}
    write(tmp_path / "bad", bad)
    assert main(["--run", str(tmp_path / "bad"), "--out", str(tmp_path / "o.json")]) == 2
    assert "unknown op" in capsys.readouterr().err


# ------------------------------------------------------------------------------ NNI experiments
def fake_experiment(root, trials):
    """An NNI experiment folder: db/nni.sqlite (NNI's TrialJobEvent / MetricData tables) and trial result files.

    ``trials``: (id, final status, selection value or None, rule probability of 'add', result mtime offset).
    """
    import sqlite3

    exp = root / "EXP123"
    (exp / "db").mkdir(parents=True)
    con = sqlite3.connect(exp / "db" / "nni.sqlite")
    con.execute("create table TrialJobEvent (timestamp integer, trialJobId text, event text, data text, "
                "logPath text, sequenceId integer, message text)")
    con.execute("create table MetricData (timestamp integer, trialJobId text, parameterId text, type text, "
                "sequence integer, data text)")
    for k, (tid, status, value, p_add, age) in enumerate(trials):
        tdir = exp / "environments" / "local-env" / "trials" / tid
        params = json.dumps({"parameters": {"w_arch": k / 2}})
        con.execute("insert into TrialJobEvent values (?, ?, 'WAITING', ?, ?, 0, '')", (10 * k, tid, params, str(tdir)))
        con.execute("insert into TrialJobEvent values (?, ?, ?, NULL, ?, 0, '')", (10 * k + 5, tid, status, str(tdir)))
        result = fake_result()
        result["probabilities"]["rule"] = {"add": p_add, "spatial_attention": 1 - p_add}
        result["config"] = {"w_arch": k / 2}
        if value is not None:
            result["selection"] = {"metric": "heldout_adv_loss", "mode": "min", "value": value,
                                   "settings": {"eps": 8 / 255}}
        path = write(tdir / "search", result)
        t = time.time() + age
        os.utime(path, (t, t))
    con.commit()
    con.close()
    return exp


TRIALS = [
    ("aaaa", "SUCCEEDED", 2.5, 0.9, 0),     # finished, worse
    ("bbbb", "SUCCEEDED", 1.5, 0.1, -50),   # finished, best, oldest file
    ("cccc", "FAILED", 0.5, 0.8, 0),        # lowest value, but failed (partial result)
    ("dddd", "SUCCEEDED", 3.0, 0.95, 50),   # finished last (newest file), worst
    ("eeee", "SUCCEEDED", None, 0.7, 0),    # a result without the selection metric
]


def test_experiment_export_picks_the_best_finished_trial_not_the_newest(tmp_path, capsys):
    from derive.export_genotype import pick_best_trial, provenance_path

    exp = fake_experiment(tmp_path / "exps", TRIALS)
    trial, path, result, candidates = pick_best_trial(exp)
    assert trial["id"] == "bbbb" and path.parent.parent.name == "bbbb"
    assert find_latest_result(exp).parent.parent.name == "dddd"  # what the old rule would have exported
    by_id = {c["trial"]: c for c in candidates}
    assert by_id["cccc"]["value"] is None and "not SUCCEEDED" in by_id["cccc"]["skipped"]
    assert "no selection metric" in by_id["eeee"]["skipped"] and by_id["aaaa"]["value"] == 2.5

    out = tmp_path / "o" / "out.json"
    assert main(["--experiment", str(exp), "--out", str(out)]) == 0
    assert Genotype.from_json(out).rule == "spatial_attention"  # bbbb's pick; the genotype file loads as is
    prov = json.loads(provenance_path(out).read_text())
    assert provenance_path(out).name == "out.provenance.json"
    assert (prov["experiment_id"], prov["trial_id"], prov["metric"], prov["value"]) == \
        ("EXP123", "bbbb", "heldout_adv_loss", 1.5)
    assert prov["search_config"] == {"w_arch": 0.5} and prov["trial_parameters"] == {"w_arch": 0.5}
    assert prov["result"].endswith("bbbb/search/search_result.json")
    assert "trial bbbb (heldout_adv_loss = 1.5000, best of 3 finished trials)" in capsys.readouterr().out


def test_experiment_by_id_and_default_export_inside_an_experiment(tmp_path, monkeypatch):
    exp = fake_experiment(tmp_path / "runs" / "nni-experiments", TRIALS)
    monkeypatch.chdir(tmp_path)
    assert main(["--experiment", "EXP123", "--out", "a.json"]) == 0  # id under runs/nni-experiments
    assert json.loads((tmp_path / "a.provenance.json").read_text())["trial_id"] == "bbbb"
    # no arguments: the newest result lies in the experiment -> its best trial, still not the newest
    assert main(["--out", "b.json"]) == 0
    assert json.loads((tmp_path / "b.provenance.json").read_text())["experiment_dir"] == str(exp)
    assert json.loads((tmp_path / "b.provenance.json").read_text())["trial_id"] == "bbbb"


def test_experiment_errors(tmp_path, capsys):
    assert main(["--experiment", "NOPE", "--out", str(tmp_path / "x.json")]) == 2
    assert "expected an NNI experiment directory" in capsys.readouterr().err
    exp = fake_experiment(tmp_path, [("a", "FAILED", 1.0, 0.5, 0), ("b", "SUCCEEDED", None, 0.5, 0)])
    assert main(["--experiment", str(exp), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "expected at least one SUCCEEDED trial with a selection metric" in err and "a: FAILED" in err
