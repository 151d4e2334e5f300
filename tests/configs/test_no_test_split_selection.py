"""No shipped config trains on or selects an architecture / checkpoint on a test split.

Key semantics (decided per key, documented here and in README "Data splits"):

* ``train_split`` and ``val_split`` (at any nesting level, e.g. ``data.val_split``) name the split that trains
  weights or selects something (an architecture in the search, ``best.pt`` in retraining): they must never be a
  test split (``test``, ``test_day``, ``test_night``).
* ``split`` is the evaluated split of an evaluation config (``trainer.evaluate.EvaluateConfig.split``): there
  it may be ``test``, that is what the report is for. In any other config a bare ``split`` key is treated as a
  training / selection split.
* NNI experiment configs (a ``trialCommand``): the ``key=value`` overrides of the command and the tuner's
  ``searchSpace`` values follow the same rules (the command configures a search, not an evaluation).
"""
from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from strategies.search import TEST_SPLITS
from trainer.evaluate import EvaluateConfig
from trainer.robustness_card import CardConfig

ROOT = Path(__file__).resolve().parents[2]
#: the keys of each evaluation config (an evaluation names the split it evaluates; the card's patches train on
#: ``patches.train_split``, which is checked like any training split)
EVALUATION_CONFIGS = [{f.name for f in dataclasses.fields(c)} for c in (EvaluateConfig, CardConfig)]


def shipped_configs() -> list[Path]:
    files = sorted(p for p in (ROOT / "configs").rglob("*") if p.suffix in (".yml", ".yaml"))
    return files + sorted(ROOT.glob("search*.yml")) + sorted(ROOT.glob("search*.yaml"))


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def _command_overrides(command: str) -> Iterator[tuple[str, Any]]:
    for token in shlex.split(command):
        key, sep, raw = token.partition("=")
        if sep and not key.startswith("-"):
            yield key, yaml.safe_load(raw) if raw else ""


def _names_test(value: Any) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(str(v) in TEST_SPLITS for v in values)


def split_violations(config: dict[str, Any]) -> list[str]:
    """``"key=value"`` for every training / selection split key of ``config`` that names a test split."""
    is_nni = "trialCommand" in config
    is_evaluation = not is_nni and "split" in config and any(set(config) <= fields for fields in EVALUATION_CONFIGS)
    items = list(_walk(config))
    if is_nni:
        items = list(_command_overrides(str(config["trialCommand"])))
        items += [(k, spec.get("_value")) for k, spec in (config.get("searchSpace") or {}).items()
                  if isinstance(spec, dict)]
    bad = []
    for key, value in items:
        leaf = key.rsplit(".", 1)[-1]
        if not leaf.endswith("split"):
            continue
        if leaf == "split" and is_evaluation and key == "split":
            continue  # the evaluated split of an evaluation config
        if _names_test(value):
            bad.append(f"{key}={value}")
    return bad


def test_there_are_configs_to_check():
    names = {p.name for p in shipped_configs()}
    assert {"search.yml", "search_msrs.yml", "search.yaml", "retrain.yaml", "evaluate.yaml"} <= names


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_config_selects_or_trains_on_a_test_split(path):
    config = yaml.safe_load(path.read_text()) or {}
    assert split_violations(config) == [], f"{path}: selects or trains on a test split"


@pytest.mark.parametrize("config, expected", [
    ({"trialCommand": "python -m strategies.trial data.root=x data.val_split=test epochs=2"}, ["data.val_split=test"]),
    ({"trialCommand": "python -m strategies.trial", "searchSpace": {"data.val_split": {"_type": "choice",
                                                                                      "_value": ["val", "test_night"]}}},
     ["data.val_split=['val', 'test_night']"]),
    ({"data": {"train_split": "train", "val_split": "test_day"}}, ["data.val_split=test_day"]),
    ({"split": "test", "checkpoint": "", "threats": ["paif"]}, []),  # an evaluation config
    ({"split": "test", "epochs": 3}, ["split=test"]),  # not an evaluation config: a bare split selects
    ({"data": {"split": "test"}, "split": "val"}, ["data.split=test"]),
    ({"data": {"val_split": "val"}, "trialCommand": "python x data.val_split=train"}, []),
])
def test_the_checker_flags_test_splits_by_key_semantics(config, expected):
    assert split_violations(config) == expected
