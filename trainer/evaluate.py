"""Evaluate a trained PAIF fusion + segmentation checkpoint, clean and under attack, and write a report.

PAIF: Liu et al., "PAIF: Perception-Aware Infrared-Visible Image Fusion for Attack-Tolerant Semantic
Segmentation", ACM MM 2023 (reference protocol: PGD L-inf, eps 8/255, step 2/255, 5 steps, both
modalities). Weak attacks overstate robustness, so a report on labelled data always includes ``strong``
(per-image worst case over SEA's APGD ensemble, PGD-20, SegPGD-20 and CosPGD-20 at eps 8/255, best
iterates), followed by gradient-masking checks (``robustness/masking.py``: the loss must rise, a
black-box Square attack and a transfer attack from ``masking.surrogate`` must not beat it; their results
join the worst case). Threats in ``per_modality`` are also run on IR only and on VIS only.

Usage::

    python trainer/evaluate.py --checkpoint runs/retrain/ckpt.pt --data data/MSRS --split test \
        --threat paif --threat strong [--eps-sweep 0 2 4 8 16] [--out DIR] [--limit N] [--batch-size B] \
        [--device cpu] [--config configs/evaluate.yaml] [key=value ...]
    # masking checks with a transfer attack from another checkpoint; strong also on IR only / VIS only:
    python trainer/evaluate.py --checkpoint aat.pt --data DIR masking.surrogate=clean.pt per_modality=[strong]
    # unlabelled pairs (fusion metrics, label-free fusion-loss attack):
    python trainer/evaluate.py --checkpoint ckpt.pt --data ../shared/data/real_rgbt --limit 8
    # a randomly initialised checkpoint for a demo:
    python -m trainer.checkpoint --init --genotype paif --out /tmp/ckpt.pt
    # the robustness card (threat models, corruptions, sensor faults, misregistration, patches; trainer/robustness_card.py):
    python trainer/evaluate.py --suite card --checkpoint aat.pt --data DIR --reference no_aat.pt --out runs/card

Writes into the run directory: ``report.json`` (config, versions, checkpoint metadata, numbers),
``report.md`` (tables with explanations), ``grid_<threat>.png`` (IR, VIS, fused, prediction, ground
truth; clean and attacked rows), ``eps_curve.png`` (mIoU versus eps per threat model), ``config.yaml``
and ``evaluate.log``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from rgbt.color import rgb_to_y
from rgbt.dataset import RGBTDataset
from robustness.masking import MaskingChecks, summarise as summarise_masking
from robustness.threats import (
    THREAT_MODELS, ThreatError, WorstCase, build_threat, load_threats_yaml, resolve_threat,
)
from trainer.card import evaluation_entry
from trainer.checkpoint import CheckpointError, load_model, record_evaluation
from trainer.config import ConfigError, config_to_dict, finite, load_config, parse_overrides, require, save_config
from trainer.metrics import MIOU_CONVENTIONS, ConfusionMatrix, FusionMetrics, batched_miou
from trainer.report import grid_name, save_curves, save_grid, save_grid_rows, to_jsonable, write_json, write_markdown
from trainer.datacheck import check_datasets
from trainer.errors import entry_point
from trainer.runs import make_run_dir, seed_everything, setup_logging, tune_malloc, use_run_dir, versions

log = logging.getLogger("trainer.evaluate")

ALWAYS_LABELLED = "strong"  # the threat model every labelled report must include
SUITES = ("report", "card")  # --suite: this report, or the robustness card of trainer/robustness_card.py



# ------------------------------------------------------------------------------------------------ config
@dataclass
class MaskingConfig:
    """Gradient-masking checks after the labelled white-box evaluation of ``threat`` (robustness/masking.py)."""

    enabled: bool = True
    threat: str = "strong"  # the evaluated threat the checks compare against (and whose worst case they join)
    surrogate: str = ""  # checkpoint to craft transfer attacks on (e.g. the no-AAT model); "" = no transfer check
    transfer_threat: str = "sea-lite"  # threat model run on the surrogate
    queries: int = 100  # Square attack queries per image (one forward each)
    p_init: float = 0.3  # Square's initial window fraction

    def __post_init__(self) -> None:
        require(self.queries >= 1, "masking.queries", "an integer >= 1", self.queries)
        require(finite(self.p_init) and 0 < self.p_init <= 1, "masking.p_init", "a fraction in (0, 1]", self.p_init)
        try:
            resolve_threat(self.transfer_threat)
        except ThreatError as exc:
            raise ValueError(f"masking.transfer_threat: {exc}") from exc


@dataclass
class EvaluateConfig:
    """Resolved configuration of one evaluation (YAML ``configs/evaluate.yaml`` ← flags ← ``key=value``)."""

    checkpoint: str = ""  # file written by trainer.checkpoint.save_checkpoint
    data: str = ""  # dataset root: <root>/<split>/{vi,ir,label} (MSRS), MFNet, or flat <root>/{vi,ir}
    split: str = "test"
    out: str = ""  # output directory; empty: runs/evaluate-<timestamp>
    threats: list[str] = field(default_factory=lambda: ["paif", "strong"])  # names in THREAT_MODELS or YAML files
    eps_sweep: list[float] = field(default_factory=lambda: [0.0, 2.0, 4.0, 8.0, 16.0])  # in 1/255; [] = no sweep
    sweep_threats: list[str] = field(default_factory=list)  # threats swept over eps_sweep; [] = every threat
    limit: int = 0  # evaluate the first N images only; 0 = all
    batch_size: int = 4
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    seed: int = 0
    grid_samples: int = 4  # samples shown in each picture grid
    steps: int = 0  # 0 = the threat models' own step counts (the protocol); N > 0 overrides (quick checks only)
    resize: list[int] = field(default_factory=list)  # [] = native resolution; [H, W] resizes every image (quick checks)
    progress: bool = True  # tqdm progress bar
    num_threads: int = 0  # CPU threads for torch; 0 = torch's default (set 1 on oversubscribed machines)
    #: "published": classes absent from truth and prediction count as IoU 0 (the published evaluation);
    #: "present": they drop out of the mean (trainer.metrics)
    miou_convention: str = "published"
    per_modality: list[str] = field(default_factory=lambda: ["paif"])  # also run these on IR only and VIS only
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    #: append this evaluation (threat models, mIoU / fusion metrics, report path) to the checkpoint's model card
    #: (``python -m trainer.checkpoint info CKPT`` lists them); false leaves the checkpoint file untouched
    record_in_checkpoint: bool = True
    #: validate every image of the split before the (slow) attacks; cached, false or --skip-data-check skips it
    data_check: bool = True

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        for key in ("limit", "num_workers", "grid_samples", "steps", "num_threads"):
            require(getattr(self, key) >= 0, key, "an integer >= 0", getattr(self, key))
        require(self.miou_convention in MIOU_CONVENTIONS, "miou_convention", f"one of {MIOU_CONVENTIONS}",
                self.miou_convention)
        bad = [e for e in self.eps_sweep if not (finite(e) and 0 <= e <= 255)]
        require(not bad, "eps_sweep", "values in 0..255 (units of 1/255)", bad)
        require(not self.resize or (len(self.resize) == 2 and min(self.resize) >= 16), "resize",
                "[] or [H, W] with both >= 16", list(self.resize))
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}") from None
        evaluated = self.threat_names()
        require(set(self.per_modality) <= set(evaluated), "per_modality",
                f"names among the evaluated threats {evaluated}", list(self.per_modality))
        if self.masking.enabled:
            require(self.masking.threat in evaluated + [ALWAYS_LABELLED], "masking.threat",
                    f"one of the evaluated threats {evaluated}", self.masking.threat)

    def threat_names(self) -> list[str]:
        """The threat names this config evaluates (YAML files read and checked; unknown names raise ValueError)."""
        names: list[str] = []
        for n in self.threats:
            if n.endswith((".yaml", ".yml")):
                names += [k for k in load_threats_yaml(n) if k not in THREAT_MODELS]
            else:
                resolve_threat(n)
                names.append(n)
        return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------- threat models
@dataclass
class Threat:
    """A named attack as evaluated: ``make(eps)`` builds the attack at another budget (eps in [0, 1] units)."""

    name: str
    description: str
    eps: float
    make: Callable[[float | None], Callable]
    attack: Callable | None = None

    def __post_init__(self) -> None:
        if self.attack is None:
            self.attack = self.make(None)


THREAT_HELP: dict[str, str] = {
    "paif": "the PAIF reference protocol: PGD (projected gradient descent) with an L∞ budget of 8/255, "
            "step 2/255, 5 steps, perturbing both the infrared and the visible image to maximise the "
            "segmentation cross-entropy.",
    "a2rnet": "the A2RNet budget: PGD L∞ 4/255, 20 steps of 1/255, both images, cross-entropy.",
    "strong": "per image, the worst of seven attacks at L∞ 8/255 on both images and the clean image: APGD with "
              "each of the four losses of `sea` (100 steps for Jensen-Shannon and the masked spherical loss, 50 for "
              "masked cross-entropy, 25 for balanced cross-entropy) and three 20-step attacks (PGD; SegPGD, which shifts weight to still-correct "
              "pixels; CosPGD, which weights pixels by their confidence in the true class), each keeping the "
              "worst point it visited. The strongest attack here, so its mIoU is the tightest available upper "
              "bound on the true robust mIoU.",
    "strong-v2": "the `strong` of version 2: per image, the worst of the four 25-step APGD runs of `sea`, PGD-20, "
                 "SegPGD-20 and CosPGD-20 at L∞ 8/255 on both images (best iterates) and the clean image.",
    "strong-v1": "the `strong` of earlier versions: per image, the worst of PGD-20, SegPGD-20 and CosPGD-20 at "
                 "L∞ 8/255 on both images (each from one random start, keeping its LAST point) and the clean image.",
    "sea": "SEA (Croce et al. 2023): per image, the worst of four APGD runs at L∞ 8/255 on both images, each "
           "maximising another loss (class-balanced cross-entropy; cross-entropy of still-correct pixels only; "
           "a bounded 'spherical' loss of still-correct pixels; Jensen-Shannon divergence, which stops pushing "
           "pixels that are already wrong). APGD adapts its step size per image: it halves the step when the "
           "loss stops rising and restarts from the best point.",
    "sea-lite": "a cheap SEA for training-time validation: the worst of two short APGD runs (masked "
                "cross-entropy and Jensen-Shannon) at L∞ 8/255 on both images.",
}
MODALITY_TEXT = {"ir": "only the infrared image is perturbed (an attacker who controls the thermal camera)",
                 "vis": "only the visible image is perturbed (an attacker who controls the colour camera)"}


def _describe(name: str, spec: dict[str, Any], labelled: bool) -> str:
    """One sentence for the report: the built-in text, or one generated from the resolved spec."""
    if labelled and name in THREAT_HELP and spec == resolve_threat(name):
        return THREAT_HELP[name]

    def one(m: dict[str, Any]) -> str:
        kind = "pgd" if not labelled and m["attack"] in ("segpgd", "cospgd") else m["attack"]
        return (f"{kind.upper()}-{m.get('steps', 1)} ({m.get('norm', 'linf').replace('linf', 'L∞')} "
                f"ε {m['eps'] * 255:g}/255, step {m.get('alpha', m['eps']) * 255:g}/255, "
                f"on {'+'.join(m.get('targets', ['ir', 'vis']))})")

    if spec["attack"] == "worst_case":
        text = "per image, the worst of " + ", ".join(one(m) for m in spec["members"])
        text += " and the clean image" if spec.get("include_clean", True) else ""
    else:
        text = one(spec)
    if labelled:
        return text + ", maximising the segmentation cross-entropy."
    return (f"label-free variant of `{name}`: {text}, each maximising the distance between the attacked and the "
            "clean fused image (no labels needed; SegPGD/CosPGD members, whose weights need labels, become PGD "
            "runs with other random starts).")


def build_threats(names: Sequence[str], model: torch.nn.Module, labelled: bool, steps: int,
                  notes: list[str], per_modality: Sequence[str] = ()) -> list[Threat]:
    """Threat objects for ``names`` (built-in names or YAML files of ``threats:``).

    On unlabelled data each threat becomes its label-free fusion-loss variant (``loss="fusion"``).
    ``steps > 0`` replaces every member's step count (quick checks; not the protocol).
    Each name in ``per_modality`` is followed by ``<name>-ir-only`` and ``<name>-vis-only``: the same
    attacks perturbing one modality.
    """
    registry: dict[str, Any] = dict(THREAT_MODELS)
    wanted: list[str] = []
    for n in names:
        if n.endswith((".yaml", ".yml")):
            extra = load_threats_yaml(n)
            new = [k for k in extra if k not in THREAT_MODELS]
            registry.update(extra)
            wanted += new
            notes.append(f"threat models {', '.join(f'`{k}`' for k in new)} come from `{n}`.")
        else:
            wanted.append(n)
    threats = []
    for name in dict.fromkeys(wanted):
        try:
            spec = resolve_threat(name, registry)
        except ThreatError as exc:
            raise ConfigError(str(exc)) from exc
        description = _describe(name, spec, labelled)
        if steps > 0:
            for m in spec["members"] if spec["attack"] == "worst_case" else [spec]:
                if m["attack"] != "fgsm":
                    m["steps"] = steps
            description += f" (step counts overridden to {steps} in this run)"
        loss = None if labelled else "fusion"
        shown = name if labelled else f"{name}-fusion"

        for targets in [None] + ([["ir"], ["vis"]] if name in per_modality else []):
            def make(eps: float | None, spec: dict[str, Any] = spec, loss: str | None = loss,
                     targets: list[str] | None = targets) -> Callable:
                return build_threat(spec, model, eps=eps, loss=loss, targets=targets)

            attack = make(None)
            text = description if targets is None else f"{description} Here {MODALITY_TEXT[targets[0]]}."
            label = shown if targets is None else f"{shown}-{targets[0]}-only"
            threats.append(Threat(label, text, float(attack.eps), make, attack))
    unknown = sorted(set(per_modality) - set(wanted))
    if unknown:
        raise ConfigError(f"per_modality: expected names among the evaluated threats {list(dict.fromkeys(wanted))}, "
                          f"got {unknown}")
    return threats


# ---------------------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available, else MPS, else CPU; other names are passed to ``torch.device``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {name!r}") from exc


def _resize(sample: dict[str, Any], size: Sequence[int]) -> dict[str, Any]:
    """Resize one sample to (H, W): images bilinear with antialiasing, labels nearest."""
    h, w = int(size[0]), int(size[1])
    out = dict(sample)
    for k in ("ir", "vis"):
        out[k] = F.interpolate(sample[k][None], size=(h, w), mode="bilinear", antialias=True,
                               align_corners=False)[0].clamp(0, 1)
    if "label" in sample:
        out["label"] = F.interpolate(sample["label"][None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    return out


def _batches(loader: DataLoader, resize: Sequence[int] = ()) -> Iterator[dict[str, Any]]:
    """Stack consecutive same-size samples into batches (sizes may vary between images)."""
    for samples in loader:
        group: list[dict[str, Any]] = []
        for s in samples:
            if resize:
                s = _resize(s, resize)
            if group and s["ir"].shape != group[0]["ir"].shape:
                yield _stack(group)
                group = []
            group.append(s)
        if group:
            yield _stack(group)


def _stack(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: torch.stack([s[k] for s in samples]) for k in ("ir", "vis", "label") if k in samples[0]}
    out["name"] = [s["name"] for s in samples]
    return out


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of (B, C, H, W) images in [0, 1]; identical images give 100 dB (capped)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)


def _np_img(t: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor in [0, 1] → (H, W) or (H, W, 3) float numpy."""
    a = t.detach().float().cpu().numpy()
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def _seg_summary(cm: ConfusionMatrix, miou_convention: str = "published") -> dict[str, Any]:
    r = cm.compute(miou_convention)
    return {"miou": r["miou"], "miou_objects": r["miou_objects"], "miou_convention": r["miou_convention"],
            "miou_by_convention": r["miou_by_convention"], "macc": r["macc"], "pixel_acc": r["pixel_acc"],
            "iou": dict(zip(r["classes"], r["iou"])), "recall": dict(zip(r["classes"], r["recall"])),
            "pixels": r["pixels"]}


def _sweep_eps(cfg: EvaluateConfig) -> list[float]:
    return sorted({float(e) for e in cfg.eps_sweep})  # range checked when the config was loaded


class _Accumulator:
    """Per-condition metrics: confusion matrix, fusion metrics, fused-image PSNR against the clean run."""

    def __init__(self, num_classes: int, labelled: bool, fusion: bool, miou_convention: str = "published") -> None:
        self.cm = ConfusionMatrix(num_classes) if labelled else None
        self.miou_convention = miou_convention
        self.fusion = FusionMetrics() if fusion else None
        self.psnr: list[float] = []

    def update(self, out: Any, batch: dict[str, Any], clean_fused: torch.Tensor | None) -> None:
        if self.cm is not None:
            self.cm.update(out.logits.argmax(1), batch["label"])
        if self.fusion is not None:
            # attacked fused images are judged against the CLEAN sources: the scene, not the perturbation
            self.fusion.update(out.fused_y.float().clamp(0, 1), batch["ir"], rgb_to_y(batch["vis"]))
        if clean_fused is not None:
            self.psnr += _psnr(out.fused_y, clean_fused).tolist()

    def summary(self) -> dict[str, Any]:
        return {
            "segmentation": _seg_summary(self.cm, self.miou_convention) if self.cm is not None else None,
            "fusion": self.fusion.compute() if self.fusion is not None else None,
            "fused_psnr": float(np.mean(self.psnr)) if self.psnr else None,
        }


def _masking_checks(cfg: EvaluateConfig, threats: list[Threat], model: torch.nn.Module, labelled: bool,
                    device: torch.device) -> MaskingChecks | None:
    """The gradient-masking checks bound to ``cfg.masking.threat`` (labelled data only), or None."""
    mc = cfg.masking
    if not labelled or not mc.enabled:
        return None
    by_name = {th.name: th for th in threats}
    if mc.threat not in by_name:
        raise ConfigError(f"masking.threat: expected one of the evaluated threats {list(by_name)}, got {mc.threat!r}")
    th = by_name[mc.threat]
    first = th.attack.attacks[0] if isinstance(th.attack, WorstCase) else th.attack
    surrogate = None
    if mc.surrogate:
        surrogate, _ = load_model(mc.surrogate, map_location=device)
        surrogate.requires_grad_(False)
    def transfer(m: torch.nn.Module) -> Callable:
        return build_threat(mc.transfer_threat, m, eps=th.eps, targets=list(first.targets))

    return MaskingChecks(model, th.eps, first.targets, queries=mc.queries, p_init=mc.p_init, surrogate=surrogate,
                         transfer=transfer, seed=cfg.seed, ignore_index=first.ignore_index)


#: how the segmentation numbers of a worst-case threat are chosen (recorded by trainer.experiment: an arm evaluated
#: under another rule is evaluated again)
WORST_CASE_SELECTION = "pooled-miou-v1"


class PooledWorstCase:
    """The per-image choice among a worst-case threat's candidates that minimises the mIoU pooled over images.

    A worst case picks, per image, the candidate with the lowest pixel accuracy (``WorstCase``, joined by the
    masking checks' black-box results). mIoU pools pixels over images, so that choice can end above a member run
    alone on every image (seen once: 19.7 against 19.5 mIoU). Here every image keeps the confusion matrix of each
    candidate — index 0 the per-image worst case, then each member alone — and :meth:`select` starts from the best
    uniform assignment (all images on one candidate: so the result is never above any member, nor above the
    per-image worst case) and switches single images while the pooled mIoU falls (coordinate descent; each
    switch is an attack the adversary could make, image by image).
    """

    def __init__(self, names: Sequence[str], num_classes: int,
                 first: Sequence[str] = ("per-image worst case",)) -> None:
        self.names = [*first, *names]
        self.num_classes = num_classes
        self.mats: list[torch.Tensor] = []  # per image: (candidates, K, K) int64

    def add(self, chosen: torch.Tensor | Sequence[torch.Tensor], members: Sequence[torch.Tensor],
            label: torch.Tensor) -> None:
        """Per-image predictions (B, H, W) of the chosen inputs (one tensor per name of ``first``) and of each
        member alone, and the labels."""
        preds = [*([chosen] if torch.is_tensor(chosen) else chosen), *members]
        if len(preds) != len(self.names):
            raise ValueError(f"PooledWorstCase.add: expected {len(self.names)} predictions, got {len(preds)}")
        for i in range(label.shape[0]):
            per = []
            for pred in preds:
                cm = ConfusionMatrix(self.num_classes)
                cm.update(pred[i:i + 1], label[i:i + 1])
                per.append(cm.matrix.cpu())
            self.mats.append(torch.stack(per))

    def select(self, convention: str = "published", max_sweeps: int = 5,
               starts: Sequence[Sequence[int]] = ()) -> tuple[ConfusionMatrix, dict[str, Any]]:
        """The pooled confusion matrix of the chosen assignment, and what was chosen (``choice``: the candidate
        index per image). ``starts``: more initial assignments to start from when they beat the uniform ones."""
        mats = torch.stack(self.mats)  # (N, candidates, K, K)
        n, c = mats.shape[:2]
        uniform = batched_miou(mats.sum(0), convention).tolist()
        first = min(range(c), key=lambda k: (uniform[k], k))
        choice, best = [first] * n, uniform[first]
        for start in starts:
            value = float(batched_miou(mats[torch.arange(n), torch.as_tensor(list(start))].sum(0), convention))
            if value < best:
                choice, best = list(start), value
        total = mats[torch.arange(n), torch.as_tensor(choice)].sum(0)
        for _ in range(max_sweeps):
            improved = False
            for i in range(n):
                # every switch of image i in one batched mIoU. Taking the lowest (ties: the lowest index) is the
                # rule's "try the candidates in order, take each that lowers the pooled mIoU": a switch gives the
                # same pooled matrix as choosing that candidate directly, so the candidates tried later are
                # compared with the same values
                values = batched_miou(total - mats[i, choice[i]] + mats[i], convention)
                values[choice[i]] = float("inf")
                k = int(torch.argmin(values))
                if float(values[k]) < best - 1e-12:
                    total = total - mats[i, choice[i]] + mats[i, k]
                    best, choice[i], improved = float(values[k]), k, True
            if not improved:
                break
        cm = ConfusionMatrix(self.num_classes)
        cm.matrix = total
        info = {"rule": WORST_CASE_SELECTION, "per_image_worst_case_miou": uniform[0],
                "uniform_miou": dict(zip(self.names, uniform)),
                "images_per_candidate": {name: choice.count(k) for k, name in enumerate(self.names) if choice.count(k)},
                "miou": best, "choice": choice}
        return cm, info


class _Extra:
    """Per-threat time, cost, each worst-case member alone, and the masking checks' counts."""

    def __init__(self, threats: list[Threat], num_classes: int, labelled: bool, masking: bool) -> None:
        self.labelled, self.num_classes = labelled, num_classes
        self.seconds = {th.name: 0.0 for th in threats}
        self.member_cms: dict[str, dict[str, ConfusionMatrix]] = {}
        self.white = ConfusionMatrix(num_classes) if masking else None
        self.counts: dict[str, dict[str, int]] = {}
        self.check_seconds = 0.0
        #: per worst-case threat: the pooled selection of its final inputs; "<name>/white-box": of its white-box ones
        self.pooled: dict[str, PooledWorstCase] = {}
        self._white_pred: torch.Tensor | None = None

    def members(self, th: Threat, batch: dict[str, Any], chosen: torch.Tensor | None = None) -> None:
        """Each member's predictions alone, and (``chosen``: the threat's final predictions) the pooled selection."""
        if not self.labelled or not isinstance(th.attack, WorstCase) or not th.attack.last_member_preds:
            return
        cms = self.member_cms.setdefault(th.name, {n: ConfusionMatrix(self.num_classes) for n in th.attack.labels})
        for name, pred in zip(th.attack.labels, th.attack.last_member_preds):
            cms[name].update(pred, batch["label"])
        white, self._white_pred = self._white_pred, None
        if chosen is not None:  # with masking checks, the white-box choice is a candidate of the final one too
            first = ("per-image worst case", "white-box per-image worst case") if white is not None else (
                "per-image worst case",)
            self.pooled.setdefault(th.name, PooledWorstCase(th.attack.labels, self.num_classes, first)).add(
                [chosen, white] if white is not None else chosen, th.attack.last_member_preds, batch["label"])
        if white is not None:
            self.pooled.setdefault(f"{th.name}/white-box", PooledWorstCase(th.attack.labels, self.num_classes)).add(
                white, th.attack.last_member_preds, batch["label"])

    def white_box(self, model: torch.nn.Module, ir: torch.Tensor, vis: torch.Tensor, batch: dict[str, Any]) -> None:
        with torch.no_grad():
            pred = model(ir, vis).logits.argmax(1)
        self.white.update(pred, batch["label"])
        self._white_pred = pred

    def select(self, results: dict[str, Any], convention: str) -> dict[str, dict[str, Any]]:
        """Replace each worst-case threat's segmentation numbers by its pooled selection; returns what was chosen."""
        chosen: dict[str, dict[str, Any]] = {}
        for name in sorted(self.pooled, key=lambda n: not n.endswith("/white-box")):  # white-box ones first
            pooled = self.pooled[name]
            starts = []
            white = chosen.get(f"{name}/white-box")
            if white is not None:  # the final selection may start where the white-box one ended: never above it
                starts.append([1 if k == 0 else k + 1 for k in white["choice"]])
            cm, info = pooled.select(convention, starts=starts)
            chosen[name] = info
            if name.endswith("/white-box"):
                self.white = cm
            else:
                results[name]["segmentation"] = _seg_summary(cm, convention)
        return chosen

    def count(self, flags: dict[str, torch.Tensor | None]) -> None:
        for name, fired in flags.items():
            if fired is not None:
                c = self.counts.setdefault(name, {"fired": 0, "images": 0})
                c["fired"] += int(fired.sum())
                c["images"] += int(fired.numel())

    def into(self, report: dict[str, Any], threats: list[Threat], checks: MaskingChecks | None,
             mc: MaskingConfig) -> None:
        """Add ``cost``, ``seconds``, ``members`` per threat and the ``masking`` section to ``report``."""
        for th in threats:
            entry = report["threats"][th.name]
            entry["seconds"] = self.seconds[th.name]
            if hasattr(th.attack, "budget"):
                entry["cost"] = th.attack.budget()
            if th.name in self.member_cms:
                entry["members"] = {n: _seg_summary(cm)["miou"] for n, cm in self.member_cms[th.name].items()}
        if checks is None:
            report["masking"] = None
            return
        entry = report["threats"][mc.threat]
        entry["white_box_miou"] = _seg_summary(self.white)["miou"]
        entry["cost"] = {**entry.get("cost", {}), "masking_checks": checks.budget()}
        report["masking"] = {"threat": mc.threat, "checks": summarise_masking(self.counts), "seconds": self.check_seconds,
                             "config": {**checks.config(), "surrogate": mc.surrogate or None}}


# ------------------------------------------------------------------------------------------------- run
def evaluate(cfg: EvaluateConfig, run_dir: Path) -> dict[str, Any]:
    """Run the evaluation described by ``cfg`` and write the report files into ``run_dir``."""
    t0 = time.time()  # settings were checked when the config was loaded (EvaluateConfig.__post_init__)
    seed_everything(cfg.seed)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    notes: list[str] = []
    model, meta = load_model(cfg.checkpoint, map_location=device)
    model.requires_grad_(False)
    num_classes = int(meta["segmenter"]["num_classes"])

    dataset = RGBTDataset(cfg.data, split=cfg.split)
    labelled = bool(dataset.has_labels)
    if cfg.limit > 0 and cfg.limit < len(dataset):
        dataset = Subset(dataset, range(cfg.limit))
    if cfg.data_check:
        check_datasets([dataset], progress=cfg.progress, opt_out="data_check=false or --skip-data-check skips it")
    n_images = len(dataset)
    if n_images == 0:
        raise ConfigError(f"data: expected at least one image in {cfg.data} split {cfg.split!r}, got none")

    names = list(dict.fromkeys(cfg.threats))
    if labelled and ALWAYS_LABELLED not in names:
        names.append(ALWAYS_LABELLED)
        notes.append(f"`{ALWAYS_LABELLED}` was added to the requested threat models: weak attacks overstate "
                     "robustness, so every report on labelled data includes it.")
    if not labelled:
        notes.append("The data has no labels: segmentation metrics cannot be computed, so each threat model is "
                     "run with the label-free fusion loss (it pushes the fused image away from the clean one).")
    if cfg.steps > 0:
        notes.append(f"**Attack step counts were overridden to {cfg.steps}** (`steps={cfg.steps}`): a quick "
                     "check, NOT the reference protocol. Do not quote these numbers.")
    threats = build_threats(names, model, labelled, cfg.steps, notes, cfg.per_modality)
    checks = _masking_checks(cfg, threats, model, labelled, device)
    extra = _Extra(threats, num_classes, labelled, checks is not None)
    sweep = _sweep_eps(cfg)
    if cfg.resize:
        notes.append(f"Images were resized to {cfg.resize[0]}×{cfg.resize[1]} (`resize`), not evaluated at their "
                     "native resolution: not comparable with full-resolution numbers.")

    accs = {"clean": _Accumulator(num_classes, labelled, fusion=True, miou_convention=cfg.miou_convention)}
    for th in threats:
        accs[th.name] = _Accumulator(num_classes, labelled, fusion=True, miou_convention=cfg.miou_convention)
    sweep_attacks: dict[tuple[str, float], Callable] = {}
    unknown = sorted(set(cfg.sweep_threats) - {th.name for th in threats})
    if unknown:
        raise ConfigError(f"sweep_threats: expected names among the evaluated threats "
                          f"{[th.name for th in threats]}, got {unknown}")
    for th in threats:
        if cfg.sweep_threats and th.name not in cfg.sweep_threats:
            continue
        for e in sweep:
            if e > 0 and not math.isclose(e / 255, th.eps, rel_tol=1e-6):
                sweep_attacks[(th.name, e)] = th.make(e / 255)
                accs[f"{th.name}@{e:g}"] = _Accumulator(num_classes, labelled, fusion=False,
                                                        miou_convention=cfg.miou_convention)

    grid: dict[str, list[dict[str, Any]]] = {th.name: [] for th in threats}
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                        collate_fn=list)
    bar = tqdm(total=n_images, desc="evaluate", unit="img", disable=not cfg.progress, file=sys.stderr)
    for batch in _batches(loader, cfg.resize):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        label = batch.get("label")
        with torch.no_grad():
            clean = model(batch["ir"], batch["vis"])
        accs["clean"].update(clean, batch, None)
        for th in threats:
            started = time.perf_counter()
            ir_adv, vis_adv = th.attack(batch["ir"], batch["vis"], label)
            extra.seconds[th.name] += time.perf_counter() - started
            if checks is not None and th.name == cfg.masking.threat:
                started = time.perf_counter()
                extra.white_box(model, ir_adv, vis_adv, batch)
                (ir_adv, vis_adv), flags = checks(batch["ir"], batch["vis"], label, (ir_adv, vis_adv), th.attack)
                extra.count(flags)
                extra.check_seconds += time.perf_counter() - started
            with torch.no_grad():
                adv = model(ir_adv, vis_adv)
            extra.members(th, batch, adv.logits.argmax(1) if labelled else None)
            accs[th.name].update(adv, batch, clean.fused_y)
            _collect_grid(grid[th.name], cfg.grid_samples, th, batch, clean, adv, ir_adv, vis_adv)
            for e in sweep:
                key = (th.name, e)
                if key in sweep_attacks:
                    ir_s, vis_s = sweep_attacks[key](batch["ir"], batch["vis"], label)
                    with torch.no_grad():
                        accs[f"{th.name}@{e:g}"].update(model(ir_s, vis_s), batch, clean.fused_y)
        bar.update(len(batch["name"]))
    bar.close()

    results = {k: a.summary() for k, a in accs.items()}
    selection = extra.select(results, cfg.miou_convention)
    report = _assemble(cfg, meta, device, labelled, n_images, threats, sweep, results, notes)
    extra.into(report, threats, checks, cfg.masking)
    for name, info in selection.items():
        threat, _, part = name.partition("/")
        report["threats"][threat]["selection" if not part else "white_box_selection"] = info
    report["pictures"] = _pictures(run_dir, grid, report, labelled)
    report["elapsed_s"] = time.time() - t0
    write_json(report, run_dir / "report.json")
    write_markdown(report, run_dir / "report.md")
    log.info("wrote %s and %s (%.1f s)", run_dir / "report.json", run_dir / "report.md", report["elapsed_s"])
    report = to_jsonable(report)
    if cfg.record_in_checkpoint:
        _record(cfg.checkpoint, report, run_dir / "report.json")
    return report


def _record(checkpoint: str, report: dict[str, Any], report_path: Path) -> None:
    """Append the evaluation to the checkpoint's model card; a read-only or exported file only gets a warning."""
    try:
        record_evaluation(checkpoint, evaluation_entry(report, str(report_path)))
        log.info("recorded this evaluation in the model card of %s", checkpoint)
    except (CheckpointError, OSError) as exc:
        log.warning("could not record the evaluation in %s (%s); the report is complete without it", checkpoint, exc)


def _collect_grid(rows: list[dict[str, Any]], limit: int, th: Threat, batch: dict[str, Any], clean: Any,
                  adv: Any, ir_adv: torch.Tensor, vis_adv: torch.Tensor) -> None:
    """Keep clean + attacked picture rows for the first ``limit`` samples."""
    scale = 1.0 / th.eps if th.eps > 0 else 1.0
    for i, name in enumerate(batch["name"]):
        if len(rows) >= 2 * limit:
            return
        gt = batch["label"][i].cpu().numpy() if "label" in batch else None
        delta = (vis_adv[i] - batch["vis"][i]).abs().amax(0) * scale
        delta_ir = ((ir_adv[i] - batch["ir"][i]).abs().amax(0) * scale).clamp(0, 1).cpu().numpy()
        rows.append({"label": f"{name}\nclean", "ir": _np_img(batch["ir"][i]), "vis": _np_img(batch["vis"][i]),
                     "fused": _np_img(clean.fused_rgb[i].clamp(0, 1)), "pred": clean.logits[i].argmax(0).cpu().numpy(),
                     "gt": gt, "delta": None, "delta_ir": None})
        rows.append({"label": f"{name}\n{th.name}", "ir": _np_img(ir_adv[i]), "vis": _np_img(vis_adv[i]),
                     "fused": _np_img(adv.fused_rgb[i].clamp(0, 1)), "pred": adv.logits[i].argmax(0).cpu().numpy(),
                     "gt": gt, "delta": delta.clamp(0, 1).cpu().numpy(), "delta_ir": delta_ir})


def _genotype_summary(g: dict[str, Any]) -> str:
    parts = [f"{k}={'+'.join(v) if isinstance(v, list) else v}" for k, v in g.items() if k != "version"]
    return ", ".join(parts)


def _assemble(cfg: EvaluateConfig, meta: dict[str, Any], device: torch.device, labelled: bool, n_images: int,
              threats: list[Threat], sweep: list[float], results: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    clean = results["clean"]
    threat_rep: dict[str, Any] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for th in threats:
        r = results[th.name]
        entry = {"description": th.description, "attack": " ".join(repr(th.attack).split()),
                 "attack_config": th.attack.config(), "eps": th.eps,
                 "eps_255": th.eps * 255, **r}
        if labelled:
            entry["miou_drop"] = clean["segmentation"]["miou"] - r["segmentation"]["miou"]
        threat_rep[th.name] = entry
        pts = []
        swept = not cfg.sweep_threats or th.name in cfg.sweep_threats
        for e in sweep if swept else []:
            if e == 0:
                src = {**clean, "fused_psnr": 100.0}
            elif math.isclose(e / 255, th.eps, rel_tol=1e-6):
                src = r
            else:
                src = results[f"{th.name}@{e:g}"]
            pts.append({"eps_255": e, "eps": e / 255,
                        "miou": src["segmentation"]["miou"] if labelled else None,
                        "fused_psnr": src["fused_psnr"]})
        if pts:
            curves[th.name] = pts
    return {
        "created": _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "config": config_to_dict(cfg),
        "versions": versions(),
        "device": str(device),
        "checkpoint": {
            "path": meta.get("path"), "created": meta.get("created"), "genotype": meta["genotype"],
            "genotype_summary": _genotype_summary(meta["genotype"]), "segmenter": meta["segmenter"],
            "model_options": meta.get("model"), "train_cfg": meta["train_cfg"], "versions": meta["versions"],
            "num_parameters": meta.get("num_parameters"),
            "state": {k: v for k, v in (meta.get("state") or {}).items() if isinstance(v, (int, float, str))},
        },
        "data": {"root": cfg.data, "split": cfg.split, "num_images": n_images, "labelled": labelled},
        "notes": notes,
        "clean": {"segmentation": clean["segmentation"], "fusion": clean["fusion"]},
        "threats": threat_rep,
        "eps_sweep": curves,
        "eps_sweep_metric": "miou" if labelled else "fused_psnr",
        "miou_convention": cfg.miou_convention,
    }


def _pictures(run_dir: Path, grid: dict[str, list[dict[str, Any]]], report: dict[str, Any],
              labelled: bool) -> dict[str, Any]:
    pics: dict[str, Any] = {"grids": {}, "curves": None}
    for name, rows in grid.items():
        if rows:
            png = grid_name(name, ".png")
            save_grid(run_dir / png, rows, title=f"clean vs attacked by '{name}'")
            save_grid_rows(run_dir / grid_name(name, ".npz"), rows)  # for comparison grids across models
            pics["grids"][name] = png
    curves = report["eps_sweep"]
    if curves and len(next(iter(curves.values()))) >= 2:
        key = report["eps_sweep_metric"]
        data = {n: [(p["eps_255"], p[key]) for p in pts if not (key == "fused_psnr" and p["eps_255"] == 0)]
                for n, pts in curves.items()}
        if labelled:
            save_curves(run_dir / "eps_curve.png", data, ylabel="mIoU (%)", title="mIoU versus attack budget ε")
        else:
            save_curves(run_dir / "eps_curve.png", data, ylabel="PSNR attacked vs clean fused (dB)",
                        title="Fused-image change versus attack budget ε", percent=False)
        pics["curves"] = "eps_curve.png"
    return pics


# --------------------------------------------------------------------------------------------- command
def add_run_options(p: argparse.ArgumentParser, limit_help: str = "first N images only") -> None:
    """The options shared by ``evaluate.py`` and its card suite: image limit, batch size, device, attack steps,
    seed, progress bar (each maps to the config key of the same name)."""
    p.add_argument("--limit", type=int, help=limit_help)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--steps", type=int, help="override every attack's step count (quick checks, not the protocol)")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-progress", action="store_false", dest="progress", default=None)


def load_command_config(cls: type, parse: Callable[[Sequence[str] | None], tuple[str | None, dict[str, Any]]],
                        argv: Sequence[str] | None) -> Any:
    """``parse(argv)`` → YAML path and overrides → a ``cls`` config (evaluation or card) that names a checkpoint and
    a dataset; a missing one is a :class:`ConfigError`."""
    yaml_path, overrides = parse(argv)
    cfg = load_config(cls, yaml_path, overrides)
    if not cfg.checkpoint or not cfg.data:
        raise ConfigError("expected --checkpoint CKPT and --data ROOT, got "
                          f"checkpoint={cfg.checkpoint!r} data={cfg.data!r}")
    return cfg


def parse_args(argv: Sequence[str] | None) -> tuple[str | None, dict[str, Any]]:
    """Command line → (YAML path, flat overrides). Flags override YAML; trailing ``key=value`` override flags."""
    p = argparse.ArgumentParser(prog="python trainer/evaluate.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Usage::")[1])
    p.add_argument("--suite", choices=SUITES, default="report",
                   help="report: this evaluation (default); card: the robustness card (trainer/robustness_card.py, own flags)")
    p.add_argument("--config", default=None, help="YAML file of EvaluateConfig keys (e.g. configs/evaluate.yaml)")
    p.add_argument("--checkpoint", help="checkpoint .pt written by trainer.checkpoint")
    p.add_argument("--data", help="dataset root")
    p.add_argument("--split", help="split name (default test)")
    p.add_argument("--threat", action="append", dest="threats", metavar="NAME",
                   help="threat model name or YAML file; repeat for several (default paif + strong)")
    p.add_argument("--out", help="output directory (default runs/evaluate-<timestamp>)")
    p.add_argument("--eps-sweep", nargs="*", dest="eps_sweep", metavar="EPS",
                   help="budgets in 1/255 for the mIoU-versus-eps curve (none: no sweep)")
    add_run_options(p)
    p.add_argument("--skip-data-check", action="store_false", dest="data_check", default=None,
                   help="do not validate every image of the split first (alias of data_check=false)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any EvaluateConfig key, e.g. grid_samples=2")
    args = p.parse_args(list(argv) if argv is not None else None)
    overrides = list(args.overrides)
    if args.eps_sweep is not None:  # nargs="*" also swallows trailing key=value items: hand them back
        overrides += [e for e in args.eps_sweep if "=" in e]
        try:
            args.eps_sweep = [float(e) for e in args.eps_sweep if "=" not in e]
        except ValueError as exc:
            raise ConfigError(f"--eps-sweep: expected numbers in units of 1/255, got {args.eps_sweep}") from exc
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "overrides", "suite") and v is not None}
    flags.update(parse_overrides(overrides))
    return args.config, flags


def _suite(argv: Sequence[str] | None) -> tuple[str, list[str]]:
    """(suite, the other arguments): ``--suite card`` hands the command line to ``trainer/robustness_card.py``."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--suite", choices=SUITES, default="report")
    known, rest = pre.parse_known_args(list(argv) if argv is not None else sys.argv[1:])
    return known.suite, rest


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns a process exit code (0 ok; 2 bad input or a file-system error, one line on stderr)."""
    suite, rest = _suite(argv)
    if suite == "card":
        from trainer.robustness_card import main as card_main  # the card builds on this module

        return card_main(rest)
    tune_malloc()
    cfg = load_command_config(EvaluateConfig, parse_args, argv)
    run_dir = use_run_dir(cfg.out) if cfg.out else make_run_dir("runs", "evaluate")
    setup_logging(run_dir, filename="evaluate.log")
    save_config(cfg, run_dir / "config.yaml")
    log.info("evaluating %s on %s (%s) into %s", cfg.checkpoint, cfg.data, cfg.split, run_dir)
    report = evaluate(cfg, run_dir)
    _print_summary(report, run_dir)
    return 0


def _print_summary(report: dict[str, Any], run_dir: Path) -> None:
    clean = report["clean"]
    if report["data"]["labelled"]:
        line = [f"clean mIoU {100 * (clean['segmentation']['miou'] or 0):.1f}"]
        line += [f"{n} {100 * (t['segmentation']['miou'] or 0):.1f}" for n, t in report["threats"].items()]
    else:
        line = [f"{n}: fused PSNR vs clean {t['fused_psnr']:.1f} dB" for n, t in report["threats"].items()]
    print("; ".join(line))
    print(f"report: {run_dir / 'report.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
