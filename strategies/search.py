"""Robust differentiable search of the PAIF fusion network (NNI 3.0 DARTS, no NNI manager needed).

PAIF: Liu et al., "PAIF: Perception-Aware Infrared-Visible Image Fusion for Attack-Tolerant Semantic
Segmentation", ACM MM 2023 (arXiv 2308.03979). Weights minimise ``(1-w)·L(u) + w·L(u+δ)`` on the training
split, the architecture the same form with ``w_arch`` on the held-out split; ``δ`` is PGD (3 steps, ε 8/255)
or FGSM with a random start against the current supernet; ``L = λ_f·L_fusion + λ_s·CE``.

Commands::

    python strategies/search.py --config configs/search.yaml                 # runs/search/search-<time>/
    python strategies/search.py --config configs/search.yaml w_arch=1 attack.name=fgsm epochs=2
    python strategies/search.py --resume runs/search/search-<time> [epochs=20]   # continue (last.ckpt)
    python -m strategies.nni_local create --config search.yml                # the same under nnictl
    python strategies/search.py --config configs/search_converge.yaml init_from=<segformer dir or start .pt>
    python strategies/search.py --config configs/search.yaml devices=2       # one supernet, 2 GPUs (DDP)
    torchrun --nproc-per-node 4 strategies/search.py devices=4 run_dir=runs/search/ddp4   # or through torchrun

The converging regime (``configs/search_converge.yaml``, README "Search quality"): weight warm-up epochs
without architecture steps, hundreds of architecture steps at an ``arch_lr`` that moves α by whole units, the
segmenter started from the warm start of retraining (``init_from``), optional Gumbel sampling
(``strategy=gumbel``) and DARTS+ early stopping on argmax stability (``stop_when_stable``).

With ``devices`` > 1 the supernet is data-parallel (Lightning DDP under NNI's one-shot DARTS: gloo on
CPU, nccl on GPU): every process draws its own share of each epoch's images, gradients of the weights and of
the architecture parameters α are averaged, so all ranks hold the same α and weights. The effective batch is
``devices × data.batch_size``. Rank 0 writes the run folder; other ranks log to ``search.rank<r>.log``.

A run directory holds ``config.yaml`` (resolved), ``search.log``, ``search_result.json`` (probabilities per
label, argmax architecture, config; rewritten every epoch; at the end also ``selection``, the held-out adversarial
loss that ranks trials, :mod:`strategies.selection`), ``genotype.json``, ``checkpoints/`` (``last.ckpt`` and
the ``keep_checkpoints`` best epochs by the epoch's held-out adversarial loss), ``tensorboard/`` (losses and ``prob/<label>/<op>`` every ``log_every_n_steps``; per-slot
``alpha/entropy/<label>`` and ``alpha/top/<label>`` every epoch) and ``alpha.png`` (α over the search). The result
carries ``history`` (probabilities per epoch), ``convergence`` (argmax last changed, stable epochs, final entropy
and top probability per slot, share of parameter-light ops) and ``cost`` (CPU minutes).

Settings are checked when the config is loaded, and a search whose estimated memory (``trainer.memory``) exceeds
``max_memory_gb`` is refused before anything is built; every training and held-out file is validated before the search
(cached; ``--skip-data-check`` skips it). ``--resume`` refuses settings that change the run (only those in
``RESUME_SAFE`` may change, e.g. ``epochs`` to search longer). Bad input, bad data, a diverged search or a file-system
error end with one line ``error: ...`` and exit code 2 (``trainer.errors``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Subset

if __package__ in (None, ""):  # `python strategies/search.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strategies.darts import RESULT_NAME, DartsSettings, EpochShuffleSampler, run_darts  # noqa: E402
from strategies.objective import AttackConfig, build_attack_factory, task_objective  # noqa: E402
from strategies.search_module import RobustSearchModule  # noqa: E402
from strategies.selection import SelectionConfig, heldout_adv_loss  # noqa: E402
from trainer.checkpoint import read_torch_file  # noqa: E402
from trainer.config import (ConfigError, check_budget, check_channels, check_choice, check_crop, check_lr,  # noqa: E402
                            check_memory_limit, check_nan_policy, check_resume_settings, config_to_dict, finite,
                            load_config, require, save_config)
from trainer.errors import entry_point  # noqa: E402
from trainer.memory import (MemoryEstimate, check_memory, estimate_search_memory, first_image_size,  # noqa: E402
                            size_label, step_graphs)
from trainer.runs import (atomic_write_text, launch_rank, seed_everything, setup_logging,  # noqa: E402
                          shared_run_dir, tune_malloc, use_run_dir, versions)

__all__ = ["DataConfig", "SpaceConfig", "SearchConfig", "TEST_SPLITS", "RESUME_SAFE", "holdout_split", "run_search",
           "prepare_data", "check_search_data", "check_search_memory", "main"]

log = logging.getLogger("strategies.search")

DEFAULT_SYNTHETIC = "data/synthetic"
RUN_DIR_ENV = "PAIF_SEARCH_RUN_DIR"  # DDP: the processes Lightning launches reuse rank 0's run folder
#: split names reserved for the final evaluation: never used to train or select an architecture
TEST_SPLITS = ("test", "test_day", "test_night")
#: settings a resumed search may change (the rest change what it computes and are refused): its length (the
#: optimisers have no schedule, so more epochs continue the same search), what is logged and kept, and the final
#: selection metric (computed once, after the search)
RESUME_SAFE = ("epochs", "progress_bar", "threads", "run_dir", "run_root", "log_every_n_steps", "keep_checkpoints",
               "nan_policy", "nan_max_skips", "max_channels", "max_memory_gb", "data.check", "data.num_workers",
               "data.generate_synthetic", "selection.*")


@dataclass
class DataConfig:
    root: str = DEFAULT_SYNTHETIC  # MSRS / MFNet layout root; the synthetic set is generated here if missing
    layout: str = "auto"
    train_split: str = "train"  # weights are trained on this split ...
    #: ... the architecture on this held-out split; never a test split. When it equals train_split, a
    #: deterministic holdout_fraction of the training file names is held out (see holdout_split) and the
    #: weight step trains on the rest (MSRS has no val split)
    val_split: str = "val"
    holdout_fraction: float = 0.5  # share of train_split held out when val_split == train_split
    holdout_salt: str = "paif-search-holdout"  # changes which images are held out (the choice stays deterministic)
    crop: tuple[int, int] | None = (128, 160)  # random crop (h, w); None keeps full images
    flip: bool = True
    batch_size: int = 4
    num_workers: int = 0
    generate_synthetic: bool = True  # generate the synthetic dataset into `root` when it does not exist
    synthetic_counts: tuple[int, int, int] = (48, 16, 16)  # train, val, test scenes when generating
    synthetic_size: tuple[int, int] = (128, 160)
    #: validate every file of both splits before the search (cached; false or --skip-data-check skips it)
    check: bool = True

    def __post_init__(self) -> None:
        check_crop(self.crop, "data.crop")
        require(self.batch_size >= 1, "data.batch_size", "an integer >= 1", self.batch_size)
        require(self.num_workers >= 0, "data.num_workers", "an integer >= 0", self.num_workers)
        check_choice(self.layout, ("auto", "msrs", "mfnet", "pairs"), "data.layout")
        for key in ("train_split", "val_split"):
            if getattr(self, key) in TEST_SPLITS:
                raise ValueError(
                    f"data.{key}: expected a training or validation split, got {getattr(self, key)!r}, a test split "
                    "that the evaluation reports on (selecting on it leaks the test set); use data.val_split=val, "
                    "or data.val_split=train with data.holdout_fraction to hold out part of the training split")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"data.holdout_fraction: expected a fraction in (0, 1), got {self.holdout_fraction}")


def holdout_split(names: Sequence[str], fraction: float, salt: str = "paif-search-holdout"
                  ) -> tuple[list[int], list[int]]:
    """Deterministic split of a split's file names into (weight-step indices, held-out indices).

    Names are ranked by ``sha256(salt + ":" + name)`` and the first ``round(fraction·n)`` (at least 1, at most
    n - 1) are held out: the choice depends only on the names and the salt, not on listing order, process or
    seed. Both index lists are returned sorted.

    Raises:
        ValueError: fewer than 2 names, duplicate names, or ``fraction`` outside (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout_split: expected a fraction in (0, 1), got {fraction}")
    if len(names) < 2:
        raise ValueError(f"holdout_split: expected at least 2 images to split into weight and held-out parts, "
                         f"got {len(names)}; add images or use a separate val_split")
    if len(set(names)) != len(names):
        raise ValueError("holdout_split: expected unique file names, got duplicates")
    rank = sorted(range(len(names)), key=lambda i: hashlib.sha256(f"{salt}:{names[i]}".encode()).hexdigest())
    n_held = min(len(names) - 1, max(1, round(fraction * len(names))))
    held = sorted(rank[:n_held])
    return sorted(rank[n_held:]), held


@dataclass
class SpaceConfig:
    channels: int = 16  # fusion width during the search (the derived net may be retrained wider)
    steps: int = 2  # ops per chain cell
    candidates: list[str] | None = None  # None: search_space.ops.DEFAULT_CANDIDATES
    rules: list[str] | None = None  # None: search_space.cells.DEFAULT_RULES
    segmenter: str = "b0"
    pretrained: str | None = None  # local dir / hub id of ImageNet MiT weights
    num_classes: int = 9
    seg_scale: int = 1  # the segmenter sees the fused image upsampled by 1, 2 or 4 (search_space.pipeline.segment)

    def __post_init__(self) -> None:
        from search_space.cells import FUSION_RULES
        from search_space.ops import OPS
        from search_space.segmenter import MIT_VARIANTS

        require(self.steps >= 1, "space.steps", "an integer >= 1 (ops per chain cell)", self.steps)
        require(self.num_classes >= 1, "space.num_classes", "an integer >= 1", self.num_classes)
        unknown = [c for c in self.candidates or [] if c not in OPS]
        require(not unknown, "space.candidates", f"names in search_space.ops.OPS (e.g. {sorted(OPS)[:3]})", unknown)
        unknown = [r for r in self.rules or [] if r not in FUSION_RULES]
        require(not unknown, "space.rules", f"names among {sorted(FUSION_RULES)}", unknown)
        check_choice(self.segmenter.lower().removeprefix("mit-"), MIT_VARIANTS, "space.segmenter")
        from search_space.pipeline import check_seg_scale

        check_seg_scale(self.seg_scale, "space.seg_scale")


@dataclass
class SearchConfig:
    data: DataConfig = field(default_factory=DataConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # the metric that ranks finished searches
    w: float = 0.5  # robustness weight of the weight step
    w_arch: float = 0.5  # robustness weight of the architecture step
    lambda_fusion: float = 0.1
    lambda_seg: float = 4.0
    epochs: int = 10
    max_train_batches: int | None = None  # DARTS iterations per epoch (None: whole training split)
    lr: float = 1e-3  # Adam, network weights
    weight_decay: float = 3e-4
    arch_lr: float = 3e-4  # Adam(β=(0.5, 0.999), wd 1e-3), architecture (NNI DARTS)
    grad_clip: float | None = 5.0
    warmup_epochs: int = 0  # epochs without architecture steps (weights only), DARTS' warm-up
    strategy: str = "darts"  # darts (softmax mixture) | gumbel (NNI GumbelDARTS: Gumbel-softmax sampling, GDAS/SNAS)
    gumbel_temperature: tuple[float, float] = (1.0, 0.33)  # strategy=gumbel: initial, final temperature
    stop_when_stable: int | None = None  # DARTS+ early stop: architecture epochs with an unchanged argmax
    #: start the supernet's segmenter from a warm start: a SegFormer folder (config.json + weights, e.g. the
    #: segformer-<hash>/ of trainer.warmstart) or a PAIF checkpoint .pt (its segmenter.* weights only; the fusion
    #: supernet has other parameters than any fixed net). None: random segmenter (or space.pretrained)
    init_from: str | None = None
    log_every_n_steps: int = 10  # TensorBoard cadence of losses and probabilities
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | gpu
    devices: int = 1  # > 1: the supernet data-parallel over this many processes (DDP); set run_dir too
    precision: str = "32-true"  # or bf16-mixed on GPUs
    threads: int | None = None  # torch CPU threads (None: torch default)
    run_root: str = "runs/search"
    run_dir: str | None = None  # None: <run_root>/search-<timestamp>
    progress_bar: bool = True
    #: best epoch checkpoints kept beside last.ckpt, ranked by the epoch's mean held-out adversarial loss (the
    #: per-epoch NNI metric); 0 = last.ckpt only, -1 = every epoch's (each holds the whole supernet + SegFormer)
    keep_checkpoints: int = 1
    #: refuse a search width above this (a memory guard; raise it on purpose)
    max_channels: int = 1024
    #: refuse a search whose estimated memory (supernet parameters, activations of every candidate op, optimizer
    #: state: trainer.memory) is above this many GB; null = 90% of this machine's RAM, or of the GPU's memory on a GPU
    max_memory_gb: float | None = None
    #: at a non-finite loss or gradient: "stop" (default) or "skip" the step, stopping after nan_max_skips in a row
    nan_policy: str = "stop"
    nan_max_skips: int = 10

    def __post_init__(self) -> None:
        for name in ("w", "w_arch"):
            value = getattr(self, name)
            require(finite(value) and 0.0 <= value <= 1.0, name, "a weight in [0, 1]", value)
        require(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        require(isinstance(self.devices, int) and not isinstance(self.devices, bool) and self.devices >= 1, "devices",
                "an integer >= 1 (processes of one data-parallel search)", self.devices)
        check_choice(self.device, ("auto", "cpu", "gpu", "cuda"), "device")
        check_lr(self.lr, "lr")
        require(finite(self.arch_lr) and self.arch_lr >= 0, "arch_lr", "a number >= 0 (0 freezes the architecture)",
                self.arch_lr)
        require(finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0",
                self.weight_decay)
        require(self.grad_clip is None or (finite(self.grad_clip) and self.grad_clip > 0), "grad_clip",
                "null (off) or a number > 0", self.grad_clip)
        for name in ("lambda_fusion", "lambda_seg"):
            require(finite(getattr(self, name)) and getattr(self, name) >= 0, name, "a number >= 0",
                    getattr(self, name))
        require(self.max_train_batches is None or self.max_train_batches >= 1, "max_train_batches",
                "null (the whole split) or an integer >= 1", self.max_train_batches)
        require(0 <= self.warmup_epochs < self.epochs, "warmup_epochs",
                f"an integer in [0, epochs) = [0, {self.epochs}) so that architecture steps run", self.warmup_epochs)
        require(self.log_every_n_steps >= 1, "log_every_n_steps", "an integer >= 1", self.log_every_n_steps)
        require(self.threads is None or self.threads >= 1, "threads", "null or an integer >= 1", self.threads)
        require(self.keep_checkpoints >= -1, "keep_checkpoints",
                "an integer >= -1 (best epochs kept beside last.ckpt; 0 = none, -1 = all)", self.keep_checkpoints)
        check_channels(self.space.channels, self.max_channels, "space.channels")
        check_memory_limit(self.max_memory_gb)
        check_budget(self.attack.eps, "attack.eps")
        if self.attack.alpha is not None:
            check_budget(self.attack.alpha, "attack.alpha", "a step size")
        check_nan_policy(self.nan_policy, self.nan_max_skips)
        check_choice(self.strategy, ("darts", "gumbel"), "strategy")
        require(self.stop_when_stable is None or self.stop_when_stable >= 1, "stop_when_stable",
                "null or an integer >= 1 (epochs)", self.stop_when_stable)
        require(self.init_from is None or self.space.pretrained is None, "init_from",
                "at most one source of segmenter weights (init_from or space.pretrained)",
                (self.init_from, self.space.pretrained))


def _ensure_data(cfg: DataConfig) -> Path:
    root = Path(cfg.root)
    if not root.exists() and cfg.generate_synthetic:
        from rgbt.synthetic import generate_dataset

        n_train, n_val, n_test = cfg.synthetic_counts
        log.info("%s does not exist: generating the synthetic dataset (%d/%d/%d scenes, %dx%d)", root,
                 n_train, n_val, n_test, *cfg.synthetic_size)
        generate_dataset(root, n_train=n_train, n_val=n_val, n_test=n_test, size=tuple(cfg.synthetic_size), seed=0)
    return root


def search_datasets(cfg: DataConfig, seeds: tuple[int, int], flip: bool | None = None) -> tuple[list[Any], list[Any]]:
    """([weight-step base, held-out base], [weight-step part, held-out part]) datasets.

    The bases are ``RGBTDataset`` objects (augmentation seeds ``seeds``; ``flip`` None = ``cfg.flip``); the parts
    are the bases themselves, or, with ``val_split == train_split``, disjoint subsets of the training split
    (:func:`holdout_split`).
    """
    from rgbt.dataset import RGBTDataset

    root = _ensure_data(cfg)
    flip = cfg.flip if flip is None else flip
    bases = [RGBTDataset(root, split=split, crop=cfg.crop, flip=flip, layout=cfg.layout, seed=seed)
             for split, seed in zip((cfg.train_split, cfg.val_split), seeds)]
    if cfg.val_split != cfg.train_split:
        return bases, list(bases)
    weight_idx, held_idx = holdout_split(bases[0].names, cfg.holdout_fraction, cfg.holdout_salt)
    return bases, [Subset(bases[0], weight_idx), Subset(bases[1], held_idx)]


def prepare_data(cfg: DataConfig, seed: int) -> tuple[Any, Any, bool]:
    """Training and held-out loaders (dict batches) and whether the data has labels.

    With ``val_split == train_split`` the two loaders read disjoint parts of that split
    (:func:`holdout_split`); otherwise the whole ``train_split`` and the whole ``val_split``.
    """
    from nni.nas.evaluator.pytorch import DataLoader

    bases, parts = search_datasets(cfg, (seed, seed + 1))
    if cfg.val_split == cfg.train_split:
        log.info("held out %d of %d %r images for the architecture step (fraction %.2f, salt %r)",
                 len(parts[1]), len(bases[0]), cfg.train_split, cfg.holdout_fraction, cfg.holdout_salt)
    loaders = []
    for i, (ds, part) in enumerate(zip(bases, parts)):
        sampler = EpochShuffleSampler(len(part), seed=seed + i, dataset=ds)
        loaders.append(DataLoader(part, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                                  drop_last=len(part) >= cfg.batch_size, persistent_workers=cfg.num_workers > 0))
    has_labels = bases[0].has_labels and bases[1].has_labels
    return loaders[0], loaders[1], has_labels


def check_search_data(cfg: DataConfig, progress: bool = True) -> None:
    """Validate every file of the training and held-out splits (:func:`trainer.datacheck.check_datasets`).

    Raises:
        DataError: listing every bad file of both splits.
    """
    from trainer.datacheck import check_datasets

    bases, _ = search_datasets(cfg, (0, 1))
    splits = bases if cfg.val_split != cfg.train_split else bases[:1]
    check_datasets(splits, progress=progress)


def search_size(cfg: DataConfig) -> tuple[int, int] | None:
    """(height, width) of a training sample: ``crop``, else the first training image's (its header only), or the size
    the synthetic set would be generated at; None when the training split cannot be read (the data check reports it)."""
    if cfg.crop is not None:
        return int(cfg.crop[0]), int(cfg.crop[1])
    if not Path(cfg.root).exists() and cfg.generate_synthetic:
        return int(cfg.synthetic_size[0]), int(cfg.synthetic_size[1])
    return first_image_size(cfg.root, cfg.train_split, cfg.layout)


def check_search_memory(cfg: SearchConfig) -> MemoryEstimate:
    """Refuse a search whose estimated memory (``trainer.memory``: the supernet runs every candidate op) exceeds
    ``max_memory_gb``; called when the config is loaded, before any data or model is built.

    Raises:
        MemoryLimitError: naming the estimate's parts, the batch, crop and channels, and what to change.
    """
    from search_space.cells import DEFAULT_RULES
    from search_space.ops import DEFAULT_CANDIDATES

    s = cfg.space
    graphs = max(step_graphs(1.0 - w, w > 0) for w in (cfg.w, cfg.w_arch))  # clean and attacked passes of a step
    size = search_size(cfg.data)
    gpu = _accelerator(cfg.device) == "gpu"
    estimate = estimate_search_memory(s.channels, s.steps, s.candidates or DEFAULT_CANDIDATES,
                                      s.rules or DEFAULT_RULES, cfg.data.batch_size, *(size or (0, 0)),
                                      segmenter=s.segmenter.lower().removeprefix("mit-"), num_classes=s.num_classes,
                                      seg_scale=s.seg_scale, graphs=graphs,
                                      processes=1 if gpu else cfg.devices)  # CPU DDP: all in this RAM
    check_memory(estimate, cfg.max_memory_gb, "space.channels", gpu=gpu, size_label=size_label(cfg.data.crop, size))
    log.debug("estimated search memory %s", estimate.describe())
    return estimate


def selection_loader(cfg: DataConfig, seed: int) -> Any:
    """The held-out part in a fixed order, no flips, crops from ``seed`` (the same pixels in every trial)."""
    bases, parts = search_datasets(cfg, (seed, seed), flip=False)
    bases[1].set_epoch(0)
    return torch.utils.data.DataLoader(parts[1], batch_size=cfg.batch_size, shuffle=False,
                                       num_workers=cfg.num_workers)


def _accelerator(device: str) -> str:
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if device in ("gpu", "cuda") else "cpu"


def build_search(cfg: SearchConfig, has_labels: bool = True) -> tuple[Any, RobustSearchModule, Any]:
    """(FusionSpace, the robust Lightning module, wrap(supernet) -> FusionSegModel) for ``cfg``."""
    from search_space.cells import DEFAULT_RULES
    from search_space.fusion_space import FusionSpace
    from search_space.ops import DEFAULT_CANDIDATES
    from search_space.pipeline import FusionSegModel
    from search_space.segmenter import build_segmenter
    from trainer.losses import TaskLoss

    if not has_labels and cfg.attack.loss == "seg" and (cfg.w > 0 or cfg.w_arch > 0):
        raise ConfigError("the dataset has no labels but attack.loss=seg; set attack.loss=fusion (label-free)")
    space = FusionSpace(channels=cfg.space.channels, steps=cfg.space.steps,
                        candidates=tuple(cfg.space.candidates or DEFAULT_CANDIDATES),
                        rules=tuple(cfg.space.rules or DEFAULT_RULES))
    s = cfg.space
    seg_dir, seg_state = segmenter_init(cfg.init_from) if cfg.init_from else (s.pretrained, None)

    def wrap(supernet: torch.nn.Module) -> torch.nn.Module:
        model = FusionSegModel(supernet, build_segmenter(s.segmenter, s.num_classes, seg_dir), seg_scale=s.seg_scale)
        if seg_state is not None:
            try:
                model.segmenter.load_state_dict(seg_state, strict=True)
            except RuntimeError as exc:
                raise ConfigError(f"init_from={cfg.init_from}: its segmenter does not match space.segmenter="
                                  f"{s.segmenter} with {s.num_classes} classes: {str(exc).splitlines()[0]}") from exc
        if cfg.init_from:
            log.info("segmenter initialised from %s", cfg.init_from)
        # from_pretrained returns the segmenter in eval mode and Lightning keeps modes as found: train everything
        return model.train()

    robust = cfg.w > 0 or cfg.w_arch > 0
    module = RobustSearchModule(
        task_objective(TaskLoss(cfg.lambda_fusion, cfg.lambda_seg)),
        build_attack_factory(cfg.attack) if robust else None,
        w=cfg.w, w_arch=cfg.w_arch, lr=cfg.lr, weight_decay=cfg.weight_decay,
        nan_policy=cfg.nan_policy, nan_max_skips=cfg.nan_max_skips,
    )
    return space, module, wrap


def segmenter_init(init_from: str) -> tuple[str | None, dict[str, torch.Tensor] | None]:
    """(SegFormer folder, None) or (None, segmenter state dict) for ``init_from`` (see :class:`SearchConfig`).

    Raises:
        ConfigError: neither a folder with ``config.json`` nor a readable PAIF checkpoint holding segmenter weights.
    """
    path = Path(init_from)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"init_from={init_from}: expected a SegFormer folder with config.json (e.g. "
                              "runs/cache/segformer-<hash>/ of trainer.warmstart) or a PAIF checkpoint .pt, got a "
                              "folder without config.json")
        return str(path), None
    from trainer.checkpoint import CheckpointError, load_checkpoint

    try:
        state = load_checkpoint(path)["state_dict"]
    except CheckpointError as exc:
        raise ConfigError(f"init_from={init_from}: expected a SegFormer folder or a PAIF checkpoint .pt: {exc}") from exc
    seg = {k.removeprefix("segmenter."): v for k, v in state.items() if k.startswith("segmenter.")}
    if not seg:
        raise ConfigError(f"init_from={init_from}: expected segmenter.* weights in the checkpoint, got none")
    return None, seg


def darts_settings(cfg: SearchConfig) -> DartsSettings:
    from search_space.ops import DEFAULT_CANDIDATES
    from strategies.convergence import light_ops

    return DartsSettings(
        epochs=cfg.epochs, arch_lr=cfg.arch_lr, grad_clip=cfg.grad_clip, warmup_epochs=cfg.warmup_epochs,
        log_every_n_steps=cfg.log_every_n_steps, max_train_batches=cfg.max_train_batches,
        accelerator=_accelerator(cfg.device), devices=cfg.devices, precision=cfg.precision,
        deterministic=cfg.deterministic, seed=cfg.seed, progress_bar=cfg.progress_bar,
        keep_checkpoints=cfg.keep_checkpoints, strategy=cfg.strategy,
        gumbel_temperature=tuple(cfg.gumbel_temperature), stop_when_stable=cfg.stop_when_stable,
        light_ops=tuple(light_ops(cfg.space.candidates or DEFAULT_CANDIDATES, cfg.space.channels)),
    )


def write_genotype(result: dict[str, Any], run_dir: Path) -> Path | None:
    """``run_dir/genotype.json`` from the argmax architecture (None if it is not a FusionSpace result)."""
    from search_space.genotype import Genotype, GenotypeError

    try:
        genotype = Genotype.from_sample(result["architecture"], channels=int(result["channels"]))
    except (GenotypeError, KeyError) as exc:
        log.warning("no genotype written: %s", exc)
        return None
    path = run_dir / "genotype.json"
    atomic_write_text(genotype.to_json(), path)
    return path


def run_search(cfg: SearchConfig, run_dir: str | Path, resume: str | Path | None = None,
               callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run (or resume) the search of ``cfg`` in ``run_dir``; returns the final ``search_result.json`` dict."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cpu0 = time.process_time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.data.check:
        check_search_data(cfg.data, cfg.progress_bar)
    seed_everything(cfg.seed, cfg.deterministic)
    train_loader, val_loader, has_labels = prepare_data(cfg.data, cfg.seed)
    space, module, wrap = build_search(cfg, has_labels)
    extra = {"space": "FusionSpace", "channels": cfg.space.channels, "steps": cfg.space.steps}
    log.info("search: w=%.3g w_arch=%.3g attack=%s, %d train / %d held-out batches per epoch, run dir %s",
             cfg.w, cfg.w_arch, cfg.attack, len(train_loader), len(val_loader), run_dir)
    result = run_darts(space, module, train_loader, val_loader, run_dir, darts_settings(cfg), config_to_dict(cfg),
                       wrap=wrap, resume=resume, callbacks=callbacks, extra=extra)
    if _global_rank() != 0:  # DDP: the weights are rank 0's too; it alone scores and writes the result
        return result
    result["selection"] = heldout_adv_loss(module.model, selection_loader(cfg.data, cfg.selection.seed),
                                           cfg.selection, has_labels)
    # CPU minutes (all threads): everything this process did (data, model, loop, selection metric) plus the
    # search loop of earlier processes when the run was resumed
    cost = result.setdefault("cost", {})
    cost["cpu_minutes"] = cost.get("earlier_processes_cpu_minutes", 0.0) + (time.process_time() - cpu0) / 60
    atomic_write_text(json.dumps(result, indent=2) + "\n", run_dir / RESULT_NAME)
    genotype = write_genotype(result, run_dir)
    log.info("search done: %s%s", result["architecture"], f" -> {genotype}" if genotype else "")
    return result


def _global_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _resume_config(run_dir: Path, config: str | None, overrides: Sequence[str]) -> tuple[SearchConfig, Path]:
    """The config of a resumed search and its checkpoint; refuses settings that change the run (:data:`RESUME_SAFE`)."""
    from strategies.darts import CONFIG_KEY

    resume = run_dir / "checkpoints" / "last.ckpt"
    if not resume.is_file():
        raise ConfigError(f"--resume {run_dir}: expected {resume}, got no such file; start a new search")
    cfg = load_config(SearchConfig, config or run_dir / "config.yaml", list(overrides) + [f"run_dir={run_dir}"])
    stored = read_torch_file(resume, "a last.ckpt written by strategies/search.py")
    old = stored.get(CONFIG_KEY) if isinstance(stored, dict) else None
    if old is not None:
        check_resume_settings(old, config_to_dict(cfg), RESUME_SAFE, str(run_dir), config_to_dict(type(cfg)()))
    return cfg, resume


@entry_point
def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 with one line on stderr for bad input, bad data, divergence or a file-system error."""
    tune_malloc()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: configs/search.yaml, or the run's config.yaml)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the search in RUN_DIR from checkpoints/last.ckpt")
    parser.add_argument("--skip-data-check", action="store_true",
                        help="do not validate every data file first (alias of data.check=false)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. w_arch=1 attack.eps=0.0157")
    args = parser.parse_intermixed_args(argv)  # flags may follow key=value overrides
    overrides = list(args.overrides) + (["data.check=false"] if args.skip_data_check else [])
    resume = None
    if args.resume:
        cfg, resume = _resume_config(Path(args.resume), args.config, overrides)
        check_search_memory(cfg)
        rank = launch_rank(cfg.devices)
        run_dir = use_run_dir(args.resume, rank)
    else:
        cfg = load_config(SearchConfig, args.config or "configs/search.yaml", overrides)
        check_search_memory(cfg)
        rank = launch_rank(cfg.devices)  # rank 0 alone registers the folder (marked FAILED if the search fails)
        run_dir = (use_run_dir(cfg.run_dir, rank) if cfg.run_dir else
                   shared_run_dir(cfg.run_root, "search", cfg.devices, rank, RUN_DIR_ENV))
        cfg.run_dir = str(run_dir)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # the processes Lightning starts for devices > 1 write here too
    setup_logging(run_dir, filename="search.log" if rank == 0 else f"search.rank{rank}.log")
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
        atomic_write_text(json.dumps(versions(), indent=2) + "\n", run_dir / "versions.json")
    result = run_search(cfg, run_dir, resume=resume)
    if rank != 0:
        return 0
    print(json.dumps({"run_dir": str(run_dir), "result": str(run_dir / RESULT_NAME),
                      "architecture": result["architecture"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
