"""One-shot GPU run of every bench (CUDA, bf16 autocast, torch.compile, 480x640, batch 4); one JSON document.

Called by ``bench/gpu_suite.sh``. Each bench runs in this process through its ``main(argv)``; the peak CUDA
memory of each is recorded (``torch.cuda.max_memory_allocated``, reset before each). A bench that fails is
reported with its error and the suite goes on. Without CUDA it prints ``{"error": ...}`` and exits 2, unless
``--device cpu`` is given (then a tiny CPU smoke run of the same code paths: the unit test's mode).

    bash bench/gpu_suite.sh                       # on a CUDA machine (~6-8 minutes)
    python bench/gpu_suite.py --device cpu --quick
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def suite(device: str, quick: bool) -> list[tuple[str, str, list[str]]]:
    """(name, bench module, argv) of every bench; ``quick``: the smoke sizes."""
    if quick:
        return [("fusion_forward", "fusion_forward", ["--quick", "--device", device]),
                ("decomposition", "decompose_speed", ["--quick", "--device", device]),
                ("attack_cost", "attack_cost", ["--quick", "--device", device, "--threats", "paif"]),
                ("step_profile", "step_profile", ["--quick", "--device", device])]
    gpu = ["--device", device, "--amp", "bf16"]
    return [
        ("fusion_forward", "fusion_forward", gpu + ["--compile", "--channels-last", "--sizes", "480x640",
                                                    "--batches", "4", "--repeat", "10", "--warmup", "3"]),
        ("decomposition", "decompose_speed", ["--device", device, "--batch", "4", "--sizes", "480x640",
                                              "--repeat", "10", "--warmup", "3", "--compile"]),
        ("attack_cost", "attack_cost", gpu + ["--batch", "4", "--threats", "paif", "--repeat", "5"]),
        ("step_profile", "step_profile", gpu + ["--size", "480", "640", "--batch", "4", "--repeat", "5"]),
        ("compile_gain", "compile_gain", gpu + ["--size", "480", "640", "--batch", "4", "--repeat", "5", "--skip-model"]),
    ]


def run_one(module: str, argv: list[str], cuda: bool) -> dict:
    mod = __import__(module)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # attack_cost prints its JSON itself; keep stdout for the suite's
        result = mod.main(argv)
    entry = {"argv": argv, "wall_s": round(time.perf_counter() - t0, 1), "result": result}
    if cuda:
        entry["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="smoke sizes (seconds)")
    p.add_argument("--only", nargs="*", default=None, help="names of the benches to run")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(json.dumps({"error": "CUDA is not available on this machine (torch.cuda.is_available() is False); "
                                   "bench/gpu_suite.sh needs a CUDA GPU. For a CPU smoke run: "
                                   "python bench/gpu_suite.py --device cpu --quick", "torch": torch.__version__}))
        return 2
    doc: dict = {"suite": "gpu_suite", "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                 "torch": torch.__version__, "quick": args.quick, "benches": {}}
    for name, module, bench_argv in suite(args.device, args.quick):
        if args.only and name not in args.only:
            continue
        print(f"[gpu_suite] {name}: {' '.join(bench_argv)}", file=sys.stderr, flush=True)
        try:
            doc["benches"][name] = run_one(module, bench_argv, cuda)
        except Exception as e:  # noqa: BLE001 - one failing bench must not lose the others' numbers
            doc["benches"][name] = {"argv": bench_argv, "error": f"{type(e).__name__}: {e}",
                                    "traceback": traceback.format_exc()[-2000:]}
    doc["summary"] = summary(doc["benches"])
    print(json.dumps(doc, indent=1, default=str))
    return 0 if all("error" not in b for b in doc["benches"].values()) else 1


def summary(benches: dict) -> dict:
    """The headline numbers of the suite, where present."""
    def get(fn: Callable[[], object]) -> object:
        try:
            return fn()
        except (KeyError, IndexError, TypeError):
            return None

    b = benches
    return {
        "fusion_fwd_img_s": get(lambda: b["fusion_forward"]["result"]["fusion"][0]["forward_img_s"]),
        "fusion_fwd_bwd_img_s": get(lambda: b["fusion_forward"]["result"]["fusion"][0]["forward_backward_img_s"]),
        "model_fwd_img_s": get(lambda: b["fusion_forward"]["result"]["model"][0]["forward_img_s"]),
        "model_fwd_bwd_img_s": get(lambda: b["fusion_forward"]["result"]["model"][0]["forward_backward_img_s"]),
        "paif_pgd5_eval_img_s": get(lambda: b["attack_cost"]["result"]["paif"]["images_per_s"]),
        "pgd_step_over_train_fwd_bwd": get(lambda: b["attack_cost"]["result"]["pgd_step_over_train_fwd_bwd"]),
        "decomposition_x_conv3x3": get(lambda: next(iter(b["decomposition"]["result"]["sizes"].values()))),
        "fusion_net_ratio_to_own_convs": get(lambda: b["step_profile"]["result"]["fusion_net"]["ratio_to_own_convs"]),
        "peak_mem_gib": {k: v.get("peak_mem_gib") for k, v in b.items()},
    }


if __name__ == "__main__":
    raise SystemExit(main())
