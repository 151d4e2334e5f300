"""Typed run configuration: one dataclass per entry point, loaded from YAML, overridden by ``key=value``.

Unknown keys are an error (a typo must not silently fall back to a default); values are converted to the
field's declared type; nested dataclasses are addressed with dots (``attack.eps=0.03``).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from trainer.errors import PaifError

__all__ = ["ConfigError", "load_config", "parse_overrides", "config_to_dict", "save_config", "from_dict", "require",
           "finite", "check_lr", "check_budget", "check_choice", "check_channels", "NAN_POLICIES", "check_nan_policy",
           "check_crop", "changed_settings", "check_resume_settings"]

T = TypeVar("T")


class ConfigError(PaifError, ValueError):
    """A configuration file or override is invalid."""


def require(ok: bool, key: str, expected: str, got: Any, hint: str = "") -> None:
    """Raise ``ValueError("<key>: expected <expected>, got <got>[; <hint>]")`` unless ``ok``.

    The check of one setting in a config dataclass's ``__post_init__``; :func:`from_dict` turns the
    ``ValueError`` into a :class:`ConfigError`, so a bad setting fails when the config is loaded.
    """
    if not ok:
        raise ValueError(f"{key}: expected {expected}, got {got!r}" + (f"; {hint}" if hint else ""))


def finite(value: float) -> bool:
    """True for a finite number (``require(finite(lr) and lr > 0, ...)``)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


# ------------------------------------------------------------------------------ shared checks of settings
# used by the config dataclasses of retrain, search and evaluate (and warm start), so one setting gets one message


def check_lr(value: float, key: str) -> None:
    """A learning rate: a finite number > 0."""
    require(finite(value) and value > 0, key, "a number > 0 (e.g. 5e-4)", value)


def check_budget(value: float, key: str, what: str = "a budget") -> None:
    """An attack budget or step in pixel units: a number in [0, 1] (8/255 = 0.0314)."""
    require(finite(value) and 0 <= value <= 1, key, f"{what} in [0, 1] pixel units (8/255 = 0.0314)", value)


def check_choice(value: Any, choices: Iterable[Any], key: str) -> None:
    """``value`` is one of ``choices``."""
    choices = list(choices)
    require(value in choices, key, f"one of {choices}", value)


def check_channels(channels: int, max_channels: int, key: str) -> None:
    """The fusion width: even, in ``2 .. max_channels`` (a memory guard the user can raise)."""
    require(channels >= 2 and channels % 2 == 0, key, "an even integer >= 2", channels)
    require(channels <= max_channels, key, f"at most max_channels={max_channels}", channels,
            f"set max_channels={channels} to train this wide a fusion net on purpose")


def check_crop(crop: Any, key: str) -> None:
    """``None`` or a (height, width) pair of positive integers."""
    require(crop is None or (len(crop) == 2 and all(int(c) >= 1 for c in crop)), key,
            "null or [height, width] with positive sizes", None if crop is None else list(crop))


#: what a training loop does at a non-finite loss or gradient: stop with an error, or skip the step
NAN_POLICIES = ("stop", "skip")


def check_nan_policy(policy: str, max_skips: int, prefix: str = "") -> None:
    """``nan_policy`` in :data:`NAN_POLICIES` and ``nan_max_skips >= 1``."""
    check_choice(policy, NAN_POLICIES, f"{prefix}nan_policy")
    require(max_skips >= 1, f"{prefix}nan_max_skips", "an integer >= 1 (skipped steps in a row before stopping)",
            max_skips)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(data) if isinstance(data, tuple) else data}


def changed_settings(old: dict[str, Any], new: dict[str, Any], safe: Iterable[str] = (),
                     defaults: dict[str, Any] | None = None) -> list[str]:
    """``"key: was X, got Y"`` for every setting that differs between two config dicts, except ``safe`` ones.

    Keys are dotted (``data.batch_size``); an entry of ``safe`` ending in ``.*`` covers a whole section. A key
    that ``old`` lacks (a setting added to the code after that run started) counts as unchanged when ``new``
    holds its value in ``defaults``: the run was started with that behaviour.
    """
    safe = set(safe)
    a, b = _flatten(old), _flatten(new)
    for k, v in _flatten(defaults or {}).items():
        if k not in a and b.get(k) == v:
            a[k] = v

    def is_safe(key: str) -> bool:
        parts = key.split(".")
        return key in safe or any(".".join(parts[:i]) + ".*" in safe for i in range(1, len(parts)))

    return [f"{k}: was {a.get(k)!r}, got {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not is_safe(k)]


def check_resume_settings(old: dict[str, Any], new: dict[str, Any], safe: Iterable[str], where: str,
                          defaults: dict[str, Any] | None = None) -> None:
    """Refuse to resume ``where`` with settings that change the run (anything not in ``safe``).

    ``defaults`` (the config class's defaults) lets a run started before a setting existed resume with that
    setting at its default (:func:`changed_settings`).

    Raises:
        ConfigError: naming every changed setting, the ones that may change, and what to do instead.
    """
    safe = sorted(safe)
    changed = changed_settings(old, new, safe, defaults)
    if changed:
        raise ConfigError(
            f"--resume {where}: {'; '.join(changed)}; a resumed run must keep the settings it was started with "
            f"(only {', '.join(safe)} may change); drop the override(s), or start a new run")


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``["a=1", "b.c=[1, 2]"]`` into a flat ``{"a": 1, "b.c": [1, 2]}``; values are YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. lr=0.001")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return out


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {tp}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=where + ".")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            return str(value)
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (possibly nested) mapping; unknown keys raise :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known keys of {cls.__name__}: {', '.join(prefix + k for k in fields)}"
        )
    kwargs = {name: _convert(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a setting's own check: its message names the key ("optim.lr: expected ...")
        raise ConfigError(str(exc)) from exc
    except TypeError as exc:
        raise ConfigError(f"invalid {cls.__name__} config: {exc}") from exc


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML- and JSON-serialisable dict of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] | dict = ()) -> T:
    """Defaults of ``cls`` ← YAML file ``path`` ← ``overrides`` (``key=value`` strings or a flat dict)."""
    data: dict[str, Any] = config_to_dict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = _merge(data, loaded)
    flat = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    data = _merge(data, _nest(dict(flat)))
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a crash leaves the old file or none)."""
    from trainer.runs import atomic_write_text

    atomic_write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), path)
