"""Does ``torch.compile`` pay? Eager vs compiled forward+backward of the ``paif`` fusion net and of the whole
model (fusion + MiT-b0, the pass an attack step or a training step repeats), plus the one-off compile time.

Prints one JSON object; eager and compiled calls are interleaved round by round (median).

    python bench/compile_gain.py                        # CPU (inductor + the C++ compiler), 240x320, batch 1
    python bench/compile_gain.py --device cuda --amp bf16 --size 480 640 --batch 4
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_timing.py, also when loaded by path
from _timing import sync  # noqa: E402
from step_profile import interleaved  # noqa: E402
from search_space.genotype import GENOTYPES, build_fusion_net  # noqa: E402
from search_space.pipeline import build_model  # noqa: E402
from trainer.runs import tune_malloc  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    tune_malloc()  # PAIF_MALLOC_TUNING=0 for glibc's defaults
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=("none", "bf16"), default="none")
    p.add_argument("--size", type=int, nargs=2, default=(240, 320), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--mode", default="default", help="torch.compile mode")
    p.add_argument("--skip-model", action="store_true", help="fusion net only")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: expected a CUDA device, got none")
    h, w = args.size
    ir, vis = torch.rand(args.batch, 1, h, w, device=device), torch.rand(args.batch, 3, h, w, device=device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()

    torch.manual_seed(0)
    nets = {"fusion": (build_fusion_net(GENOTYPES["paif"]).to(device), lambda n: n(ir, vis[:, :1]))}
    if not args.skip_model:
        nets["model"] = (build_model(GENOTYPES["paif"]).to(device), lambda n: n(ir, vis).logits)
    out: dict = {"bench": "compile_gain", "device": str(device), "amp": args.amp, "size": [h, w],
                 "batch": args.batch, "threads": torch.get_num_threads(), "torch": torch.__version__, "nets": {}}
    for name, (net, call) in nets.items():
        compiled = torch.compile(net, mode=args.mode)

        def fwd_bwd(n):
            def run() -> None:
                n.zero_grad(set_to_none=True)
                with autocast():
                    y = call(n)
                y.float().mean().backward()
            return run

        sync(device)
        t0 = time.perf_counter()
        fwd_bwd(compiled)()
        sync(device)
        compile_s = time.perf_counter() - t0
        sec = interleaved({"eager": fwd_bwd(net), "compiled": fwd_bwd(compiled)}, device, args.repeat, 1)
        out["nets"][name] = {"compile_s": round(compile_s, 1), "seconds": {k: round(v, 5) for k, v in sec.items()},
                             "speedup": round(sec["eager"] / sec["compiled"], 3)}
        print(json.dumps({name: out["nets"][name]}), file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
