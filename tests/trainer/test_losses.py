"""Tests of trainer.losses: SSIM, Sobel magnitude, the reference-free fusion loss and the task loss."""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from rgbt.color import rgb_to_y
from trainer.losses import FUSION_WEIGHTS, TaskLoss, fusion_loss, sobel_magnitude, ssim

B, H, W, K = 3, 32, 40, 9


class Out(NamedTuple):
    fused_y: torch.Tensor
    logits: torch.Tensor


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    ir = torch.rand(B, 1, H, W, generator=g)
    vis = torch.rand(B, 3, H, W, generator=g)
    fused = torch.rand(B, 1, H, W, generator=g)
    logits = torch.randn(B, K, H, W, generator=g)
    label = torch.randint(0, K, (B, H, W), generator=g)
    label[0, :5] = 255
    label[2, :, :20] = 255
    return ir, vis, fused, logits, label


def test_ssim_identity_kornia_reference_and_shapes(batch):
    import kornia

    ir, vis, fused, *_ = batch
    assert torch.allclose(ssim(ir, ir, reduction="none"), torch.ones(B))
    ref = kornia.metrics.ssim(fused.double(), ir.double(), 11, eps=0.0, padding="valid").flatten(1).mean(1)
    assert torch.allclose(ssim(fused.double(), ir.double(), reduction="none"), ref, atol=1e-10)
    assert ssim(fused, ir, reduction="map").shape == (B, 1, H - 10, W - 10)
    assert ssim(fused, ir).shape == ()
    with pytest.raises(ValueError, match="expected"):
        ssim(fused[..., :8, :8], ir[..., :8, :8])


def test_sobel_magnitude_on_ramp_and_flat():
    j = torch.arange(W, dtype=torch.float64).expand(1, 1, H, W)
    mag = sobel_magnitude(2.0 * j)
    # interior: gx = (1 + 2 + 1) * (f(x+1) - f(x-1)) = 4 * 4 = 16, gy = 0; border: 4 * 2 = 8
    assert torch.allclose(mag[..., 1:-1], torch.full_like(mag[..., 1:-1], 16.0))
    assert torch.allclose(mag[..., 0], torch.full_like(mag[..., 0], 8.0))  # replicate padding: one-sided
    assert torch.count_nonzero(sobel_magnitude(torch.full((1, 1, H, W), 0.3))) == 0


def test_fusion_loss_is_zero_when_sources_and_fused_agree(batch):
    ir = batch[0]
    loss, parts = fusion_loss(ir, ir.clone(), ir.clone())
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert all(float(v) == pytest.approx(0.0, abs=1e-6) for v in parts.values())
    # and the max-fusion of two different sources zeroes the intensity term
    vy = rgb_to_y(batch[1])
    _, parts = fusion_loss(ir, vy, torch.maximum(ir, vy))
    assert float(parts["intensity"]) == 0.0 and float(parts["gradient"]) > 0.0


def test_fusion_loss_weights_gradients_and_per_image(batch):
    ir, vis, fused, *_ = batch
    vy = rgb_to_y(vis)
    fused = fused.clone().requires_grad_(True)
    loss, parts = fusion_loss(ir, vy, fused)
    expected = sum(FUSION_WEIGHTS[k] * parts[k] for k in parts)
    assert torch.allclose(loss, expected)
    (grad,) = torch.autograd.grad(loss, fused)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    per, per_parts = fusion_loss(ir, vy, fused, per_image=True)
    assert per.shape == (B,) and all(v.shape == (B,) for v in per_parts.values())
    for i in range(B):
        alone, _ = fusion_loss(ir[i:i + 1], vy[i:i + 1], fused[i:i + 1])
        assert torch.allclose(per[i], alone, atol=1e-6)
    assert torch.allclose(per.mean(), loss, atol=1e-6)
    only_int, _ = fusion_loss(ir, vy, fused, weights={"gradient": 0.0, "ssim": 0.0})
    assert torch.allclose(only_int, parts["intensity"])
    with pytest.raises(ValueError, match="expected weight keys"):
        fusion_loss(ir, vy, fused, weights={"perceptual": 1.0})


def test_task_loss_without_label_is_weighted_fusion(batch):
    ir, vis, fused, logits, _ = batch
    crit = TaskLoss(lambda_fusion=0.1, lambda_seg=4.0)
    loss, parts = crit(Out(fused, logits), ir, vis)
    fusion, _ = fusion_loss(ir, rgb_to_y(vis), fused)
    assert torch.allclose(loss, 0.1 * fusion) and torch.allclose(parts["fusion"], fusion)
    assert float(parts["seg"]) == 0.0


def test_task_loss_segmentation_term_matches_cross_entropy(batch):
    ir, vis, fused, logits, label = batch
    crit = TaskLoss(lambda_fusion=0.1, lambda_seg=4.0, ignore_index=255)
    loss, parts = crit(Out(fused, logits), ir, vis, label)
    ce = F.cross_entropy(logits, label, ignore_index=255)
    assert torch.allclose(parts["seg"], ce, atol=1e-6)
    assert torch.allclose(loss, 0.1 * parts["fusion"] + 4.0 * ce, atol=1e-6)
    # by hand: -log softmax at the label, averaged over non-ignored pixels
    logp = logits.log_softmax(1)
    keep = label != 255
    by_hand = -logp.permute(0, 2, 3, 1)[keep].gather(1, label[keep][:, None]).mean()
    assert torch.allclose(parts["seg"], by_hand, atol=1e-6)


def test_task_loss_per_image_equals_each_image_alone(batch):
    ir, vis, fused, logits, label = batch
    label = label.clone()
    label[1] = 255  # an image without any valid pixel contributes 0 CE
    crit = TaskLoss()
    per, parts = crit(Out(fused, logits), ir, vis, label, per_image=True)
    assert per.shape == (B,) and parts["seg"].shape == (B,) and float(parts["seg"][1]) == 0.0
    for i in range(B):
        s = slice(i, i + 1)
        alone, _ = crit(Out(fused[s], logits[s]), ir[s], vis[s], label[s])
        assert torch.allclose(per[i], alone, atol=1e-6)
    logits = logits.clone().requires_grad_(True)
    loss, _ = crit(Out(fused, logits), ir, vis, label)
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(g).all() and g[1].abs().sum() == 0


def test_ssim_under_bf16_autocast_matches_float32(batch):
    ir, _, fused, *_ = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ssim(fused.bfloat16(), ir.bfloat16())
    assert low.dtype == torch.float32
    assert float(low) == pytest.approx(float(ssim(fused.bfloat16().float(), ir.bfloat16().float())), abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_losses_on_cuda(batch):
    ir, vis, fused, logits, label = (t.cuda() for t in batch)
    loss, parts = TaskLoss()(Out(fused, logits), ir, vis, label)
    assert loss.device.type == "cuda" and torch.isfinite(loss)
