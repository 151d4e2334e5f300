"""trainer.config: defaults <- YAML <- key=value overrides; unknown keys and type errors are ConfigErrors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest
import yaml

from trainer.config import ConfigError, config_to_dict, load_config, parse_overrides, save_config


@dataclass
class AttackCfg:
    eps: float = 0.03
    steps: int = 3
    norm: str = "linf"


@dataclass
class RunCfg:
    lr: float = 0.01
    epochs: int = 2
    name: str = "run"
    amp: bool = False
    crop: Optional[tuple[int, int]] = None
    layers: list[int] = field(default_factory=lambda: [1, 2])
    attack: AttackCfg = field(default_factory=AttackCfg)


def test_defaults():
    cfg = load_config(RunCfg)
    assert cfg == RunCfg()


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.1\ncrop: [64, 80]\nattack:\n  eps: 0.1\n")
    cfg = load_config(RunCfg, path, ["epochs=5", "attack.steps=7", "--amp=true", "layers=[3, 4, 5]"])
    assert cfg.lr == 0.1 and cfg.epochs == 5 and cfg.amp is True and cfg.layers == [3, 4, 5]
    assert cfg.crop == (64, 80) and isinstance(cfg.crop, tuple)
    assert cfg.attack == AttackCfg(eps=0.1, steps=7, norm="linf")  # nested: untouched keys keep defaults


def test_override_beats_yaml_and_dict_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\n")
    assert load_config(RunCfg, path, {"epochs": 9}).epochs == 9
    assert load_config(RunCfg, None, ["crop=null"]).crop is None


def test_exponent_without_dot_is_a_float(tmp_path):
    """YAML 1.1 (PyYAML) reads ``1e-3`` as a string; a float field must still accept it (bug fixed in config.py)."""
    assert load_config(RunCfg, None, ["lr=1e-3"]).lr == 1e-3
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5e-4\nattack:\n  eps: 8e-3\n")
    cfg = load_config(RunCfg, path)
    assert cfg.lr == 5e-4 and cfg.attack.eps == 8e-3


def test_int_and_float_conversion():
    cfg = load_config(RunCfg, None, ["lr=1", "epochs=4.0"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.epochs == 4 and isinstance(cfg.epochs, int)


@pytest.mark.parametrize("override, message", [
    ("epchs=3", r"unknown config key\(s\) epchs; known keys of RunCfg: lr, epochs"),
    ("attack.epss=0.1", r"unknown config key\(s\) attack\.epss; known keys of AttackCfg: attack\.eps"),
    ("epochs=abc", r"epochs: expected an integer, got 'abc'"),
    ("epochs=2.5", r"epochs: expected an integer, got 2\.5"),
    ("amp=1", r"amp: expected true or false, got 1"),
    ("lr=fast", r"lr: expected a number, got 'fast'"),
    ("crop=[1, 2, 3]", r"crop: expected"),
    ("layers=3", r"layers: expected a list, got 3"),
    ("attack=5", r"attack: expected a mapping for AttackCfg, got 5"),
    ("noequals", r"override 'noequals': expected key=value"),
    ("lr=[1", r"override 'lr=\[1': value is not valid YAML"),
])
def test_override_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RunCfg, None, [override])


def test_unknown_key_in_yaml_nested(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("attack:\n  epsilon: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) attack\.epsilon"):
        load_config(RunCfg, path)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml does not exist"):
        load_config(RunCfg, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        load_config(RunCfg, bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping at the top level, got list"):
        load_config(RunCfg, listing)
    assert load_config(RunCfg, _empty(tmp_path)) == RunCfg()


def _empty(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    return path


def test_save_round_trip(tmp_path):
    cfg = load_config(RunCfg, None, ["crop=[8, 8]", "attack.norm=l2", "name=007"])
    save_config(cfg, tmp_path / "out.yaml")
    data = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert data == config_to_dict(cfg) and data["crop"] == [8, 8] and data["attack"]["norm"] == "l2"
    assert load_config(RunCfg, tmp_path / "out.yaml") == cfg


def test_parse_overrides_values_are_yaml():
    assert parse_overrides(["a=1", "b.c=[1, 2]", "d=", "e=x y"]) == {"a": 1, "b.c": [1, 2], "d": "", "e": "x y"}
