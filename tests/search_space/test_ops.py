"""Every registered op keeps (B, C, H, W) for odd and even sizes, is finite, and passes gradients to its input."""
from __future__ import annotations

import pytest
import torch

from search_space.ops import DEFAULT_CANDIDATES, OPS, WindowSelfAttention, check_candidates, get_padding

C = 8


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("size", [(17, 22), (16, 20)])
def test_op_keeps_shape_finite_and_grad(name: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    op = OPS[name](C).train()
    x = torch.randn(2, C, *size, requires_grad=True)
    y = op(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_default_candidates_registered() -> None:
    assert 8 <= len(DEFAULT_CANDIDATES) <= 12
    assert check_candidates(DEFAULT_CANDIDATES) == DEFAULT_CANDIDATES
    with pytest.raises(ValueError, match="unknown op"):
        check_candidates(("dense_k3_d1", "conv_k9"))


def test_get_padding() -> None:
    assert [get_padding(k, d) for k, d in [(1, 1), (3, 1), (3, 2), (5, 2), (7, 1)]] == [0, 1, 2, 4, 3]
    with pytest.raises(ValueError, match="odd kernel"):
        get_padding(4)


def test_window_attention_ignores_padding() -> None:
    """Padded keys are masked: an image that fills whole windows gives the same values on its real pixels
    whether it is processed alone (padded) or tiled so that no padding is needed."""
    torch.manual_seed(0)
    op = WindowSelfAttention(C, window=8, heads=2).eval()
    x = torch.randn(1, C, 16, 16)
    # a 13x16 crop: rows 8..12 form a partial window that gets padded; rows 0..7 are full windows
    crop = x[..., :13, :]
    # GroupNorm statistics differ between crop and full, so compare against a manual reference on the crop
    ref_in = op.qkv(op.norm(crop))
    q, k, v = ref_in.chunk(3, 1)
    out = torch.zeros_like(crop)
    for r0 in (0, 8):
        for c0 in (0, 8):
            rs, cs = slice(r0, min(r0 + 8, 13)), slice(c0, c0 + 8)
            for h in range(2):
                ch = slice(h * C // 2, (h + 1) * C // 2)
                qw = q[0, ch, rs, cs].flatten(1).T
                kw = k[0, ch, rs, cs].flatten(1).T
                vw = v[0, ch, rs, cs].flatten(1).T
                att = torch.softmax(qw @ kw.T / (C // 2) ** 0.5, -1) @ vw
                out[0, ch, rs, cs] = att.T.reshape(C // 2, rs.stop - rs.start, 8)
    expected = crop + op.proj(out)
    torch.testing.assert_close(op(crop), expected, atol=1e-5, rtol=1e-5)


def test_candidates_yaml_matches_defaults() -> None:
    from pathlib import Path

    import yaml

    from search_space.cells import DEFAULT_RULES

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "candidates.yaml").read_text())
    assert tuple(data["candidates"]) == DEFAULT_CANDIDATES
    assert tuple(data["rules"]) == DEFAULT_RULES
