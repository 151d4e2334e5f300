"""Genotypes of the PAIF fusion space: a frozen, validated, JSON-serialisable architecture (Liu et al., ACM MM 2023).

A genotype names the ops of the three chain cells (``ir``, ``vis``, ``fused``), the fusion rule and the width.
It converts to and from NNI's sample ``{"ir/op1": "dense_k3_d1", ..., "rule": "spatial_attention"}``.
The one way to build a fixed network is :func:`build_fusion_net`, which freezes :class:`FusionSpace`.

JSON format (``version`` 1)::

    {"version": 1, "ir": ["dense_k3_d1", "dilconv_k3_d2"], "vis": [...], "fused": [...],
     "rule": "spatial_attention", "channels": 32}
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from search_space.cells import DEFAULT_RULES, FUSION_RULES
from search_space.fusion_space import CELL_SCOPES, FusionSpace
from search_space.ops import DEFAULT_CANDIDATES, OPS
from trainer.errors import PaifError

__all__ = ["Genotype", "GenotypeError", "GENOTYPES", "FORMAT_VERSION", "build_fusion_net", "get_genotype",
           "random_genotype"]

FORMAT_VERSION = 1


class GenotypeError(PaifError, ValueError):
    """A genotype (or its JSON / NNI sample) is invalid; the message names the offending field."""


@dataclass(frozen=True)
class Genotype:
    """Architecture of the fusion network.

    Attributes:
        ir, vis, fused: op names of each chain cell, in order (same length = steps per cell).
        rule: fusion-rule name from :data:`search_space.cells.FUSION_RULES`.
        channels: feature width C (even).
        version: JSON format version (:data:`FORMAT_VERSION`).
    """

    ir: tuple[str, ...]
    vis: tuple[str, ...]
    fused: tuple[str, ...]
    rule: str = "spatial_attention"
    channels: int = 32
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for cell in CELL_SCOPES:  # lists from JSON become tuples, so the dataclass stays hashable
            value = getattr(self, cell)
            if isinstance(value, list):
                object.__setattr__(self, cell, tuple(value))
        self.validate()

    @property
    def steps(self) -> int:
        """Ops per chain cell."""
        return len(self.ir)

    @property
    def ops(self) -> tuple[str, ...]:
        """Distinct op names used, in order of first appearance (ir, vis, fused)."""
        return tuple(dict.fromkeys(op for cell in CELL_SCOPES for op in getattr(self, cell)))

    def validate(self) -> None:
        """Raise :class:`GenotypeError` naming the first invalid field."""
        if isinstance(self.version, bool) or self.version != FORMAT_VERSION:
            raise GenotypeError(f"version: expected {FORMAT_VERSION}, got {self.version!r}; "
                                "re-export the genotype with this version of search_space")
        for cell in CELL_SCOPES:
            ops = getattr(self, cell)
            if not isinstance(ops, tuple) or not ops:
                raise GenotypeError(f"{cell}: expected a non-empty list of op names, got {ops!r}")
            for i, op in enumerate(ops):
                if op not in OPS:
                    raise GenotypeError(f"{cell}[{i}]: unknown op {op!r}; expected one of {sorted(OPS)}")
        lengths = {cell: len(getattr(self, cell)) for cell in CELL_SCOPES}
        if len(set(lengths.values())) != 1:
            raise GenotypeError(f"steps: expected the same number of ops in every cell, got {lengths}")
        if self.rule not in FUSION_RULES:
            raise GenotypeError(f"rule: unknown fusion rule {self.rule!r}; expected one of {sorted(FUSION_RULES)}")
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 2 \
                or self.channels % 2:
            raise GenotypeError(f"channels: expected an even integer >= 2, got {self.channels!r}")

    # --- NNI sample --------------------------------------------------------------------------------------
    def to_sample(self) -> dict[str, str]:
        """NNI sample ``{"ir/op1": ..., "vis/op1": ..., "fused/op1": ..., "rule": ...}``."""
        sample = {f"{cell}/op{i + 1}": op for cell in CELL_SCOPES for i, op in enumerate(getattr(self, cell))}
        sample["rule"] = self.rule
        return sample

    @classmethod
    def from_sample(cls, sample: Mapping[str, Any], channels: int = 32) -> "Genotype":
        """Inverse of :meth:`to_sample`; unknown or missing labels raise :class:`GenotypeError`."""
        cells: dict[str, dict[int, str]] = {cell: {} for cell in CELL_SCOPES}
        rule = None
        for label, value in sample.items():
            if label == "rule":
                rule = value
                continue
            scope, _, op = label.partition("/")
            if scope not in cells or not op.startswith("op") or not op[2:].isdigit():
                raise GenotypeError(f"sample label {label!r}: expected 'rule' or '<cell>/op<i>' with cell in "
                                    f"{CELL_SCOPES}")
            cells[scope][int(op[2:])] = value
        if rule is None:
            raise GenotypeError("rule: missing from the sample; expected a 'rule' label")
        ops = {}
        for cell, steps in cells.items():
            if not steps:
                raise GenotypeError(f"{cell}: missing from the sample; expected labels '{cell}/op1'...")
            if sorted(steps) != list(range(1, len(steps) + 1)):
                raise GenotypeError(f"{cell}: expected labels {cell}/op1..{cell}/op{len(steps)}, got steps "
                                    f"{sorted(steps)}")
            ops[cell] = tuple(steps[i] for i in range(1, len(steps) + 1))
        return cls(**ops, rule=rule, channels=channels)

    # --- JSON --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (lists, not tuples), ``version`` first."""
        d = dataclasses.asdict(self)
        return {"version": d.pop("version"), **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text of the genotype; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Genotype":
        """Build from a JSON-like mapping; checks keys and types, then :meth:`validate`."""
        if not isinstance(data, Mapping):
            raise GenotypeError(f"genotype: expected a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise GenotypeError(f"{unknown[0]}: unknown field; expected fields {sorted(fields)}")
        if "version" not in data:
            raise GenotypeError(f"version: missing; expected \"version\": {FORMAT_VERSION}")
        if data["version"] != FORMAT_VERSION:
            raise GenotypeError(f"version: expected {FORMAT_VERSION}, got {data['version']!r}")
        for cell in CELL_SCOPES:
            if cell not in data:
                raise GenotypeError(f"{cell}: missing cell; expected a list of op names under {cell!r}")
            value = data[cell]
            if isinstance(value, str) or not isinstance(value, (list, tuple)) \
                    or not all(isinstance(v, str) for v in value):
                raise GenotypeError(f"{cell}: expected a list of op names, got {value!r}")
        for key, tp in (("rule", str), ("channels", int)):
            if key in data and (not isinstance(data[key], tp) or isinstance(data[key], bool)):
                raise GenotypeError(f"{key}: expected {tp.__name__}, got {data[key]!r}")
        return cls(**{k: tuple(v) if k in CELL_SCOPES else v for k, v in data.items()})

    @classmethod
    def from_json(cls, source: str | Path) -> "Genotype":
        """Load from a JSON file path or a JSON string (text starting with '{')."""
        if isinstance(source, str) and source.lstrip().startswith("{"):
            text, where = source, "<string>"
        else:
            path = Path(source)
            if not path.is_file():
                raise GenotypeError(f"genotype file {path}: does not exist; expected a JSON file or JSON text")
            text, where = path.read_text(), str(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GenotypeError(f"genotype {where}: not valid JSON ({exc})") from exc
        return cls.from_dict(data)


GENOTYPES: dict[str, Genotype] = {
    "paif": Genotype(
        ir=("dense_k3_d1", "dilconv_k3_d2"),
        vis=("dense_k3_d1", "dense_k3_d1"),
        fused=("eca_k3", "residual_k7_d1"),
        rule="spatial_attention",
        channels=32,
    ),
}
"""Published genotypes. ``paif``: the architecture reported by PAIF (Liu et al., ACM MM 2023)."""


def get_genotype(genotype: Genotype | str | Path | Mapping[str, Any]) -> Genotype:
    """A :class:`Genotype` from itself, a name in :data:`GENOTYPES`, a JSON path / text, or a mapping."""
    if isinstance(genotype, Genotype):
        return genotype
    if isinstance(genotype, Mapping):
        return Genotype.from_dict(genotype)
    if isinstance(genotype, str) and genotype in GENOTYPES:
        return GENOTYPES[genotype]
    if isinstance(genotype, (str, Path)):
        return Genotype.from_json(genotype)
    raise GenotypeError(f"genotype: expected a Genotype, a name in {sorted(GENOTYPES)}, a JSON path or a mapping, "
                        f"got {type(genotype).__name__}")


def random_genotype(seed: int, candidates: Sequence[str] = DEFAULT_CANDIDATES, rules: Sequence[str] = DEFAULT_RULES,
                    steps: int = 2, channels: int = 32) -> Genotype:
    """A genotype drawn uniformly from the space: every op slot and the rule independently, ``random.Random(seed)``.

    The draws follow the label order of :meth:`Genotype.to_sample` (``ir/op1``, ..., ``fused/opN``, then
    ``rule``), so the same seed and space give the same genotype on every machine. The random baselines of a
    NAS comparison (Li & Talwalkar, "Random search and reproducibility for NAS", UAI 2019).
    """
    import random

    if steps < 1:
        raise GenotypeError(f"steps: expected >= 1 ops per cell, got {steps}")
    if not candidates or not rules:
        raise GenotypeError(f"random_genotype: expected non-empty candidates and rules, got {list(candidates)} and "
                            f"{list(rules)}")
    rng = random.Random(int(seed))
    cells = {cell: tuple(rng.choice(list(candidates)) for _ in range(steps)) for cell in CELL_SCOPES}
    return Genotype(**cells, rule=rng.choice(list(rules)), channels=channels)


def build_fusion_net(genotype: Genotype | str | Path | Mapping[str, Any], **space_kwargs: Any) -> nn.Module:
    """The fixed fusion network of ``genotype``: ``FusionSpace(...).freeze(genotype.to_sample())``.

    The space is built with only the genotype's ops (and rule) as candidates, so no unused op is allocated.
    ``space_kwargs`` (``eps``, ``radius``, ``output``) go to :class:`FusionSpace`.
    Returns a module ``(ir (B,1,H,W), y (B,1,H,W)) -> fused_y (B,1,H,W)``, in [0, 1] with the default
    ``output="unit"``.
    """
    g = get_genotype(genotype)
    space = FusionSpace(channels=g.channels, steps=g.steps, candidates=g.ops, rules=(g.rule,), **space_kwargs)
    return space.freeze(g.to_sample())
