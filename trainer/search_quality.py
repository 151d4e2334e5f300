"""Search quality: does the robust search find fusion architectures that beat random ones? (PAIF, issue 12)

PAIF (Liu et al., ACM MM 2023) claims that searching with the robust objective (``w_arch > 0``) picks more robust
architectures. A NAS result means little without random baselines from the same space trained by the same recipe
(Li & Talwalkar, "Random search and reproducibility for NAS", UAI 2019; Yang et al., "NAS evaluation is
frustratingly hard", ICLR 2020). The experiment driver (:mod:`trainer.experiment`, ``report: search_quality``,
``make search-eval``) retrains every genotype with the same AAT recipe from the same warm start and evaluates it
clean and under ``strong``; this module turns the finished jobs and searches into:

* ``search_quality.md`` / ``search_quality.json``: the table (mean ± sample std over retraining seeds), the rank
  of the robust-searched genotype among the random ones under the strongest threat, the targets and whether they
  hold, the search cost in CPU minutes, each search's convergence (argmax last change, entropy, top probability,
  parameter-light ops) and the stability of the search (two search seeds, slots in agreement);
* whether the benchmark can tell architectures apart at all: the spread of the random genotypes (one seed each)
  against the retraining-seed spread of one genotype (:func:`signal_noise`), and the paired per-seed difference
  robust-searched − best random;
* ``scatter.png``: clean versus strongest-threat mIoU of every genotype (random ones grey);
* ``alpha_<search>.png``: copies of each search's α trajectories.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from trainer.experiment import (BEST_RANDOM, RANDOM_PREFIX, ExperimentConfig, aggregate, finished_note, mean_std,
                                paired_differences)
from trainer.runs import atomic_save_figure

__all__ = ["arm_kinds", "rank_among", "search_targets", "signal_noise", "plot_scatter", "search_summary",
           "write_search_quality"]

#: colours of the arm kinds in the scatter
KIND_STYLE = {
    "random": {"color": "0.6", "marker": "o", "label": "random genotype (1 seed)"},
    "best-random": {"color": "0.25", "marker": "s", "label": "best random on val (mean ± std)"},
    "robust": {"color": "tab:red", "marker": "*", "label": "searched, robust objective"},
    "clean": {"color": "tab:blue", "marker": "P", "label": "searched, clean objective"},
    "reference": {"color": "tab:green", "marker": "D", "label": "hand-made / published"},
}


def arm_kinds(results: Sequence[Mapping[str, Any]], searches: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``{label: kind}``: ``random``, ``best-random``, ``robust`` / ``clean`` (a search with ``w_arch`` > 0 / = 0)
    or ``reference`` (paif, baseline, any other named genotype)."""
    kinds: dict[str, str] = {}
    for r in results:
        spec, label = str(r["job"]["genotype"]), r["job"]["label"]
        if spec.startswith(RANDOM_PREFIX):
            kinds[label] = "random"
        elif spec == BEST_RANDOM:
            kinds[label] = "best-random"
        elif spec in searches:
            kinds[label] = "robust" if float(searches[spec]["config"].get("w_arch", 0)) > 0 else "clean"
        else:
            kinds[label] = "reference"
    return kinds


def rank_among(value: float, others: Sequence[float]) -> tuple[int, int]:
    """(rank of ``value`` among ``others`` + itself, 1 = best; how many of ``others`` it beats strictly)."""
    return 1 + sum(o > value for o in others), sum(value > o for o in others)


def _stats(results: Sequence[Mapping[str, Any]], label: str, column: str) -> tuple[float, float, int]:
    vals = [r.get(column, float("nan")) for r in results if r["job"]["label"] == label]
    m, s = mean_std(vals)
    return m, s, len(vals)


def search_targets(results: Sequence[Mapping[str, Any]], kinds: Mapping[str, str], column: str
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The rank of the robust-searched genotype among the random ones under ``column`` and the issue's targets.

    Random genotypes enter with their first-seed value (each was trained once); the robust-searched one with its
    mean over seeds. ``holds`` is None where an arm is missing.
    """
    randoms = [r.get(column, float("nan")) for r in results if kinds.get(r["job"]["label"]) == "random"]
    randoms = [v for v in randoms if not math.isnan(v)]
    robust = next((lab for lab, k in kinds.items() if k == "robust"), None)
    clean = next((lab for lab, k in kinds.items() if k == "clean"), None)
    best = next((lab for lab, k in kinds.items() if k == "best-random"), None)
    rm, rs, rn = _stats(results, robust, column) if robust else (float("nan"), float("nan"), 0)
    cm = _stats(results, clean, column)[0] if clean else float("nan")
    bm, bs, bn = _stats(results, best, column) if best else (float("nan"), float("nan"), 0)
    have = robust is not None and not math.isnan(rm) and bool(randoms)
    rank, beats = rank_among(rm, randoms) if have else (None, None)
    median = sorted(randoms)[len(randoms) // 2] if len(randoms) % 2 else (
        sum(sorted(randoms)[len(randoms) // 2 - 1:len(randoms) // 2 + 1]) / 2 if randoms else float("nan"))
    spread = max(rs if rn > 1 else 0.0, bs if bn > 1 else 0.0)
    summary = {"column": column, "robust": robust, "robust_mean": rm, "robust_std": rs, "robust_seeds": rn,
               "randoms": randoms, "random_median": median, "rank": rank, "of": len(randoms) + 1 if have else None,
               "beats": beats, "best_random": best, "best_random_mean": bm, "best_random_std": bs,
               "clean_searched_mean": cm, "seed_spread": spread}
    targets = [
        {"id": "above_every_random", "claim": f"robust-searched above every random genotype under `{column}`",
         "value": [rm, max(randoms) if randoms else float("nan")],
         "holds": None if not have else beats == len(randoms) and (math.isnan(bm) or rm > bm)},
        {"id": "above_median_by_spread",
         "claim": f"robust-searched above the random median under `{column}` by more than the retraining-seed spread",
         "value": [rm - median if have else float("nan"), spread],
         "holds": None if not have or rn < 2 else rm - median > spread},
        {"id": "robust_vs_clean", "claim": f"robust-searched above clean-searched under `{column}`",
         "value": [rm, cm], "holds": None if math.isnan(rm) or math.isnan(cm) else rm > cm},
    ]
    return summary, targets


def signal_noise(results: Sequence[Mapping[str, Any]], kinds: Mapping[str, str], column: str) -> dict[str, Any]:
    """How far apart architectures are on this benchmark, measured against retraining noise.

    ``between``: sample std of ``column`` over the random genotypes (one seed each), i.e. genotype effect plus seed
    noise; ``within``: the pooled sample std over retraining seeds of every arm with more than one seed
    (``sqrt(Σ (n_i − 1) s_i² / Σ (n_i − 1))``); ``genotype_std``: ``sqrt(max(0, between² − within²))``, the spread
    the architecture itself explains (0 when the seeds explain all of it); ``ratio`` = between / within.
    """
    randoms = [float(r[column]) for r in results
               if kinds.get(r["job"]["label"]) == "random" and not math.isnan(float(r.get(column, float("nan"))))]
    between = mean_std(randoms)[1] if len(randoms) > 1 else float("nan")
    num = den = 0
    for row in aggregate(results, [column]):  # per label: the values over seeds and their mean / sample std
        n = sum(not math.isnan(float(v)) for v in row["values"][column])
        if n > 1:
            num += (n - 1) * row["stats"][column][1] ** 2
            den += n - 1
    within = math.sqrt(num / den) if den else float("nan")
    genotype_std = (math.sqrt(max(0.0, between ** 2 - within ** 2))
                    if not (math.isnan(between) or math.isnan(within)) else float("nan"))
    return {"column": column, "n_random": len(randoms), "random_min": min(randoms) if randoms else float("nan"),
            "random_max": max(randoms) if randoms else float("nan"), "between": between, "within": within,
            "within_dof": den, "genotype_std": genotype_std,
            "ratio": between / within if within and not math.isnan(between) else float("nan")}


def plot_scatter(results: Sequence[Mapping[str, Any]], kinds: Mapping[str, str], column: str, path: Path) -> Path:
    """Clean versus ``column`` test mIoU of every arm: random ones as grey dots, the others labelled, ± std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    shown: set[str] = set()
    for label in dict.fromkeys(r["job"]["label"] for r in results):
        kind = kinds.get(label, "reference")
        style = KIND_STYLE[kind]
        xm, xs, n = _stats(results, label, "clean")
        ym, ys, _ = _stats(results, label, column)
        if math.isnan(xm) or math.isnan(ym):
            continue
        legend = style["label"] if kind not in shown else None
        shown.add(kind)
        ax.errorbar(100 * xm, 100 * ym, xerr=100 * xs if n > 1 else None, yerr=100 * ys if n > 1 else None,
                    fmt=style["marker"], color=style["color"], markersize=11 if kind == "robust" else 7,
                    capsize=3, label=legend, zorder=3 if kind != "random" else 2)
        if kind != "random":
            ax.annotate(label, (100 * xm, 100 * ym), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set_xlabel("clean test mIoU (%)")
    ax.set_ylabel(f"test mIoU under `{column}` (%)")
    ax.set_title("Search quality: every genotype retrained with the same AAT recipe from the same start")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def search_summary(name: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the search table from a ``search_result.json`` dict."""
    cfg = result.get("config", {})
    conv = result.get("convergence", {})
    epochs, warm, batches = cfg.get("epochs"), cfg.get("warmup_epochs", 0), cfg.get("max_train_batches")
    arch_steps = (result.get("epoch", 0) - warm) * batches if batches else None
    return {"name": name, "w_arch": cfg.get("w_arch"), "seed": cfg.get("seed"), "complete": result.get("complete"),
            "epoch": result.get("epoch"), "epochs": epochs, "warmup_epochs": warm,
            "arch_steps": max(0, arch_steps) if arch_steps is not None else None,
            "arch_lr": cfg.get("arch_lr"), "strategy": cfg.get("strategy", "darts"),
            "cpu_minutes": result.get("cost", {}).get("cpu_minutes",
                                                      result.get("cost", {}).get("search_cpu_minutes")),
            "argmax_last_changed": conv.get("argmax_last_changed"), "stable_epochs": conv.get("stable_epochs"),
            "mean_entropy_norm": conv.get("mean_entropy_norm"),
            "min_top": min(conv["top"].values()) if conv.get("top") else None,
            "max_top": max(conv["top"].values()) if conv.get("top") else None,
            "light_share": conv.get("light_share"), "stopped_early": conv.get("stopped_early"),
            "architecture": result.get("architecture")}


def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _num(x: Any, fmt: str = "{:.2f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def write_search_quality(cfg: ExperimentConfig, out: Path, results: Sequence[dict[str, Any]],
                         searches: Mapping[str, Mapping[str, Any]], selection: Mapping[str, Any] | None,
                         wall: float, extras: Mapping[str, Any] | None = None) -> Path:
    """``search_quality.json``, ``search_quality.md``, ``scatter.png`` and ``alpha_<search>.png`` in ``out``."""
    from strategies.convergence import agreement, light_ops, light_share
    from trainer.experiment import render_table

    extras = dict(extras or {})
    column = cfg.threats[-1] if cfg.threats else "clean"
    columns = ["clean", *cfg.threats]
    kinds = arm_kinds(results, searches)
    rows = aggregate(results, columns)
    summary, targets = search_targets(results, kinds, column)
    noise = signal_noise(results, kinds, column)
    robust = summary["robust"]
    paired = {c: paired_differences(results, robust, summary["best_random"], c)
              for c in columns} if robust and summary["best_random"] else {}
    plot_scatter(results, kinds, column, out / "scatter.png")
    search_rows = [search_summary(name, res) for name, res in searches.items()]
    for name in searches:
        src = out / "searches" / name / "alpha.png"
        if src.is_file():
            shutil.copyfile(src, out / f"alpha_{name}.png")
    stability = None
    if len(cfg.stability) == 2 and all(n in searches for n in cfg.stability):
        a, b = (searches[n]["architecture"] for n in cfg.stability)
        same, total, differ = agreement(a, b)
        stability = {"searches": list(cfg.stability), "agree": same, "slots": total, "differ": differ,
                     "architectures": [a, b]}
    genotypes = {r["job"]["label"]: r.get("genotype") for r in results}
    (out / "search_quality.json").write_text(json.dumps(
        {"config": {k: v for k, v in vars(cfg).items() if not k.startswith("_")}, "jobs": list(results),
         "kinds": kinds, "summary": [{"label": r["label"], "seeds": r["seeds"],
                                     **{c: {"mean": r["stats"][c][0], "std": r["stats"][c][1]} for c in columns}}
                                    for r in rows],
         "rank": summary, "targets": targets, "signal_noise": noise, "paired_vs_best_random": paired,
         "searches": search_rows, "stability": stability,
         "selection": selection, "wall_seconds": wall, **extras}, indent=2, default=str) + "\n")

    md = ["# Search quality (synthetic RGB-T scenes)", ""]
    if "finished_jobs" in extras:
        md += [f"{finished_note(extras['finished_jobs'])} (rebuilt with `--report`).", ""]
    d = cfg.data
    md += [
        f"Command: `python -m trainer.experiment --config <this config> --out {cfg.out}` (`make search-eval`). Data: "
        f"`rgbt.synthetic` seed {d.seed}, {d.size[0]}×{d.size[1]}, {d.n_train}/{d.n_val}/{d.n_test} scenes. Every "
        f"genotype retrained from the same warm start ({' '.join(cfg.warmstart or ['none'])}) with "
        f"{' '.join(cfg.retrain)} at width {cfg.channels}; final checkpoint evaluated on the test split (mIoU %, "
        "9 classes; mean ± sample std over retraining seeds).", "",
        render_table(rows, columns), "",
        "![clean versus attacked mIoU](scatter.png)", "",
        "## Rank of the searched genotype", "",
    ]
    if summary["rank"] is not None:
        md.append(f"Under `{column}` the robust-searched genotype (**{summary['robust']}**, "
                  f"{_pct(summary['robust_mean'])} ± {_pct(summary['robust_std'])} over {summary['robust_seeds']} "
                  f"seeds) ranks **{summary['rank']} of {summary['of']}** against the {summary['of'] - 1} random "
                  f"genotypes (beats {summary['beats']}); random median {_pct(summary['random_median'])}, best random "
                  f"on val {_pct(summary['best_random_mean'])} ± {_pct(summary['best_random_std'])}, clean-searched "
                  f"{_pct(summary['clean_searched_mean'])}.")
    else:
        md.append("Not available yet: the robust-searched arm or the random arms have not finished.")
    md += ["", "| target | measured | holds |", "|---|---|---|"]
    for t in targets:
        shown = " / ".join(_pct(v) for v in t["value"])
        md.append(f"| {t['claim']} | {shown} | {'–' if t['holds'] is None else ('yes' if t['holds'] else '**no**')} |")
    pair = paired.get(column)
    if pair and pair["seeds"]:
        diffs = " / ".join(f"{100 * d:+.1f}" for d in pair["diffs"])
        md += ["", f"Paired per retraining seed ({', '.join(f's{x}' for x in pair['seeds'])}), robust-searched − best "
                   f"random under `{column}`: {diffs} = **{100 * pair['mean']:+.1f} ± {100 * pair['std']:.1f}**"
                   + (f"; clean {100 * paired['clean']['mean']:+.1f} ± {100 * paired['clean']['std']:.1f}."
                      if paired.get("clean", {}).get("seeds") else ".")]
    if not math.isnan(noise["between"]):
        md += ["", f"**Can this benchmark tell architectures apart?** Under `{column}` the {noise['n_random']} random "
                   f"genotypes span {_pct(noise['random_min'])}–{_pct(noise['random_max'])} (std "
                   f"{_pct(noise['between'])}, one seed each); one genotype retrained with other seeds varies by "
                   f"{_pct(noise['within'])} (pooled std, {noise['within_dof']} degrees of freedom). The spread the "
                   f"architecture explains, sqrt(between² − within²), is {_pct(noise['genotype_std'])} points; "
                   f"between / within = {_num(noise['ratio'])} (1 means the random genotypes differ no more than "
                   "the seeds of one genotype do)."]
    if selection:
        vals = ", ".join(f"{lab} {_pct(v['miou'])}" for lab, v in selection["values"].items())
        md += ["", f"Best random genotype chosen on the `{selection['split']}` split (first {selection['limit']} "
                   f"images) under `{selection['threat']}`: **{selection['best']['label']}** ({vals})."]
    md += ["", "## Searches", "",
           "| search | w_arch | seed | CPU min | epochs (warm-up) | arch steps | arch_lr | argmax last changed | "
           "entropy / log K | top p (min–max) | light-op slots | genotype |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in search_rows:
        arch = r["architecture"] or {}
        geno = ", ".join(f"{k}: {v}" for k, v in arch.items())
        light = f"{r['light_share'][0]}/{r['light_share'][1]}" if r["light_share"] else "–"
        md.append(f"| {r['name']}{'' if r['complete'] else ' (running)'} | {r['w_arch']} | {r['seed']} | "
                  f"{_num(r['cpu_minutes'], '{:.1f}')} | {r['epoch']}/{r['epochs']} ({r['warmup_epochs']}) | "
                  f"{_num(r['arch_steps'], '{}')} | {r['arch_lr']} | {_num(r['argmax_last_changed'], '{}')} | "
                  f"{_num(r['mean_entropy_norm'], '{:.3f}')} | {_num(r['min_top'], '{:.2f}')}–"
                  f"{_num(r['max_top'], '{:.2f}')} | {light} | {geno} |")
    if searches:
        from trainer.experiment import searched_space

        used = {op for g in genotypes.values() if g for c in ("ir", "vis", "fused") for op in g.get(c, [])}
        light = light_ops(sorted(set(searched_space(cfg)[0]) | used), cfg.channels)
        md += ["", f"Parameter-light ops (fewer parameters than one 3×3 C→C conv at width {cfg.channels}; under a "
                   f"uniform draw {len(set(light) & set(searched_space(cfg)[0]))} of {len(searched_space(cfg)[0])} "
                   f"candidates): {', '.join(f'`{o}`' for o in light) or 'none'}. Light-op slots of the retrained "
                   "genotypes: "
                   + ", ".join(f"{lab} {light_share(_arch(g), light)[0]}/{light_share(_arch(g), light)[1]}"
                               for lab, g in genotypes.items() if g) + "."]
    if stability:
        md += ["", f"**Stability**: {stability['searches'][0]} and {stability['searches'][1]} agree on "
                   f"{stability['agree']} of {stability['slots']} slots"
                   + (f" (differ: {', '.join(stability['differ'])})." if stability["differ"] else ".")]
    for name in searches:
        if (out / f"alpha_{name}.png").is_file():
            md += ["", f"α over the search `{name}`:", "", f"![alpha {name}](alpha_{name}.png)"]
    md.append("")
    path = out / "search_quality.md"
    path.write_text("\n".join(md))
    return path


def _arch(genotype: Mapping[str, Any]) -> dict[str, str]:
    """``{label: op}`` of a genotype dict (as stored in ``done.json``) without the rule."""
    return {f"{c}/op{i + 1}": op for c in ("ir", "vis", "fused") for i, op in enumerate(genotype.get(c, []))}
