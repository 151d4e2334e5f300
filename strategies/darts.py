"""NNI 3.0 one-shot DARTS, driven through its Python API, with per-epoch results and resumable checkpoints.

DARTS: Liu, Simonyan, Yang, "DARTS: Differentiable Architecture Search", ICLR 2019 (first order, as in
NNI). Used by PAIF (Liu et al., ACM MM 2023) with a robust objective, see :mod:`strategies.objective`.

Wiring (NNI 3.0, nni/nas/oneshot/pytorch/strategy.py)::

    strategy = ResumableDARTS(...)                            # ResumableDARTS: same, with a stable α order
    supernet = strategy.mutate_model(space)          # LayerChoice -> DifferentiableMixedLayer (α, softmax)
    evaluator = Lightning(module, Trainer(...), train_dataloaders=train, val_dataloaders=val)
    oneshot = strategy.mutate_evaluator(evaluator)   # wraps module in DartsLightningModule; loaders ->
                                                     # {"train": train, "val": val} (Lightning CombinedLoader)
    oneshot.evaluate(wrap(supernet))                 # trainer.fit; ckpt_path in fit_kwargs resumes

The callbacks here reseed every epoch from ``(seed, epoch)`` (so a resumed run replays the same random
starts and crops), write ``search_result.json`` after every epoch, report the architecture probabilities to
NNI as intermediate results (only under ``nnictl``), and store the resolved config inside every checkpoint.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch.utils.data import Sampler

import nni
from nni.nas.evaluator.pytorch import Lightning, Trainer
from nni.nas.nn.pytorch import ModelSpace
from nni.nas.oneshot.pytorch.differentiable import DartsLightningModule
from nni.nas.strategy import DARTS

from strategies.search_module import RobustSearchModule
from trainer.runs import atomic_write_text

__all__ = [
    "ResumableDARTS",
    "RESULT_NAME",
    "RESULT_VERSION",
    "DartsSettings",
    "EpochShuffleSampler",
    "EpochSeeder",
    "SearchRecorder",
    "under_nni",
    "run_darts",
    "argmax_architecture",
]

log = logging.getLogger(__name__)

RESULT_NAME = "search_result.json"
RESULT_VERSION = 1
CONFIG_KEY = "paif_search_config"


@dataclass
class DartsSettings:
    """Trainer-level settings of one DARTS run."""

    epochs: int = 10
    arch_lr: float = 3e-4
    grad_clip: float | None = 5.0
    warmup_epochs: int = 0
    log_every_n_steps: int = 10
    max_train_batches: int | None = None  # DARTS iterations per epoch (None: the whole training split)
    accelerator: str = "cpu"
    devices: int = 1  # > 1: data-parallel supernet (Lightning DDP: gloo on CPU, nccl on GPU)
    precision: str = "32-true"
    deterministic: bool = False
    seed: int = 0
    progress_bar: bool = True


class _OrderedDartsModule(DartsLightningModule):
    """NNI's DARTS module with the architecture parameters in module order.

    NNI 3.0 returns ``list(set(alphas))``, whose order changes from process to process; the Adam state of
    the architecture optimiser then lands on the wrong tensors when a checkpoint is restored.
    """

    def arch_parameters(self) -> list[nn.Parameter]:
        params: dict[int, nn.Parameter] = {}
        for module in self.supernet_modules():
            for p in getattr(module, "arch_parameters", lambda: [])():
                params.setdefault(id(p), p)
        return list(params.values())


class ResumableDARTS(DARTS):
    """:class:`nni.nas.strategy.DARTS` whose architecture optimiser can be restored from a checkpoint."""

    def configure_oneshot_module(self, training_module: Any) -> DartsLightningModule:
        return _OrderedDartsModule(
            training_module=training_module,
            arc_learning_rate=self.arc_learning_rate,
            gradient_clip_val=self.gradient_clip_val,
            log_prob_every_n_step=self.log_prob_every_n_step,
            warmup_epochs=self.warmup_epochs,
            penalty=self.penalty,
        )


def under_nni() -> bool:
    """True inside a trial started by the NNI manager (``nnictl``), False when run standalone."""
    return nni.get_experiment_id() != "STANDALONE"


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919) % (2**31 - 1)


class EpochShuffleSampler(Sampler[int]):
    """Shuffles ``range(n)`` with a permutation that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` with the processed-epoch counter, which a checkpoint restores, so a
    resumed run sees the same order as an uninterrupted one. The epoch is passed on to ``dataset.set_epoch``
    (augmentation randomness of :class:`rgbt.dataset.RGBTDataset`) when a dataset is given.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, dataset: Any = None) -> None:
        if n <= 0:
            raise ValueError(f"EpochShuffleSampler: expected a non-empty dataset, got n={n}")
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), bool(shuffle), 0
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.dataset is not None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class EpochSeeder(pl.Callback):
    """Reseeds Python, NumPy and torch from ``(seed, epoch)`` before the first batch of every epoch.

    The first batch, not ``on_train_epoch_start``: Lightning 2.x skips the epoch-start hooks of the first
    epoch after resuming from a checkpoint written at an epoch end.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx != 0:
            return
        s = _epoch_seed(self.seed, trainer.current_epoch)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)


def argmax_architecture(probs: Mapping[str, Mapping[str, float]], exclude: Sequence[str] = ()) -> dict[str, str]:
    """``{label: op}`` with the most probable op of every label, skipping ``exclude`` (ties: first listed)."""
    arch = {}
    for label, dist in probs.items():
        allowed = [(op, p) for op, p in dist.items() if op not in set(exclude)]
        if not allowed:
            raise ValueError(
                f"argmax_architecture: expected at least one op left for {label!r}, got none after excluding "
                f"{sorted(exclude)}; exclude fewer ops"
            )
        arch[label] = max(allowed, key=lambda kv: kv[1])[0]
    return arch


def _plain_probs(probs: Mapping[str, Mapping[Any, float]]) -> dict[str, dict[str, float]]:
    return {str(label): {str(op): float(p) for op, p in dist.items()} for label, dist in probs.items()}


class SearchRecorder(pl.Callback):
    """Writes ``search_result.json`` after every epoch and reports the probabilities to NNI.

    Args:
        run_dir: the run directory.
        config: the resolved config (plain dict), copied into the result and into every checkpoint.
        extra: more fields for the result (e.g. ``channels`` needed by the genotype).
    """

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.config = dict(config)
        self.extra = dict(extra or {})
        self.last_result: dict[str, Any] | None = None

    def result(self, trainer: pl.Trainer, oneshot: Any) -> dict[str, Any]:
        probs = _plain_probs(oneshot.export_probs())
        inner = oneshot.training_module
        metrics = inner.epoch_means() if isinstance(inner, RobustSearchModule) else {}
        epoch = trainer.current_epoch + 1  # epochs completed
        return {
            "version": RESULT_VERSION,
            "epoch": epoch,
            "epochs": trainer.max_epochs,
            "complete": epoch >= (trainer.max_epochs or 0),
            "global_step": trainer.global_step,
            "probabilities": probs,
            "architecture": argmax_architecture(probs),
            "metrics": metrics,
            **self.extra,
            "config": self.config,
        }

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        result = self.result(trainer, pl_module)
        self.last_result = result
        if not trainer.is_global_zero:  # DDP: every rank holds the same α; rank 0 writes and reports
            return
        atomic_write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", self.run_dir / RESULT_NAME)
        log.info("epoch %d/%s: %s; architecture %s", result["epoch"], result["epochs"],
                 ", ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items() if k.endswith("loss")),
                 result["architecture"])
        if under_nni():
            nni.report_intermediate_result(nni_metric(result))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config


def nni_metric(result: Mapping[str, Any]) -> dict[str, float]:
    """An NNI metric dict: ``default`` plus the epoch's losses and every probability.

    ``default`` is the selection metric (``result["selection"]["value"]``, the held-out adversarial task loss of
    :mod:`strategies.selection`, comparable across trials) once the search has computed it, i.e. in the final
    result. Intermediate (per-epoch) results carry the epoch's mean held-out adversarial loss ``arch_adv``
    (or ``arch_loss`` when the architecture step runs no attack): progress only, not comparable across trials.
    """
    metrics = result.get("metrics", {})
    selection = result.get("selection")
    if selection is not None:
        default = selection["value"]
    else:
        default = metrics.get("arch_adv", metrics.get("arch_loss", metrics.get("weight_loss", float("nan"))))
    out = {"default": float(default)}
    out.update({f"{k}": float(v) for k, v in metrics.items()})
    for label, dist in result["probabilities"].items():
        out.update({f"p/{label}/{op}": float(p) for op, p in dist.items()})
    return out


def run_darts(
    space: ModelSpace,
    module: RobustSearchModule,
    train_loader: Any,
    val_loader: Any,
    run_dir: str | Path,
    settings: DartsSettings,
    config: Mapping[str, Any],
    wrap: Callable[[nn.Module], nn.Module] = lambda supernet: supernet,
    resume: str | Path | None = None,
    callbacks: Sequence[pl.Callback] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Search ``space`` with NNI's DARTS and the robust ``module``; returns the final result dict.

    Args:
        space: a fresh model space (mutated in place into the supernet; seed the RNG before, α is random).
        module: the inner Lightning module (its ``training_step`` sees batch_idx 2k = α step, 2k+1 = weights).
        train_loader, val_loader: the training and held-out splits (batches are dicts).
        run_dir: where ``search_result.json``, ``checkpoints/`` and ``tensorboard/`` go.
        settings: trainer settings.
        config: resolved config (plain dict) stored in results and checkpoints.
        wrap: builds the trained model around the supernet (e.g. fusion supernet + segmenter).
        resume: a Lightning checkpoint to continue from.
        callbacks: extra Lightning callbacks.
        extra: extra fields for ``search_result.json``.
    """
    run_dir = Path(run_dir)
    strategy = ResumableDARTS(
        arc_learning_rate=settings.arch_lr,
        gradient_clip_val=settings.grad_clip,
        log_prob_every_n_step=settings.log_every_n_steps,
        warmup_epochs=settings.warmup_epochs,
    )
    supernet = strategy.mutate_model(space)
    model = wrap(supernet)
    recorder = SearchRecorder(run_dir, config, extra)
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="epoch{epoch:03d}", auto_insert_metric_name=False,
        save_last=True, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True,
    )
    parallel: Any = "auto"
    if settings.devices > 1:
        from pytorch_lightning.strategies import DDPStrategy

        parallel = DDPStrategy(process_group_backend="gloo" if settings.accelerator == "cpu" else "nccl")
    trainer = Trainer(
        max_epochs=settings.epochs,
        accelerator=settings.accelerator,
        devices=settings.devices,
        strategy=parallel,
        precision=settings.precision,
        deterministic=settings.deterministic,
        logger=pl.loggers.TensorBoardLogger(str(run_dir), name="tensorboard", version=""),
        callbacks=[EpochSeeder(settings.seed), recorder, *callbacks, checkpoint],
        log_every_n_steps=settings.log_every_n_steps,
        limit_train_batches=settings.max_train_batches,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        enable_progress_bar=settings.progress_bar,
        default_root_dir=str(run_dir),
    )
    fit_kwargs = {"ckpt_path": str(resume)} if resume else {}
    evaluator = Lightning(module, trainer, train_dataloaders=train_loader, val_dataloaders=val_loader,
                          fit_kwargs=fit_kwargs)
    oneshot = strategy.mutate_evaluator(evaluator)
    oneshot.evaluate(model)
    result = recorder.last_result
    if result is None:  # resumed from a finished run: nothing trained, rebuild the result from the weights
        result = recorder.result(trainer, oneshot.module)
        result["epoch"] = trainer.current_epoch
    return result
