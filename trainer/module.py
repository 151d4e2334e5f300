"""Lightning module for joint fusion + segmentation retraining with adaptive adversarial training (AAT).

PAIF: Liu et al., "PAIF: Perception-Aware Infrared-Visible Image Fusion for Attack-Tolerant Semantic
Segmentation", ACM MM 2023 (arXiv 2308.03979). The fixed fusion network of a genotype and the SegFormer
segmenter (``search_space.pipeline.FusionSegModel``) are trained jointly on the task loss
``L = λ_f·L_fusion + λ_s·CE`` (``trainer.losses.TaskLoss``), with one of three modes:

* ``clean``: ``L(u)`` only (the paper's "w/o AAT");
* ``at``:    plain adversarial training ``L(u) + λ·L(u + δ)``, fixed ε (``attack.at_eps``, 8/255);
* ``aat``:   Reptile pretext initialisation over the attack tasks, then online adversarial training with
  an ε drawn per batch by the adaptive sampler (``trainer.aat``);
* ``fusion``: the fusion net alone on (possibly unlabelled) pairs with the reference-free fusion loss, optionally
  ``L(u) + λ·L(u + δ)`` against the label-free fusion attack (``attack.fusion_eps`` > 0: PGD maximising the
  distance of the attacked fused image to the clean one); the segmenter never runs and keeps its initial
  weights. Validation: the fusion loss, clean and attacked (``val/fusion_loss``, ``val/fusion_loss_adv``, lower is
  better), and the nine fusion metrics of ``trainer.metrics`` (``val/fusion/<name>``).

In ``L(u + δ)`` the fusion term still compares the fused image with the *clean* sources: fusion must
undo the perturbation, not reproduce it.

Exact resume. Every random draw of a training step is a pure function of ``(seed, global_step, rank)``:
the data order (:class:`StepBatchSampler`, a permutation per epoch, positioned from the global step),
crops and flips (``RGBTDataset``'s randomness is a function of ``(seed, epoch, index)``; the key
``(epoch, index)`` travels with each index, :class:`EpochKeyedDataset`), the attack's random start
(a generator seeded per step), the AAT ε draw, and the global torch RNG (dropout / drop-path; reseeded at
every step). The rest of the state (weights, AdamW moments, the LR schedule, the global step, the
sampler's running adversarial and clean losses, the best score, whether the pretext stage ran) is in the
Lightning checkpoint written at the end of a training batch. Resuming from it replays the remaining batches exactly.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from trainer.aat import AATConfig, AdaptiveEpsSampler, mix_seed, pretext_initialise
from trainer.checkpoint import genotype_to_dict, save_checkpoint
from trainer.config import (check_budget, check_channels, check_choice, check_crop, check_lr, check_memory_limit,
                            check_nan_policy, config_to_dict, finite, require)
from search_space.pipeline import FusionOnly
from trainer.errors import os_error_at
from trainer.finite import ADVICE, NonFiniteError, StepGuard, check_loss, grad_norm, last_good_text, nonfinite_tensors
from trainer.losses import FUSION_WEIGHTS, TaskLoss
from trainer.metrics import ConfusionMatrix, FusionMetrics
from trainer.robust_objective import TRAIN_ATTACK_MODE, fusion_objective, robust_loss, task_objective

__all__ = [
    "MODES", "METRICS", "FUSION_MONITORS", "DataConfig", "OptimConfig", "TrainAttackConfig", "ValConfig", "RetrainConfig",
    "check_channels", "EpochKeyedDataset", "StepBatchSampler", "StepDataLoader", "warmup_poly", "RetrainModule",
    "ResumeCheckpoint",
]

log = logging.getLogger(__name__)

MODES = ("aat", "at", "clean", "fusion")
#: the validation metrics (higher is better); ``monitor`` picks one for best.pt
METRICS = ("val/miou", "val/miou_adv", "val/pixel_acc", "val/pixel_acc_adv")
#: the validation metrics of mode ``fusion`` (fusion loss, clean and attacked; lower is better)
FUSION_MONITORS = ("val/fusion_loss", "val/fusion_loss_adv")
ATTACK_KINDS = ("pgd", "fgsm")
PRETEXT_EPOCH_OFFSET = 1_000_000  # augmentation keys of pretext batches never collide with training epochs


# ----------------------------------------------------------------------------------------------------
# Config (one dataclass for the retrain entry point; sections are nested dataclasses)
# ----------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    #: dataset root (MSRS / MFNet layout); the synthetic set: python -m rgbt.synthetic --out data/synthetic
    root: str = "data/synthetic"
    train_split: str = "train"
    val_split: str = "val"
    #: random training crop (height, width); null = full images
    crop: tuple[int, int] | None = None
    #: random horizontal flips for training
    flip: bool = True
    #: images per device and step
    batch_size: int = 4
    val_batch_size: int = 4
    num_workers: int = 0
    #: validate on the first N validation images only (0 = all)
    val_limit: int = 0
    #: open and validate every training and validation file before training (lists all bad files at once; cached
    #: by file sizes and modification times, so a rerun is instant); false or --skip-data-check skips it
    check: bool = True
    #: > 0: hold out this fraction of the train_split files for validation (val_split is then not read): a
    #: deterministic choice by file-name hash (strategies.search.holdout_split) salted with holdout_seed; the two
    #: name lists are written to split.json in the run folder (for folders without a val split, e.g. real pairs)
    holdout_fraction: float = 0.0
    holdout_seed: int = 0

    def __post_init__(self) -> None:
        require(0.0 <= self.holdout_fraction < 1.0, "data.holdout_fraction", "a fraction in [0, 1) (0 = use val_split)",
                self.holdout_fraction)
        check_crop(self.crop, "data.crop")
        require(self.batch_size >= 1 and self.val_batch_size >= 1, "data.batch_size and data.val_batch_size",
                "integers >= 1", [self.batch_size, self.val_batch_size])
        require(self.num_workers >= 0 and self.val_limit >= 0, "data.num_workers and data.val_limit",
                "integers >= 0", [self.num_workers, self.val_limit])


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    #: linear warm-up steps (from lr·warmup_start to lr)
    warmup_steps: int = 20
    warmup_start: float = 0.01
    #: poly decay lr·(1 − t)^power after the warm-up, down to lr·min_lr_ratio
    poly_power: float = 1.0
    min_lr_ratio: float = 0.0
    #: gradient-norm clipping (0 = off)
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check_lr(self.lr, "optim.lr")
        require(finite(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", "a number >= 0",
                self.weight_decay)
        require(all(0 <= b < 1 for b in self.betas), "optim.betas", "two numbers in [0, 1)", list(self.betas))
        require(self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", self.warmup_steps)
        require(finite(self.grad_clip) and self.grad_clip >= 0, "optim.grad_clip", "a number >= 0 (0 = off)",
                self.grad_clip)


@dataclass
class TrainAttackConfig:
    """The on-the-fly attack of adversarial training (modes ``at`` and ``aat``)."""

    #: "pgd" (``steps`` steps, alpha = alpha_factor·ε/steps) or "fgsm" (random start, alpha = 1.25·ε)
    kind: str = "pgd"
    steps: int = 3
    alpha_factor: float = 2.5
    #: λ in L(u) + λ·L(u + δ)
    adv_weight: float = 1.0
    #: ε of plain adversarial training (mode ``at``)
    at_eps: float = 8 / 255
    #: ε of the label-free fusion attack in mode ``fusion`` (0 = fusion training without attacks)
    fusion_eps: float = 0.0
    #: perturbed modalities
    targets: tuple[str, ...] = ("ir", "vis")
    #: "keep" attacks the model in training mode (BatchNorm statistics restored), "eval" in eval mode
    model_mode: str = TRAIN_ATTACK_MODE

    def __post_init__(self) -> None:
        check_budget(self.at_eps, "attack.at_eps")
        check_budget(self.fusion_eps, "attack.fusion_eps")  # 0 = no attack
        require(finite(self.adv_weight) and self.adv_weight >= 0, "attack.adv_weight", "a number >= 0",
                self.adv_weight)


@dataclass
class ValConfig:
    """Validation: clean and attacked mIoU (PGD L-inf, the ``paif`` protocol by default)."""

    attack_eps: float = 8 / 255
    attack_alpha: float = 2 / 255
    attack_steps: int = 5
    #: a threat model name (e.g. "sea-lite": two short APGD runs, ~22 passes per image) instead of the PGD
    #: above; "" = the PGD of attack_eps / attack_alpha / attack_steps
    threat: str = ""
    #: images in the TensorBoard picture grid (0 = none)
    num_images: int = 4
    #: run validation every N training steps (0 = at the end of every epoch)
    every_n_steps: int = 0
    #: mode ``fusion``: also compute the nine fusion metrics of the clean fused validation images
    fusion_metrics: bool = True

    def __post_init__(self) -> None:
        check_budget(self.attack_eps, "val.attack_eps")
        check_budget(self.attack_alpha, "val.attack_alpha", "a step size")
        require(self.attack_steps >= 0, "val.attack_steps", "an integer >= 0", self.attack_steps)
        require(self.num_images >= 0 and self.every_n_steps >= 0, "val.num_images and val.every_n_steps",
                "integers >= 0", [self.num_images, self.every_n_steps])


@dataclass
class FusionWeightsConfig:
    """Weights of the fusion loss's terms inside ``λ_fusion`` (``trainer.losses.fusion_loss``): L1 to the max rule's
    intensity, L1 to the larger source gradient, and 1 − SSIM to each source (the fusion metric SSIM's sum)."""

    intensity: float = FUSION_WEIGHTS["intensity"]
    gradient: float = FUSION_WEIGHTS["gradient"]
    ssim: float = FUSION_WEIGHTS["ssim"]

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            require(finite(value) and value >= 0, f"fusion_weights.{name}", "a finite number >= 0", value)


@dataclass
class RetrainConfig:
    #: genotype name in GENOTYPES or JSON file (the --genotype flag sets it)
    genotype: str = "paif"
    #: "aat" (default), "at" (plain adversarial training) or "clean" (no attacks; the paper's w/o AAT)
    mode: str = "aat"
    seed: int = 0
    #: deterministic kernels (bit-exact resume on CPU); on CUDA some kernels only warn
    deterministic: bool = False
    #: training length in epochs, used when max_steps is 0
    epochs: int = 10
    #: training length in optimiser steps (0: epochs × batches per epoch); sets the LR schedule
    max_steps: int = 0
    #: stop after this many steps without changing the schedule (an interruption on purpose; 0 = off)
    stop_at_step: int = 0
    #: write the resumable checkpoint every N steps (and at the last step)
    save_every_steps: int = 50
    #: fusion channel width override (null = the genotype's)
    channels: int | None = None
    #: refuse fusion widths above this (a typo such as 100000 would try to allocate ~160 GB); raise it on purpose
    max_channels: int = 1024
    #: refuse a run whose estimated training memory (parameters, activations, optimizer state: trainer.memory) is
    #: above this many GB; null = 90% of this machine's RAM, or of the GPU's memory when training on a GPU
    max_memory_gb: float | None = None
    segmenter: str = "b0"
    num_classes: int = 9
    #: pretrained SegFormer weights (local directory or cached hub id)
    pretrained: str | None = None
    #: initialise all weights from a PAIF checkpoint (same genotype), e.g. trainer.warmstart's start point
    init_from: str | None = None
    #: modalities fed to the fusion net: "both", or "ir" / "vis" for a single-modality baseline (the other one is
    #: zeroed inside the model, so training, attacks and evaluation agree)
    inputs: str = "both"
    #: the segmenter sees the fused image upsampled by this factor, 1, 2 or 4 (search_space.pipeline.segment): its
    #: logits then live at 1/4, 1/2 or full resolution of the image, for ~seg_scale² the segmenter's work
    seg_scale: int = 1
    lambda_fusion: float = 0.1
    lambda_seg: float = 4.0
    fusion_weights: FusionWeightsConfig = field(default_factory=FusionWeightsConfig)
    #: checkpoint selection metric for best.pt (higher is better); mode ``fusion``: one of FUSION_MONITORS (lower is
    #: better; a segmentation metric there becomes val/fusion_loss_adv with attack.fusion_eps > 0, else val/fusion_loss)
    monitor: str = "val/miou_adv"
    #: "auto", "cpu", "gpu"/"cuda"
    accelerator: str = "auto"
    #: devices (processes) per node; devices x num_nodes > 1 trains with DDP (gloo on CPU, nccl on GPU)
    devices: int = 1
    #: machines taking part (launched by torchrun, srun or Lightning's NODE_RANK/MASTER_ADDR variables)
    num_nodes: int = 1
    #: "auto" = bf16-mixed on CUDA, 32-true on CPU; or any Lightning precision string
    precision: str = "auto"
    #: torch.compile the model (GPU)
    compile: bool = False
    #: CPU threads for torch (0 = torch's default); bit-exact resume needs the same value
    num_threads: int = 0
    runs_root: str = "runs"
    run_name: str = "retrain"
    #: the run folder itself (default: runs_root/<run_name>-<mode>-<time>); with several nodes every node must
    #: name the same folder on a shared filesystem (default there: runs_root/<run_name>-<mode>-<launcher job id>)
    run_dir: str | None = None
    progress_bar: bool = True
    log_every_steps: int = 10
    #: at a non-finite loss or gradient: "stop" with an error naming the step (default), or "skip" the step (no
    #: weight update, counted in the log) and stop only after nan_max_skips skipped steps in a row
    nan_policy: str = "stop"
    nan_max_skips: int = 10
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    attack: TrainAttackConfig = field(default_factory=TrainAttackConfig)
    aat: AATConfig = field(default_factory=AATConfig)
    val: ValConfig = field(default_factory=ValConfig)

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        require(self.max_steps >= 0, "max_steps", "an integer >= 0 (0 = epochs x batches per epoch)", self.max_steps)
        require(self.stop_at_step >= 0, "stop_at_step", "an integer >= 0 (0 = off)", self.stop_at_step)
        if self.channels is not None:
            check_channels(self.channels, self.max_channels, "channels")
        check_memory_limit(self.max_memory_gb)
        if self.mode == "fusion" and self.monitor not in FUSION_MONITORS:
            self.monitor = FUSION_MONITORS[1] if self.attack.fusion_eps > 0 else FUSION_MONITORS[0]
        allowed = FUSION_MONITORS if self.mode == "fusion" else METRICS
        require(self.monitor in allowed, "monitor", f"one of {list(allowed)}", self.monitor, f"mode {self.mode}")
        from search_space.pipeline import INPUTS, check_seg_scale

        check_choice(self.inputs, INPUTS, "inputs")
        check_seg_scale(self.seg_scale, "seg_scale")
        check_nan_policy(self.nan_policy, self.nan_max_skips)
        require(self.num_classes >= 1, "num_classes", "an integer >= 1", self.num_classes)
        require(self.log_every_steps >= 1, "log_every_steps", "an integer >= 1", self.log_every_steps)
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.attack.kind not in ATTACK_KINDS:
            raise ValueError(f"attack.kind: expected one of {ATTACK_KINDS}, got {self.attack.kind!r}")
        if self.attack.steps < 1:
            raise ValueError(f"attack.steps: expected >= 1, got {self.attack.steps}")
        if self.val.threat:
            from robustness.threats import resolve_threat

            resolve_threat(self.val.threat)  # ThreatError (a ValueError) names the known threats
        require(self.num_nodes >= 1, "num_nodes", "an integer >= 1", self.num_nodes)
        if self.data.batch_size < 1 or self.devices < 1 or self.save_every_steps < 1:
            raise ValueError("expected data.batch_size, devices and save_every_steps >= 1, got "
                             f"{self.data.batch_size}, {self.devices}, {self.save_every_steps}")


# ----------------------------------------------------------------------------------------------------
# Data: resumable order and keyed augmentation
# ----------------------------------------------------------------------------------------------------
class EpochKeyedDataset(Dataset):
    """``dataset[(epoch, index)]``: sets the base dataset's augmentation epoch, then returns ``base[index]``.

    ``RGBTDataset`` draws its crop / flip from ``(seed, epoch, index)``; carrying the epoch in the key makes
    a sample independent of worker processes and of when ``set_epoch`` was called.
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(int(epoch))
        return self.base[int(index)]


class StepBatchSampler(Sampler):
    """Batches of ``(epoch, index)`` keys whose order is a pure function of ``(seed, epoch)``.

    An epoch has ``len(self) = num_items // (batch_size · world_size)`` full batches (the rest is dropped)
    of a permutation drawn per epoch; rank r takes every ``world_size``-th batch slot. Iteration starts at
    the global step returned by ``step_fn()`` at ``iter()`` time (epoch = step // len, offset = step % len),
    so a run resumed at step k yields exactly the batches an uninterrupted run would from step k on.

    Args:
        num_items: dataset size.
        batch_size: images per batch and rank.
        seed: data-order seed.
        rank, world_size: data-parallel position.
        step_fn: returns the number of optimiser steps already taken (``trainer.global_step``).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 step_fn: Callable[[], int] = lambda: 0) -> None:
        self.num_items, self.batch_size = int(num_items), int(batch_size)
        self.seed, self.rank, self.world_size, self.step_fn = int(seed), int(rank), int(world_size), step_fn
        if len(self) < 1:
            raise ValueError(
                f"training set: expected at least batch_size x devices = {batch_size * world_size} images for "
                f"one step, got {num_items}; lower data.batch_size or add images")

    def __len__(self) -> int:
        return self.num_items // (self.batch_size * self.world_size)

    def order(self, epoch: int) -> Tensor:
        """The permutation of epoch ``epoch`` (identical on every rank)."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, "order", epoch))
        return torch.randperm(self.num_items, generator=gen)

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[tuple[int, int]]]:
        perm = self.order(epoch)
        for b in range(start, len(self)):
            lo = (b * self.world_size + self.rank) * self.batch_size
            yield [(epoch, int(i)) for i in perm[lo:lo + self.batch_size]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = divmod(int(self.step_fn()), len(self))
        return self.batches(epoch, start)


class StepDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`StepBatchSampler`; resumable in Lightning's sense.

    Its position needs no saved state (the sampler derives it from the restored global step), so
    ``state_dict`` only records the order's seed and ``load_state_dict`` checks it.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"order": "step", "seed": self.batch_sampler.seed, "world_size": self.batch_sampler.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        if state.get("seed") != mine["seed"] or state.get("world_size") != mine["world_size"]:
            log.warning("resuming with a different data order (seed/world size %s -> %s): the run will not "
                        "replay the interrupted one exactly", state, mine)


def warmup_poly(step: int, total: int, warmup: int, warmup_start: float = 0.01, power: float = 1.0,
                min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from ``warmup_start`` to 1 over ``warmup`` steps, then poly decay
    ``(1 − (step − warmup) / (total − warmup))^power``, floored at ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return warmup_start + (1.0 - warmup_start) * step / warmup
    span = max(1, total - warmup)
    frac = min(1.0, max(0.0, (step - warmup) / span))
    return max(min_ratio, (1.0 - frac) ** power)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ----------------------------------------------------------------------------------------------------
# The Lightning module
# ----------------------------------------------------------------------------------------------------
class RetrainModule(pl.LightningModule):
    """Joint training of ``FusionSegModel`` (fixed fusion net + SegFormer) in mode clean / at / aat.

    Args:
        model: the ``FusionSegModel`` (``model(ir, vis) -> FusionSegOutput``).
        genotype: its ``Genotype`` (stored in every checkpoint).
        cfg: the resolved :class:`RetrainConfig`.
        run_dir: where ``best.pt`` / ``last.pt`` (PAIF checkpoint format) are written by rank 0.
        train_set, val_set: ``RGBTDataset``-like datasets (dicts with ir, vis, label, name).
    """

    def __init__(self, model: torch.nn.Module, genotype: Any, cfg: RetrainConfig, run_dir: str | Path,
                 train_set: Dataset, val_set: Dataset | None = None) -> None:
        super().__init__()
        self.model = model
        self.genotype = genotype
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.train_set = EpochKeyedDataset(train_set)
        self.val_set = val_set
        self.fusion_only = cfg.mode == "fusion"
        if self.fusion_only:  # the fusion loss alone (weight 1), labels ignored; the segmenter never runs
            self.task_loss = TaskLoss(1.0, 0.0, fusion_weights=vars(cfg.fusion_weights))
            self.objective = fusion_objective(self.task_loss)
            model.segmenter.requires_grad_(False)
            net: torch.nn.Module = FusionOnly(model)  # the fusion half; shares the weights
        else:
            self.task_loss = TaskLoss(cfg.lambda_fusion, cfg.lambda_seg, fusion_weights=vars(cfg.fusion_weights))
            self.objective = task_objective(self.task_loss)
            net = model
        #: what the loss, the attacks and validation run. Not registered as a submodule: its weights are
        #: ``model``'s, and the state dict keeps one name per weight (``model.*``), as before mode=fusion existed,
        #: so resume checkpoints of either version load (see :meth:`on_load_checkpoint`)
        object.__setattr__(self, "net", net)
        a = cfg.aat
        self.sampler = (AdaptiveEpsSampler(a.eps, a.prob_mode, a.temperature, a.momentum)
                        if cfg.mode == "aat" else None)
        self.pretext_done = cfg.mode != "aat" or a.meta_iters == 0
        self.best_score = -math.inf
        self.cm_clean = ConfusionMatrix(cfg.num_classes)
        self.cm_adv = ConfusionMatrix(cfg.num_classes)
        self.fusion_val: dict[str, list[float]] = {"clean": [], "adv": []}
        self.fusion_meter = FusionMetrics()
        #: the newest checkpoint written from finite weights (named when the training diverges)
        self.last_good: str | None = None
        #: (step, metrics) of the latest validation, kept in the final last.pt
        self.last_metrics: tuple[int, dict[str, float]] = (0, {})
        #: seconds of training (from the start of ``fit``'s training loop, AAT pretext included) in earlier
        #: invocations, restored from a resume checkpoint: the work after that checkpoint was lost and is redone
        self.train_seconds_before = 0.0
        self._fit_started: float | None = None
        self._last_parts: dict[str, Tensor] = {}
        self._loss_ok = True
        #: nan_policy: stop at a non-finite loss / gradient norm, or skip such steps (counted)
        self.guard = StepGuard(cfg.nan_policy, cfg.nan_max_skips)
        self._val_finite = torch.ones((), dtype=torch.bool)

    # -- sizes -----------------------------------------------------------------------------------------
    def batches_per_epoch(self, world_size: int = 1) -> int:
        return len(self.train_set) // (self.cfg.data.batch_size * world_size)

    def total_steps(self, world_size: int = 1) -> int:
        """The training length in optimiser steps (it fixes the LR schedule)."""
        return self.cfg.max_steps or self.cfg.epochs * self.batches_per_epoch(world_size)

    # -- data --------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.global_rank
        sampler = StepBatchSampler(len(self.train_set), self.cfg.data.batch_size, self.cfg.seed, rank, world,
                                   step_fn=lambda: self.trainer.global_step)
        return StepDataLoader(self.train_set, batch_sampler=sampler, num_workers=self.cfg.data.num_workers,
                          collate_fn=default_collate, persistent_workers=False,
                          pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []  # type: ignore[return-value]
        n = len(self.val_set) if not self.cfg.data.val_limit else min(self.cfg.data.val_limit, len(self.val_set))
        world = self.trainer.world_size if self._trainer is not None else 1
        indices = list(range(self.global_rank, n, world))  # strided shard; the matrices are summed
        # mode fusion validates one image at a time: unlabelled folders (real pairs) hold images of many sizes
        batch = 1 if self.fusion_only else self.cfg.data.val_batch_size
        return DataLoader(self.val_set, batch_size=batch, sampler=indices,
                          num_workers=self.cfg.data.num_workers, collate_fn=default_collate)

    # -- optimisation --------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        o = self.cfg.optim
        opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=o.lr,
                                betas=tuple(o.betas), weight_decay=o.weight_decay)
        total = self.total_steps(self.trainer.world_size)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_poly(s, total, o.warmup_steps, o.warmup_start, o.poly_power, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # -- attacks and the robust objective -------------------------------------------------------------------
    def make_attack(self, eps: float, generator: torch.Generator | None) -> Any:
        """The training attack of budget ``eps`` bound to the (unwrapped) model."""
        from robustness.attacks import FGSM, PGD

        a = self.cfg.attack
        loss = "fusion" if self.fusion_only else "seg"  # fusion: label-free, moves the fused image off the clean one
        common = dict(targets=tuple(a.targets), loss=loss, generator=generator, model_mode=a.model_mode)
        if a.kind == "fgsm":
            return FGSM(self.net, eps=eps, alpha=1.25 * eps, random_start=True, keep_best=False, **common)
        # the last iterate, as in Madry et al.'s adversarial training (best-iterate selection is for evaluation)
        return PGD(self.net, eps=eps, alpha=a.alpha_factor * eps / a.steps, steps=a.steps, random_start=True,
                   keep_best=False, **common)

    def robust_loss(self, batch: dict[str, Any], eps: float | None, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``L(u) + λ·L(u + δ_eps)`` (or ``L(u)`` when ``eps`` is None) and its detached parts.

        :func:`trainer.robust_objective.robust_loss` with weights ``(1, λ)``, the loss the search uses too: the
        fusion term of ``L(u + δ)`` compares with the clean sources; the attack runs first (it restores
        BatchNorm buffers in place, which must not happen between a forward pass that saved them and its
        backward).
        """
        attack = None if eps is None else self.make_attack(eps, generator)
        adv_weight = self.cfg.attack.adv_weight if attack is not None else 0.0
        out = robust_loss(self.net, self.objective, batch, attack, 1.0, adv_weight)
        p = out.parts
        logs = {"loss_clean": p["clean"], "seg": p["clean_seg"], "fusion": p["clean_fusion"]}
        if attack is not None:
            logs["loss_adv"] = p["adv"]
        return out.loss, logs

    def _generator(self, *keys: Any) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(mix_seed(self.cfg.seed, *keys))

    # -- AAT pretext stage ---------------------------------------------------------------------------------
    def _pretext_batch(self, meta_iter: int, task: int, step: int) -> dict[str, Any]:
        keys = (meta_iter, task, step, self.global_rank)
        gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, "pretext-data", *keys))
        idx = torch.randperm(len(self.train_set), generator=gen)[: self.cfg.data.batch_size]
        epoch = PRETEXT_EPOCH_OFFSET + (meta_iter * len(self.cfg.aat.eps) + task) * self.cfg.aat.inner_steps + step
        batch = default_collate([self.train_set[(epoch, int(i))] for i in idx])
        return _to_device(batch, self.device)

    def _average_across_ranks(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        if not _distributed():
            return state
        world = dist.get_world_size()
        for t in state.values():
            if t.is_floating_point():
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t.div_(world)
            else:
                dist.broadcast(t, src=0)
        return state

    def run_pretext(self) -> None:
        """Reptile over the attack tasks (DESIGN §7, stage 1); initialises the sampler's running losses."""
        cfg = self.cfg.aat

        calls = [0]  # inner-step counter: every inner step gets its own random streams
        cleans: list[float] = []  # clean loss of every inner step (the sampler's clean reference)

        def objective(model: torch.nn.Module, batch: dict[str, Any], eps: float) -> tuple[Tensor, float]:
            keys = (calls[0], self.global_rank)
            calls[0] += 1
            torch.manual_seed(mix_seed(self.cfg.seed, "pretext-rng", *keys))
            loss, logs = self.robust_loss(batch, eps, self._generator("pretext-attack", *keys))
            cleans.append(float(logs["loss_clean"]))
            return loss, float(logs["loss_adv"])

        def report(it: int, losses: list[float]) -> None:
            for e, l in zip(cfg.eps, losses):
                self._log_scalar(f"aat/pretext_loss_adv_eps{e * 255:.0f}", l, it)

        self.model.train()
        with self.trainer.precision_plugin.forward_context():
            losses = pretext_initialise(self.model, cfg, objective, self._pretext_batch,
                                        average=self._average_across_ranks, on_meta_iter=report, guard=self.guard)
        if losses and self.sampler is not None:
            # the last meta-iteration's inner steps, task-major: task k owns steps k·n .. k·n + n - 1
            n = cfg.inner_steps
            last = cleans[-n * len(cfg.eps):]
            clean = [sum(last[k * n:(k + 1) * n]) / n for k in range(len(cfg.eps))]
            mean = torch.tensor([losses, clean], dtype=torch.float64, device=self.device)
            if _distributed():
                dist.all_reduce(mean)
                mean /= dist.get_world_size()
            for k, (adv_k, clean_k) in enumerate(zip(*mean.tolist())):
                self.sampler.update(k, adv_k, clean_k)
        self.pretext_done = True

    def train_seconds(self) -> float:
        """Training time so far over every invocation: the restored :attr:`train_seconds_before` plus the time
        since this invocation's training loop started (work lost to an interruption after the last resume
        checkpoint is not counted; its redoing is)."""
        now = 0.0 if self._fit_started is None else time.monotonic() - self._fit_started
        return self.train_seconds_before + now

    def on_train_start(self) -> None:
        self._fit_started = time.monotonic()
        if not self.pretext_done:
            log.info("AAT pretext stage: %d Reptile meta-iterations over eps %s", self.cfg.aat.meta_iters,
                     [round(e * 255, 2) for e in self.cfg.aat.eps])
            self.run_pretext()

    # -- training -----------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        step, rank = self.global_step, self.global_rank
        torch.manual_seed(mix_seed(self.cfg.seed, "step", step, rank))  # dropout / drop-path
        gen = self._generator("attack", step, rank)
        eps, task = None, None
        if self.cfg.mode == "at":
            eps = self.cfg.attack.at_eps
        elif self.fusion_only:
            eps = self.cfg.attack.fusion_eps or None
        elif self.cfg.mode == "aat":
            task = self.sampler.sample(mix_seed(self.cfg.seed, "eps", step))  # same draw on every rank
            eps = self.sampler.eps[task]
        loss, logs = self.robust_loss(batch, eps, gen)
        where = f"training step {step}" + ("" if eps is None else f" (eps {eps * 255:.1f}/255)")
        self._loss_ok = True
        if not _distributed():  # under DDP a NaN of one rank reaches every rank's gradients: the norm check stops all
            self._loss_ok = self.guard.check(loss, logs, where, self.last_good)
        self._last_parts = {"loss": loss.detach(), **logs}
        bs = batch["ir"].shape[0]
        if self._loss_ok:  # a skipped step (nan_policy=skip) logs no NaN
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
            for k, v in logs.items():
                self.log(f"train/{k}", v, batch_size=bs)
        if eps is not None:
            self.log("train/eps_255", float(eps * 255), batch_size=bs)
        if task is not None:
            adv = self.trainer.strategy.reduce(logs["loss_adv"].float(), reduce_op="mean")
            clean = self.trainer.strategy.reduce(logs["loss_clean"].float(), reduce_op="mean")
            self.sampler.update(task, float(adv), float(clean))
            for e, p in zip(self.sampler.eps, self.sampler.probabilities().tolist()):
                self.log(f"aat/p_eps{e * 255:.0f}", p, batch_size=bs)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop at a non-finite gradient norm (before clipping and the step, so the weights stay finite).

        With ``nan_policy=skip`` a step whose loss or gradient norm is not finite is skipped instead: every gradient
        is dropped, so AdamW leaves every weight and moment unchanged (the LR schedule and the global step still
        advance: the data order and ``--resume`` stay exact). Not checked under a gradient scaler (``16-mixed``),
        which skips such steps itself.
        """
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        ok = self._loss_ok and self.guard.check(grad_norm(self.model.parameters()), self._last_parts,
                                                f"training step {self.global_step}", self.last_good,
                                                what="gradient norm")
        if ok:
            self.guard.good_step()
        else:
            for p in self.model.parameters():
                p.grad = None

    # -- validation ---------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.cm_clean.reset()
        self.cm_adv.reset()
        self.fusion_val = {"clean": [], "adv": []}
        self.fusion_meter.reset()
        self._val_finite = torch.ones((), dtype=torch.bool, device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        from robustness.attacks import PGD

        if self.fusion_only:
            return self._fusion_validation_step(batch, batch_idx)
        ir, vis, label = batch["ir"], batch["vis"], batch["label"]
        out = self.model(ir, vis)
        v = self.cfg.val
        if v.threat:
            from robustness.threats import build_threat

            attack = build_threat(v.threat, self.model, model_mode="eval")
        else:
            attack = PGD(self.model, eps=v.attack_eps, alpha=v.attack_alpha, steps=v.attack_steps,
                         random_start=True, generator=self._generator("val", batch_idx, self.global_rank),
                         model_mode="eval")
        ir_a, vis_a = attack(ir, vis, label)
        out_a = self.model(ir_a, vis_a)
        self.cm_clean.update(out.logits.float(), label)
        self.cm_adv.update(out_a.logits.float(), label)
        # a diverged model predicts one class from NaN logits and still scores a finite mIoU; read once per epoch
        self._val_finite &= torch.isfinite(out.logits).all()
        if batch_idx == 0 and self.global_rank == 0 and v.num_images > 0:
            self._log_pictures(batch, out, out_a, ir_a, vis_a)

    def _fusion_validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Mode ``fusion``: fusion loss of the clean and of the attacked input (label-free PGD of ``val``), both
        against the clean sources, and the nine fusion metrics of the clean fused images."""
        from robustness.attacks import PGD

        ir, vis = batch["ir"], batch["vis"]
        clean = {"ir": ir, "vis": vis}
        out = self.net(ir, vis)
        self.fusion_val["clean"] += self.task_loss(out, ir, vis, None, per_image=True)[0].tolist()
        v = self.cfg.val
        if v.attack_eps > 0:
            attack = PGD(self.net, eps=v.attack_eps, alpha=v.attack_alpha, steps=max(1, v.attack_steps),
                         random_start=True, loss="fusion", model_mode="eval",
                         generator=self._generator("val", batch_idx, self.global_rank))
            ir_a, vis_a = attack(ir, vis)
            out_a = self.net(ir_a, vis_a)
            self.fusion_val["adv"] += self.task_loss(out_a, clean["ir"], clean["vis"], None, per_image=True)[0].tolist()
        if v.fusion_metrics:
            from rgbt.color import rgb_to_y

            self.fusion_meter.update(out.fused_y.float().clamp(0, 1), ir, rgb_to_y(vis))
        self._val_finite &= torch.isfinite(out.fused_y).all()

    def _fusion_metrics(self) -> dict[str, float]:
        """Mode ``fusion``: mean validation fusion loss (clean, attacked) over all ranks, and the fusion metrics."""
        sums = torch.tensor([sum(self.fusion_val["clean"]), len(self.fusion_val["clean"]),
                             sum(self.fusion_val["adv"]), len(self.fusion_val["adv"])], dtype=torch.float64,
                            device=self.device)
        if _distributed():
            dist.all_reduce(sums)
        clean_sum, n_clean, adv_sum, n_adv = sums.tolist()
        metrics = {FUSION_MONITORS[0]: clean_sum / max(n_clean, 1.0),
                   FUSION_MONITORS[1]: adv_sum / n_adv if n_adv else clean_sum / max(n_clean, 1.0)}
        if self.cfg.val.fusion_metrics and len(self.fusion_meter):  # rank 0's images under DDP
            metrics.update({f"val/fusion/{k}": float(v) for k, v in self.fusion_meter.compute().items()})
        return metrics

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        if _distributed():
            flag = self._val_finite.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            self._val_finite = flag.bool()
        if not bool(self._val_finite):
            raise NonFiniteError(f"non-finite {'fused images' if self.fusion_only else 'logits'} in the validation "
                                 f"at step {self.global_step}, so neither best.pt nor last.pt is written; "
                                 f"{last_good_text(self.last_good)}; {ADVICE}")
        if self.fusion_only:
            metrics = self._fusion_metrics()
            for k, val in metrics.items():
                self.log(k, val, prog_bar=k in FUSION_MONITORS, sync_dist=False)
            log.info("step %d: validation fusion loss %.4f clean, %.4f attacked", self.global_step,
                     metrics[FUSION_MONITORS[0]], metrics[FUSION_MONITORS[1]])
            self._keep_best(-metrics[self.cfg.monitor], metrics)  # lower loss = better
            return
        metrics = {}
        for tag, cm in (("", self.cm_clean), ("_adv", self.cm_adv)):
            matrix = cm.matrix.to(self.device)
            if _distributed():
                dist.all_reduce(matrix)
            cm.matrix = matrix.cpu()
            res = cm.compute()
            metrics[f"val/miou{tag}"] = float(res["miou"])
            metrics[f"val/pixel_acc{tag}"] = float(res["pixel_acc"])
        for k, val in metrics.items():
            self.log(k, val, prog_bar=k in ("val/miou", "val/miou_adv"), sync_dist=False)
        v = self.cfg.val
        attack = v.threat or f"PGD eps {v.attack_eps * 255:.1f}/255, {v.attack_steps} steps"
        log.info("step %d: clean mIoU %.4f, attacked mIoU %.4f (%s)", self.global_step, metrics["val/miou"],
                 metrics["val/miou_adv"], attack)
        assert set(metrics) == set(METRICS), sorted(metrics)
        self._keep_best(metrics[self.cfg.monitor], metrics)  # monitor checked against METRICS at config load

    def _keep_best(self, score: float, metrics: dict[str, float]) -> None:
        """best.pt when ``score`` (higher is better) beats the best so far; last.pt always."""
        self.last_metrics = (int(self.global_step), dict(metrics))
        if not math.isnan(score) and score > self.best_score:
            self.best_score = score
            self.write_checkpoint("best.pt", metrics)
        self.write_checkpoint("last.pt", metrics)

    # -- pictures and logging -----------------------------------------------------------------------------
    def _log_scalar(self, tag: str, value: float, step: int) -> None:
        exp = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if self.global_rank == 0 and exp is not None and hasattr(exp, "add_scalar"):
            exp.add_scalar(tag, value, step)

    @torch.no_grad()
    def _log_pictures(self, batch, out, out_a, ir_a, vis_a) -> None:
        exp = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if exp is None or not hasattr(exp, "add_image"):
            return
        from rgbt.classes import colorize

        n = min(self.cfg.val.num_images, batch["ir"].shape[0])
        rows = []
        for i in range(n):
            tiles = [batch["ir"][i].expand(3, -1, -1), batch["vis"][i], out.fused_rgb[i],
                     vis_a[i], out_a.fused_rgb[i]]
            tiles = [t.float().clamp(0, 1).cpu() for t in tiles]
            for lab in (batch["label"][i], out.logits[i].argmax(0), out_a.logits[i].argmax(0)):
                tiles.append(torch.from_numpy(colorize(lab.cpu())).permute(2, 0, 1).float() / 255)
            rows.append(torch.cat(tiles, dim=2))
        grid = torch.cat(rows, dim=1)
        exp.add_image("val/ir_vis_fused_visadv_fusedadv_gt_pred_predadv", grid, self.global_step)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def write_checkpoint(self, name: str, metrics: dict[str, float] | None = None,
                         metrics_step: int | None = None) -> Path | None:
        """Rank 0 writes ``run_dir/name`` in the PAIF checkpoint format (``trainer.checkpoint``); ``metrics`` are
        the validation numbers of step ``metrics_step`` (default: the current step)."""
        if self.global_rank != 0:
            return None
        state = {"global_step": int(self.global_step), "epoch": int(self.current_epoch), "mode": self.cfg.mode,
                 "metrics": dict(metrics or {}),  # best_score in the monitor's units (mode fusion: the loss)
                 "metrics_step": int(self.global_step if metrics_step is None else metrics_step),
                 "best_score": float(-self.best_score if self.fusion_only else self.best_score),
                 "train_seconds": self.train_seconds()}
        if self.sampler is not None:
            state["aat_probabilities"] = self.sampler.probabilities().tolist()
        model = getattr(self.model, "_orig_mod", self.model)  # torch.compile wraps the module
        try:
            path = save_checkpoint(self.run_dir / name, model, self.genotype,
                                   {"variant": self.cfg.segmenter, "num_classes": self.cfg.num_classes},
                                   config_to_dict(self.cfg), state, card={"data": self.data_card()})
        except NonFiniteError as exc:
            raise NonFiniteError(f"{exc} at step {self.global_step}; {last_good_text(self.last_good)}; "
                                 f"{ADVICE}") from exc
        self.last_good = str(path)
        return path

    def data_card(self) -> dict[str, Any]:
        """The model card's ``data`` section: where the training and validation images came from."""
        d = self.cfg.data
        card: dict[str, Any] = {"root": d.root, "train_split": d.train_split, "train_images": len(self.train_set),
                                "labels_used": not self.fusion_only}
        if d.holdout_fraction > 0:
            card.update(val=f"{len(self.val_set) if self.val_set is not None else 0} held-out files of "
                            f"{d.train_split} (fraction {d.holdout_fraction}, seed {d.holdout_seed}; names in "
                            "split.json of the run folder)")
        elif d.val_split:
            card.update(val_split=d.val_split, val_images=len(self.val_set) if self.val_set is not None else 0)
        return card

    def on_train_end(self) -> None:
        self.train_seconds_before, self._fit_started = self.train_seconds(), None  # the clock stops here
        step, metrics = self.last_metrics
        self.write_checkpoint("last.pt", metrics, metrics_step=step)  # keeps the last validation's numbers

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["paif"] = {
            "genotype": genotype_to_dict(self.genotype),
            "mode": self.cfg.mode,
            "pretext_done": bool(self.pretext_done),
            "best_score": float(self.best_score),
            "train_seconds": self.train_seconds(),
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "nan_guard": self.guard.state_dict(),
            "config": config_to_dict(self.cfg),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the AAT state; the genotype was checked by the entry script before training started.

        Resume checkpoints written while ``net`` was a registered alias of ``model`` hold every weight twice
        (``model.*`` and ``net.*``); the ``net.*`` copies are dropped before Lightning loads the state dict.
        """
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            for key in [k for k in state if k.startswith("net.")]:
                del state[key]
        paif = checkpoint.get("paif") or {}
        self.pretext_done = bool(paif.get("pretext_done", True))
        self.best_score = float(paif.get("best_score", -math.inf))
        self.train_seconds_before = float(paif.get("train_seconds", 0.0))
        if self.sampler is not None and paif.get("sampler") is not None:
            self.sampler.load_state_dict(paif["sampler"])
        self.guard.load_state_dict(paif.get("nan_guard") or {})


class ResumeCheckpoint(pl.Callback):
    """Writes the full Lightning training state to ``path`` every ``every`` steps and at the last step.

    Saved at the end of a training batch (after the optimiser and LR-scheduler steps), atomically: a
    temporary file in the same folder, then ``os.replace`` by rank 0; all ranks wait for it. Weights holding
    NaN or inf are never saved (:class:`trainer.finite.NonFiniteError`).
    """

    def __init__(self, path: str | Path, every: int) -> None:
        self.path, self.every = Path(path), int(every)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        bad = nonfinite_tensors(pl_module.state_dict())
        last_good = getattr(pl_module, "last_good", None)
        if bad:
            raise NonFiniteError(f"refusing to write {self.path} at step {step}: {len(bad)} tensors hold NaN or "
                                 f"inf ({', '.join(bad[:4])}); {last_good_text(last_good)}; {ADVICE}")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            trainer.save_checkpoint(tmp)
        except OSError as exc:  # a full disk or a size limit: no partial file left, the error names the file
            tmp.unlink(missing_ok=True)
            raise os_error_at(exc, self.path) from exc
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
            log.info("saved resumable state at step %d to %s", step, self.path)
        trainer.strategy.barrier("resume-checkpoint")
        if hasattr(pl_module, "last_good"):
            pl_module.last_good = f"{self.path} (step {step}, --resume)"
