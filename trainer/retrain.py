"""Retrain a searched fusion genotype jointly with SegFormer, with adaptive adversarial training (AAT).

PAIF: Liu et al., "PAIF: Perception-Aware Infrared-Visible Image Fusion for Attack-Tolerant Semantic
Segmentation", ACM MM 2023 (arXiv 2308.03979), §3.3 and DESIGN.md §7.

Commands::

    python -m rgbt.synthetic --out data/synthetic            # the embedded synthetic dataset
    python trainer/retrain.py --genotype out.json            # AAT (default): Reptile pretext + adaptive eps
    python trainer/retrain.py --genotype paif mode=at        # plain adversarial training, eps 8/255
    python trainer/retrain.py --genotype paif --no-aat       # no attacks (the paper's "w/o AAT")
    python trainer/retrain.py --genotype paif mode=fusion data.root=../shared/data/real_rgbt \
        data.holdout_fraction=0.2 data.crop=[96,128]          # fusion net only, unlabelled pairs, 20 % held out
    python trainer/retrain.py --genotype paif mode=fusion attack.fusion_eps=0.0314 ...  # + label-free fusion attack
    python trainer/retrain.py --genotype paif --config configs/retrain.yaml epochs=20 data.crop=[96,128]
    python trainer/retrain.py --resume runs/retrain-aat-20250101-120000  # continue exactly where it stopped
                                              # (settings that change the run are refused: RESUME_SAFE)
    python trainer/retrain.py --genotype paif devices=2 accelerator=cpu  # DDP (gloo on CPU, nccl on GPU)

Several machines (``devices`` = processes per node, ``num_nodes`` = machines; one process per device, and
every node must see the same run folder, i.e. a shared filesystem)::

    torchrun --nnodes 2 --node-rank R --nproc-per-node 4 --master-addr HOST0 --master-port 29500 \
        trainer/retrain.py --genotype out.json devices=4 num_nodes=2 run_dir=/shared/runs/retrain-1
    srun python trainer/retrain.py --genotype out.json devices=4 num_nodes=2   # in an sbatch script with
        # --nodes=2 --ntasks-per-node=4 (one task per device); the folder is runs/retrain-<mode>-$SLURM_JOB_ID
    NODE_RANK=R MASTER_ADDR=HOST0 MASTER_PORT=29500 python trainer/retrain.py ... devices=4 num_nodes=2 \
        run_dir=/shared/runs/retrain-1          # Lightning's own launcher: one command per node

Every run writes into ``runs/<run_name>-<time>/``: ``config.yaml`` (resolved), ``genotype.json``,
``run.log``, TensorBoard logs in ``tb/`` (losses, clean and attacked validation mIoU, AAT probabilities,
sample pictures), ``best.pt`` / ``last.pt`` (PAIF checkpoint format, ``trainer.checkpoint.load_model``)
and ``resume.ckpt`` (the full training state for ``--resume``). It prints a JSON summary at the end. Before
anything is built, a run whose estimated memory (``trainer.memory``) exceeds ``max_memory_gb`` is refused; before
training, every training and validation file is validated once (cached; ``--skip-data-check`` skips it). Bad input,
bad data, a diverged run or a file-system error end with one line ``error: ...`` and exit code 2; the run folder is
then marked ``FAILED`` (``trainer.errors``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from search_space.genotype import GenotypeError
from trainer.checkpoint import CheckpointError, genotype_to_dict, load_checkpoint, read_torch_file, resolve_genotype
from trainer.config import (check_channels, check_resume_settings, config_to_dict, load_config, parse_overrides,
                            save_config)
from trainer.datacheck import check_datasets
from trainer.errors import PaifError, entry_point
from trainer.memory import (MemoryEstimate, check_memory, estimate_training_memory, first_image_size, size_label,
                            step_graphs)
from trainer.module import MODES, ResumeCheckpoint, RetrainConfig, RetrainModule
from trainer.runs import (SharedRunDirError, atomic_write_text, launch_rank, launcher_job_id, no_shared_run_dir,
                          seed_everything, setup_logging, shared_run_dir, tune_malloc, use_run_dir)

log = logging.getLogger("trainer.retrain")

RESUME_FILE = "resume.ckpt"
#: settings a resumed run may change: how it is watched, logged and stopped, not what it computes (num_threads
#: changes floating-point summation order, so a resumed run is then close to, not bit-identical with, an
#: uninterrupted one); every other setting is refused (trainer.config.check_resume_settings)
RESUME_SAFE = ("stop_at_step", "save_every_steps", "progress_bar", "log_every_steps", "num_threads", "runs_root",
               "run_name", "max_channels", "max_memory_gb", "nan_policy", "nan_max_skips", "data.check",
               "data.num_workers", "val.num_images", "genotype", "init_from", "pretrained")
_RUN_DIR_ENV = "PAIF_RETRAIN_RUN_DIR"  # DDP: the child processes Lightning launches reuse rank 0's folder


class RetrainError(PaifError, ValueError):
    """Bad input to the retrain entry point (genotype, checkpoint, config)."""


# ----------------------------------------------------------------------------------------------- inputs
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python trainer/retrain.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genotype", help="genotype JSON file (derive/export_genotype.py) or a built-in name (paif)")
    p.add_argument("--config", help="YAML config (default: configs/retrain.yaml values are the dataclass defaults)")
    p.add_argument("--resume", help="run folder or resume.ckpt to continue exactly")
    p.add_argument("--no-aat", action="store_true", help="train without attacks (alias of mode=clean)")
    p.add_argument("--skip-data-check", action="store_true",
                   help="do not validate every data file before training (alias of data.check=false)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. epochs=5 data.batch_size=2")
    return p.parse_intermixed_args(argv)  # flags may follow key=value overrides


def _resume_paths(resume: str) -> tuple[Path, Path]:
    """(checkpoint file, run folder) of a ``--resume`` argument."""
    path = Path(resume)
    ckpt = path / RESUME_FILE if path.is_dir() else path
    if not ckpt.is_file():
        raise RetrainError(f"--resume {resume}: expected a run folder holding {RESUME_FILE} or the file itself, "
                           f"got no such file {ckpt}")
    return ckpt, ckpt.parent


def _genotype_key(genotype: Any) -> dict[str, Any]:
    d = genotype_to_dict(genotype)
    d.pop("version", None)
    return d


def _check_same_genotype(genotype: Any, stored: Any, where: str) -> None:
    if stored is None:
        raise RetrainError(f"{where}: expected a stored genotype, got none; was it written by trainer/retrain.py?")
    if _genotype_key(genotype) != _genotype_key(stored):
        raise RetrainError(f"genotype does not match {where}: expected {_genotype_key(stored)} (the checkpoint's), "
                           f"got {_genotype_key(genotype)}; pass the genotype the checkpoint was trained with")


def resolve_inputs(args: argparse.Namespace) -> tuple[RetrainConfig, Any, Path | None, Path | None]:
    """Config, genotype, resume checkpoint and run folder; every check that can fail runs here, before training.

    Raises:
        RetrainError / ConfigError / GenotypeError / CheckpointError with a message saying what to do.
    """
    overrides = parse_overrides(args.overrides)
    if args.no_aat:
        if overrides.get("mode", "clean") != "clean":
            raise RetrainError(f"--no-aat means mode=clean, got also mode={overrides['mode']}; drop one of them")
        overrides["mode"] = "clean"
    if args.skip_data_check:
        overrides["data.check"] = False
    if "mode" in overrides and overrides["mode"] not in MODES:
        raise RetrainError(f"mode: expected one of {MODES}, got {overrides['mode']!r}")
    resume_ckpt = run_dir = None
    stored = None
    config_path = args.config
    if args.resume:
        resume_ckpt, run_dir = _resume_paths(args.resume)
        stored = read_torch_file(resume_ckpt, "a resume.ckpt written by trainer/retrain.py")
        stored = stored.get("paif") if isinstance(stored, dict) else None
        if stored is None:
            raise RetrainError(f"--resume {resume_ckpt}: expected a checkpoint written by trainer/retrain.py "
                               "(with a 'paif' section), got another file")
        if config_path is None and (run_dir / "config.yaml").is_file():
            config_path = run_dir / "config.yaml"
        overrides.setdefault("stop_at_step", 0)  # a deliberately stopped run continues to its full length
    if args.genotype:
        overrides["genotype"] = args.genotype
    elif stored is not None:
        overrides.setdefault("genotype", json.dumps(stored["genotype"]))
    cfg = load_config(RetrainConfig, config_path, overrides)
    try:
        genotype = resolve_genotype(_genotype_spec(cfg.genotype), channels=cfg.channels)
    except (GenotypeError, CheckpointError) as exc:
        raise RetrainError(f"genotype {cfg.genotype!r}: {exc}") from exc
    try:
        check_channels(genotype.channels, cfg.max_channels, f"genotype {cfg.genotype!r}: channels")
    except ValueError as exc:
        raise RetrainError(str(exc)) from exc
    check_training_memory(cfg, genotype)
    if stored is not None:
        _check_same_genotype(genotype, stored["genotype"], f"the resumed checkpoint {resume_ckpt}")
        if stored.get("mode") != cfg.mode:
            raise RetrainError(f"mode does not match the resumed checkpoint {resume_ckpt}: expected "
                               f"{stored.get('mode')!r}, got {cfg.mode!r}")
        if stored.get("config") is not None:
            check_resume_settings(stored["config"], config_to_dict(cfg), RESUME_SAFE, str(run_dir),
                                  config_to_dict(type(cfg)()))
    if cfg.num_nodes > 1 and resume_ckpt is None and not cfg.run_dir and launcher_job_id() is None:
        raise RetrainError(_no_shared_run_dir(cfg))  # every node stops here, none waits for the others
    if cfg.init_from:
        meta = load_checkpoint(cfg.init_from)
        _check_same_genotype(genotype, meta["genotype"], f"init_from={cfg.init_from}")
        start_scale = (meta.get("model") or {}).get("seg_scale", 1)
        if start_scale != cfg.seg_scale:  # allowed (fine-tuning at another scale), but usually a forgotten setting
            log.warning("init_from=%s was built with seg_scale=%s, this run uses seg_scale=%s (its segmenter learnt "
                        "on images at another scale)", cfg.init_from, start_scale, cfg.seg_scale)
    return cfg, genotype, resume_ckpt, run_dir


def train_size(cfg: RetrainConfig) -> tuple[int, int] | None:
    """(height, width) of a training sample: ``data.crop``, else the first training image's (its header only); None
    when the training split cannot be read (the data error then comes from :func:`build_datasets`, before any model)."""
    if cfg.data.crop is not None:
        return int(cfg.data.crop[0]), int(cfg.data.crop[1])
    return first_image_size(cfg.data.root, cfg.data.train_split)


def training_graphs(cfg: RetrainConfig) -> int:
    """Forward passes a training step keeps at once: the clean one, and the attacked one in modes at / aat (and in
    mode fusion with ``attack.fusion_eps`` > 0)."""
    attacked = cfg.mode in ("at", "aat") or (cfg.mode == "fusion" and cfg.attack.fusion_eps > 0)
    return step_graphs(1.0, attacked)


def check_training_memory(cfg: RetrainConfig, genotype: Any) -> MemoryEstimate:
    """Refuse a run whose estimated memory (``trainer.memory``) exceeds ``max_memory_gb``; nothing big is allocated.

    Raises:
        MemoryLimitError: naming the estimate's parts, the batch, crop and channels, and what to change.
    """
    size = train_size(cfg)
    gpu = _accelerator(cfg) == "gpu"
    estimate = estimate_training_memory(
        genotype, cfg.data.batch_size, *(size or (0, 0)), segmenter=None if cfg.mode == "fusion" else cfg.segmenter,
        num_classes=cfg.num_classes, inputs=cfg.inputs, seg_scale=cfg.seg_scale, graphs=training_graphs(cfg),
        processes=1 if gpu else cfg.devices)  # DDP on CPU: one process per device, all in this machine's RAM
    check_memory(estimate, cfg.max_memory_gb, "channels", gpu=gpu, size_label=size_label(cfg.data.crop, size))
    log.debug("estimated training memory %s", estimate.describe())
    return estimate


def _genotype_spec(text: str) -> Any:
    """A genotype name, JSON file path, or inline JSON object (what a resumed config stores)."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise RetrainError(f"genotype: expected a JSON object, got {text[:80]!r} ({exc})") from exc
    return text


# ----------------------------------------------------------------------------------------------- setup
def build_datasets(cfg: RetrainConfig) -> tuple[Any, Any]:
    """(train, val) datasets; labels are required except in mode ``fusion``.

    With ``data.holdout_fraction`` > 0 both come from ``data.train_split``: a deterministic held-out part
    (``strategies.search.holdout_split``, salted with ``data.holdout_seed``) validates, the rest trains.
    """
    from rgbt.dataset import RGBTDataset, RGBTSubset

    d = cfg.data
    labels = cfg.mode != "fusion"
    train = RGBTDataset(d.root, d.train_split, crop=d.crop, flip=d.flip, seed=cfg.seed, require_labels=labels)
    if d.holdout_fraction > 0:
        train_idx, held_idx = holdout_indices(train.names, d.holdout_fraction, d.holdout_seed)
        return RGBTSubset(train, train_idx), RGBTSubset(RGBTDataset(d.root, d.train_split, require_labels=labels),
                                                        held_idx)
    val = RGBTDataset(d.root, d.val_split, require_labels=labels) if d.val_split else None
    return train, val


def holdout_indices(names: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) indices of ``names``: the search's file-name-hash split with salt ``holdout-<seed>``."""
    from strategies.search import holdout_split

    try:
        return holdout_split(names, fraction, salt=f"holdout-{seed}")
    except ValueError as exc:
        raise RetrainError(f"data.holdout_fraction={fraction}: {exc}") from exc


def write_split(run_dir: Path, cfg: RetrainConfig, train_set: Any, val_set: Any) -> None:
    """``split.json``: the file names of the training and held-out parts (mode of the split, fraction, seed)."""

    d = cfg.data
    split = {"root": d.root, "split": d.train_split, "holdout_fraction": d.holdout_fraction,
             "holdout_seed": d.holdout_seed, "salt": f"holdout-{d.holdout_seed}", "train": list(train_set.names),
             "held_out": list(val_set.names) if val_set is not None else []}
    atomic_write_text(json.dumps(split, indent=2) + "\n", run_dir / "split.json")


def build_network(cfg: RetrainConfig, genotype: Any) -> torch.nn.Module:
    from search_space.pipeline import build_model

    start = load_checkpoint(cfg.init_from) if cfg.init_from else None
    # the start's segmenter head width (trainer.warmstart seg.decoder_hidden_size); pretrained weights bring their own
    decoder = None if start is None or cfg.pretrained else start["segmenter"].get("decoder_hidden_size")
    model = build_model(genotype, segmenter=cfg.segmenter, num_classes=cfg.num_classes, pretrained=cfg.pretrained,
                        decoder_hidden_size=decoder, inputs=cfg.inputs,
                        seg_scale=cfg.seg_scale)  # both checked when the config is loaded
    if start is not None:
        state = start["state_dict"]
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise RetrainError(f"init_from={cfg.init_from}: weights do not match the model: {exc}") from exc
        log.info("initialised the weights from %s", cfg.init_from)
    return model


def _accelerator(cfg: RetrainConfig) -> str:
    acc = cfg.accelerator.lower()
    if acc == "cuda":
        acc = "gpu"
    if acc == "auto":
        acc = "gpu" if torch.cuda.is_available() else "cpu"
    return acc


def build_trainer(cfg: RetrainConfig, run_dir: Path, total_steps: int, steps_per_epoch: int) -> Any:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger
    from pytorch_lightning.strategies import DDPStrategy

    acc = _accelerator(cfg)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16-mixed" if acc == "gpu" else "32-true")
    strategy: Any = "auto"
    if cfg.devices * cfg.num_nodes > 1:
        strategy = DDPStrategy(process_group_backend="gloo" if acc == "cpu" else "nccl")
    deterministic: Any = cfg.deterministic and (True if acc == "cpu" else "warn")
    max_steps = min(cfg.stop_at_step, total_steps) if cfg.stop_at_step > 0 else total_steps
    val_kwargs: dict[str, Any] = {}
    if cfg.val.every_n_steps > 0:
        val_kwargs = {"val_check_interval": cfg.val.every_n_steps, "check_val_every_n_epoch": None}
    return pl.Trainer(
        accelerator=acc, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy, precision=precision,
        # max_steps ends the run; max_epochs only bounds it (one spare: a run resumed from a checkpoint
        # written at an epoch's last batch replays that epoch index with the next epoch's batches)
        max_steps=max_steps, max_epochs=-(-total_steps // steps_per_epoch) + 1, deterministic=deterministic or None,
        logger=TensorBoardLogger(str(run_dir), name="tb", version="", default_hp_metric=False),
        callbacks=[ResumeCheckpoint(run_dir / RESUME_FILE, cfg.save_every_steps)],
        enable_checkpointing=False, enable_progress_bar=cfg.progress_bar, enable_model_summary=False,
        num_sanity_val_steps=0, gradient_clip_val=cfg.optim.grad_clip or None,
        log_every_n_steps=cfg.log_every_steps, inference_mode=False, use_distributed_sampler=False,
        default_root_dir=str(run_dir), **val_kwargs,
    )


def _run_dir(cfg: RetrainConfig, resume_dir: Path | None, rank: int) -> Path:
    """The run folder, the same one for every rank of a distributed run: the ``--resume`` folder, else
    ``run_dir``, else :func:`trainer.runs.shared_run_dir` (Lightning's children, torchrun / SLURM job id,
    or a new time-stamped folder). Rank 0 alone registers it, so a failed run is marked ``FAILED`` once
    (:func:`trainer.runs.use_run_dir`)."""
    if resume_dir is not None:
        return use_run_dir(resume_dir, rank)
    if cfg.run_dir:
        return use_run_dir(cfg.run_dir, rank)
    try:
        return shared_run_dir(cfg.runs_root, f"{cfg.run_name}-{cfg.mode}", cfg.devices * cfg.num_nodes, rank,
                              _RUN_DIR_ENV)
    except SharedRunDirError as exc:
        raise RetrainError(str(exc)) from exc


def _no_shared_run_dir(cfg: RetrainConfig) -> str:
    return no_shared_run_dir(cfg.devices * cfg.num_nodes, f" (num_nodes={cfg.num_nodes})")


# ----------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Resolve inputs, train, return the summary (raises on bad input before training starts)."""
    cfg, genotype, resume_ckpt, resume_dir = resolve_inputs(args)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    train_set, val_set = build_datasets(cfg)
    if cfg.data.check and os.environ.get("LOCAL_RANK", "0") == "0":  # DDP children: rank 0 checked already
        check_datasets([train_set, val_set], progress=cfg.progress_bar)
    seed_everything(cfg.seed, deterministic=cfg.deterministic)
    model = build_network(cfg, genotype)
    if cfg.compile:
        model = torch.compile(model)  # type: ignore[assignment]

    rank = launch_rank(cfg.devices)
    child = rank != 0
    run_dir = _run_dir(cfg, resume_dir, rank)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, filename=f"run.rank{rank}.log" if child else "run.log")
    if not child:
        save_config(cfg, run_dir / "config.yaml")
        atomic_write_text(json.dumps(genotype_to_dict(genotype), indent=2) + "\n", run_dir / "genotype.json")
        if cfg.data.holdout_fraction > 0:
            write_split(run_dir, cfg, train_set, val_set)
    os.environ[_RUN_DIR_ENV] = str(run_dir)

    module = RetrainModule(model, genotype, cfg, run_dir, train_set, val_set)
    if resume_ckpt is not None:
        module.last_good = f"{resume_ckpt} (--resume)"
    world = cfg.devices * cfg.num_nodes
    total = module.total_steps(world)
    log.info("retrain mode=%s genotype=%s: %d steps (%d per epoch), run folder %s%s", cfg.mode,
             _genotype_key(genotype), total, module.batches_per_epoch(world), run_dir,
             f", resuming from {resume_ckpt}" if resume_ckpt else "")
    trainer = build_trainer(cfg, run_dir, total, module.batches_per_epoch(world))
    try:
        trainer.fit(module, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    finally:
        os.environ.pop(_RUN_DIR_ENV, None)
    return {
        "run_dir": str(run_dir), "mode": cfg.mode, "global_step": int(trainer.global_step),
        "total_steps": total, "best": str(run_dir / "best.pt") if (run_dir / "best.pt").exists() else None,
        "last": str(run_dir / "last.pt"), "resume": str(run_dir / RESUME_FILE),
        # in the monitor's own units (mode fusion keeps the negated loss internally: higher is better there)
        "best_score": (None if module.best_score == float("-inf")
                       else -module.best_score if cfg.mode == "fusion" else module.best_score),
        "monitor": cfg.monitor, "rank": int(trainer.global_rank),
        "train_seconds": module.train_seconds(),  # over every invocation of this run (trainer.module)
    }


@entry_point
def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 with one line on stderr for bad input, bad data, divergence or a file-system error."""
    tune_malloc()
    summary = run(parse_args(argv))
    if summary["rank"] == 0:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
