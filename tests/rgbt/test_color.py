"""rgbt.color: reference values computed by hand, a matrix reference, round trip, gradcheck, shape errors."""
from __future__ import annotations

import pytest
import torch

from rgbt.color import rgb_to_y, rgb_to_ycbcr, ycbcr_to_rgb

# BT.601 full range (JPEG) by hand: Y = .299R + .587G + .114B; Cb = (B - Y)/1.772 + .5; Cr = (R - Y)/1.402 + .5
REFERENCE = [
    ((1.0, 0.0, 0.0), (0.299, 0.5 - 0.299 / 1.772, 1.0)),        # red   -> Cb 0.331264
    ((0.0, 1.0, 0.0), (0.587, 0.5 - 0.587 / 1.772, 0.5 - 0.587 / 1.402)),
    ((0.0, 0.0, 1.0), (0.114, 1.0, 0.5 - 0.114 / 1.402)),        # blue  -> Cr 0.418688
    ((1.0, 1.0, 1.0), (1.0, 0.5, 0.5)),
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ((0.0, 0.0, 0.0), (0.0, 0.5, 0.5)),
]


@pytest.mark.parametrize("rgb, ycbcr", REFERENCE)
def test_reference_values(rgb, ycbcr):
    x = torch.tensor(rgb, dtype=torch.float64).view(3, 1, 1)
    out = rgb_to_ycbcr(x).flatten()
    torch.testing.assert_close(out, torch.tensor(ycbcr, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(rgb_to_y(x).flatten(), out[:1])
    torch.testing.assert_close(ycbcr_to_rgb(out.view(3, 1, 1)).flatten(), x.flatten(), atol=1e-12, rtol=0)


def test_red_reference_numbers():
    out = rgb_to_ycbcr(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).view(3, 1, 1)).flatten()
    assert out.tolist() == pytest.approx([0.299, 0.3313, 1.0], abs=1e-4)


def test_matches_jpeg_matrix():
    """Against the published JPEG (JFIF) matrix, applied with einsum: an independent formulation."""
    m = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                     dtype=torch.float64)
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.einsum("ij,bjhw->bihw", m, x) + torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(rgb_to_ycbcr(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 5), (2, 2, 3, 3, 3)])
def test_round_trip_and_shapes(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    ycc = rgb_to_ycbcr(x)
    assert ycc.shape == x.shape and rgb_to_y(x).shape == shape[:-3] + (1,) + shape[-2:]
    assert ycc.min() >= 0 and ycc.max() <= 1
    torch.testing.assert_close(ycbcr_to_rgb(ycc), x, atol=1e-6, rtol=0)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(rgb_to_ycbcr, (x,))
    assert torch.autograd.gradcheck(ycbcr_to_rgb, (x,))
    assert torch.autograd.gradcheck(rgb_to_y, (x,))


def test_no_clamp_out_of_range_gradients_flow():
    x = torch.full((3, 1, 1), 1.5, dtype=torch.float64, requires_grad=True)
    rgb_to_y(x).sum().backward()
    torch.testing.assert_close(x.grad.flatten(), torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64))
    out = ycbcr_to_rgb(torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64).view(3, 1, 1))
    assert out.max() > 1.0  # out of gamut is returned as is


def test_shape_and_type_errors():
    with pytest.raises(ValueError, match=r"expected shape \(\*, 3, H, W\), got \(2, 4, 4\)"):
        rgb_to_ycbcr(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"ycbcr_to_rgb: expected shape"):
        ycbcr_to_rgb(torch.zeros(4, 4))
    with pytest.raises(TypeError, match=r"rgb_to_y: expected a torch.Tensor, got list"):
        rgb_to_y([[0.0]])


def test_published_standard_matches_published_matrices() -> None:
    """``standard="published"``: the PAIF code's RGB2YCrCb / YCrCb2RGB numbers, as matrices (channels Y, Cr, Cb
    there, Y, Cb, Cr here); they differ from exact BT.601 by < 2e-3 and are not exact inverses."""
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    expected = torch.stack((y, (b - y) * 0.564 + 0.5, (r - y) * 0.713 + 0.5), 1)
    ycc = rgb_to_ycbcr(x, standard="published")
    torch.testing.assert_close(ycc, expected, atol=1e-12, rtol=0)
    # published inverse: [Y, Cr - .5, Cb - .5] @ [[1, 1, 1], [1.403, -0.714, 0], [0, -0.344, 1.773]]
    mat = torch.tensor([[1.0, 1.0, 1.0], [1.403, -0.714, 0.0], [0.0, -0.344, 1.773]], dtype=torch.float64)
    ycrcb = torch.stack((ycc[:, 0], ycc[:, 2] - 0.5, ycc[:, 1] - 0.5), -1)
    torch.testing.assert_close(ycbcr_to_rgb(ycc, standard="published"), (ycrcb @ mat).permute(0, 3, 1, 2),
                               atol=1e-12, rtol=0)
    diff = (ycc - rgb_to_ycbcr(x)).abs().max().item()
    assert 0 < diff < 2e-3
    assert 0 < (ycbcr_to_rgb(ycc, standard="published") - x).abs().max().item() < 3e-3
    with pytest.raises(ValueError, match="expected standard"):
        rgb_to_ycbcr(x, standard="bt709")
