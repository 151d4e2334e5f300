"""Robustness card: one command that measures a fusion + segmentation model against what RGB-T rigs meet.

An L∞ ball around a pixel-aligned pair is one threat. The card adds the others, in six *families*:

* ``threats``          the L∞ threat models of ``trainer/evaluate.py`` (default ``paif`` and ``strong``), run
                       through :func:`trainer.evaluate.evaluate` itself (its full report lands in ``threats/``);
* ``vis-corruptions``  Gaussian noise, motion blur, fog, low light, glare, JPEG on the visible image;
* ``ir-corruptions``   noise, blur, stripe / fixed-pattern noise, low thermal contrast, dead pixels on the IR;
* ``sensor-faults``    one sensor missing (zeros, mean grey, frozen earlier frame) or saturated;
* ``misregistration``  IR shifted by 1, 2, 4, 8 px, rotated by 1° and 2°, scaled by ±2 % relative to VIS;
* ``patches``          a universal adversarial patch on VIS and a thermal patch on IR (2 % and 5 % of the image),
                       optimised on the training split, placed on objects of the test images.

Corruptions: ``robustness/corruptions.py``; patches: ``robustness/patches.py``. Each member of a family is
evaluated at each of its levels (severities 1-5, faults, shifts, patch sizes) on the test split: mIoU over the
confusion matrix of all images, as in the evaluation report.

Aggregate (mCE-style, Hendrycks & Dietterich, ICLR 2019): with E = 1 − mIoU, a member's corruption error is
CE = Σ_levels E_model / Σ_levels E_reference, and a family's score is 100 × the mean CE of its members. The
reference checkpoint scores 100 by definition; below 100 is more robust than the reference.

Resumable per family: each family's result is its own file ``families/<family>.json`` (written atomically,
with a fingerprint of the settings it depends on); a rerun skips every family whose file matches, so an
interrupted card resumes at the family it was in. Optimised patches are cached in ``patches/``.

Usage::

    python trainer/evaluate.py --suite card --checkpoint aat.pt --data runs/experiment/data \
        --reference no_aat.pt --out runs/card-aat [--family vis-corruptions ...] [key=value ...]
    # the reference may also be the directory of a finished card (its family files are reused):
    python trainer/evaluate.py --suite card --checkpoint aat.pt --data DIR --reference runs/card-no-aat
    # a quick, cheap card (short attacks, few patch steps; not the protocol):
    python trainer/evaluate.py --suite card --checkpoint ckpt.pt --data DIR threats=[paif] steps=1 \
        masking.enabled=false patch.steps=5

Writes ``card.md`` (tables, radar chart, worst cases, how to read it), ``card.json``, ``radar.png``,
``worst_<family>.png``, ``patches.png``, ``families/*.json``, ``threats/`` (the evaluation report of the
threat models), ``reference/`` (the reference's families, when the reference is a checkpoint), ``config.yaml``
and ``card.log``.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Subset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from rgbt.dataset import DataError, RGBTDataset  # noqa: E402
from robustness.attacks import seg_scores  # noqa: E402
from robustness.corruptions import (  # noqa: E402
    CORRUPTIONS, FAULTS, MISREGISTRATIONS, SEVERITIES, corrupt, fault, image_seed, misregister,
)
from robustness.patches import (  # noqa: E402
    IGNORE_INDEX, Patch, optimise_patch, paste, patch_side, place_on_objects, thermal_range,
)
from trainer.checkpoint import load_model  # noqa: E402
from trainer.config import ConfigError, config_to_dict, parse_overrides, require, save_config  # noqa: E402
from trainer.errors import entry_point  # noqa: E402
from trainer.evaluate import (  # noqa: E402
    EvaluateConfig, MaskingConfig, _Accumulator, _batches, _np_img, _stack, add_run_options, evaluate,
    load_command_config, resolve_device,
)
from trainer.metrics import MIOU_CONVENTIONS  # noqa: E402
from trainer.report import _f, _table, save_grid, save_radar, to_jsonable, write_json  # noqa: E402
from trainer.runs import (  # noqa: E402
    atomic_save, atomic_write_text, make_run_dir, seed_everything, setup_logging, tune_malloc, versions,
)

log = logging.getLogger("trainer.robustness_card")

CARD_VERSION = 1
FAMILIES = ("threats", "vis-corruptions", "ir-corruptions", "sensor-faults", "misregistration", "patches")
FAMILY_TEXT = {
    "threats": "adversarial perturbations in an L∞ ball (white-box attacks on both images)",
    "vis-corruptions": "the visible camera degrades: noise, motion blur, fog, night, glare, JPEG",
    "ir-corruptions": "the thermal camera degrades: noise, blur, stripe noise, thermal crossover, dead pixels",
    "sensor-faults": "one sensor fails: no signal, a grey frame, a frozen earlier frame, or saturation",
    "misregistration": "the two cameras drift apart: the IR image shifted, rotated or scaled relative to VIS",
    "patches": "a physical attacker: a printed patch before the VIS camera, a heat/cold pad before the IR one",
}
MODALITY_NAME = {"ir": "IR", "vis": "VIS"}
#: cheap families first: an interrupted card keeps the most finished families
COMPUTE_ORDER = ("misregistration", "sensor-faults", "ir-corruptions", "vis-corruptions", "patches", "threats")


# ------------------------------------------------------------------------------------------------ config
@dataclass
class PatchConfig:
    """The universal patches of the ``patches`` family (robustness/patches.py)."""

    areas: list[float] = field(default_factory=lambda: [0.02, 0.05])  # size budgets, fractions of the image
    modalities: list[str] = field(default_factory=lambda: ["vis", "ir"])  # vis = printed patch, ir = thermal pad
    steps: int = 60  # signed-gradient steps, one training batch each
    batch_size: int = 8
    step_size: float = 0.05  # first step, a fraction of the value range; cosine decay to a tenth
    train_split: str = "train"  # the patches are optimised on this split, never on the evaluated one
    train_limit: int = 0  # first N training images only; 0 = all
    thermal_percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])  # thermal patch value range

    def __post_init__(self) -> None:
        require(bool(self.areas) and all(0 < a < 1 for a in self.areas), "patch.areas",
                "a non-empty list of fractions in (0, 1)", self.areas)
        require(bool(self.modalities) and set(self.modalities) <= {"ir", "vis"}, "patch.modalities",
                "a non-empty subset of [vis, ir]", self.modalities)
        require(self.steps >= 1, "patch.steps", "an integer >= 1", self.steps)
        require(self.batch_size >= 1, "patch.batch_size", "an integer >= 1", self.batch_size)
        require(self.step_size > 0, "patch.step_size", "a number > 0", self.step_size)
        require(self.train_limit >= 0, "patch.train_limit", "an integer >= 0", self.train_limit)
        p = self.thermal_percentiles
        require(len(p) == 2 and 0 <= p[0] < p[1] <= 100, "patch.thermal_percentiles",
                "[low, high] with 0 <= low < high <= 100", p)


@dataclass
class CardConfig:
    """Resolved configuration of one robustness card (YAML ``configs/card.yaml`` ← flags ← ``key=value``)."""

    checkpoint: str = ""  # the model of the card
    data: str = ""  # dataset root with a labelled evaluation split (and a training split for the patches)
    split: str = "test"
    out: str = ""  # output directory; empty: runs/card-<timestamp>
    reference: str = ""  # checkpoint or finished card directory; "" = the model is its own reference (all 100)
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    severities: list[int] = field(default_factory=lambda: list(range(1, SEVERITIES + 1)))  # of the corruptions
    threats: list[str] = field(default_factory=lambda: ["paif", "strong"])  # threat models of the threats family
    steps: int = 0  # 0 = the threat models' own step counts; N > 0 overrides them (quick checks only)
    masking: MaskingConfig = field(default_factory=MaskingConfig)  # gradient-masking checks of evaluate.py
    patch: PatchConfig = field(default_factory=PatchConfig)
    limit: int = 0  # first N evaluation images only; 0 = all
    batch_size: int = 8
    device: str = "auto"
    seed: int = 0  # seeds the corruptions, placements, patches and attacks
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    progress: bool = True
    miou_convention: str = "published"
    worst_rows: int = 2  # images shown per family in the worst-case pictures
    redraw: bool = False  # draw the worst-case pictures of finished families again (numbers kept; not threats)

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in FAMILIES]
        require(bool(self.families) and not bad, "families", f"a non-empty subset of {list(FAMILIES)}",
                self.families)
        require(bool(self.severities) and all(1 <= s <= SEVERITIES for s in self.severities), "severities",
                f"a non-empty list of integers in 1..{SEVERITIES}", self.severities)
        require(bool(self.threats), "threats", "at least one threat model name (e.g. [paif])", self.threats)
        require(self.steps >= 0, "steps", "an integer >= 0", self.steps)
        require(self.limit >= 0, "limit", "an integer >= 0", self.limit)
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        require(self.worst_rows >= 1, "worst_rows", "an integer >= 1", self.worst_rows)
        require(self.miou_convention in MIOU_CONVENTIONS, "miou_convention", f"one of {MIOU_CONVENTIONS}",
                self.miou_convention)


# -------------------------------------------------------------------------------------------- conditions
@dataclass
class Condition:
    """One member at one level: ``apply(batch) -> (ir, vis, mask)``; ``mask`` (B,1,H,W) marks pixels left out
    of the metric (under a patch), or None."""

    member: str
    level: str
    apply: Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def _seeds(cfg: CardConfig, batch: Mapping[str, Any], *parts: str) -> list[int]:
    return [image_seed(cfg.seed, *parts, name) for name in batch["name"]]


def _replace(b: Mapping[str, Any], modality: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple:
    """(ir, vis, mask) of batch ``b`` with the ``modality`` image replaced by ``x``."""
    return (x, b["vis"], mask) if modality == "ir" else (b["ir"], x, mask)


def _corruption_conditions(cfg: CardConfig, modality: str) -> list[Condition]:
    out = []
    for name, c in CORRUPTIONS.items():
        if c.modality != modality:
            continue
        for s in cfg.severities:
            def apply(b: dict[str, Any], name: str = name, s: int = s) -> tuple:
                return _replace(b, modality, corrupt(b[modality], name, s, _seeds(cfg, b, name)))
            out.append(Condition(name, str(s), apply))
    return out


def _fault_conditions() -> list[Condition]:
    out = []
    for modality in ("ir", "vis"):
        for name in FAULTS:
            def apply(b: dict[str, Any], modality: str = modality, name: str = name) -> tuple:
                return _replace(b, modality, fault(b[modality], name, b[f"prev_{modality}"]))
            out.append(Condition(f"{MODALITY_NAME[modality]} sensor", name, apply))
    return out


def _misregistration_conditions() -> list[Condition]:
    out = []
    for member, levels in MISREGISTRATIONS.items():
        for label, params in levels:
            def apply(b: dict[str, Any], params: tuple = params) -> tuple:
                return misregister(b["ir"], *params), b["vis"], None
            out.append(Condition(member, label, apply))
    return out


def _area_label(area: float) -> str:
    return f"{100 * area:g} %"


def _patch_conditions(cfg: CardConfig, patches: Mapping[tuple[str, float], Patch]) -> list[Condition]:
    out = []
    for (modality, area), p in patches.items():
        def apply(b: dict[str, Any], modality: str = modality, area: float = area, p: Patch = p) -> tuple:
            boxes = []
            for i, name in enumerate(b["name"]):
                g = torch.Generator().manual_seed(image_seed(cfg.seed, "patch", modality, f"{area:g}", name))
                boxes.append(place_on_objects(b["label"][i], p.side, g))
            return _replace(b, modality, *paste(b[modality], p.pixels.to(b[modality].device), boxes))
        out.append(Condition(f"{MODALITY_NAME[modality]} patch", _area_label(area), apply))
    return out


def _member_text(family: str, member: str, severities: Sequence[int]) -> str:
    """What a member does, in a few words, for the card's tables."""
    if family in ("vis-corruptions", "ir-corruptions"):
        c = CORRUPTIONS[member]
        params = ", ".join(f"{c.levels[s - 1]:g}" for s in severities)
        return f"{c.description}: {params}"
    if family == "sensor-faults":
        return f"the {member.split()[0]} camera fails (levels below the table)"
    if family == "misregistration":
        return {"shift": "IR moved right by d px", "rotate": "IR rotated about the centre",
                "scale": "IR scaled about the centre"}[member]
    if family == "patches":
        return ("printed patch on the visible image, any colour" if member.startswith("VIS")
                else "thermal pad on the infrared image, values within the training scenes' range")
    return ""


# -------------------------------------------------------------------------------------------- evaluation
class _Context:
    """What every family needs: the model, the evaluation dataset, the device, the checkpoint digest."""

    def __init__(self, cfg: CardConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model, self.meta = load_model(cfg.checkpoint, map_location=self.device)
        self.model.requires_grad_(False)
        self.num_classes = int(self.meta["segmenter"]["num_classes"])
        data = RGBTDataset(cfg.data, split=cfg.split)
        if not data.has_labels:
            raise DataError(f"{cfg.data} split {cfg.split!r}: expected labels (the card reports mIoU), got an "
                            "unlabelled split")
        self.dataset: Dataset = Subset(data, range(cfg.limit)) if 0 < cfg.limit < len(data) else data
        if len(self.dataset) == 0:
            raise DataError(f"{cfg.data} split {cfg.split!r}: expected at least one image, got none")
        self.digest = _file_digest(cfg.checkpoint)

    def fingerprint(self, family: str) -> dict[str, Any]:
        return fingerprint(self.cfg, family, self.digest)


def fingerprint(cfg: CardConfig, family: str, digest: str) -> dict[str, Any]:
    """The settings a family's numbers depend on; a family file with another fingerprint is recomputed."""
    fp: dict[str, Any] = {"version": CARD_VERSION, "checkpoint_sha256": digest, "data": str(cfg.data),
                          "split": cfg.split, "limit": cfg.limit, "seed": cfg.seed,
                          "miou_convention": cfg.miou_convention}
    if family in ("vis-corruptions", "ir-corruptions"):
        fp["severities"] = list(cfg.severities)
    elif family == "threats":
        fp.update(threats=list(cfg.threats), steps=cfg.steps, batch_size=cfg.batch_size,
                  masking=config_to_dict(cfg.masking))
    elif family == "patches":
        fp["patch"] = config_to_dict(cfg.patch)
    return fp


def _file_digest(path: str | Path) -> str:
    """The weights' content hash (``trainer.card.content_hash``): an evaluation recorded into the checkpoint's model
    card changes the file, not the model, so it must not invalidate finished families."""
    from trainer.card import content_hash
    from trainer.checkpoint import load_checkpoint

    return content_hash(load_checkpoint(path)["state_dict"]).split(":", 1)[1][:16]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _fit(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` (1, C, h, w) resized to the size of ``like`` (frames of different sizes in one split)."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def _with_previous(batch: dict[str, Any], last: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Add ``prev_ir`` / ``prev_vis``: each image's previous frame in split order (the first image's is the
    split's last image), for the ``frozen`` sensor fault."""
    out = dict(batch)
    for k in ("ir", "vis"):
        out[f"prev_{k}"] = torch.cat([_fit(last[k], batch[k][:1]), batch[k][:-1]])
    return out


def _evaluate_conditions(ctx: _Context, conditions: Sequence[Condition], desc: str) -> dict[str, Any]:
    """mIoU and per-image pixel error of every condition over the evaluation images (one pass over the data)."""
    cfg = ctx.cfg
    accs = {(c.member, c.level): _Accumulator(ctx.num_classes, True, fusion=False, miou_convention=cfg.miou_convention)
            for c in conditions}
    errors: dict[tuple[str, str], list[float]] = {k: [] for k in accs}
    n = len(ctx.dataset)
    last_sample = ctx.dataset[n - 1]
    last = {k: last_sample[k][None].to(ctx.device) for k in ("ir", "vis")}
    loader = DataLoader(ctx.dataset, batch_size=cfg.batch_size, shuffle=False, collate_fn=list)
    bar = tqdm(total=n * len(conditions), desc=desc, unit="img", disable=not cfg.progress, file=sys.stderr)
    with torch.no_grad():
        for batch in _batches(loader):
            batch = _with_previous(_to_device(batch, ctx.device), last)
            for c in conditions:
                ir, vis, mask = c.apply(batch)
                label = batch["label"] if mask is None else batch["label"].masked_fill(mask[:, 0], IGNORE_INDEX)
                out = ctx.model(ir, vis)
                accs[(c.member, c.level)].update(out, {"label": label}, None)
                errors[(c.member, c.level)] += seg_scores(out.logits, label, IGNORE_INDEX)[0].tolist()
                bar.update(len(batch["name"]))
            last = {k: batch[k][-1:] for k in ("ir", "vis")}
    bar.close()
    members: dict[str, Any] = {}
    for c in conditions:
        seg = accs[(c.member, c.level)].summary()["segmentation"]
        m = members.setdefault(c.member, {"levels": [], "miou": [], "miou_objects": [], "errors": []})
        m["levels"].append(c.level)
        m["miou"].append(seg["miou"])
        m["miou_objects"].append(seg["miou_objects"])
        m["errors"].append(errors[(c.member, c.level)])
    return members


def _sample(ctx: _Context, index: int) -> dict[str, Any]:
    """Image ``index`` as a batch of one, with its previous frame."""
    cur, prev = ctx.dataset[index], ctx.dataset[(index - 1) % len(ctx.dataset)]
    batch = _to_device(_stack([cur]), ctx.device)
    return _with_previous(batch, {k: prev[k][None].to(ctx.device) for k in ("ir", "vis")})


def _worst_picture(ctx: _Context, family: str, members: Mapping[str, Any], conditions: Sequence[Condition],
                   clean_errors: Sequence[float], out_dir: Path) -> dict[str, Any] | None:
    """Picture rows (clean, then corrupted) of the images that lose most under the family's worst condition."""
    worst = min(((m, i) for m, r in members.items() for i in range(len(r["levels"]))),
                key=lambda mi: members[mi[0]]["miou"][mi[1]])
    member, i = worst
    level = members[member]["levels"][i]
    cond = next(c for c in conditions if c.member == member and c.level == level)
    drop = np.asarray(members[member]["errors"][i]) - np.asarray(clean_errors)
    picks = [int(j) for j in np.argsort(-drop, kind="stable")[: ctx.cfg.worst_rows]]
    rows = []
    with torch.no_grad():
        for j in picks:
            b = _sample(ctx, j)
            ir, vis, mask = cond.apply(b)
            for tag, (x_ir, x_vis), m in (("clean", (b["ir"], b["vis"]), None), (f"{member} {level}", (ir, vis), mask)):
                o = ctx.model(x_ir, x_vis)
                gt = b["label"][0] if m is None else b["label"][0].masked_fill(m[0, 0], IGNORE_INDEX)
                rows.append({"label": f"{b['name'][0]}\n{tag}", "ir": _np_img(x_ir[0]), "vis": _np_img(x_vis[0]),
                             "fused": _np_img(o.fused_rgb[0].clamp(0, 1)), "pred": o.logits[0].argmax(0).cpu().numpy(),
                             "gt": gt.cpu().numpy(), "delta": None, "delta_ir": None})
    png = f"worst_{family}.png"
    save_grid(out_dir / png, rows, title=f"{family}: worst condition {member} {level} "
              f"(mIoU {_f(members[member]['miou'][i])}); rows: the images that lose most, clean then corrupted")
    return {"png": png, "member": member, "level": level, "images": [ctx.dataset[j]["name"] for j in picks]}


# ----------------------------------------------------------------------------------------------- patches
def _train_data(ctx: _Context) -> Dataset:
    """The labelled split the patches are optimised on (never the evaluated one)."""
    cfg, pc = ctx.cfg, ctx.cfg.patch
    train = RGBTDataset(cfg.data, split=pc.train_split)
    if not train.has_labels:
        raise DataError(f"{cfg.data} split {pc.train_split!r}: expected labels to optimise the patches, got none "
                        "(set patch.train_split)")
    if pc.train_split == cfg.split:
        raise ConfigError(f"patch.train_split: expected a split other than the evaluated one ({cfg.split!r}), "
                          f"got {pc.train_split!r}")
    return Subset(train, range(pc.train_limit)) if 0 < pc.train_limit < len(train) else train


class _DeviceBatches:
    """Re-iterable shuffled training batches on the device; the order depends on ``seed`` only, so a patch
    optimised after a resumption sees the same batches as in an uninterrupted run."""

    def __init__(self, data: Dataset, batch_size: int, seed: int, device: torch.device) -> None:
        self.loader = DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=list,
                                 generator=torch.Generator().manual_seed(seed))
        self.device = device

    def __iter__(self):
        for b in _batches(self.loader):
            yield _to_device(b, self.device)


def _patches(ctx: _Context, out_dir: Path) -> dict[tuple[str, float], Patch]:
    """The optimised patches, from ``patches/`` when a file with the same fingerprint exists."""
    cfg, pc = ctx.cfg, ctx.cfg.patch
    h, w = ctx.dataset[0]["ir"].shape[-2:]
    train = _train_data(ctx)
    value_range = {"vis": (0.0, 1.0)}
    if "ir" in pc.modalities:
        ir_images = (train[i]["ir"] for i in range(len(train)))
        value_range["ir"] = thermal_range(ir_images, tuple(pc.thermal_percentiles))
    fp = ctx.fingerprint("patches")
    out: dict[tuple[str, float], Patch] = {}
    for modality in pc.modalities:
        for area in pc.areas:
            path = out_dir / "patches" / f"{modality}-{area:g}.pt"
            if path.is_file():
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved.get("fingerprint") == fp:
                    out[(modality, area)] = Patch.from_state(saved["patch"])
                    log.info("patch %s: reusing %s", path.stem, path)
                    continue
            side = patch_side(h, w, area)
            started = time.time()
            batches = _DeviceBatches(train, pc.batch_size, image_seed(cfg.seed, "patch-data", modality, f"{area:g}"),
                                     ctx.device)
            p = optimise_patch(ctx.model, batches, modality, side, value_range[modality],
                               steps=pc.steps, step_size=pc.step_size,
                               seed=image_seed(cfg.seed, "patch-init", modality, f"{area:g}"), area=area,
                               progress=cfg.progress)
            log.info("patch %s %g: %d px side, loss %.3f -> %.3f in %.0f s", modality, area, side,
                     p.losses[0], p.losses[-1], time.time() - started)
            atomic_save({"fingerprint": fp, "patch": p.state()}, path)
            out[(modality, area)] = p
    _save_patch_picture(out, out_dir / "patches.png")
    return out


def _save_patch_picture(patches: Mapping[tuple[str, float], Patch], path: Path) -> None:
    fig, axes = plt.subplots(1, len(patches), figsize=(2.4 * len(patches), 2.9), squeeze=False)
    for ax, ((modality, area), p) in zip(axes[0], patches.items()):
        img = p.pixels.permute(1, 2, 0).numpy()
        lo, hi = p.value_range
        if modality == "ir":
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"IR {_area_label(area)}, {p.side} px\nvalues {lo:.2f}–{hi:.2f}", fontsize=8)
        else:
            ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
            ax.set_title(f"VIS {_area_label(area)}, {p.side} px", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("optimised universal patches (IR shown on the full 0–1 scale)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- families
def _clean(ctx: _Context, out_dir: Path) -> dict[str, Any]:
    """Clean mIoU and per-image errors (``families/clean.json``; every family's baseline)."""
    path = out_dir / "families" / "clean.json"
    fp = ctx.fingerprint("clean")
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fp:
            return saved
    cond = Condition("clean", "clean", lambda b: (b["ir"], b["vis"], None))
    members = _evaluate_conditions(ctx, [cond], "clean")
    result = {"family": "clean", "fingerprint": fp, "miou": members["clean"]["miou"][0],
              "miou_objects": members["clean"]["miou_objects"][0], "errors": members["clean"]["errors"][0],
              "names": [ctx.dataset[i]["name"] for i in range(len(ctx.dataset))], "checkpoint": ctx.cfg.checkpoint}
    write_json(result, path)
    return result


def _threat_family(ctx: _Context, out_dir: Path) -> dict[str, Any]:
    cfg = ctx.cfg
    ecfg = EvaluateConfig(checkpoint=cfg.checkpoint, data=cfg.data, split=cfg.split, out=str(out_dir / "threats"),
                          threats=list(cfg.threats), eps_sweep=[], sweep_threats=[], limit=cfg.limit,
                          batch_size=cfg.batch_size, device=cfg.device, seed=cfg.seed, grid_samples=cfg.worst_rows,
                          steps=cfg.steps, progress=cfg.progress, num_threads=cfg.num_threads,
                          miou_convention=cfg.miou_convention, per_modality=[], masking=copy.deepcopy(cfg.masking))
    run_dir = out_dir / "threats"
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(ecfg, run_dir / "config.yaml")
    report = evaluate(ecfg, run_dir)
    members = {}
    for name, t in report["threats"].items():
        members[name] = {"levels": [f"ε {t['eps_255']:g}/255"], "miou": [t["segmentation"]["miou"]],
                         "miou_objects": [t["segmentation"]["miou_objects"]], "errors": None,
                         "text": t["description"].split(":")[0].split(". ")[0]}
    worst = min(members, key=lambda n: members[n]["miou"][0])
    grid = report.get("pictures", {}).get("grids", {}).get(worst)
    picture = {"png": f"threats/{grid}", "member": worst, "level": members[worst]["levels"][0],
               "images": None} if grid else None
    return {"members": members, "picture": picture, "report": "threats/report.md", "notes": report.get("notes", [])}


def _conditions(ctx: _Context, family: str, out_dir: Path) -> list[Condition]:
    """The conditions of an image-level family (the patches are optimised, or read from ``patches/``)."""
    if family in ("vis-corruptions", "ir-corruptions"):
        return _corruption_conditions(ctx.cfg, family.split("-")[0])
    if family == "sensor-faults":
        return _fault_conditions()
    if family == "misregistration":
        return _misregistration_conditions()
    return _patch_conditions(ctx.cfg, _patches(ctx, out_dir))


def _image_family(ctx: _Context, family: str, out_dir: Path, clean: Mapping[str, Any]) -> dict[str, Any]:
    conditions = _conditions(ctx, family, out_dir)
    members = _evaluate_conditions(ctx, conditions, family)
    picture = _worst_picture(ctx, family, members, conditions, clean["errors"], out_dir)
    extra = {"patches_png": "patches.png"} if family == "patches" else {}
    return {"members": members, "picture": picture, **extra}


def redraw_family(ctx: _Context, family: str, saved: dict[str, Any], out_dir: Path,
                  clean: Mapping[str, Any]) -> dict[str, Any]:
    """Draw the worst-case picture of a finished image-level family again from its file (its numbers are kept;
    a few forward passes), e.g. after changing ``worst_rows``."""
    conditions = _conditions(ctx, family, out_dir)
    saved["picture"] = _worst_picture(ctx, family, saved["members"], conditions, clean["errors"], out_dir)
    return saved


def compute_family(ctx: _Context, family: str, out_dir: Path, clean: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate one family from scratch (no cache) and return its result (without writing it)."""
    wall, cpu = time.time(), time.process_time()
    body = _threat_family(ctx, out_dir) if family == "threats" else _image_family(ctx, family, out_dir, clean)
    return {"family": family, "fingerprint": ctx.fingerprint(family), "created": _now(), **body,
            "wall_s": time.time() - wall, "cpu_s": time.process_time() - cpu}


def _now() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def run_families(cfg: CardConfig, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Compute the clean baseline and every family of ``cfg`` not finished in ``out_dir``.

    Returns ``(clean, families, meta)``. A family whose ``families/<family>.json`` has the same fingerprint is
    read, not recomputed; each finished family is written at once (atomically), so an interruption loses at
    most the family in progress.
    """
    seed_everything(cfg.seed)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    ctx = _Context(cfg)
    clean = _clean(ctx, out_dir)
    done: dict[str, Any] = {}
    for family in sorted(cfg.families, key=COMPUTE_ORDER.index):
        path = out_dir / "families" / f"{family}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == ctx.fingerprint(family):
                log.info("%s: finished earlier (%s), skipped", family, path)
                if cfg.redraw and family != "threats":
                    write_json(redraw_family(ctx, family, saved, out_dir, clean), path)
                    log.info("%s: worst-case picture drawn again", family)
                done[family] = saved
                continue
            log.info("%s: %s was computed with other settings; recomputing", family, path)
        log.info("%s: computing", family)
        result = compute_family(ctx, family, out_dir, clean)
        write_json(result, path)
        log.info("%s: done in %.0f s wall, %.0f s CPU", family, result["wall_s"], result["cpu_s"])
        done[family] = result
    done = {f: done[f] for f in cfg.families}  # the order asked for, not the order computed
    meta = {"checkpoint": cfg.checkpoint, "checkpoint_sha256": ctx.digest, "genotype": ctx.meta["genotype"],
            "num_images": len(ctx.dataset), "device": str(ctx.device)}
    return clean, done, meta


# ------------------------------------------------------------------------------------------- aggregate
def family_score(model: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """mCE-style score of one family: 100 × mean over members of Σ_levels (1 − mIoU) / Σ_levels (1 − mIoU_ref).

    ``model`` and ``reference`` map member → ``{"levels": [...], "miou": [...]}`` with the same members and
    levels. Returns ``{"score": float | None, "ce": {member: float | None}}`` (None where the reference
    makes no error at all).
    """
    if set(model) != set(reference):
        raise ValueError(f"reference: expected the members {sorted(model)}, got {sorted(reference)}")
    ce: dict[str, float | None] = {}
    for name, m in model.items():
        r = reference[name]
        if list(m["levels"]) != list(r["levels"]):
            raise ValueError(f"reference member {name!r}: expected levels {m['levels']}, got {r['levels']}")
        ref_err = sum(1.0 - v for v in r["miou"])
        ce[name] = sum(1.0 - v for v in m["miou"]) / ref_err if ref_err > 0 else None
    vals = [v for v in ce.values() if v is not None]
    return {"score": 100.0 * float(np.mean(vals)) if vals else None, "ce": ce}


def _reference(cfg: CardConfig, out_dir: Path) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None]:
    """(description, reference families, reference clean) for the card; (…, None, None) = self-reference."""
    ref = cfg.reference
    if not ref or (Path(ref).is_file() and Path(ref).resolve() == Path(cfg.checkpoint).resolve()):
        return "the model itself (every score is 100 by definition)", None, None
    path = Path(ref)
    if path.is_dir():
        fam_dir = path / "families"
        if not (fam_dir / "clean.json").is_file():
            raise ConfigError(f"reference {path}: expected a card directory with families/clean.json, got none")
        ref_clean = json.loads((fam_dir / "clean.json").read_text())
        fams = {f: json.loads((fam_dir / f"{f}.json").read_text()) for f in cfg.families
                if (fam_dir / f"{f}.json").is_file()}
        _check_reference(cfg, {"clean": ref_clean, **fams}, path)
        return f"the card in `{path}` (checkpoint `{ref_clean.get('checkpoint')}`)", fams, ref_clean
    if not path.is_file():
        raise ConfigError(f"reference: expected a checkpoint file or a card directory, got missing path {ref}")
    ref_cfg = copy.deepcopy(cfg)
    ref_cfg.checkpoint, ref_cfg.reference = str(path), ""
    log.info("reference %s: computing its families into %s", path, out_dir / "reference")
    clean, fams, _ = run_families(ref_cfg, out_dir / "reference")
    return f"checkpoint `{path}` (its families in `reference/`)", fams, clean


def _check_reference(cfg: CardConfig, fams: Mapping[str, Any], path: Path) -> None:
    """A reference card must have measured the same conditions: its fingerprints may differ only in the
    checkpoint."""
    for family, saved in fams.items():
        ours = {k: v for k, v in fingerprint(cfg, family, "").items() if k != "checkpoint_sha256"}
        theirs = {k: v for k, v in saved["fingerprint"].items() if k != "checkpoint_sha256"}
        if ours != theirs:
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise ConfigError(f"reference {path}: family {family!r} was computed with other settings (differs in "
                              f"{diff}); run the reference card with this card's settings")


# ------------------------------------------------------------------------------------------------ card
def build_card(cfg: CardConfig, out_dir: Path) -> dict[str, Any]:
    """Run (or resume) every family of the model and the reference, then write card.json, card.md, radar.png."""
    t0, c0 = time.time(), time.process_time()
    atomic_write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), out_dir / "config.yaml")
    clean, fams, meta = run_families(cfg, out_dir)
    ref_text, ref_fams, ref_clean = _reference(cfg, out_dir)
    ref_fams = ref_fams if ref_fams is not None else fams
    ref_clean = ref_clean if ref_clean is not None else clean
    summary = {}
    for family in cfg.families:
        if family not in ref_fams:
            raise ConfigError(f"reference: expected family {family!r} in the reference card, got only "
                              f"{sorted(ref_fams)}; run the reference card with the same families")
        m, r = fams[family]["members"], ref_fams[family]["members"]
        score = family_score(m, r)
        summary[family] = {**score, "mean_miou": _mean_miou(m), "ref_mean_miou": _mean_miou(r)}
    scores = [s["score"] for s in summary.values() if s["score"] is not None]
    card = {"created": _now(), "version": CARD_VERSION, "config": config_to_dict(cfg), "versions": versions(),
            "model": meta, "reference": ref_text, "self_reference": ref_fams is fams,
            "clean": {"miou": clean["miou"], "miou_objects": clean["miou_objects"]},
            "ref_clean": {"miou": ref_clean["miou"], "miou_objects": ref_clean["miou_objects"]},
            "families": fams, "summary": summary, "score": float(np.mean(scores)) if scores else None,
            "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
            "family_wall_s": sum(f.get("wall_s", 0) for f in fams.values()),
            "family_cpu_s": sum(f.get("cpu_s", 0) for f in fams.values())}
    card["radar"] = _radar(card, out_dir)
    write_json(card, out_dir / "card.json")
    atomic_write_text(render_card(to_jsonable(card)), out_dir / "card.md")
    log.info("wrote %s and %s", out_dir / "card.json", out_dir / "card.md")
    return to_jsonable(card)


def _mean_miou(members: Mapping[str, Any]) -> float:
    return float(np.mean([v for m in members.values() for v in m["miou"]]))


def _radar(card: Mapping[str, Any], out_dir: Path) -> str | None:
    """``radar.png`` of the families' mean mIoU (None with fewer than three families: no polygon)."""
    fams = list(card["summary"])
    if len(fams) < 3:
        return None
    labels = []
    for f in fams:
        s = card["summary"][f]["score"]
        labels.append(f"{f}\nscore {s:.0f}" if s is not None else f)
    series = {"this model": [100 * card["summary"][f]["mean_miou"] for f in fams]}
    if not card["self_reference"]:
        series["reference"] = [100 * card["summary"][f]["ref_mean_miou"] for f in fams]
    save_radar(out_dir / "radar.png", labels, series, title="mean mIoU (%) per family (further out = more robust)",
               clean={k: 100 * card[c]["miou"] for k, c in (("this model", "clean"), ("reference", "ref_clean"))
                      if k in series})
    return "radar.png"


# ---------------------------------------------------------------------------------------------- markdown
def render_card(card: Mapping[str, Any]) -> str:
    """The human-readable card: summary, radar chart, a table per family, worst cases, how to read it."""
    cfg, model = card["config"], card["model"]
    lines = ["# Robustness card", "",
             f"* model: `{model['checkpoint']}` (sha256 {model['checkpoint_sha256']}), clean mIoU "
             f"**{_f(card['clean']['miou'])}** %",
             f"* reference: {card['reference']}; its clean mIoU {_f(card['ref_clean']['miou'])} %",
             f"* data: `{cfg['data']}` split `{cfg['split']}`, {model['num_images']} images; seed {cfg['seed']}; "
             f"device {model['device']}",
             f"* time to compute the families (as recorded in their files): {card['family_wall_s']:.0f} s wall, "
             f"{card['family_cpu_s']:.0f} s CPU; card assembled {card['created']}", ""]
    notes = [n for f in card["families"].values() for n in f.get("notes", []) if "overridden" in n]
    lines += [f"> **Note:** {n}" for n in notes] + ([""] if notes else [])
    lines += ["## Summary", "",
              "Per family: the mean mIoU (%) over its members and levels, the reference's, and the mCE-style "
              "score: 100 × the mean over members of Σ(1 − mIoU) / Σ(1 − mIoU of the reference) over the "
              "levels. "
              "The reference scores 100; **below 100 = fewer errors than the reference**.", ""]
    rows = []
    for f, s in card["summary"].items():
        pic = card["families"][f].get("picture") or {}
        worst = f"{pic.get('member', '')} {pic.get('level', '')}".strip()
        rows.append([f, FAMILY_TEXT[f], _f(s["mean_miou"]), _f(s["ref_mean_miou"]),
                     "–" if s["score"] is None else f"**{s['score']:.0f}**", worst or "–"])
    lines += _table(["family", "what", "mean mIoU", "reference", "score (ref = 100)", "worst condition"], rows)
    if card.get("score") is not None:
        lines += [f"Mean score over the families: **{card['score']:.0f}**.", ""]
    if card.get("radar"):
        lines += [f"![radar chart of the families]({card['radar']})", ""]
    else:
        lines += ["(No radar chart: it needs at least three families.)", ""]
    for f, fam in card["families"].items():
        lines += _family_section(f, fam, card["summary"][f], cfg["severities"])
    lines += ["## How to read this card", "",
              "* mIoU: mean over the 9 classes of IoU = TP / (TP + FP + FN), from one confusion matrix over all "
              f"evaluation images (convention `{cfg['miou_convention']}`), in %. Pixels under a patch are left "
              "out of the metric.",
              "* Severities 1-5 of each corruption follow ImageNet-C (Hendrycks & Dietterich, ICLR 2019); severity "
              "0 is the clean image. The noise, blur direction, fog map, dead pixels and patch positions are fixed "
              "per image by the seed, and a higher severity scales the same draw.",
              "* The score is the mean corruption error (mCE) of ImageNet-C with the reference checkpoint in the "
              "role of AlexNet: it compares errors under the same conditions, so a model that is weaker when clean "
              "also scores higher.",
              "* Worst cases: per family, the condition with the lowest mIoU and the images whose pixel error grew "
              "most under it (rows: clean, then corrupted; columns: IR, VIS, fused image, prediction, ground truth).",
              ""]
    v = card.get("versions", {})
    lines += ["## Environment", "", ", ".join(f"{k} {v[k]}" for k in v), ""]
    return "\n".join(lines)


def _family_section(family: str, fam: Mapping[str, Any], summary: Mapping[str, Any],
                    severities: Sequence[int]) -> list[str]:
    members = fam["members"]
    lines = [f"## {family}", "", f"{FAMILY_TEXT[family][0].upper()}{FAMILY_TEXT[family][1:]}. mIoU (%) per level; "
             "*CE* is the member's error relative to the reference (1.00 = the same).", ""]
    levels = [m["levels"] for m in members.values()]
    shared = all(lv == levels[0] for lv in levels)
    width = max(len(lv) for lv in levels)
    header = ["member", "what"] + (list(levels[0]) if shared else [f"level {i + 1}" for i in range(width)])
    rows = []
    for name, m in members.items():
        cells = [_f(v) if shared else f"{lv}: {_f(v)}" for lv, v in zip(m["levels"], m["miou"])]
        cells += [""] * (width - len(cells))
        ce = summary["ce"].get(name)
        text = m.get("text", "") if family == "threats" else _member_text(family, name, severities)
        rows.append([f"`{name}`", text] + cells + [_f(float(np.mean(m["miou"]))),
                                                              "–" if ce is None else f"{ce:.2f}"])
    lines += _table(header + ["mean", "CE"], rows)
    if family == "sensor-faults":
        lines += ["Levels: " + "; ".join(f"*{n}*: {f.description}" for n, f in FAULTS.items()) + ".", ""]
    if fam.get("report"):
        lines += [f"The threat models' full evaluation report: [{fam['report']}]({fam['report']}).", ""]
    if fam.get("patches_png"):
        lines += [f"![the optimised patches]({fam['patches_png']})", ""]
    pic = fam.get("picture")
    if pic:
        n = len(pic.get("images") or [])
        rows = (f"the {n} images whose pixel error grew most, clean then corrupted" if family != "threats"
                else "the first images of the split, clean then attacked (the evaluation report's grid)")
        lines += [f"Worst condition: `{pic['member']}` at {pic['level']}; rows: {rows}.", "",
                  f"![worst cases of {family}]({pic['png']})", ""]
    lines += [f"Computed in {fam.get('wall_s', 0):.0f} s wall, {fam.get('cpu_s', 0):.0f} s CPU "
              f"({fam.get('created', '')}).", ""]
    return lines


# ----------------------------------------------------------------------------------------------- command
def parse_args(argv: Sequence[str] | None) -> tuple[str | None, dict[str, Any]]:
    """Command line → (YAML path, flat overrides). Flags override YAML; trailing ``key=value`` override flags."""
    p = argparse.ArgumentParser(prog="python trainer/evaluate.py --suite card", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("Usage::")[1])
    p.add_argument("--config", default=None, help="YAML file of CardConfig keys (e.g. configs/card.yaml)")
    p.add_argument("--checkpoint", help="checkpoint .pt written by trainer.checkpoint")
    p.add_argument("--data", help="dataset root with a labelled evaluation split and a training split")
    p.add_argument("--split", help="evaluation split (default test)")
    p.add_argument("--out", help="output directory (default runs/card-<timestamp>); rerun with it to resume")
    p.add_argument("--reference", help="reference checkpoint or finished card directory (default: the model itself)")
    p.add_argument("--family", action="append", dest="families", metavar="NAME",
                   help=f"family to run; repeat for several (default all: {', '.join(FAMILIES)})")
    p.add_argument("--threat", action="append", dest="threats", metavar="NAME",
                   help="threat model of the threats family; repeat for several (default paif + strong)")
    add_run_options(p, limit_help="first N evaluation images only")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any CardConfig key, e.g. patch.steps=20")
    args = p.parse_args(list(argv) if argv is not None else None)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "overrides") and v is not None}
    flags.update(parse_overrides(args.overrides))
    return args.config, flags


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``trainer/evaluate.py --suite card``); returns 0 on success, 2 on bad input (the project's error
    boundary, :func:`trainer.errors.entry_point`: one ``error: …`` line on stderr)."""
    tune_malloc()
    cfg = load_command_config(CardConfig, parse_args, argv)
    out_dir = Path(cfg.out) if cfg.out else make_run_dir("runs", "card")
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(out_dir, filename="card.log")
    log.info("robustness card of %s on %s (%s) into %s", cfg.checkpoint, cfg.data, cfg.split, out_dir)
    card = build_card(cfg, out_dir)
    line = [f"clean {_f(card['clean']['miou'])}"]
    for f, s in card["summary"].items():
        line.append(f"{f} {_f(s['mean_miou'])}" + ("" if s["score"] is None else f" (score {s['score']:.0f})"))
    print("; ".join(line))
    print(f"card: {out_dir / 'card.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
