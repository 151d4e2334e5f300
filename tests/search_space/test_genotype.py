"""Genotype: JSON and NNI-sample round trips, validation errors naming the field."""
from __future__ import annotations

import json

import pytest

from search_space.genotype import FORMAT_VERSION, GENOTYPES, Genotype, GenotypeError, get_genotype

PAIF = GENOTYPES["paif"]


def test_paif_genotype() -> None:
    assert PAIF.ir == ("dense_k3_d1", "dilconv_k3_d2")
    assert PAIF.vis == ("dense_k3_d1", "dense_k3_d1")
    assert PAIF.fused == ("eca_k3", "residual_k7_d1")
    assert PAIF.rule == "spatial_attention" and PAIF.channels == 32 and PAIF.steps == 2


def test_json_round_trip(tmp_path) -> None:
    path = tmp_path / "g.json"
    text = PAIF.to_json(path)
    assert json.loads(text)["version"] == FORMAT_VERSION
    assert Genotype.from_json(path) == PAIF
    assert Genotype.from_json(text) == PAIF
    assert get_genotype(str(path)) == PAIF and get_genotype("paif") is PAIF


def test_sample_round_trip() -> None:
    sample = PAIF.to_sample()
    assert sample == {"ir/op1": "dense_k3_d1", "ir/op2": "dilconv_k3_d2", "vis/op1": "dense_k3_d1",
                      "vis/op2": "dense_k3_d1", "fused/op1": "eca_k3", "fused/op2": "residual_k7_d1",
                      "rule": "spatial_attention"}
    assert Genotype.from_sample(sample, channels=32) == PAIF


def _bad(**changes) -> str:
    data = PAIF.to_dict()
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    return json.dumps(data)


@pytest.mark.parametrize("changes,field", [
    ({"ir": ["dense_k3_d1", "conv_k9"]}, r"ir\[1\]: unknown op 'conv_k9'"),
    ({"fused": ["eca_k3"]}, r"steps: expected the same number"),
    ({"vis": None}, r"vis: missing cell"),
    ({"version": 99}, r"version: expected 1, got 99"),
    ({"version": None}, r"version: missing"),
    ({"rule": "median"}, r"rule: unknown fusion rule 'median'"),
    ({"channels": 31}, r"channels: expected an even integer"),
    ({"channels": "32"}, r"channels: expected int"),
    ({"ir": "dense_k3_d1"}, r"ir: expected a list of op names"),
    ({"colour": "red"}, r"colour: unknown field"),
])
def test_invalid_json_names_the_field(changes, field) -> None:
    with pytest.raises(GenotypeError, match=field):
        Genotype.from_json(_bad(**changes))


def test_invalid_json_text_and_missing_file(tmp_path) -> None:
    with pytest.raises(GenotypeError, match="not valid JSON"):
        Genotype.from_json("{not json")
    with pytest.raises(GenotypeError, match="does not exist"):
        Genotype.from_json(tmp_path / "missing.json")


def test_invalid_sample() -> None:
    sample = PAIF.to_sample()
    sample.pop("rule")
    with pytest.raises(GenotypeError, match="rule: missing"):
        Genotype.from_sample(sample)
    with pytest.raises(GenotypeError, match="sample label 'ir/x1'"):
        Genotype.from_sample({**PAIF.to_sample(), "ir/x1": "eca_k3"})
    sample = PAIF.to_sample()
    sample.pop("vis/op1")
    with pytest.raises(GenotypeError, match=r"vis: expected labels vis/op1\.\.vis/op1"):
        Genotype.from_sample(sample)


def test_frozen_and_hashable() -> None:
    with pytest.raises(AttributeError):
        PAIF.rule = "add"  # type: ignore[misc]
    assert hash(Genotype(ir=["eca_k3"], vis=["eca_k3"], fused=["eca_k3"])) is not None
