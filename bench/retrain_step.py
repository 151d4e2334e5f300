"""Training-step throughput of the retraining modes: clean (no AAT), plain AT and AAT (online stage).

PAIF: Liu et al., ACM MM 2023 (arXiv 2308.03979); DESIGN.md §7. One step = the mode's robust loss
(``RetrainModule.robust_loss``: the training attack, the clean and attacked forward passes), backward and an
AdamW step; AAT adds the adaptive ε draw and the running-loss update. Lightning's loop overhead is not
included (it is the same for every mode). Ratios are against clean, measured in the same run.

    python bench/retrain_step.py                                 # CPU, 128x160, batch 2
    python bench/retrain_step.py --quick                         # a few steps only
    python bench/retrain_step.py --device cuda --amp bf16 --size 480 640 --crop 320 --batch 8

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from search_space.pipeline import build_model
from trainer.aat import mix_seed
from trainer.checkpoint import resolve_genotype
from trainer.module import RetrainConfig, RetrainModule
from trainer.runs import tune_malloc, versions

MODES = ("clean", "at", "aat")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", default="none", choices=("none", "bf16"), help="bf16 autocast (GPU)")
    p.add_argument("--size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"), help="image size")
    p.add_argument("--crop", type=int, default=0, help="square training crop (0 = full image)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--genotype", default="paif")
    p.add_argument("--channels", type=int, default=None, help="fusion width override")
    p.add_argument("--attack-steps", type=int, default=3, help="PGD steps of the training attack")
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--quick", action="store_true", help="3 timed steps, 1 warm-up")
    return p.parse_args(argv)


def make_batch(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    h, w = args.size
    if args.crop:
        h, w = min(h, args.crop), min(w, args.crop)
    g = torch.Generator().manual_seed(0)
    batch = {"ir": torch.rand(args.batch, 1, h, w, generator=g), "vis": torch.rand(args.batch, 3, h, w, generator=g),
             "label": torch.randint(0, 9, (args.batch, h, w), generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


class ModeRunner:
    """One mode's model, optimiser and step function (each mode starts from the same initial weights)."""

    def __init__(self, mode: str, args: argparse.Namespace, device: torch.device) -> None:
        self.mode, self.device = mode, device
        self.cfg = RetrainConfig(mode=mode)
        self.cfg.attack.steps = args.attack_steps
        torch.manual_seed(0)
        model = build_model(resolve_genotype(args.genotype, channels=args.channels))
        self.module = RetrainModule(model, None, self.cfg, ".", train_set=[], val_set=None).to(device)
        self.module.train()
        self.opt = torch.optim.AdamW(self.module.model.parameters(), lr=1e-4)
        self.batch = make_batch(args, device)
        self.amp = args.amp == "bf16"
        self.i = 0

    def step(self) -> float:
        """One timed training step; returns seconds."""
        sampler = self.module.sampler
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        eps, task = None, None
        if self.mode == "at":
            eps = self.cfg.attack.at_eps
        elif self.mode == "aat":
            task = sampler.sample(mix_seed(0, "eps", self.i))
            eps = sampler.eps[task]
        gen = torch.Generator(device=self.device).manual_seed(mix_seed(0, "attack", self.i))
        self.opt.zero_grad(set_to_none=True)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with amp:
            loss, logs = self.module.robust_loss(self.batch, eps, gen)
        loss.backward()
        self.opt.step()
        if task is not None:
            sampler.update(task, float(logs["loss_adv"]))
        sync()
        self.i += 1
        return time.perf_counter() - start


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """Median step time per mode; the modes are interleaved step by step so that load on a shared
    machine hits them alike."""
    runners = {m: ModeRunner(m, args, device) for m in MODES}
    for r in runners.values():
        for _ in range(args.warmup):
            r.step()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.steps):
        for m, r in runners.items():
            times[m].append(r.step())
    out = {}
    for m, ts in times.items():
        med = statistics.median(ts)
        out[m] = {"s_per_step": round(med, 4), "steps_per_s": round(1.0 / med, 4), "min_s": round(min(ts), 4)}
    if device.type == "cuda":
        out["peak_mem_gib_all_modes"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)  # type: ignore[assignment]
    return out


def main(argv: list[str] | None = None) -> int:
    malloc_tuned = tune_malloc()  # PAIF_MALLOC_TUNING=0 for glibc's defaults
    args = parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = measure(args, device)
    base = results["clean"]["s_per_step"]
    h, w = args.size
    print(json.dumps({
        "bench": "retrain_step", "device": str(device), "amp": args.amp, "size": [h, w], "crop": args.crop or None,
        "batch": args.batch, "genotype": args.genotype, "channels": args.channels, "attack": f"PGD-{args.attack_steps}",
        "threads": torch.get_num_threads(), "malloc_tuned": malloc_tuned, "timed_steps": args.steps, "statistic": "median",
        "results": results,
        "cost_vs_clean": {m: round(results[m]["s_per_step"] / base, 2) for m in ("at", "aat")},
        "torch": versions()["torch"], "gpu": versions().get("gpu"),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
