"""Tests of trainer.aat: the Reptile outer update against a hand computation, the adaptive ε sampler."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.aat import (AATConfig, AdaptiveEpsSampler, mix_seed, pretext_initialise, reptile_meta_step,
                         reptile_outer_update)


# ------------------------------------------------------------------------------------------- Reptile
def _toy_problem():
    """y = w·x + b on fixed data; the 'attack' of budget eps shifts the input by +eps (deterministic)."""
    torch.manual_seed(0)
    x = torch.randn(8, 2, dtype=torch.float64)
    y = torch.randn(8, 1, dtype=torch.float64)
    lam = 0.5

    def objective(model, batch, eps):
        xb, yb = batch
        clean = ((model(xb) - yb) ** 2).mean()
        adv = ((model(xb + eps) - yb) ** 2).mean()
        return clean + lam * adv, adv.item()

    def batches(meta_iter, task, step):
        return x[step::2], y[step::2]  # inner step i uses its own half of the data

    return x, y, lam, objective, batches


def _hand_grad(w, b, xb, yb, eps, lam):
    """Gradient of mean((xw+b-y)^2) + lam*mean(((x+eps)w+b-y)^2) w.r.t. (w (2,), b ()), by hand."""
    g_w, g_b = torch.zeros_like(w), torch.zeros_like(b)
    for xx, weight in ((xb, 1.0), (xb + eps, lam)):
        r = xx @ w + b - yb[:, 0]  # residual (n,)
        g_w += weight * 2 * (xx * r[:, None]).mean(0)
        g_b += weight * 2 * r.mean()
    return g_w, g_b


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_reptile_meta_step_equals_hand_computation_sgd(beta):
    x, y, lam, objective, batches = _toy_problem()
    model = nn.Linear(2, 1).double()
    w0, b0 = model.weight.detach()[0].clone(), model.bias.detach()[0].clone()
    eps, lr, n = (0.1, 0.3), 0.05, 2

    losses = reptile_meta_step(model, eps, objective, batches, inner_steps=n, inner_lr=lr, beta=beta,
                               inner_optimizer="sgd")

    ends_w, ends_b = [], []
    for e in eps:
        w, b = w0.clone(), b0.clone()
        for i in range(n):
            gw, gb = _hand_grad(w, b, x[i::2], y[i::2], e, lam)
            w, b = w - lr * gw, b - lr * gb
        ends_w.append(w)
        ends_b.append(b)
    exp_w = w0 + beta * (torch.stack(ends_w).mean(0) - w0)
    exp_b = b0 + beta * (torch.stack(ends_b).mean(0) - b0)
    torch.testing.assert_close(model.weight.detach()[0], exp_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.bias.detach()[0], exp_b, rtol=0, atol=1e-12)
    assert len(losses) == 2 and all(l > 0 for l in losses)
    assert model.weight.grad is None  # the meta step leaves no gradients behind


def test_reptile_outer_update_formula_and_integer_buffers():
    theta = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    tasks = [{"w": torch.tensor([3.0, 2.0]), "n": torch.tensor(5)}, {"w": torch.tensor([1.0, 6.0]), "n": torch.tensor(7)}]
    out = reptile_outer_update(theta, tasks, beta=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([1.5, 3.0]))  # θ + 0.5·([2, 4] − θ)
    assert out["n"].item() == 7
    with pytest.raises(ValueError, match="at least one"):
        reptile_outer_update(theta, [], 1.0)


def test_reptile_with_a_single_task_and_beta_one_is_plain_training():
    """One task, β = 1: Reptile reduces to ``inner_steps`` plain optimiser steps."""
    x, y, lam, objective, batches = _toy_problem()
    a, b = nn.Linear(2, 1).double(), nn.Linear(2, 1).double()
    b.load_state_dict(a.state_dict())
    reptile_meta_step(a, (0.2,), objective, batches, inner_steps=3, inner_lr=0.01, beta=1.0, inner_optimizer="adam")
    opt = torch.optim.Adam(b.parameters(), lr=0.01)
    for i in range(3):
        opt.zero_grad()
        objective(b, batches(0, 0, i), 0.2)[0].backward()
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-14)  # θ + 1·(θ1 − θ) rounds


def test_pretext_initialise_runs_meta_iters_and_averages():
    x, y, lam, objective, batches = _toy_problem()
    model = nn.Linear(2, 1).double()
    calls = []
    averaged = []

    def average(state):
        averaged.append(True)
        return state

    cfg = AATConfig(eps=(0.0, 0.1, 0.2), meta_iters=3, inner_steps=1, inner_optimizer="sgd", inner_lr=0.1)
    before = objective(model, (x, y), 0.0)[0].item()
    losses = pretext_initialise(model, cfg, objective, batches, average=average,
                                on_meta_iter=lambda it, l: calls.append(it))
    assert calls == [0, 1, 2] and len(averaged) == 3 and len(losses) == 3
    assert objective(model, (x, y), 0.0)[0].item() < before
    assert pretext_initialise(model, AATConfig(meta_iters=0), objective, batches) == []


def test_aat_config_validation():
    with pytest.raises(ValueError, match="beta"):
        AATConfig(beta=0.0)
    with pytest.raises(ValueError, match="prob_mode"):
        AATConfig(prob_mode="greedy")
    with pytest.raises(ValueError, match="eps"):
        AATConfig(eps=(2.0,))


# ------------------------------------------------------------------------------------------- sampler
EPS = (2 / 255, 4 / 255, 8 / 255)


@pytest.mark.parametrize("mode", ["softmax", "proportional"])
def test_sampler_probabilities_follow_the_gap_per_budget_and_sum_to_one(mode):
    s = AdaptiveEpsSampler(EPS, mode=mode, temperature=0.5, momentum=0.0)
    torch.testing.assert_close(s.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))
    # clean loss 1 everywhere; adversarial 1.2, 1.8, 2.6 -> gaps 0.2, 0.8, 1.6 -> per 1/255: 0.1, 0.2, 0.2
    for k, adv in enumerate((1.2, 1.8, 2.6)):
        s.update(k, adv, 1.0)
    g = torch.tensor([0.2 / 2, 0.8 / 4, 1.6 / 8], dtype=torch.float64) * 255
    torch.testing.assert_close(s.weakness(), g)
    p = s.probabilities()
    assert math.isclose(p.sum().item(), 1.0, abs_tol=1e-12)
    if mode == "proportional":
        torch.testing.assert_close(p, g / g.sum())
    else:  # softmax(g / (T·mean g))
        torch.testing.assert_close(p, torch.softmax(g / (0.5 * g.mean()), 0))
    assert p[0] < p[1] and math.isclose(p[1].item(), p[2].item(), rel_tol=1e-12)


def test_sampler_moves_probability_toward_a_task_whose_loss_is_raised():
    s = AdaptiveEpsSampler(EPS, momentum=0.5)
    for k in range(3):
        s.update(k, 1.0 + 0.025 * EPS[k] * 255, 1.0)  # gap proportional to ε: equally weak everywhere
    torch.testing.assert_close(s.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))
    before = s.probabilities()
    s.update(1, 3.0, 1.0)  # the 4/255 task's adversarial loss is raised artificially
    after = s.probabilities()
    assert after[1] > before[1] + 0.2 and after[0] < before[0] and after[2] < before[2]
    assert math.isclose(after.sum().item(), 1.0, abs_tol=1e-12)


@pytest.mark.parametrize("mode", ["softmax", "proportional"])
def test_sampler_moves_away_from_8_255_when_the_model_handles_it_best_for_its_budget(mode):
    """8/255 has the largest adversarial loss (it always does) but the smallest gap per unit budget."""
    s = AdaptiveEpsSampler(EPS, mode=mode, momentum=0.0)
    clean = 1.0
    adv = (1.3, 1.5, 1.6)  # gaps 0.3, 0.5, 0.6 -> per 1/255: 0.15, 0.125, 0.075
    for k, a in enumerate(adv):
        s.update(k, a, clean)
    p = s.probabilities()
    assert p[2] < 1 / 3 and p[2] < p[1] < p[0]
    # the old rule (rank by the raw adversarial loss) would have favoured 8/255
    assert max(range(3), key=lambda k: adv[k]) == 2


def test_sampler_gap_is_clamped_and_needs_positive_budgets():
    s = AdaptiveEpsSampler(EPS, mode="proportional", momentum=0.0)
    for k in range(3):
        s.update(k, 0.9, 1.0)  # adversarial below clean (noise): gap 0, no weakness anywhere -> uniform
    torch.testing.assert_close(s.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected budgets > 0"):
        AdaptiveEpsSampler((0.0, 4 / 255))


def test_sampler_ema_unseen_tasks_and_state_roundtrip():
    s = AdaptiveEpsSampler((0.1, 0.2, 0.3), momentum=0.9)
    s.update(1, 2.0, 1.0)
    s.update(1, 4.0, 0.5)
    assert math.isclose(s.running[1].item(), 0.9 * 2.0 + 0.1 * 4.0)
    assert math.isclose(s.running_clean[1].item(), 0.9 * 1.0 + 0.1 * 0.5)
    # unseen tasks count as the largest observed weakness -> uniform here
    torch.testing.assert_close(s.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))
    s.update(0, float("nan"), 1.0)  # ignored
    s.update(2, 1.0, float("inf"))  # ignored
    assert s.counts.tolist() == [0, 2, 0]
    s.update(0, 3.0, 1.0)
    t = AdaptiveEpsSampler((0.1, 0.2, 0.3), momentum=0.9)
    t.load_state_dict(s.state_dict())
    torch.testing.assert_close(t.probabilities(), s.probabilities(), rtol=0, atol=0)
    assert torch.equal(t.running_clean.nan_to_num(-1), s.running_clean.nan_to_num(-1))
    old = {k: v for k, v in s.state_dict().items() if k != "running_clean"}  # a checkpoint from before
    t.load_state_dict(old)
    assert torch.isnan(t.running_clean).all() and torch.equal(t.running.nan_to_num(-1), s.running.nan_to_num(-1))
    with pytest.raises(ValueError, match="same aat.eps"):
        AdaptiveEpsSampler((0.1, 0.2)).load_state_dict(s.state_dict())


def test_sampler_draws_follow_probabilities_and_are_seeded():
    s = AdaptiveEpsSampler((0.1, 0.2, 0.3), mode="proportional", momentum=0.0)
    for k, gap in enumerate((0.1, 0.2, 0.6)):  # gaps per unit budget 1, 1, 2
        s.update(k, 1.0 + gap, 1.0)
    draws = [s.sample(mix_seed(7, i)) for i in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).double() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64), atol=0.03, rtol=0)
    assert [s.sample(123) for _ in range(5)] == [s.sample(123)] * 5


def test_mix_seed_is_stable_and_distinguishes_keys():
    assert mix_seed(0, 1, 2) == mix_seed(0, 1, 2)
    assert len({mix_seed(0, i, r) for i in range(50) for r in range(2)}) == 100
    assert 0 <= mix_seed("pretext", 3) < 2**63


def test_uniform_sampler_ignores_the_losses() -> None:
    """The ablation arm: probabilities stay 1/K whatever the running losses."""
    from trainer.aat import AdaptiveEpsSampler

    s = AdaptiveEpsSampler([2 / 255, 4 / 255, 8 / 255], mode="uniform")
    for task, (adv, clean) in enumerate([(5.0, 0.1), (0.2, 0.1), (9.0, 0.1)]):
        s.update(task, adv, clean)
    assert torch.equal(s.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert {s.sample(seed) for seed in range(60)} == {0, 1, 2}
