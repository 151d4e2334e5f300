"""Where a training step's time goes: fusion-net overhead over its own convolutions, and the share of each part.

Prints one JSON object. Two measurements, every variant interleaved round by round (median), so the ratios
hold on a shared machine:

* ``fusion_net``: forward+backward of the frozen ``paif`` fusion net (C=32) against the summed
  forward+backward time of each of its ``nn.Conv2d`` layers run alone on the input it sees in the net
  (captured by hooks). ``ratio_to_own_convs`` is the target of issue 10 (<= 1.3); the rest is overhead.
* ``training_step``: one optimiser step of ``RetrainModule.robust_loss`` (fusion + MiT-b0) for ``clean`` and
  ``aat`` (PGD training attack), and, timed alone in the same rounds, its parts: the fusion net's
  convolutions, the two guided-filter decompositions, the fusion net as a whole, SegFormer forward+backward
  on the fused image and the training attack. Shares are part time / step time (parts overlap: the
  convolutions and decompositions are inside the fusion net; the attack's passes repeat the rest).

    python bench/step_profile.py                     # CPU, 240x320, batch 1
    python bench/step_profile.py --quick             # smoke run
    python bench/step_profile.py --device cuda --amp bf16 --size 480 640 --batch 4
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_timing.py, also when loaded by path
from _timing import interleaved, sync  # noqa: E402
from search_space.decompose import GuidedDecomposition  # noqa: E402
from search_space.genotype import GENOTYPES, build_fusion_net  # noqa: E402
from search_space.pipeline import build_model  # noqa: E402
from trainer.runs import tune_malloc  # noqa: E402


def paif(args: argparse.Namespace):
    """The built-in ``paif`` genotype, at ``--channels`` when given."""
    g = GENOTYPES["paif"]
    return g if args.channels is None else dataclasses.replace(g, channels=args.channels)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=("none", "bf16"), default="none")
    p.add_argument("--size", type=int, nargs=2, default=(240, 320), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--attack-steps", type=int, default=3, help="PGD steps of the training attack (aat)")
    p.add_argument("--attack-kind", choices=("pgd", "fgsm"), default="pgd",
                   help="training attack (fgsm: the robustness experiment's fast AT, one gradient)")
    p.add_argument("--channels", type=int, default=None,
                   help="fusion width of paif (default its own 32; the robustness experiment uses 16)")
    p.add_argument("--seg-scale", type=int, default=1, choices=(1, 2, 4),
                   help="the segmenter's input upsampling (search_space.pipeline.segment)")
    p.add_argument("--decoder-hidden-size", type=int, default=None,
                   help="SegFormer decode-head width (default: the variant's, 256 for b0; the experiment uses 64)")
    p.add_argument("--repeat", type=int, default=5, help="interleaved timed rounds (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip-step", action="store_true", help="only the fusion-net ratio")
    p.add_argument("--quick", action="store_true", help="32x40, 1 round: smoke run")
    return p.parse_args(argv)


def capture_inputs(net: nn.Module, types: tuple[type, ...], run: Callable[[], object]) -> list[tuple[nn.Module, torch.Tensor]]:
    """(module, its input) for every module of ``types`` called during ``run()``."""
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append((m, a[0].detach().clone())))
             for m in net.modules() if isinstance(m, types)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def alone(pairs: list[tuple[nn.Module, torch.Tensor]], autocast) -> Callable[[], None]:
    """Forward+backward (to input and parameters) of each captured module on its own input, in sequence."""
    leaves = [(m, x.requires_grad_(True)) for m, x in pairs]

    def run() -> None:
        for m, x in leaves:
            x.grad = None
            m.zero_grad(set_to_none=True)
            with autocast():
                y = m(x)
            y.float().sum().backward()
    return run


def fusion_net_ratio(args: argparse.Namespace, device: torch.device, autocast) -> dict:
    torch.manual_seed(0)
    net = build_fusion_net(paif(args)).to(device).train()
    h, w = args.size
    ir, y = torch.rand(args.batch, 1, h, w, device=device), torch.rand(args.batch, 1, h, w, device=device)
    convs = capture_inputs(net, (nn.Conv2d,), lambda: net(ir, y))
    decomps = capture_inputs(net, (GuidedDecomposition,), lambda: net(ir, y))

    def whole() -> None:
        net.zero_grad(set_to_none=True)
        with autocast():
            out = net(ir, y)
        out.float().sum().backward()

    sec = interleaved({"net": whole, "own_convs": alone(convs, autocast), "decompositions": alone(decomps, autocast)},
                      device, args.repeat, args.warmup)
    return {"convs": len(convs), "seconds": {k: round(v, 5) for k, v in sec.items()},
            "ratio_to_own_convs": round(sec["net"] / sec["own_convs"], 3),
            "decomposition_share_of_net": round(sec["decompositions"] / sec["net"], 3),
            "overhead_share_of_net": round(1 - sec["own_convs"] / sec["net"], 3)}


def training_step(args: argparse.Namespace, device: torch.device, autocast) -> dict:
    from trainer.module import RetrainConfig, RetrainModule

    h, w = args.size
    g = torch.Generator().manual_seed(0)
    batch = {"ir": torch.rand(args.batch, 1, h, w, generator=g), "vis": torch.rand(args.batch, 3, h, w, generator=g),
             "label": torch.randint(0, 9, (args.batch, h, w), generator=g)}
    batch = {k: v.to(device) for k, v in batch.items()}
    cfg = RetrainConfig(mode="aat")
    cfg.attack.steps = args.attack_steps
    cfg.attack.kind = args.attack_kind
    torch.manual_seed(0)
    model = build_model(paif(args), seg_scale=args.seg_scale, decoder_hidden_size=args.decoder_hidden_size).to(device)
    module = RetrainModule(model, None, cfg, ".", train_set=[], val_set=None).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    eps = cfg.attack.at_eps

    def step(adv: bool) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            gen = torch.Generator(device=device).manual_seed(0)
            with autocast():
                loss, _ = module.robust_loss(batch, eps if adv else None, gen)
            loss.backward()
            opt.step()
        return run

    def attack() -> None:
        gen = torch.Generator(device=device).manual_seed(0)
        module.make_attack(eps, gen)(batch["ir"], batch["vis"], batch["label"])

    fused_rgb = model.fuse(batch["ir"], batch["vis"])[1].detach()
    from search_space.pipeline import normalize_per_image, segment
    seg_in = normalize_per_image(fused_rgb)

    def segformer() -> None:  # at the model's seg_scale (upsampling, padding and logit resizing included)
        model.segmenter.zero_grad(set_to_none=True)
        with autocast():
            logits = segment(model.segmenter, seg_in, args.seg_scale)
        logits.float().mean().backward()

    ycbcr_y = 0.299 * batch["vis"][:, :1] + 0.587 * batch["vis"][:, 1:2] + 0.114 * batch["vis"][:, 2:]
    convs = capture_inputs(model.fusion, (nn.Conv2d,), lambda: model.fusion(batch["ir"], ycbcr_y))
    decomps = capture_inputs(model.fusion, (GuidedDecomposition,), lambda: model.fusion(batch["ir"], ycbcr_y))

    def fusion() -> None:
        model.fusion.zero_grad(set_to_none=True)
        with autocast():
            out = model.fusion(batch["ir"], ycbcr_y)
        out.float().mean().backward()

    fns = {"step_clean": step(False), "step_aat": step(True), "fusion_net": fusion,
           "fusion_convs": alone(convs, autocast), "decompositions": alone(decomps, autocast),
           "segformer": segformer, "attack": attack}
    sec = interleaved(fns, device, args.repeat, args.warmup)
    parts = ("fusion_net", "fusion_convs", "decompositions", "segformer")
    attack_name = "FGSM" if args.attack_kind == "fgsm" else f"PGD-{args.attack_steps}"
    return {"attack": attack_name, "seg_scale": args.seg_scale, "decoder_hidden_size": args.decoder_hidden_size,
            "seconds": {k: round(v, 5) for k, v in sec.items()},
            "share_of_clean_step": {k: round(sec[k] / sec["step_clean"], 3) for k in parts},
            "share_of_aat_step": {k: round(sec[k] / sec["step_aat"], 3) for k in parts + ("attack",)},
            "aat_vs_clean": round(sec["step_aat"] / sec["step_clean"], 3)}


def main(argv: list[str] | None = None) -> dict:
    malloc_tuned = tune_malloc()  # PAIF_MALLOC_TUNING=0 for glibc's defaults
    args = parse_args(argv)
    if args.quick:
        args.size, args.batch, args.repeat, args.warmup, args.attack_steps = (32, 40), 1, 1, 0, 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: expected a CUDA device, got none")

    def autocast():
        if args.amp == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    out = {"bench": "step_profile", "device": str(device), "amp": args.amp, "size": list(args.size),
           "batch": args.batch, "channels": paif(args).channels, "threads": torch.get_num_threads(), "torch": torch.__version__, "malloc_tuned": malloc_tuned,
           "repeat": args.repeat, "statistic": "median of interleaved rounds",
           "fusion_net": fusion_net_ratio(args, device, autocast)}
    print(json.dumps({"fusion_net": out["fusion_net"]}), file=sys.stderr, flush=True)
    if not args.skip_step:
        out["training_step"] = training_step(args, device, autocast)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
