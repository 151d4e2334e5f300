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
@pytest.mark.parametrize("mode", ["softmax", "proportional"])
def test_sampler_probabilities_grow_with_running_loss_and_sum_to_one(mode):
    s = AdaptiveEpsSampler((2 / 255, 4 / 255, 8 / 255), mode=mode, temperature=0.5, momentum=0.0)
    torch.testing.assert_close(s.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))
    for k, loss in enumerate((1.0, 2.0, 3.0)):
        s.update(k, loss)
    p = s.probabilities()
    assert math.isclose(p.sum().item(), 1.0, abs_tol=1e-12)
    assert p[0] < p[1] < p[2]
    if mode == "proportional":
        torch.testing.assert_close(p, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) / 6)
    else:  # softmax(r / (T·mean r)) with mean 2, T = 0.5 -> softmax(r)
        torch.testing.assert_close(p, torch.softmax(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), 0))
    # raising task 0's loss raises its probability
    before = p[0].item()
    s.update(0, 10.0)
    assert s.probabilities()[0].item() > before
    assert math.isclose(s.probabilities().sum().item(), 1.0, abs_tol=1e-12)


def test_sampler_ema_unseen_tasks_and_state_roundtrip():
    s = AdaptiveEpsSampler((0.1, 0.2, 0.3), momentum=0.9)
    s.update(1, 2.0)
    s.update(1, 4.0)
    assert math.isclose(s.running[1].item(), 0.9 * 2.0 + 0.1 * 4.0)
    # unseen tasks count as the largest observed loss -> uniform here
    torch.testing.assert_close(s.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))
    s.update(0, float("nan"))  # ignored
    assert s.counts.tolist() == [0, 2, 0]
    t = AdaptiveEpsSampler((0.1, 0.2, 0.3), momentum=0.9)
    t.load_state_dict(s.state_dict())
    torch.testing.assert_close(t.probabilities(), s.probabilities())
    with pytest.raises(ValueError, match="same aat.eps"):
        AdaptiveEpsSampler((0.1, 0.2)).load_state_dict(s.state_dict())


def test_sampler_draws_follow_probabilities_and_are_seeded():
    s = AdaptiveEpsSampler((0.1, 0.2, 0.3), mode="proportional", momentum=0.0)
    for k, loss in enumerate((1.0, 1.0, 2.0)):
        s.update(k, loss)
    draws = [s.sample(mix_seed(7, i)) for i in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).double() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64), atol=0.03, rtol=0)
    assert [s.sample(123) for _ in range(5)] == [s.sample(123)] * 5


def test_mix_seed_is_stable_and_distinguishes_keys():
    assert mix_seed(0, 1, 2) == mix_seed(0, 1, 2)
    assert len({mix_seed(0, i, r) for i in range(50) for r in range(2)}) == 100
    assert 0 <= mix_seed("pretext", 3) < 2**63
