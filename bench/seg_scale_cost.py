"""Cost of the segmenter input scale ``seg_scale`` (``search_space.pipeline.segment``): time and activation memory.

For each scale (default 1, 2, 4) the same ``build_model(genotype)`` weights (SegFormer MiT-b0 by default, random:
the cost does not depend on them) are timed at one size and batch:

    forward_s     a forward pass without autograd (what evaluation pays per batch)
    train_s       forward + task loss + backward to every parameter (a clean training step without the optimizer;
                  each attack step of AT / AAT is another forward + backward, so it scales alike)

The scales run interleaved, one call each per round, median of ``--repeat`` rounds, so load on a shared machine hits
them alike; ratios are against scale 1 in the same run. ``activation_gb`` is ``trainer.memory``'s estimate of the
tensors a training step keeps (computed, not timed).

    python bench/seg_scale_cost.py                                   # CPU, 96x128, batch 2, 1 thread
    python bench/seg_scale_cost.py --device cuda --size 480 640 --batch 8

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_timing.py, also when loaded by path in tests
from _timing import model_args, random_batch, training_pass, variant_medians  # noqa: E402
from rgbt.classes import NUM_CLASSES  # noqa: E402
from search_space.pipeline import SEG_SCALES, build_model  # noqa: E402
from trainer.checkpoint import resolve_genotype  # noqa: E402
from trainer.losses import TaskLoss  # noqa: E402
from trainer.memory import estimate_training_memory  # noqa: E402
from trainer.runs import versions  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_args(p, batch=2, repeat=5)
    p.add_argument("--scales", type=int, nargs="+", default=list(SEG_SCALES), choices=SEG_SCALES)
    return p.parse_args(argv)


def runners(args: argparse.Namespace, device: torch.device) -> dict[str, dict[int, Callable[[], object]]]:
    """{"forward_s": {scale: fn}, "train_s": {scale: fn}} on one random batch, every scale with the same weights."""
    genotype = resolve_genotype(args.genotype)
    torch.manual_seed(0)
    base = build_model(genotype, segmenter=args.segmenter)
    ir, vis, label = random_batch(args, device, NUM_CLASSES)
    loss = TaskLoss()
    out: dict[str, dict[int, Callable[[], object]]] = {"forward_s": {}, "train_s": {}}
    for scale in args.scales:
        model = build_model(genotype, segmenter=args.segmenter, seg_scale=scale)
        model.load_state_dict(base.state_dict())
        model.to(device).train()

        def forward(m: torch.nn.Module = model) -> object:
            with torch.no_grad():
                return m(ir, vis).logits

        out["forward_s"][scale], out["train_s"][scale] = forward, training_pass(model, loss, ir, vis, label)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results, ratios, clock = variant_medians(runners(args, device), device, args)
    h, w = args.size
    first = str(args.scales[0])
    memory = {str(s): round(estimate_training_memory(args.genotype, args.batch, h, w, segmenter=args.segmenter,
                                                     seg_scale=s).activation_bytes / 1e9, 3) for s in args.scales}
    print(json.dumps({
        "bench": "seg_scale_cost", "device": str(device), "size": [h, w], "batch": args.batch,
        "genotype": args.genotype, "segmenter": args.segmenter, "threads": torch.get_num_threads(),
        "clock": clock, "statistic": "median", "timed_rounds": args.repeat, "results": results,
        f"ratio_vs_scale_{first}": ratios,
        "activation_gb": memory, "torch": versions()["torch"], "gpu": versions().get("gpu"),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
