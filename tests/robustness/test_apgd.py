"""APGD (Croce & Hein, ICML 2020) with SEA's losses, Square, best-iterate bookkeeping and restarts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustness.attacks import APGD, PGD, SEG_LOSSES, SegPGD, Square, apgd_checkpoints, seg_loss_per_image


# ------------------------------------------------------------------------------ the published schedule
def _reference_checkpoints(n: int) -> list[int]:
    """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); w_j = ceil(p_j n); in hundredths."""
    p = [0, 22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 3, 6)
        if nxt > 100:
            break
        p.append(nxt)
    w = [-(-pj * n // 100) for pj in p[1:]]
    return sorted({x for x in w if 0 < x < n})


@pytest.mark.parametrize("n", [5, 10, 20, 25, 100, 300])
def test_checkpoints_follow_the_published_rule(n):
    assert apgd_checkpoints(n) == _reference_checkpoints(n)


def test_checkpoints_100():  # the paper's example values
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def _reference_step_sizes(f: list[float], n: int, eta0: float, rho: float = 0.75) -> list[float]:
    """Step size used after iteration k, from the loss f(x^(k)) of each iteration (one image).

    At a checkpoint w_j: halve if (1) #{w_{j-1} <= i < w_j: f_{i+1} > f_i} < rho (w_j - w_{j-1}), or
    (2) eta^(w_{j-1}) == eta^(w_j) and fmax^(w_{j-1}) == fmax^(w_j).
    """
    eta, out, prev_w = eta0, [], 0
    eta_prev_w, fmax_prev_w = eta0, f[0]
    checks = set(_reference_checkpoints(n))
    for k in range(n):
        fmax = max(f[: k + 1])
        if k in checks:
            successes = sum(f[i + 1] > f[i] for i in range(prev_w, k))
            halve = successes < rho * (k - prev_w) or (eta_prev_w == eta and fmax_prev_w == fmax)
            prev_w, eta_prev_w, fmax_prev_w = k, eta, fmax
            if halve:
                eta = eta / 2
        out.append(eta)
    return out


class Wavy(nn.Module):
    """Per-pixel two-class logits with a rugged landscape: logit_1 = 3 sin(40 v) + 2 v, v = (ir + mean vis) / 2."""

    def forward(self, ir, vis):
        v = 0.5 * (ir + vis.mean(1, keepdim=True))
        z1 = 3 * torch.sin(40 * v) + 2 * v
        logits = torch.cat([torch.zeros_like(z1), z1], 1)
        return type("Out", (), {"logits": logits, "fused_y": v})()


def _data(b=6, h=6, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ir, vis = torch.rand(b, 1, h, w, generator=g), torch.rand(b, 3, h, w, generator=g)
    return ir, vis, torch.zeros(b, h, w, dtype=torch.long)


@pytest.mark.parametrize("seg_loss", ["ce", "js"])
def test_step_size_schedule_matches_the_paper(seg_loss):
    ir, vis, label = _data()
    n = 40
    attack = APGD(Wavy(), eps=16 / 255, steps=n, seg_loss=seg_loss, seed=0)
    attack(ir, vis, label)
    trace = attack.last_trace[0]
    f, eta = trace["objective"], trace["step_size"]
    assert f.shape == eta.shape == (n, ir.shape[0])
    halvings = 0
    for i in range(ir.shape[0]):
        ref = _reference_step_sizes(f[:, i].tolist(), n, 2 * 16 / 255)
        assert eta[:, i].tolist() == pytest.approx(ref, rel=1e-6), f"image {i}"
        halvings += sum(b < a for a, b in zip(ref, ref[1:]))
    n_checks = len(apgd_checkpoints(n)) * ir.shape[0]
    assert 0 < halvings < n_checks  # both branches of the rule were exercised


def test_apgd_reaches_the_linear_optimum(linear_net):
    """On a linear model the L-inf optimum is the vertex eps * sign(w); APGD must reach it."""
    g = torch.Generator().manual_seed(0)
    ir, vis = 0.25 + 0.5 * torch.rand(2, 1, 8, 10, generator=g), 0.25 + 0.5 * torch.rand(2, 3, 8, 10, generator=g)
    label = torch.zeros(2, 8, 10, dtype=torch.long)
    ir_a, vis_a = APGD(linear_net, eps=8 / 255, steps=10, seed=0)(ir, vis, label)
    w_ir, w_vis = linear_net.w_ir.detach(), linear_net.w_vis.detach()
    assert torch.allclose(ir_a - ir, 8 / 255 * w_ir.sign().expand_as(ir), atol=1e-6)
    assert torch.allclose(vis_a - vis, 8 / 255 * w_vis.sign().expand_as(vis), atol=1e-6)


# ------------------------------------------------------------------------------ SEA's losses
def test_seg_losses_on_hand_computed_pixels():
    # one image, 3 pixels, 2 classes: correct+confident, correct+unsure, wrong; plus an ignored pixel
    logits = torch.tensor([[3.0, 0.5, -1.0, 9.0], [0.0, 0.0, 1.0, 0.0]]).view(1, 2, 1, 4)
    label = torch.tensor([[[0, 0, 0, 255]]])
    p = torch.softmax(logits[0, :, 0, :3], 0)  # (2, 3)
    ce = -p[0].log()
    assert seg_loss_per_image(logits, label, "ce").item() == pytest.approx(ce.mean().item())
    assert seg_loss_per_image(logits, label, "mce").item() == pytest.approx(ce[:2].sum().item() / 3)
    sph = 1 - p[0] / p.norm(dim=0)
    assert seg_loss_per_image(logits, label, "msl").item() == pytest.approx(sph[:2].sum().item() / 3)
    m = (p + torch.tensor([[1.0], [0.0]])) / 2
    js = 0.5 * (p * (p / m).log()).sum(0) + 0.5 * (-m[0].log())
    assert seg_loss_per_image(logits, label, "js").item() == pytest.approx(js.mean().item(), rel=1e-5)
    assert 0 <= js.max() <= math.log(2)
    # balanced CE: classes 0 (2 pixels) and 1 (1 pixel) weigh the same
    label2 = torch.tensor([[[0, 0, 1, 255]]])
    ce2 = F.cross_entropy(logits, label2, ignore_index=255, reduction="none")[0, 0]
    want = 0.5 * (ce2[:2].mean() + ce2[2])
    assert seg_loss_per_image(logits, label2, "ce-bal").item() == pytest.approx(want.item())
    with pytest.raises(ValueError, match="seg_loss"):
        seg_loss_per_image(logits, label, "dice")


@pytest.mark.parametrize("seg_loss", SEG_LOSSES)
def test_seg_losses_have_gradients(seg_loss):
    logits = torch.randn(2, 4, 3, 5, requires_grad=True)
    label = torch.randint(0, 4, (2, 3, 5))
    label[0, 0, 0] = 255
    seg_loss_per_image(logits, label, seg_loss).sum().backward()
    assert torch.isfinite(logits.grad).all()


# ------------------------------------------------------------------------------ ball, box, model state
@pytest.mark.parametrize("make", [
    lambda m: APGD(m, eps=8 / 255, steps=6, seg_loss="mce", seed=0),
    lambda m: APGD(m, eps=0.5, steps=6, norm="l2", seg_loss="js", seed=0, restarts=2),
    lambda m: APGD(m, eps=8 / 255, steps=6, seed=0, targets=["ir"]),
    lambda m: Square(m, eps=8 / 255, steps=20, seed=0),
    lambda m: Square(m, eps=8 / 255, steps=20, seed=0, targets=["vis"]),
], ids=["apgd-linf", "apgd-l2-restarts", "apgd-ir", "square", "square-vis"])
def test_stays_in_ball_and_box_and_leaves_the_model(toy, batch, make):
    attack = make(toy)
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    ir_a, vis_a = attack(batch["ir"], batch["vis"], batch["label"])
    for m, adv, x in (("ir", ir_a, batch["ir"]), ("vis", vis_a, batch["vis"])):
        assert adv.min() >= 0 and adv.max() <= 1
        d = (adv - x).flatten(1)
        size = d.abs().amax(1) if attack.norm == "linf" else d.norm(dim=1)
        if m in attack.targets:
            assert (size <= attack.eps + 1e-6).all() and (size > 0).all()
        else:
            assert torch.equal(adv, x)
    assert not toy.training and all(torch.equal(before[k], v) for k, v in toy.state_dict().items())
    assert all(p.grad is None for p in toy.parameters())


def test_budget_counts_passes(toy):
    assert APGD(toy, steps=10).budget() == {"forward": 11, "backward": 10}
    assert APGD(toy, steps=10, restarts=3).budget() == {"forward": 33, "backward": 30}
    assert PGD(toy, steps=5, keep_best=False).budget() == {"forward": 5, "backward": 5}
    assert Square(toy, steps=50).budget() == {"forward": 51, "backward": 0}
    with pytest.raises(ValueError, match="restarts"):
        APGD(toy, restarts=0)
    with pytest.raises(ValueError, match="seg_loss"):
        APGD(toy, seg_loss="dice")
    with pytest.raises(ValueError, match="linf"):
        Square(toy, norm="l2")


# ------------------------------------------------------------------------------ best iterate, restarts
def _scores(model, ir, vis, label):
    from robustness.attacks import seg_scores
    with torch.no_grad():
        return seg_scores(model(ir, vis).logits, label)


@pytest.mark.parametrize("cls", [PGD, SegPGD, APGD])
def test_best_iterate_is_the_worst_point_visited(cls):
    """keep_best returns per image the visited point of lowest accuracy (ties: higher CE), not the last."""
    ir, vis, label = _data(b=8, seed=3)
    model = Wavy()
    kw = dict(eps=16 / 255, steps=12, seed=0) | ({} if cls is APGD else {"alpha": 12 / 255})
    best = cls(model, **kw)
    err, ce = _scores(model, *best(ir, vis, label), label)
    trace = best.last_trace[0]
    e_t, c_t = trace["err"], trace["ce"]  # (T + 1, B): every iterate and the last point
    assert e_t.shape == (13, 8)
    top = e_t.max(0).values
    assert torch.equal(err, top)
    for i in range(8):  # among the iterates of the highest error, the highest CE
        assert ce[i].item() == pytest.approx(c_t[e_t[:, i] == top[i], i].max().item(), rel=1e-5)
    last = cls(model, keep_best=False, **kw)
    err_last, _ = _scores(model, *last(ir, vis, label), label)
    assert last.last_trace[0]["err"].shape[0] == 12  # keep_best=False: the last iterate, no scoring forward
    assert (err >= err_last).all()
    if cls is not APGD:  # fixed steps overshoot on the rugged landscape (APGD resets to its best point)
        assert (err > err_last).any()


def test_restarts_keep_the_best_run():
    ir, vis, label = _data(b=8, seed=4)
    model = Wavy()
    attack = APGD(model, eps=16 / 255, steps=5, seed=0, restarts=3)
    err, _ = _scores(model, *attack(ir, vis, label), label)
    assert len(attack.last_trace) == 3
    per_run = torch.stack([t["err"].max(0).values for t in attack.last_trace])
    assert torch.equal(err, per_run.max(0).values)
    assert (per_run[1:] != per_run[0]).any()  # different random starts


class _IROnly(torch.nn.Module):
    """A single-modality model: the visible input never reaches the output (as FusionSegModel(inputs="ir"))."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, ir: torch.Tensor, vis: torch.Tensor):
        return self.net(ir, torch.zeros_like(vis))


@pytest.mark.parametrize("make", [
    lambda m: PGD(m, eps=8 / 255, alpha=2 / 255, steps=2, targets=("vis",)),
    lambda m: APGD(m, eps=8 / 255, steps=3, targets=("vis",)),
])
def test_attack_on_a_modality_the_model_ignores_runs_and_changes_nothing(make, toy) -> None:
    """Attacking VIS of an IR-only model: no autograd error (the objective has no gradient path), inputs stay in
    the ball and the model's output is unchanged."""
    torch.manual_seed(0)
    model = _IROnly(toy).eval().requires_grad_(False)  # as in evaluation: frozen weights
    ir, vis = torch.rand(2, 1, 32, 40), torch.rand(2, 3, 32, 40)
    label = torch.randint(0, 9, (2, 32, 40))
    ir_adv, vis_adv = make(model)(ir, vis, label)
    assert torch.equal(ir_adv, ir)
    assert (vis_adv - vis).abs().max() <= 8 / 255 + 1e-6
    with torch.no_grad():
        torch.testing.assert_close(model(ir_adv, vis_adv).logits, model(ir, vis).logits)
