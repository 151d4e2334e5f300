"""Cost of SegFormer's decode-head width (``decoder_hidden_size``) in the fusion + segmentation model.

SegFormer's all-MLP head projects the four encoder stages to ``decoder_hidden_size`` channels, upsamples all four to
1/4 of the segmenter's input and fuses them with a 1x1 convolution (4 x width -> width). At ``seg_scale`` 2 that grid
has four times the pixels, so the head, not the MiT encoder, sets the cost of a step. For each width (default 256 =
MiT-b0's, 128, 64) the same fusion net and encoder weights (random: the cost does not depend on them) are timed:

    attack_step_s  forward + segmentation loss + backward to the two input images only, parameters frozen: one step
                   of an evaluation attack (``strong`` runs 335 of them per image)
    train_s        forward + task loss + backward to every parameter: a clean training step without the optimizer

Widths run interleaved, one call each per round, median of ``--repeat`` rounds; ratios are against the first width in
the same run. ``head_params`` counts the decode head's parameters.

    python bench/seg_head_cost.py                     # the experiment's setting: 96x128, batch 8, width 16, scale 2
    python bench/seg_head_cost.py --seg-scale 1 --widths 256 64

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
from trainer.runs import versions  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_args(p, batch=8, repeat=3)
    p.add_argument("--channels", type=int, default=16, help="fusion width of the genotype")
    p.add_argument("--seg-scale", type=int, default=2, choices=SEG_SCALES)
    p.add_argument("--widths", type=int, nargs="+", default=[256, 128, 64], help="decoder_hidden_size values")
    args = p.parse_args(argv)
    if min(args.widths) < 1:
        p.error(f"--widths: expected integers >= 1, got {args.widths}")
    return args


def runners(args: argparse.Namespace, device: torch.device
            ) -> tuple[dict[str, dict[int, Callable[[], object]]], dict[int, int]]:
    """({"attack_step_s": {width: fn}, "train_s": {width: fn}}, {width: head parameters}) on one random batch; every
    width has the same fusion net and encoder weights."""
    genotype = resolve_genotype(args.genotype, channels=args.channels)
    ir, vis, label = random_batch(args, device, NUM_CLASSES)
    loss = TaskLoss()
    out: dict[str, dict[int, Callable[[], object]]] = {"attack_step_s": {}, "train_s": {}}
    params: dict[int, int] = {}
    shared: dict[str, torch.Tensor] | None = None
    for width in args.widths:
        torch.manual_seed(0)
        model = build_model(genotype, segmenter=args.segmenter, decoder_hidden_size=width, seg_scale=args.seg_scale)
        state = model.state_dict()
        if shared is None:
            shared = {k: v for k, v in state.items() if ".decode_head." not in k}
        model.load_state_dict({**state, **shared})
        model.to(device).train()
        params[width] = sum(p.numel() for p in model.segmenter.model.decode_head.parameters())

        def attack_step(m: torch.nn.Module = model) -> object:
            x_ir, x_vis = ir.clone().requires_grad_(True), vis.clone().requires_grad_(True)
            for p in m.parameters():
                p.requires_grad_(False)
            try:
                value = torch.nn.functional.cross_entropy(m(x_ir, x_vis).logits, label)
                return torch.autograd.grad(value, [x_ir, x_vis])
            finally:
                for p in m.parameters():
                    p.requires_grad_(True)

        out["attack_step_s"][width], out["train_s"][width] = attack_step, training_pass(model, loss, ir, vis, label)
    return out, params


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fns, params = runners(args, device)
    results, ratios, clock = variant_medians(fns, device, args)
    first = str(args.widths[0])
    h, w = args.size
    print(json.dumps({
        "bench": "seg_head_cost", "device": str(device), "size": [h, w], "batch": args.batch,
        "channels": args.channels, "seg_scale": args.seg_scale, "genotype": args.genotype,
        "segmenter": args.segmenter, "threads": torch.get_num_threads(), "clock": clock,
        "statistic": "median", "timed_rounds": args.repeat, "results": results,
        f"ratio_vs_width_{first}": ratios,
        "head_params": {str(k): v for k, v in params.items()}, "torch": versions()["torch"],
        "gpu": versions().get("gpu"),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
