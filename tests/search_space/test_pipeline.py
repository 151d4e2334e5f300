"""FusionSegModel: shapes, per-image normalisation, batch independence; segmenter configs."""
from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from rgbt.color import rgb_to_ycbcr
from search_space.genotype import Genotype
from search_space.pipeline import FusionSegModel, build_model, normalize_per_image, segment
from search_space.segmenter import MIT_VARIANTS, build_segmenter, segformer_config

TINY = Genotype(ir=("eca_k3",), vis=("dense_k3_d1",), fused=("spatial_k7",), rule="spatial_attention", channels=8)


def test_normalize_per_image_is_per_image() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 3, 8, 10) * torch.tensor([1.0, 5.0, 0.1])[:, None, None, None]
    out = normalize_per_image(x)
    for i in range(3):
        torch.testing.assert_close(out[i:i + 1], normalize_per_image(x[i:i + 1]))
        assert abs(out[i].mean().item()) < 1e-5 and abs(out[i].std(unbiased=False).item() - 1) < 1e-3


def test_segformer_configs() -> None:
    b0 = segformer_config("b0")
    assert list(b0.hidden_sizes) == [32, 64, 160, 256] and list(b0.depths) == [2, 2, 2, 2]
    assert b0.decoder_hidden_size == 256 and b0.num_labels == 9
    assert list(segformer_config("b5").depths) == [3, 6, 40, 3]
    assert set(MIT_VARIANTS) == {f"b{i}" for i in range(6)}
    with pytest.raises(ValueError, match="variant"):
        segformer_config("b9")
    with pytest.raises(FileNotFoundError, match="pretrained"):
        build_segmenter("b0", pretrained="no-such-dir/never-downloaded")


@pytest.fixture(scope="module")
def model() -> FusionSegModel:
    torch.manual_seed(0)
    return build_model(TINY, segmenter="b0").eval()


def test_outputs_and_batch_independence(model: FusionSegModel) -> None:
    torch.manual_seed(1)
    ir, vis = torch.rand(2, 1, 32, 40), torch.rand(2, 3, 32, 40)
    with torch.no_grad():
        out = model(ir, vis)
        alone = [model(ir[i:i + 1], vis[i:i + 1]) for i in range(2)]
    assert out.fused_y.shape == (2, 1, 32, 40) and out.fused_rgb.shape == (2, 3, 32, 40)
    assert out.logits.shape == (2, 9, 32, 40)
    assert ((out.fused_rgb >= 0) & (out.fused_rgb <= 1)).all()
    for field in ("fused_y", "fused_rgb", "logits"):
        both = getattr(out, field)
        torch.testing.assert_close(both, torch.cat([getattr(a, field) for a in alone]), atol=1e-4, rtol=1e-4)
    # fused RGB keeps the visible chroma where it stays in gamut
    ycc = rgb_to_ycbcr(out.fused_rgb)
    inside = ((out.fused_rgb > 1e-3) & (out.fused_rgb < 1 - 1e-3)).all(1, keepdim=True)
    torch.testing.assert_close(ycc[:, :1][inside], out.fused_y[inside], atol=1e-5, rtol=0)


def test_odd_size_and_gradient(model: FusionSegModel) -> None:
    ir = torch.rand(1, 1, 17, 22, requires_grad=True)
    vis = torch.rand(1, 3, 17, 22, requires_grad=True)
    out = model(ir, vis)
    assert out.logits.shape == (1, 9, 17, 22)
    out.logits.logsumexp(1).mean().backward()
    assert ir.grad.abs().sum() > 0 and vis.grad.abs().sum() > 0


def _published_norm_reference(rgb: torch.Tensor) -> torch.Tensor:
    """Independent transcription of the published forward: where-clamp, batch min-max, x255, per-channel loop."""
    x = torch.where(rgb > 1, torch.ones_like(rgb), rgb)
    x = torch.where(x < 0, torch.zeros_like(x), x)
    x = (x - torch.min(x)) / (torch.max(x) - torch.min(x)) * 255
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    out = x.clone()
    for c in range(3):
        out[:, c] = (x[:, c] - mean[c]) / std[c]
    return out


def test_normalize_published_matches_reference_and_couples_images() -> None:
    from search_space.pipeline import normalize_published

    torch.manual_seed(3)
    x = torch.stack([torch.rand(3, 8, 10) * 0.5, torch.rand(3, 8, 10) * 1.4 - 0.2])
    torch.testing.assert_close(normalize_published(x), _published_norm_reference(x))
    # whole-batch statistics: image 0 alone normalises differently than inside the batch
    assert not torch.allclose(normalize_published(x[:1]), normalize_published(x)[:1])
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        normalize_published(torch.rand(2, 1, 4, 4))


def test_build_model_options(model: FusionSegModel) -> None:
    from search_space.pipeline import MODEL_OPTIONS

    assert model.build_options == MODEL_OPTIONS
    torch.manual_seed(0)
    pub = build_model(TINY, segmenter="b0", seg_norm="published", color="published", mit_norm_eps=1e-6).eval()
    assert pub.build_options == {"seg_norm": "published", "color": "published", "fusion_output": "unit",
                                 "mit_norm_eps": 1e-6, "inputs": "both", "seg_scale": 1}
    eps = {n: m.eps for n, m in pub.segmenter.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert sorted(set(eps.values())) == [1e-6, 1e-5]
    assert all(v == 1e-5 for n, v in eps.items() if "patch_embeddings" in n or ".attention." in n)
    pub.load_state_dict(model.state_dict())
    ir, vis = torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(ir, vis), pub(ir, vis)
    assert not torch.allclose(a.logits, b.logits)
    with pytest.raises(ValueError, match="expected seg_norm"):
        build_model(TINY, segmenter="b0", seg_norm="batch")
    with pytest.raises(ValueError, match="expected color"):
        build_model(TINY, segmenter="b0", color="bt709")


@pytest.mark.parametrize("inputs,dropped", [("ir", "vis"), ("vis", "ir")])
def test_single_modality_model_ignores_the_dropped_input(inputs: str, dropped: str, tmp_path) -> None:
    """A single-modality baseline zeroes the other modality inside the model: its output does not move when
    that input changes (so no attack on it can matter), and the option survives a checkpoint round trip."""
    from trainer.checkpoint import load_model, save_checkpoint

    torch.manual_seed(0)
    m = build_model(TINY, segmenter="b0", inputs=inputs).eval()
    ir, vis = torch.rand(1, 1, 32, 32), torch.rand(1, 3, 32, 32)
    zero = {"ir": torch.zeros_like(ir), "vis": torch.zeros_like(vis)}
    with torch.no_grad():
        base = m(ir, vis).logits
        moved = m(*((zero["ir"], vis) if dropped == "ir" else (ir, zero["vis"]))).logits
        kept = m(*((ir, zero["vis"]) if dropped == "ir" else (zero["ir"], vis))).logits
        both = build_model(TINY, segmenter="b0").eval()
        both.load_state_dict(m.state_dict())
        ref = both(*((zero["ir"], vis) if dropped == "ir" else (ir, zero["vis"]))).logits
    torch.testing.assert_close(base, moved)
    torch.testing.assert_close(base, ref)  # = the two-modality net fed a zero image
    assert not torch.allclose(base, kept)
    path = save_checkpoint(tmp_path / "m.pt", m, TINY, {"variant": "b0", "num_classes": 9}, {})
    loaded, meta = load_model(path)
    assert meta["model"]["inputs"] == inputs and loaded.inputs == inputs
    with pytest.raises(ValueError, match="expected inputs in"):
        build_model(TINY, segmenter="b0", inputs="thermal")


# ------------------------------------------------------------------------------------------ seg_scale
def _plain_forward_reference(segmenter: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The segmenter call FusionSegModel.forward made before seg_scale existed, written out: replicate-pad to a
    multiple of 32, segment, upsample the logits (bilinear) to the padded size, crop."""
    height, width = x.shape[-2:]
    ph, pw = (-height) % 32, (-width) % 32
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    logits = segmenter(x)
    if logits.shape[-2:] != x.shape[-2:]:
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return logits[..., :height, :width]


@pytest.mark.parametrize("size", [(32, 40), (17, 22), (32, 64)])
def test_seg_scale_1_is_the_plain_forward_bit_for_bit(model: FusionSegModel, size) -> None:
    torch.manual_seed(2)
    ir, vis = torch.rand(2, 1, *size), torch.rand(2, 3, *size)
    with torch.no_grad():
        out = model(ir, vis)
        ref = _plain_forward_reference(model.segmenter, normalize_per_image(out.fused_rgb))
        direct = segment(model.segmenter, normalize_per_image(out.fused_rgb))
    assert model.seg_scale == 1
    assert torch.equal(out.logits, ref) and torch.equal(direct, ref)


class _Identity(torch.nn.Module):
    """A 'segmenter' whose logits are its input at full resolution; records the shapes it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return x


def _blur_reference(x: torch.Tensor, side: float) -> torch.Tensor:
    """Separable [side, 1 - 2·side, side] filter with replicated borders, along H then W."""
    for dim in (2, 3):
        pad = (0, 0, 1, 1) if dim == 2 else (1, 1, 0, 0)
        p = F.pad(x, pad, mode="replicate")
        n = x.shape[dim]
        x = side * p.narrow(dim, 0, n) + (1 - 2 * side) * p.narrow(dim, 1, n) + side * p.narrow(dim, 2, n)
    return x


@pytest.mark.parametrize("scale,side,seen", [(2, 1 / 8, (64, 96)), (4, 1 / 16, (128, 160))])
def test_seg_scale_upsamples_the_segmenter_input_and_returns_logits_at_the_input_size(scale, side, seen) -> None:
    """Upsampling by s then downsampling the logits by s (bilinear, half-pixel centres) is, for a full-resolution
    identity 'segmenter', the 3-tap filter [1/8, 3/4, 1/8] (s = 2) or [1/16, 7/8, 1/16] (s = 4) per axis, worked out
    by hand from the sample positions; the padding to a multiple of 32 (80 -> 96 columns at s = 2) is cropped away."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, 32, 40, dtype=torch.float64)
    ident = _Identity()
    out = segment(ident, x, scale)
    assert ident.shapes == [(2, 3, *seen)]
    assert out.shape == x.shape
    torch.testing.assert_close(out, _blur_reference(x, side), atol=1e-12, rtol=0)
    assert not torch.allclose(out, x)


def test_seg_scale_2_in_the_model(model: FusionSegModel) -> None:
    """The real SegFormer at seg_scale=2: it receives the image upsampled and padded (32x40 -> 64x80 -> 64x96), the
    logits come back at the input's size, gradients reach both inputs, and the weights are the scale-1 model's."""
    torch.manual_seed(0)
    m2 = build_model(TINY, segmenter="b0", seg_scale=2).eval()
    m2.load_state_dict(model.state_dict())
    assert m2.seg_scale == 2 and m2.build_options["seg_scale"] == 2
    seen: list[tuple[int, ...]] = []
    hook = m2.segmenter.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    ir = torch.rand(1, 1, 32, 40, requires_grad=True)
    vis = torch.rand(1, 3, 32, 40, requires_grad=True)
    try:
        out = m2(ir, vis)
    finally:
        hook.remove()
    assert seen == [(1, 3, 64, 96)] and out.logits.shape == (1, 9, 32, 40)
    out.logits.logsumexp(1).mean().backward()
    assert ir.grad.abs().sum() > 0 and vis.grad.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(out.logits, model(ir, vis).logits)  # the segmenter saw another image


@pytest.mark.parametrize("bad", [3, 0, 2.0, "2", True, None])
def test_bad_seg_scale_is_refused(bad) -> None:
    with pytest.raises(ValueError, match=r"build_model: seg_scale: expected one of 1, 2, 4 .*got "):
        build_model(TINY, segmenter="b0", seg_scale=bad)
    with pytest.raises(ValueError, match=r"FusionSegModel: seg_scale: expected one of 1, 2, 4"):
        FusionSegModel(torch.nn.Identity(), _Identity(), seg_scale=bad)
    with pytest.raises(ValueError, match=r"seg_scale: expected one of 1, 2, 4"):
        segment(_Identity(), torch.zeros(1, 3, 8, 8), bad)
