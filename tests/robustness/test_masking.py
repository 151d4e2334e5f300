"""Gradient-masking checks: a model with a quantising input layer makes them fire, a smooth one does not."""
from __future__ import annotations

import torch
from torch import nn

from robustness.attacks import APGD, PGD, seg_scores
from robustness.masking import MaskingChecks, loss_rose, summarise
from robustness.threats import WorstCase, build_threat

EDGE = 16.5 / 32  # class 1 where the quantised intensity reaches bin 17 of 32


class PixelNet(nn.Module):
    """Per-pixel two-class logits from v = (ir + mean vis) / 2; ``quantise`` rounds v to 1/32 first.

    round() has zero gradient almost everywhere: a textbook masked gradient. The smooth model's L-inf
    optimum is known (move v by eps toward the edge), so no black-box search can beat white-box PGD on it.
    """

    def __init__(self, quantise: bool) -> None:
        super().__init__()
        self.quantise = quantise
        self.scale = nn.Parameter(torch.tensor(60.0))

    def forward(self, ir, vis):
        v = 0.5 * (ir + vis.mean(1, keepdim=True))
        if self.quantise:
            v = torch.round(v * 32) / 32
        z1 = self.scale * (v - EDGE)
        return type("Out", (), {"logits": torch.cat([torch.zeros_like(z1), z1], 1), "fused_y": v})()


def _data():
    g = torch.Generator().manual_seed(0)
    base = 0.42 + 0.2 * torch.rand(4, 1, 12, 14, generator=g)
    ir, vis = base.clone(), base.expand(-1, 3, -1, -1).clone()
    label = (torch.round(base[:, 0] * 32) / 32 >= EDGE).long()  # the clean prediction of both models
    return ir, vis, label


def _run(quantise: bool):
    model = PixelNet(quantise).eval()
    ir, vis, label = _data()
    white = WorstCase([PGD(model, eps=8 / 255, alpha=4 / 255, steps=6, seed=0),
                       APGD(model, eps=8 / 255, steps=6, seg_loss="ce-bal", seed=1)])
    adv = white(ir, vis, label)
    checks = MaskingChecks(model, 8 / 255, queries=40, seed=0, surrogate=PixelNet(False).eval(),
                           transfer=lambda m: build_threat("paif", m))
    worst, flags = checks(ir, vis, label, adv, white)
    return model, (ir, vis, label), adv, worst, flags


def test_smooth_model_passes_every_check():
    _, _, _, _, flags = _run(quantise=False)
    assert set(flags) == {"loss_rise", "square", "transfer"}
    for name, fired in flags.items():
        assert not fired.any(), name


def test_quantised_input_makes_the_checks_fire_and_the_worst_case_includes_black_box():
    model, (ir, vis, label), adv, worst, flags = _run(quantise=True)
    assert flags["loss_rise"].all()  # zero gradients: PGD and APGD never move
    assert flags["square"].any()  # the gradient-free search finds what they miss
    white_err, _ = seg_scores(model(*adv).logits, label)
    worst_err, _ = seg_scores(model(*worst).logits, label)
    assert (worst_err >= white_err).all() and (worst_err > white_err).any()
    for x, x0 in zip(worst, (ir, vis)):  # still a valid adversarial input
        assert (x - x0).abs().max() <= 8 / 255 + 1e-6 and x.min() >= 0 and x.max() <= 1


def test_masked_losses_do_not_count_for_the_rise_and_summary():
    model = PixelNet(False)
    ir, vis, label = _data()
    only_masked = APGD(model, eps=8 / 255, steps=3, seg_loss="mce", seed=0)
    only_masked(ir, vis, label)
    assert loss_rose(only_masked) is None
    rows = summarise({"loss_rise": {"fired": 0, "images": 4}, "square": {"fired": 2, "images": 4}})
    assert [r["status"] for r in rows] == ["passed", "FIRED", "skipped"]
