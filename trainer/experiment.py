"""The robustness experiment of PAIF (Liu et al., ACM MM 2023, Table "w/o AAT"): one command, one table, one plot.

    python -m trainer.experiment                         # = make experiment; writes runs/experiment/
    python -m trainer.experiment --config configs/experiment.yaml seeds=[0,1,2] workers=2
    python -m trainer.experiment --plan                  # list the jobs, run nothing

What it runs, on a seeded synthetic RGB-T dataset (``rgbt.synthetic``):

1. a common starting point (``trainer.warmstart``, cached by content hash): a SegFormer pretrained on max-rule
   fused training images (our stand-in for ImageNet MiT weights) and a fusion net warmed up on the fusion loss;
2. every arm retrained from that point (``retrain.py init_from=``) with the same recipe and data, per seed:
   no AAT (clean), plain adversarial training (``at``, 8/255), AAT, and AAT with uniform ε sampling (isolates the
   adaptive sampler); for one seed, IR-only and VIS-only inputs without AAT (the other modality zeroed in the
   model: shows that the benchmark needs fusion);
3. every final checkpoint (``last.pt``: no selection) evaluated on the test split under the ``paif`` and
   ``strong`` threat models, with an mIoU-versus-eps sweep of ``paif``.

It writes ``results.json`` (every number), ``results.md`` (mean ± sample std over seeds, paired differences per
seed, per-class IoU, the claims tested and whether they hold) and ``miou_vs_eps.png``. Jobs run in subprocesses
(``workers`` at a time, one torch thread each); a job whose ``done.json`` exists is skipped, and an interrupted
training run continues from its ``resume.ckpt``, so an interrupted experiment continues where it stopped when
run again with the same ``out`` (finished arms are never redone).

A run is ``[label, genotype, mode]`` optionally followed by the number of seeds it uses (the first n of
``seeds``) and by ``key=value`` overrides of ``trainer/retrain.py`` for that run only, e.g.
``["AAT, uniform eps", "paif", "aat", "3", "aat.prob_mode=uniform"]``.

Genotype specs: a name of ``search_space.genotype.GENOTYPES`` (``paif``), ``baseline`` (the hand-made
all-residual net), ``searched`` (one search with the ``search`` overrides), a name of ``searches`` (the genotype that
named search found; every named search starts its segmenter from the common warm start, ``init_from``),
``random:<seed>`` (``random_genotype``: a uniform draw from the searched space) and ``best-random`` (the
``random:`` arm with the highest ``selection.threat`` mIoU on the **validation** split, chosen after those arms
are trained; its first seed reuses that arm's job). ``report: search_quality`` writes the search-quality report
(:mod:`trainer.search_quality`) instead of the robustness tables — ``make search-eval``
(``configs/search_eval.yaml``). ``--tiny`` shrinks everything for an end-to-end check in about a minute.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from trainer.config import ConfigError, load_config, save_config
from trainer.errors import entry_point
from trainer.runs import atomic_write_text, lock_run_dir, setup_logging, tune_malloc, use_run_dir

log = logging.getLogger("trainer.experiment")

REPO = Path(__file__).resolve().parents[1]

RANDOM_PREFIX = "random:"  # genotype spec random:<seed>
BEST_RANDOM = "best-random"  # genotype spec: the random arm that is best on the validation split

BASELINE_GENOTYPE: dict[str, Any] = {
    "ir": ["residual_k3_d1", "residual_k3_d1"], "vis": ["residual_k3_d1", "residual_k3_d1"],
    "fused": ["residual_k3_d1", "residual_k3_d1"], "rule": "spatial_attention", "channels": 32, "version": 1,
}


#: the override key through which the experiment's ``seg_scale`` reaches each command it runs
SEG_SCALE_KEYS = {"warmstart": "seg.scale", "retrain": "seg_scale", "search": "space.seg_scale"}


@dataclass
class DataSpec:
    size: tuple[int, int] = (96, 128)  # synthetic scene size (H, W)
    n_train: int = 400
    n_val: int = 32
    n_test: int = 16
    seed: int = 0  # dataset seed (fixed across training seeds)


@dataclass
class SelectSpec:
    """How ``best-random`` is chosen: mIoU under ``threat`` on the first ``limit`` images of ``split`` (never test)."""

    split: str = "val"
    threat: str = "strong"  # a threat model name, or "clean"
    limit: int = 16  # 0: the whole split

    def __post_init__(self) -> None:
        if self.split.lower().startswith("test"):
            raise ValueError(f"selection.split: expected a validation split, got {self.split!r}; choosing the best "
                             "random genotype on the test split would leak it into the comparison")


@dataclass
class ExperimentConfig:
    out: str = "runs/experiment"
    report: str = "robustness"  # robustness (results.md, claims of AAT) | search_quality (trainer.search_quality)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    workers: int = 2  # jobs in parallel, one torch thread each
    data: DataSpec = field(default_factory=DataSpec)
    channels: int = 16  # fusion width of every retrained genotype
    #: the segmenter's input upsampling (1, 2 or 4; ``search_space.pipeline.segment``), one setting for the whole
    #: experiment: the warm start pretrains the segmenter at it (``seg.scale``), every arm retrains with it
    #: (``seg_scale``) and the named searches search with it (``space.seg_scale``). 2: logits at 1/2 of the 96×128
    #: scenes instead of 1/4 (README "Robustness experiment": the segmenter alone 82.5 % val mIoU against 65.0 %)
    seg_scale: int = 2
    #: key=value overrides of trainer.warmstart (the common starting point); null: every arm starts from scratch.
    #: seg.decoder_hidden_size=64: SegFormer's decode head at a quarter of b0's 256, which halves a training or
    #: attack step at seg_scale 2 (README "Segmenter input scale"); every arm inherits it from the start
    warmstart: list[str] | None = field(default_factory=lambda: ["seg.steps=2000", "fusion.steps=500",
                                                                 "seg.decoder_hidden_size=64"])
    #: where the warm starts are cached ("" = ``out/cache``). Keys are content hashes of the data files and the
    #: recipe, so experiments on byte-identical data may share one folder and pretrain the segmenter once
    cache: str = ""
    #: [label, genotype, mode, (n_seeds), (key=value ...)]: genotype is a GENOTYPES name, "searched" or
    #: "baseline"; n_seeds (optional) runs only the first n of ``seeds``; key=value override retrain for this run
    runs: list[list[str]] = field(default_factory=lambda: [
        ["no AAT", "paif", "clean"], ["plain AT", "paif", "at"], ["AAT", "paif", "aat"],
        ["AAT, uniform eps", "paif", "aat", "3", "aat.prob_mode=uniform"],
        ["IR only / no AAT", "paif", "clean", "1", "inputs=ir"],
        ["VIS only / no AAT", "paif", "clean", "1", "inputs=vis"],
    ])
    #: key=value overrides of trainer/retrain.py shared by every run
    retrain: list[str] = field(default_factory=lambda: [
        "max_steps=300", "data.batch_size=8", "optim.lr=0.0005", "optim.warmup_steps=30", "attack.kind=fgsm",
        "aat.meta_iters=1", "data.val_limit=8", "val.attack_steps=1", "val.num_images=0", "save_every_steps=50",
        "log_every_steps=25", "fusion_weights.ssim=10",
    ])
    #: key=value overrides of strategies/search.py (only when a run uses the "searched" genotype)
    search: list[str] = field(default_factory=lambda: [
        "epochs=2", "max_train_batches=12", "data.crop=[64,80]", "data.batch_size=2", "space.channels=16",
        "w=0.5", "w_arch=0.5",
    ])
    #: paired differences per seed, [a, b] -> a − b (runs matched by seed)
    #: --config of strategies/search.py for the named searches below
    search_config: str = "configs/search.yaml"
    #: named searches {name: [key=value overrides of strategies/search.py]}; a run whose genotype is a name here
    #: retrains what that search found. They start from the warm start's segmenter (init_from) when warmstart is set
    searches: dict[str, list[str]] = field(default_factory=dict)
    search_extra: list[str] = field(default_factory=list)  # overrides appended to every named search
    stability: list[str] = field(default_factory=list)  # two search names compared slot by slot
    selection: SelectSpec = field(default_factory=SelectSpec)  # how best-random is chosen
    eval_steps: int = 0  # > 0: every attack's step count in the evaluations (quick checks only, e.g. --tiny)
    eval_limit: int = 0  # > 0: evaluate the first N test images only
    eval_extra: list[str] = field(default_factory=list)  # key=value overrides of trainer/evaluate.py, every evaluation
    #: two run labels whose first common seed is shown side by side in ``grid.png`` (clean and under the strongest
    #: threat, from their evaluations' ``grid_<threat>.npz``); [] = no such picture
    grid_pair: list[str] = field(default_factory=lambda: ["no AAT", "AAT"])
    grid_samples: int = 3  # test images in that picture
    pairs: list[list[str]] = field(default_factory=lambda: [
        ["AAT", "no AAT"], ["AAT", "plain AT"], ["AAT", "AAT, uniform eps"],
    ])
    threats: list[str] = field(default_factory=lambda: ["paif", "strong"])
    eps_sweep: list[float] = field(default_factory=lambda: [0.0, 2.0, 4.0, 8.0, 16.0])  # in 1/255
    sweep_threats: list[str] = field(default_factory=lambda: ["paif"])
    eval_batch_size: int = 6

    def __post_init__(self) -> None:
        from search_space.pipeline import check_seg_scale

        self.seg_scale = check_seg_scale(self.seg_scale, "seg_scale")
        for command, items in (("warmstart", self.warmstart or []), ("retrain", self.retrain),
                               ("search", [*self.search, *self.search_extra])):
            key = SEG_SCALE_KEYS[command]
            if any(str(x).split("=", 1)[0].strip() == key for x in items):
                raise ValueError(f"{key} is set by the experiment's seg_scale ({self.seg_scale}); set seg_scale "
                                 f"instead of {key}= in the overrides")
        if self.report not in ("robustness", "search_quality"):
            raise ValueError(f"report: expected 'robustness' or 'search_quality', got {self.report!r}")
        if self.stability and (len(self.stability) != 2 or not set(self.stability) <= set(self.searches)):
            raise ValueError(f"stability: expected two names of searches {sorted(self.searches)}, got {self.stability}")
        clash = set(self.searches) & {"searched", "baseline", BEST_RANDOM}
        if clash or any(name.startswith(RANDOM_PREFIX) for name in self.searches):
            raise ValueError(f"searches: expected names other than searched, baseline, {BEST_RANDOM} and "
                             f"{RANDOM_PREFIX}<seed>, got {sorted(self.searches)}")



# ------------------------------------------------------------------------------------------------ jobs
@dataclass(frozen=True)
class Job:
    label: str
    genotype: str
    mode: str
    seed: int
    overrides: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Folder name: the label as a slug plus the seed (``"AAT, uniform eps"`` -> ``aat-uniform-eps-s0``)."""
        return f"{re.sub(r'[^a-z0-9]+', '-', self.label.lower()).strip('-')}-s{self.seed}"


def _parse_run(run: Sequence[str], n_seeds: int) -> tuple[str, str, str, int, tuple[str, ...]]:
    if len(run) < 3:
        raise ConfigError(f"runs: expected [label, genotype, mode, (n_seeds), (key=value ...)], got {run}")
    label, genotype, mode, *rest = (str(x) for x in run)
    n = n_seeds
    if rest and rest[0].isdigit():
        n, rest = int(rest[0]), rest[1:]
    bad = [x for x in rest if "=" not in x]
    if bad:
        raise ConfigError(f"runs: expected [label, genotype, mode, (n_seeds), (key=value ...)], got {run} "
                          f"({bad[0]!r} is neither a seed count nor key=value)")
    return label, genotype, mode, n, tuple(rest)


def plan(cfg: ExperimentConfig) -> list[Job]:
    """Every (run, seed) job, seeds outermost so partial results cover every configuration early."""
    runs = [_parse_run(run, len(cfg.seeds)) for run in cfg.runs]
    jobs = [Job(label, geno, mode, seed, extra) for i, seed in enumerate(cfg.seeds)
            for label, geno, mode, n, extra in runs if i < n]
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"runs: expected distinct labels, got jobs {sorted(k for k in keys if keys.count(k) > 1)}")
    return jobs


def resume_points(jdir: Path) -> list[Path]:
    """The ``resume.ckpt`` files of a job's interrupted trainings (oldest run folder first)."""
    return sorted((jdir / "train").glob("*/resume.ckpt"))


def run_order(jobs: Sequence[Job], out: Path) -> list[Job]:
    """The order in which ``jobs`` start: the ones an earlier invocation began first (finishing what was started),
    then seed by seed as planned, with the adversarial arms (2-3x the cost of a clean one) before the clean ones
    within a seed, so that the last job running alone is a short one rather than a worker idling beside a long
    arm. Results do not depend on it: every job has its own seed, folder and start."""
    def begun(job: Job) -> bool:
        jdir = out / "jobs" / job.key
        return (jdir / "train_done.json").is_file() or bool(resume_points(jdir))

    position = {job.key: i for i, job in enumerate(jobs)}
    return sorted(jobs, key=lambda j: (not begun(j), j.seed, j.mode == "clean", position[j.key]))


def checkpoint_train_seconds(path: str | Path) -> float | None:
    """The training time a retraining's checkpoint records over all its invocations (``state.train_seconds``,
    trainer.module), or None for a checkpoint written before it was recorded."""
    from trainer.checkpoint import load_checkpoint

    value = (load_checkpoint(path).get("state") or {}).get("train_seconds")
    return None if value is None else float(value)


def _python(module_or_script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / module_or_script), *args]


def _run(cmd: Sequence[str], logfile: Path) -> None:
    """Run ``cmd`` with one torch thread, output to ``logfile``; raise with the log's tail on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(logfile, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        code = subprocess.call(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if code != 0:
        tail = "".join(logfile.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{cmd[1]} failed with exit code {code}; see {logfile}:\n{tail}")


def trained_from(jdir: Path) -> str | None:
    """The start checkpoint a job's retraining began from (``init_from`` of its run's ``config.yaml``), if any."""
    import yaml

    for config in sorted((jdir / "train").glob("*/config.yaml")):
        init = (yaml.safe_load(config.read_text()) or {}).get("init_from")
        if init:
            return str(init)
    return None


def check_starts(jobs: Sequence[Job], out: Path, starts: dict[str, dict[str, Any]]) -> None:
    """Refuse to continue an experiment folder whose arms were retrained from another starting point.

    The start checkpoint's name is a content hash of the data, the warm-start recipe and the genotype, so a
    changed recipe (e.g. a new default of ``trainer.warmstart``) gives another name; finished arms would otherwise
    be kept and mixed with arms retrained from the new start. An arm's start is read from its retraining's config or,
    for an arm whose result files were copied in without its training folder, from ``done.json`` (``start``: file
    and weights hash): a start recomputed elsewhere under the same name must also have the same weights.
    """
    stale, recomputed = [], []
    for job in jobs:
        if job.genotype not in starts:
            continue
        jdir = out / "jobs" / job.key
        now = Path(starts[job.genotype]["start"]).name
        done = jdir / "done.json"
        recorded = (json.loads(done.read_text()).get("start") or {}) if done.is_file() else {}
        before = trained_from(jdir) or recorded.get("file")  # an arm copied in from elsewhere has no train folder
        if before is not None and Path(before).name != now:
            stale.append(f"{job.key} ({Path(before).name})")
        elif recorded.get("weights_sha256") and recorded["weights_sha256"] != start_sha256(starts[job.genotype]):
            recomputed.append(f"{job.key} ({now})")
    if recomputed:
        raise ConfigError(
            f"{out}: {len(recomputed)} arm(s) were retrained from a start of the same name but other weights than "
            f"the one here: {', '.join(sorted(recomputed))}; the start was recomputed (on another machine, say) and "
            "came out different. Use another --out, or delete those jobs/<arm> folders to retrain them")
    if stale:
        raise ConfigError(
            f"{out}: {len(stale)} arm(s) were retrained from another starting point than this configuration's "
            f"({', '.join(sorted({Path(i['start']).name for i in starts.values()}))}): {', '.join(stale)}; the data "
            "or the warm-start recipe changed. Use another --out, or delete those jobs/<arm> folders to retrain them")


def start_sha256(record: dict[str, Any]) -> str:
    """The weights hash of a warm-start record (``trainer.warmstart.weights_sha256``); records of older caches
    lack it, then it is computed from the start file and kept in the record."""
    if not record.get("weights_sha256"):
        from trainer.warmstart import start_weights_sha256

        record["weights_sha256"] = start_weights_sha256(record["start"])
    return record["weights_sha256"]


def seg_scale_override(cfg: ExperimentConfig, command: str) -> list[str]:
    """``[<key>=<seg_scale>]`` for ``command`` (a key of :data:`SEG_SCALE_KEYS`); [] at 1, every command's default."""
    return [f"{SEG_SCALE_KEYS[command]}={cfg.seg_scale}"] if cfg.seg_scale != 1 else []


def retrain_command(job: Job, cfg: ExperimentConfig, out: Path, genotypes: dict[str, str],
                    start: str | None) -> list[str]:
    """The ``trainer/retrain.py`` command of one job (into ``out/jobs/<key>/train``), from ``start`` if given."""
    return _python("trainer/retrain.py", "--genotype", genotypes[job.genotype], f"mode={job.mode}",
                   f"seed={job.seed}", f"channels={cfg.channels}", f"data.root={out / 'data'}",
                   f"runs_root={out / 'jobs' / job.key / 'train'}", f"run_name={job.key}", "progress_bar=false",
                   "num_threads=1", *([f"init_from={start}"] if start else []),
                   *seg_scale_override(cfg, "retrain"), *cfg.retrain, *job.overrides)


def run_job(job: Job, cfg: ExperimentConfig, out: Path, genotypes: dict[str, str],
            starts: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Retrain then evaluate one job; resumable through ``done.json`` / ``train_done.json`` markers.

    ``starts``: {genotype: warm-start record} (:func:`warm_starts`); the job retrains from its genotype's start and
    its ``done.json`` names that start (file and weights hash, checked by :func:`check_starts` on a later run)."""
    start = (starts or {}).get(job.genotype)
    jdir = out / "jobs" / job.key
    done = jdir / "done.json"
    specs = threat_specs(cfg.threats)
    if done.is_file():
        result = json.loads(done.read_text())
        if result.get("threat_specs") == specs:
            return result
        if "threat_specs" in result:
            changed = sorted(n for n in specs if result["threat_specs"].get(n) != specs[n])
            log.info("re-evaluating %s: the definition of %s changed since it was evaluated (its training is kept)",
                     job.key, ", ".join(changed))
        else:
            log.info("re-evaluating %s: evaluated before threat definitions were recorded (its training is kept)",
                     job.key)
        done.unlink()
        shutil.rmtree(jdir / "eval", ignore_errors=True)
    jdir.mkdir(parents=True, exist_ok=True)
    logfile = jdir / "job.log"
    t0 = time.time()
    train_done = jdir / "train_done.json"
    if not train_done.is_file():
        runs_root = jdir / "train"
        existing = resume_points(jdir)
        if existing:  # an interrupted retrain continues exactly
            cmd = _python("trainer/retrain.py", "--resume", str(existing[-1].parent), "progress_bar=false",
                          "num_threads=1")
        else:
            shutil.rmtree(runs_root, ignore_errors=True)
            cmd = retrain_command(job, cfg, out, genotypes, start["start"] if start else None)
        _run(cmd, logfile)
        last = sorted(runs_root.glob("*/last.pt"))
        if not last:
            raise RuntimeError(f"{job.key}: retrain finished without last.pt under {runs_root}")
        train_done.write_text(json.dumps({"last": str(last[-1]), "seconds": time.time() - t0,
                                          "train_seconds": checkpoint_train_seconds(last[-1])}) + "\n")
    t1 = time.time()
    trained = json.loads(train_done.read_text())
    ckpt = trained["last"]

    eval_dir = jdir / "eval"
    flags, items = _eval_budget(cfg)
    sweep = (["--eps-sweep", *[f"{e:g}" for e in cfg.eps_sweep], f"sweep_threats={json.dumps(cfg.sweep_threats)}"]
             if cfg.eps_sweep else ["eps_sweep=[]"])
    cmd = _python("trainer/evaluate.py", "--checkpoint", ckpt, "--data", str(out / "data"), "--split", "test",
                  *[a for t in cfg.threats for a in ("--threat", t)], "--out", str(eval_dir),
                  "--batch-size", str(cfg.eval_batch_size), "--device", "cpu", "--seed", str(job.seed),
                  "--no-progress", *flags, *sweep, *items, "num_threads=1")
    _run(cmd, logfile)
    report = json.loads((eval_dir / "report.json").read_text())
    from trainer.checkpoint import resolve_genotype

    # the time the training took (train_done.json), also for an arm evaluated again after its training: the
    # checkpoint's training time over every invocation of an interrupted retraining (older markers: the wall time
    # of the last invocation only)
    result = {"job": dataclasses.asdict(job), "checkpoint": ckpt,
              "train_seconds": trained.get("train_seconds") or trained.get("seconds", t1 - t0),
              "train_wall_seconds": trained.get("seconds", t1 - t0), "eval_seconds": time.time() - t1,
              "genotype": resolve_genotype(genotypes[job.genotype], channels=cfg.channels).to_dict(),
              "threat_specs": specs, **extract(report)}
    if start:
        result["start"] = {"file": Path(start["start"]).name, "weights_sha256": start.get("weights_sha256")}
    atomic_write_text(json.dumps(result, indent=2) + "\n", done)
    return result


def threat_specs(names: Sequence[str]) -> dict[str, Any]:
    """The resolved definition of each evaluated threat model (recorded in ``done.json``): an arm evaluated under
    another definition of a threat of the same name (``strong`` made stronger) is evaluated again."""
    from robustness.threats import ThreatError, resolve_threat

    specs: dict[str, Any] = {}
    for name in names:
        try:
            specs[name] = resolve_threat(name)
        except ThreatError:  # a YAML file of user threats: evaluate.py resolves (and reports) it
            specs[name] = name
    from trainer.evaluate import WORST_CASE_SELECTION

    specs["_worst_case_selection"] = WORST_CASE_SELECTION  # how a worst case's mIoU is chosen, also a definition
    return json.loads(json.dumps(specs))  # as done.json stores it (tuples become lists)


def _eval_budget(cfg: ExperimentConfig, limit: int | None = None) -> tuple[list[str], list[str]]:
    """evaluate.py (flags, key=value items) shared by every evaluation: step override, image limit, ``eval_extra``.

    The key=value items must come last on the command line (argparse takes them as one positional list).
    """
    limit = cfg.eval_limit if limit is None else limit
    flags = [*(["--steps", str(cfg.eval_steps)] if cfg.eval_steps > 0 else []),
             *(["--limit", str(limit)] if limit > 0 else [])]
    return flags, list(cfg.eval_extra)


def extract(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers the table needs from one evaluation ``report.json`` (fractions in [0, 1])."""
    out: dict[str, Any] = {"clean": report["clean"]["segmentation"]["miou"],
                           "clean_objects": report["clean"]["segmentation"]["miou_objects"]}
    for name, rep in report["threats"].items():
        out[name] = rep["segmentation"]["miou"]
        out[f"{name}_objects"] = rep["segmentation"]["miou_objects"]
    out["curves"] = {name: [[p["eps_255"], p["miou"]] for p in pts]
                     for name, pts in (report.get("eps_sweep") or {}).items()}
    out["iou"] = {"clean": report["clean"]["segmentation"].get("iou", {}),
                  **{name: rep["segmentation"].get("iou", {}) for name, rep in report["threats"].items()}}
    out["fusion"] = report["clean"].get("fusion") or {}
    return out


def max_rule_fusion_metrics(data: Path, split: str = "test", limit: int | None = None) -> dict[str, float]:
    """Fusion metrics of the plain max rule ``max(IR, Y)`` on ``split`` (its first ``limit`` images; None: all):
    the bar a learnt fusion should clear."""
    import torch

    from rgbt.color import rgb_to_y
    from rgbt.dataset import RGBTDataset
    from trainer.metrics import FusionMetrics

    ds = RGBTDataset(data, split)
    acc = FusionMetrics()
    for i in range(len(ds) if limit is None else min(len(ds), limit)):
        item = ds[i]
        ir, y = item["ir"][None], rgb_to_y(item["vis"][None])
        acc.update(torch.maximum(ir, y), ir, y)
    return acc.compute()


# ------------------------------------------------------------------------------------------- aggregate
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n−1; 0 for a single value); NaNs are dropped."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


def aggregate(results: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run label (in first-seen order): mean and std over seeds of every column, and the seeds."""
    rows: dict[str, dict[str, Any]] = {}
    for r in results:
        label = r["job"]["label"]
        row = rows.setdefault(label, {"label": label, "seeds": [], "values": {c: [] for c in columns}})
        row["seeds"].append(r["job"]["seed"])
        for c in columns:
            row["values"][c].append(r.get(c, float("nan")))
    for row in rows.values():
        row["stats"] = {c: mean_std(v) for c, v in row["values"].items()}
    return list(rows.values())


def _fmt(ms: tuple[float, float]) -> str:
    m, s = ms
    return "–" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}"


def render_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "| run | seeds | " + " | ".join(f"mIoU {c}" for c in columns) + " |"
    sep = "|---|---|" + "---|" * len(columns)
    body = [f"| {r['label']} | {len(r['seeds'])} | " + " | ".join(
        _fmt(r["stats"][c]) if len(r["seeds"]) > 1 else _fmt(r["stats"][c]).split(" ±")[0] for c in columns) + " |"
        for r in rows]
    return "\n".join([head, sep, *body])


def plot_curves(results: Sequence[dict[str, Any]], threat: str, path: Path) -> None:
    """mIoU versus eps under ``threat``: mean over seeds per run label, error bars = sample std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label: dict[str, dict[float, list[float]]] = {}
    for r in results:
        for eps, miou in r["curves"].get(threat, []):
            by_label.setdefault(r["job"]["label"], {}).setdefault(eps, []).append(miou)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, pts in by_label.items():
        eps = sorted(pts)
        stats = [mean_std(pts[e]) for e in eps]
        ax.errorbar(eps, [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats], marker="o", capsize=3,
                    label=label)
    ax.set_xlabel(f"attack budget ε (×1/255), threat model '{threat}' (PGD L∞, both modalities)")
    ax.set_ylabel("test mIoU (%), 9 classes")
    ax.set_title("Segmentation accuracy under attack (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def paired_differences(results: Sequence[dict[str, Any]], a: str, b: str, column: str) -> dict[str, Any]:
    """``a − b`` of ``column`` per seed over the seeds both runs have: ``{"seeds", "diffs", "mean", "std"}``."""
    by = {lab: {r["job"]["seed"]: r.get(column, float("nan")) for r in results if r["job"]["label"] == lab}
          for lab in (a, b)}
    seeds = sorted(set(by[a]) & set(by[b]))
    diffs = [by[a][s] - by[b][s] for s in seeds]
    m, sd = mean_std(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": m, "std": sd}


def sweep_pairs(results: Sequence[dict[str, Any]], pairs: Sequence[Sequence[str]], threat: str
                ) -> dict[str, dict[float, dict[str, Any]]]:
    """Paired differences ``a − b`` per seed at every ε of the ``threat`` sweep: ``{"a − b": {eps_255: paired}}``
    (the eps points both runs' curves share; a single budget hides where a defence gains and where it loses)."""
    def at(eps: float) -> str:
        return f"{threat}@{eps:g}"

    flat = [{"job": r["job"], **{at(e): m for e, m in r.get("curves", {}).get(threat, [])}} for r in results]
    out: dict[str, dict[float, dict[str, Any]]] = {}
    for a, b in pairs:
        eps_sets = [{float(e) for r in results if r["job"]["label"] == lab
                     for e, _ in r.get("curves", {}).get(threat, [])} for lab in (a, b)]
        per = {e: paired_differences(flat, a, b, at(e)) for e in sorted(eps_sets[0] & eps_sets[1])}
        if any(d["seeds"] for d in per.values()):
            out[f"{a} − {b}"] = per
    return out


def render_sweep_pairs(sweep: dict[str, dict[float, dict[str, Any]]], threat: str) -> list[str]:
    """results.md lines: one row per pair, one column per ε (mean ± std of the paired differences, seeds); ``sweep``
    non-empty (:func:`write_outputs` leaves the section out otherwise)."""
    eps = sorted({e for per in sweep.values() for e in per})
    md = [f"## Paired differences along the ε sweep (`{threat}`, points of mIoU, mean ± std over seeds)", "",
          "| pair | seeds | " + " | ".join(f"ε {e:g}/255" for e in eps) + " |", "|---|---|" + "--:|" * len(eps)]
    for name, per in sweep.items():
        seeds = sorted({s for d in per.values() for s in d["seeds"]})
        cells = []
        for e in eps:
            d = per.get(e)
            cells.append("–" if not d or not d["seeds"] else
                         _pct(d["mean"]) + (f" ± {100 * d['std']:.1f}" if len(d["seeds"]) > 1 else ""))
        md.append(f"| {name} | {', '.join(f's{s}' for s in seeds)} | " + " | ".join(cells) + " |")
    return md


def _mean_of(results: Sequence[dict[str, Any]], label: str, column: str) -> float:
    return mean_std([r.get(column, float("nan")) for r in results if r["job"]["label"] == label])[0]


def check_claims(results: Sequence[dict[str, Any]], strongest: str) -> list[dict[str, Any]]:
    """The claims the experiment tests (not assumes), each with its numbers and ``holds`` (None: no data)."""
    def pair(a: str, b: str, col: str) -> dict[str, Any]:
        return paired_differences(results, a, b, col)

    claims = []
    d = pair("AAT", "no AAT", strongest)
    claims.append({"id": "aat_vs_none", "claim": f"AAT − no AAT under `{strongest}` ≥ +15 points (mean of paired differences)",
                   "value": d["mean"], "holds": None if not d["seeds"] else d["mean"] >= 0.15})
    d = pair("no AAT", "AAT", "clean")
    claims.append({"id": "clean_cost", "claim": "AAT's clean cost (no AAT − AAT, clean mIoU) ≤ 3 points", "value": d["mean"],
                   "holds": None if not d["seeds"] else d["mean"] <= 0.03})
    adv, cln = pair("AAT", "plain AT", strongest), pair("AAT", "plain AT", "clean")
    claims.append({"id": "aat_vs_at", "claim": f"AAT ≥ plain AT under `{strongest}` at equal or better clean mIoU",
                   "value": [adv["mean"], cln["mean"]],
                   "holds": None if not adv["seeds"] else (adv["mean"] >= 0 and cln["mean"] >= 0)})
    fused = _mean_of(results, "no AAT", "clean")
    for single in ("IR only / no AAT", "VIS only / no AAT"):
        other = _mean_of(results, single, "clean")
        claims.append({"id": f"fused_vs_{single.split()[0].lower()}",
                       "claim": f"fused (no AAT) > {single.split(' /')[0]} (clean mIoU)", "value": [fused, other],
                       "holds": None if math.isnan(fused) or math.isnan(other) else fused > other})
    return claims


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:+.1f}"


def comparison_grid(cfg: ExperimentConfig, out: Path, results: Sequence[dict[str, Any]], threat: str) -> str:
    """``out/grid.png``: the first ``grid_samples`` test images, clean and under ``threat``, for the two runs of
    ``grid_pair`` (their first common seed), from the rows their evaluations saved; the markdown line to show it,
    or one that says what is missing ("" without ``grid_pair``)."""
    if len(cfg.grid_pair) != 2:
        return ""
    from trainer.report import grid_name, load_grid_rows, save_grid

    done = {(r["job"]["label"], r["job"]["seed"]): r for r in results}
    seed = next((s for s in cfg.seeds if all((label, s) in done for label in cfg.grid_pair)), None)
    name = grid_name(threat, ".npz")
    files = [out / "jobs" / Job(**{**done[(label, seed)]["job"], "overrides": ()}).key / "eval" / name
             for label in cfg.grid_pair] if seed is not None else []
    if not files or not all(f.is_file() for f in files):
        return (f"(Picture grid {' vs '.join(cfg.grid_pair)}: needs both runs' `eval/{name}` for a common seed; "
                "evaluations before it was saved lack it — delete that arm's `done.json` to evaluate it again.)")
    sides = [load_grid_rows(f) for f in files]
    rows = []
    for i in range(min(cfg.grid_samples, *(len(side) // 2 for side in sides))):
        for label, side in zip(cfg.grid_pair, sides):
            for row in side[2 * i:2 * i + 2]:
                image, _, condition = row["label"].partition("\n")
                rows.append({**row, "label": f"{image}\n{label}, {condition}"})
    save_grid(out / "grid.png", rows, title=f"{' vs '.join(cfg.grid_pair)} (seed {seed}): clean and under "
                                            f"'{threat}' (each model attacked white-box)")
    return (f"![{' vs '.join(cfg.grid_pair)}, clean and under {threat}](grid.png)\n\n"
            f"Picture: the first {len(rows) // 4} test images, {' and '.join(cfg.grid_pair)} (seed {seed}), clean and "
            f"attacked by `{threat}` (each model under its own white-box attack).")


def cost_summary(results: Sequence[dict[str, Any]], starts: dict[str, dict[str, Any]], workers: int
                 ) -> dict[str, Any]:
    """What the finished arms and the warm start cost, and the wall time of one uninterrupted run from it.

    Arm time = training (``train_seconds``: every invocation of the retraining) + evaluation. ``estimated_wall_s``
    replays the arms in the experiment's order (seed by seed, adversarial arms first: :func:`run_order`) on
    ``workers`` workers, each arm taking its measured time, after the warm start (segmenter once, then the fusion
    warm-ups ``workers`` at a time, counted here one after another): an estimate that assumes the arms' times do
    not depend on what ran beside them.
    """
    import heapq

    arms = sorted(results, key=lambda r: (r["job"]["seed"], r["job"]["mode"] == "clean"))
    times = [float(r.get("train_seconds") or 0.0) + float(r.get("eval_seconds") or 0.0) for r in arms]
    seg: dict[str, float] = {}  # one entry per pretrained segmenter (genotypes share it)
    for info in starts.values():
        pretrain = info.get("segmenter") or {}
        seg[json.dumps(pretrain.get("recipe"), sort_keys=True)] = float(pretrain.get("seconds") or 0.0)
    warm = sum(seg.values()) + sum(float(i.get("fusion_seconds") or 0.0) for i in starts.values())
    free = [0.0] * max(1, workers)
    for t in times:
        heapq.heapreplace(free, free[0] + t)
    return {"arms": len(arms), "train_s": sum(float(r.get("train_seconds") or 0.0) for r in arms),
            "eval_s": sum(float(r.get("eval_seconds") or 0.0) for r in arms), "arm_s": sum(times),
            "warm_start_s": warm if starts else None, "workers": max(1, workers), "estimated_wall_s": warm + max(free)}


def cost_lines(results: Sequence[dict[str, Any]], cost: dict[str, Any]) -> list[str]:
    """The "Cost" section of results.md: mean training / evaluation time per run and the estimate of
    :func:`cost_summary`."""
    md = ["## Cost (seconds on this run's machines, one thread per arm)", "",
          "| run | arms | training (mean) | evaluation (mean) |", "|---|--:|--:|--:|"]
    for label in dict.fromkeys(r["job"]["label"] for r in results):
        mine = [r for r in results if r["job"]["label"] == label]
        train = mean_std([float(r.get("train_seconds") or float("nan")) for r in mine])[0]
        ev = mean_std([float(r.get("eval_seconds") or float("nan")) for r in mine])[0]
        md.append(f"| {label} | {len(mine)} | {train:,.0f} | {ev:,.0f} |")
    warm = ("no record of the warm start here (not counted)" if cost["warm_start_s"] is None
            else f"warm start {cost['warm_start_s']:,.0f} s")
    md += ["", f"Arm time of the {cost['arms']} finished arms: {cost['arm_s']:,.0f} s (training "
               f"{cost['train_s']:,.0f}, evaluation {cost['eval_s']:,.0f}); {warm}. Replayed in the experiment's order on {cost['workers']} "
               f"workers after the warm start, these arms take **≈ {cost['estimated_wall_s'] / 3600:.1f} h** of wall "
               "time (an estimate from the measured times, which include any load that ran beside them).", ""]
    return md


def write_outputs(cfg: ExperimentConfig, out: Path, results: list[dict[str, Any]],
                  searched: dict[str, Any] | None, wall: float, extras: dict[str, Any] | None = None) -> Path:
    """results.json, results.md (tables, paired differences, per-class IoU, claims) and miou_vs_eps.png."""
    extras = extras or {}
    columns = ["clean", *cfg.threats]
    strongest = cfg.threats[-1] if cfg.threats else "clean"
    rows = aggregate(results, columns)
    obj_rows = aggregate(results, [f"{c}_objects" for c in columns])
    pairs = {f"{a} − {b}": {c: paired_differences(results, a, b, c) for c in columns} for a, b in cfg.pairs}
    claims = check_claims(results, strongest)
    sweep_threat = cfg.sweep_threats[0] if cfg.sweep_threats else ""
    sweep = sweep_pairs(results, cfg.pairs, sweep_threat) if sweep_threat else {}
    cost = cost_summary(results, extras.get("warm_start") or {}, cfg.workers)
    (out / "results.json").write_text(json.dumps(
        {"config": dataclasses.asdict(cfg), "searched_genotype": searched, "jobs": results,
         "summary": [{"label": r["label"], "seeds": r["seeds"],
                      **{c: {"mean": r["stats"][c][0], "std": r["stats"][c][1]} for c in columns}} for r in rows],
         "paired": pairs, "paired_sweep": {"threat": sweep_threat,
                                           "pairs": {n: {f"{e:g}": d for e, d in per.items()} for n, per in sweep.items()}},
         "claims": claims, "wall_seconds": wall, "cost": cost, **extras}, indent=2, default=str)
        + "\n")
    plot_curves(results, cfg.sweep_threats[0] if cfg.sweep_threats else cfg.threats[0], out / "miou_vs_eps.png")
    d = cfg.data
    md = [
        "# Robustness experiment (synthetic RGB-T scenes)", "",
        f"Command: `python -m trainer.experiment --out {cfg.out}` (`make experiment`). "
        + (f"{finished_note(extras['finished_jobs'])} (tables rebuilt with `--report`, so no wall time); "
           if "finished_jobs" in extras else f"Wall time {wall / 60:.1f} min ")
        + f"on this machine ({cfg.workers} jobs in parallel, one thread each).", "",
        f"Data: `rgbt.synthetic` seed {d.seed}, {d.size[0]}×{d.size[1]}, {d.n_train} train / {d.n_val} val / "
        f"{d.n_test} test scenes. Start point: `trainer.warmstart` "
        f"{' '.join(warmstart_overrides(cfg)) if cfg.warmstart is not None else '(none)'}. "
        f"Training: {' '.join(cfg.retrain)}, fusion width {cfg.channels}"
        + (f", segmenter on {cfg.seg_scale}× upsampled fused images (seg_scale={cfg.seg_scale})" if cfg.seg_scale != 1
           else "") + f"; seeds {cfg.seeds}. Evaluation: final "
        "checkpoint (`last.pt`, no selection) on the test split; test mIoU in % over 9 classes, mean ± sample std "
        "over seeds.", "",
        render_table(rows, columns), "",
        "The same, over the 8 object classes (without `unlabeled`):", "",
        render_table(obj_rows, [f"{c}_objects" for c in columns]), "",
        "## Paired differences per seed (points of mIoU)", "",
        "| pair | metric | per seed | mean ± std |", "|---|---|---|---|",
    ]
    for name, per_col in pairs.items():
        for c, dd in per_col.items():
            if dd["seeds"]:
                per = ", ".join(f"s{s}: {_pct(v)}" for s, v in zip(dd["seeds"], dd["diffs"]))
                spread = f" ± {100 * dd['std']:.1f}" if len(dd["seeds"]) > 1 else " (one seed)"
                md.append(f"| {name} | {c} | {per} | {_pct(dd['mean'])}{spread} |")
    if sweep:
        md += ["", *render_sweep_pairs(sweep, sweep_threat)]
    md += ["", "## Claims tested", "", "| claim | measured | holds |", "|---|---|---|"]
    for c in claims:
        v = c["value"]
        shown = (" / ".join("–" if math.isnan(x) else f"{100 * x:.1f}" for x in v) if isinstance(v, list)
                 else _pct(v))
        md.append(f"| {c['claim']} | {shown} | {'–' if c['holds'] is None else ('yes' if c['holds'] else '**no**')} |")
    md += ["", "## Per-class IoU (%, mean over seeds)", ""]
    classes = next((list(r["iou"]["clean"]) for r in results if r.get("iou", {}).get("clean")), [])
    if classes:
        md += ["| run | input | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
        for label in dict.fromkeys(r["job"]["label"] for r in results):
            for col in ("clean", strongest):
                per = [mean_std([r["iou"].get(col, {}).get(k, float("nan")) for r in results
                                 if r["job"]["label"] == label])[0] for k in classes]
                md.append(f"| {label} | {col} | " + " | ".join("–" if math.isnan(x) else f"{100 * x:.1f}"
                                                              for x in per) + " |")
    maxrule = extras.get("max_rule_fusion")
    if maxrule:
        md += ["", "## Fusion quality (clean test images; SSIM and MI are sums over the two sources)", "",
               "| fused by | SSIM | Qabf | MI | VIF |", "|---|---|---|---|---|",
               f"| max rule `max(IR, Y)` | {maxrule['SSIM']:.3f} | {maxrule['Qabf']:.3f} | {maxrule['MI']:.3f} | "
               f"{maxrule['VIF']:.3f} |"]
        for label in dict.fromkeys(r["job"]["label"] for r in results):
            f = [r.get("fusion", {}) for r in results if r["job"]["label"] == label]
            vals = [mean_std([x.get(k, float("nan")) for x in f])[0] for k in ("SSIM", "Qabf", "MI", "VIF")]
            md.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    md += ["", *cost_lines(results, cost)]
    md += ["![mIoU versus eps](miou_vs_eps.png)", "",
           "Threat models: `paif` = PGD L∞ ε 8/255, step 2/255, 5 steps on both modalities (the reference protocol); "
           "`strong` = per-image worst case over APGD with SEA's four losses (100 steps for JS and masked spherical, "
           "50 for masked CE, 25 for balanced CE), PGD-20, SegPGD-20 and CosPGD-20 at ε 8/255 (best iterates), joined by the gradient-masking checks' black-box results; `strong-v1` = the former "
           "worst case over PGD-20, SegPGD-20 and CosPGD-20 (last iterates).", ""]
    grid = comparison_grid(cfg, out, results, strongest)
    if grid:
        md += [grid, ""]
    if searched:
        md += [f"Searched genotype: `{json.dumps(searched)}`", ""]
    path = out / "results.md"
    path.write_text("\n".join(md))
    return path


# ------------------------------------------------------------------------------------------------ main
def _repo_path(path: str) -> str:
    return str(path if Path(path).is_absolute() else REPO / path)


def searched_space(cfg: ExperimentConfig) -> tuple[list[str], list[str], int]:
    """(candidates, rules, steps) of the space the named searches explore (all must agree; defaults without any).

    ``random:<seed>`` genotypes are drawn from this space, so random and searched genotypes compete in one space.
    """
    from search_space.cells import DEFAULT_RULES
    from search_space.ops import DEFAULT_CANDIDATES
    from strategies.search import SearchConfig

    spaces = {}
    for name, overrides in (cfg.searches or {"searched": cfg.search}).items():
        path = _repo_path(cfg.search_config) if cfg.searches else _repo_path("configs/search.yaml")
        sp = load_config(SearchConfig, path, [*overrides, *cfg.search_extra]).space
        spaces[name] = (list(sp.candidates or DEFAULT_CANDIDATES), list(sp.rules or DEFAULT_RULES), sp.steps)
    if len({json.dumps(v) for v in spaces.values()}) > 1:
        raise ConfigError(f"searches: expected one search space (candidates, rules, steps) for every search, got "
                          f"{json.dumps(spaces)}")
    return next(iter(spaces.values()))


def prepare(cfg: ExperimentConfig, out: Path) -> tuple[dict[str, str], dict[str, Any] | None]:
    """Dataset, the legacy ``searched`` genotype (runs that search once), the baseline and random genotype files."""
    from rgbt.synthetic import generate_dataset
    from search_space.genotype import random_genotype

    data = out / "data"
    if not (data / "meta.json").is_file():
        d = cfg.data
        generate_dataset(data, n_train=d.n_train, n_val=d.n_val, n_test=d.n_test, size=tuple(d.size), seed=d.seed)
    genotypes = {run[1]: run[1] for run in cfg.runs}
    baseline = out / "baseline_genotype.json"
    baseline.write_text(json.dumps({**BASELINE_GENOTYPE, "channels": cfg.channels}, indent=2) + "\n")
    genotypes["baseline"] = str(baseline)
    randoms = [spec for spec in genotypes if spec.startswith(RANDOM_PREFIX)]
    if randoms:
        candidates, rules, steps = searched_space(cfg)
        (out / "genotypes").mkdir(exist_ok=True)
        for spec in randoms:
            seed = spec[len(RANDOM_PREFIX):]
            if not seed.isdigit():
                raise ConfigError(f"runs: expected genotype {RANDOM_PREFIX}<seed> with an integer seed, got {spec!r}")
            path = out / "genotypes" / f"random-{seed}.json"
            random_genotype(int(seed), candidates, rules, steps, cfg.channels).to_json(path)
            genotypes[spec] = str(path)
    searched = None
    if "searched" in genotypes:
        geno = run_search(cfg, out, "searched", out / "search", None, cfg.search, out / "search.log")
        genotypes["searched"] = str(geno)
        searched = json.loads(geno.read_text())
    return genotypes, searched


def run_search(cfg: ExperimentConfig, out: Path, name: str, sdir: Path, config: str | None, overrides: Sequence[str],
               logfile: Path, init_from: str | None = None) -> Path:
    """One search (``strategies/search.py``) into ``sdir``; resumes from its last epoch checkpoint; its genotype file."""
    geno = sdir / "genotype.json"
    if geno.is_file():
        return geno
    if (sdir / "checkpoints" / "last.ckpt").is_file():  # an interrupted search continues from its last epoch
        cmd = _python("strategies/search.py", "--resume", str(sdir), "progress_bar=false")
    else:
        shutil.rmtree(sdir, ignore_errors=True)
        sdir.mkdir(parents=True)
        cmd = _python("strategies/search.py", *(["--config", _repo_path(config)] if config else []),
                      f"data.root={out / 'data'}", f"run_dir={sdir}", "progress_bar=false",
                      *([f"init_from={init_from}"] if init_from else []),
                      *seg_scale_override(cfg, "search"), *overrides)
    log.info("search %s -> %s", name, sdir)
    _run(cmd, logfile)
    if not geno.is_file():
        raise RuntimeError(f"search {name} finished without {geno}; see {logfile}")
    return geno


def run_searches(cfg: ExperimentConfig, out: Path, genotypes: dict[str, str], init_from: str | None
                 ) -> dict[str, dict[str, Any]]:
    """Every named search (``workers`` at a time); adds their genotype files to ``genotypes``; their results."""
    if not cfg.searches:
        return {}
    with cf.ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        futures = {name: pool.submit(run_search, cfg, out, name, out / "searches" / name, cfg.search_config,
                                     [*overrides, *cfg.search_extra], out / "searches" / f"{name}.log", init_from)
                   for name, overrides in cfg.searches.items()}
        files = {name: fut.result() for name, fut in futures.items()}
    genotypes.update({name: str(path) for name, path in files.items()})
    return {name: json.loads((path.parent / "search_result.json").read_text()) for name, path in files.items()}


def warmstart_overrides(cfg: ExperimentConfig) -> list[str]:
    """``cfg.warmstart`` plus the experiment's ``seg_scale`` as ``seg.scale`` (left out at 1, the default)."""
    return [*(cfg.warmstart or []), *seg_scale_override(cfg, "warmstart")]


def start_cache(cfg: ExperimentConfig, out: Path) -> Path:
    """Where the warm starts live: ``cache`` when set (shared between runs), else ``out/cache``."""
    return Path(cfg.cache or out / "cache")


def _warm_config(cfg: ExperimentConfig, out: Path, genotype: str) -> Any:
    from trainer.warmstart import WarmStartConfig

    cache = start_cache(cfg, out)
    return load_config(WarmStartConfig, None, [f"data={out / 'data'}", f"genotype={genotype}", f"cache={cache}",
                                               f"channels={cfg.channels}", "progress_bar=false",
                                               *warmstart_overrides(cfg)])


def common_segmenter(cfg: ExperimentConfig, out: Path) -> str | None:
    """The warm start's pretrained segmenter folder (the named searches' ``init_from``); None without warm start."""
    if cfg.warmstart is None:
        return None
    from trainer.warmstart import pretrained_segmenter

    # every core: `make experiment` runs with OMP_NUM_THREADS=1 for its one-thread jobs, and nothing else runs yet
    ws = dataclasses.replace(_warm_config(cfg, out, "paif"), num_threads=os.cpu_count() or 1)
    return str(pretrained_segmenter(ws)[0])


def warm_starts(cfg: ExperimentConfig, out: Path, genotypes: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The common starting point of every arm, per genotype (``trainer.warmstart``, cached under ``out/cache``).

    Starts already in the cache are used as they are (also one copied in alone from another machine's run:
    ``trainer.warmstart.warm_start``). For the others, the segmenter is pretrained once, in this process with every
    core (its cache key does not depend on the genotype); then each genotype's fusion net is warmed up in its own
    ``python -m trainer.warmstart`` process, ``workers`` at a time (log: ``out/warmstarts/<genotype>.log``).
    ``best-random`` takes the start of the random genotype it resolves to (see :func:`select_best_random`).
    """
    if cfg.warmstart is None:
        return {}
    from trainer.warmstart import warm_start

    used = [name for name in dict.fromkeys(_parse_run(run, len(cfg.seeds))[1] for run in cfg.runs)
            if name != BEST_RANDOM]
    configs = {name: _warm_config(cfg, out, genotypes[name]) for name in used}
    infos = {name: info for name, ws in configs.items() if (info := warm_start(ws, compute=False)) is not None}
    todo = [name for name in used if name not in infos]
    if todo:  # the segmenter only makes new starts: a run whose starts are all cached (or copied in) needs none
        common_segmenter(cfg, out)
        logs = out / "warmstarts"
        logs.mkdir(exist_ok=True)
        log.info("warming up the fusion nets of %s (%d at a time; logs in %s)", ", ".join(todo), cfg.workers, logs)

        def one(name: str) -> None:
            ws = configs[name]
            _run([sys.executable, "-m", "trainer.warmstart", "--skip-data-check", f"data={ws.data}",
                  f"genotype={ws.genotype}", f"cache={ws.cache}", f"channels={ws.channels}", "progress_bar=false",
                  *warmstart_overrides(cfg)], logs / f"{name.replace(':', '-')}.log")

        with cf.ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
            for fut in [pool.submit(one, name) for name in todo]:
                fut.result()
    for name in todo:
        infos[name] = warm_start(configs[name], compute=False)
        if infos[name] is None:
            raise RuntimeError(f"warm start for {name}: its process finished without a cached start under "
                               f"{configs[name].cache}; see {out / 'warmstarts'}")
    return {name: {**infos[name], "weights_sha256": start_sha256(infos[name])} for name in used}


def _selection_miou(report: dict[str, Any], threat: str) -> float:
    if threat == "clean":
        return float(report["clean"]["segmentation"]["miou"])
    return float(report["threats"][threat]["segmentation"]["miou"])


def selection_eval_args(cfg: ExperimentConfig, checkpoint: str, out: Path, vdir: Path, seed: int) -> list[str]:
    """``trainer/evaluate.py`` arguments of one selection evaluation: ``selection.threat`` alone (``paif`` when
    it is ``clean``, whose number every report has) on ``selection.split``, no sweep, no masking checks and no
    per-modality runs (evaluate's default ``per_modality=[paif]`` names a threat this evaluation does not run)."""
    sel = cfg.selection
    threat = sel.threat if sel.threat != "clean" else "paif"
    flags, items = _eval_budget(cfg, sel.limit)
    return ["--checkpoint", checkpoint, "--data", str(out / "data"), "--split", sel.split, "--threat", threat,
            "--out", str(vdir), "--batch-size", str(cfg.eval_batch_size), "--device", "cpu", "--seed", str(seed),
            "--no-progress", *flags, "eps_sweep=[]", "masking.enabled=false", "per_modality=[]", *items,
            "num_threads=1"]


def select_best_random(cfg: ExperimentConfig, out: Path, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``random:`` arm whose first-seed checkpoint has the highest mIoU under ``selection.threat`` on
    ``selection.split`` (validation; never test). Cached in ``out/selection.json``; each arm's validation
    evaluation is kept in ``jobs/<key>/val_eval/``.

    Raises:
        RuntimeError: no finished ``random:`` arm of the first seed.
    """
    sel = cfg.selection
    cands = [r for r in results if str(r["job"]["genotype"]).startswith(RANDOM_PREFIX)
             and r["job"]["seed"] == cfg.seeds[0]]
    if not cands:
        raise RuntimeError(f"{BEST_RANDOM}: expected finished {RANDOM_PREFIX}<seed> arms of seed {cfg.seeds[0]} to "
                           "choose from, got none")
    path = out / "selection.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if set(cached["values"]) == {r["job"]["label"] for r in cands}:
            return cached
    jobs = [Job(**{**r["job"], "overrides": tuple(r["job"].get("overrides", ()))}) for r in cands]

    def evaluate_one(job: Job, checkpoint: str) -> None:
        vdir = out / "jobs" / job.key / "val_eval"
        if not (vdir / "report.json").is_file():
            _run(_python("trainer/evaluate.py", *selection_eval_args(cfg, checkpoint, out, vdir, job.seed)),
                 out / "jobs" / job.key / "job.log")

    with cf.ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:  # `workers` evaluations at a time
        for fut in [pool.submit(evaluate_one, job, r.get("checkpoint", "")) for job, r in zip(jobs, cands)]:
            fut.result()
    values: dict[str, dict[str, Any]] = {}
    for job in jobs:
        report = json.loads((out / "jobs" / job.key / "val_eval" / "report.json").read_text())
        values[job.label] = {"genotype": job.genotype, "miou": _selection_miou(report, sel.threat)}
    best = max(values, key=lambda label: values[label]["miou"])  # ties: the first listed
    selection = {"split": sel.split, "threat": sel.threat, "limit": sel.limit, "values": values,
                 "best": {"label": best, "genotype": values[best]["genotype"]}}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(selection, indent=2) + "\n")
    os.replace(tmp, path)
    log.info("best random genotype on %s under %s: %s (%.1f %% mIoU)", sel.split, sel.threat, best,
             100 * values[best]["miou"])
    return selection


def reuse_job(job: Job, source: Job, out: Path) -> dict[str, Any] | None:
    """``source``'s finished result under ``job``'s label (the same genotype, mode, seed and overrides), or None."""
    done = out / "jobs" / source.key / "done.json"
    if (job.mode, job.seed, job.overrides) != (source.mode, source.seed, source.overrides) or not done.is_file():
        return None
    text = json.dumps({**json.loads(done.read_text()), "job": dataclasses.asdict(job), "reused_from": source.key},
                      indent=2) + "\n"
    target = out / "jobs" / job.key / "done.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return json.loads(text)


def run_jobs(jobs: Sequence[Job], cfg: ExperimentConfig, out: Path, genotypes: dict[str, str],
             starts: dict[str, dict[str, Any]], desc: str = "experiment") -> tuple[list[dict[str, Any]], list[str]]:
    """Run ``jobs`` (``workers`` at a time); (results, failures) — a failed job does not stop the others."""
    from tqdm import tqdm

    results: list[dict[str, Any]] = []
    failures: list[str] = []
    with cf.ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        futures = {pool.submit(run_job, job, cfg, out, genotypes, starts): job
                   for job in run_order(jobs, out)}
        for fut in tqdm(cf.as_completed(futures), total=len(futures), desc=desc, unit="job"):
            job = futures[fut]
            try:
                results.append(fut.result())
                log.info("done %s", job.key)
            except Exception as exc:  # keep the other jobs; report at the end
                failures.append(f"{job.key}: {exc}")
                log.error("failed %s: %s", job.key, exc)
    return results, failures


def best_random_phase(cfg: ExperimentConfig, out: Path, jobs: Sequence[Job], results: Sequence[dict[str, Any]],
                      genotypes: dict[str, str], starts: dict[str, dict[str, Any]]
                      ) -> tuple[list[dict[str, Any]], list[str], dict[str, Any] | None]:
    """Choose ``best-random`` on the validation split, then run its jobs (the chosen arm's own job is reused)."""
    if not jobs:
        return [], [], None
    try:
        selection = select_best_random(cfg, out, results)
    except Exception as exc:
        return [], [f"{BEST_RANDOM}: {exc}"], None
    spec, label = selection["best"]["genotype"], selection["best"]["label"]
    genotypes[BEST_RANDOM] = genotypes[spec]
    if spec in starts:
        starts[BEST_RANDOM] = starts[spec]
    source = {(r["job"]["seed"]): Job(**{**r["job"], "overrides": tuple(r["job"].get("overrides", ()))})
              for r in results if r["job"]["label"] == label}
    reused, todo = [], []
    for job in jobs:
        hit = reuse_job(job, source[job.seed], out) if job.seed in source else None
        (reused.append(hit) if hit is not None else todo.append(job))
    done, failures = run_jobs(todo, cfg, out, genotypes, starts, desc=BEST_RANDOM)
    return reused + done, failures, selection


def finished_note(finished_jobs: str) -> str:
    """How a report rebuilt with ``--report`` names what it covers; ``finished_jobs`` is ``"N of M"``."""
    done, _, planned = finished_jobs.partition(" of ")
    return f"**Partial: {finished_jobs} jobs finished**" if done != planned else f"All {finished_jobs} jobs finished"


def recorded_starts(jobs: Sequence[Job], out: Path) -> dict[str, dict[str, Any]]:
    """{genotype: the warm start's cache record} of the starts the jobs' retrainings began from, where the record
    (``start-<key>.json`` beside the start) is still there; nothing is computed."""
    found: dict[str, dict[str, Any]] = {}
    for job in jobs:
        start = trained_from(out / "jobs" / job.key)
        record = Path(start).with_suffix(".json") if start else None
        if job.genotype not in found and record is not None and record.is_file():
            found[job.genotype] = json.loads(record.read_text())
    return found


def report_only(cfg: ExperimentConfig, jobs: Sequence[Job], out: Path) -> int:
    """Tables and plot from the finished jobs alone (an experiment still running, or stopped part-way)."""
    done = [out / "jobs" / job.key / "done.json" for job in jobs]
    results = [json.loads(p.read_text()) for p in done if p.is_file()]
    if not results:
        print(f"error: no finished job under {out / 'jobs'}; expected done.json files", file=sys.stderr)
        return 2
    extras: dict[str, Any] = {"finished_jobs": f"{len(results)} of {len(jobs)}",
                              "warm_start": recorded_starts(jobs, out)}
    if cfg.report == "search_quality":
        from trainer.search_quality import write_search_quality

        searches = {name: json.loads((out / "searches" / name / "search_result.json").read_text())
                    for name in cfg.searches if (out / "searches" / name / "search_result.json").is_file()}
        sel = out / "selection.json"
        path = write_search_quality(cfg, out, results, searches, json.loads(sel.read_text()) if sel.is_file() else None,
                                    float("nan"), extras=extras)
        print(path.read_text())
        return 0
    baseline_path = out / "max_rule_fusion.json"
    if baseline_path.is_file():
        extras["max_rule_fusion"] = json.loads(baseline_path.read_text())
    path = write_outputs(cfg, out, results, None, float("nan"), extras=extras)
    print(path.read_text())
    return 0


#: an archived arm: its result (``done.json``), its training marker and its evaluation's report; the picture rows
#: of the strongest threat (``eval/grid_<threat>.npz``, ~1.6 MB) only for the ``grid_pair`` arms of the first seed,
#: the ones ``grid.png`` shows
ARCHIVED_ARM_FILES = ("done.json", "train_done.json", "eval/report.json", "eval/report.md")


def archive(cfg: ExperimentConfig, jobs: Sequence[Job], out: Path, dest: Path) -> int:
    """``--archive DEST``: what another machine needs to continue this run, and what its report is built from.

    Runs nothing. Rebuilds the report from the finished arms (:func:`report_only`), then copies into ``dest``, in the
    layout of an ``--out`` folder: ``cache/start-<key>.{pt,json}`` (the warm starts the finished arms name in their
    ``done.json``: a start recomputed on another machine has other weights, and :func:`check_starts` refuses to mix
    arms from two starts), ``jobs/<arm>/`` (:data:`ARCHIVED_ARM_FILES` of every finished arm, no checkpoints) and the
    report (``results.md``, ``results.json``, the plots, ``config.yaml``). Another machine continues with
    ``cp -r DEST/cache DEST/jobs <out>/`` and the same command: finished arms are taken as they are. Rerunning it
    adds the arms finished since. Exit code 0; 2 with a message when nothing has finished or a start is missing."""
    if cfg.report != "robustness":
        print(f"error: --archive: report={cfg.report!r} runs also depend on their searches, which are not archived; "
              "only robustness runs are", file=sys.stderr)
        return 2
    finished = [job for job in jobs if (out / "jobs" / job.key / "done.json").is_file()]
    cache = start_cache(cfg, out)
    starts = sorted({json.loads((out / "jobs" / job.key / "done.json").read_text()).get("start", {}).get("file")
                     for job in finished} - {None})
    missing = [n for n in starts if not ((cache / n).is_file() and (cache / n).with_suffix(".json").is_file())]
    if missing:
        print(f"error: --archive: the finished arms were retrained from {', '.join(missing)}, not found (with its "
              f".json record) in {cache}", file=sys.stderr)
        return 2
    code = report_only(cfg, jobs, out)  # also the error when nothing has finished
    if code:
        return code
    from trainer.report import grid_name

    grid_seed = cfg.seeds[0] if cfg.seeds else None
    strongest = cfg.threats[-1] if cfg.threats else "clean"  # the threat grid.png shows (write_outputs)
    copies: list[tuple[Path, Path]] = [(cache / n, dest / "cache" / n) for n in starts]
    copies += [(src.with_suffix(".json"), dst.with_suffix(".json")) for src, dst in copies]
    for job in finished:
        jdir = out / "jobs" / job.key
        names = list(ARCHIVED_ARM_FILES)
        if job.label in cfg.grid_pair and job.seed == grid_seed:
            names.append(f"eval/{grid_name(strongest, '.npz')}")
        copies += [(jdir / n, dest / "jobs" / job.key / n) for n in names if (jdir / n).is_file()]
    copies += [(p, dest / p.name) for p in sorted(out.iterdir())
               if p.is_file() and (p.suffix in (".md", ".png") or p.name in ("results.json", "config.yaml",
                                                                              "max_rule_fusion.json"))]
    for src, dst in copies:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    size = sum(dst.stat().st_size for _, dst in copies)
    print(f"archived {len(finished)} of {len(jobs)} finished arms and {len(starts)} start(s) in {dest} "
          f"({size / 1e6:.1f} MB); to continue on another machine: cp -r {dest}/cache {dest}/jobs <out>/ and run the "
          "same command with --out <out>", file=sys.stderr)
    return 0


#: --tiny: every stage at toy size (32x40 scenes, 2-step trainings, 1-step attacks on 2 images, 2-iteration
#: searches; warm starts cached in out/cache), seeds [0, 1] and at most 2 random arms: checks the whole command end
#: to end, measures nothing
TINY = [
    "workers=2", "seeds=[0,1]", "channels=4", "data.size=[32,40]", "data.n_train=6", "data.n_val=2", "data.n_test=2",
    'warmstart=["seg.steps=2","seg.batch_size=2","fusion.steps=1","fusion.batch_size=2","fusion.crop=[24,32]"]',
    'retrain=["max_steps=2","data.batch_size=2","data.val_limit=1","val.attack_steps=1","val.num_images=0",'
    '"aat.meta_iters=1","aat.inner_steps=1","attack.kind=fgsm","attack.steps=1","save_every_steps=1"]',
    'search=["epochs=1","max_train_batches=1","data.crop=[24,32]","data.batch_size=2","space.channels=4",'
    '"attack.name=fgsm","selection.max_batches=1"]',
    'search_extra=["epochs=2","warmup_epochs=1","max_train_batches=1","data.crop=[24,32]","data.batch_size=2",'
    '"space.channels=4","selection.max_batches=1","log_every_n_steps=1"]',
    "eval_steps=1", "eval_limit=2", "eval_batch_size=2", "selection.limit=2", "eps_sweep=[]",
    'cache=""',  # the toy warm starts stay in out/cache, never in a cache shared with real experiments
    'eval_extra=["masking.queries=2","per_modality=[]"]',
]


def tiny_runs(cfg: ExperimentConfig, max_random: int = 2) -> ExperimentConfig:
    """``cfg`` with at most ``max_random`` ``random:`` runs (the others kept): the run list of ``--tiny``."""
    kept, n = [], 0
    for run in cfg.runs:
        if len(run) > 1 and str(run[1]).startswith(RANDOM_PREFIX):
            n += 1
            if n > max_random:
                continue
        kept.append(run)
    cfg.runs = kept
    return cfg


@entry_point
def main(argv: list[str] | None = None) -> int:
    """Exit code 0; 1 when some jobs failed (listed); 2 with one line on stderr for bad settings or a file-system
    error (the out folder is then marked FAILED)."""
    tune_malloc()
    p = argparse.ArgumentParser(prog="python -m trainer.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML of ExperimentConfig keys")
    p.add_argument("--out", help="output folder (default runs/experiment)")
    p.add_argument("--plan", action="store_true", help="print the jobs and exit")
    p.add_argument("--report", action="store_true",
                   help="run nothing: rebuild results.json/.md and the plot from the finished jobs' done.json files")
    p.add_argument("--archive", metavar="DEST",
                   help="run nothing: copy the finished arms' result files, the starts they were retrained from and "
                        "the rebuilt report into DEST (another machine continues from them)")
    p.add_argument("--tiny", action="store_true",
                   help="toy sizes everywhere, seeds [0,1], at most 2 random arms: an end-to-end check, not a result")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. seeds=[0,1,2] workers=2")
    args = p.parse_args(argv)
    overrides = (TINY if args.tiny else []) + list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    cfg = load_config(ExperimentConfig, args.config, overrides)
    if args.tiny:
        cfg = tiny_runs(cfg)
    jobs = plan(cfg)
    if args.plan:
        for job in jobs:
            print(f"{job.key:32s} {job.label}")
        return 0
    out = Path(cfg.out)
    if args.report:
        return report_only(cfg, jobs, out)
    if args.archive:
        return archive(cfg, jobs, out, Path(args.archive))
    lock_run_dir(out)
    use_run_dir(out)
    setup_logging(out, filename="experiment.log")
    save_config(cfg, out / "config.yaml")
    t0 = time.time()
    genotypes, searched = prepare(cfg, out)
    searches = run_searches(cfg, out, genotypes, common_segmenter(cfg, out) if cfg.searches else None)
    starts = warm_starts(cfg, out, genotypes)
    check_starts(jobs, out, starts)
    baseline_path = out / "max_rule_fusion.json"
    if not baseline_path.is_file():
        baseline_path.write_text(json.dumps(max_rule_fusion_metrics(out / "data"), indent=2) + "\n")
    results, failures = run_jobs([j for j in jobs if j.genotype != BEST_RANDOM], cfg, out, genotypes, starts)
    more, more_failures, selection = best_random_phase(cfg, out, [j for j in jobs if j.genotype == BEST_RANDOM],
                                                       results, genotypes, starts)
    results, failures = results + more, failures + more_failures
    order = {job.key: i for i, job in enumerate(jobs)}
    results.sort(key=lambda r: order[Job(**r["job"]).key])
    if cfg.report == "search_quality":
        from trainer.search_quality import write_search_quality

        path = write_search_quality(cfg, out, results, searches, selection, time.time() - t0,
                                    extras={"warm_start": starts})
    else:
        path = write_outputs(cfg, out, results, searched, time.time() - t0,
                             extras={"warm_start": starts, "max_rule_fusion": json.loads(baseline_path.read_text())})
    print(path.read_text())
    if failures:
        print("failed jobs:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
