"""What mIoU a segmenter can reach when its logits live at 1/f of the input resolution: the label itself, pooled.

SegFormer (Xie et al., NeurIPS 2021) predicts at 1/4 of its input and upsamples the logits bilinearly. On small
images thin classes (curves, guardrails, bumps a few pixels wide) then fall between logit cells. This module
measures that limit with no model at all: each label map is one-hot encoded, area-averaged onto the logit grid
(``ceil(H / f) × ceil(W / f)``, the size of MiT's stride-4 stem at f = 4), upsampled bilinearly back to the label's
size the way the pipeline upsamples SegFormer's logits (`search_space/pipeline.py`), and scored against the label it came from. It is the score
of a perfect 1/f-resolution segmenter whose logits are class frequencies per cell — a reference point, not a proof
of a bound: a trained head can place sharper boundaries inside a cell than the area average does.

    python -m trainer.resolution_ceiling --data DATA --split test --factors 4 2 1 [--out DIR]

prints the table and writes ``resolution_ceiling.json`` / ``.md`` and ``resolution_ceiling.png`` (a label and its
reconstructions) into ``--out`` when given.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rgbt.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES, colorize
from trainer.metrics import ConfusionMatrix
from trainer.runs import atomic_save_figure, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["pooled_reconstruction", "resolution_ceiling", "main"]


def pooled_reconstruction(label: torch.Tensor, factor: int, num_classes: int = NUM_CLASSES,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The label as seen through logits at 1/``factor`` resolution.

    Args:
        label: (H, W) integer class ids in 0..K-1 or ``ignore_index`` (ignored pixels vote for no class).
        factor: integer ≥ 1; the logit grid is ``ceil(H / factor) × ceil(W / factor)``.

    Returns:
        (H, W) int64: argmax of the bilinearly upsampled (``align_corners=False``) cell-wise class frequencies.
    """
    if label.dim() != 2:
        raise ValueError(f"pooled_reconstruction: expected a (H, W) label map, got shape {tuple(label.shape)}")
    if int(factor) != factor or factor < 1:
        raise ValueError(f"pooled_reconstruction: expected an integer factor >= 1, got {factor!r}")
    h, w = label.shape
    lab = label.long()
    valid = lab != ignore_index
    if bool(((lab[valid] < 0) | (lab[valid] >= num_classes)).any()):
        raise ValueError(f"pooled_reconstruction: expected ids in 0..{num_classes - 1} or {ignore_index}, got "
                         f"values in [{int(lab.min())}, {int(lab.max())}]")
    onehot = F.one_hot(torch.where(valid, lab, 0), num_classes).permute(2, 0, 1).double() * valid
    if factor == 1:
        return onehot.argmax(0)
    low = F.adaptive_avg_pool2d(onehot[None], (math.ceil(h / factor), math.ceil(w / factor)))
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0].argmax(0)


def resolution_ceiling(labels: Sequence[np.ndarray], factors: Sequence[int], num_classes: int = NUM_CLASSES
                       ) -> dict[int, dict[str, Any]]:
    """``{factor: ConfusionMatrix.compute() of the reconstructions}`` over ``labels`` ((H, W) integer arrays)."""
    out: dict[int, dict[str, Any]] = {}
    for f in factors:
        cm = ConfusionMatrix(num_classes)
        for lab in labels:
            t = torch.as_tensor(np.asarray(lab).astype(np.int64))
            cm.update(pooled_reconstruction(t, int(f), num_classes)[None], t[None])
        out[int(f)] = cm.compute()
    return out


def _markdown(results: dict[int, dict[str, Any]], data: str, split: str, n: int) -> str:
    names = results[next(iter(results))]["classes"]
    head = "| logits at | mIoU | objects | " + " | ".join(names) + " |"
    rows = [head, "|---|--:|--:|" + "--:|" * len(names)]
    for f, r in results.items():
        rows.append(f"| 1/{f} | {100 * r['miou']:.1f} | {100 * r['miou_objects']:.1f} | "
                    + " | ".join("–" if math.isnan(v) else f"{100 * v:.1f}" for v in r["iou"]) + " |")
    return (f"Resolution ceiling on {n} `{split}` labels of `{data}`: each label pooled onto a 1/f logit grid, "
            "upsampled bilinearly, scored against itself (IoU %, 9 classes; objects = classes 1–8).\n\n"
            + "\n".join(rows) + "\n")


def _figure(label: np.ndarray, factors: Sequence[int], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(factors) + 1, figsize=(3.2 * (len(factors) + 1), 2.8), dpi=110)
    t = torch.as_tensor(label.astype(np.int64))
    panels = [("label", label)] + [(f"logits at 1/{f}", pooled_reconstruction(t, f).numpy()) for f in factors]
    for ax, (title, lab) in zip(np.atleast_1d(axes), panels):
        ax.imshow(colorize(lab), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    from rgbt.dataset import RGBTDataset
    from rgbt.io import DataError

    p = argparse.ArgumentParser(prog="python -m trainer.resolution_ceiling", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset root (any layout rgbt.dataset reads)")
    p.add_argument("--split", default="test")
    p.add_argument("--factors", type=int, nargs="+", default=[4, 2, 1], help="logit strides to score")
    p.add_argument("--out", help="folder for resolution_ceiling.json/.md/.png (default: print only)")
    args = p.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        ds = RGBTDataset(args.data, args.split, require_labels=True)
        labels = [ds.load_arrays(i)["label"] for i in range(len(ds))]
        results = resolution_ceiling(labels, args.factors, len(CLASSES))
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = _markdown(results, args.data, args.split, len(labels))
    print(text)
    if args.out:
        out = Path(args.out)
        atomic_write_text(json.dumps({"data": args.data, "split": args.split, "images": len(labels),
                                      "results": {str(f): r for f, r in results.items()},
                                      "command": "python -m trainer.resolution_ceiling "
                                                 + " ".join(sys.argv[1:] if argv is None else argv)}, indent=2)
                          + "\n", out / "resolution_ceiling.json")
        atomic_write_text(text, out / "resolution_ceiling.md")
        _figure(labels[0], [f for f in args.factors if f > 1], out / "resolution_ceiling.png")
        print(f"wrote {out / 'resolution_ceiling.json'}, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
