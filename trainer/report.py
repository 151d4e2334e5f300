"""Evaluation reports: ``report.json``, ``report.md`` and PNG pictures (sample grids, mIoU-versus-ε curves).

PAIF: Liu et al., "PAIF: Perception-Aware Infrared-Visible Image Fusion for Attack-Tolerant Semantic
Segmentation", ACM MM 2023. The report is meant for a newcomer: every table says what its numbers mean,
every threat model is described in words, and the pictures show what the attack does to the images.

Pure functions of a plain report dict (built by ``trainer/evaluate.py``); nothing here runs a model.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from matplotlib.patches import Patch  # noqa: E402

from rgbt.classes import CLASSES, PALETTE, colorize  # noqa: E402
from trainer.runs import atomic_write_text  # noqa: E402

__all__ = [
    "METRIC_HELP", "FUSION_METRIC_HELP", "to_jsonable", "write_json", "write_markdown", "render_markdown",
    "save_grid", "save_grid_rows", "load_grid_rows", "grid_name", "grid_figure", "save_curves", "save_radar", "GridRow", "DELTA_COLUMNS",
]

log = logging.getLogger(__name__)

GridRow = dict  # {"label": str, "ir": (H,W) float [0,1], "vis": (H,W,3) float [0,1], "fused": (H,W,3) float,
#                  "pred": (H,W) int | None, "gt": (H,W) int | None, "delta": (H,W) float [0,1] | None,
#                  "delta_ir": (H,W) float [0,1] | None}  (deltas are |perturbation| / ε, 1 = full budget)

METRIC_HELP: dict[str, str] = {
    "mIoU": "mean over the 9 classes (including 'unlabeled', the reference convention) of "
            "IoU = TP / (TP + FP + FN), from one confusion matrix over all test pixels; pixels labelled 255 are "
            "ignored. Higher is better, 1 is perfect.",
    "mIoU_objects": "the same mean over the 8 object classes only (without 'unlabeled').",
    "mAcc": "mean over classes of the per-class recall TP / (TP + FN).",
    "drop": "clean mIoU minus attacked mIoU: how much the attack costs; smaller means more robust.",
}
FUSION_METRIC_HELP: dict[str, str] = {
    "EN": "entropy of the fused image's grey levels (bits): information content; higher is richer.",
    "SD": "standard deviation of the fused image: contrast; higher is more contrast.",
    "SF": "spatial frequency: overall activity of row and column differences; higher is sharper.",
    "AG": "average gradient magnitude: detail and sharpness; higher is sharper.",
    "MI": "mutual information of the fused image with the IR image plus that with the VIS image (bits); "
          "higher keeps more of the sources.",
    "SCD": "sum of the correlations of differences (Aslantas & Bendes): how much of each source's "
           "complementary content the fused image carries; higher is better.",
    "VIF": "visual information fidelity of the fused image with respect to IR plus that to VIS; higher is better.",
    "Qabf": "edge-preservation quality (Xydeas & Petrovic), in [0, 1]; higher keeps more source edges.",
    "SSIM": "structural similarity of the fused image to IR plus that to VIS (a sum, so at most 2); higher is "
            "more faithful structure.",
}


# -------------------------------------------------------------------------------------------------- json
def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: NaN/inf become None, numpy/torch scalars become floats, tuples/Paths lists/str."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, np.ndarray) or (hasattr(obj, "tolist") and not isinstance(obj, (int, float))):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, int):
        return obj
    return str(obj)


def write_json(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``report`` as indented, strictly valid JSON (no NaN)."""
    return atomic_write_text(json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n", path)


# -------------------------------------------------------------------------------------------- markdown
def _f(v: Any, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _segmentation_section(report: Mapping[str, Any]) -> list[str]:
    clean = report["clean"]["segmentation"]
    threats = report["threats"]
    lines = ["## Segmentation under attack", "",
             "Numbers are percentages. *clean* is the model on unmodified images; *attacked* is the same images "
             "after the threat model perturbed them.", ""]
    rows = [["clean (no attack)", _f(clean["miou"]), "–", _f(clean["miou_objects"]), _f(clean["macc"])]]
    for name, t in threats.items():
        s = t.get("segmentation")
        if s is None:
            continue
        rows.append([f"`{name}`", _f(s["miou"]), _f(clean["miou"] - s["miou"]), _f(s["miou_objects"]), _f(s["macc"])])
    lines += _table(["condition", "mIoU", "drop", "mIoU (objects)", "mAcc"], rows)
    lines += _miou_convention_lines(report, clean)
    header = ["class", "clean"] + [f"`{n}`" for n, t in threats.items() if t.get("segmentation")]
    rows = []
    for c in CLASSES:
        row = [c, _f(clean["iou"].get(c))]
        row += [_f(t["segmentation"]["iou"].get(c)) for t in threats.values() if t.get("segmentation")]
        rows.append(row)
    lines += ["Per-class IoU (– = the class never occurs and is never predicted):", ""] + _table(header, rows)
    return lines


#: how each mIoU convention treats a class absent from both the ground truth and the prediction
MIOU_CONVENTION_TEXT = {
    "published": "classes absent from both the ground truth and the prediction count as IoU 0 and the mean runs "
                 "over all 9 classes (8 for objects), as in the published PAIF / MFNet evaluation",
    "present": "classes absent from both the ground truth and the prediction drop out of the mean, which runs "
               "over the classes present only",
}


def _miou_convention_lines(report: Mapping[str, Any], clean: Mapping[str, Any]) -> list[str]:
    """The mIoU convention used in the tables, and the clean mIoU under the other one."""
    used = clean.get("miou_convention", report.get("miou_convention", "published"))
    text = f"mIoU convention: **{used}** — {MIOU_CONVENTION_TEXT.get(used, 'unknown')}."
    others = {k: v for k, v in (clean.get("miou_by_convention") or {}).items() if k != used}
    for name, v in others.items():
        text += (f" Under the **{name}** convention ({MIOU_CONVENTION_TEXT.get(name, '')}) the clean mIoU is "
                 f"{_f(v.get('miou'))} and the clean object mIoU {_f(v.get('miou_objects'))}.")
    return [text, ""]


def _fusion_section(report: Mapping[str, Any]) -> list[str]:
    clean = report["clean"]["fusion"]
    if not clean:
        return []
    names = list(clean)
    conds = [("clean", clean)] + [(f"`{n}`", t["fusion"]) for n, t in report["threats"].items() if t.get("fusion")]
    lines = ["## Fusion quality", "",
             "No-reference fusion metrics of the fused image (mean over images; see the glossary below). "
             "Under attack they describe the image the segmenter actually saw.", ""]
    rows = [[cond] + [_f(m.get(k), pct=False) for k in names] for cond, m in conds]
    return lines + _table(["condition"] + names, rows)


def _sweep_section(report: Mapping[str, Any]) -> list[str]:
    sweep = report.get("eps_sweep") or {}
    if not sweep:
        return []
    key = report.get("eps_sweep_metric", "miou")
    label = {"miou": "mIoU (%)",
             "fused_psnr": "PSNR of attacked vs clean fused image (dB; 100 = identical, lower = more changed)",
             }.get(key, key)
    eps = sorted({p["eps_255"] for pts in sweep.values() for p in pts})
    lines = ["## Robustness versus attack budget ε", "",
             f"Each threat model re-run with budget ε/255 (all other settings unchanged); value: {label}. "
             "A robust model degrades slowly as ε grows.", ""]
    rows = []
    for name, pts in sweep.items():
        by = {p["eps_255"]: p.get(key) for p in pts}
        if key == "miou":
            rows.append([f"`{name}`"] + [_f(by.get(e)) for e in eps])
        else:
            rows.append([f"`{name}`"] + ["–" if by.get(e) is None else f"{by[e]:.1f}" for e in eps])
    lines += _table(["threat"] + [f"ε={e:g}/255" for e in eps], rows)
    if report.get("pictures", {}).get("curves"):
        lines += [f"![{label} versus ε]({report['pictures']['curves']})", ""]
    return lines


def _masking_warnings(report: Mapping[str, Any]) -> list[str]:
    """A visible warning per fired gradient-masking check (empty when none fired or none ran)."""
    masking = report.get("masking") or {}
    lines = []
    for c in masking.get("checks", []):
        if c["status"] == "FIRED":
            lines += [f"> **⚠ Gradient-masking warning: check `{c['check']}` fired** on {c['fired_images']} of "
                      f"{c['images']} images (expected: {c['what']}). The white-box attacks may be fooled by useless "
                      f"gradients, so `{masking['threat']}` may overstate robustness; its number below already "
                      "includes the black-box and transfer results.", ""]
    return lines


def _robustness_sections(report: Mapping[str, Any]) -> list[str]:
    """Attack cost and time, each worst-case member alone, per-modality threats, the masking checks."""
    threats, lines = report["threats"], []
    rows = []
    for name, t in threats.items():
        cost = t.get("cost") or {}
        if cost:
            rows.append([f"`{name}`", str(cost.get("forward", "–")), str(cost.get("backward", "–")),
                         f"{t.get('seconds', 0):.1f}"])
    if rows:
        lines += ["## Attack budget and cost", "",
                  "Passes through the model per image (a backward pass costs about twice a forward) and the wall "
                  "time of the attack over the whole evaluation.", ""]
        lines += _table(["threat", "forward / image", "backward / image", "time (s)"], rows)
    for name, t in threats.items():
        members = t.get("members")
        if not members:
            continue
        lines += [f"### Each attack of `{name}` alone", "",
                  f"mIoU under each member alone (its own worst iterate per image). `{name}` takes, per image, the "
                  "member with the lowest pixel accuracy (so per image it is never better than any of them); its "
                  "segmentation numbers then take, per image, that choice or one member alone, whichever assignment "
                  "gives the lowest mIoU pooled over all images (starting from the best single member), so overall "
                  "it is never above any member either. Its fused-image metrics and pictures are those of the "
                  "per-image choice.", ""]
        rows = [[f"`{m}`", _f(v)] for m, v in members.items()]
        rows.append([f"**`{name}`** (white-box worst case)", _f(t.get("white_box_miou", t["segmentation"]["miou"]))])
        lines += _table(["attack", "mIoU"], rows)
        sel = t.get("selection")
        if sel:
            used = ", ".join(f"{k}: {v}" for k, v in sel["images_per_candidate"].items())
            lines += ["", f"Per-image choice by pixel accuracy alone: {_f(sel['per_image_worst_case_miou'])} mIoU; "
                          f"the pooled selection: {_f(sel['miou'])} (images per candidate: {used}).", ""]
    bases = [n for n in threats if f"{n}-ir-only" in threats and f"{n}-vis-only" in threats]
    if bases and report["data"]["labelled"]:
        lines += ["## One sensor attacked", "",
                  "The same attacks on both images, on the infrared image only and on the visible image only "
                  "(mIoU). A fused model is still vulnerable when the attacker controls a single camera.", ""]
        rows = [[f"`{b}`"] + [_f(threats[n]["segmentation"]["miou"]) for n in (b, f"{b}-ir-only", f"{b}-vis-only")]
                for b in bases]
        lines += _table(["threat", "both", "IR only", "VIS only"], rows)
    masking = report.get("masking")
    if masking:
        lines += ["## Gradient-masking checks", "",
                  f"After `{masking['threat']}`: does the attacked loss rise, and does a black-box or a transfer attack "
                  "do better than the white-box worst case on any image? A defence that only hides its gradients "
                  "fails these. A fired check is a warning at the top of this report; the black-box and transfer "
                  f"results are part of `{masking['threat']}`'s number either way.", ""]
        rows = [[f"`{c['check']}`", c["what"], c["status"] if c["status"] != "FIRED" else "**FIRED**",
                 f"{c['fired_images']} / {c['images']}"] for c in masking["checks"]]
        lines += _table(["check", "expected", "result", "images fired"], rows)
        t = threats.get(masking["threat"], {})
        if t.get("white_box_miou") is not None:
            lines += [f"White-box mIoU {_f(t['white_box_miou'])}; with the black-box and transfer results "
                      f"{_f(t['segmentation']['miou'])}; checks took {masking.get('seconds', 0):.1f} s.", ""]
    return lines


def _glossary(report: Mapping[str, Any]) -> list[str]:
    lines = ["## How to read this report", "", "**Threat models** (what the attacker may do):", ""]
    for name, t in report["threats"].items():
        lines.append(f"* `{name}` — {t.get('description', '')}  \n  exact settings: `{t.get('attack', '')}`")
    lines += ["", "All attacks are white-box: the attacker knows the weights and perturbs the IR and/or visible "
              "image within an L∞ (or L2) ball of radius ε in [0, 1] pixel units (8/255 ≈ 3 % of the range), "
              "then clips to valid images.", ""]
    if report["data"]["labelled"]:
        lines += ["**Segmentation metrics:**", ""] + [f"* **{k}** — {v}" for k, v in METRIC_HELP.items()] + [""]
    lines += ["**Fusion metrics** (no reference image exists; they compare the fused image with the sources):", ""]
    lines += [f"* **{k}** — {v}" for k, v in FUSION_METRIC_HELP.items()] + [""]
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    """The human-readable report: summary tables, pictures, a glossary of threat models and metrics."""
    ck, data = report["checkpoint"], report["data"]
    lines = ["# PAIF evaluation report", ""]
    scale = (ck.get("model_options") or {}).get("seg_scale", 1)
    seen = f" on the fused image upsampled x{scale}" if scale != 1 else ""
    lines += [f"* checkpoint: `{ck.get('path')}` (genotype `{ck.get('genotype_summary', '')}`, "
              f"segmenter MiT-{ck.get('segmenter', {}).get('variant')}{seen}, {ck.get('num_parameters', '?')} "
              "parameters)",
              f"* data: `{data['root']}` split `{data['split']}`, {data['num_images']} images, "
              f"{'labelled' if data['labelled'] else 'unlabelled (fusion metrics and the label-free fusion attack only)'}",
              f"* threat models: {', '.join(f'`{n}`' for n in report['threats'])}",
              f"* device: {report.get('device', '?')}; run time {report.get('elapsed_s', 0):.0f} s; "
              f"created {report.get('created', '')}", ""]
    lines += _masking_warnings(report)
    if report.get("notes"):
        lines += ["**Notes:**", ""] + [f"* {n}" for n in report["notes"]] + [""]
    if data["labelled"]:
        lines += _segmentation_section(report)
    lines += _robustness_sections(report)
    lines += _fusion_section(report)
    lines += _sweep_section(report)
    grids = report.get("pictures", {}).get("grids", {})
    if grids:
        lines += ["## Samples", "",
                  "Rows: each sample clean, then attacked. Columns: infrared input, visible input, fused image "
                  "(what the segmenter sees), predicted classes, ground truth (if labelled) and the size of the "
                  "perturbation the attack added (|δ| / ε, largest over the colour channels; 1 = the attack used "
                  "its full L∞ budget ε at that pixel, see the colour bar; n/a on clean rows).", ""]
        for name, png in grids.items():
            lines += [f"### `{name}`", "", f"![samples, {name}]({png})", ""]
    lines += _glossary(report)
    v = report.get("versions", {})
    lines += ["## Environment", "", ", ".join(f"{k} {v[k]}" for k in v), ""]
    return "\n".join(lines)


def write_markdown(report: Mapping[str, Any], path: str | Path) -> Path:
    """Render :func:`render_markdown` into ``path`` (picture links are relative to its directory)."""
    return atomic_write_text(render_markdown(to_jsonable(report)), path)


# ---------------------------------------------------------------------------------------------- pictures
def _as_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.clip(img, 0.0, 1.0)


# Perturbation columns: row key -> column header. The values are |δ| / ε, so 1 means the attack used its
# whole L∞ budget at that pixel (a sign-step PGD pushes most pixels to the budget, hence mostly bright cells).
DELTA_COLUMNS: tuple[tuple[str, str], ...] = (
    ("delta_ir", "|δ_ir| / ε (1 = full budget)"),
    ("delta", "|δ_vis| / ε (1 = full budget)"),
)
DELTA_CMAP = "magma"
DELTA_COLORBAR_LABEL = "perturbation size |δ| / ε  (0 = untouched, 1 = full budget ε)"

# Grid geometry, in inches (fixed margins so the title, column headers, colour bar and legend never overlap).
_CELL_W = 2.6
_GAP_W = 0.25
_GAP_H = 0.15
_LEFT = 0.45            # room for the two-line row labels
_HEADER = 0.32          # column headers above the first row
_TITLE = 0.42           # the grid title above the column headers
_LEGEND = 0.55          # the class legend below the grid
_BOTTOM = 0.15
_RIGHT = 0.2
_CBAR = 1.25            # colour bar of the perturbation columns, right of the grid (bar + ticks + label)


def grid_figure(rows: Sequence[GridRow], title: str = ""):
    """Build the picture grid of :func:`save_grid` and return the matplotlib figure (the caller closes it)."""
    if not rows:
        raise ValueError("save_grid: expected at least one row, got none")
    cols = [("ir", "infrared"), ("vis", "visible"), ("fused", "fused")]
    if any(r.get("pred") is not None for r in rows):
        cols.append(("pred", "prediction"))
    if any(r.get("gt") is not None for r in rows):
        cols.append(("gt", "ground truth"))
    for key, name in DELTA_COLUMNS:
        if any(r.get(key) is not None for r in rows):
            cols.append((key, name))
    has_delta = any(key in dict(DELTA_COLUMNS) for key, _ in cols)
    has_legend = any(key in ("pred", "gt") for key, _ in cols)

    h, w = np.asarray(rows[0]["ir"]).shape[:2]
    n_rows, n_cols = len(rows), len(cols)
    cell_w, cell_h = _CELL_W, _CELL_W * h / w
    grid_w = n_cols * cell_w + (n_cols - 1) * _GAP_W
    grid_h = n_rows * cell_h + (n_rows - 1) * _GAP_H
    top = _HEADER + (_TITLE if title else 0.0)
    bottom = _LEGEND if has_legend else _BOTTOM
    right = _CBAR if has_delta else _RIGHT
    fig_w, fig_h = _LEFT + grid_w + right, top + grid_h + bottom
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(fig_w, fig_h), squeeze=False)
    fig.subplots_adjust(left=_LEFT / fig_w, right=(_LEFT + grid_w) / fig_w, bottom=bottom / fig_h,
                        top=(bottom + grid_h) / fig_h, wspace=_GAP_W / cell_w, hspace=_GAP_H / cell_h)
    delta_im = None
    for i, row in enumerate(rows):
        for j, (key, name) in enumerate(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            val = row.get(key)
            if val is None:
                ax.set_facecolor("#eeeeee")
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, color="#888888")
            elif key in ("pred", "gt"):
                ax.imshow(colorize(np.asarray(val)), interpolation="nearest", aspect="auto")
            elif key in dict(DELTA_COLUMNS):
                delta_im = ax.imshow(np.clip(np.asarray(val, dtype=np.float32), 0, 1), cmap=DELTA_CMAP, vmin=0,
                                     vmax=1, interpolation="nearest", aspect="auto")
            else:
                ax.imshow(_as_rgb(val), interpolation="nearest", aspect="auto")
            if i == 0:
                ax.set_title(name, fontsize=10)
            if j == 0:
                ax.set_ylabel(row.get("label", ""), fontsize=8, rotation=90)
    if title:
        fig.suptitle(title, fontsize=11, y=1.0 - 0.12 / fig_h, va="top")
    if has_delta:
        # one vertical scale for all perturbation columns, beside the grid, at most ~4.5 in tall
        bar_h = min(grid_h, max(2.0 * cell_h + _GAP_H, 4.5))
        bar_bottom = bottom + grid_h - bar_h
        cax = fig.add_axes(((_LEFT + grid_w + 0.15) / fig_w, bar_bottom / fig_h, 0.16 / fig_w, bar_h / fig_h))
        mappable = delta_im if delta_im is not None else plt.cm.ScalarMappable(
            norm=matplotlib.colors.Normalize(0, 1), cmap=DELTA_CMAP)
        cbar = fig.colorbar(mappable, cax=cax)
        cbar.set_ticks([0.0, 0.25, 0.5, 0.75, 1.0])
        cbar.set_ticklabels(["0", "¼ ε", "½ ε", "¾ ε", "1 = ε"])
        cbar.ax.tick_params(labelsize=8)
        cbar.set_label(DELTA_COLORBAR_LABEL, fontsize=8)
    if has_legend:
        handles = [Patch(facecolor=PALETTE[i] / 255.0, edgecolor="#666666", label=c) for i, c in enumerate(CLASSES)]
        handles.append(Patch(facecolor="white", edgecolor="#666666", label="ignored (255)"))
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.1 / fig_h),
                   ncol=min(len(handles), 10), fontsize=8, frameon=False)
    return fig


def save_grid(path: str | Path, rows: Sequence[GridRow], title: str = "") -> Path:
    """Save a picture grid: one row per entry of ``rows``; columns IR, VIS, fused, prediction, GT, |δ IR|, |δ VIS|.

    Args:
        rows: dicts with ``label`` (row title), ``ir`` (H,W) in [0,1], ``vis`` (H,W,3) in [0,1], ``fused``
            (H,W) or (H,W,3) in [0,1], optional ``pred``/``gt`` (H,W) class ids (255 = ignore), and optional
            ``delta`` / ``delta_ir`` (H,W) in [0,1]: the size of the perturbation of the visible / infrared
            image divided by the attack budget ε (1 = the full budget). A column appears only if some row has
            its key; the perturbation columns share one colour bar.
    """
    fig = grid_figure(rows, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def grid_name(threat: str, suffix: str) -> str:
    """File name of a threat's picture grid in an evaluation folder (``.png``; its rows: ``.npz``)."""
    return f"grid_{threat.replace('/', '_').replace(':', '_')}{suffix}"


#: the keys of a grid row kept by :func:`save_grid_rows` (``label`` is kept as text)
GRID_ARRAYS = ("ir", "vis", "fused", "pred", "gt", "delta", "delta_ir")


def save_grid_rows(path: str | Path, rows: Sequence[GridRow]) -> Path:
    """The rows of a picture grid as a compressed ``.npz`` (no pickled objects), so that a later report can
    redraw them beside another model's rows (:func:`load_grid_rows`). A key missing or None in a row is stored
    as zeros with ``has_<key>`` False."""
    if not rows:
        raise ValueError("save_grid_rows: expected at least one row, got none")
    arrays: dict[str, np.ndarray] = {"label": np.array([str(r["label"]) for r in rows])}
    for key in GRID_ARRAYS:
        have = [r.get(key) is not None for r in rows]
        if not any(have):
            continue
        first = next(np.asarray(r[key]) for r in rows if r.get(key) is not None)
        arrays[key] = np.stack([np.asarray(r[key]) if r.get(key) is not None else np.zeros_like(first)
                                for r in rows])
        arrays[f"has_{key}"] = np.array(have)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def load_grid_rows(path: str | Path) -> list[GridRow]:
    """The rows saved by :func:`save_grid_rows` (None where a row had no such entry)."""
    with np.load(Path(path), allow_pickle=False) as data:
        n = len(data["label"])
        rows: list[GridRow] = [{"label": str(data["label"][i])} for i in range(n)]
        for key in GRID_ARRAYS:
            if key in data:
                values, have = data[key], data[f"has_{key}"]
                for i in range(n):
                    rows[i][key] = values[i] if have[i] else None
    return rows


def save_curves(
    path: str | Path,
    curves: Mapping[str, Sequence[tuple[float, float | None]]],
    ylabel: str = "mIoU (%)",
    title: str = "Robustness versus attack budget",
    percent: bool = True,
) -> Path:
    """Plot one line per threat model: ``curves[name] = [(eps_255, value), ...]`` (None values are skipped)."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for name, pts in curves.items():
        pts = sorted((e, v) for e, v in pts if v is not None and math.isfinite(v))
        if not pts:
            continue
        xs = [e for e, _ in pts]
        ys = [100 * v if percent else v for _, v in pts]
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("ε (in 1/255 of the pixel range, L∞)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if percent:
        ax.set_ylim(bottom=0)
    ax.legend(title="threat model")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_radar(
    path: str | Path,
    axes: Sequence[str],
    series: Mapping[str, Sequence[float]],
    title: str = "",
    rmax: float = 100.0,
    clean: Mapping[str, float] | None = None,
) -> Path:
    """A radar (spider) chart: one spoke per entry of ``axes``, one closed polygon per series.

    Args:
        series: name -> one value per axis, on a 0..``rmax`` scale (e.g. mIoU in %); further out is better.
        clean: name -> a value drawn as a dashed circle in the series' colour (e.g. the clean mIoU).
    """
    if len(axes) < 3:
        raise ValueError(f"save_radar: expected at least 3 axes, got {len(axes)}")
    for name, vals in series.items():
        if len(vals) != len(axes):
            raise ValueError(f"save_radar: series {name!r}: expected {len(axes)} values, got {len(vals)}")
    angles = np.linspace(0, 2 * np.pi, len(axes), endpoint=False)
    fig, ax = plt.subplots(figsize=(7.0, 7.2), subplot_kw={"projection": "polar"})
    fig.subplots_adjust(left=0.14, right=0.86, top=0.86, bottom=0.2)  # room for the spoke labels and legend
    ax.set_theta_offset(np.pi / 2)
    ax.set_theta_direction(-1)
    ring = np.linspace(0, 2 * np.pi, 200)
    for i, (name, vals) in enumerate(series.items()):
        color = f"C{i}"
        closed = np.append(np.asarray(vals, dtype=float), vals[0])
        ax.plot(np.append(angles, angles[0]), closed, color=color, marker="o", label=name)
        ax.fill(np.append(angles, angles[0]), closed, color=color, alpha=0.15)
        if clean and name in clean:
            ax.plot(ring, np.full_like(ring, clean[name]), color=color, linestyle="--", linewidth=0.9,
                    label=f"{name}: clean ({clean[name]:.1f})")
    ax.set_xticks(angles)
    ax.set_xticklabels(axes, fontsize=8)
    ax.set_ylim(0, rmax)
    ax.set_rlabel_position(0)
    ax.tick_params(axis="y", labelsize=7)
    if title:
        ax.set_title(title, fontsize=10, pad=24)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
