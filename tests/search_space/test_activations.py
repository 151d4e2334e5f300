"""search_space.activations.PReLU: nn.PReLU's values and gradients, its one-pass C++ backward (gradcheck in
float64, independent of the thread count), the fallbacks and state-dict compatibility."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from search_space import activations
from search_space.activations import PReLU, prelu_cpp_usable


def _grads(mod: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    y = mod(x)
    return (y.detach(), *torch.autograd.grad(y, (x, mod.weight), g))


@pytest.mark.parametrize("slope", [0.25, -0.7])
def test_prelu_matches_nn_prelu(extension, slope: float) -> None:
    torch.manual_seed(0)
    x, g = torch.randn(2, 5, 13, 17), torch.randn(2, 5, 13, 17)
    x[0, 0, 0, :4] = 0.0  # x = 0 takes the slope, as in nn.PReLU
    ref, fast = nn.PReLU(init=slope), PReLU(init=slope)
    assert prelu_cpp_usable(x, fast.weight)
    for a, b in zip(_grads(ref, x, g), _grads(fast, x, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_prelu_gradcheck_float64(extension) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    x = (x + 0.05 * x.sign()).requires_grad_(True)  # away from the kink at 0
    w = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(activations._PReLUFn.apply, (x, w))


def test_prelu_slope_gradient_independent_of_threads(extension) -> None:
    torch.manual_seed(2)
    x, g = torch.randn(3, 8, 64, 64), torch.randn(3, 8, 64, 64)
    before = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2):
            torch.set_num_threads(n)
            got.append(_grads(PReLU(), x, g)[2])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1])
    expected = (g.double() * x.double()).where(x <= 0, torch.zeros((), dtype=torch.float64)).sum()
    torch.testing.assert_close(got[0].double(), expected.view(1), atol=1e-3, rtol=1e-6)


def test_prelu_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several slopes, another dtype or PAIF_NO_CPP: nn.PReLU's own path, same numbers."""
    torch.manual_seed(3)
    x = torch.randn(1, 4, 6, 6)
    multi = PReLU(num_parameters=4)
    assert not prelu_cpp_usable(x, multi.weight)
    torch.testing.assert_close(multi(x), nn.functional.prelu(x, multi.weight))
    assert not prelu_cpp_usable(x.half(), PReLU().half().weight)
    monkeypatch.setenv("PAIF_NO_CPP", "1")
    calls = []
    monkeypatch.setattr(activations._PReLUFn, "apply", lambda *a: calls.append(1))
    single = PReLU()
    y = single(x.requires_grad_(True))
    assert not calls and torch.equal(y, nn.functional.prelu(x, single.weight))


def test_prelu_state_dict_is_nn_prelus() -> None:
    ref = nn.PReLU(init=0.1)
    fast = PReLU()
    fast.load_state_dict(ref.state_dict())
    assert list(fast.state_dict()) == ["weight"] and fast.weight.item() == pytest.approx(0.1)
    assert isinstance(fast, nn.PReLU)
