"""FusionSpace as an NNI model space: labels, DARTS supernet forward/backward, freezing with the paif genotype."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nni.nas.nn.pytorch import LayerChoice
from nni.nas.oneshot.pytorch.supermodule.differentiable import DifferentiableMixedLayer
from nni.nas.strategy import DARTS

from search_space.cells import DEFAULT_RULES
from search_space.decompose import box_filter_reference
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


REFERENCE_TSV = Path(__file__).resolve().parents[3] / "shared" / "reference" / "paif_published_state_dict.tsv"
PUBLISHED_PARAMS = 259_872
"""Parameters of the published ``Network_Fusion_Searched`` at C=32 (``enhance_net.*`` less BatchNorm buffers)."""
PUBLISHED_DEAD = {"enhance_net.decompation.relu.weight": 1}
"""Published parameters its forward never calls: ``Cell_Decom.relu`` is built but not used."""


def test_paif_frozen_net_parameter_count() -> None:
    """Counted by hand from the published blocks; 259,872 − the one dead PReLU = 259,871."""
    net = build_fusion_net(GENOTYPES["paif"])
    assert not any(isinstance(m, LayerChoice) for m in net.modules())
    c = 32
    conv = lambda cin, cout, k: cin * cout * k * k  # noqa: E731  (no biases in the published blocks)
    prelu = 1
    stem = conv(1, c, 3) + prelu
    decomp = conv(4 * c, c, 1) + c
    dense = conv(c, c, 3) + conv(2 * c, c, 3) + conv(3 * c, c, 3) + prelu
    dilconv = 9 * c + c * c + 2 * c
    eca = conv(c, c, 3) + conv(c, c, 3) + 3 + prelu
    residual = conv(c, c, 7) + conv(c, c, 3) + conv(c, c, 1) + 2 * c + prelu
    head = conv(c, c // 2, 3) + conv(c // 2, 1, 3) + prelu
    expected = 2 * stem + 2 * decomp + dense + dilconv + 2 * dense + conv(4, 1, 5) + eca + residual + head
    assert (dense, dilconv, eca, residual) == (55_297, 1_376, 18_436, 60_481)
    assert _count(net) == expected == PUBLISHED_PARAMS - sum(PUBLISHED_DEAD.values()) == 259_871
    # the same net frozen from the full default space has the same structure and size
    full = FusionSpace(channels=32, steps=2).freeze(GENOTYPES["paif"].to_sample())
    assert _count(full) == expected


@pytest.mark.skipif(not REFERENCE_TSV.is_file(), reason="../shared/reference/ is not beside this checkout")
def test_paif_parameters_match_the_published_layout() -> None:
    """Every published fusion parameter tensor has a counterpart of the same size in ours (multiset of
    shapes), the published total is 259,872, and the only extra published tensor is the dead PReLU."""
    published: dict[str, tuple[int, ...]] = {}
    for line in REFERENCE_TSV.read_text().splitlines():
        if line.startswith("## mit_b3"):
            break
        parts = line.split("\t")
        if len(parts) == 3 and parts[0].startswith("enhance_net.") and parts[2] == "float32" \
                and not parts[0].endswith(("running_mean", "running_var")):
            published[parts[0]] = tuple(json.loads(parts[1]))
    assert sum(math.prod(s) for s in published.values()) == PUBLISHED_PARAMS
    live = sorted(s for k, s in published.items() if k not in PUBLISHED_DEAD)
    ours = sorted(tuple(p.shape) for p in build_fusion_net(GENOTYPES["paif"]).parameters())
    assert ours == live


def _reference_paif_forward(sd: dict[str, torch.Tensor], ir: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The published fusion forward written out with functional ops from the paper code's description
    (eval-mode BatchNorm), over our state dict: an independent check of the module wiring."""
    def conv(x, key, d=1, groups=1, bias=None):
        w = sd[key]
        return F.conv2d(x, w, bias, padding=(w.shape[-1] - 1) // 2 * d, dilation=d, groups=groups)

    def prelu(x, key):
        return F.prelu(x, sd[key])

    def bn(x, p):
        return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"])

    def dense(x, p):
        x1 = prelu(conv(x, p + ".conv1.weight"), p + ".act.weight")
        x2 = prelu(conv(torch.cat([x, x1], 1), p + ".conv2.weight"), p + ".act.weight")
        x3 = prelu(conv(torch.cat([x, x1, x2], 1), p + ".conv3.weight"), p + ".act.weight")
        return x3 * (1 / 3) + x

    def dilconv(x, p):
        h = conv(F.relu(x), p + ".body.1.weight", d=2, groups=x.shape[1])
        return bn(conv(h, p + ".body.2.weight"), p + ".body.3") + x

    def eca(x, p):
        f = conv(x, p + ".conv1.weight")
        h = conv(prelu(f, p + ".act.weight"), p + ".conv2.weight")
        g = torch.sigmoid(F.conv1d(h.mean((2, 3))[:, None], sd[p + ".eca.weight"], padding=1))[:, 0]
        return prelu(h * g[..., None, None] + f, p + ".act.weight")

    def residual(x, p):
        h = conv(conv(conv(x, p + ".body.0.weight"), p + ".body.1.weight", d=2), p + ".body.2.weight")
        return x + prelu(bn(h, p + ".body.3"), p + ".body.4.weight")

    def guided(x, eps):  # He et al.'s guided filter, windows clipped at the borders
        box = lambda t: box_filter_reference(t, 4)  # noqa: E731
        g = x.amax(1, keepdim=True) - x.amin(1, keepdim=True)
        mg, mx = box(g), box(x)
        a = (box(g * x) - mg * mx) / (box(g * g) - mg * mg + eps)
        return box(a) * g + box(mx - a * mg)

    def branch(img, stem, dec, ops):
        s = prelu(conv(img, stem + ".conv.weight"), stem + ".act.weight")
        lows = [guided(s, e) for e in (1e-3, 1e-4)]
        d = conv(torch.cat([*lows, *(s - lo for lo in lows)], 1), dec + ".reduce.weight", bias=sd[dec + ".reduce.bias"])
        h = d
        for fn, p in ops:
            h = fn(h, p)
        return s + (d + h)

    f_ir = branch(ir, "stem_ir", "decomp_ir", [(dense, "cell_ir.ops.0"), (dilconv, "cell_ir.ops.1")])
    f_vis = branch(y, "stem_vis", "decomp_vis", [(dense, "cell_vis.ops.0"), (dense, "cell_vis.ops.1")])
    stats = torch.cat([f_ir.amax(1, keepdim=True), f_ir.mean(1, keepdim=True),
                       f_vis.amax(1, keepdim=True), f_vis.mean(1, keepdim=True)], 1)
    s = torch.sigmoid(conv(stats, "rule.conv.weight"))
    agg = s * f_ir + (1 - s) * f_vis
    feat = agg + residual(eca(agg, "cell_fused.ops.0"), "cell_fused.ops.1")
    out = prelu(conv(conv(feat, "head.conv1.weight"), "head.conv2.weight"), "head.act.weight")
    return torch.tanh(out)


@pytest.mark.parametrize("output", ["unit", "tanh"])
def test_paif_net_equals_functional_reference(output: str) -> None:
    torch.manual_seed(0)
    net = build_fusion_net(GENOTYPES["paif"], output=output).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics and PReLU slopes
        for name, t in net.state_dict().items():
            if name.endswith(("running_mean", "act.weight", "body.4.weight", "body.3.bias")):
                t.uniform_(-0.2, 0.3)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
    ir, y = _inputs(1, (13, 15))
    with torch.no_grad():
        t = _reference_paif_forward({k: v.double() for k, v in net.state_dict().items()}, ir.double(), y.double())
        out = net.double()(ir.double(), y.double())
    expected = 0.5 * (t + 1) if output == "unit" else t
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_head_output_convention_is_checked() -> None:
    with pytest.raises(ValueError, match="expected output in"):
        FusionSpace(channels=8, steps=1, candidates=("eca_k3",), output="sigmoid")


def test_frozen_net_output_range_and_batch_independence() -> None:
    net = build_fusion_net(GENOTYPES["paif"]).eval()
    ir, y = _inputs(2, (17, 22))
    with torch.no_grad():
        both = net(ir, y)
        alone = torch.cat([net(ir[i:i + 1], y[i:i + 1]) for i in range(2)])
    assert ((both >= 0) & (both <= 1)).all()
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-5)
