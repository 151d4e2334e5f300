"""Cost of the evaluation attacks on the PAIF genotype + MiT-b0; prints one JSON object.

Measures, on random inputs and labels of the given size (weights random: cost does not depend on them):
    forward_ms           one forward pass, eval mode, no grad
    fwd_bwd_ms           one forward + backward to the inputs (what one attack step must compute)
    fwd_bwd_train_ms     one forward + backward to the inputs and all parameters (a training step's pass)
    pgd_step_ms          marginal cost of one PGD step: (t(PGD-n2) - t(PGD-n1)) / (n2 - n1)
    pgd_step_over_fwd_bwd, pgd_step_over_train_fwd_bwd   the same relative to those passes (floor ~ 1x)
    paif / strong        images/s of the evaluation under that threat (attack + a forward on the result)

Usage:
    python bench/attack_cost.py                                   # 480x640, batch 1, best device
    python bench/attack_cost.py --device cuda --amp bf16 --batch 4
    python bench/attack_cost.py --quick                            # smoke run (tiny, 1-step threats)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parent))  # bench/_timing.py, also when loaded by path in tests
from _timing import sync, timeit  # noqa: E402
from robustness.attacks import PGD, model_guard
from robustness.threats import build_threat
from trainer.runs import tune_malloc


def load_paif_model() -> nn.Module:
    """``search_space.pipeline.build_model(GENOTYPES["paif"])`` (MiT-b0, random weights)."""
    try:
        from search_space.genotype import GENOTYPES
        from search_space.pipeline import build_model
    except ImportError as e:
        raise SystemExit(f"bench/attack_cost.py needs search_space.pipeline.build_model and "
                         f"search_space.genotype.GENOTYPES, got ImportError: {e}; finish the search-space "
                         f"package first") from e
    return build_model(GENOTYPES["paif"], segmenter="b0", pretrained=None)




def measure(model: nn.Module, size: tuple[int, int], batch: int, device: torch.device, amp: str = "none",
            repeats: int = 3, warmup: int = 1, threats: tuple[str, ...] = ("paif", "strong"),
            pgd_steps: tuple[int, int] = (1, 5), seed: int = 0, threat_steps: int | None = None
            ) -> dict[str, Any]:
    """All measurements for ``model`` (called as ``model(ir, vis)``) as a JSON-serialisable dict.

    ``threat_steps`` overrides the threats' step counts (smoke runs only: the numbers then are not
    the threats' cost)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    ir = torch.rand(batch, 1, h, w, generator=g).to(device)
    vis = torch.rand(batch, 3, h, w, generator=g).to(device)
    with torch.no_grad():
        k = model.eval()(ir[:1], vis[:1]).logits.shape[1]
    label = torch.randint(0, k, (batch, h, w), generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]

    def forward() -> None:
        with torch.no_grad(), model_guard(model):
            model(ir, vis)

    def fwd_bwd(train_params: bool) -> Callable[[], None]:
        def run() -> None:
            with model_guard(model):
                x_ir, x_vis = ir.clone().requires_grad_(True), vis.clone().requires_grad_(True)
                out = model(x_ir, x_vis)
                loss = F.cross_entropy(out.logits.float(), label)
                if train_params:  # a training pass also back-propagates a fusion term
                    loss = loss + out.fused_y.float().mean()
                torch.autograd.grad(loss, [x_ir, x_vis] + (params if train_params else []), allow_unused=True)
        return run

    def evaluate(attack: Callable) -> Callable[[], None]:
        def run() -> None:
            ir_adv, vis_adv = attack(ir, vis, label)
            with torch.no_grad(), model_guard(model):
                model(ir_adv, vis_adv)
        return run

    res: dict[str, Any] = {}
    with autocast:
        t = {"forward": timeit(forward, device, repeats, warmup),
             "fwd_bwd": timeit(fwd_bwd(False), device, repeats, warmup),
             "fwd_bwd_train": timeit(fwd_bwd(True), device, repeats, warmup)}
        n1, n2 = pgd_steps
        pgd = [timeit(lambda n=n: PGD(model, 8 / 255, 2 / 255, n, seed=0)(ir, vis, label), device, repeats, warmup)
               for n in (n1, n2)]
        t["pgd_step"] = max(pgd[1] - pgd[0], 0.0) / (n2 - n1)
        for name in threats:
            attack = build_threat(name, model, steps=threat_steps)
            s = timeit(evaluate(attack), device, max(1, repeats // 2), min(warmup, 1))
            res[name] = {"s_per_batch": round(s, 4), "images_per_s": round(batch / s, 3)}
    for key, s in t.items():
        res[f"{key}_ms"] = round(1000 * s, 3)
    res["pgd_step_over_fwd_bwd"] = round(t["pgd_step"] / t["fwd_bwd"], 3)
    res["pgd_step_over_train_fwd_bwd"] = round(t["pgd_step"] / t["fwd_bwd_train"], 3)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    tune_malloc()  # PAIF_MALLOC_TUNING=0 for glibc's defaults
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("none", "bf16"), default="none")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(480, 640))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions per measurement")
    p.add_argument("--threats", nargs="+", default=["paif", "strong"])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 32x40, batch 1, one repeat, no warm-up, threats cut to 1 step")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    size, repeats, warmup, steps, threat_steps = tuple(args.size), args.repeat, 1, (1, 5), None
    if args.quick:
        size, repeats, warmup, steps, threat_steps = (32, 40), 1, 0, (1, 2), 1
        args.batch = 1
    torch.manual_seed(0)
    model = load_paif_model().to(device)
    res = measure(model, size, args.batch, device, args.amp, repeats, warmup, tuple(args.threats), steps,
                  threat_steps=threat_steps)
    out = {"device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
           or platform.machine(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "amp": args.amp,
           "size": list(size), "batch": args.batch, "quick": args.quick, **res}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
