"""Segmentation and image-fusion metrics.

Segmentation: a confusion matrix (rows = ground truth, columns = prediction) from which per-class IoU,
mIoU, recall-based mean accuracy and pixel accuracy follow, with the conventions of the MFNet / RTFNet /
SeAFusion evaluation code (Ha et al., IROS 2017; Sun et al., RA-L 2019; Tang et al., Inf. Fusion 2022):

* pixels whose target is ``ignore_index`` are dropped;
* IoU_c = TP / (TP + FP + FN) is NaN when class c is absent from both target and prediction, and
  recall_c = TP / (TP + FN) is NaN when c is absent from the target (the per-class lists keep the NaN);
* mIoU convention (``miou_convention``, :data:`MIOU_CONVENTIONS`) for ``miou`` (over the 9 classes including
  'unlabeled') and ``miou_objects`` (over the 8 object classes 1..8):
  ``"published"`` (default, the published PAIF / MFNet evaluation): an absent class counts as IoU 0 and the
  mean is over all classes; ``"present"``: NaN-mean, over the classes present in the target or prediction
  only (absent classes drop out, which raises the mean on subsets that miss a class). Both conventions give
  a class predicted but absent from the target IoU 0. ``macc`` is always the NaN-mean of recall.

Fusion (single grey images; the IVIF benchmark conventions of VIFB, Zhang et al., CVPRW 2020, and the
evaluation scripts of PIAFusion / SeAFusion / CDDFuse):

* every metric sees the image as the 8-bit image it would be saved as: a float image in [0, 1] is
  clamped, multiplied by 255 and rounded (uint8 inputs are taken as they are), and computed in float64
  on the 0..255 scale;
* EN: Shannon entropy (bits) of the 256-bin histogram (Roberts et al. 2008);
* SD: population standard deviation (divides by H·W);
* SF: ``sqrt(RF² + CF²)`` with RF² the mean of the H×(W-1) squared horizontal forward differences and
  CF² the mean of the (H-1)×W squared vertical ones (Eskicioglu & Fisher 1995);
* AG: mean over the (H-1)×(W-1) grid of ``sqrt((gx² + gy²) / 2)`` with forward differences
  gx = F[i, j+1] - F[i, j], gy = F[i+1, j] - F[i, j] (Cui et al. 2015);
* MI: mutual information (bits) of the 256×256 joint histogram; the fusion score is
  MI(F, IR) + MI(F, VIS) (Qu et al. 2002);
* SCD: corr(F - VIS, IR) + corr(F - IR, VIS) with Pearson's correlation (Aslantas & Bendes,
  AEU 2015); a constant difference image has correlation 0 (MATLAB's ``corr2`` would give NaN);
* VIF: the pixel-domain multi-scale VIF of Sheikh & Bovik (IEEE TIP 2006, ``vifp_mscale``: 4 scales,
  Gaussian windows of 2^(5-s)+1 taps and σ = taps/5, 'valid' filtering, σ_n² = 2) with the source as
  reference and the fused image as distorted; the fusion score is the **sum** VIF(IR, F) + VIF(VIS, F)
  (as in the CDDFuse / MMIF evaluation scripts); scales smaller than their window are skipped;
* Qabf: gradient-based edge preservation of Xydeas & Petrović (Electronics Letters 2000) with 3×3 Sobel
  operators, Tg = 0.9994, kg = -15, Dg = 0.5, Ta = 0.9879, ka = -22, Da = 0.8, L = 1; unlike the common
  MATLAB/Python scripts (zero padding) the Sobel filters use replicate padding, so image borders do not
  create false edges, and the gradient ratio of two equal strengths is 1;
* SSIM: Gaussian-window SSIM (11 taps, σ = 1.5, 'valid', K1 = 0.01, K2 = 0.03; Wang et al., TIP 2004,
  :func:`trainer.losses.ssim`); the fusion score is SSIM(F, IR) + SSIM(F, VIS).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from rgbt.classes import CLASSES, IGNORE_INDEX, NUM_CLASSES
from trainer.losses import _gaussian_kernel1d
from trainer.losses import ssim as _ssim_map

__all__ = [
    "MIOU_CONVENTIONS",
    "mean_iou",
    "batched_miou",
    "ConfusionMatrix",
    "entropy",
    "std",
    "spatial_frequency",
    "avg_gradient",
    "mutual_information",
    "scd",
    "vif",
    "qabf",
    "ssim",
    "fusion_metrics",
    "fusion_metrics_batch",
    "FusionMetrics",
    "FUSION_METRIC_NAMES",
]

logger = logging.getLogger(__name__)

FUSION_METRIC_NAMES: tuple[str, ...] = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM")


# --------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------
def _nanmean(t: torch.Tensor) -> float:
    finite = t[~torch.isnan(t)]
    return float(finite.mean()) if finite.numel() else float("nan")


#: ``published``: classes absent from target and prediction count as IoU 0 (the published evaluation);
#: ``present``: they drop out of the mean.
MIOU_CONVENTIONS = ("published", "present")


def mean_iou(iou: torch.Tensor, convention: str = "published") -> float:
    """Mean of per-class IoUs (NaN = class absent from target and prediction) under ``convention``.

    ``"published"``: NaN counts as 0, mean over all entries; ``"present"``: NaN entries are skipped (NaN when
    every entry is NaN).
    """
    if convention not in MIOU_CONVENTIONS:
        raise ValueError(f"miou_convention: expected one of {MIOU_CONVENTIONS}, got {convention!r}")
    if convention == "present":
        return _nanmean(iou)
    return float(torch.nan_to_num(iou, nan=0.0).mean()) if iou.numel() else float("nan")


def batched_miou(matrices: torch.Tensor, convention: str = "published") -> torch.Tensor:
    """mIoU of each confusion matrix in ``matrices`` (..., K, K) (rows = target, columns = prediction) under
    ``convention``, float64 of shape (...): the ``miou`` of :meth:`ConfusionMatrix.compute`, many matrices at once
    (the pooled worst-case selection tries thousands)."""
    if convention not in MIOU_CONVENTIONS:
        raise ValueError(f"miou_convention: expected one of {MIOU_CONVENTIONS}, got {convention!r}")
    if matrices.dim() < 2 or matrices.shape[-1] != matrices.shape[-2]:
        raise ValueError(f"batched_miou: expected matrices (..., K, K), got {tuple(matrices.shape)}")
    m = matrices.double()
    tp = m.diagonal(dim1=-2, dim2=-1)
    union = m.sum(-1) + m.sum(-2) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.zeros_like(tp))
    if convention == "published":
        return iou.mean(-1)
    count = present.sum(-1)
    return torch.where(count > 0, iou.sum(-1) / count.clamp_min(1), torch.full_like(iou[..., 0], float("nan")))


class ConfusionMatrix:
    """Accumulating confusion matrix for semantic segmentation (rows = target, columns = prediction).

    Args:
        num_classes: number of classes K (MFNet: 9, class 0 'unlabeled').
        ignore_index: target value whose pixels are skipped.
        class_names: names for the report (default :data:`rgbt.classes.CLASSES` when K = 9).

    The matrix lives on the device of the first update (int64); :meth:`merge` adds another matrix.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX,
                 class_names: tuple[str, ...] | None = None) -> None:
        if num_classes < 2:
            raise ValueError(f"ConfusionMatrix: expected num_classes >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        if class_names is None:
            class_names = CLASSES if num_classes == len(CLASSES) else tuple(str(i) for i in range(num_classes))
        if len(class_names) != num_classes:
            raise ValueError(f"ConfusionMatrix: expected {num_classes} class names, got {len(class_names)}")
        self.class_names = tuple(class_names)
        self.matrix: torch.Tensor = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Zero the counts (keeps the device)."""
        self.matrix = torch.zeros_like(self.matrix)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: (B, H, W) integer class ids in 0..K-1, or logits / scores (B, K, H, W) (argmax over K).
            target: (B, H, W) integer ids in 0..K-1 or ``ignore_index``.
        """
        k = self.num_classes
        if pred.dim() == 4:
            if pred.shape[1] != k:
                raise ValueError(f"ConfusionMatrix.update: expected logits (B, {k}, H, W), got {tuple(pred.shape)}")
            pred = pred.argmax(1)
        if pred.shape != target.shape or pred.dim() != 3:
            raise ValueError(
                f"ConfusionMatrix.update: expected pred (B, H, W) or (B, K, H, W) and target (B, H, W) of the "
                f"same size, got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        pred, target = pred.long().flatten(), target.to(pred.device).long().flatten()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() and (target.min() < 0 or target.max() >= k):
            raise ValueError(f"ConfusionMatrix.update: expected target ids in 0..{k - 1} or {self.ignore_index}, "
                             f"got values in [{int(target.min())}, {int(target.max())}]")
        if pred.numel() and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"ConfusionMatrix.update: expected predicted ids in 0..{k - 1}, "
                             f"got values in [{int(pred.min())}, {int(pred.max())}]")
        counts = torch.bincount(target * k + pred, minlength=k * k).view(k, k)
        self.matrix = self.matrix.to(counts.device) + counts

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add the counts of ``other`` (same K) in place; returns ``self``."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"ConfusionMatrix.merge: expected {self.num_classes} classes, got {other.num_classes}")
        self.matrix = self.matrix + other.matrix.to(self.matrix.device)
        return self

    def compute(self, miou_convention: str = "published") -> dict:
        """Metrics of the accumulated counts.

        Args:
            miou_convention: ``"published"`` (absent classes count as IoU 0) or ``"present"`` (they drop out).

        Returns:
            dict with ``iou`` and ``recall`` (lists of K floats, NaN for absent classes), ``miou`` (mean over
            all K classes) and ``miou_objects`` (over classes 1..K-1) under ``miou_convention``,
            ``miou_convention``, ``miou_by_convention`` (``{convention: {"miou", "miou_objects"}}`` for every
            convention), ``macc`` (NaN-mean of recall), ``pixel_acc`` (correct / counted pixels), ``pixels``
            (counted pixels) and ``classes`` (names).
        """
        m = self.matrix.double().cpu()
        tp = m.diag()
        gt, pr = m.sum(1), m.sum(0)
        union = gt + pr - tp
        nan = torch.tensor(float("nan"), dtype=m.dtype)
        iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
        recall = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
        total = float(m.sum())
        by = {c: {"miou": mean_iou(iou, c), "miou_objects": mean_iou(iou[1:], c)} for c in MIOU_CONVENTIONS}
        if miou_convention not in by:
            raise ValueError(f"miou_convention: expected one of {MIOU_CONVENTIONS}, got {miou_convention!r}")
        return {
            "iou": iou.tolist(),
            "recall": recall.tolist(),
            "miou": by[miou_convention]["miou"],
            "miou_objects": by[miou_convention]["miou_objects"],
            "miou_convention": miou_convention,
            "miou_by_convention": by,
            "macc": _nanmean(recall),
            "pixel_acc": float(tp.sum()) / total if total else float("nan"),
            "pixels": int(total),
            "classes": list(self.class_names),
        }


# --------------------------------------------------------------------------------------------------
# Fusion metrics
# --------------------------------------------------------------------------------------------------
def _to_255(x: torch.Tensor, name: str = "image") -> torch.Tensor:
    """(H, W) / (1, H, W) / (1, 1, H, W) image in [0, 1] (or uint8) -> (H, W) float64 integer levels 0..255."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    while x.dim() > 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a single grey image (H, W) or (1, H, W), got {tuple(x.shape)}; "
                         "use fusion_metrics_batch for batches")
    if x.dtype == torch.uint8:
        return x.double()
    return (x.detach().double().clamp(0.0, 1.0) * 255.0).round()


def _histogram_entropy(counts: torch.Tensor) -> float:
    p = counts[counts > 0].double()
    p = p / p.sum()
    return float(-(p * torch.log2(p)).sum())


def entropy(x: torch.Tensor) -> float:
    """EN: entropy (bits) of the 256-bin histogram of ``x`` ((H, W) or (1, H, W), [0, 1] or uint8)."""
    q = _to_255(x, "entropy").long().flatten()
    return _histogram_entropy(torch.bincount(q, minlength=256))


def std(x: torch.Tensor) -> float:
    """SD: population standard deviation on the 0..255 scale."""
    return float(_to_255(x, "std").std(unbiased=False))


def spatial_frequency(x: torch.Tensor) -> float:
    """SF = sqrt(mean(dx²) + mean(dy²)) with forward differences, 0..255 scale."""
    f = _to_255(x, "spatial_frequency")
    rf2 = (f[:, 1:] - f[:, :-1]).pow(2).mean()
    cf2 = (f[1:, :] - f[:-1, :]).pow(2).mean()
    return float(torch.sqrt(rf2 + cf2))


def avg_gradient(x: torch.Tensor) -> float:
    """AG = mean over the (H-1)×(W-1) grid of sqrt((gx² + gy²)/2), forward differences, 0..255 scale."""
    f = _to_255(x, "avg_gradient")
    gx = f[:-1, 1:] - f[:-1, :-1]
    gy = f[1:, :-1] - f[:-1, :-1]
    return float(torch.sqrt((gx ** 2 + gy ** 2) / 2).mean())


def mutual_information(a: torch.Tensor, b: torch.Tensor) -> float:
    """MI(a, b) in bits from the 256×256 joint histogram of the 8-bit images; MI(x, x) = EN(x)."""
    qa, qb = _to_255(a, "mutual_information(a)").long(), _to_255(b, "mutual_information(b)").long()
    if qa.shape != qb.shape:
        raise ValueError(f"mutual_information: expected images of the same size, got {tuple(qa.shape)} and {tuple(qb.shape)}")
    joint = torch.bincount((qa * 256 + qb).flatten(), minlength=256 * 256).view(256, 256)
    return _histogram_entropy(joint.sum(1)) + _histogram_entropy(joint.sum(0)) - _histogram_entropy(joint.flatten())


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = torch.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def scd(fused: torch.Tensor, ir: torch.Tensor, vis_y: torch.Tensor) -> float:
    """SCD = corr(F - VIS, IR) + corr(F - IR, VIS) (Aslantas & Bendes 2015), in [-2, 2]."""
    f, a, b = _to_255(fused, "scd(fused)"), _to_255(ir, "scd(ir)"), _to_255(vis_y, "scd(vis_y)")
    return _corr(f - b, a) + _corr(f - a, b)


def _separable_valid(t: torch.Tensor, k1d: torch.Tensor) -> torch.Tensor:
    """'valid' separable filtering of (..., H, W) by a symmetric 1-D kernel (unfold + matmul: fast in float64)."""
    n = k1d.numel()
    return (t.unfold(-1, n, 1) @ k1d).unfold(-2, n, 1) @ k1d


def vif(ref: torch.Tensor, dist: torch.Tensor, sigma_nsq: float = 2.0) -> float:
    """Pixel-domain multi-scale VIF (Sheikh & Bovik 2006) of ``dist`` against the reference ``ref``.

    VIF(x, x) = 1. NaN when the reference has no variance at any usable scale.
    """
    r, d = _to_255(ref, "vif(ref)"), _to_255(dist, "vif(dist)")
    if r.shape != d.shape:
        raise ValueError(f"vif: expected images of the same size, got {tuple(r.shape[-2:])} and {tuple(d.shape[-2:])}")
    eps = 1e-10
    num = den = 0.0
    for scale in range(1, 5):
        taps = 2 ** (5 - scale) + 1
        win = _gaussian_kernel1d(taps, taps / 5.0, r)  # MATLAB fspecial('gaussian', taps, taps/5), separable

        def filt(t: torch.Tensor) -> torch.Tensor:
            return _separable_valid(t, win)

        if scale > 1:
            if min(r.shape[-2:]) < taps:
                break
            r, d = filt(r)[..., ::2, ::2], filt(d)[..., ::2, ::2]
        if min(r.shape[-2:]) < taps:
            break
        mu1, mu2 = filt(r), filt(d)
        s1 = (filt(r * r) - mu1 ** 2).clamp_min(0)
        s2 = (filt(d * d) - mu2 ** 2).clamp_min(0)
        s12 = filt(r * d) - mu1 * mu2
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        flat1 = s1 < eps
        g, sv, s1 = g.masked_fill(flat1, 0), torch.where(flat1, s2, sv), s1.masked_fill(flat1, 0)
        flat2 = s2 < eps
        g, sv = g.masked_fill(flat2, 0), sv.masked_fill(flat2, 0)
        neg = g < 0
        sv, g = torch.where(neg, s2, sv), g.masked_fill(neg, 0)
        sv = sv.clamp_min(eps)
        num += float(torch.log10(1 + g ** 2 * s1 / (sv + sigma_nsq)).sum())
        den += float(torch.log10(1 + s1 / sigma_nsq).sum())
    return num / den if den > 0 else float("nan")


_QABF = {"Tg": 0.9994, "kg": -15.0, "Dg": 0.5, "Ta": 0.9879, "ka": -22.0, "Da": 0.8, "L": 1.0}


def _sobel_strength_angle(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=f.dtype, device=f.device)
    k = torch.stack((kx, kx.t()))[:, None]
    s = F.conv2d(F.pad(f[None, None], (1, 1, 1, 1), mode="replicate"), k)[0]
    sx, sy = s[0], s[1]
    g = torch.sqrt(sx ** 2 + sy ** 2)
    safe = torch.where(sx == 0, torch.ones_like(sx), sx)
    angle = torch.where(sx == 0, torch.full_like(sx, math.pi / 2), torch.atan(sy / safe))
    return g, angle


def _edge_preservation(g_src: torch.Tensor, a_src: torch.Tensor, g_f: torch.Tensor, a_f: torch.Tensor) -> torch.Tensor:
    c = _QABF
    hi, lo = torch.maximum(g_src, g_f), torch.minimum(g_src, g_f)
    g_rel = torch.where(hi > 0, lo / hi.clamp_min(1e-300), torch.zeros_like(hi))
    a_rel = 1 - (a_src - a_f).abs() / (math.pi / 2)
    q_g = c["Tg"] / (1 + torch.exp(c["kg"] * (g_rel - c["Dg"])))
    q_a = c["Ta"] / (1 + torch.exp(c["ka"] * (a_rel - c["Da"])))
    return q_g * q_a


def qabf(fused: torch.Tensor, ir: torch.Tensor, vis_y: torch.Tensor) -> float:
    """Qabf (Xydeas & Petrović 2000): edge information of both sources preserved in ``fused``, in [0, 1].

    NaN when both sources are flat (no edge to preserve).
    """
    f, a, b = _to_255(fused, "qabf(fused)"), _to_255(ir, "qabf(ir)"), _to_255(vis_y, "qabf(vis_y)")
    (ga, aa), (gb, ab), (gf, af) = _sobel_strength_angle(a), _sobel_strength_angle(b), _sobel_strength_angle(f)
    wa, wb = ga ** _QABF["L"], gb ** _QABF["L"]
    den = (wa + wb).sum()
    if den <= 0:
        return float("nan")
    num = (_edge_preservation(ga, aa, gf, af) * wa + _edge_preservation(gb, ab, gf, af) * wb).sum()
    return float(num / den)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM of two 8-bit-quantised grey images (Gaussian 11/1.5, 'valid'; see :func:`trainer.losses.ssim`)."""
    qa, qb = (_to_255(t, name).float() / 255.0 for t, name in ((a, "ssim(a)"), (b, "ssim(b)")))
    return float(_ssim_map(qa[None, None], qb[None, None]))  # float32 is ample for SSIM and much faster


def fusion_metrics(fused: torch.Tensor, ir: torch.Tensor, vis_y: torch.Tensor) -> dict[str, float]:
    """All nine fusion metrics of one image.

    Args:
        fused, ir, vis_y: (H, W) or (1, H, W) grey images in [0, 1] (or uint8), same size (>= 11×11).
    Returns:
        ``{"EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM"}`` as floats; MI, VIF and SSIM are
        sums over the two sources.
    """
    return {
        "EN": entropy(fused),
        "SD": std(fused),
        "SF": spatial_frequency(fused),
        "AG": avg_gradient(fused),
        "MI": mutual_information(fused, ir) + mutual_information(fused, vis_y),
        "SCD": scd(fused, ir, vis_y),
        "VIF": vif(ir, fused) + vif(vis_y, fused),
        "Qabf": qabf(fused, ir, vis_y),
        "SSIM": ssim(fused, ir) + ssim(fused, vis_y),
    }


def _check_batch(fused: torch.Tensor, ir: torch.Tensor, vis_y: torch.Tensor) -> None:
    for name, t in (("fused", fused), ("ir", ir), ("vis_y", vis_y)):
        if t.dim() != 4 or t.shape[1] != 1:
            raise ValueError(f"fusion metrics ({name}): expected (B, 1, H, W), got {tuple(t.shape)}; "
                             "convert RGB with rgbt.color.rgb_to_y")
    if not (fused.shape == ir.shape == vis_y.shape):
        raise ValueError(f"fusion metrics: expected equal shapes, got {tuple(fused.shape)}, {tuple(ir.shape)}, "
                         f"{tuple(vis_y.shape)}")


def fusion_metrics_batch(fused: torch.Tensor, ir: torch.Tensor, vis_y: torch.Tensor) -> dict[str, float]:
    """Mean of :func:`fusion_metrics` over a batch of (B, 1, H, W) images (NaNs skipped per metric)."""
    meter = FusionMetrics()
    meter.update(fused, ir, vis_y)
    return meter.compute()


class FusionMetrics:
    """Accumulates :func:`fusion_metrics` image by image; :meth:`compute` gives per-metric means (NaN-skipping)."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {k: [] for k in FUSION_METRIC_NAMES}

    def reset(self) -> None:
        self.values = {k: [] for k in FUSION_METRIC_NAMES}

    def __len__(self) -> int:
        return len(self.values["EN"])

    def update(self, fused: torch.Tensor, ir: torch.Tensor, vis_y: torch.Tensor) -> None:
        """Add a batch: fused, ir, vis_y (B, 1, H, W) in [0, 1]."""
        _check_batch(fused, ir, vis_y)
        for i in range(fused.shape[0]):
            for k, v in fusion_metrics(fused[i], ir[i], vis_y[i]).items():
                self.values[k].append(v)

    def compute(self) -> dict[str, float]:
        return {k: _nanmean(torch.tensor(v, dtype=torch.float64)) if v else float("nan")
                for k, v in self.values.items()}
