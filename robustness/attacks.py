"""White-box attacks on an infrared-visible fusion + segmentation model.

An attack is an object bound to a model (torchattacks style): hyper-parameters go to the constructor and
``attack(ir, vis, label=None) -> (ir_adv, vis_adv)`` returns adversarial inputs. The model is called as
``model(ir, vis)`` and must return an object with ``.logits`` (B, K, H, W) and ``.fused_y`` (B, 1, H, W)
(``search_space.pipeline.FusionSegOutput``).

Attacks
    * :class:`PGD`    projected gradient descent, L-inf or L2 (Madry et al., ICLR 2018).
    * :class:`FGSM`   one projected signed-gradient step (Goodfellow et al., ICLR 2015); with
                      ``random_start=True`` it is the R+FGSM of Wong et al., ICLR 2020.
    * :class:`SegPGD` PGD whose per-pixel CE is re-weighted between correctly and wrongly classified
                      pixels with lambda(t) = (t - 1) / (2 T) (Gu et al., "SegPGD", ECCV 2022).
    * :class:`CosPGD` PGD whose per-pixel CE is weighted by the cosine similarity between
                      softmax(logits) and the one-hot label (Agnihotri et al., "CosPGD", ICML 2024).
    * :class:`APGD`   Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an
                      ensemble of diverse parameter-free attacks", ICML 2020): step size 2 eps halved at
                      checkpoints when progress stalls, momentum 0.75; with the pixel-wise losses of SEA
                      (Croce, Singh & Hein, "Towards reliable evaluation and fast training of robust semantic
                      segmentation models", ECCV 2024, arXiv 2306.12941): ``seg_loss`` = "ce", "ce-bal",
                      "mce", "msl" or "js" (see :func:`seg_loss_per_image`).
    * :class:`Square` score-based random search (Square Attack, Andriushchenko et al., ECCV 2020), no
                      gradients: a black-box check for gradient masking.

Objectives (``loss=``)
    * ``"seg"``    pixel-wise cross-entropy against ``label`` (B, H, W) int64, ``ignore_index`` skipped;
                   each image's loss is the mean over its valid pixels (SegPGD / CosPGD: weighted sum
                   over valid pixels divided by the number of valid pixels, as in the papers' 1/(HW)).
    * ``"fusion"`` label-free: the distance (``fusion_distance`` = "mse" or "l1", per image mean) between
                   the fused luminance of the attacked and of the clean inputs (clean computed once, no
                   grad). The distance has zero gradient at the clean input, so it needs a random start.

Best iterate and restarts
    Every attack returns, per image, the best point it visited (``keep_best=True``, the default): the
    lowest pixel accuracy over valid pixels, ties broken by the higher mean CE (``loss="fusion"``: the
    largest fused-output distance), as SEA and AutoAttack do; this costs one extra forward per run.
    ``keep_best=False`` returns the last iterate (adversarial training; the old ``strong-v1``).
    ``restarts=R`` runs the attack R times from fresh random starts and keeps the best per image.
    After a call, ``last_trace`` holds per restart the per-iterate scores (``err``, ``ce`` (T+1, B), the
    objective (T, B), APGD's ``step_size`` (T, B)); :meth:`Attack.budget` gives the forward and backward
    passes per image.

Guarantees (every call)
    * a fresh input gradient each step via ``torch.autograd.grad`` (nothing accumulates in ``.grad``);
    * projection onto the eps-ball (L-inf: clamp; L2: per image and per modality rescale) and onto
      [0, 1] after every step; the budget is checked at the end (``AssertionError`` if violated);
    * ``targets`` picks the perturbed modalities; the others are returned unchanged. With L2 each
      perturbed modality has its own eps-ball (per image), like the L-inf case;
    * the model is left exactly as found: every module's ``training`` flag, every buffer (BatchNorm
      running statistics), parameters, their ``.grad`` (including ``None``) and ``requires_grad``.
      ``model_mode="eval"`` (default, evaluation) attacks the model in eval mode;
      ``model_mode="keep"`` attacks it in the mode it is in (adversarial training: BatchNorm uses
      batch statistics) and restores every buffer afterwards;
    * works under ``torch.autocast`` (the loss is computed in float32), inside ``torch.no_grad`` and
      on any device (the device comes from the inputs); batched;
    * ``eps == 0`` returns copies of the inputs without calling the model.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attack", "PGD", "FGSM", "SegPGD", "CosPGD", "APGD", "Square",
    "NORMS", "LOSSES", "MODALITIES", "MODEL_MODES", "FUSION_DISTANCES", "SEG_LOSSES",
    "pixel_ce", "segpgd_lambda", "segpgd_weights", "cospgd_weights", "seg_loss_per_image",
    "apgd_checkpoints", "seg_scores", "fusion_distance", "model_guard",
]

log = logging.getLogger(__name__)

NORMS = ("linf", "l2")
LOSSES = ("seg", "fusion")
MODALITIES = ("ir", "vis")
MODEL_MODES = ("eval", "keep")
FUSION_DISTANCES = ("mse", "l1")
SEG_LOSSES = ("ce", "ce-bal", "mce", "msl", "js")


# ----------------------------------------------------------------------------------------------------
# Pure per-pixel functions (tested against the papers' formulas)
# ----------------------------------------------------------------------------------------------------
def pixel_ce(logits: Tensor, label: Tensor, ignore_index: int = 255) -> Tensor:
    """Per-pixel cross-entropy in float32.

    Args:
        logits: (B, K, H, W) any float dtype.
        label: (B, H, W) int64 in [0, K) or ``ignore_index``.
    Returns:
        (B, H, W) float32, 0 at ignored pixels.
    """
    return F.cross_entropy(logits.float(), label, ignore_index=ignore_index, reduction="none")


def segpgd_lambda(t: int, steps: int) -> float:
    """SegPGD's schedule lambda(t) = (t - 1) / (2 T) for step t = 1..T (Gu et al., ECCV 2022, Alg. 1)."""
    if not 1 <= t <= steps:
        raise ValueError(f"expected 1 <= t <= steps, got t={t}, steps={steps}")
    return (t - 1) / (2 * steps)


def segpgd_weights(logits: Tensor, label: Tensor, t: int, steps: int, ignore_index: int = 255) -> Tensor:
    """SegPGD per-pixel weights: (1 - lambda(t)) on correctly and lambda(t) on wrongly classified pixels.

    The SegPGD loss is ``sum(weights * CE) / n`` with n the number of (valid) pixels.

    Args:
        logits: (B, K, H, W); label: (B, H, W) int64; t in 1..steps.
    Returns:
        (B, H, W) float32 in [0, 1], 0 at ignored pixels; no gradient.
    """
    lam = segpgd_lambda(t, steps)
    correct = logits.detach().argmax(dim=1) == label
    w = torch.where(correct, 1.0 - lam, lam).float()
    return w * (label != ignore_index)


def cospgd_weights(logits: Tensor, label: Tensor, ignore_index: int = 255, activation: str = "softmax") -> Tensor:
    """CosPGD per-pixel weights cos(psi(logits), onehot(label)) = psi_y / ||psi||_2 (Agnihotri et al., ICML 2024).

    ``activation="softmax"`` follows the ICML 2024 paper and the authors' ``cospgd`` package;
    ``"sigmoid"`` is the variant of the first arXiv version (2302.02213v1).

    Args:
        logits: (B, K, H, W); label: (B, H, W) int64.
    Returns:
        (B, H, W) float32 in [0, 1], 0 at ignored pixels; no gradient (the weight is detached).
    """
    z = logits.detach().float()
    if activation == "softmax":
        p = z.softmax(dim=1)
    elif activation == "sigmoid":
        p = z.sigmoid()
    else:
        raise ValueError(f"expected activation 'softmax' or 'sigmoid', got {activation!r}")
    valid = label != ignore_index
    safe = torch.where(valid, label, torch.zeros_like(label))
    onehot = F.one_hot(safe, num_classes=z.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    return F.cosine_similarity(p, onehot, dim=1) * valid


def seg_scores(logits: Tensor, label: Tensor, ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """Per-image error rate and mean cross-entropy over valid pixels.

    Returns:
        (error (B,), ce (B,)), float32; an image with no valid pixel scores 0 and 0.
    """
    valid = label != ignore_index
    n = valid.flatten(1).sum(1).clamp_min(1).float()
    wrong = (logits.detach().argmax(dim=1) != label) & valid
    ce = pixel_ce(logits.detach(), label, ignore_index)
    return wrong.flatten(1).sum(1) / n, ce.flatten(1).sum(1) / n


def seg_loss_per_image(logits: Tensor, label: Tensor, kind: str = "ce", ignore_index: int = 255) -> Tensor:
    """Per-image segmentation losses of SEA (Croce, Singh & Hein, arXiv 2306.12941), float32, to maximise.

    With V the valid pixels of an image, p = softmax(logits), y the label and M the pixels still
    classified correctly (argmax p = y, detached):

    * ``"ce"``     sum_V CE / |V|                                   (plain cross-entropy)
    * ``"ce-bal"`` (1 / |classes in V|) sum_c mean_{i in V, y_i = c} CE_i   (balanced: every class
                   present counts the same, small objects are not drowned by road and sky)
    * ``"mce"``    sum_M CE / |V|                  (masked CE: work only on pixels not yet fooled)
    * ``"msl"``    sum_M (1 - p_y / ||p||_2) / |V|  (masked spherical loss; bounded, scale-free)
    * ``"js"``     sum_V JS(p || onehot(y)) / |V|   (Jensen-Shannon divergence, in [0, ln 2]: a wrong
                   pixel saturates, so the attack moves on to the others)

    Args:
        logits: (B, K, H, W) any float dtype; label: (B, H, W) int64 in [0, K) or ``ignore_index``.
    Returns:
        (B,) float32; an image without valid pixels scores 0.
    """
    if kind not in SEG_LOSSES:
        raise ValueError(f"expected seg_loss in {SEG_LOSSES}, got {kind!r}")
    z = logits.float()
    valid = label != ignore_index
    n = valid.flatten(1).sum(1).clamp_min(1).float()
    safe = torch.where(valid, label, torch.zeros_like(label))
    if kind in ("ce", "ce-bal", "mce"):
        per_pixel = pixel_ce(z, label, ignore_index)
    if kind in ("mce", "msl"):
        mask = (z.detach().argmax(1) == label) & valid
    if kind == "ce":
        return per_pixel.flatten(1).sum(1) / n
    if kind == "mce":
        return (per_pixel * mask).flatten(1).sum(1) / n
    if kind == "ce-bal":
        onehot = F.one_hot(safe, z.shape[1]) * valid[..., None]  # (B, H, W, K)
        counts = onehot.flatten(1, 2).sum(1).float()  # (B, K)
        w = 1.0 / counts.clamp_min(1).gather(1, safe.flatten(1)).view_as(per_pixel)
        present = (counts > 0).sum(1).clamp_min(1).float()
        return (w * per_pixel * valid).flatten(1).sum(1) / present
    p = z.softmax(1)
    p_y = p.gather(1, safe[:, None])[:, 0]
    if kind == "msl":
        return ((1 - p_y / p.norm(dim=1).clamp_min(1e-12)) * mask).flatten(1).sum(1) / n
    # JS(p || e_y) = 1/2 KL(p || m) + 1/2 KL(e_y || m), m = (p + e_y) / 2
    p = p.clamp_min(1e-12)
    onehot = F.one_hot(safe, z.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    m = 0.5 * (p + onehot)
    kl_pm = (p * (p.log() - m.log())).sum(1)
    kl_ym = -m.gather(1, safe[:, None])[:, 0].log()
    return ((0.5 * kl_pm + 0.5 * kl_ym) * valid).flatten(1).sum(1) / n


def apgd_checkpoints(steps: int) -> list[int]:
    """APGD's checkpoints w_j = ceil(p_j N) < N, j >= 1 (Croce & Hein, ICML 2020, section 3.2).

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), computed exactly (fractions).
    """
    from fractions import Fraction

    prev, cur, out = Fraction(0), Fraction(22, 100), []
    while cur <= 1:
        w = math.ceil(cur * steps)
        if 0 < w < steps and w not in out:
            out.append(w)
        prev, cur = cur, cur + max(cur - prev - Fraction(3, 100), Fraction(6, 100))
    return out


def fusion_distance(fused: Tensor, clean: Tensor, kind: str = "mse") -> Tensor:
    """Per-image distance (mean over pixels) between fused outputs, float32; (B, 1, H, W) x2 -> (B,)."""
    d = fused.float() - clean.float()
    d = d.square() if kind == "mse" else d.abs()
    return d.flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------------
# Model state guard
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def model_guard(model: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """Run a block with ``model`` in ``mode`` ("eval" or "keep") and restore its state afterwards.

    Restores every module's ``training`` flag and copies back every buffer (BatchNorm running
    statistics, ``num_batches_tracked``), also when the block raises. Parameters and their ``.grad``
    are never touched by the attacks (gradients are taken with ``torch.autograd.grad``).
    """
    if mode not in MODEL_MODES:
        raise ValueError(f"expected model_mode in {MODEL_MODES}, got {mode!r}")
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        if mode == "eval":
            model.eval()
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


# ----------------------------------------------------------------------------------------------------
# Attacks
# ----------------------------------------------------------------------------------------------------
def _per_image_norm(x: Tensor) -> Tensor:
    """L2 norm of each image, shaped (B, 1, 1, 1) for broadcasting."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


class Attack:
    """Iterative, projected, first-order attack on ``model(ir, vis)`` (base of PGD/FGSM/SegPGD/CosPGD).

    Args:
        model: nn.Module called as ``model(ir, vis)`` returning ``.logits`` and ``.fused_y``.
        eps: budget per perturbed modality (L-inf: max abs change; L2: per-image norm), >= 0.
        alpha: step size (L-inf: per-pixel; L2: per-image step length), >= 0.
        steps: number of gradient steps, >= 0.
        norm: "linf" or "l2".
        random_start: start uniformly in the eps-ball (L-inf) / ball (L2) intersected with [0, 1].
        targets: perturbed modalities, a non-empty subset of ("ir", "vis").
        loss: "seg" (CE against labels) or "fusion" (label-free fused-output distance).
        ignore_index: label value excluded from the loss.
        fusion_distance: "mse" or "l1" for ``loss="fusion"``.
        seed: if given, each call draws its random start from a fresh generator seeded with it
            (reproducible, call-independent); ``generator`` gives a caller-owned generator instead;
            neither: the global RNG.
        model_mode: "eval" (attack in eval mode, the evaluation protocol) or "keep" (attack in the
            model's current mode, e.g. for adversarial training; buffers are restored afterwards).
        keep_best: return each image's best iterate (default) instead of the last one.
        restarts: independent runs from fresh random starts, best kept per image (>= 1).
    """

    name = "Attack"
    _score_last = True  # one forward scores the final iterate (best-iterate bookkeeping)

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        alpha: float,
        steps: int,
        *,
        norm: str = "linf",
        random_start: bool = True,
        targets: Sequence[str] = MODALITIES,
        loss: str = "seg",
        ignore_index: int = 255,
        fusion_distance: str = "mse",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        model_mode: str = "eval",
        keep_best: bool = True,
        restarts: int = 1,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected model to be an nn.Module, got {type(model).__name__}")
        eps, alpha = float(eps), float(alpha)
        if not eps >= 0:
            raise ValueError(f"expected eps >= 0, got {eps}; use e.g. eps=8/255 for the L-inf protocol")
        if not alpha >= 0:
            raise ValueError(f"expected alpha >= 0, got {alpha}")
        if isinstance(steps, bool) or int(steps) != steps or steps < 0:
            raise ValueError(f"expected steps to be an integer >= 0, got {steps!r}")
        if norm not in NORMS:
            raise ValueError(f"expected norm in {NORMS}, got {norm!r}")
        if isinstance(targets, str):
            targets = (targets,)
        targets = tuple(targets)
        if not targets or any(t not in MODALITIES for t in targets) or len(set(targets)) != len(targets):
            raise ValueError(f"expected targets to be a non-empty subset of {MODALITIES}, got {targets!r}")
        if loss not in LOSSES:
            raise ValueError(f"expected loss in {LOSSES}, got {loss!r}")
        if fusion_distance not in FUSION_DISTANCES:
            raise ValueError(f"expected fusion_distance in {FUSION_DISTANCES}, got {fusion_distance!r}")
        if loss == "fusion" and not random_start and eps > 0:
            raise ValueError(
                "expected random_start=True with loss='fusion', got random_start=False: the distance to the "
                "clean fused output has zero gradient at the clean input, so the attack would never move")
        if model_mode not in MODEL_MODES:
            raise ValueError(f"expected model_mode in {MODEL_MODES}, got {model_mode!r}")
        if isinstance(restarts, bool) or int(restarts) != restarts or restarts < 1:
            raise ValueError(f"expected restarts to be an integer >= 1, got {restarts!r}")
        self.keep_best, self.restarts = bool(keep_best), int(restarts)
        self.last_trace: list[dict[str, Tensor]] = []
        self.model = model
        self.eps, self.alpha, self.steps = eps, alpha, int(steps)
        self.norm, self.random_start, self.targets, self.loss = norm, bool(random_start), targets, loss
        self.ignore_index, self.fusion_distance = int(ignore_index), fusion_distance
        self.seed, self.generator, self.model_mode = seed, generator, model_mode

    # -- description -------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Hyper-parameters as a plain, JSON-serialisable dict (``attack`` names the class)."""
        return {
            "attack": self.name.lower(), "eps": self.eps, "alpha": self.alpha, "steps": self.steps,
            "norm": self.norm, "random_start": self.random_start, "targets": list(self.targets),
            "loss": self.loss, "ignore_index": self.ignore_index, "fusion_distance": self.fusion_distance,
            "seed": self.seed, "model_mode": self.model_mode, "keep_best": self.keep_best,
            "restarts": self.restarts, **self._extra_config(),
        }

    @property
    def label(self) -> str:
        """Short name for tables, e.g. ``pgd-20`` or ``apgd-js-30``; per-modality runs end in ``@ir``/``@vis``."""
        out = f"{self.name.lower()}-{self.steps}"
        if self.restarts > 1:
            out += f"x{self.restarts}"
        return out if set(self.targets) == set(MODALITIES) else f"{out}@{'+'.join(self.targets)}"

    def budget(self) -> dict[str, int]:
        """Forward and backward passes per image of one call (the cost the report shows)."""
        final = 1 if self.keep_best or self.restarts > 1 else 0
        return {"forward": self.restarts * (self.steps + final), "backward": self.restarts * self.steps}

    def _extra_config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        cfg = {k: v for k, v in self.config().items() if k != "attack"}
        cfg["targets"] = tuple(cfg["targets"])
        body = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in cfg.items())
        return f"{self.name}({body})"

    # -- objective ---------------------------------------------------------------------------------
    def pixel_weights(self, logits: Tensor, label: Tensor, t: int) -> Tensor:
        """Per-pixel CE weights at step t (1-based): 1 on valid pixels for plain CE. (B, H, W) float32."""
        return (label != self.ignore_index).float()

    def objective(self, out: Any, label: Tensor | None, clean_fused: Tensor | None, t: int) -> Tensor:
        """Scalar float32 loss to maximise: the sum over images of each image's loss."""
        return self.objective_per_image(out, label, clean_fused, t).sum()

    def objective_per_image(self, out: Any, label: Tensor | None, clean_fused: Tensor | None, t: int) -> Tensor:
        """Each image's loss to maximise at step t (1-based), (B,) float32."""
        if self.loss == "fusion":
            return fusion_distance(out.fused_y, clean_fused, self.fusion_distance)
        logits = out.logits
        if logits.shape[-2:] != label.shape[-2:]:
            raise ValueError(f"expected logits of spatial size {tuple(label.shape[-2:])} (the label's), got "
                             f"{tuple(logits.shape[-2:])}; the model must upsample its logits to the input size")
        ce = pixel_ce(logits, label, self.ignore_index)
        w = self.pixel_weights(logits, label, t)
        n = (label != self.ignore_index).flatten(1).sum(1).clamp_min(1)
        return (w * ce).flatten(1).sum(1) / n

    def scores(self, out: Any, label: Tensor | None, clean_fused: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-image (primary, secondary) badness of an output, larger = worse for the model, (B,) each:
        (error rate, mean CE) with labels, (distance, distance) for ``loss="fusion"``."""
        if self.loss == "fusion":
            d = fusion_distance(out.fused_y.detach(), clean_fused, self.fusion_distance)
            return d, d
        return seg_scores(out.logits, label, self.ignore_index)

    # -- geometry ----------------------------------------------------------------------------------
    def _random_delta(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        if self.norm == "linf":
            u = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            return (2 * u - 1) * self.eps
        g = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=gen, device=x.device, dtype=x.dtype)
        radius = self.eps * r.pow(1.0 / x[0].numel())
        return g / _per_image_norm(g).clamp_min(1e-12) * radius

    def _direction(self, grad: Tensor) -> Tensor:
        if self.norm == "linf":
            return grad.sign()
        return grad / _per_image_norm(grad).clamp_min(1e-12)

    def _project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            delta = delta * (self.eps / _per_image_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        return (x + delta).clamp(0.0, 1.0)

    def _check_budget(self, x_adv: Tensor, x: Tensor, which: str) -> None:
        tol = 4 * torch.finfo(x.dtype).eps * max(1.0, self.eps)
        delta = (x_adv - x).float()
        size = delta.abs().amax() if self.norm == "linf" else delta.flatten(1).norm(dim=1).max()
        if size > self.eps + tol:
            raise AssertionError(f"{self.name}: {which} perturbation {self.norm} size {size.item():.6g} exceeds "
                                 f"eps={self.eps:.6g}; this is a bug in the projection")
        if x_adv.min() < 0 or x_adv.max() > 1:
            raise AssertionError(f"{self.name}: {which} left [0, 1] (min {x_adv.min().item():.4g}, "
                                 f"max {x_adv.max().item():.4g}); this is a bug in the projection")

    # -- call --------------------------------------------------------------------------------------
    def _validate(self, ir: Tensor, vis: Tensor, label: Tensor | None) -> None:
        for name, x in (("ir", ir), ("vis", vis)):
            if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
                raise ValueError(f"expected {name} to be a float tensor (B, C, H, W), got "
                                 f"{getattr(x, 'shape', type(x).__name__)}")
        ranges = torch.stack([ir.min().float(), ir.max().float(), vis.min().float(), vis.max().float()]).tolist()
        for name, lo, hi in (("ir", *ranges[:2]), ("vis", *ranges[2:])):
            if lo < 0 or hi > 1:
                raise ValueError(f"expected {name} in [0, 1], got range [{lo:.4g}, {hi:.4g}]; "
                                 f"pass images scaled to [0, 1] (not normalised)")
        if ir.shape[0] != vis.shape[0]:
            raise ValueError(f"expected ir and vis with the same batch size, got {ir.shape[0]} and {vis.shape[0]}")
        if self.loss == "seg":
            if label is None:
                raise ValueError(f"{self.name} with loss='seg' needs labels, got label=None; pass label (B, H, W) "
                                 f"int64, or use loss='fusion' for unlabelled data")
            if label.dim() != 3 or label.shape[0] != ir.shape[0] or label.dtype != torch.long:
                raise ValueError(f"expected label int64 (B, H, W) with B={ir.shape[0]}, got "
                                 f"{label.dtype} {tuple(label.shape)}")

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.generator is not None:
            return self.generator
        if self.seed is not None:
            return torch.Generator(device=device).manual_seed(int(self.seed))
        return None

    def __call__(self, ir: Tensor, vis: Tensor, label: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Adversarial inputs.

        Args:
            ir: (B, 1, H, W) in [0, 1]; vis: (B, 3, H, W) in [0, 1];
            label: (B, H, W) int64 (needed for ``loss="seg"``, ignored for ``loss="fusion"``).
        Returns:
            (ir_adv, vis_adv), same shapes, dtypes and devices, detached; untargeted modalities equal
            the inputs; every perturbation within eps and every value in [0, 1].
        """
        self._validate(ir, vis, label)
        clean = {"ir": ir.detach(), "vis": vis.detach()}
        if self.eps == 0:
            return clean["ir"].clone(), clean["vis"].clone()
        with torch.inference_mode(False), torch.enable_grad(), model_guard(self.model, self.model_mode):
            adv = self._run(clean, label)
        for m in self.targets:
            self._check_budget(adv[m], clean[m], m)
        return adv["ir"], adv["vis"]

    def _run(self, clean: dict[str, Tensor], label: Tensor | None) -> dict[str, Tensor]:
        gen = self._generator(clean["ir"].device)
        clean_fused = None
        if self.loss == "fusion":
            with torch.no_grad():
                clean_fused = self.model(clean["ir"], clean["vis"]).fused_y.detach().float()
        self.last_trace = []
        best = _Best()
        for _ in range(self.restarts):
            trace: dict[str, list[Tensor]] = {"err": [], "ce": [], "objective": []}
            adv = self._run_once(clean, label, clean_fused, gen, best, trace)
            if (self.keep_best or self.restarts > 1) and self._score_last:
                with torch.no_grad():
                    self._record(self.model(adv["ir"], adv["vis"]), adv, label, clean_fused, best, trace)
            self.last_trace.append({k: torch.stack(v) for k, v in trace.items() if v})
        if best.x is None or not (self.keep_best or self.restarts > 1):
            return {m: x.detach() for m, x in adv.items()}
        return {m: best.x.get(m, x).detach() for m, x in clean.items()}

    def _record(self, out: Any, adv: dict[str, Tensor], label: Tensor | None, clean_fused: Tensor | None,
                best: "_Best", trace: dict[str, list[Tensor]]) -> None:
        """Score the iterate ``adv`` from its output: trace it and keep it per image if it is the worst so far."""
        primary, secondary = self.scores(out, label, clean_fused)
        trace["err"].append(primary.detach())
        trace["ce"].append(secondary.detach())
        best.update({m: adv[m] for m in self.targets}, primary, secondary)

    def _start(self, clean: dict[str, Tensor], gen: torch.Generator | None) -> dict[str, Tensor]:
        adv = {m: x.clone() for m, x in clean.items()}
        if self.random_start:
            for m in self.targets:
                adv[m] = self._project(clean[m] + self._random_delta(clean[m], gen), clean[m])
        return adv

    def _forward_grad(self, adv: dict[str, Tensor], label: Tensor | None, clean_fused: Tensor | None, t: int
                      ) -> tuple[Any, Tensor, list[Tensor | None]]:
        """Output, per-image objective (B,) and the gradient of its sum w.r.t. each target modality."""
        leaves = {m: adv[m].detach().requires_grad_(True) for m in self.targets}
        inputs = {**adv, **leaves}
        out = self.model(inputs["ir"], inputs["vis"])
        per_image = self.objective_per_image(out, label, clean_fused, t)
        if not per_image.requires_grad:  # no target reaches the objective (e.g. a single-modality model)
            return out, per_image.detach(), [None] * len(self.targets)
        grads = torch.autograd.grad(per_image.sum(), [leaves[m] for m in self.targets], allow_unused=True)
        return out, per_image.detach(), list(grads)

    def _run_once(self, clean: dict[str, Tensor], label: Tensor | None, clean_fused: Tensor | None,
                  gen: torch.Generator | None, best: "_Best", trace: dict[str, list[Tensor]]) -> dict[str, Tensor]:
        """One run from a (random) start: fixed-step projected ascent (PGD family)."""
        adv = self._start(clean, gen)
        for t in range(1, self.steps + 1):
            out, objective, grads = self._forward_grad(adv, label, clean_fused, t)
            self._record(out, adv, label, clean_fused, best, trace)
            trace["objective"].append(objective)
            with torch.no_grad():
                for m, g in zip(self.targets, grads):
                    if g is None:  # the model ignores this modality
                        continue
                    step = adv[m] + self.alpha * self._direction(g.to(adv[m].dtype))
                    adv[m] = self._project(step, clean[m])
        return adv


class _Best:
    """Per-image best point seen so far under a lexicographic (primary, secondary) score, larger = better."""

    def __init__(self) -> None:
        self.x: dict[str, Tensor] | None = None
        self.primary: Tensor | None = None
        self.secondary: Tensor | None = None

    def update(self, x: dict[str, Tensor], primary: Tensor, secondary: Tensor) -> Tensor:
        """Keep ``x`` for the images where it scores better; returns the (B,) bool mask of those images."""
        if self.x is None:
            self.x = {m: v.detach().clone() for m, v in x.items()}
            self.primary, self.secondary = primary.clone(), secondary.clone()
            return torch.ones_like(primary, dtype=torch.bool)
        better = (primary > self.primary) | ((primary == self.primary) & (secondary > self.secondary))
        for m, v in x.items():
            self.x[m][better] = v.detach()[better]
        self.primary = torch.where(better, primary, self.primary)
        self.secondary = torch.where(better, secondary, self.secondary)
        return better


class PGD(Attack):
    """Projected gradient descent (Madry et al., ICLR 2018), L-inf or L2; see :class:`Attack`."""

    name = "PGD"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 norm: str = "linf", random_start: bool = True, targets: Sequence[str] = MODALITIES,
                 loss: str = "seg", **kwargs: Any) -> None:
        super().__init__(model, eps, alpha, steps, norm=norm, random_start=random_start, targets=targets,
                         loss=loss, **kwargs)


class FGSM(Attack):
    """One projected gradient step of size ``alpha`` (default ``eps``) (Goodfellow et al., ICLR 2015).

    With ``random_start=True`` this is R+FGSM / "fast" adversarial training's attack (Wong et al.,
    ICLR 2020), who recommend ``alpha = 1.25 * eps``; the result is projected back onto the ball.
    """

    name = "FGSM"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float | None = None,
                 norm: str = "linf", random_start: bool = False, targets: Sequence[str] = MODALITIES,
                 loss: str = "seg", **kwargs: Any) -> None:
        kwargs.pop("steps", None)
        super().__init__(model, eps, eps if alpha is None else alpha, 1, norm=norm, random_start=random_start,
                         targets=targets, loss=loss, **kwargs)


class _LabelWeightedPGD(PGD):
    """PGD whose CE is re-weighted per pixel using the labels (SegPGD, CosPGD): needs ``loss='seg'``."""

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)
        if self.loss != "seg":
            raise ValueError(f"expected loss='seg' for {self.name} (its pixel weights need labels), got "
                             f"loss={self.loss!r}; for unlabelled data use PGD(loss='fusion')")


class SegPGD(_LabelWeightedPGD):
    """SegPGD (Gu et al., ECCV 2022): loss = [(1-lambda) sum_correct CE + lambda sum_wrong CE] / n_valid,
    lambda(t) = (t - 1) / (2 T); see :func:`segpgd_weights`."""

    name = "SegPGD"

    def pixel_weights(self, logits: Tensor, label: Tensor, t: int) -> Tensor:
        return segpgd_weights(logits, label, t, self.steps, self.ignore_index)


class CosPGD(_LabelWeightedPGD):
    """CosPGD (Agnihotri et al., ICML 2024): loss = sum cos(softmax(z), onehot(y)) * CE / n_valid,
    the weight detached; ``activation="sigmoid"`` gives the arXiv v1 variant. See :func:`cospgd_weights`."""

    name = "CosPGD"

    def __init__(self, model: nn.Module, *args: Any, activation: str = "softmax", **kwargs: Any) -> None:
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"expected activation 'softmax' or 'sigmoid', got {activation!r}")
        self.activation = activation
        super().__init__(model, *args, **kwargs)

    def _extra_config(self) -> dict[str, Any]:
        return {"activation": self.activation}

    def pixel_weights(self, logits: Tensor, label: Tensor, t: int) -> Tensor:
        return cospgd_weights(logits, label, self.ignore_index, self.activation)


class APGD(Attack):
    """Auto-PGD (Croce & Hein, ICML 2020, Algorithm 1) with SEA's pixel-wise losses (Croce, Singh & Hein,
    "Robust semantic segmentation: strong adversarial attacks and fast training of robust models",
    arXiv 2306.12941, ECCV 2024 as "Towards reliable evaluation and fast training of robust semantic
    segmentation models").

    Per image: step size eta starts at ``alpha`` (default 2 eps); x^(1) = P(x^(0) + eta d(x^(0))) and then
    z = P(x^(k) + eta d(x^(k))), x^(k+1) = P(x^(k) + a (z - x^(k)) + (1 - a)(x^(k) - x^(k-1))) with
    momentum a = ``momentum`` (0.75), d = sign of the gradient (L-inf) or the normalised gradient (L2).
    At each checkpoint w_j (:func:`apgd_checkpoints`) eta is halved and the iterate reset to the
    highest-loss point x_max when

    1. the loss rose in fewer than rho (w_j - w_{j-1}) of the steps since w_{j-1} (rho = 0.75), i.e.
       #{w_{j-1} <= i < w_j : f(x^(i+1)) > f(x^(i))} < rho (w_j - w_{j-1}), or
    2. eta was not halved at w_{j-1} and f_max did not improve since w_{j-1}.

    The check at w_j runs once f(x^(w_j)) is known, before the step that leaves x^(w_j) (as in the
    authors' code); the gradient at x_max is reused, so a reset costs no pass. The loss ``seg_loss`` is
    one image's pixel average (:func:`seg_loss_per_image`), so every image has its own schedule, as in
    SEA. ``last_trace[r]["step_size"]`` (T, B) records the eta used at each iteration.
    """

    name = "APGD"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float | None = None, steps: int = 20,
                 norm: str = "linf", random_start: bool = True, targets: Sequence[str] = MODALITIES,
                 loss: str = "seg", seg_loss: str = "ce", momentum: float = 0.75, rho: float = 0.75,
                 **kwargs: Any) -> None:
        super().__init__(model, eps, 2 * float(eps) if alpha is None else alpha, steps, norm=norm,
                         random_start=random_start, targets=targets, loss=loss, **kwargs)
        if seg_loss not in SEG_LOSSES:
            raise ValueError(f"expected seg_loss in {SEG_LOSSES}, got {seg_loss!r}")
        if not 0 < momentum <= 1 or not 0 < rho <= 1:
            raise ValueError(f"expected momentum and rho in (0, 1], got momentum={momentum}, rho={rho}")
        self.seg_loss, self.momentum, self.rho = seg_loss, float(momentum), float(rho)

    def _extra_config(self) -> dict[str, Any]:
        return {"seg_loss": self.seg_loss, "momentum": self.momentum, "rho": self.rho}

    @property
    def label(self) -> str:
        base = super().label
        return base.replace("apgd-", f"apgd-{self.seg_loss}-", 1) if self.loss == "seg" else base

    def objective_per_image(self, out: Any, label: Tensor | None, clean_fused: Tensor | None, t: int) -> Tensor:
        if self.loss == "fusion":
            return super().objective_per_image(out, label, clean_fused, t)
        if out.logits.shape[-2:] != label.shape[-2:]:
            raise ValueError(f"expected logits of spatial size {tuple(label.shape[-2:])} (the label's), got "
                             f"{tuple(out.logits.shape[-2:])}; the model must upsample its logits to the input size")
        return seg_loss_per_image(out.logits, label, self.seg_loss, self.ignore_index)

    def _step(self, x: Tensor, g: Tensor | None, eta: Tensor) -> Tensor:
        if g is None:
            return x
        return x + eta.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) * self._direction(g.to(x.dtype))

    def _run_once(self, clean: dict[str, Tensor], label: Tensor | None, clean_fused: Tensor | None,
                  gen: torch.Generator | None, best: _Best, trace: dict[str, list[Tensor]]) -> dict[str, Tensor]:
        adv = self._start(clean, gen)
        prev = {m: v.clone() for m, v in adv.items()}
        n = clean["ir"].shape[0]
        dev = clean["ir"].device
        eta = torch.full((n,), self.alpha, device=dev)
        checkpoints = set(apgd_checkpoints(self.steps))
        top = _Best()  # x_max: the highest loss seen (APGD's own bookkeeping, not the returned best)
        grad_max: dict[str, Tensor | None] = {}
        history: list[Tensor] = []
        last_w, eta_last, fmax_last = 0, eta.clone(), None
        trace["step_size"] = []
        for k in range(self.steps):
            out, f, grads = self._forward_grad(adv, label, clean_fused, k + 1)
            self._record(out, adv, label, clean_fused, best, trace)
            trace["objective"].append(f)
            history.append(f)
            grads = dict(zip(self.targets, grads))
            improved = top.update({m: adv[m] for m in self.targets}, f, f)
            for m in self.targets:
                g = grads[m]
                if g is None:
                    grad_max[m] = None
                elif m not in grad_max or grad_max[m] is None:
                    grad_max[m] = g.detach().clone()
                else:
                    grad_max[m][improved] = g.detach()[improved]
            if k == 0:
                fmax_last = top.primary.clone()
            if k in checkpoints:
                rises = sum((history[i + 1] > history[i]).float() for i in range(last_w, k))
                cond1 = rises < self.rho * (k - last_w)
                cond2 = (eta_last == eta) & (fmax_last == top.primary)
                halve = cond1 | cond2
                last_w, eta_last, fmax_last = k, eta.clone(), top.primary.clone()
                eta = torch.where(halve, eta / 2, eta)
                for m in self.targets:
                    adv[m] = torch.where(halve.view(-1, 1, 1, 1), top.x[m], adv[m])
                    if grads[m] is not None:
                        grads[m] = torch.where(halve.view(-1, 1, 1, 1), grad_max[m], grads[m])
            trace["step_size"].append(eta.clone())
            a = 1.0 if k == 0 else self.momentum
            with torch.no_grad():
                for m in self.targets:
                    z = self._project(self._step(adv[m], grads[m], eta), clean[m])
                    nxt = self._project(adv[m] + a * (z - adv[m]) + (1 - a) * (adv[m] - prev[m]), clean[m])
                    prev[m], adv[m] = adv[m], nxt
        return adv


class Square(Attack):
    """Square Attack, L-inf (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): score-based random search.

    No gradients: it only queries the model, so it is blind to gradient masking and serves as the black-box
    check of :mod:`robustness.masking`. Start: vertical stripes of +-eps per channel (the paper's
    initialisation); each of ``steps`` queries sets a random square window (side sqrt(p H W), p shrinking
    from ``p_init`` on the paper's schedule) of every perturbed modality, per channel, to x +- eps, and keeps
    the change for the images it makes worse (lower pixel accuracy, ties higher CE; ``loss="fusion"``:
    larger fused-output distance). Windows sit at the same place in IR and VIS (registered cameras).
    Budget: ``steps + 1`` forwards, no backward, per image.
    """

    name = "Square"
    _score_last = False  # every query is already scored

    def __init__(self, model: nn.Module, eps: float = 8 / 255, steps: int = 100, p_init: float = 0.3,
                 targets: Sequence[str] = MODALITIES, loss: str = "seg", **kwargs: Any) -> None:
        kwargs.pop("alpha", None)
        if kwargs.pop("norm", "linf") != "linf":
            raise ValueError("expected norm='linf' for Square (only the L-inf version is implemented)")
        kwargs.pop("random_start", None)
        kwargs["keep_best"] = True
        super().__init__(model, eps, 0.0, steps, norm="linf", random_start=True, targets=targets, loss=loss,
                         **kwargs)
        if not 0 < p_init <= 1:
            raise ValueError(f"expected p_init in (0, 1], got {p_init}")
        self.p_init = float(p_init)

    def _extra_config(self) -> dict[str, Any]:
        return {"p_init": self.p_init}

    def budget(self) -> dict[str, int]:
        return {"forward": self.restarts * (self.steps + 1), "backward": 0}

    def p_at(self, i: int) -> float:
        """Fraction of pixels in the window at query i (Square's schedule, rescaled to 10,000 queries)."""
        it = int(i / max(self.steps, 1) * 10000)
        halvings = sum(it > t for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
        return self.p_init / 2 ** halvings

    def _run_once(self, clean: dict[str, Tensor], label: Tensor | None, clean_fused: Tensor | None,
                  gen: torch.Generator | None, best: _Best, trace: dict[str, list[Tensor]]) -> dict[str, Tensor]:
        x0 = clean[self.targets[0]]
        b, h, w, dev = x0.shape[0], x0.shape[-2], x0.shape[-1], x0.device

        def signs(shape: tuple[int, ...]) -> Tensor:
            return torch.randint(0, 2, shape, generator=gen, device=dev).to(x0.dtype) * 2 - 1

        adv = {m: x.clone() for m, x in clean.items()}
        for m in self.targets:
            c = clean[m].shape[1]
            adv[m] = (clean[m] + self.eps * signs((b, c, 1, w))).clamp(0, 1)
        with torch.no_grad():
            self._record(self.model(adv["ir"], adv["vis"]), adv, label, clean_fused, best, trace)
            ys, xs = torch.arange(h, device=dev).view(1, h, 1), torch.arange(w, device=dev).view(1, 1, w)
            for i in range(self.steps):
                side = max(1, min(h - 1, w - 1, int(round(math.sqrt(self.p_at(i) * h * w)))))
                r = torch.randint(0, h - side + 1, (b, 1, 1), generator=gen, device=dev)
                cc = torch.randint(0, w - side + 1, (b, 1, 1), generator=gen, device=dev)
                window = ((ys >= r) & (ys < r + side) & (xs >= cc) & (xs < cc + side))[:, None]  # (B, 1, H, W)
                cand = dict(best.x)
                for m in self.targets:
                    new = (clean[m] + self.eps * signs((b, clean[m].shape[1], 1, 1))).clamp(0, 1)
                    cand[m] = torch.where(window, new, best.x[m])
                full = {**clean, **cand}
                self._record(self.model(full["ir"], full["vis"]), full, label, clean_fused, best, trace)
        return {**clean, **best.x}

