"""Benchmark: robust search step vs a plain DARTS step vs a fixed-net training step (prints JSON).

PAIF (Liu et al., ACM MM 2023) searches with an attack inside every step; this measures what that costs.
One *search step* is one NNI DARTS iteration (architecture step on a held-out batch + weight step on a
training batch), driven by the real Lightning path (strategies.darts.run_darts):

* ``robust``: ``w = w_arch = 0.5`` with the default attack (PGD, 3 steps, ε 8/255) — 2 x (3 attack
  forward/backward + 2 loss forward/backward) per iteration;
* ``darts``: ``w = w_arch = 0`` (no attack), the plain first-order DARTS iteration;
* ``fixed``: one Adam step of the fixed network (``paif`` genotype at the search width + SegFormer), clean loss.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` per phase (reset before each); on CPU the process'
peak resident set size (``VmHWM`` from /proc, reset per phase through ``/proc/self/clear_refs``; if that is
not writable, the lifetime ``ru_maxrss``) — the JSON names the method. Commands::

    python bench/search_step.py                                   # CPU, 128x160, batch 4
    python bench/search_step.py --quick                           # 64x80, batch 2, 1 timed step
    python bench/search_step.py --device cuda --amp --size 320 320 --batch 8
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402

from strategies.darts import EpochShuffleSampler, run_darts  # noqa: E402
from strategies.search import SearchConfig, build_search, darts_settings  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.runs import tune_malloc  # noqa: E402


class RandomScenes(torch.utils.data.Dataset):
    """Random (ir, vis, label) of one size: the step cost does not depend on the content."""

    def __init__(self, n: int, size: tuple[int, int], seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        h, w = size
        self.ir, self.vis = torch.rand(n, 1, h, w, generator=g), torch.rand(n, 3, h, w, generator=g)
        self.label = torch.randint(0, 9, (n, h, w), generator=g)

    def __len__(self) -> int:
        return len(self.ir)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"ir": self.ir[i], "vis": self.vis[i], "label": self.label[i], "name": str(i)}


class Memory:
    """Per-phase peak memory (CUDA allocator, or CPU peak RSS)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.method = "torch.cuda.max_memory_allocated"
        if not self.cuda:
            self.method = "VmHWM (peak RSS, reset via /proc/self/clear_refs)"
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.method = "ru_maxrss (process-lifetime peak RSS, not reset per phase)"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.method.startswith("VmHWM"):
            Path("/proc/self/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        if self.method.startswith("VmHWM"):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepTimer(pl.Callback):
    """Wall time of every training batch after ``warmup`` batches."""

    def __init__(self, warmup: int, sync: Callable[[], None]) -> None:
        self.warmup, self.sync, self.times, self._t = warmup, sync, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sync()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.sync()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t)


def search_phase(cfg: SearchConfig, robust: bool, args: argparse.Namespace, memory: Memory) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, w=0.5 if robust else 0.0, w_arch=0.5 if robust else 0.0)
    torch.manual_seed(0)
    n = (args.warmup + args.steps) * args.batch
    loaders = [torch.utils.data.DataLoader(ds, batch_size=args.batch, sampler=EpochShuffleSampler(n, i))
               for i, ds in enumerate((RandomScenes(n, args.size, 0), RandomScenes(n, args.size, 1)))]
    space, module, wrap = build_search(cfg)
    timer = StepTimer(args.warmup, _sync(args.device))
    memory.reset()
    with tempfile.TemporaryDirectory() as tmp:
        run_darts(space, module, loaders[0], loaders[1], tmp, darts_settings(cfg), {}, wrap=wrap, callbacks=[timer])
    mean = sum(timer.times) / len(timer.times)
    return {"step_s": mean, "steps_per_s": 1 / mean, "timed_steps": len(timer.times), "peak_mb": memory.peak_mb()}


def fixed_phase(cfg: SearchConfig, args: argparse.Namespace, memory: Memory, device: torch.device) -> dict[str, Any]:
    from search_space.genotype import GENOTYPES
    from search_space.pipeline import build_model
    from strategies.objective import task_objective
    from trainer.losses import TaskLoss

    torch.manual_seed(0)
    genotype = dataclasses.replace(GENOTYPES["paif"], channels=cfg.space.channels)
    model = build_model(genotype, cfg.space.segmenter, cfg.space.num_classes,
                        seg_scale=cfg.space.seg_scale).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    objective = task_objective(TaskLoss(cfg.lambda_fusion, cfg.lambda_seg))
    data = RandomScenes(args.batch, args.size, 0)
    batch = {k: getattr(data, k).to(device) for k in ("ir", "vis", "label")}
    sync = _sync(args.device)
    memory.reset()
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            loss, _ = objective(model(batch["ir"], batch["vis"]), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    mean = sum(times) / len(times)
    return {"step_s": mean, "steps_per_s": 1 / mean, "timed_steps": len(times), "peak_mb": memory.peak_mb()}


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def main(argv: list[str] | None = None) -> int:
    tune_malloc()  # PAIF_MALLOC_TUNING=0 for glibc's defaults
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", choices=("none", "bf16"), default="none",
                        help="bf16 autocast (Lightning precision bf16-mixed)")
    parser.add_argument("--size", type=int, nargs=2, default=[128, 160], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per phase")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per phase")
    parser.add_argument("--quick", action="store_true", help="64x80, batch 2, 1 timed step (smoke run)")
    parser.add_argument("--config", default="configs/search.yaml")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("overrides", nargs="*", help="SearchConfig overrides, e.g. space.channels=32")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.steps, args.warmup = [64, 80], 2, 1, 1
    args.size = tuple(args.size)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: expected a CUDA device, got none")
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("nni").setLevel(logging.ERROR)
    cfg = load_config(SearchConfig, args.config, list(args.overrides) + [
        f"device={'gpu' if args.device == 'cuda' else 'cpu'}", f"precision={'bf16-mixed' if args.amp == 'bf16' else '32-true'}",
        "progress_bar=false", "epochs=1", "log_every_n_steps=1000"])
    device = torch.device(args.device)
    memory = Memory(device)
    phases = {"fixed": fixed_phase(cfg, args, memory, device),
              "darts": search_phase(cfg, False, args, memory),
              "robust": search_phase(cfg, True, args, memory)}
    report = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "amp_bf16": args.amp == "bf16", "size": list(args.size), "batch": args.batch, "channels": cfg.space.channels,
        "candidates": len(cfg.space.candidates) if cfg.space.candidates else "default",
        "attack": dataclasses.asdict(cfg.attack), "memory_method": memory.method,
        "search_steps_per_s": phases["robust"]["steps_per_s"],
        "robust_vs_darts_time": phases["robust"]["step_s"] / phases["darts"]["step_s"],
        "robust_vs_fixed_time": phases["robust"]["step_s"] / phases["fixed"]["step_s"],
        "darts_vs_fixed_time": phases["darts"]["step_s"] / phases["fixed"]["step_s"],
        "robust_vs_darts_peak_mem": phases["robust"]["peak_mb"] / phases["darts"]["peak_mb"],
        "robust_vs_fixed_peak_mem": phases["robust"]["peak_mb"] / phases["fixed"]["peak_mb"],
        "phases": phases,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
