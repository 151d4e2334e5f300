"""The pooled worst-case selection of ``strong`` (``trainer.evaluate.PooledWorstCase.select``): every tried switch
scored by one batched mIoU per image (``trainer.metrics.batched_miou``) against the former cost, one
``ConfusionMatrix.compute()`` per tried switch (the baseline: the same ``select`` with ``batched_miou`` replaced by
a per-matrix ``compute`` loop, so both variants make the same choices).

Random per-image confusion matrices (each candidate right on ``--accuracy`` of the pixels, wrong at random
elsewhere), MFNet-sized by default: 393 test images, 9 classes, 10 candidates (the per-image worst case, 7
``strong`` members, 2 black-box checks). Prints one JSON object: seconds of both, their ratio, and whether the
choices agree.

    python bench/pooled_select.py                      # MFNet's test split
    python bench/pooled_select.py --images 16          # the experiment's test split
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trainer.evaluate as evaluate  # noqa: E402
from trainer.metrics import ConfusionMatrix  # noqa: E402


def per_matrix_miou(matrices: torch.Tensor, convention: str = "published") -> torch.Tensor:
    """The baseline: ``ConfusionMatrix.compute()`` on each matrix of (..., K, K)."""
    flat = matrices.reshape(-1, *matrices.shape[-2:])
    values = []
    for m in flat:
        cm = ConfusionMatrix(m.shape[-1])
        cm.matrix = m
        values.append(cm.compute(convention)["miou"])
    return torch.tensor(values, dtype=torch.float64).reshape(matrices.shape[:-2])


def pooled(images: int, candidates: int, classes: int, pixels: int, accuracy: float, seed: int
           ) -> evaluate.PooledWorstCase:
    gen = torch.Generator().manual_seed(seed)
    label = torch.randint(0, classes, (images, 1, pixels), generator=gen)
    preds = [torch.where(torch.rand(images, 1, pixels, generator=gen) < accuracy, label,
                         torch.randint(0, classes, (images, 1, pixels), generator=gen)) for _ in range(candidates)]
    sel = evaluate.PooledWorstCase([f"m{k}" for k in range(1, candidates)], classes)
    sel.add(preds[0], preds[1:], label)
    return sel


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=393)
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--classes", type=int, default=9)
    p.add_argument("--pixels", type=int, default=4096, help="labelled pixels per image")
    p.add_argument("--accuracy", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sel = pooled(args.images, args.candidates, args.classes, args.pixels, args.accuracy, args.seed)
    t0 = time.perf_counter()
    _, fast = sel.select()
    batched = time.perf_counter() - t0
    original = evaluate.batched_miou
    evaluate.batched_miou = per_matrix_miou
    try:
        t0 = time.perf_counter()
        _, slow = sel.select()
        baseline = time.perf_counter() - t0
    finally:
        evaluate.batched_miou = original
    out = {"images": args.images, "candidates": args.candidates, "classes": args.classes,
           "batched_seconds": batched, "per_switch_compute_seconds": baseline, "speedup": baseline / batched,
           "same_choice": fast["choice"] == slow["choice"], "miou": fast["miou"],
           "candidates_used": len(set(fast["choice"]))}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
