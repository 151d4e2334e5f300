"""Search result -> genotype JSON, with a table and a heat-map of the architecture probabilities.

PAIF (Liu et al., ACM MM 2023): the derived fusion network keeps, for every searched slot, the op with the
largest architecture probability (DARTS' argmax rule, Liu et al., ICLR 2019). Commands::

    python derive/export_genotype.py                          # latest runs/**/search_result.json -> out.json
    python derive/export_genotype.py --run runs/search/search-<time> --out paif_searched.json
    python derive/export_genotype.py --exclude selfattn_w8_h2 eca_k3    # never pick these ops

Writes the genotype (``Genotype.to_json``), prints the probability table (one row per slot, ``*`` marks the
pick) and saves a heat-map PNG next to the genotype (``--png`` to change).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search_space.genotype import Genotype, GenotypeError  # noqa: E402

__all__ = ["RESULT_NAME", "find_latest_result", "load_result", "pick_architecture", "export_genotype",
           "probability_table", "save_heatmap", "main"]

log = logging.getLogger(__name__)

RESULT_NAME = "search_result.json"


def find_latest_result(root: str | Path = "runs") -> Path:
    """The most recently written ``search_result.json`` under ``root`` (recursively)."""
    root = Path(root)
    found = sorted(root.rglob(RESULT_NAME), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{root}: expected a {RESULT_NAME} somewhere below, got none; run "
                                "`python strategies/search.py` first or pass --run DIR")
    return found[-1]


def load_result(run: str | Path | None = None, root: str | Path = "runs") -> tuple[Path, dict[str, Any]]:
    """(path, result) of ``run`` (a run directory or the JSON file itself), or the latest under ``root``."""
    if run is None:
        path = find_latest_result(root)
    else:
        path = Path(run)
        path = path / RESULT_NAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"--run {run}: expected a run directory with {RESULT_NAME} or the file itself, "
                                    "got neither")
    result = json.loads(path.read_text())
    if not isinstance(result, dict) or not isinstance(result.get("probabilities"), dict):
        raise ValueError(f"{path}: expected a search result with 'probabilities', got keys "
                         f"{sorted(result) if isinstance(result, dict) else type(result).__name__}")
    return path, result


def pick_architecture(probs: Mapping[str, Mapping[str, float]], exclude: Sequence[str] = ()) -> dict[str, str]:
    """``{label: op}``: the most probable op per slot among those not in ``exclude``."""
    excluded = set(exclude)
    arch = {}
    for label, dist in probs.items():
        allowed = {op: p for op, p in dist.items() if op not in excluded}
        if not allowed:
            raise ValueError(f"{label}: expected at least one op left after --exclude {sorted(excluded)}, got none "
                             f"(candidates {sorted(dist)}); exclude fewer ops")
        arch[label] = max(allowed, key=allowed.__getitem__)
    return arch


def _channels(result: Mapping[str, Any]) -> int:
    if "channels" in result:
        return int(result["channels"])
    return int(result.get("config", {}).get("space", {}).get("channels", 32))


def export_genotype(result: Mapping[str, Any], exclude: Sequence[str] = (), channels: int | None = None) -> Genotype:
    """The validated :class:`Genotype` of a search result (argmax per slot, ``exclude`` skipped)."""
    arch = pick_architecture(result["probabilities"], exclude)
    return Genotype.from_sample(arch, channels=channels or _channels(result))


def probability_table(probs: Mapping[str, Mapping[str, float]], arch: Mapping[str, str]) -> str:
    """Plain-text table: one row per slot, one column per op, ``*`` marks the picked op."""
    ops = list(dict.fromkeys(op for dist in probs.values() for op in dist))
    width = max(7, *(len(op) for op in ops))
    label_w = max(5, *(len(label) for label in probs))
    lines = [" ".join([f"{'slot':<{label_w}}", *(f"{op:>{width}}" for op in ops)])]
    for label, dist in probs.items():
        cells = []
        for op in ops:
            if op not in dist:
                cells.append(f"{'-':>{width}}")
            else:
                mark = "*" if arch.get(label) == op else " "
                cells.append(f"{dist[op]:>{width - 1}.3f}{mark}")
        lines.append(" ".join([f"{label:<{label_w}}", *cells]))
    return "\n".join(lines)


def save_heatmap(probs: Mapping[str, Mapping[str, float]], arch: Mapping[str, str], path: str | Path,
                 title: str = "architecture probabilities") -> Path:
    """Heat-map PNG (slots x ops, empty where an op is not a candidate of the slot) with the picks boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(probs)
    ops = list(dict.fromkeys(op for dist in probs.values() for op in dist))
    grid = np.full((len(labels), len(ops)), np.nan)
    for i, label in enumerate(labels):
        for j, op in enumerate(ops):
            if op in probs[label]:
                grid[i, j] = probs[label][op]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(ops), 1.0 + 0.5 * len(labels)), dpi=100)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xticks(range(len(ops)), ops, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i, label in enumerate(labels):
        for j, op in enumerate(ops):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if grid[i, j] < np.nanmax(grid) * 0.6 else "black")
            if arch.get(label) == op:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="run directory or search_result.json (default: the latest under --root)")
    parser.add_argument("--root", default="runs", help="where to look for the latest result (default: runs)")
    parser.add_argument("--out", default="out.json", help="genotype JSON to write (default: out.json)")
    parser.add_argument("--png", help="heat-map PNG (default: next to --out, .png)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="OP", help="ops never to pick")
    parser.add_argument("--channels", type=int, help="genotype width (default: the search's channels)")
    args = parser.parse_args(argv)
    try:
        path, result = load_result(args.run, args.root)
        genotype = export_genotype(result, args.exclude, args.channels)
    except (FileNotFoundError, ValueError, GenotypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    genotype.to_json(out)
    arch = genotype.to_sample()
    png = save_heatmap(result["probabilities"], arch, args.png or out.with_suffix(".png"),
                       title=f"{path.parent.name} (epoch {result.get('epoch', '?')})")
    print(f"search result: {path}")
    print(probability_table(result["probabilities"], arch))
    print(f"genotype: {out}\nheat-map: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
