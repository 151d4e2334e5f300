"""Attack invariants, closed-form worst cases and the SegPGD / CosPGD weights on hand-computed examples."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustness.attacks import (
    FGSM, PGD, CosPGD, SegPGD, cospgd_weights, model_guard, pixel_ce, segpgd_lambda, segpgd_weights,
)

ATTACKS = {
    "pgd": lambda m, **kw: PGD(m, steps=3, **kw),
    "fgsm": lambda m, **kw: FGSM(m, **kw),
    "fgsm_rs": lambda m, **kw: FGSM(m, random_start=True, alpha=1.25 * kw.pop("eps"), eps=8 / 255, **kw),
    "segpgd": lambda m, **kw: SegPGD(m, steps=3, **kw),
    "cospgd": lambda m, **kw: CosPGD(m, steps=3, **kw),
}


def _eps(norm: str) -> float:
    return 8 / 255 if norm == "linf" else 0.5


def _alpha(norm: str) -> float:
    return 4 / 255 if norm == "linf" else 0.3


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_eps_ball_and_box(toy, batch, name, norm):
    eps = _eps(norm)
    kw = dict(eps=eps, norm=norm, seed=0) if name.startswith("fgsm") else dict(eps=eps, alpha=_alpha(norm), norm=norm, seed=0)
    attack = ATTACKS[name](toy, **kw)
    ir_adv, vis_adv = attack(batch["ir"], batch["vis"], batch["label"])
    for adv, x in ((ir_adv, batch["ir"]), (vis_adv, batch["vis"])):
        assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
        assert adv.min() >= 0 and adv.max() <= 1
        d = (adv - x).flatten(1)
        size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        assert (size <= attack.eps + 1e-6).all()
        assert (size > 0).all()  # it did move


def _state(model):
    return {
        "training": [m.training for m in model.modules()],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
    }


def _same_state(a, b):
    assert a["training"] == b["training"]
    assert a["requires_grad"] == b["requires_grad"]
    for key in ("params", "buffers"):
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), (key, n)
    for n in a["grads"]:
        assert (a["grads"][n] is None) == (b["grads"][n] is None), n
        if a["grads"][n] is not None:
            assert torch.equal(a["grads"][n], b["grads"][n]), n


@pytest.mark.parametrize("model_mode", ["eval", "keep"])
@pytest.mark.parametrize("name", ["pgd", "segpgd", "cospgd", "fgsm"])
def test_model_state_untouched(batch, toy_cls, name, model_mode):
    torch.manual_seed(0)
    model = toy_cls().train()
    model.body[1].eval()  # mixed modes must survive too
    model.seg.bias.requires_grad_(False)
    model.body[0].weight.grad = torch.full_like(model.body[0].weight, 0.5)  # a non-None grad; others None
    model(batch["ir"], batch["vis"])  # move BN statistics away from their init
    before = _state(model)
    kw = dict(eps=8 / 255, model_mode=model_mode, seed=0)
    ATTACKS[name](model, **kw)(batch["ir"], batch["vis"], batch["label"])
    _same_state(before, _state(model))
    # fusion loss too
    PGD(model, 8 / 255, 2 / 255, 2, loss="fusion", model_mode=model_mode, seed=0)(batch["ir"], batch["vis"])
    _same_state(before, _state(model))


def test_model_guard_restores_on_error(toy, batch):
    toy.train()
    before = _state(toy)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with model_guard(toy, "keep"):
            toy(batch["ir"], batch["vis"])  # updates BN running stats
            raise Boom
    _same_state(before, _state(toy))


def test_attack_modes(batch, toy_cls):
    """eval mode: BN uses running stats during the attack; keep: the model's own (train) mode."""
    seen = []

    class Spy(toy_cls):
        def forward(self, ir, vis):
            seen.append(self.body[1].training)
            return super().forward(ir, vis)

    model = Spy().train()
    PGD(model, 8 / 255, 2 / 255, 2, seed=0)(batch["ir"], batch["vis"], batch["label"])
    assert seen == [False] * 3 and model.training  # 2 gradient steps + scoring the last iterate (best iterate)
    seen.clear()
    PGD(model, 8 / 255, 2 / 255, 2, seed=0, model_mode="keep")(batch["ir"], batch["vis"], batch["label"])
    assert seen == [True] * 3


def _ce(model, ir, vis, label):
    with torch.no_grad():
        return F.cross_entropy(model(ir, vis).logits.float(), label, ignore_index=255).item()


def test_pgd_increases_loss(toy, batch):
    clean = _ce(toy, batch["ir"], batch["vis"], batch["label"])
    adv = PGD(toy, 8 / 255, 2 / 255, 5, seed=0)(batch["ir"], batch["vis"], batch["label"])
    assert _ce(toy, *adv, batch["label"]) > clean + 1e-3


@pytest.mark.parametrize("random_start", [True, False])
def test_linf_reaches_analytic_worst_case(linear_net, random_start):
    model = linear_net
    g = torch.Generator().manual_seed(0)
    ir, vis = 0.3 + 0.4 * torch.rand(2, 1, 8, 10, generator=g), 0.3 + 0.4 * torch.rand(2, 3, 8, 10, generator=g)
    label = torch.zeros(2, 8, 10, dtype=torch.long)
    eps = 8 / 255
    ir_adv, vis_adv = PGD(model, eps, eps / 2, 4, random_start=random_start, seed=0)(ir, vis, label)
    torch.testing.assert_close(ir_adv - ir, (eps * model.w_ir.sign()).expand_as(ir).detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(vis_adv - vis, (eps * model.w_vis.sign()).expand_as(vis).detach(), atol=1e-6, rtol=0)
    # it is the maximum: no other point of the ball (random vertices) has a higher loss
    best = _ce(model, ir_adv, vis_adv, label)
    assert best > _ce(model, ir, vis, label)
    for _ in range(20):
        s_ir = torch.randint(0, 2, ir.shape, generator=g) * 2 - 1
        s_vis = torch.randint(0, 2, vis.shape, generator=g) * 2 - 1
        assert _ce(model, ir + eps * s_ir, vis + eps * s_vis, label) <= best + 1e-6


def test_l2_reaches_analytic_worst_case(linear_net):
    model = linear_net
    g = torch.Generator().manual_seed(0)
    ir, vis = 0.3 + 0.4 * torch.rand(2, 1, 8, 10, generator=g), 0.3 + 0.4 * torch.rand(2, 3, 8, 10, generator=g)
    label = torch.zeros(2, 8, 10, dtype=torch.long)
    eps = 0.5
    ir_adv, vis_adv = PGD(model, eps, 0.2, 5, norm="l2", random_start=False)(ir, vis, label)
    w_ir, w_vis = model.w_ir.detach(), model.w_vis.detach()
    torch.testing.assert_close(ir_adv - ir, (eps * w_ir / w_ir.norm()).expand_as(ir), atol=1e-5, rtol=0)
    torch.testing.assert_close(vis_adv - vis, (eps * w_vis / w_vis.norm()).expand_as(vis), atol=1e-5, rtol=0)
    # with a random start, PGD converges to the same point
    ir_rs, _ = PGD(model, eps, 0.2, 60, norm="l2", seed=0)(ir, vis, label)
    torch.testing.assert_close(ir_rs, ir_adv, atol=2e-3, rtol=0)


def test_segpgd_weights_hand_computed(out_cls):
    # pixels: correct (argmax 1 = label 1), wrong (argmax 0, label 1), ignored
    logits = torch.tensor([[0.0, 0.0, 5.0], [1.0, -1.0, 0.0]]).view(1, 2, 1, 3)
    label = torch.tensor([[[1, 1, 255]]])
    assert segpgd_lambda(1, 4) == 0.0 and segpgd_lambda(3, 4) == 0.25 and segpgd_lambda(4, 4) == 3 / 8
    torch.testing.assert_close(segpgd_weights(logits, label, 1, 4), torch.tensor([[[1.0, 0.0, 0.0]]]))
    torch.testing.assert_close(segpgd_weights(logits, label, 3, 4), torch.tensor([[[0.75, 0.25, 0.0]]]))
    with pytest.raises(ValueError, match="1 <= t <= steps"):
        segpgd_lambda(0, 4)
    # the SegPGD objective: [(1 - lam) CE_correct + lam CE_wrong] / n_valid
    attack = SegPGD(torch.nn.Identity(), 8 / 255, 2 / 255, 4)
    ce1 = math.log(1 + math.exp(-1.0))      # correct pixel: logits (0, 1), label 1
    ce2 = math.log(1 + math.exp(1.0))       # wrong pixel: logits (0, -1), label 1
    out = out_cls(None, None, logits)
    expected = (0.75 * ce1 + 0.25 * ce2) / 2
    assert attack.objective(out, label, None, 3).item() == pytest.approx(expected, rel=1e-6)


def test_cospgd_weights_hand_computed(out_cls):
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(3.0), math.log(3.0), 0.0]]).view(1, 2, 1, 3)
    label = torch.tensor([[[1, 0, 255]]])
    # softmax = (1/4, 3/4): cos with e_1 = 0.75 / sqrt(1/16 + 9/16), with e_0 = 0.25 / sqrt(10/16)
    norm = math.sqrt(10 / 16)
    expected = torch.tensor([[[0.75 / norm, 0.25 / norm, 0.0]]])
    torch.testing.assert_close(cospgd_weights(logits, label), expected)
    # sigmoid variant (arXiv v1): sigma(0) = sigma(0) = 1/2 at the third pixel -> 1/sqrt(2) for any label
    label2 = torch.tensor([[[1, 0, 0]]])
    s = torch.sigmoid(torch.tensor([0.0, math.log(3.0)]))
    w = cospgd_weights(logits, label2, activation="sigmoid")
    assert w[0, 0, 0].item() == pytest.approx((s[1] / s.norm()).item(), rel=1e-6)
    assert w[0, 0, 2].item() == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    # CosPGD objective = mean over valid pixels of w * CE; the weight carries no gradient
    z = logits.clone().requires_grad_(True)
    loss = CosPGD(torch.nn.Identity(), 8 / 255, 2 / 255, 2).objective(out_cls(None, None, z), label, None, 1)
    ce = pixel_ce(logits, label)
    assert loss.item() == pytest.approx(((expected * ce).sum() / 2).item(), rel=1e-6)
    (g,) = torch.autograd.grad(loss, z)
    g_ref = torch.autograd.grad((expected * pixel_ce(z, label)).sum() / 2, z)[0]
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_eps_zero_returns_inputs(toy, batch, name):
    calls = []
    toy.register_forward_hook(lambda *a: calls.append(1))
    ir_adv, vis_adv = ATTACKS[name](toy, eps=0.0)(batch["ir"], batch["vis"], batch["label"]) \
        if name != "fgsm_rs" else FGSM(toy, 0.0, random_start=True)(batch["ir"], batch["vis"], batch["label"])
    assert torch.equal(ir_adv, batch["ir"]) and torch.equal(vis_adv, batch["vis"])
    assert not calls


def test_targets_leave_other_modality(toy, batch):
    ir_adv, vis_adv = PGD(toy, 8 / 255, 2 / 255, 3, targets=("ir",), seed=0)(batch["ir"], batch["vis"], batch["label"])
    assert torch.equal(vis_adv, batch["vis"]) and not torch.equal(ir_adv, batch["ir"])
    ir_adv, vis_adv = PGD(toy, 8 / 255, 2 / 255, 3, targets=("vis",), seed=0)(batch["ir"], batch["vis"], batch["label"])
    assert torch.equal(ir_adv, batch["ir"]) and not torch.equal(vis_adv, batch["vis"])


def test_fusion_loss_needs_no_labels(toy, batch):
    attack = PGD(toy, 8 / 255, 2 / 255, 5, loss="fusion", seed=0)
    ir_adv, vis_adv = attack(batch["ir"], batch["vis"])
    with torch.no_grad():
        clean = toy(batch["ir"], batch["vis"]).fused_y
        d_adv = (toy(ir_adv, vis_adv).fused_y - clean).square().mean()
        rs = PGD(toy, 8 / 255, 2 / 255, 0, loss="fusion", seed=0)(batch["ir"], batch["vis"])  # random start only
        d_rs = (toy(*rs).fused_y - clean).square().mean()
    assert d_adv > 2 * d_rs > 0


def test_seeded_attack_is_reproducible_and_inputs_untouched(toy, batch):
    ir0, vis0 = batch["ir"].clone(), batch["vis"].clone()
    attack = CosPGD(toy, 8 / 255, 2 / 255, 2, seed=3)
    a = attack(batch["ir"], batch["vis"], batch["label"])
    b = attack(batch["ir"], batch["vis"], batch["label"])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(batch["ir"], ir0) and torch.equal(batch["vis"], vis0)
    assert batch["ir"].grad is None


def test_autocast_bf16_and_no_grad(toy, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ir_adv, vis_adv = SegPGD(toy, 8 / 255, 2 / 255, 3, seed=0)(batch["ir"], batch["vis"], batch["label"])
    assert ir_adv.dtype == torch.float32
    assert (ir_adv - batch["ir"]).abs().max() <= 8 / 255 + 1e-6 and vis_adv.min() >= 0 and vis_adv.max() <= 1
    assert not torch.equal(vis_adv, batch["vis"])
    with torch.no_grad():
        ir_adv, _ = PGD(toy, 8 / 255, 2 / 255, 2, seed=0)(batch["ir"], batch["vis"], batch["label"])
    assert not torch.equal(ir_adv, batch["ir"])
    with torch.inference_mode():
        ir_adv, _ = PGD(toy, 8 / 255, 2 / 255, 2, seed=0)(batch["ir"], batch["vis"], batch["label"])
    assert not torch.equal(ir_adv, batch["ir"])


def test_repr_lists_hyper_parameters(toy):
    r = repr(CosPGD(toy, 8 / 255, 2 / 255, 20, norm="l2", targets=("ir",), seed=1))
    for s in ("CosPGD(", "eps=0.0313725", "alpha=0.00784314", "steps=20", "norm='l2'", "targets=('ir',)",
              "loss='seg'", "seed=1", "activation='softmax'", "random_start=True"):
        assert s in r, (s, r)


def test_errors(toy, batch):
    with pytest.raises(ValueError, match="needs labels"):
        PGD(toy)(batch["ir"], batch["vis"])
    with pytest.raises(ValueError, match="norm"):
        PGD(toy, norm="l1")
    with pytest.raises(ValueError, match="eps >= 0"):
        PGD(toy, eps=-1 / 255)
    with pytest.raises(ValueError, match="targets"):
        PGD(toy, targets=("rgb",))
    with pytest.raises(ValueError, match="loss"):
        PGD(toy, loss="dice")
    with pytest.raises(ValueError, match="loss='seg'"):
        SegPGD(toy, loss="fusion")
    with pytest.raises(ValueError, match="random_start=True"):
        PGD(toy, loss="fusion", random_start=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PGD(toy)(batch["ir"] * 255, batch["vis"], batch["label"])
    with pytest.raises(ValueError, match="int64"):
        PGD(toy)(batch["ir"], batch["vis"], batch["label"].float())
    with pytest.raises(ValueError, match="spatial size"):
        PGD(toy, seed=0)(batch["ir"], batch["vis"], batch["label"][:, :16])
