"""Tests of trainer.metrics against hand-computed values and independent numpy references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer import metrics as M

H, W = 32, 40


def _img(arr255: np.ndarray) -> torch.Tensor:
    """0..255 integer array -> float (1, H, W) image in [0, 1]."""
    return torch.from_numpy(np.asarray(arr255, dtype=np.float64) / 255.0).float()[None]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ------------------------------------------------------------------ confusion matrix
def test_confusion_matrix_by_hand_with_absent_class_and_ignore():
    target = torch.tensor([[[0, 1, 255], [1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 3], [2, 2, 0]]])  # predictions on ignored pixels do not count
    cm = M.ConfusionMatrix(num_classes=4)
    cm.update(pred, target)
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(cm.matrix, expected)
    r = cm.compute(miou_convention="present")
    assert r["iou"][:3] == pytest.approx([1.0, 0.5, 0.5]) and math.isnan(r["iou"][3])
    assert r["miou"] == pytest.approx(2.0 / 3.0)            # class 3 absent everywhere: left out
    assert r["miou_objects"] == pytest.approx(0.5)           # classes 1..3 -> (0.5 + 0.5) / 2
    assert r["recall"][:3] == pytest.approx([1.0, 0.5, 1.0]) and math.isnan(r["recall"][3])
    assert r["macc"] == pytest.approx(2.5 / 3.0)
    assert r["pixel_acc"] == pytest.approx(0.75) and r["pixels"] == 4


def test_predicted_but_absent_class_counts_as_zero_iou():
    target = torch.tensor([[[0, 0], [1, 1]]])
    pred = torch.tensor([[[0, 2], [1, 1]]])
    cm = M.ConfusionMatrix(num_classes=3)
    cm.update(pred, target)
    r = cm.compute()
    assert r["iou"] == pytest.approx([0.5, 1.0, 0.0])
    assert r["miou"] == pytest.approx(0.5)
    assert math.isnan(r["recall"][2]) and r["macc"] == pytest.approx(0.75)


def test_confusion_matrix_matches_numpy_loop_logits_merge_reset(rng):
    k = 9
    target = torch.from_numpy(rng.integers(0, k, (3, 8, 10)))
    target[0, :2] = 255
    logits = torch.from_numpy(rng.normal(size=(3, k, 8, 10))).float()
    pred = logits.argmax(1)
    ref = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            ref[t, p] += 1
    cm = M.ConfusionMatrix()
    cm.update(logits, target)
    assert np.array_equal(cm.matrix.numpy(), ref)
    a, b = M.ConfusionMatrix(), M.ConfusionMatrix()
    a.update(pred[:1], target[:1])
    b.update(pred[1:], target[1:])
    assert torch.equal(a.merge(b).matrix, cm.matrix)
    iou = np.diag(ref) / (ref.sum(0) + ref.sum(1) - np.diag(ref))
    assert cm.compute(miou_convention="present")["miou"] == pytest.approx(np.nanmean(iou))
    assert cm.compute()["miou"] == pytest.approx(np.nan_to_num(iou).sum() / k)
    cm.reset()
    assert int(cm.matrix.sum()) == 0


def test_miou_conventions_on_a_subset_missing_classes():
    """A 9-class subset with classes 4..8 absent from truth and prediction: the conventions differ.

    Confusion (rows truth, cols prediction), 10 pixels: 0->0 x3, 1->1 x2, 1->2 x1, 2->2 x2, 3->0 x1, 3->3 x1.
    IoU_0 = 3/(3+1) = 0.75, IoU_1 = 2/(3) = 2/3, IoU_2 = 2/(2+1) = 2/3, IoU_3 = 1/(2) = 0.5, IoU_4..8 absent.
    published: (0.75 + 2/3 + 2/3 + 0.5 + 5·0) / 9 = 2.5833/9; objects (2/3 + 2/3 + 0.5) / 8 = 1.8333/8.
    present:   (0.75 + 2/3 + 2/3 + 0.5) / 4 = 2.5833/4;    objects (2/3 + 2/3 + 0.5) / 3.
    """
    target = torch.tensor([[[0, 0, 0, 1, 1, 1, 2, 2, 3, 3]]])
    pred = torch.tensor([[[0, 0, 0, 1, 1, 2, 2, 2, 0, 3]]])
    cm = M.ConfusionMatrix()
    cm.update(pred, target)
    total = 0.75 + 2 / 3 + 2 / 3 + 0.5
    objects = 2 / 3 + 2 / 3 + 0.5
    pub, pres = cm.compute(), cm.compute(miou_convention="present")
    assert pub["miou_convention"] == "published" and pres["miou_convention"] == "present"
    assert pub["miou"] == pytest.approx(total / 9) and pub["miou_objects"] == pytest.approx(objects / 8)
    assert pres["miou"] == pytest.approx(total / 4) and pres["miou_objects"] == pytest.approx(objects / 3)
    assert pub["miou_by_convention"] == pres["miou_by_convention"] == {
        "published": {"miou": pytest.approx(total / 9), "miou_objects": pytest.approx(objects / 8)},
        "present": {"miou": pytest.approx(total / 4), "miou_objects": pytest.approx(objects / 3)}}
    assert all(math.isnan(v) for v in pub["iou"][4:])  # per-class lists keep NaN for absent classes
    with pytest.raises(ValueError, match=r"miou_convention: expected one of \('published', 'present'\), got 'nan'"):
        cm.compute(miou_convention="nan")


def test_batched_miou_equals_compute_per_matrix_both_conventions():
    """batched_miou on a stack of random matrices (some classes absent from target and prediction, one matrix
    all zero) equals ConfusionMatrix.compute()["miou"] matrix by matrix; bad shapes and conventions are refused."""
    gen = torch.Generator().manual_seed(3)
    mats = torch.randint(0, 20, (2, 6, 5, 5), generator=gen)
    mats[0, :, 2, :] = 0  # class 2 absent from target and prediction
    mats[0, :, :, 2] = 0
    mats[1, 3, :, 1] = 0  # class 1 never predicted, still in target
    mats[1, 4] = 0  # nothing counted: NaN under "present", 0 under "published"
    for convention in M.MIOU_CONVENTIONS:
        got = M.batched_miou(mats, convention)
        assert got.shape == (2, 6) and got.dtype == torch.float64
        for idx in np.ndindex(2, 6):
            cm = M.ConfusionMatrix(5)
            cm.matrix = mats[idx]
            want = cm.compute(convention)["miou"]
            assert (math.isnan(want) and math.isnan(float(got[idx]))) or float(got[idx]) == pytest.approx(want, abs=1e-15)
    with pytest.raises(ValueError, match=r"expected matrices \(\.\.\., K, K\), got \(5, 4\)"):
        M.batched_miou(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="miou_convention: expected one of"):
        M.batched_miou(mats, "mean")


def test_confusion_matrix_rejects_bad_input():
    cm = M.ConfusionMatrix()
    with pytest.raises(ValueError, match="expected"):
        cm.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="target ids"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 9))


# ------------------------------------------------------------------ fusion metrics
def test_entropy_constant_two_level_and_uniform():
    assert M.entropy(torch.full((1, H, W), 0.5)) == pytest.approx(0.0, abs=1e-12)
    two = np.zeros((H, W)); two[:, W // 2:] = 255
    assert M.entropy(_img(two)) == pytest.approx(1.0)
    uniform = np.arange(256).reshape(16, 16)
    assert M.entropy(_img(uniform)) == pytest.approx(8.0)


def test_mutual_information_identity_and_independence(rng):
    x = _img(rng.integers(0, 256, (H, W)))
    assert M.mutual_information(x, x) == pytest.approx(M.entropy(x))
    assert M.mutual_information(x, torch.full_like(x, 0.2)) == pytest.approx(0.0, abs=1e-12)
    # two independent balanced bits on a 2x2 grid of blocks: MI 0; a copy of one bit: MI 1
    a = np.zeros((H, W)); a[:, W // 2:] = 255
    b = np.zeros((H, W)); b[H // 2:, :] = 255
    assert M.mutual_information(_img(a), _img(b)) == pytest.approx(0.0, abs=1e-12)
    assert M.mutual_information(_img(a), _img(255 - a)) == pytest.approx(1.0)


def test_std_matches_numpy(rng):
    arr = rng.integers(0, 256, (H, W))
    assert M.std(_img(arr)) == pytest.approx(np.std(arr))


@pytest.mark.parametrize("s,t", [(3, 0), (0, 5), (2, 4)])
def test_spatial_frequency_and_average_gradient_on_ramps(s, t):
    i, j = np.mgrid[0:H, 0:W]
    ramp = s * j + t * i  # max 2*39 + 4*31 = 202 < 255
    # forward differences are s horizontally and t vertically everywhere
    assert M.spatial_frequency(_img(ramp)) == pytest.approx(math.sqrt(s * s + t * t))
    assert M.avg_gradient(_img(ramp)) == pytest.approx(math.sqrt((s * s + t * t) / 2))


def test_spatial_frequency_checkerboard():
    i, j = np.mgrid[0:H, 0:W]
    board = 255 * ((i + j) % 2)
    # every forward difference is ±255: RF² = CF² = 255²
    assert M.spatial_frequency(_img(board)) == pytest.approx(255 * math.sqrt(2))
    assert M.avg_gradient(_img(board)) == pytest.approx(255.0)


def test_ssim_identity_and_kornia_reference(rng):
    import kornia

    x = _img(rng.integers(0, 256, (H, W)))
    y = _img(np.clip(rng.integers(0, 256, (H, W)) // 2 + 60, 0, 255))
    assert M.ssim(x, x) == pytest.approx(1.0)
    ref = kornia.metrics.ssim(x[None].double(), y[None].double(), 11, max_val=1.0, eps=0.0, padding="valid").mean()
    assert M.ssim(x, y) == pytest.approx(float(ref), abs=1e-5)  # float32 computation


def test_vif_identity_and_degradation(rng):
    x = _img(rng.integers(0, 256, (64, 64)))
    assert M.vif(x, x) == pytest.approx(1.0, abs=1e-6)
    noisy = (x + torch.from_numpy(rng.normal(0, 0.1, (1, 64, 64))).float()).clamp(0, 1)
    assert 0.0 < M.vif(x, noisy) < 0.9
    small = _img(rng.integers(0, 256, (H, W)))   # too small for the coarse scales: skipped, still 1
    assert M.vif(small, small) == pytest.approx(1.0, abs=1e-6)


def _qabf_const(g_rel: float, a_rel: float) -> float:
    qg = 0.9994 / (1 + math.exp(-15 * (g_rel - 0.5)))
    qa = 0.9879 / (1 + math.exp(-22 * (a_rel - 0.8)))
    return qg * qa


def test_qabf_copy_of_source_constant_and_symmetry(rng):
    a = _img(rng.integers(0, 256, (H, W)))
    b = _img(rng.integers(0, 256, (H, W)))
    flat = torch.full_like(a, 0.4)
    # F = A and B flat: every weighted pixel has equal strength and orientation
    assert M.qabf(a, a, flat) == pytest.approx(_qabf_const(1.0, 1.0), rel=1e-9)
    assert M.qabf(flat, a, b) < 1e-3
    assert M.qabf(a, a, b) > M.qabf(flat, a, b) + 0.3
    f = (a + b) / 2
    assert M.qabf(f, a, b) == pytest.approx(M.qabf(f, b, a))
    assert 0.0 <= M.qabf(f, a, b) <= 1.0


def _corr_np(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x.ravel(), y.ravel())[0, 1])


def test_scd_against_numpy(rng):
    a = rng.integers(0, 256, (H, W)).astype(np.float64)
    b = rng.integers(0, 256, (H, W)).astype(np.float64)
    f = np.round(0.6 * a + 0.4 * b)
    ref = _corr_np(f - b, a) + _corr_np(f - a, b)
    assert M.scd(_img(f), _img(a), _img(b)) == pytest.approx(ref)
    assert M.scd(_img(a), _img(a), _img(b)) == pytest.approx(_corr_np(a - b, a))  # F - IR == 0 -> corr 0


def test_fusion_metrics_keys_uint8_and_batch(rng):
    arrs = [rng.integers(0, 256, (2, H, W)) for _ in range(3)]
    fused, ir, vy = (torch.from_numpy(x / 255.0).float()[:, None] for x in arrs)
    one = M.fusion_metrics(fused[0], ir[0], vy[0])
    assert tuple(one) == M.FUSION_METRIC_NAMES and all(isinstance(v, float) for v in one.values())
    as_u8 = M.fusion_metrics(*(torch.from_numpy(x[0].astype(np.uint8)) for x in arrs))
    assert as_u8 == pytest.approx(one)
    assert one["MI"] == pytest.approx(M.mutual_information(fused[0], ir[0]) + M.mutual_information(fused[0], vy[0]))
    two = M.fusion_metrics(fused[1], ir[1], vy[1])
    batch = M.fusion_metrics_batch(fused, ir, vy)
    assert batch == pytest.approx({k: (one[k] + two[k]) / 2 for k in one})
    with pytest.raises(ValueError, match="expected"):
        M.fusion_metrics_batch(fused[:, 0], ir[:, 0], vy[:, 0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_on_cuda(rng):
    target = torch.from_numpy(rng.integers(0, 9, (2, 8, 10)))
    logits = torch.from_numpy(rng.normal(size=(2, 9, 8, 10))).float()
    cpu, gpu = M.ConfusionMatrix(), M.ConfusionMatrix()
    cpu.update(logits, target)
    gpu.update(logits.cuda(), target.cuda())
    assert gpu.matrix.device.type == "cuda" and torch.equal(gpu.matrix.cpu(), cpu.matrix)
    x = torch.from_numpy(rng.random((1, 1, H, W))).float()
    assert M.fusion_metrics_batch(x.cuda(), x.cuda(), x.cuda()) == pytest.approx(M.fusion_metrics_batch(x, x, x))


# ------------------------------------------------------------------ independent scipy transliterations
def _vifp_reference(ref: np.ndarray, dist: np.ndarray) -> float:
    """Line-by-line transliteration of Sheikh & Bovik's vifp_mscale.m with scipy (2-D windows, filter2 'valid')."""
    from scipy.signal import correlate2d

    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        x = np.arange(n) - (n - 1) / 2
        win = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * (n / 5) ** 2))
        win /= win.sum()
        if scale > 1:
            ref = correlate2d(ref, win, "valid")[::2, ::2]
            dist = correlate2d(dist, win, "valid")[::2, ::2]
        mu1, mu2 = correlate2d(ref, win, "valid"), correlate2d(dist, win, "valid")
        s1 = np.maximum(correlate2d(ref * ref, win, "valid") - mu1 ** 2, 0)
        s2 = np.maximum(correlate2d(dist * dist, win, "valid") - mu2 ** 2, 0)
        s12 = correlate2d(ref * dist, win, "valid") - mu1 * mu2
        g = s12 / (s1 + 1e-10)
        sv = s2 - g * s12
        g[s1 < 1e-10] = 0
        sv[s1 < 1e-10] = s2[s1 < 1e-10]
        s1[s1 < 1e-10] = 0
        g[s2 < 1e-10] = 0
        sv[s2 < 1e-10] = 0
        sv[g < 0] = s2[g < 0]
        g[g < 0] = 0
        sv[sv <= 1e-10] = 1e-10
        num += np.log10(1 + g ** 2 * s1 / (sv + 2)).sum()
        den += np.log10(1 + s1 / 2).sum()
    return float(num / den)


def test_vif_matches_scipy_transliteration(rng):
    a = rng.integers(0, 256, (72, 80)).astype(np.float64)
    f = np.clip(np.round(0.7 * a + rng.normal(0, 20, a.shape) + 30), 0, 255)
    assert M.vif(_img(a), _img(f)) == pytest.approx(_vifp_reference(a, f), rel=1e-9)


def _qabf_reference(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Xydeas & Petrović with scipy: Sobel by convolve2d ('same', symmetric boundary = replicate for 3x3)."""
    from scipy.signal import convolve2d

    h_y = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)
    h_x = h_y.T

    def strength_angle(img):
        sx, sy = convolve2d(img, h_x, "same", "symm"), convolve2d(img, h_y, "same", "symm")
        with np.errstate(divide="ignore", invalid="ignore"):
            ang = np.where(sx == 0, np.pi / 2, np.arctan(sy / sx))
        return np.hypot(sx, sy), ang

    def q(gs, as_, gf, af):
        with np.errstate(divide="ignore", invalid="ignore"):
            grel = np.where(np.maximum(gs, gf) > 0, np.minimum(gs, gf) / np.maximum(gs, gf), 0.0)
        arel = 1 - np.abs(as_ - af) / (np.pi / 2)
        return 0.9994 / (1 + np.exp(-15 * (grel - 0.5))) * 0.9879 / (1 + np.exp(-22 * (arel - 0.8)))

    (ga, aa), (gb, ab), (gf, af) = strength_angle(a), strength_angle(b), strength_angle(f)
    return float((q(ga, aa, gf, af) * ga + q(gb, ab, gf, af) * gb).sum() / (ga + gb).sum())


def test_qabf_matches_scipy_reference(rng):
    a = rng.integers(0, 256, (H, W)).astype(np.float64)
    b = rng.integers(0, 256, (H, W)).astype(np.float64)
    f = np.round(0.5 * a + 0.5 * b)
    assert M.qabf(_img(f), _img(a), _img(b)) == pytest.approx(_qabf_reference(f, a, b), rel=1e-9)
