"""Box filter and guided filter (fast path, custom backward) against brute-force window sums and gradcheck;
the decomposition's folded 1x1 conv and its fused (conv-inside-the-filter) function."""
from __future__ import annotations

import pytest
import torch

from search_space.decompose import (
    GuidedDecomposition, box_filter, box_filter_cumsum, box_filter_reference, box_filter_shifted, decompose_fused,
    guidance_from_features, guided_filter,
    guided_filter_autograd, guided_filter_reference,
)


@pytest.mark.parametrize("size,radius", [((17, 22), 4), ((16, 20), 4), ((5, 7), 4), ((9, 12), 2)])
def test_box_filter_matches_window_sums(size: tuple[int, int], radius: int) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, *size) * 4 - 1
    torch.testing.assert_close(box_filter(x, radius), box_filter_reference(x, radius), atol=1e-5, rtol=0)


def test_box_filter_brute_force_double_loop() -> None:
    """Independent brute force: explicit sum over every (di, dj) of the window with a validity count."""
    torch.manual_seed(1)
    x = torch.rand(1, 2, 11, 13, dtype=torch.float64)
    r = 4
    h, w = x.shape[-2:]
    total = torch.zeros_like(x)
    count = torch.zeros(h, w, dtype=torch.float64)
    for di in range(-r, r + 1):
        for dj in range(-r, r + 1):
            for i in range(h):
                for j in range(w):
                    if 0 <= i + di < h and 0 <= j + dj < w:
                        total[..., i, j] += x[..., i + di, j + dj]
                        count[i, j] += 1
    torch.testing.assert_close(box_filter(x, r), total / count, atol=1e-12, rtol=0)


@pytest.mark.parametrize("eps", [1e-3, 1e-4])
def test_guided_filter_matches_reference(eps: float) -> None:
    torch.manual_seed(0)
    feats = torch.randn(2, 4, 17, 22) + 0.5
    guide = guidance_from_features(feats)
    expected = guided_filter_reference(guide.double(), feats.double(), eps).float()
    torch.testing.assert_close(guided_filter(guide, feats, eps), expected, atol=1e-5, rtol=0)


def test_guided_filter_both_eps_share_statistics() -> None:
    torch.manual_seed(0)
    feats = torch.randn(1, 3, 16, 20)
    guide = guidance_from_features(feats)
    both = guided_filter(guide, feats, (1e-3, 1e-4))
    for low, eps in zip(both, (1e-3, 1e-4)):
        torch.testing.assert_close(low, guided_filter(guide, feats, eps))


def test_guided_filter_constant_input_is_identity() -> None:
    guide = torch.rand(1, 1, 12, 9)
    x = torch.full((1, 2, 12, 9), 0.7)
    torch.testing.assert_close(guided_filter(guide, x, 1e-3), x, atol=1e-6, rtol=0)


def test_decomposition_equals_unfolded_concat_conv() -> None:
    torch.manual_seed(0)
    mod = GuidedDecomposition(8)
    x = torch.randn(2, 8, 17, 22, requires_grad=True)
    lows = guided_filter(guidance_from_features(x), x, mod.eps, mod.radius)
    # the published order: every low-frequency map, then every high-frequency map
    maps = torch.cat([*lows, *(x - low for low in lows)], 1)
    expected = mod.reduce(maps)
    out = mod(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and mod.reduce.weight.grad is not None


def test_guided_filter_gradcheck_float64() -> None:
    """The hand-written backward (box filters only) against finite differences, both eps, guide and x."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64, requires_grad=True)
    guide = (torch.rand(2, 1, 11, 13, dtype=torch.float64) + 0.2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda g, p: tuple(guided_filter(g, p, (1e-2, 1e-3), 4)), (guide, x))
    assert torch.autograd.gradcheck(lambda g, p: guided_filter(g, p, 1e-2, 2), (guide, x))
    # one of the two outputs unused (its gradient is None) and the guide computed from x
    assert torch.autograd.gradcheck(lambda p: guided_filter(guidance_from_features(p), p, (1e-2, 1e-3), 3)[1], (x,))


def test_guided_filter_gradient_matches_brute_force_oracle() -> None:
    """Gradient of the fast path equals autograd through the brute-force oracle (float64)."""
    torch.manual_seed(2)
    x = torch.randn(1, 2, 9, 10, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 2, 9, 10, dtype=torch.float64)

    def loss(fn) -> torch.Tensor:
        return (fn(guidance_from_features(x), x, 1e-3, 4) * weight).sum()

    (fast,) = torch.autograd.grad(loss(guided_filter), x)
    (oracle,) = torch.autograd.grad(loss(guided_filter_reference), x)
    torch.testing.assert_close(fast, oracle, atol=1e-9, rtol=1e-7)


def test_guided_filter_fast_path_matches_plain_autograd_float32() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 8, 17, 22, requires_grad=True)
    weight = torch.randn(2, 8, 17, 22)
    grads, outs = [], []
    for fn in (guided_filter, guided_filter_autograd):
        lows = fn(guidance_from_features(x), x, (1e-3, 1e-4), 4)
        outs.append(lows)
        grads.append(torch.autograd.grad(sum((low * weight).sum() for low in lows), x)[0])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("radius", [1, 3, 7, 10])
def test_box_filter_other_radii(radius: int) -> None:
    torch.manual_seed(4)
    x = torch.rand(1, 2, 23, 25, dtype=torch.float64)
    torch.testing.assert_close(box_filter(x, radius), box_filter_reference(x, radius), atol=1e-12, rtol=0)
    torch.testing.assert_close(box_filter_cumsum(x, radius), box_filter_reference(x, radius), atol=1e-12, rtol=0)
    torch.testing.assert_close(box_filter_shifted(x, radius), box_filter_reference(x, radius), atol=1e-12, rtol=0)


def test_guided_filter_compile_path_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile guided_filter takes the plain-ops path (shifted-slice box): same values, gradients."""
    torch.manual_seed(5)
    x = torch.randn(1, 4, 13, 15, dtype=torch.float64, requires_grad=True)
    eager = guided_filter(guidance_from_features(x), x, (1e-3, 1e-4))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = guided_filter(guidance_from_features(x), x, (1e-3, 1e-4))
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    ga = torch.autograd.grad(sum(t.sum() for t in eager), x)[0]
    gb = torch.autograd.grad(sum(t.sum() for t in traced), x)[0]
    torch.testing.assert_close(ga, gb, atol=1e-10, rtol=0)


def _unfused_oracle(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps, radius: int) -> torch.Tensor:
    """The decomposition written out with the brute-force guided filter and the unfolded 4C->C conv."""
    guide = guidance_from_features(x)
    lows = [guided_filter_reference(guide, x, e, radius) for e in eps]
    maps = torch.cat([*lows, *(x - low for low in lows)], 1)
    return torch.nn.functional.conv2d(maps, weight.reshape(weight.shape[0], -1, 1, 1), bias)


@pytest.mark.parametrize("batch", [1, 2])
def test_decompose_fused_matches_brute_force_oracle_and_gradient(batch: int) -> None:
    """The conv-inside-the-filter function: value and every gradient (x, weight, bias) against autograd
    through the brute-force oracle, float64."""
    torch.manual_seed(6)
    x = torch.randn(batch, 3, 11, 13, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    fused = decompose_fused(x, weight, bias, (1e-2, 1e-3), 4)
    oracle = _unfused_oracle(x, weight, bias, (1e-2, 1e-3), 4)
    torch.testing.assert_close(fused, oracle, atol=1e-12, rtol=0)
    w = torch.randn_like(fused)
    for a, b in zip(torch.autograd.grad((fused * w).sum(), (x, weight, bias)),
                    torch.autograd.grad((oracle * w).sum(), (x, weight, bias))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_decompose_fused_gradcheck_float64() -> None:
    torch.manual_seed(7)
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 12, 1, 1, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: decompose_fused(*a, (1e-2, 1e-3), 3), (x, weight, bias))
    assert torch.autograd.gradcheck(lambda p, wt: decompose_fused(p, wt, None, (1e-2,), 2), (x, weight[:, :6]))


def test_decomposition_module_fused_equals_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module's eager (fused) forward and its compile-time plain path agree in value and gradients."""
    torch.manual_seed(8)
    mod = GuidedDecomposition(6)
    x = torch.randn(2, 6, 15, 17, requires_grad=True)
    fused = mod(x)
    g_fused = torch.autograd.grad(fused.square().sum(), (x, mod.reduce.weight, mod.reduce.bias))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    plain = mod(x)
    g_plain = torch.autograd.grad(plain.square().sum(), (x, mod.reduce.weight, mod.reduce.bias))
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


def test_decompose_fused_partial_gradients() -> None:
    """Only x (an attack) or only the weights (x without grad) asked for: same values as the full backward."""
    torch.manual_seed(9)
    x = torch.randn(1, 3, 9, 11, dtype=torch.float64)
    weight = torch.randn(2, 12, dtype=torch.float64)
    bias = torch.randn(2, dtype=torch.float64)
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, weight, bias))
    full = torch.autograd.grad(decompose_fused(xs, ws, bs, (1e-2, 1e-3), 4).sum(), (xs, ws, bs))
    (gx,) = torch.autograd.grad(decompose_fused(xs, weight, bias, (1e-2, 1e-3), 4).sum(), (xs,))
    gw, gb = torch.autograd.grad(decompose_fused(x, ws, bs, (1e-2, 1e-3), 4).sum(), (ws, bs))
    for a, b in zip(full, (gx, gw, gb)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
