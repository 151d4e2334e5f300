"""The memory guard's estimate (``trainer.memory``) against the peak memory of real training steps.

Each case runs in a fresh child process: the model is built, then two AdamW steps of ``graphs`` forward passes
(clean and, with 2, a perturbed copy of the batch: the attacked pass of adversarial training; the attack's own passes
are freed before the step, so they are left out) with the task loss and backward. Measured on the CPU: the peak
resident memory (``VmHWM``, reset after the imports, a warm-up step of a tiny model and the batch) minus the memory at
that point; on a GPU ``torch.cuda.max_memory_allocated``. Prints one JSON object: per case the estimate's parts, the
measured peak and their ratio (estimate / measured).

    python bench/memory_estimate.py                       # CPU, a few fixed-genotype and supernet cases
    python bench/memory_estimate.py --device cuda         # a GPU (float32, the pure-PyTorch decomposition)
    PAIF_NO_CPP=1 python bench/memory_estimate.py         # CPU without the C++ kernels (the path the estimate measures)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: (kind, channels, batch, height, width, graphs): retrain genotype (paif) or search supernet (3 candidates)
CASES = (("genotype", 16, 2, 128, 160, 2), ("genotype", 32, 2, 128, 160, 2), ("genotype", 64, 1, 128, 160, 1),
         ("supernet", 16, 2, 96, 128, 2))
CANDIDATES = ("dense_k3_d1", "dilconv_k3_d2", "eca_k3")
RULES = ("spatial_attention", "add")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(kind: str, channels: int, batch: int, height: int, width: int, graphs: int, device: str) -> dict:
    """One case in this process: the estimate, then the measured peak of two training steps."""
    import dataclasses

    import torch

    from search_space.genotype import GENOTYPES
    from search_space.pipeline import FusionSegModel, build_model
    from trainer.losses import TaskLoss
    from trainer.memory import GB, estimate_search_memory, estimate_training_memory
    from trainer.runs import tune_malloc

    tune_malloc()  # as the entry points
    torch.set_num_threads(1)
    g = dataclasses.replace(GENOTYPES["paif"], channels=channels)
    if kind == "genotype":
        est = estimate_training_memory(g, batch, height, width, graphs=graphs)
    else:
        est = estimate_search_memory(channels, 2, CANDIDATES, RULES, batch, height, width, graphs=graphs)
    gen = torch.Generator().manual_seed(0)

    def batch_of(b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        ir, vis = torch.rand(b, 1, h, w, generator=gen), torch.rand(b, 3, h, w, generator=gen)
        return ir.to(device), vis.to(device), torch.randint(0, 9, (b, h, w), generator=gen).to(device)

    def steps(model: torch.nn.Module, ir: torch.Tensor, vis: torch.Tensor, label: torch.Tensor) -> None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_fn = TaskLoss()
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for k in range(graphs):
                shift = 0.03 * k  # the second pass: a perturbed batch
                loss = loss + loss_fn(model((ir + shift).clamp(0, 1), (vis + shift).clamp(0, 1)), ir, vis, label)[0]
            loss.backward()
            opt.step()
            del loss

    def make(c: int) -> torch.nn.Module:
        if kind == "genotype":
            return build_model(dataclasses.replace(g, channels=c)).to(device).train()
        from search_space.fusion_space import FusionSpace
        from search_space.segmenter import build_segmenter
        from strategies.darts import ResumableDARTS

        space = FusionSpace(channels=c, steps=2, candidates=CANDIDATES, rules=RULES)
        return FusionSegModel(ResumableDARTS().mutate_model(space), build_segmenter("b0", 9)).to(device).train()

    steps(make(4), *batch_of(1, 32, 64))  # warm-up: the library code and kernels a step touches are paged in first
    ir, vis, label = batch_of(batch, height, width)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak) to the current RSS
        base = _rss_kb("VmRSS") * 1024
    steps(make(channels), ir, vis, label)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kb("VmHWM") * 1024 - base
    return {"kind": kind, "channels": channels, "batch": batch, "size": [height, width], "graphs": graphs,
            "estimate_gb": {"total": est.total_bytes / GB, "parameters": est.parameter_bytes / GB,
                            "activations": est.activation_bytes / GB, "optimizer": est.optimizer_bytes / GB},
            "measured_peak_gb": peak / GB, "estimate_over_measured": est.total_bytes / peak}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--child", nargs=6, metavar=("KIND", "C", "B", "H", "W", "GRAPHS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *nums = args.child
        print(json.dumps(child(kind, *(int(n) for n in nums), device=args.device)))
        return {}
    results = []
    for case in CASES:
        proc = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", *map(str, case)],
                              capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    out = {"device": args.device, "cases": results}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
