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

Convergence (:mod:`strategies.convergence`): every epoch the recorder keeps the probabilities, per-slot entropy
and top probability and the argmax genotype in a history (saved in the checkpoints, so a resumed run keeps it),
logs ``alpha/entropy/<label>`` and ``alpha/top/<label>`` to TensorBoard and NNI, redraws ``alpha.png`` next to
``search_result.json`` and records the epoch the argmax last changed. Options: weight warm-up epochs without
architecture steps (DARTS' practice; NNI's ``warmup_epochs``), GDAS-style Gumbel-softmax sampling (NNI's
``GumbelDARTS``, ``strategy="gumbel"``) and early stopping once the argmax has been stable for
``stop_when_stable`` architecture epochs (DARTS+). Probabilities are always ``softmax(α)`` (:func:`alpha_probs`),
also under Gumbel sampling, whose own ``export_probs`` would draw fresh noise.
"""
from __future__ import annotations

import json
import logging
import random
import time
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
from nni.nas.oneshot.pytorch.differentiable import DartsLightningModule, GumbelDartsLightningModule
from nni.nas.strategy import DARTS, GumbelDARTS

from strategies.convergence import argmax_of, last_change_epoch, light_share, plot_alpha, stable_for, summary_stats
from strategies.search_module import RobustSearchModule
from trainer.errors import os_error_at
from trainer.runs import atomic_write_text

__all__ = [
    "ResumableDARTS",
    "ResumableGumbelDARTS",
    "STRATEGIES",
    "PLOT_NAME",
    "alpha_probs",
    "RESULT_NAME",
    "RESULT_VERSION",
    "DartsSettings",
    "EpochShuffleSampler",
    "EpochSeeder",
    "SearchRecorder",
    "SELECT_METRIC",
    "under_nni",
    "run_darts",
    "argmax_architecture",
]

log = logging.getLogger(__name__)

RESULT_NAME = "search_result.json"
PLOT_NAME = "alpha.png"  # the α trajectories, next to RESULT_NAME
RESULT_VERSION = 1
CONFIG_KEY = "paif_search_config"
LAST_NAME = "last"  # checkpoints/last.ckpt: written every epoch, the resume point
GUARD_KEY = "paif_nan_guard"  # the skipped-step counters of nan_policy=skip


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
    #: best epoch checkpoints kept beside last.ckpt (by :data:`SELECT_METRIC`, lower is better); 0 = none, -1 = all
    keep_checkpoints: int = 1
    strategy: str = "darts"  # "darts" (softmax mixture) | "gumbel" (NNI GumbelDARTS: Gumbel-softmax sampling)
    gumbel_temperature: tuple[float, float] = (1.0, 0.33)  # initial, final temperature (linear over the epochs)
    stop_when_stable: int | None = None  # stop after this many architecture epochs with an unchanged argmax
    light_ops: tuple[str, ...] = ()  # parameter-light candidates (strategies.convergence.light_ops), for reports

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {sorted(STRATEGIES)}, got {self.strategy!r}")


#: the per-epoch metric that ranks epoch checkpoints: ``nni_metric(result)["default"]`` of the epoch (the mean
#: held-out adversarial loss of its architecture steps), logged by :class:`SearchRecorder`
SELECT_METRIC = "search/epoch_select"


def _ordered_arch_parameters(module: DartsLightningModule) -> list[nn.Parameter]:
    params: dict[int, nn.Parameter] = {}
    for sub in module.supernet_modules():
        for p in getattr(sub, "arch_parameters", lambda: [])():
            params.setdefault(id(p), p)
    return list(params.values())


def _guard_step(module: Any, optimizer: Any) -> None:
    """The training module's ``guard_gradients`` (``nan_policy``) on the parameters ``optimizer`` is about to step."""
    guard = getattr(module.training_module, "guard_gradients", None)
    if guard is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        guard(params, architecture=bool(getattr(optimizer, "is_arch_optimizer", False)))


class _NamedModelCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose failed writes (full disk, size limit) name the checkpoint file."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        try:
            super()._save_checkpoint(trainer, filepath)
        except OSError as exc:
            raise os_error_at(exc, filepath) from exc


class _OrderedDartsModule(DartsLightningModule):
    """NNI's DARTS module with the architecture parameters in module order, and a gradient guard.

    NNI 3.0 returns ``list(set(alphas))``, whose order changes from process to process; the Adam state of
    the architecture optimiser then lands on the wrong tensors when a checkpoint is restored.

    Before each optimiser step (architecture and weights; Lightning calls ``on_before_optimizer_step`` in NNI's
    manual optimisation too) the training module's ``guard_gradients`` applies the ``nan_policy`` to the gradient
    norm: stop at a non-finite one, or drop the gradients so the step leaves the weights unchanged.
    """

    def arch_parameters(self) -> list[nn.Parameter]:
        return _ordered_arch_parameters(self)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        _guard_step(self, optimizer)


class _OrderedGumbelModule(GumbelDartsLightningModule):
    """NNI's GumbelDARTS module with ordered α and the temperature also set on the first batch of an epoch.

    NNI sets the temperature in ``on_train_epoch_start``, which Lightning skips for the first epoch after an
    epoch-end resume; setting it again on batch 0 keeps a resumed run on the schedule.
    """

    def arch_parameters(self) -> list[nn.Parameter]:
        return _ordered_arch_parameters(self)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        _guard_step(self, optimizer)

    def on_train_batch_start(self, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        if batch_idx == 0:
            from nni.nas.oneshot.pytorch.supermodule.differentiable import GumbelSoftmax

            tau = self.temperature_scheduler.step(self.trainer.current_epoch, self.trainer.max_epochs)
            for module in self.modules():
                if isinstance(module, GumbelSoftmax):
                    module.tau = tau
        return super().on_train_batch_start(batch, batch_idx, *args, **kwargs)


def _module_kwargs(strategy: DARTS) -> dict[str, Any]:
    return {"arc_learning_rate": strategy.arc_learning_rate, "gradient_clip_val": strategy.gradient_clip_val,
            "log_prob_every_n_step": strategy.log_prob_every_n_step, "warmup_epochs": strategy.warmup_epochs,
            "penalty": strategy.penalty}


class ResumableDARTS(DARTS):
    """:class:`nni.nas.strategy.DARTS` whose architecture optimiser can be restored from a checkpoint."""

    def configure_oneshot_module(self, training_module: Any) -> DartsLightningModule:
        return _OrderedDartsModule(training_module=training_module, **_module_kwargs(self))


class ResumableGumbelDARTS(GumbelDARTS):
    """:class:`nni.nas.strategy.GumbelDARTS` (GDAS/SNAS-style sampling), resumable like :class:`ResumableDARTS`."""

    def configure_oneshot_module(self, training_module: Any) -> DartsLightningModule:
        from nni.nas.oneshot.pytorch.differentiable import LinearTemperatureScheduler

        init, final = (float(t) for t in self.temperature)
        return _OrderedGumbelModule(training_module=training_module,
                                    temperature_scheduler=LinearTemperatureScheduler(init, final),
                                    **_module_kwargs(self))


#: ``strategy`` names of :class:`DartsSettings`
STRATEGIES = {"darts": ResumableDARTS, "gumbel": ResumableGumbelDARTS}


def alpha_probs(oneshot: Any) -> dict[str, dict[str, float]]:
    """``{label: {op: softmax(α)}}`` of every differentiable choice (plain softmax, whatever the strategy samples).

    Choices without an ``_arch_alpha`` tensor fall back to NNI's ``export_probs``.
    """
    probs: dict[str, dict[str, float]] = {}
    for module in oneshot.supernet_modules():
        alpha, names = getattr(module, "_arch_alpha", None), getattr(module, "names", None)
        if isinstance(alpha, torch.Tensor) and names is not None:
            weights = torch.softmax(alpha.detach().float(), -1).cpu().tolist()
            probs.setdefault(str(module.label), {str(n): float(w) for n, w in zip(names, weights)})
        else:
            for label, dist in module.export_probs({}).items():
                probs.setdefault(str(label), {str(op): float(p) for op, p in dist.items()})
    return probs


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


class SearchRecorder(pl.Callback):
    """Writes ``search_result.json`` and ``alpha.png`` after every epoch, logs convergence and reports it to NNI.

    The per-epoch history (probabilities, per-slot entropy / top probability, argmax, whether architecture steps
    ran) and the CPU time spent so far live in this callback's state, which Lightning saves in every checkpoint.

    Args:
        run_dir: the run directory.
        config: the resolved config (plain dict), copied into the result and into every checkpoint.
        extra: more fields for the result (e.g. ``channels`` needed by the genotype).
        warmup_epochs: epochs without architecture steps (marked ``"arch": false`` in the history).
        stop_when_stable: stop the search after this many architecture epochs with an unchanged argmax (None: never).
        light_ops: parameter-light candidates; the result reports the share of op slots that chose one.
    """

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
                 warmup_epochs: int = 0, stop_when_stable: int | None = None, light_ops: Sequence[str] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.config = dict(config)
        self.extra = dict(extra or {})
        self.warmup_epochs = int(warmup_epochs)
        self.stop_when_stable = stop_when_stable
        self.light_ops = list(light_ops)
        self.history: list[dict[str, Any]] = []
        self.stopped: dict[str, Any] | None = None
        self.cpu_before = 0.0  # CPU seconds of the search loop in earlier processes (resumed runs)
        self.wall_before = 0.0
        self._clock: tuple[float, float] | None = None
        self.last_result: dict[str, Any] | None = None

    # ---------------------------------------------------------------- state kept in checkpoints
    def state_dict(self) -> dict[str, Any]:
        cpu, wall = self.seconds()
        return {"history": self.history, "stopped": self.stopped, "cpu_seconds": cpu, "wall_seconds": wall}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.stopped = state_dict.get("stopped")
        self.cpu_before = float(state_dict.get("cpu_seconds", 0.0))
        self.wall_before = float(state_dict.get("wall_seconds", 0.0))
        self._clock = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clock = (time.process_time(), time.perf_counter())

    def seconds(self) -> tuple[float, float]:
        """(CPU seconds, wall seconds) of the search loop so far, earlier processes included."""
        if self._clock is None:
            return self.cpu_before, self.wall_before
        return (self.cpu_before + time.process_time() - self._clock[0],
                self.wall_before + time.perf_counter() - self._clock[1])

    # ---------------------------------------------------------------- the result
    def convergence(self) -> dict[str, Any]:
        """Summary of the history: last argmax change, stable epochs, final entropy / top, light-op share."""
        if not self.history:
            return {}
        last = self.history[-1]
        light, slots = light_share(last["argmax"], self.light_ops)
        arch = [h for h in self.history if h["arch"]]
        warm = [h for h in self.history if not h["arch"]]
        return {  # last change: counted from the end of the warm-up (α still at its initial value) on
            "argmax_last_changed": last_change_epoch(warm[-1:] + arch),
            "stable_epochs": stable_for(self.history),
            "arch_epochs": len(arch),
            "entropy_norm": {label: st["entropy_norm"] for label, st in last["stats"].items()},
            "top": {label: st["top"] for label, st in last["stats"].items()},
            "max_dev": max(st["max_dev"] for st in last["stats"].values()),
            "mean_entropy_norm": sum(st["entropy_norm"] for st in last["stats"].values()) / len(last["stats"]),
            "light_ops": self.light_ops,
            "light_share": [light, slots],
            "stopped_early": self.stopped,
        }

    def result(self, trainer: pl.Trainer, oneshot: Any) -> dict[str, Any]:
        probs = alpha_probs(oneshot)
        inner = oneshot.training_module
        metrics = inner.epoch_means() if isinstance(inner, RobustSearchModule) else {}
        epoch = trainer.current_epoch + 1  # epochs completed
        cpu, wall = self.seconds()
        return {
            "version": RESULT_VERSION,
            "epoch": epoch,
            "epochs": trainer.max_epochs,
            "complete": epoch >= (trainer.max_epochs or 0) or self.stopped is not None,
            "global_step": trainer.global_step,
            "probabilities": probs,
            "architecture": argmax_architecture(probs),
            "metrics": metrics,
            "convergence": self.convergence(),
            "history": self.history,
            "cost": {"search_cpu_minutes": cpu / 60, "search_wall_minutes": wall / 60,
                     "earlier_processes_cpu_minutes": self.cpu_before / 60},
            **self.extra,
            "config": self.config,
        }

    def _record(self, trainer: pl.Trainer, oneshot: Any) -> None:
        epoch = trainer.current_epoch + 1
        probs = alpha_probs(oneshot)
        stats = summary_stats(probs)
        self.history = [h for h in self.history if h["epoch"] < epoch]  # a replayed epoch replaces its record
        self.history.append({
            "epoch": epoch, "arch": trainer.current_epoch >= self.warmup_epochs, "probabilities": probs,
            "argmax": argmax_of(probs),
            "stats": {label: {k: st[k] for k in ("entropy", "entropy_norm", "top", "max_dev")}
                      for label, st in stats.items()},
        })
        if (self.stop_when_stable and self.stopped is None and epoch < (trainer.max_epochs or 0)
                and stable_for(self.history) >= self.stop_when_stable):
            self.stopped = {"epoch": epoch, "reason": f"argmax unchanged for {self.stop_when_stable} architecture "
                                                      "epochs (DARTS+ early stopping)"}
            trainer.should_stop = True
            log.info("early stop after epoch %d: %s", epoch, self.stopped["reason"])

    def _log_scalars(self, trainer: pl.Trainer, result: Mapping[str, Any]) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_scalar"):
            return
        epoch = int(result["epoch"])
        for label, st in result["history"][-1]["stats"].items():
            experiment.add_scalar(f"alpha/entropy/{label}", st["entropy"], epoch)
            experiment.add_scalar(f"alpha/top/{label}", st["top"], epoch)
        conv = result["convergence"]
        experiment.add_scalar("alpha/mean_entropy_norm", conv["mean_entropy_norm"], epoch)
        experiment.add_scalar("alpha/argmax_last_changed", conv["argmax_last_changed"], epoch)
        experiment.add_scalar("alpha/light_share", conv["light_share"][0] / max(1, conv["light_share"][1]), epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module)
        result = self.result(trainer, pl_module)
        self.last_result = result
        # every rank logs the selection metric (the best-k checkpoint callback monitors it on each rank); under DDP
        # its mean over the ranks, so that they agree on which epochs to keep
        pl_module.log(SELECT_METRIC, nni_metric(result)["default"], on_step=False, on_epoch=True,
                      sync_dist=trainer.world_size > 1)
        if not trainer.is_global_zero:  # DDP: every rank holds the same α; rank 0 writes and reports
            return
        atomic_write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", self.run_dir / RESULT_NAME)
        plot_alpha(self.history, self.run_dir / PLOT_NAME, light=self.light_ops,
                   title=f"architecture probabilities, epochs 1-{result['epoch']} (shaded: weight warm-up, "
                         "dashed: parameter-light ops)")
        self._log_scalars(trainer, result)
        conv = result["convergence"]
        log.info("epoch %d/%s: %s; mean entropy/log K %.3f, min top p %.3f, argmax last changed at epoch %s; "
                 "architecture %s", result["epoch"], result["epochs"],
                 ", ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items() if k.endswith("loss")),
                 conv["mean_entropy_norm"], min(conv["top"].values()), conv["argmax_last_changed"],
                 result["architecture"])
        if under_nni():
            nni.report_intermediate_result(nni_metric(result))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config
        guard = getattr(getattr(pl_module, "training_module", None), "guard", None)
        if guard is not None:
            checkpoint[GUARD_KEY] = guard.state_dict()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        guard = getattr(getattr(pl_module, "training_module", None), "guard", None)
        if guard is not None and checkpoint.get(GUARD_KEY) is not None:
            guard.load_state_dict(checkpoint[GUARD_KEY])


def nni_metric(result: Mapping[str, Any]) -> dict[str, float]:
    """An NNI metric dict: ``default`` plus the epoch's losses, convergence measures and every probability.

    ``default`` is the selection metric (``result["selection"]["value"]``, the held-out adversarial task loss of
    :mod:`strategies.selection`, comparable across trials) once the search has computed it, i.e. in the final
    result. Intermediate (per-epoch) results carry the epoch's mean held-out adversarial loss ``arch_adv``
    (or ``arch_loss`` when the architecture step runs no attack): progress only, not comparable across trials.
    Convergence: ``entropy/<label>`` (nats), ``top/<label>``, ``mean_entropy_norm``, ``argmax_last_changed``.
    """
    metrics = result.get("metrics", {})
    selection = result.get("selection")
    if selection is not None:
        default = selection["value"]
    else:
        default = metrics.get("arch_adv", metrics.get("arch_loss", metrics.get("weight_loss", float("nan"))))
    out = {"default": float(default)}
    out.update({f"{k}": float(v) for k, v in metrics.items()})
    history = result.get("history") or []
    if history:
        for label, st in history[-1]["stats"].items():
            out[f"entropy/{label}"] = float(st["entropy"])
            out[f"top/{label}"] = float(st["top"])
    conv = result.get("convergence") or {}
    for key in ("mean_entropy_norm", "argmax_last_changed"):
        if conv.get(key) is not None:
            out[key] = float(conv[key])
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
        run_dir: where ``search_result.json``, ``checkpoints/`` (``last.ckpt`` + the ``settings.keep_checkpoints``
            best epochs) and ``tensorboard/`` go.
        settings: trainer settings.
        config: resolved config (plain dict) stored in results and checkpoints.
        wrap: builds the trained model around the supernet (e.g. fusion supernet + segmenter).
        resume: a Lightning checkpoint to continue from.
        callbacks: extra Lightning callbacks.
        extra: extra fields for ``search_result.json``.
    """
    run_dir = Path(run_dir)
    kwargs: dict[str, Any] = {"arc_learning_rate": settings.arch_lr, "gradient_clip_val": settings.grad_clip,
                              "log_prob_every_n_step": settings.log_every_n_steps,
                              "warmup_epochs": settings.warmup_epochs}
    if settings.strategy == "gumbel":
        kwargs["temperature"] = tuple(float(t) for t in settings.gumbel_temperature)
    strategy = STRATEGIES[settings.strategy](**kwargs)
    supernet = strategy.mutate_model(space)
    model = wrap(supernet)
    recorder = SearchRecorder(run_dir, config, extra, warmup_epochs=settings.warmup_epochs,
                              stop_when_stable=settings.stop_when_stable, light_ops=settings.light_ops)
    # last.ckpt every epoch (the resume point) from its own callback, after the best-k one so that it holds that
    # callback's updated state: Lightning's save_last on a monitored callback writes last.ckpt only in epochs whose
    # metric entered the top k, which would leave a stale resume point
    checkpoints = []
    if settings.keep_checkpoints != 0:
        checkpoints.append(_NamedModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
            monitor=SELECT_METRIC, mode="min", save_top_k=settings.keep_checkpoints, every_n_epochs=1,
            save_on_train_epoch_end=True,
        ))
    checkpoints.append(_NamedModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename=LAST_NAME, monitor=None, save_top_k=1, every_n_epochs=1,
        save_on_train_epoch_end=True, enable_version_counter=False,
    ))
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
        callbacks=[EpochSeeder(settings.seed), recorder, *callbacks, *checkpoints],
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
