"""The robustness card (trainer/robustness_card.py): aggregate, resumability per family, reference handling, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import trainer.robustness_card as card
from trainer.robustness_card import COMPUTE_ORDER, FAMILIES, CardConfig, build_card, family_score
from trainer.checkpoint import init_checkpoint
from trainer.config import ConfigError, load_config
from trainer.evaluate import main as evaluate_main

CHEAP = {"threats": ["paif"], "steps": 1, "masking.enabled": False, "patch.steps": 2, "patch.batch_size": 3,
         "severities": [1, 3, 5], "batch_size": 2, "progress": False, "worst_rows": 1}


def _cfg(ckpt: Path, data: Path, out: Path, **over) -> CardConfig:
    return load_config(CardConfig, None, {**CHEAP, "checkpoint": str(ckpt), "data": str(data), "out": str(out),
                                          **over})


# ------------------------------------------------------------------------------------------- aggregate
def test_family_score_against_hand_computed_mce():
    model = {"fog": {"levels": ["1", "2"], "miou": [0.8, 0.6]}, "jpeg": {"levels": ["1", "2"], "miou": [0.5, 0.5]}}
    ref = {"fog": {"levels": ["1", "2"], "miou": [0.6, 0.6]}, "jpeg": {"levels": ["1", "2"], "miou": [0.75, 0.75]}}
    out = family_score(model, ref)
    # fog: (0.2 + 0.4) / (0.4 + 0.4) = 0.75; jpeg: 1.0 / 0.5 = 2.0; mean 1.375
    assert out["ce"] == pytest.approx({"fog": 0.75, "jpeg": 2.0})
    assert out["score"] == pytest.approx(137.5)
    assert family_score(model, model)["score"] == pytest.approx(100.0)
    perfect = {"fog": {"levels": ["1", "2"], "miou": [1.0, 1.0]}, "jpeg": ref["jpeg"]}
    assert family_score(model, perfect)["ce"]["fog"] is None  # no reference error: no ratio
    with pytest.raises(ValueError, match=r"reference: expected the members \['fog', 'jpeg'\], got \['fog'\]"):
        family_score(model, {"fog": ref["fog"]})
    with pytest.raises(ValueError, match="reference member 'fog': expected levels"):
        family_score(model, {"fog": {"levels": ["1"], "miou": [0.5]}, "jpeg": ref["jpeg"]})


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"families: expected a non-empty subset of .*got \['rain'\]"):
        load_config(CardConfig, None, {"families": ["rain"]})
    with pytest.raises(ConfigError, match=r"severities: expected a non-empty list of integers in 1..5, got \[0, 6\]"):
        load_config(CardConfig, None, {"severities": [0, 6]})
    with pytest.raises(ConfigError, match=r"patch.areas: expected a non-empty list of fractions in \(0, 1\)"):
        load_config(CardConfig, None, {"patch.areas": [0.0]})


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def model_card(tmp_path_factory, synthetic_root):
    """A card built in two calls (two families, then all): the 'interrupted' run and its resumption."""
    base = tmp_path_factory.mktemp("card")
    ckpt = init_checkpoint(base / "a.pt", genotype="paif", channels=4, seed=0)
    out = base / "card_a"
    calls: list[str] = []
    original = card.compute_family

    def counting(ctx, family, out_dir, clean):
        calls.append(family)
        return original(ctx, family, out_dir, clean)

    card.compute_family = counting
    try:
        first = build_card(_cfg(ckpt, synthetic_root, out, families=["sensor-faults", "misregistration"]), out)
        first_calls = list(calls)
        stamps = {f: (out / "families" / f"{f}.json").stat().st_mtime_ns for f in ("sensor-faults", "misregistration")}
        calls.clear()
        full = build_card(_cfg(ckpt, synthetic_root, out), out)
        second_calls = list(calls)
        calls.clear()
        again = build_card(_cfg(ckpt, synthetic_root, out), out)
        third_calls = list(calls)
    finally:
        card.compute_family = original
    return {"base": base, "ckpt": ckpt, "out": out, "first": first, "full": full, "again": again, "stamps": stamps,
            "calls": (first_calls, second_calls, third_calls)}


@pytest.mark.slow
def test_card_resumes_per_family(model_card):
    out = model_card["out"]
    first_calls, second_calls, third_calls = model_card["calls"]
    assert first_calls == ["misregistration", "sensor-faults"]  # cheap families first
    assert second_calls == [f for f in COMPUTE_ORDER if f not in first_calls]  # finished families not recomputed
    assert third_calls == []
    for f, stamp in model_card["stamps"].items():
        assert (out / "families" / f"{f}.json").stat().st_mtime_ns == stamp
    assert list(model_card["first"]["summary"]) == ["sensor-faults", "misregistration"]  # the order asked for
    assert list(model_card["full"]["summary"]) == list(FAMILIES)
    assert model_card["again"]["summary"] == model_card["full"]["summary"]


@pytest.mark.slow
def test_card_against_itself_is_100_and_has_every_family(model_card):
    full = model_card["full"]
    assert full["self_reference"] is True
    for f in FAMILIES:
        assert full["summary"][f]["score"] == pytest.approx(100.0)
    assert full["score"] == pytest.approx(100.0)
    fams = full["families"]
    assert set(fams["vis-corruptions"]["members"]) == {"gaussian-noise", "motion-blur", "fog", "low-light", "glare",
                                                       "jpeg"}
    assert fams["vis-corruptions"]["members"]["fog"]["levels"] == ["1", "3", "5"]
    assert set(fams["sensor-faults"]["members"]) == {"IR sensor", "VIS sensor"}
    assert fams["sensor-faults"]["members"]["IR sensor"]["levels"] == ["zeros", "mean-grey", "frozen", "saturated"]
    assert fams["misregistration"]["members"]["shift"]["levels"] == ["1 px", "2 px", "4 px", "8 px"]
    assert fams["patches"]["members"]["VIS patch"]["levels"] == ["2 %", "5 %"]
    assert list(fams["threats"]["members"]) == ["paif", "strong"]  # evaluate.py always adds strong
    for fam in fams.values():
        for m in fam["members"].values():
            assert all(0.0 <= v <= 1.0 for v in m["miou"])
            if m["errors"] is not None:  # per-image pixel error, 2 test images
                assert all(len(e) == 2 for e in m["errors"])


@pytest.mark.slow
def test_card_files_and_markdown(model_card):
    out = model_card["out"]
    text = (out / "card.md").read_text()
    for f in FAMILIES:
        assert f"## {f}" in text
    assert "Attack step counts were overridden to 1" in text
    assert "![radar chart of the families](radar.png)" in text
    for png in ["radar.png", "patches.png", "worst_vis-corruptions.png", "worst_patches.png",
                "threats/grid_strong.png"]:
        with Image.open(out / png) as im:
            assert im.format == "PNG" and min(im.size) >= 200
    assert json.loads((out / "card.json").read_text())["score"] == pytest.approx(100.0)
    assert sorted(p.name for p in (out / "patches").iterdir()) == ["ir-0.02.pt", "ir-0.05.pt", "vis-0.02.pt",
                                                                   "vis-0.05.pt"]


@pytest.mark.slow
def test_card_against_another_reference(model_card, synthetic_root):
    base, ref_dir = model_card["base"], model_card["out"]
    other = init_checkpoint(base / "b.pt", genotype="paif", channels=4, seed=1)
    families = ["ir-corruptions", "sensor-faults"]
    out = base / "card_b"
    result = build_card(_cfg(other, synthetic_root, out, families=families, reference=str(ref_dir)), out)
    assert result["self_reference"] is False
    for f in families:
        mine = json.loads((out / "families" / f"{f}.json").read_text())["members"]
        ref = json.loads((ref_dir / "families" / f"{f}.json").read_text())["members"]
        ce = [sum(1 - v for v in mine[m]["miou"]) / sum(1 - v for v in ref[m]["miou"]) for m in mine]
        assert result["summary"][f]["score"] == pytest.approx(100 * np.mean(ce))
    assert any(abs(result["summary"][f]["score"] - 100) > 1e-6 for f in families)
    # the same checkpoint against the first card directory: 100 (the files are read, not recomputed)
    same = build_card(_cfg(model_card["ckpt"], synthetic_root, base / "card_a2", families=["sensor-faults"],
                           reference=str(ref_dir)), base / "card_a2")
    assert same["summary"]["sensor-faults"]["score"] == pytest.approx(100.0)
    # a reference measured under other settings is refused, naming the difference
    with pytest.raises(ConfigError, match=r"family 'ir-corruptions' was computed with other settings \(differs in "
                                          r"\['severities'\]\)"):
        build_card(_cfg(other, synthetic_root, base / "card_c", families=["ir-corruptions"], severities=[2],
                        reference=str(ref_dir)), base / "card_c")


@pytest.mark.slow
def test_cli_suite_card(model_card, synthetic_root, capsys):
    out = model_card["base"] / "cli"
    argv = ["--suite", "card", "--checkpoint", str(model_card["ckpt"]), "--data", str(synthetic_root), "--out",
            str(out), "--family", "misregistration", "--no-progress", "batch_size=2"]
    assert evaluate_main(argv) == 0
    assert "misregistration" in capsys.readouterr().out and (out / "card.md").is_file()
    assert evaluate_main(["--suite", "card", "--checkpoint", str(model_card["ckpt"]), "--data", str(synthetic_root),
                          "--out", str(out), "--family", "rain"]) == 2
    assert "families: expected a non-empty subset" in capsys.readouterr().err


def test_shipped_yaml_holds_the_defaults():
    shipped = load_config(CardConfig, Path(__file__).resolve().parents[2] / "configs" / "card.yaml")
    assert shipped == CardConfig()
