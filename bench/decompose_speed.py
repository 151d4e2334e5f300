"""Cost of the guided-filter decomposition as a multiple of one 3x3 C->C convolution on the same tensor.

Prints one JSON object. For each size, on a (B, C, H, W) feature tensor: forward (no grad) and
forward+backward (loss = sum of the output, gradients to the input and the parameters) of

    conv3x3                 nn.Conv2d(C, C, 3, padding=1): the unit
    decomposition           GuidedDecomposition (two guided filters + 1x1 reduce) as the model runs it: the
                            fused C++ kernels where they build (CPU; ``cpp_used`` says whether they did)
    decomposition_torch     the pure-PyTorch fused function (1x1 reduce folded into the filter, box-filter
                            backward): the CPU path before the C++ kernels, and the path on CUDA
    decomposition_unfused   the guided filter as an autograd function with a box-filter backward, then the
                            folded 1x1 conv: issue 10's first pass (``guided_filter``), the module's path under
                            torch.compile
    decomposition_autograd  the same with the plain-autograd guided filter (cumsum box filter, every
                            intermediate saved by autograd): the implementation before issue 10, kept as the
                            in-run baseline (``search_space.decompose.guided_filter_autograd``)

The timings are interleaved (one call of every variant per round, ``--repeat`` rounds) and the median is
taken, so load from other processes on a shared machine hits all variants alike; compare the ratios. On CPU
every size runs once per ``--threads`` value (rows ``HxW/tN``; default 1 and 2 threads); ``--clock cpu``
times process CPU time instead of wall time (steadier on a loaded machine, meaningful with one thread).

    python bench/decompose_speed.py                              # CPU, 240x320 and 480x640, C=32, batch 1, 1 and 2 threads
    python bench/decompose_speed.py --threads 1 --clock cpu      # one thread, CPU time
    python bench/decompose_speed.py --quick                      # smoke run
    python bench/decompose_speed.py --device cuda --batch 4 --compile
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_timing.py, also when loaded by path
from _timing import interleaved, sync  # noqa: E402
from search_space import decompose  # noqa: E402
from search_space import cpp_ext  # noqa: E402
from search_space.decompose import GuidedDecomposition, decompose_fused  # noqa: E402
from trainer.runs import tune_malloc  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", nargs="+", default=["240x320", "480x640"], help="HxW")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=7, help="interleaved timed rounds (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts, one run each")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time or process CPU time")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd decomposition")
    p.add_argument("--quick", action="store_true", help="32x40, C=8, 2 rounds")
    return p.parse_args(argv)


class _Unfused(torch.nn.Module):
    """GuidedDecomposition's plain path: the low maps from ``filter_fn``, then the folded 1x1 conv.

    ``guided_filter`` (the autograd function whose backward is box filters) is the first pass of issue 10;
    ``guided_filter_autograd`` (cumsum box filter through plain autograd) the implementation before it."""

    def __init__(self, decomp: GuidedDecomposition, filter_fn) -> None:
        super().__init__()
        self.decomp, self.filter_fn = decomp, filter_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.decomp
        lows = self.filter_fn(decompose.guidance_from_features(x), x, d.eps, d.radius)
        return F.conv2d(torch.cat([x, *lows], 1), d.folded_weight(), d.reduce.bias)


class _TorchPath(torch.nn.Module):
    """GuidedDecomposition forced onto the pure-PyTorch fused function (``decompose_fused(backend="torch")``)."""

    def __init__(self, decomp: GuidedDecomposition) -> None:
        super().__init__()
        self.decomp = decomp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.decomp
        return decompose_fused(x, d.reduce.weight, d.reduce.bias, d.eps, d.radius, backend="torch")


def variants(args: argparse.Namespace, device: torch.device, c: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c, c, 3, padding=1)
    decomp = GuidedDecomposition(c)
    mods: dict[str, torch.nn.Module] = {"conv3x3": conv, "decomposition": decomp,
                                        "decomposition_torch": _TorchPath(decomp),
                                        "decomposition_unfused": _Unfused(decomp, decompose.guided_filter),
                                        "decomposition_autograd": _Unfused(decomp, decompose.guided_filter_autograd)}
    if args.compile:
        mods["decomposition_compiled"] = torch.compile(decomp)
    return {k: m.to(device) for k, m in mods.items()}


def bench_size(args: argparse.Namespace, device: torch.device, h: int, w: int) -> dict:
    c = args.channels
    mods = variants(args, device, c)
    x = torch.randn(args.batch, c, h, w, device=device)
    xg = x.clone().requires_grad_(True)

    def fwd(m: torch.nn.Module) -> Callable[[], object]:
        def run() -> None:
            with torch.no_grad():
                m(x)
        return run

    def fwd_bwd(m: torch.nn.Module) -> Callable[[], object]:
        def run() -> None:
            m.zero_grad(set_to_none=True)
            xg.grad = None
            m(xg).sum().backward()
        return run

    fns = {f"{k}/fwd": fwd(m) for k, m in mods.items()}
    fns.update({f"{k}/fwd_bwd": fwd_bwd(m) for k, m in mods.items()})
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    sec = interleaved(fns, device, args.repeat, args.warmup, clock)
    out: dict = {"shape": [args.batch, c, h, w], "threads": torch.get_num_threads(),
                 "seconds": {k: round(v, 5) for k, v in sec.items()}}
    for mode in ("fwd", "fwd_bwd"):
        base = sec[f"conv3x3/{mode}"]
        out[f"x_conv3x3_{mode}"] = {k: round(sec[f"{k}/{mode}"] / base, 2) for k in mods if k != "conv3x3"}
    for base in ("autograd", "unfused", "torch"):
        out[f"speedup_vs_{base}"] = {mode: round(sec[f"decomposition_{base}/{mode}"] / sec[f"decomposition/{mode}"], 2)
                                     for mode in ("fwd", "fwd_bwd")}
    return out


def main(argv: list[str] | None = None) -> dict:
    malloc_tuned = tune_malloc()  # PAIF_MALLOC_TUNING=0 for glibc's defaults
    args = parse_args(argv)
    if args.quick:
        args.sizes, args.channels, args.repeat, args.warmup, args.threads = ["32x40"], 8, 2, 1, [1]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: expected a CUDA device, got none")
    threads = args.threads if device.type == "cpu" else [torch.get_num_threads()]
    cpp_used = device.type == "cpu" and decompose.cpp_usable(torch.zeros(1, 1, 2, 2))
    results = {"bench": "decompose_speed", "device": str(device), "threads": threads,
               "torch": torch.__version__, "malloc_tuned": malloc_tuned, "repeat": args.repeat,
               "statistic": f"median of interleaved rounds, {args.clock} clock",
               "cpp_used": cpp_used, "cpp_build_error": cpp_ext.failure(), "sizes": {}}
    before = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            for s in args.sizes:
                h, w = (int(v) for v in s.lower().split("x"))
                key = f"{h}x{w}" if len(threads) == 1 else f"{h}x{w}/t{n}"
                results["sizes"][key] = bench_size(args, device, h, w)
                print(json.dumps({key: results["sizes"][key]}), file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(before)
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
