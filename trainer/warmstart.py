"""A common starting point for retraining on a CPU budget: a pretrained segmenter and a warmed-up fusion net.

PAIF (Liu et al., ACM MM 2023) starts its SegFormer from ImageNet-pretrained MiT weights. Without a download
the counterpart is to pretrain the segmenter once on the training split, on images fused by the plain max
rule (luminance ``max(IR, Y)`` with the visible chroma), and save it in the ``transformers`` format, so that
it enters retraining through the same ``pretrained=`` path a user with real MiT weights takes. The fusion net
is then fitted to reproduce that max-rule image (L1 on intensity and Sobel gradients; cheap: no segmenter), so
the segmenter sees the images it was trained on from the first joint step. (Warming it up on the
reference-free fusion loss instead, ``fusion.target=fusion_loss``, gives images unlike the max rule: on the
experiment's benchmark the start's held-out mIoU was 42.5 % against the segmenter's own 65.0 %, and retraining
spent its first hundreds of steps repairing that; fitted to the max rule the start holds 64.6 %.) Both are cached
by content hash (data files + recipe + genotype), so every arm of an experiment starts from the same point and it
is computed once::

    python -m trainer.warmstart --data data/synthetic --genotype paif --cache runs/cache [key=value ...]
    python trainer/retrain.py --genotype paif init_from=<printed start checkpoint> ...

Writes under ``cache``:

* ``segformer-<hash>/``: ``config.json`` + weights (``save_pretrained``) and ``pretrain.json`` (recipe, data
  fingerprint, loss curve, held-out mIoU on ``val_split``: never the test split);
  ``seg.scale=2`` (or 4) pretrains it on images upsampled by that factor, as a model built with that ``seg_scale``
  segments them (``search_space.pipeline.segment``); retrain such a start with ``seg_scale=`` the same factor;
* ``fusion-<hash>.pt``: the fusion net fitted alone (state dict, seconds, first and last loss); it needs no segmenter,
  so ``--fusion-only`` computes it while another process still pretrains the segmenter, and ``--beside-segmenter``
  (``scripts/demo.sh``) computes it there, waits for that segmenter's entry and writes the start;
* ``start-<hash>.pt``: a PAIF checkpoint (``trainer.checkpoint``) = the warmed fusion net + that segmenter,
  for ``retrain.py init_from=``; ``start-<hash>.json`` describes it.

Each entry is written atomically (temporary name, then rename); an interrupted stage restarts from its
beginning (stages take minutes), a finished one is never redone.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from trainer.config import ConfigError, check_channels, check_crop, check_lr, finite, load_config, require
from trainer.errors import entry_point
from trainer.finite import NonFiniteError

__all__ = ["SegPretrainConfig", "FusionWarmConfig", "WarmStartConfig", "max_rule_rgb", "data_fingerprint",
           "segmenter_key", "fusion_key", "pretrain_segmenter", "pretrained_segmenter", "warm_fusion", "fitted_fusion",
           "fusion_only", "warm_start",
           "weights_sha256", "start_weights_sha256", "main"]

log = logging.getLogger("trainer.warmstart")

RECIPE_VERSION = 1
"""Bumped whenever the code of a stage changes what it produces (part of every cache key)."""

THREAD_CHECK_EVERY = 10
"""Steps between two thread-count checks of :func:`warm_fusion` (``--beside-segmenter``)."""


FUSION_TARGETS = ("max_rule", "fusion_loss")


@dataclass
class SegPretrainConfig:
    """Segmenter pretraining on max-rule fused images (full images, random horizontal flips)."""

    steps: int = 1500
    batch_size: int = 8
    lr: float = 1e-3  # AdamW, linear warm-up then linear decay to 0
    weight_decay: float = 0.01
    warmup_steps: int = 50
    #: the segmenter sees the max-rule image upsampled by this factor (1, 2 or 4: ``search_space.pipeline.segment``);
    #: a start for a retraining with ``seg_scale`` = the same factor
    scale: int = 1
    #: width of SegFormer's all-MLP decode head (null: the variant's, 256 for b0). At ``scale`` 2 the head runs on
    #: a 4x larger grid and dominates the segmenter's cost (``bench/seg_head_cost.py``). The start checkpoint records
    #: it (``retrain.py init_from=`` builds that width); the saved ``config.json`` carries it for ``pretrained=`` users
    decoder_hidden_size: int | None = None
    #: clip the gradient's global L2 norm to this before every step (null: no clipping)
    clip_grad_norm: float | None = None


@dataclass
class FusionWarmConfig:
    """Fusion-net warm-up alone, no segmenter (random crops).

    ``target``: ``max_rule`` fits the fused luminance to ``max(IR, Y)`` (L1 on intensity and gradients), the
    image the segmenter was pretrained on, so that retraining starts where the segmenter is good;
    ``fusion_loss`` minimises the reference-free fusion loss (:func:`trainer.losses.fusion_loss`) instead.
    """

    steps: int = 500
    target: str = "max_rule"
    batch_size: int = 4
    lr: float = 1e-3
    crop: list[int] = field(default_factory=lambda: [64, 80])


@dataclass
class WarmStartConfig:
    data: str = "data/synthetic"
    train_split: str = "train"
    val_split: str = "val"  # held-out split for the pretraining report (never test)
    genotype: str = "paif"
    channels: int | None = None  # fusion width override (null = the genotype's)
    segmenter: str = "b0"
    num_classes: int = 9
    seed: int = 0
    cache: str = "runs/cache"
    num_threads: int = 0  # torch CPU threads (0 = default)
    progress_bar: bool = True
    #: validate every training and held-out file first (cached; false or --skip-data-check skips it)
    data_check: bool = True
    #: refuse a fusion width above this (a memory guard; raise it on purpose)
    max_channels: int = 1024
    seg: SegPretrainConfig = field(default_factory=SegPretrainConfig)
    fusion: FusionWarmConfig = field(default_factory=FusionWarmConfig)

    def __post_init__(self) -> None:
        for split in (self.train_split, self.val_split):
            if split and split.lower().startswith("test"):
                raise ValueError(f"split: expected a training or held-out split, got {split!r}; the warm start "
                                 "must not see the test split")
        for name, value in (("seg.steps", self.seg.steps), ("seg.batch_size", self.seg.batch_size),
                            ("fusion.batch_size", self.fusion.batch_size)):
            if value < 1:
                raise ValueError(f"{name}: expected >= 1, got {value}")
        if self.fusion.steps < 0:
            raise ValueError(f"fusion.steps: expected >= 0, got {self.fusion.steps}")
        check_lr(self.seg.lr, "seg.lr")
        check_lr(self.fusion.lr, "fusion.lr")
        require(finite(self.seg.weight_decay) and self.seg.weight_decay >= 0, "seg.weight_decay", "a number >= 0",
                self.seg.weight_decay)
        require(self.seg.warmup_steps >= 0, "seg.warmup_steps", "an integer >= 0", self.seg.warmup_steps)
        clip = self.seg.clip_grad_norm
        require(clip is None or (not isinstance(clip, bool) and finite(clip) and clip > 0), "seg.clip_grad_norm",
                "null or a number > 0", clip)
        head = self.seg.decoder_hidden_size
        require(head is None or (isinstance(head, int) and not isinstance(head, bool) and head >= 1),
                "seg.decoder_hidden_size", "null or an integer >= 1", head)
        from search_space.pipeline import check_seg_scale

        check_seg_scale(self.seg.scale, "seg.scale")
        check_crop(self.fusion.crop or None, "fusion.crop")
        require(self.fusion.target in FUSION_TARGETS, "fusion.target", f"one of {', '.join(FUSION_TARGETS)}",
                self.fusion.target)
        if self.channels is not None:
            check_channels(self.channels, self.max_channels, "channels")


# ---------------------------------------------------------------------------------------------- helpers
def max_rule_rgb(ir: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """The plain max-rule fusion as an RGB image: luminance ``max(IR, Y)`` with the visible Cb, Cr.

    Args:
        ir: (B, 1, H, W) in [0, 1].
        vis: (B, 3, H, W) RGB in [0, 1].
    Returns:
        (B, 3, H, W) RGB in [0, 1].
    """
    from rgbt.color import rgb_to_ycbcr, ycbcr_to_rgb

    ycbcr = rgb_to_ycbcr(vis)
    y = torch.maximum(ir, ycbcr[:, :1])
    return ycbcr_to_rgb(torch.cat((y, ycbcr[:, 1:]), 1)).clamp(0.0, 1.0)


def data_fingerprint(dataset: Any) -> str:
    """SHA-256 over the names and bytes of every file of an ``RGBTDataset`` (order-independent of listing)."""
    h = hashlib.sha256()
    for name, files in sorted(zip(dataset.names, dataset.samples)):
        h.update(name.encode())
        for role in sorted(files):
            h.update(role.encode())
            h.update(hashlib.sha256(Path(files[role]).read_bytes()).digest())
    return h.hexdigest()


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict, keys sorted: each key's name, then its tensor's bytes in memory order. Equal weights
    give equal hashes whatever the file around them (a checkpoint also holds its creation time)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def start_weights_sha256(path: str | Path) -> str:
    """:func:`weights_sha256` of a start checkpoint's weights: what tells two starts apart when one was recomputed
    (on another machine, say) from the same data and recipe, which give the same file name."""
    from trainer.checkpoint import load_checkpoint

    return weights_sha256(load_checkpoint(path)["state_dict"])


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _seg_recipe(seg: SegPretrainConfig) -> dict[str, Any]:
    """The ``seg.*`` settings as they enter the cache key: ``scale`` only when it is not 1, so the keys of entries
    written before ``seg.scale`` existed (all at scale 1) stay the same."""
    recipe = dataclasses.asdict(seg)
    if recipe["scale"] == 1:
        del recipe["scale"]
    for name in ("decoder_hidden_size", "clip_grad_norm"):  # keys of caches made before a setting existed stay valid
        if recipe[name] is None:
            del recipe[name]
    return recipe


def segmenter_key(cfg: WarmStartConfig, fingerprint: str, val_fingerprint: str | None) -> str:
    """Cache key of the pretrained segmenter: recipe version, training data, segmenter, classes, seed, ``seg.*``
    recipe and held-out data (whose mIoU the report holds)."""
    return _key(RECIPE_VERSION, fingerprint, cfg.segmenter, cfg.num_classes, cfg.seed, _seg_recipe(cfg.seg),
                val_fingerprint)


def _batches(dataset: Any, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded shuffled batches (the dataset's own crop/flip, keyed by epoch)."""
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g, drop_last=True)
        for batch in loader:
            yield {k: v for k, v in batch.items() if torch.is_tensor(v)}
        epoch += 1


def _lr_factor(step: int, total: int, warmup: int) -> float:
    from trainer.module import warmup_poly

    return warmup_poly(step, total, warmup, warmup_start=0.01, power=1.0)


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, step: int, stage: str, lr_key: str,
          clip_grad_norm: float | None = None) -> float:
    """One optimiser step on ``loss`` (the gradient's global norm clipped to ``clip_grad_norm`` if set); a non-finite
    loss stops the stage with an error naming the LR key."""
    if not torch.isfinite(loss):
        raise NonFiniteError(f"{stage}: non-finite loss {loss.item()} at step {step}; lower {lr_key}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip_grad_norm)
    opt.step()
    return loss.item()


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr)


# ---------------------------------------------------------------------------------------------- stages
def pretrain_segmenter(cfg: WarmStartConfig, train: Any, val: Any | None, out_dir: Path) -> dict[str, Any]:
    """Train a SegFormer on max-rule fused training images and ``save_pretrained`` it into ``out_dir``.

    The input is normalised and segmented exactly as in :class:`search_space.pipeline.FusionSegModel` (per image;
    :func:`search_space.pipeline.segment` at ``seg.scale``). Returns the report written to ``out_dir/pretrain.json``.
    (Before ``segment`` the images were not padded to a multiple of 32 here: for such sizes, as the benchmark's 96×128,
    scale 1 computes exactly what it did.)
    """
    from search_space.pipeline import normalize_per_image, segment
    from search_space.segmenter import build_segmenter
    from trainer.metrics import ConfusionMatrix

    torch.manual_seed(cfg.seed)
    s = cfg.seg
    seg = build_segmenter(cfg.segmenter, cfg.num_classes, decoder_hidden_size=s.decoder_hidden_size)
    opt = torch.optim.AdamW(seg.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    losses: list[float] = []
    t0 = time.time()
    batches = _batches(train, s.batch_size, cfg.seed)
    with _progress(s.steps, "pretrain segmenter", cfg.progress_bar) as bar:
        for step in range(s.steps):
            for group in opt.param_groups:
                group["lr"] = s.lr * _lr_factor(step, s.steps, s.warmup_steps)
            b = next(batches)
            logits = segment(seg, normalize_per_image(max_rule_rgb(b["ir"], b["vis"])), s.scale)
            loss = F.cross_entropy(logits, b["label"], ignore_index=255)
            losses.append(_step(opt, loss, step, "segmenter pretraining", "seg.lr", s.clip_grad_norm))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if (step + 1) % 100 == 0:
                log.info("segmenter pretraining: step %d/%d, loss %.3f (mean of the last 100: %.3f), %.0f s", step + 1,
                         s.steps, losses[-1], sum(losses[-100:]) / 100, time.time() - t0)
    report: dict[str, Any] = {"recipe": dataclasses.asdict(s), "seconds": time.time() - t0,
                              "loss_every_50": losses[::50] + losses[-1:]}
    if val is not None:
        cm = ConfusionMatrix(cfg.num_classes)
        seg.eval()
        with torch.no_grad():
            for i in range(len(val)):
                item = val[i]
                logits = segment(seg, normalize_per_image(max_rule_rgb(item["ir"][None], item["vis"][None])), s.scale)
                cm.update(logits.argmax(1), item["label"][None])
        metrics = cm.compute()
        report["val"] = {k: v for k, v in metrics.items() if isinstance(v, float)}
        log.info("segmenter pretraining: held-out (%s) mIoU %.1f %%", cfg.val_split, 100 * metrics["miou"])
    seg.model.save_pretrained(str(out_dir))
    (out_dir / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def warm_fusion(cfg: WarmStartConfig, genotype: Any, train: Any,
                threads: Callable[[], int] | None = None) -> tuple[torch.nn.Module, list[float]]:
    """The fixed fusion net of ``genotype`` after ``cfg.fusion.steps`` AdamW steps on ``cfg.fusion.target`` alone.

    ``max_rule``: ``|F - M|₁ + | |∇F| - |∇M| |₁`` with ``M = max(IR, Y)`` (``|∇·|`` = Sobel magnitude); the
    intensity term alone leaves blurred edges (Qabf 0.22 against 0.44 with the gradient term, 200 vs 500 steps
    on the benchmark). ``fusion_loss``: :func:`trainer.losses.fusion_loss`.

    ``threads``: called every :data:`THREAD_CHECK_EVERY` steps; a positive answer other than the current torch thread
    count switches to it (``--beside-segmenter``: one thread while another process pretrains the segmenter).
    """
    from rgbt.color import rgb_to_y
    from search_space.genotype import build_fusion_net
    from trainer.losses import fusion_loss, sobel_magnitude

    torch.manual_seed(cfg.seed)
    net = build_fusion_net(genotype).train()
    f = cfg.fusion
    opt = torch.optim.AdamW(net.parameters(), lr=f.lr, weight_decay=0.0)
    losses: list[float] = []
    batches = _batches(train, f.batch_size, cfg.seed + 1)
    with _progress(f.steps, "warm up fusion", cfg.progress_bar) as bar:
        for step in range(f.steps):
            if threads is not None and step % THREAD_CHECK_EVERY == 0:
                n = threads()
                if n > 0 and n != torch.get_num_threads():
                    log.info("fusion warm-up: %d torch thread(s) from step %d", n, step)
                    torch.set_num_threads(n)
            for group in opt.param_groups:
                group["lr"] = f.lr * _lr_factor(step, f.steps, min(20, f.steps // 5))
            b = next(batches)
            y = rgb_to_y(b["vis"])
            fused = net(b["ir"], y)
            if f.target == "max_rule":
                target = torch.maximum(b["ir"], y)
                loss = (fused - target).abs().mean() + (sobel_magnitude(fused) - sobel_magnitude(target)).abs().mean()
            else:
                loss, _ = fusion_loss(b["ir"], y, fused)
            losses.append(_step(opt, loss, step, "fusion warm-up", "fusion.lr"))
            bar.update(1)
    return net, losses


def fusion_key(cfg: WarmStartConfig, genotype: Any, fingerprint: str) -> str:
    """Cache key of the fitted fusion net: recipe version, training data, genotype, ``fusion.*`` recipe, seed. It
    does not depend on the segmenter, so the fit can run while the segmenter is still being pretrained."""
    return _key("fusion", RECIPE_VERSION, fingerprint, genotype.to_dict(), dataclasses.asdict(cfg.fusion), cfg.seed)


def fitted_fusion(cfg: WarmStartConfig, genotype: Any, fingerprint: str,
                  threads: Callable[[], int] | None = None) -> dict[str, Any]:
    """The fusion net of ``genotype`` fitted by :func:`warm_fusion`, cached as ``fusion-<key>.pt`` (computed once).

    Returns ``{"file", "state_dict", "seconds", "train_images", "losses_first_last"}`` (``seconds``: the fit's own time,
    also when it was found cached).
    """
    from rgbt.dataset import RGBTDataset
    from trainer.runs import atomic_save

    cache = Path(cfg.cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"fusion-{fusion_key(cfg, genotype, fingerprint)}.pt"
    if path.is_file():
        log.info("fusion warm-up cached: %s", path)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return {"file": str(path), **saved}
    log.info("warming up the fusion net -> %s", path)
    crop = tuple(cfg.fusion.crop) if cfg.fusion.crop else None
    fusion_train = RGBTDataset(cfg.data, cfg.train_split, crop=crop, flip=True, seed=cfg.seed)
    t0 = time.time()
    net, losses = warm_fusion(cfg, genotype, fusion_train, threads)
    saved = {"state_dict": net.state_dict(), "seconds": time.time() - t0, "train_images": len(fusion_train),
             "losses_first_last": [losses[0], losses[-1]] if losses else None}
    atomic_save(saved, path)
    return {"file": str(path), **saved}


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _segmenter_data(cfg: WarmStartConfig) -> tuple[Any, Any, str, str]:
    """(training set, held-out set or None, training-data fingerprint, segmenter cache key); files checked first."""
    from rgbt.dataset import RGBTDataset

    seg_train = RGBTDataset(cfg.data, cfg.train_split, flip=True, seed=cfg.seed, require_labels=True)
    val = RGBTDataset(cfg.data, cfg.val_split, require_labels=True) if cfg.val_split else None
    if cfg.data_check:
        from trainer.datacheck import check_datasets

        check_datasets([seg_train, val], progress=cfg.progress_bar,
                       opt_out="data_check=false or --skip-data-check skips this check")
    fingerprint = data_fingerprint(seg_train)
    val_fingerprint = data_fingerprint(val) if val is not None else None
    return seg_train, val, fingerprint, segmenter_key(cfg, fingerprint, val_fingerprint)


def pretrained_segmenter(cfg: WarmStartConfig, data: tuple[Any, Any, str, str] | None = None) -> tuple[Path, str, str]:
    """The cached segmenter pretrained on max-rule fused images (computed once).

    Returns ``(segformer-<hash>/ folder, its hash, fingerprint of the training split)``. ``data``: what
    ``_segmenter_data(cfg)`` returned, when the caller has it already (the files are checked once).

    A SegFormer folder for ``pretrained=`` / the search's ``init_from=``; it does not depend on the genotype.
    """
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    cache = Path(cfg.cache)
    cache.mkdir(parents=True, exist_ok=True)
    seg_train, val, fingerprint, seg_key = data or _segmenter_data(cfg)
    seg_dir = cache / f"segformer-{seg_key}"
    if not (seg_dir / "pretrain.json").is_file():
        log.info("pretraining the segmenter -> %s", seg_dir)
        tmp = _atomic_dir(seg_dir)
        try:
            pretrain_segmenter(cfg, seg_train, val, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed stage leaves nothing half-written behind
            raise
        shutil.rmtree(seg_dir, ignore_errors=True)
        os.replace(tmp, seg_dir)
    else:
        log.info("segmenter pretraining cached: %s", seg_dir)
    return seg_dir, seg_key, fingerprint


def fusion_only(cfg: WarmStartConfig, beside_segmenter: bool = False) -> dict[str, Any]:
    """Only the fusion-net fit of the warm start (cached like every stage); a later :func:`warm_start` with the same
    data, genotype and ``fusion.*`` recipe finds it cached and only adds the segmenter.

    ``beside_segmenter``: the segmenter of this ``cfg`` is being pretrained by another process (``scripts/demo.sh``
    runs it beside the search): fit on one torch thread while its cache entry is missing, on ``num_threads`` once it
    is there, so that the two stages share the cores and the fit takes both when the pretraining is done.
    """
    from trainer.checkpoint import resolve_genotype

    threads_wanted = cfg.num_threads if cfg.num_threads > 0 else torch.get_num_threads()
    _, _, fingerprint, seg_key = _segmenter_data(cfg)
    genotype = resolve_genotype(cfg.genotype, channels=cfg.channels)
    done = Path(cfg.cache) / f"segformer-{seg_key}" / "pretrain.json"

    def threads() -> int:
        return threads_wanted if done.is_file() else 1

    torch.set_num_threads(threads() if beside_segmenter else threads_wanted)
    fit = fitted_fusion(cfg, genotype, fingerprint, threads if beside_segmenter else None)
    return {"fusion": fit["file"], "seconds": fit["seconds"], "segmenter_dir": str(done.parent),
            "segmenter_done": done.is_file()}


def wait_for_segmenter(seg_dir: Path, timeout: float, poll: float = 1.0) -> None:
    """Wait until the segmenter folder ``seg_dir`` (:func:`fusion_only`'s ``segmenter_dir``) is complete in the cache
    (another process pretrains it: ``--segmenter-only``). :class:`TimeoutError` after ``timeout`` seconds (never
    computes it here)."""
    deadline = time.monotonic() + timeout
    if not (seg_dir / "pretrain.json").is_file():
        log.info("waiting for the segmenter pretraining of another process -> %s", seg_dir)
    while not (seg_dir / "pretrain.json").is_file():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"--beside-segmenter: the segmenter {seg_dir} was not in the cache after {timeout:g} s; "
                               "start its pretraining (--segmenter-only, the same data and seg.* settings) or raise "
                               "--segmenter-wait")
        time.sleep(poll)


def warm_start(cfg: WarmStartConfig, compute: bool = True) -> dict[str, Any] | None:
    """Pretrained segmenter + warmed fusion net, cached; returns ``{"segmenter_dir", "start", ...}``.

    ``compute=False``: only a cached start, None when there is none (nothing is computed).

    A cached start needs neither the segmenter's nor the fusion fit's cache entry: a start checkpoint and its
    ``.json`` record copied alone into another cache (``start-<key>.pt`` / ``.json``, e.g. from another machine,
    whose arithmetic would give other weights) is used as it is, and the record returned names the files where they
    are now (``start``; ``segmenter_dir``, which may then be absent).
    """
    from search_space.pipeline import build_model
    from trainer.checkpoint import resolve_genotype, save_checkpoint

    data = _segmenter_data(cfg)
    fingerprint, seg_key = data[2], data[3]
    cache = Path(cfg.cache)
    genotype = resolve_genotype(cfg.genotype, channels=cfg.channels)

    start_key = _key(seg_key, genotype.to_dict(), dataclasses.asdict(cfg.fusion))
    start = cache / f"start-{start_key}.pt"
    info_path = start.with_suffix(".json")
    if start.is_file() and info_path.is_file():
        log.info("warm start cached: %s", start)
        return {**json.loads(info_path.read_text()), "start": str(start),
                "segmenter_dir": str(cache / f"segformer-{seg_key}")}
    if not compute:
        return None
    seg_dir, _, _ = pretrained_segmenter(cfg, data)
    fit = fitted_fusion(cfg, genotype, fingerprint)
    model = build_model(genotype, segmenter=cfg.segmenter, num_classes=cfg.num_classes, pretrained=str(seg_dir),
                        seg_scale=cfg.seg.scale)
    model.fusion.load_state_dict(fit["state_dict"])
    card = {"training": {"mode": "warmstart",
                         "summary": "warm start: SegFormer pretrained on max-rule fused images, fusion net warmed "
                                    f"up alone (target {cfg.fusion.target}; python -m trainer.warmstart)",
                         "recipe": {"seg.steps": cfg.seg.steps, "seg.lr": cfg.seg.lr, "seg.scale": cfg.seg.scale,
                                    "fusion.steps": cfg.fusion.steps, "fusion.lr": cfg.fusion.lr,
                                    "fusion.target": cfg.fusion.target, "seed": cfg.seed}},
            "data": {"root": cfg.data, "train_split": cfg.train_split, "train_images": fit["train_images"],
                     "fingerprint": fingerprint}}
    save_checkpoint(start, model, genotype, {"variant": cfg.segmenter, "num_classes": cfg.num_classes},
                    {"warmstart": dataclasses.asdict(cfg)}, card=card)
    info = {"start": str(start), "segmenter_dir": str(seg_dir), "genotype": genotype.to_dict(),
            "data_fingerprint": fingerprint, "fusion_seconds": fit["seconds"],
            "fusion_loss_first_last": fit["losses_first_last"],
            "segmenter": json.loads((seg_dir / "pretrain.json").read_text()),
            "weights_sha256": start_weights_sha256(start)}
    tmp_info = info_path.with_name(f".{info_path.name}.tmp")
    tmp_info.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp_info, info_path)
    return json.loads(info_path.read_text())


@entry_point
def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 with one line on stderr (bad settings or data, divergence, a file-system error)."""
    from trainer.runs import atomic_write_text, setup_logging, tune_malloc

    tune_malloc()

    p = argparse.ArgumentParser(prog="python -m trainer.warmstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML of WarmStartConfig keys")
    p.add_argument("--data", help="dataset root (= data=...)")
    p.add_argument("--genotype", help="genotype name or JSON file (= genotype=...)")
    p.add_argument("--cache", help="cache folder (= cache=...)")
    p.add_argument("--json", help="also write the summary (start checkpoint, segmenter folder) to this file")
    p.add_argument("--skip-data-check", action="store_true", help="alias of data_check=false")
    p.add_argument("--segmenter-only", action="store_true",
                   help="only the (genotype-independent) segmenter pretraining; a later call with the same data and "
                        "seg.* recipe finds it cached (scripts/demo.sh runs it beside the search)")
    p.add_argument("--fusion-only", action="store_true",
                   help="only the fusion-net fit (it needs no segmenter); a later call with the same data, genotype "
                        "and fusion.* recipe finds it cached")
    p.add_argument("--beside-segmenter", action="store_true",
                   help="another process is pretraining this recipe's segmenter (--segmenter-only): fit the fusion "
                        "net on one thread until its cache entry appears, then on num_threads; without --fusion-only "
                        "then wait for that entry and write the start checkpoint")
    p.add_argument("--segmenter-wait", type=float, default=3600.0,
                   help="with --beside-segmenter: seconds to wait for the other process's segmenter (default 3600)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. seg.steps=800 channels=16")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    for key in ("data", "genotype", "cache"):
        if getattr(args, key):
            overrides.append(f"{key}={getattr(args, key)}")
    if args.skip_data_check:
        overrides.append("data_check=false")
    setup_logging(None)
    if args.segmenter_only and args.fusion_only:
        raise ConfigError("--segmenter-only and --fusion-only: expected at most one of them (neither: both stages)")
    if args.beside_segmenter and args.segmenter_only:
        raise ConfigError("--beside-segmenter: expected without --segmenter-only (it fits the fusion net beside "
                          "another process's segmenter pretraining)")
    if not args.segmenter_wait > 0:
        raise ConfigError(f"--segmenter-wait: expected a number of seconds > 0, got {args.segmenter_wait:g}")
    cfg = load_config(WarmStartConfig, args.config, overrides)
    if args.fusion_only:
        result = fusion_only(cfg, args.beside_segmenter)
    else:
        if args.beside_segmenter:  # the fit first, beside the other process; the segmenter is then read from the cache
            wait_for_segmenter(Path(fusion_only(cfg, beside_segmenter=True)["segmenter_dir"]), args.segmenter_wait)
        if args.segmenter_only:
            seg_dir = pretrained_segmenter(cfg)[0]
            info = {"start": None, "segmenter_dir": str(seg_dir),
                    "segmenter": json.loads((seg_dir / "pretrain.json").read_text())}
        else:
            info = warm_start(cfg)
        result = {"start": info["start"], "segmenter_dir": info["segmenter_dir"],
                  "segmenter_val_miou": info["segmenter"].get("val", {}).get("miou")}
    summary = json.dumps(result, indent=2)
    print(summary)
    if args.json:
        atomic_write_text(summary + "\n", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
