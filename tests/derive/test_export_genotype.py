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
