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
    python strategies/search.py --config configs/search.yaml devices=2       # one supernet, 2 GPUs (DDP)
    torchrun --nproc-per-node 4 strategies/search.py devices=4 run_dir=runs/search/ddp4   # or through torchrun

With ``devices`` > 1 the supernet is data-parallel (Lightning DDP under NNI's one-shot DARTS: gloo on
CPU, nccl on GPU): every process draws its own share of each epoch's images, gradients of the weights and of
the architecture parameters α are averaged, so all ranks hold the same α and weights. The effective batch is
``devices × data.batch_size``. Rank 0 writes the run folder; other ranks log to ``search.rank<r>.log``.

A run directory holds ``config.yaml`` (resolved), ``search.log``, ``search_result.json`` (probabilities per
label, argmax architecture, config; rewritten every epoch; at the end also ``selection``, the held-out adversarial
loss that ranks trials, :mod:`strategies.selection`), ``genotype.json``, ``checkpoints/`` (every epoch
and ``last.ckpt``) and ``tensorboard/`` (losses and ``prob/<label>/<op>`` every ``log_every_n_steps``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
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
from trainer.config import ConfigError, config_to_dict, load_config, save_config  # noqa: E402
from trainer.finite import NonFiniteError  # noqa: E402
from trainer.runs import (SharedRunDirError, atomic_write_text, launch_rank, seed_everything,  # noqa: E402
                         setup_logging, shared_run_dir, tune_malloc, versions)

__all__ = ["DataConfig", "SpaceConfig", "SearchConfig", "TEST_SPLITS", "holdout_split", "run_search", "prepare_data",
           "main"]

log = logging.getLogger("strategies.search")

DEFAULT_SYNTHETIC = "data/synthetic"
RUN_DIR_ENV = "PAIF_SEARCH_RUN_DIR"  # DDP: the processes Lightning launches reuse rank 0's run folder
#: split names reserved for the final evaluation: never used to train or select an architecture
TEST_SPLITS = ("test", "test_day", "test_night")


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

    def __post_init__(self) -> None:
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
    warmup_epochs: int = 0  # epochs without architecture steps
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

    def __post_init__(self) -> None:
        for name in ("w", "w_arch"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected a weight in [0, 1], got {value}")
        if self.epochs < 1:
            raise ValueError(f"epochs: expected >= 1, got {self.epochs}")
        if not isinstance(self.devices, int) or self.devices < 1:
            raise ValueError(f"devices: expected an integer >= 1 (processes of one data-parallel search), got "
                             f"{self.devices!r}")
        if self.device not in ("auto", "cpu", "gpu", "cuda"):
            raise ValueError(f"device: expected auto, cpu or gpu, got {self.device!r}")


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

    def wrap(supernet: torch.nn.Module) -> torch.nn.Module:
        return FusionSegModel(supernet, build_segmenter(s.segmenter, s.num_classes, s.pretrained))

    robust = cfg.w > 0 or cfg.w_arch > 0
    module = RobustSearchModule(
        task_objective(TaskLoss(cfg.lambda_fusion, cfg.lambda_seg)),
        build_attack_factory(cfg.attack) if robust else None,
        w=cfg.w, w_arch=cfg.w_arch, lr=cfg.lr, weight_decay=cfg.weight_decay,
    )
    return space, module, wrap


def darts_settings(cfg: SearchConfig) -> DartsSettings:
    return DartsSettings(
        epochs=cfg.epochs, arch_lr=cfg.arch_lr, grad_clip=cfg.grad_clip, warmup_epochs=cfg.warmup_epochs,
        log_every_n_steps=cfg.log_every_n_steps, max_train_batches=cfg.max_train_batches,
        accelerator=_accelerator(cfg.device), devices=cfg.devices, precision=cfg.precision,
        deterministic=cfg.deterministic,
        seed=cfg.seed, progress_bar=cfg.progress_bar,
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
    genotype.to_json(path)
    return path


def run_search(cfg: SearchConfig, run_dir: str | Path, resume: str | Path | None = None,
               callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run (or resume) the search of ``cfg`` in ``run_dir``; returns the final ``search_result.json`` dict."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
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
    atomic_write_text(json.dumps(result, indent=2) + "\n", run_dir / RESULT_NAME)
    genotype = write_genotype(result, run_dir)
    log.info("search done: %s%s", result["architecture"], f" -> {genotype}" if genotype else "")
    return result


def _global_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def main(argv: list[str] | None = None) -> int:
    tune_malloc()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: configs/search.yaml, or the run's config.yaml)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the search in RUN_DIR from checkpoints/last.ckpt")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. w_arch=1 attack.eps=0.0157")
    args = parser.parse_args(argv)
    resume = None
    try:
        if args.resume:
            run_dir = Path(args.resume)
            resume = run_dir / "checkpoints" / "last.ckpt"
            if not resume.is_file():
                raise ConfigError(f"--resume {run_dir}: expected {resume}, got no such file; start a new search")
            cfg = load_config(SearchConfig, args.config or run_dir / "config.yaml",
                              list(args.overrides) + [f"run_dir={run_dir}"])
        else:
            cfg = load_config(SearchConfig, args.config or "configs/search.yaml", args.overrides)
            run_dir = (Path(cfg.run_dir) if cfg.run_dir else
                       shared_run_dir(cfg.run_root, "search", cfg.devices, launch_rank(cfg.devices), RUN_DIR_ENV))
            cfg.run_dir = str(run_dir)
    except (ConfigError, SharedRunDirError) as exc:
        parser.error(str(exc))
    rank = launch_rank(cfg.devices)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # the processes Lightning starts for devices > 1 write here too
    setup_logging(run_dir, filename="search.log" if rank == 0 else f"search.rank{rank}.log")
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "versions.json").write_text(json.dumps(versions(), indent=2) + "\n")
    try:
        result = run_search(cfg, run_dir, resume=resume)
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    print(json.dumps({"run_dir": str(run_dir), "result": str(run_dir / RESULT_NAME),
                      "architecture": result["architecture"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
