"""Throughput of the frozen PAIF fusion net and of the whole FusionSegModel; cost of the guided-filter decomposition.

Prints one JSON object. Numbers on a shared CPU are noisy (other processes compete for the cores): compare
ratios measured in the same run, not absolute numbers across runs.

    python bench/fusion_forward.py                                  # CPU, 480x640, batch 1 and 4, repeat 1
    python bench/fusion_forward.py --quick                          # tiny smoke run (seconds)
    python bench/fusion_forward.py --device cuda --amp bf16 --channels-last --repeat 10
    python bench/fusion_forward.py --device cuda --compile          # torch.compile the nets (GPU only)

Measured, per (size, batch): images/s of forward (no grad, eval) and forward+backward (train mode, loss =
mean of the output) for the ``paif`` fusion net and for the FusionSegModel (paif + SegFormer MiT-b0); and, on a
(1, C, H, W) feature tensor, the time of the decomposition (both guided filters + 1x1 reduce), of one guided
filter, of the box filter and of ``kornia.filters.guided_blur`` as multiples of one 3x3 C→C convolution.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F

from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parent))  # bench/_timing.py, also when loaded by path in tests
from _timing import sync, timeit  # noqa: E402
from search_space.decompose import GuidedDecomposition, box_filter, guidance_from_features, guided_filter
from search_space.genotype import GENOTYPES, Genotype, build_fusion_net
from search_space.pipeline import build_model
from trainer.runs import tune_malloc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast dtype")
    p.add_argument("--sizes", nargs="+", default=["480x640"], help="HxW, e.g. 480x640 240x320")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--repeat", type=int, default=1, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations at the measured size (GPU)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the nets (GPU only)")
    p.add_argument("--segmenter", default="b0")
    p.add_argument("--skip-model", action="store_true", help="only the fusion net and the decomposition")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 32x40, batch 1, channels 8")
    return p.parse_args(argv)




def _autocast(args: argparse.Namespace, device: torch.device):
    if args.amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _prepare(module: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    module = module.to(device)
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if args.compile:
        if device.type != "cuda":
            raise SystemExit("--compile: expected a CUDA device (torch.compile is optional and GPU-only here)")
        module = torch.compile(module)
    return module


def _images(b: int, h: int, w: int, device: torch.device, channels_last: bool):
    g = torch.Generator().manual_seed(0)
    ir, vis = torch.rand(b, 1, h, w, generator=g), torch.rand(b, 3, h, w, generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return ir.to(device, memory_format=fmt), vis.to(device, memory_format=fmt)


def bench_net(name: str, net: torch.nn.Module, call, args, device, sizes, batches) -> list[dict]:
    rows = []
    for h, w in sizes:
        for b in batches:
            ir, vis = _images(b, h, w, device, args.channels_last)

            def fwd() -> None:
                with torch.no_grad(), _autocast(args, device):
                    call(net, ir, vis)

            def fwd_bwd() -> None:
                net.zero_grad(set_to_none=True)
                with _autocast(args, device):
                    out = call(net, ir, vis)
                out.float().mean().backward()

            net.eval()
            t_f = timeit(fwd, device, args.repeat, args.warmup)
            net.train()
            t_fb = timeit(fwd_bwd, device, args.repeat, args.warmup)
            row = {"net": name, "size": [h, w], "batch": b,
                         "forward_img_s": round(b / t_f, 3), "forward_backward_img_s": round(b / t_fb, 3),
                         "forward_s": round(t_f, 5), "forward_backward_s": round(t_fb, 5)}
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress; the result is the JSON on stdout
            rows.append(row)
    return rows


def bench_decomposition(args, device, h: int, w: int, channels: int) -> dict:
    """Decomposition pieces vs one 3x3 conv on a (1, C, H, W) feature tensor (forward, no grad)."""
    torch.manual_seed(0)
    x = torch.randn(1, channels, h, w, device=device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(device)
    decomp = GuidedDecomposition(channels).to(device)
    guide = guidance_from_features(x)
    fns: dict[str, Callable[[], object]] = {
        "conv3x3": lambda: conv(x),
        "decomposition": lambda: decomp(x),
        "guided_filter_one_eps": lambda: guided_filter(guide, x, 1e-3),
        "box_filter": lambda: box_filter(x, 4),
        "box_avg_pool_separable": lambda: F.avg_pool2d(F.avg_pool2d(x, (9, 1), 1, (4, 0), count_include_pad=False),
                                                       (1, 9), 1, (0, 4), count_include_pad=False),
    }
    try:
        from kornia.filters import guided_blur

        fns["kornia_guided_blur_one_eps"] = lambda: guided_blur(guide, x, 9, 1e-3)
        fns["kornia_guided_blur_separable"] = lambda: guided_blur(guide, x, 9, 1e-3, separable=True)
    except ImportError:  # kornia is a project dependency; keep the bench usable without it
        pass
    seconds = {}
    with torch.no_grad():
        for key, fn in fns.items():
            with _autocast(args, device) if key == "conv3x3" else nullcontext():
                seconds[key] = timeit(fn, device, max(args.repeat, 3), max(args.warmup, 1))
    base = seconds["conv3x3"]
    return {"shape": [1, channels, h, w], "seconds": {k: round(v, 6) for k, v in seconds.items()},
            "x_conv3x3": {k: round(v / base, 2) for k, v in seconds.items()}}


def main(argv: list[str] | None = None) -> dict:
    tune_malloc()  # PAIF_MALLOC_TUNING=0 for glibc's defaults
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    genotype: Genotype = GENOTYPES["paif"]
    if args.quick:
        args.sizes, args.batches, args.repeat, args.warmup = ["32x40"], [1], 1, 0
        genotype = Genotype(ir=genotype.ir, vis=genotype.vis, fused=genotype.fused, rule=genotype.rule, channels=8)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    torch.manual_seed(0)
    fusion = _prepare(build_fusion_net(genotype), args, device)
    # one tiny warm-up pass so first-call overheads do not land in the timings
    ir, vis = _images(1, 32, 32, device, args.channels_last)
    fusion(ir, vis[:, :1]).mean().backward()
    results = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
        "repeat": args.repeat, "genotype": genotype.to_dict(),
        "fusion_params": sum(p.numel() for p in fusion.parameters()),
        "note": "median of --repeat timed calls; shared machines give noisy absolute numbers",
        "fusion": bench_net("fusion_paif", fusion, lambda n, i, v: n(i, v[:, :1]), args, device, sizes,
                            args.batches),
    }
    if not args.skip_model:
        model = build_model(genotype, segmenter=args.segmenter)
        model.fusion = fusion  # share the (possibly compiled) fusion net
        model.segmenter = _prepare(model.segmenter, args, device)
        results["model_params"] = sum(p.numel() for p in model.parameters())
        results["model"] = bench_net(f"fusion_seg_{args.segmenter}", model, lambda n, i, v: n(i, v).logits, args,
                                     device, sizes, args.batches)
    h, w = sizes[0]
    results["decomposition"] = bench_decomposition(args, device, h, w, genotype.channels)
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
