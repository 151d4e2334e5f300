"""FusionSegModel: shapes, per-image normalisation, batch independence; segmenter configs."""
from __future__ import annotations

import pytest
import torch

from rgbt.color import rgb_to_ycbcr
from search_space.genotype import Genotype
from search_space.pipeline import FusionSegModel, build_model, normalize_per_image
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
                                 "mit_norm_eps": 1e-6, "inputs": "both"}
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
