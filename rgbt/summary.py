"""Summarise an RGB-T dataset folder: splits, counts, day/night, image sizes, class pixel histogram.

Works on every layout :class:`rgbt.dataset.RGBTDataset` reads (MSRS / MFNet, after Tang et al. 2022 and
Ha et al. 2017, and flat unlabelled pairs). Day / night comes from ``meta.json`` (synthetic datasets) or
from the MSRS / MFNet name suffix ``D`` / ``N``.

CLI::

    python -m rgbt.summary data/synthetic
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from rgbt.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES
from rgbt.dataset import MFNET_SPLITS, RGBTDataset, detect_layout, _has_pair_dirs
from rgbt.io import DataError
from trainer.errors import entry_point

__all__ = ["summarize", "format_summary", "main"]

logger = logging.getLogger(__name__)


def _splits(root: Path) -> list[str | None]:
    if not root.is_dir():
        raise DataError(f"{root}: expected a dataset folder, got no such directory; check the path")
    if (root / "images").is_dir():
        present = [s for s in MFNET_SPLITS if (root / f"{s}.txt").is_file()]
        return present or [None]
    found = sorted(p.name for p in root.iterdir() if _has_pair_dirs(p))
    order = {"train": 0, "val": 1, "test": 2}
    found.sort(key=lambda s: (order.get(s, 3), s))
    if found:
        return found
    detect_layout(root, None)  # raises a clear error when the folder is not a dataset
    return [None]


def _time_of_day(name: str, meta: dict) -> str:
    scene = meta.get("scenes", {}).get(name)
    if scene is not None:
        return scene["time"]
    return {"D": "day", "N": "night"}.get(name[-1:], "unknown")


def summarize(root: str | Path) -> dict[str, Any]:
    """Read every sample of every split of ``root`` (validating it) and collect statistics.

    Returns:
        ``{"root", "layout", "meta", "splits": {split: {"n", "labelled", "time": Counter, "sizes": Counter,
        "pixels": (NUM_CLASSES + 1,) int64 — last entry = ignore (255)}}}``.
    """
    root = Path(root)
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    out: dict[str, Any] = {"root": str(root), "meta": {k: v for k, v in meta.items() if k != "scenes"}, "splits": {}}
    for split in _splits(root):
        ds = RGBTDataset(root, split=split)
        out["layout"] = ds.layout
        stats = {"n": len(ds), "labelled": ds.has_labels, "time": Counter(), "sizes": Counter(),
                 "pixels": np.zeros(NUM_CLASSES + 1, np.int64)}
        for i, name in enumerate(ds.names):
            arrays = ds.load_arrays(i)
            stats["time"][_time_of_day(name, meta)] += 1
            stats["sizes"][arrays["ir"].shape] += 1
            if "label" in arrays:
                lab = arrays["label"].astype(np.int64)
                lab = np.where(lab == IGNORE_INDEX, NUM_CLASSES, lab)
                stats["pixels"] += np.bincount(lab.ravel(), minlength=NUM_CLASSES + 1)
        out["splits"]["all" if split is None else split] = stats
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """A readable multi-line report of :func:`summarize`'s result."""
    lines = [f"dataset {summary['root']}  (layout {summary.get('layout', '?')})"]
    meta = summary["meta"]
    if meta:
        lines.append("meta: " + ", ".join(f"{k}={meta[k]}" for k in ("generator", "version", "seed", "size") if k in meta))
    for split, s in summary["splits"].items():
        if len(s["sizes"]) <= 4:
            sizes = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sorted(s["sizes"].items()))
        else:
            hs, ws = [h for h, _ in s["sizes"]], [w for _, w in s["sizes"]]
            sizes = f"{len(s['sizes'])} different sizes, H {min(hs)}..{max(hs)}, W {min(ws)}..{max(ws)}"
        times = ", ".join(f"{t} {n}" for t, n in sorted(s["time"].items()))
        lines.append(f"\n[{split}] {s['n']} samples, {'labelled' if s['labelled'] else 'unlabelled'}; {times}")
        lines.append(f"  image size (HxW): {sizes}")
        if s["labelled"]:
            total = max(int(s["pixels"].sum()), 1)
            lines.append(f"  {'class':<15} {'pixels':>10} {'share':>8}")
            for k, name in enumerate(list(CLASSES) + ["ignore(255)"]):
                n = int(s["pixels"][k])
                lines.append(f"  {k if k < NUM_CLASSES else 255:>3} {name:<11} {n:>10d} {100.0 * n / total:7.2f}%")
            missing = [CLASSES[k] for k in range(NUM_CLASSES) if s["pixels"][k] == 0]
            if missing:
                lines.append(f"  classes absent from this split: {', '.join(missing)}")
    return "\n".join(lines)


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Summarise an RGB-T dataset folder.")
    parser.add_argument("root", type=Path, help="dataset root (MSRS, MFNet or flat vi/ir pairs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(format_summary(summarize(args.root)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
