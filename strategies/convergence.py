"""Has the search converged? Per-slot statistics of the architecture probabilities, argmax history, the share of
parameter-light ops, early stopping on argmax stability, agreement of two searches, and the α-trajectory plot.

DARTS (Liu et al., ICLR 2019) keeps one softmax over candidate ops per slot (NNI label). A search that has not
left the uniform distribution ``1/K`` has chosen nothing: its argmax is noise. The measures here make that
visible every epoch:

* ``entropy`` (nats) and ``entropy_norm = entropy / log K`` (1 = uniform, 0 = one-hot);
* ``top``: the largest probability, and ``max_dev = max_k |p_k - 1/K|`` (the distance from uniform the tests use);
* the argmax genotype per epoch and the epoch it **last changed**;
* ``light_share``: the share of op slots whose argmax is a *parameter-light* op — fewer parameters than one plain
  3×3 C→C convolution (``9·C²``) at the search width. DARTS is known to collapse onto such cheap ops (skip
  connections and pooling in its own space; Zela et al., ICLR 2020; Liang et al., "DARTS+", 2019); in the PAIF
  space these are the separable, dilated-separable and windowed-attention blocks. Under uniform sampling of the
  default 11 candidates the expected share is 5/11.

Early stopping on argmax stability is DARTS+'s criterion (Liang et al. 2019, arXiv 1909.06035, §3.2: stop when
the ranking of the architecture parameters is stable for a number of epochs), used here as the guard against a
late drift into cheap ops: :func:`stable_for` counts the architecture epochs since the argmax last changed.

Command (a finished or running search; with two, also the slots in which their argmax agree)::

    python -m strategies.convergence RUN_DIR [RUN_DIR_2]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from trainer.runs import atomic_save_figure

__all__ = [
    "slot_stats",
    "summary_stats",
    "argmax_of",
    "last_change_epoch",
    "stable_for",
    "param_counts",
    "light_ops",
    "light_share",
    "agreement",
    "plot_alpha",
    "history_table",
    "main",
]

Probs = Mapping[str, Mapping[str, float]]


def slot_stats(dist: Mapping[str, float]) -> dict[str, float | str]:
    """Statistics of one slot's distribution ``{op: p}`` (probabilities summing to 1).

    Returns:
        ``{"entropy" (nats), "entropy_norm" (entropy / log K, 1 for K = 1), "top", "argmax", "max_dev"}``.
    """
    if not dist:
        raise ValueError("slot_stats: expected a non-empty {op: probability} mapping, got an empty one")
    ps = [float(p) for p in dist.values()]
    k = len(ps)
    entropy = -sum(p * math.log(p) for p in ps if p > 0)
    argmax = max(dist.items(), key=lambda kv: kv[1])[0]
    return {"entropy": entropy, "entropy_norm": entropy / math.log(k) if k > 1 else 1.0, "top": max(ps),
            "argmax": str(argmax), "max_dev": max(abs(p - 1.0 / k) for p in ps)}


def summary_stats(probs: Probs) -> dict[str, dict[str, float | str]]:
    """:func:`slot_stats` of every slot, keyed by label."""
    return {str(label): slot_stats(dist) for label, dist in probs.items()}


def argmax_of(probs: Probs) -> dict[str, str]:
    """``{label: most probable op}`` (ties: the first listed)."""
    return {str(label): str(slot_stats(dist)["argmax"]) for label, dist in probs.items()}


def last_change_epoch(history: Sequence[Mapping[str, Any]]) -> int | None:
    """The epoch (``history[i]["epoch"]``) at which the argmax genotype last differed from the epoch before.

    ``history`` is the per-epoch record of :class:`strategies.darts.SearchRecorder` (each with ``"epoch"`` and
    ``"argmax"``), oldest first. Returns the first epoch when the argmax never changed, None for an empty history.
    """
    if not history:
        return None
    last = int(history[0]["epoch"])
    for prev, cur in zip(history, history[1:]):
        if dict(cur["argmax"]) != dict(prev["argmax"]):
            last = int(cur["epoch"])
    return last


def stable_for(history: Sequence[Mapping[str, Any]]) -> int:
    """Consecutive architecture epochs (``"arch": True``) at the end of ``history`` with an unchanged argmax.

    Epochs without architecture steps (weight warm-up) are not counted; 0 when the last epoch changed the argmax
    or when no architecture epoch has run.
    """
    arch = [h for h in history if h.get("arch", True)]
    count = 0
    for prev, cur in zip(reversed(arch[:-1]), reversed(arch[1:])):
        if dict(cur["argmax"]) != dict(prev["argmax"]):
            break
        count += 1
    return count


def param_counts(candidates: Sequence[str], channels: int) -> dict[str, int]:
    """Parameters of every candidate op at width ``channels`` (built from :data:`search_space.ops.OPS`)."""
    from search_space.ops import OPS

    unknown = [c for c in candidates if c not in OPS]
    if unknown:
        raise ValueError(f"param_counts: unknown op(s) {unknown}; expected names from search_space.ops.OPS")
    return {c: sum(p.numel() for p in OPS[c](channels).parameters()) for c in candidates}


def light_ops(candidates: Sequence[str], channels: int) -> list[str]:
    """The parameter-light candidates: fewer parameters than one 3×3 C→C convolution (``9·C²``)."""
    limit = 9 * channels * channels
    return [op for op, n in param_counts(candidates, channels).items() if n < limit]


def light_share(architecture: Mapping[str, str], light: Sequence[str]) -> tuple[int, int]:
    """(op slots whose choice is in ``light``, op slots); the fusion rule (label ``rule``) is not an op slot."""
    slots = {label: op for label, op in architecture.items() if label != "rule"}
    return sum(op in set(light) for op in slots.values()), len(slots)


def agreement(a: Mapping[str, str], b: Mapping[str, str]) -> tuple[int, int, list[str]]:
    """(slots where two architectures choose the same op, slots compared, labels that differ).

    Raises:
        ValueError: the two architectures do not have the same labels.
    """
    if set(a) != set(b):
        raise ValueError(f"agreement: expected the same labels, got {sorted(set(a) ^ set(b))} in only one of them")
    differ = [label for label in a if a[label] != b[label]]
    return len(a) - len(differ), len(a), differ


def plot_alpha(history: Sequence[Mapping[str, Any]], path: str | Path, title: str = "",
               light: Sequence[str] = ()) -> Path:
    """One panel per slot: every op's probability over the epochs (top-3 at the end labelled), written atomically.

    Epochs without architecture steps (weight warm-up) are shaded; parameter-light ops (``light``) are dashed;
    the dotted line is the uniform ``1/K``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("plot_alpha: expected at least one epoch of history, got none")
    path = Path(path)
    labels = list(history[-1]["probabilities"])
    cols = min(4, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), dpi=110, squeeze=False)
    epochs = [int(h["epoch"]) for h in history]
    warm = [e for e, h in zip(epochs, history) if not h.get("arch", True)]
    all_ops = list(dict.fromkeys(op for label in labels for op in history[-1]["probabilities"][label]))
    cmap = plt.get_cmap("tab20")
    colour = {op: cmap(i % 20) for i, op in enumerate(all_ops)}  # one colour per op in every panel
    for ax, label in zip(axes.flat, labels):
        ops = list(history[-1]["probabilities"][label])
        final = history[-1]["probabilities"][label]
        top3 = sorted(ops, key=lambda o: -final[o])[:3]
        for op in ops:
            ys = [h["probabilities"][label][op] for h in history]
            ax.plot(epochs, ys, linestyle="--" if op in set(light) else "-", linewidth=1.6 if op in top3 else 0.8,
                    alpha=1.0 if op in top3 else 0.45, label=op if op in top3 else None, color=colour[op])
        ax.axhline(1.0 / len(ops), color="k", linestyle=":", linewidth=0.8)
        if warm:
            ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="0.9", zorder=0)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("p", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle(title or "architecture probabilities over the search (shaded: weight warm-up; dashed: light ops)",
                 fontsize=9)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def history_table(history: Sequence[Mapping[str, Any]], light: Sequence[str] = ()) -> str:
    """Markdown table, one row per epoch: architecture steps on?, mean entropy/log K, top p (min–max over slots),
    max |p − 1/K|, slots whose argmax changed since the epoch before, light-op slots of the argmax."""
    rows = ["| epoch | arch | entropy / log K (mean) | top p (min–max) | max \\|p − 1/K\\| | argmax changes | "
            "light-op slots |", "|---|---|---|---|---|---|---|"]
    prev: Mapping[str, str] | None = None
    for h in history:
        stats = h["stats"].values()
        changed = "–" if prev is None else str(sum(prev[k] != v for k, v in h["argmax"].items()))
        light_n, slots = light_share(h["argmax"], light)
        rows.append(f"| {h['epoch']} | {'yes' if h.get('arch', True) else 'warm-up'} | "
                    f"{sum(s['entropy_norm'] for s in stats) / len(stats):.3f} | "
                    f"{min(s['top'] for s in stats):.3f}–{max(s['top'] for s in stats):.3f} | "
                    f"{max(s['max_dev'] for s in stats):.3f} | {changed} | {light_n}/{slots} |")
        prev = h["argmax"]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m strategies.convergence", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="search run folder(s) holding search_result.json")
    args = p.parse_args(argv)
    results = []
    for run in args.runs:
        path = Path(run) / "search_result.json"
        if not path.is_file():
            print(f"error: {path} does not exist; expected a search run folder", file=sys.stderr)
            return 2
        res = json.loads(path.read_text())
        if not res.get("history"):
            print(f"error: {path} has no per-epoch history; it was written before convergence logging existed",
                  file=sys.stderr)
            return 2
        results.append(res)
        conv = res["convergence"]
        print(f"## {run} (epoch {res['epoch']}/{res['epochs']}, {res['cost'].get('cpu_minutes', res['cost'].get('search_cpu_minutes')):.1f} CPU-min)\n")
        print(history_table(res["history"], conv.get("light_ops", ())))
        print(f"\nargmax last changed at epoch {conv['argmax_last_changed']}; architecture {res['architecture']}\n")
    if len(results) == 2:
        same, total, differ = agreement(results[0]["architecture"], results[1]["architecture"])
        print(f"agreement: {same} of {total} slots" + (f" (differ: {', '.join(differ)})" if differ else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
