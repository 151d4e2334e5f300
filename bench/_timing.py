"""Timing helpers shared by the bench scripts (not a benchmark itself)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock timings cover it (no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` (at least 1) runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(repeat, 1)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeat: int, warmup: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per variant; one call of each variant per round (so load changes hit every variant alike).

    ``clock``: wall time by default; ``time.process_time`` counts only this process's CPU time (steadier on a
    shared machine with one thread; with more threads it also counts their idle spinning)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(repeat, 1)):
        for key, f in fns.items():
            t0 = clock()
            f()
            sync(device)
            times[key].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def model_args(p: Any, batch: int, repeat: int) -> None:
    """The options shared by the whole-model benches (``seg_scale_cost``, ``seg_head_cost``) on an argparse parser."""
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"), help="image size")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--genotype", default="paif")
    p.add_argument("--segmenter", default="b0")
    p.add_argument("--repeat", type=int, default=repeat, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = default)")


def random_batch(args: Any, device: torch.device, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(IR (B, 1, H, W), visible (B, 3, H, W), labels (B, H, W)) of ``args.batch`` and ``args.size``, seed 0."""
    g = torch.Generator().manual_seed(0)
    h, w = args.size
    ir, vis = torch.rand(args.batch, 1, h, w, generator=g), torch.rand(args.batch, 3, h, w, generator=g)
    label = torch.randint(0, num_classes, (args.batch, h, w), generator=g)
    return ir.to(device), vis.to(device), label.to(device)


def training_pass(model: torch.nn.Module, loss: Callable[..., Any], ir: torch.Tensor, vis: torch.Tensor,
                  label: torch.Tensor) -> Callable[[], object]:
    """A call of forward + ``loss`` (``trainer.losses.TaskLoss``) + backward to every parameter of ``model``: a
    training step without the optimizer."""
    def run() -> object:
        model.zero_grad(set_to_none=True)
        value, _ = loss(model(ir, vis), ir, vis, label)
        value.backward()
        return value

    return run


def variant_medians(fns: dict[str, dict[Any, Callable[[], object]]], device: torch.device, args: Any
                    ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], str]:
    """Time ``{measure: {variant: fn}}`` with :func:`interleaved`, one measure after the other (``args.repeat``,
    ``args.warmup`` of :func:`model_args`). One torch thread on the CPU counts this process's CPU time, otherwise
    wall time. Returns ``(medians, ratios against the first variant, clock name)``, rounded, variants as strings."""
    clock = time.process_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    medians: dict[str, dict[str, float]] = {}
    for name, per_variant in fns.items():
        times = interleaved({str(k): f for k, f in per_variant.items()}, device, args.repeat, args.warmup, clock=clock)
        medians[name] = {k: round(t, 4) for k, t in times.items()}
    ratios = {name: {k: round(t / next(iter(r.values())), 2) for k, t in r.items()} for name, r in medians.items()}
    return medians, ratios, clock.__name__
