"""Compare a checkpoint's fusion with the max and average rules on the nine fusion metrics, plus a picture.

PAIF: Liu et al., ACM MM 2023. The classical pixel rules are the baselines every IVIF paper reports; here they
fuse the same luminance the network fuses (infrared with the visible Y; the visible chroma is added back for
pictures only), and all three are scored by ``trainer.metrics`` (EN, SD, SF, AG, MI, SCD, VIF, Qabf, SSIM) on
full-size images against the two sources. Usage::

    python -m trainer.fusion_compare --checkpoint CKPT --data ../shared/data/real_rgbt \
        --split-file RUN/split.json --out docs/fuse [--example NAME]

``--split-file`` is the ``split.json`` that ``trainer/retrain.py data.holdout_fraction=...`` writes: only its
``held_out`` names are scored (the images the network never trained on); without it every pair is scored.
Writes ``OUT/results.json`` (settings, per-method means and per-image values), ``OUT/results.md`` (the table)
and ``OUT/example.png`` (infrared, visible, max rule, ours on one held-out pair).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from rgbt.color import rgb_to_y, rgb_to_ycbcr, ycbcr_to_rgb
from rgbt.dataset import RGBTDataset, RGBTSubset
from trainer.checkpoint import CheckpointError, load_model
from trainer.metrics import FUSION_METRIC_NAMES, FusionMetrics
from trainer.runs import atomic_save_figure, atomic_write_text, tune_malloc

__all__ = ["RULES", "max_rule", "average_rule", "compare", "markdown_table", "save_panels", "main"]

log = logging.getLogger("trainer.fusion_compare")

METRIC_HELP = {
    "EN": "entropy (bits)", "SD": "standard deviation", "SF": "spatial frequency", "AG": "average gradient",
    "MI": "mutual information with IR + with VIS", "SCD": "sum of the correlations of differences",
    "VIF": "visual information fidelity, IR + VIS", "Qabf": "edge preservation (Xydeas-Petrovic)",
    "SSIM": "SSIM with IR + with VIS",
}


def max_rule(ir: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel maximum of the infrared image and the visible luminance, (B, 1, H, W) in [0, 1]."""
    return torch.maximum(ir, y)


def average_rule(ir: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean of the infrared image and the visible luminance, (B, 1, H, W) in [0, 1]."""
    return 0.5 * (ir + y)


RULES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"max rule": max_rule,
                                                                        "average rule": average_rule}


def _with_chroma(y: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """A fused luminance with the visible image's chroma, as RGB in [0, 1] (for pictures)."""
    ycbcr = rgb_to_ycbcr(vis)
    return ycbcr_to_rgb(torch.cat((y, ycbcr[:, 1:]), 1)).clamp(0, 1)


def _dataset(data: str, split_file: str | None) -> tuple[Any, dict[str, Any]]:
    base = RGBTDataset(data, split=None)
    if not split_file:
        return base, {"images": "all", "names": list(base.names)}
    split = json.loads(Path(split_file).read_text())
    names = split.get("held_out")
    if not names:
        raise ValueError(f"{split_file}: expected a 'held_out' list of file names (split.json of a retrain run with "
                         f"data.holdout_fraction > 0), got {sorted(split)}")
    missing = sorted(set(names) - set(base.names))
    if missing:
        raise ValueError(f"{split_file}: held-out names not in {data}: {missing[:5]}")
    info = {"images": "held out", "split_file": str(split_file), "names": list(names),
            **{k: split[k] for k in ("holdout_fraction", "holdout_seed", "salt") if k in split},
            "train_images": len(split.get("train", []))}
    return RGBTSubset(base, [base.names.index(n) for n in names]), info


@torch.no_grad()
def compare(checkpoint: str, data: str, split_file: str | None = None, example: str | None = None,
            progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score ``ours`` (the checkpoint's fusion), the max rule and the average rule on the same images.

    Returns:
        ``(results, example_images)``: per-method means and per-image values; the IR, VIS and the three fused RGB
        images of the example pair (default: the first scored pair), as (H, W[, 3]) float arrays in [0, 1].
    """
    ds, split = _dataset(data, split_file)
    model, meta = load_model(checkpoint)
    methods = ["ours", *RULES]
    meters = {m: FusionMetrics() for m in methods}
    example = example or ds.names[0]
    if example not in ds.names:
        raise ValueError(f"--example {example!r}: expected one of the scored pairs {ds.names[:8]}...")
    shown: dict[str, Any] = {}
    for i in tqdm(range(len(ds)), desc="fusion metrics", unit="pair", disable=not progress, file=sys.stderr):
        item = ds[i]
        ir, vis = item["ir"][None], item["vis"][None]
        y = rgb_to_y(vis)
        fused_y, fused_rgb = model.fuse(ir, vis)
        outputs = {"ours": (fused_y.clamp(0, 1), fused_rgb)}
        outputs.update({name: (rule(ir, y), _with_chroma(rule(ir, y), vis)) for name, rule in RULES.items()})
        for m in methods:
            meters[m].update(outputs[m][0], ir, y)
        if item["name"] == example:
            shown = {"name": example, "ir": ir[0, 0].numpy(), "vis": vis[0].permute(1, 2, 0).numpy(),
                     **{m: outputs[m][1][0].permute(1, 2, 0).numpy() for m in methods}}
    card = meta.get("card") or {}
    results = {
        "checkpoint": str(checkpoint), "content_hash": card.get("content_hash"),
        "training": card.get("training"), "data": str(data), "split": split,
        "methods": {m: meters[m].compute() for m in methods},
        "per_image": {m: {k: meters[m].values[k] for k in FUSION_METRIC_NAMES} for m in methods},
        "names": list(ds.names), "example": example,
    }
    return results, shown


def markdown_table(results: dict[str, Any]) -> str:
    """The nine metrics per method (higher is better for all nine; the best of each column in bold)."""
    methods = results["methods"]
    header = "| method | " + " | ".join(FUSION_METRIC_NAMES) + " |"
    lines = [header, "|---|" + "--:|" * len(FUSION_METRIC_NAMES)]
    best = {k: max(methods[m][k] for m in methods) for k in FUSION_METRIC_NAMES}
    for m, vals in methods.items():
        cells = [f"**{vals[k]:.3f}**" if vals[k] == best[k] else f"{vals[k]:.3f}" for k in FUSION_METRIC_NAMES]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_panels(path: str | Path, panels: Sequence[tuple[str, np.ndarray]], title: str = "") -> Path:
    """Images side by side with a title above each: (H, W) grey or (H, W, 3) RGB, values in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = panels[0][1].shape[:2]
    cell = 3.2
    fig, axes = plt.subplots(1, len(panels), figsize=(cell * len(panels), cell * h / w + (0.7 if title else 0.4)),
                             squeeze=False)
    for ax, (name, img) in zip(axes[0], panels):
        ax.imshow(np.clip(img, 0, 1), cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="lanczos")
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return atomic_save_figure(fig, path, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    tune_malloc()
    p = argparse.ArgumentParser(prog="python -m trainer.fusion_compare", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="folder of pairs (flat vi/ + ir/)")
    p.add_argument("--split-file", help="split.json of the training run: score its held-out names only")
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, example.png)")
    p.add_argument("--example", help="pair shown in example.png (default: the first scored pair)")
    p.add_argument("--no-progress", action="store_false", dest="progress")
    args = p.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    try:
        results, shown = compare(args.checkpoint, args.data, args.split_file, args.example, args.progress)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    results["seconds"] = round(time.time() - t0, 1)
    results["command"] = "python -m trainer.fusion_compare " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_write_text(json.dumps(results, indent=2) + "\n", out / "results.json")
    n = len(results["names"])
    text = (f"Fusion metrics on {n} {results['split']['images']} pairs of `{args.data}` (means; higher is better for "
            f"all nine; MI, VIF and SSIM are sums over the two sources).\n\n{markdown_table(results)}\n\n"
            + "".join(f"* {k}: {v}\n" for k, v in METRIC_HELP.items()))
    atomic_write_text(text, out / "results.md")
    save_panels(out / "example.png", [("infrared", shown["ir"]), ("visible", shown["vis"]),
                                      ("max rule", shown["max rule"]), ("ours (paif fuse)", shown["ours"])],
                title=f"{shown['name']} (held out from training)" if args.split_file else shown["name"])
    print(markdown_table(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'example.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
