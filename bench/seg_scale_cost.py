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
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_timing.py, also when loaded by path in tests
from _timing import interleaved  # noqa: E402
from rgbt.classes import NUM_CLASSES  # noqa: E402
from search_space.pipeline import SEG_SCALES, build_model  # noqa: E402
from trainer.checkpoint import resolve_genotype  # noqa: E402
from trainer.losses import TaskLoss  # noqa: E402
from trainer.memory import estimate_training_memory  # noqa: E402
from trainer.runs import versions  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"), help="image size")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--scales", type=int, nargs="+", default=list(SEG_SCALES), choices=SEG_SCALES)
    p.add_argument("--genotype", default="paif")
    p.add_argument("--segmenter", default="b0")
    p.add_argument("--repeat", type=int, default=5, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = default)")
    return p.parse_args(argv)


def runners(args: argparse.Namespace, device: torch.device) -> dict[str, dict[int, Callable[[], object]]]:
    """{"forward_s": {scale: fn}, "train_s": {scale: fn}} on one random batch, every scale with the same weights."""
    genotype = resolve_genotype(args.genotype)
    torch.manual_seed(0)
    base = build_model(genotype, segmenter=args.segmenter)
    g = torch.Generator().manual_seed(0)
    h, w = args.size
    ir, vis = torch.rand(args.batch, 1, h, w, generator=g), torch.rand(args.batch, 3, h, w, generator=g)
    label = torch.randint(0, NUM_CLASSES, (args.batch, h, w), generator=g)
    ir, vis, label = ir.to(device), vis.to(device), label.to(device)
    loss = TaskLoss()
    out: dict[str, dict[int, Callable[[], object]]] = {"forward_s": {}, "train_s": {}}
    for scale in args.scales:
        model = build_model(genotype, segmenter=args.segmenter, seg_scale=scale)
        model.load_state_dict(base.state_dict())
        model.to(device).train()

        def forward(m: torch.nn.Module = model) -> object:
            with torch.no_grad():
                return m(ir, vis).logits

        def train(m: torch.nn.Module = model) -> object:
            m.zero_grad(set_to_none=True)
            value, _ = loss(m(ir, vis), ir, vis, label)
            value.backward()
            return value

        out["forward_s"][scale], out["train_s"][scale] = forward, train
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    results: dict[str, dict[str, float]] = {}
    for name, fns in runners(args, device).items():
        medians = interleaved({str(s): f for s, f in fns.items()}, device, args.repeat, args.warmup, clock=clock)
        results[name] = {s: round(t, 4) for s, t in medians.items()}
    h, w = args.size
    first = str(args.scales[0])
    memory = {str(s): round(estimate_training_memory(args.genotype, args.batch, h, w, segmenter=args.segmenter,
                                                     seg_scale=s).activation_bytes / 1e9, 3) for s in args.scales}
    print(json.dumps({
        "bench": "seg_scale_cost", "device": str(device), "size": [h, w], "batch": args.batch,
        "genotype": args.genotype, "segmenter": args.segmenter, "threads": torch.get_num_threads(),
        "clock": clock.__name__, "statistic": "median", "timed_rounds": args.repeat, "results": results,
        f"ratio_vs_scale_{first}": {name: {s: round(t / r[first], 2) for s, t in r.items()} for name, r in results.items()},
        "activation_gb": memory, "torch": versions()["torch"], "gpu": versions().get("gpu"),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
