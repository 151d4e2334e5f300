"""FusionSpace as an NNI model space: labels, DARTS supernet forward/backward, freezing with the paif genotype."""
from __future__ import annotations

import torch
from nni.nas.nn.pytorch import LayerChoice
from nni.nas.oneshot.pytorch.supermodule.differentiable import DifferentiableMixedLayer
from nni.nas.strategy import DARTS

from search_space.cells import DEFAULT_RULES
from search_space.fusion_space import FusionSpace
from search_space.genotype import GENOTYPES, build_fusion_net
from search_space.ops import DEFAULT_CANDIDATES

SMALL = ("dense_k3_d1", "dilconv_k3_d2", "eca_k3", "residual_k7_d1", "selfattn_w8_h2")


def _inputs(b: int = 2, size: tuple[int, int] = (17, 22)) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.rand(b, 1, *size), torch.rand(b, 1, *size)


def test_labels_and_choices() -> None:
    space = FusionSpace(channels=8, steps=2)
    mutables = space.simplify()
    expected = [f"{c}/op{i}" for c in ("ir", "vis", "fused") for i in (1, 2)] + ["rule"]
    assert sorted(mutables) == sorted(expected)
    assert list(mutables["ir/op1"].values) == list(DEFAULT_CANDIDATES)
    assert list(mutables["rule"].values) == list(DEFAULT_RULES)


def test_darts_supernet_forward_backward() -> None:
    space = FusionSpace(channels=8, steps=2, candidates=SMALL)
    supernet = DARTS().mutate_model(space)
    mixed = [m for m in supernet.modules() if isinstance(m, LayerChoice)]
    assert len(mixed) == 7 and all(isinstance(m, DifferentiableMixedLayer) for m in mixed)
    alphas = [p for n, p in supernet.named_parameters() if n.endswith("_arch_alpha")]
    assert len(alphas) == 7
    ir, y = _inputs()
    ir.requires_grad_(True)
    out = supernet(ir, y)
    assert out.shape == ir.shape and ((out >= 0) & (out <= 1)).all()
    out.mean().backward()
    assert all(a.grad is not None and torch.isfinite(a.grad).all() for a in alphas)
    assert ir.grad is not None and ir.grad.abs().sum() > 0
    # the supernet freezes to a plain net too (what a DARTS export does with the best sample)
    net = supernet.freeze(GENOTYPES["paif"].to_sample())
    assert not any(isinstance(m, LayerChoice) for m in net.modules())
    assert net(ir.detach(), y).shape == ir.shape


def test_freeze_every_rule_runs() -> None:
    space = FusionSpace(channels=8, steps=1, candidates=("eca_k3",))
    ir, y = _inputs(1, (16, 20))
    for rule in DEFAULT_RULES:
        net = space.freeze({"ir/op1": "eca_k3", "vis/op1": "eca_k3", "fused/op1": "eca_k3", "rule": rule})
        assert net(ir, y).shape == (1, 1, 16, 20)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paif_frozen_net_parameter_count() -> None:
    net = build_fusion_net(GENOTYPES["paif"])
    assert not any(isinstance(m, LayerChoice) for m in net.modules())
    c = 32
    conv = lambda cin, cout, k: cin * cout * k * k + cout  # noqa: E731
    dense = conv(c, c, 3) + conv(2 * c, c, 3) + conv(3 * c, c, 3)
    dilconv = 9 * c + c * c + 2 * c
    residual = conv(c, c, 7) + conv(c, c, 3) + conv(c, c, 1) + 2 * c + c
    expected = (2 * conv(1, c, 3) + 2 * conv(4 * c, c, 1) + dense + dilconv + 2 * dense + conv(4, 1, 5)
                + 3 + residual + conv(c, c // 2, 3) + conv(c // 2, 1, 3))
    assert _count(net) == expected == 241_929
    # the same net frozen from the full default space has the same structure and size
    full = FusionSpace(channels=32, steps=2).freeze(GENOTYPES["paif"].to_sample())
    assert _count(full) == expected


def test_frozen_net_output_range_and_batch_independence() -> None:
    net = build_fusion_net(GENOTYPES["paif"]).eval()
    ir, y = _inputs(2, (17, 22))
    with torch.no_grad():
        both = net(ir, y)
        alone = torch.cat([net(ir[i:i + 1], y[i:i + 1]) for i in range(2)])
    assert ((both >= 0) & (both <= 1)).all()
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-5)
