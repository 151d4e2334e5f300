"""Search result -> genotype JSON, with a table and a heat-map of the architecture probabilities.

PAIF (Liu et al., ACM MM 2023): the derived fusion network keeps, for every searched slot, the op with the
largest architecture probability (DARTS' argmax rule, Liu et al., ICLR 2019). Commands::

    python derive/export_genotype.py --experiment <id>         # best finished trial of an nnictl sweep
    python derive/export_genotype.py --experiment runs/nni-experiments/<id> --out paif_searched.json
    python derive/export_genotype.py --run runs/search/search-<time>    # one search run
    python derive/export_genotype.py                          # the newest search_result.json under runs/;
                                                              # inside an NNI experiment: its best trial
    python derive/export_genotype.py --exclude selfattn_w8_h2 eca_k3    # never pick these ops

Trials of an experiment are ranked by the selection metric each search stores in its ``search_result.json``
(``selection``: the held-out adversarial task loss, :mod:`strategies.selection`, comparable across trials, unlike
the DARTS losses that mix in ``w_arch``); only SUCCEEDED trials count, never the newest by file time.

Writes the genotype (``Genotype.to_json``, loadable as is), its provenance next to it (``out.provenance.json``:
experiment, trial, metric name and value, the search config, every candidate trial), prints the probability
table (one row per slot, ``*`` marks the pick) and saves a heat-map PNG next to the genotype (``--png``).
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

from search_space.genotype import Genotype  # noqa: E402
from trainer.errors import PaifError, entry_point  # noqa: E402
from trainer.runs import atomic_write_text  # noqa: E402

__all__ = ["RESULT_NAME", "EXPERIMENT_ROOTS", "ExportError", "find_latest_result", "load_result", "find_experiment_dir",
           "experiment_of", "pick_best_trial", "provenance_path", "pick_architecture", "export_genotype",
           "probability_table", "save_heatmap", "main"]

log = logging.getLogger(__name__)

RESULT_NAME = "search_result.json"


class ExportError(PaifError, ValueError):
    """A search result or an NNI experiment that no genotype can be exported from (named in the message)."""


#: where ``--experiment <id>`` is looked up (search.yml's experimentWorkingDirectory, then NNI's default)
EXPERIMENT_ROOTS = ("runs/nni-experiments", "~/nni-experiments")
_DB = Path("db") / "nni.sqlite"


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
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: expected a search result (JSON), got unreadable text ({exc}); was the search "
                          "interrupted while writing it?") from exc
    if not isinstance(result, dict) or not isinstance(result.get("probabilities"), dict):
        raise ExportError(f"{path}: expected a search result with 'probabilities', got keys "
                         f"{sorted(result) if isinstance(result, dict) else type(result).__name__}")
    return path, result


def find_experiment_dir(experiment: str | Path, roots: Sequence[str | Path] = EXPERIMENT_ROOTS) -> Path:
    """The directory of an NNI experiment given as its directory or its id (looked up under ``roots``)."""
    path = Path(experiment).expanduser()
    if (path / _DB).is_file():
        return path
    for root in roots:
        candidate = Path(root).expanduser() / str(experiment)
        if (candidate / _DB).is_file():
            return candidate
    raise FileNotFoundError(f"--experiment {experiment}: expected an NNI experiment directory (with {_DB}) or an "
                            f"experiment id under {', '.join(str(r) for r in roots)}, got neither")


def experiment_of(result_path: str | Path) -> Path | None:
    """The NNI experiment directory that holds ``result_path`` (a trial's result), or None."""
    for parent in Path(result_path).resolve().parents:
        if (parent / _DB).is_file():
            return parent
    return None


def pick_best_trial(exp_dir: str | Path) -> tuple[dict[str, Any], Path, dict[str, Any], list[dict[str, Any]]]:
    """(trial, result path, result, candidates) of the best finished trial of an NNI experiment.

    Only trials whose status is SUCCEEDED and whose ``search/search_result.json`` holds a ``selection`` metric
    compete; the best has the lowest value (``mode: min``; the highest for ``max``), ties broken by trial id.
    ``candidates`` lists every trial with its status, metric value (None when it did not compete) and why not.
    """
    from strategies.nni_local import experiment_summary

    summary = experiment_summary(exp_dir)
    candidates, ranked = [], []
    for trial in summary["trials"]:
        entry = {"trial": trial["id"], "status": trial.get("status"), "parameters": trial.get("parameters"),
                 "value": None}
        if trial.get("status") != "SUCCEEDED":
            entry["skipped"] = "not SUCCEEDED"
        elif not trial.get("result"):
            entry["skipped"] = f"no search/{RESULT_NAME}"
        else:
            result = json.loads(Path(trial["result"]).read_text())
            selection = result.get("selection")
            if not isinstance(selection, dict) or not isinstance(selection.get("value"), (int, float)) \
                    or math.isnan(selection["value"]):
                entry["skipped"] = "no selection metric in the result (a search from before the metric existed?)"
            else:
                entry.update(metric=selection.get("metric"), value=float(selection["value"]))
                ranked.append((trial, Path(trial["result"]), result, selection))
        candidates.append(entry)
    if not ranked:
        statuses = ", ".join(f"{c['trial']}: {c['status']} ({c.get('skipped', '')})" for c in candidates) or "none"
        raise ExportError(f"experiment {exp_dir}: expected at least one SUCCEEDED trial with a selection metric in "
                         f"its {RESULT_NAME}, got none (trials: {statuses})")
    metrics = {(sel.get("metric"), sel.get("mode", "min")) for *_, sel in ranked}
    if len(metrics) != 1:
        raise ExportError(f"experiment {exp_dir}: expected one selection metric across trials, got {sorted(metrics)}")
    (_, mode), = metrics
    sign = -1.0 if mode == "max" else 1.0
    trial, path, result, _ = min(ranked, key=lambda r: (sign * r[3]["value"], r[0]["id"]))
    return trial, path, result, candidates


def provenance_path(out: str | Path) -> Path:
    """``out.json`` -> ``out.provenance.json`` (a sidecar: the genotype file stays loadable as it is)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.provenance.json")


def pick_architecture(probs: Mapping[str, Mapping[str, float]], exclude: Sequence[str] = ()) -> dict[str, str]:
    """``{label: op}``: the most probable op per slot among those not in ``exclude``."""
    excluded = set(exclude)
    arch = {}
    for label, dist in probs.items():
        allowed = {op: p for op, p in dist.items() if op not in excluded}
        if not allowed:
            raise ExportError(f"{label}: expected at least one op left after --exclude {sorted(excluded)}, got none "
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


def _select(args: argparse.Namespace) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(result path, result, provenance) for the CLI arguments."""
    exp_dir: Path | None = None
    if args.experiment:
        exp_dir = find_experiment_dir(args.experiment)
    elif args.run is None:
        latest = find_latest_result(args.root)
        exp_dir = experiment_of(latest)
        if exp_dir is None:
            path, result = load_result(latest)
        else:
            log.info("%s belongs to NNI experiment %s: exporting its best finished trial, not the newest", latest,
                     exp_dir.name)
    else:
        path, result = load_result(args.run)
    provenance: dict[str, Any] = {"experiment_id": None, "experiment_dir": None, "trial_id": None}
    if exp_dir is not None:
        trial, path, result, candidates = pick_best_trial(exp_dir)
        provenance.update(experiment_id=exp_dir.name, experiment_dir=str(exp_dir), trial_id=trial["id"],
                          trial_parameters=trial.get("parameters"), candidates=candidates)
        load_result(path)  # validates the file
    selection = result.get("selection") or {}
    provenance.update(result=str(path), metric=selection.get("metric"), value=selection.get("value"),
                      mode=selection.get("mode"), selection_settings=selection.get("settings"),
                      epoch=result.get("epoch"), search_config=result.get("config"))
    return path, result, provenance


@entry_point
def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 with one line on stderr (no usable result, bad genotype, a file-system error)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--experiment", metavar="ID_OR_DIR",
                        help="NNI experiment id (under runs/nni-experiments or ~/nni-experiments) or directory: "
                             "export its best finished trial")
    source.add_argument("--run", help="run directory or search_result.json")
    parser.add_argument("--root", default="runs", help="where to look for the newest result (default: runs)")
    parser.add_argument("--out", default="out.json", help="genotype JSON to write (default: out.json)")
    parser.add_argument("--png", help="heat-map PNG (default: next to --out, .png)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="OP", help="ops never to pick")
    parser.add_argument("--channels", type=int, help="genotype width (default: the search's channels)")
    args = parser.parse_args(argv)
    path, result, provenance = _select(args)
    genotype = export_genotype(result, args.exclude, args.channels)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(genotype.to_json(), out)
    provenance.update(genotype=str(out), exclude=list(args.exclude))
    prov = provenance_path(out)
    atomic_write_text(json.dumps(provenance, indent=2) + "\n", prov)
    arch = genotype.to_sample()
    png = save_heatmap(result["probabilities"], arch, args.png or out.with_suffix(".png"),
                       title=f"{path.parent.name} (epoch {result.get('epoch', '?')})")
    if provenance["trial_id"] is not None:
        print(f"experiment {provenance['experiment_id']}: trial {provenance['trial_id']} "
              f"({provenance['metric']} = {provenance['value']:.4f}, best of "
              f"{sum(c['value'] is not None for c in provenance['candidates'])} finished trials)")
    print(f"search result: {path}")
    print(probability_table(result["probabilities"], arch))
    print(f"genotype: {out}\nprovenance: {prov}\nheat-map: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
