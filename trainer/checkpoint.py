"""Checkpoint format for a trained PAIF fusion + segmentation model.

PAIF: Liu et al., "PAIF: Perception-Aware Infrared-Visible Image Fusion for Attack-Tolerant Semantic
Segmentation", ACM MM 2023. A checkpoint holds everything needed to rebuild and judge the model without
the code that trained it: the weights, the genotype (fusion architecture), the segmenter config, the
resolved training config and the library versions. It holds only tensors and plain Python types, so it
loads with ``torch.load(weights_only=True)`` (no arbitrary code runs when a checkpoint is opened).

Layout (format version 1)::

    {"format": "paif-checkpoint", "format_version": 1, "created": "2025-...Z",
     "state_dict": {name: tensor}, "genotype": {...}, "segmenter": {"variant": "b0", "num_classes": 9},
     "model": {"seg_norm": "per_image", "color": "bt601", "fusion_output": "unit", "mit_norm_eps": None,
               "inputs": "both", "seg_scale": 1},
     "train_cfg": {...}, "versions": {"python": ..., "torch": ...}, "state": None | {"epoch": .., ...}}

``model`` holds the forward options of ``search_space.pipeline.build_model`` (``MODEL_OPTIONS``); a checkpoint
without it (older files), or without one of its keys (e.g. ``seg_scale``, added later), loads with the defaults.
Converted published checkpoints (``python -m search_space.convert_reference``) record the published forward there.

``card`` is the model card (``trainer.card``): training mode and recipe, data, the evaluations the checkpoint has
been through (appended by ``trainer/evaluate.py``, :func:`record_evaluation`) and the content hash of the
weights. Checkpoints written before cards existed load as before; ``info`` says what they cannot tell.

Commands::

    python -m trainer.checkpoint info CKPT [--json]                   # the model card
    python -m trainer.checkpoint export CKPT --safetensors OUT        # weights (+ card as metadata) for sharing
    python -m trainer.checkpoint init --genotype paif --out ckpt.pt [--channels 8] [--seed 0]   # random init
    python -m trainer.checkpoint --info ckpt.pt                       # the raw metadata as JSON (older form)

A ``.safetensors`` file written by ``export`` loads everywhere a ``.pt`` checkpoint does (:func:`load_model`):
its metadata carries the genotype, segmenter, forward options, config, versions and card (not the
resumable training state).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from trainer.card import MAX_EVALUATIONS, full_card, new_card, render, training_from_config
from trainer.config import config_to_dict
from trainer.errors import PaifError, entry_point
from trainer.finite import NonFiniteError, nonfinite_tensors
from trainer.runs import atomic_save, atomic_write_bytes, versions

__all__ = [
    "FORMAT", "FORMAT_VERSION", "REQUIRED_KEYS", "CheckpointError", "save_checkpoint", "load_checkpoint",
    "read_torch_file",
    "load_model", "genotype_to_dict", "genotype_from_dict", "resolve_genotype", "init_checkpoint",
    "record_evaluation", "export_safetensors", "SAFETENSORS_KEY",
]

log = logging.getLogger(__name__)

FORMAT = "paif-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "state_dict", "genotype", "segmenter", "train_cfg", "versions")
SAFETENSORS_KEY = "paif"
"""Metadata key of an exported ``.safetensors`` file: the checkpoint without weights and state, as JSON."""
_PLAIN = (str, int, float, bool, type(None))


class CheckpointError(PaifError, ValueError):
    """A checkpoint file is missing, unreadable, of another format, or does not match its genotype."""


# ----------------------------------------------------------------------------------------------- genotype
def genotype_to_dict(genotype: Any) -> dict[str, Any]:
    """A plain ``{field: value}`` dict of a Genotype (tuples become lists), safe for ``weights_only`` loading."""
    if isinstance(genotype, Mapping):
        return _plain(dict(genotype), "genotype")
    if hasattr(genotype, "to_dict"):
        return _plain(genotype.to_dict(), "genotype")
    if dataclasses.is_dataclass(genotype):
        return _plain(dataclasses.asdict(genotype), "genotype")
    raise CheckpointError(f"expected a Genotype or a dict, got {type(genotype).__name__}")


def genotype_from_dict(data: Mapping[str, Any]) -> Any:
    """Rebuild a ``search_space.genotype.Genotype`` from :func:`genotype_to_dict` output (validated)."""
    from search_space.genotype import Genotype

    if hasattr(Genotype, "from_dict"):
        return Genotype.from_dict(dict(data))
    return Genotype.from_json(json.dumps(dict(data)))


def resolve_genotype(spec: Any, channels: int | None = None) -> Any:
    """A Genotype from a Genotype, a dict, a name in ``GENOTYPES`` or a JSON file path; optionally re-channelled."""
    from search_space.genotype import GENOTYPES, Genotype

    if isinstance(spec, Genotype):
        genotype = spec
    elif isinstance(spec, Mapping):
        genotype = genotype_from_dict(spec)
    elif isinstance(spec, str) and spec in GENOTYPES:
        genotype = GENOTYPES[spec]
    elif isinstance(spec, (str, Path)) and Path(spec).is_file():
        genotype = Genotype.from_json(Path(spec))
    else:
        raise CheckpointError(
            f"expected a genotype name in {sorted(GENOTYPES)} or a genotype JSON file, got {spec!r}"
        )
    if channels is not None and channels != genotype.channels:
        genotype = dataclasses.replace(genotype, channels=int(channels))
        if hasattr(genotype, "validate"):
            genotype.validate()
    return genotype


def _plain(obj: Any, where: str) -> Any:
    """Convert dataclasses/tuples/Paths to plain types; reject anything ``weights_only`` cannot load."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if obj is None or type(obj) in _PLAIN:
        return obj
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, (str, int, float)):  # subclasses (TorchVersion, numpy.float64, IntEnum) -> plain
        return str(obj) if isinstance(obj, str) else (int(obj) if isinstance(obj, int) else float(obj))
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(config_to_dict(obj), where)
    if isinstance(obj, Mapping):
        return {k if isinstance(k, (str, int)) else str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, torch.Size):
        return list(obj)
    raise CheckpointError(
        f"{where}: expected tensors or plain Python types (dict, list, str, int, float, bool, None), "
        f"got {type(obj).__name__}; convert it (e.g. a config dataclass with trainer.config.config_to_dict) "
        "so the checkpoint stays loadable with torch.load(weights_only=True)"
    )


# ------------------------------------------------------------------------------------------------- save
def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    genotype: Any,
    segmenter_cfg: Mapping[str, Any],
    train_cfg: Any,
    state: Mapping[str, Any] | None = None,
    model_cfg: Mapping[str, Any] | None = None,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file + ``os.replace``).

    Args:
        path: destination ``.pt`` file; parent directories are created.
        model: the ``FusionSegModel`` (its ``state_dict`` is stored on the CPU).
        genotype: the ``Genotype`` the fusion network was built from (stored as a dict).
        segmenter_cfg: at least ``{"variant": "b0", "num_classes": 9}``; optionally ``decoder_hidden_size``
            (the head width, when it is not the variant's); without it, a width other than the variant's is read off
            ``model.segmenter`` (``search_space.segmenter.custom_head_width``), so every writer records it.
        train_cfg: the resolved training config (a dataclass or a plain dict).
        state: optional resumable training state (epoch, step, optimizer/scheduler/scaler state dicts,
            best metric, ...): tensors and plain types only.
        model_cfg: the forward options of ``build_model`` (``seg_norm``, ``color``, ``fusion_output``,
            ``mit_norm_eps``, ``inputs``, ``seg_scale``); default ``model.build_options`` when the model has them,
            else none (defaults).
        card: the model card's ``training`` (mode, summary, recipe, progress), ``data`` and ``notes``
            (``trainer.card``); missing ``training`` is read from ``train_cfg`` (its ``mode``) and ``state``.
            The content hash of the weights is always added.
    Returns:
        The path written.
    Raises:
        NonFiniteError: a floating tensor of the state dict holds NaN or ±inf (nothing is written).
    """
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = nonfinite_tensors(state_dict)
    if bad:
        raise NonFiniteError(
            f"refusing to write checkpoint {path}: {len(bad)} of {len(state_dict)} tensors hold NaN or inf "
            f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})")
    seg = dict(segmenter_cfg)
    if "variant" not in seg or "num_classes" not in seg:
        raise CheckpointError(
            f"segmenter_cfg: expected keys 'variant' and 'num_classes', got {sorted(seg)}; "
            "pass e.g. {'variant': 'b0', 'num_classes': 9}"
        )
    if "decoder_hidden_size" not in seg:  # a head width other than the variant's, read off the model (as model_cfg)
        from search_space.segmenter import custom_head_width

        width = custom_head_width(getattr(model, "segmenter", None), seg["variant"])
        if width is not None:
            seg["decoder_hidden_size"] = width
    train_plain = _plain(train_cfg if train_cfg is not None else {}, "train_cfg")
    state_plain = None if state is None else _plain(dict(state), "state")
    extra = _plain(dict(card or {}), "card")
    training = extra.get("training") or _default_training(train_plain, state_plain)
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "state_dict": state_dict,
        "genotype": genotype_to_dict(genotype),
        "segmenter": _plain(seg, "segmenter_cfg"),
        "model": _model_options(model_cfg if model_cfg is not None else getattr(model, "build_options", {}),
                                "model_cfg"),
        "train_cfg": train_plain,
        "versions": _plain(versions(), "versions"),
        "state": state_plain,
        "card": new_card(training, extra.get("data"), state_dict, extra.get("notes")),
    }
    path = atomic_save(ckpt, path)
    log.info("saved checkpoint %s (%d tensors)", path, len(ckpt["state_dict"]))
    return path


def _default_training(train_cfg: Any, state: Any) -> dict[str, Any]:
    if isinstance(train_cfg, Mapping) and "mode" in train_cfg:
        return training_from_config(train_cfg, state if isinstance(state, Mapping) else None)
    note = train_cfg.get("note") if isinstance(train_cfg, Mapping) else None
    return {"mode": "unknown", "summary": str(note) if note else "not recorded by the code that wrote it"}


def record_evaluation(path: str | Path, entry: Mapping[str, Any]) -> Path:
    """Append one evaluation (``trainer.card.evaluation_entry``) to the card of checkpoint ``path``, atomically.

    A checkpoint without a card (older files) gets one first; weights and everything else are kept as they are.
    Beyond ``trainer.card.MAX_EVALUATIONS`` entries the oldest are dropped. Read-modify-write: two evaluations of
    one file that finish at the same moment may keep only one entry (the file itself is always whole).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path}: evaluations are recorded in .pt checkpoints only; the safetensors export "
                              "is a read-only copy (re-export it after evaluating the .pt file)")
    ckpt = load_checkpoint(path)
    card = ckpt.get("card")
    if not isinstance(card, dict):
        card = new_card(_default_training(ckpt.get("train_cfg"), ckpt.get("state")), None, ckpt["state_dict"],
                        ["card added when the first evaluation was recorded; training details were not recorded"])
    card["evaluations"] = (list(card.get("evaluations") or []) + [_plain(dict(entry), "evaluation")])[-MAX_EVALUATIONS:]
    ckpt["card"] = card
    return atomic_save(ckpt, path)


# ------------------------------------------------------------------------------------------------- load
#: how a file written by torch.save begins: a zip archive (torch >= 1.6) or a pickle, protocol 2 (the legacy format)
TORCH_FILE_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x80\x02")


def read_torch_file(path: str | Path, expected: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file and what was expected.

    A file that does not begin like a ``torch.save`` file (random bytes, an image, a text file) is "not a
    checkpoint"; one that does but cannot be read is corrupted or truncated; one holding objects other than tensors
    and plain types is refused (loading it would run code).

    Args:
        path: the file.
        expected: what it should be, for the messages (e.g. "a .pt file written by save_checkpoint").
    Raises:
        CheckpointError: missing, not a torch file, unreadable, or not loadable with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: expected {expected}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(TORCH_FILE_MAGIC):
        size = path.stat().st_size
        raise CheckpointError(f"{path} is not a checkpoint: expected {expected}, got {size} bytes that are not a "
                              f"torch.save file (it begins with {head.hex(' ') or 'nothing'}); check the path")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise CheckpointError(
                f"checkpoint {path} contains objects other than tensors and plain types, so it cannot be "
                f"loaded safely with weights_only=True; re-save it with trainer.checkpoint.save_checkpoint "
                f"({str(exc).splitlines()[0]})"
            ) from exc
        raise CheckpointError(f"checkpoint {path} is not a readable torch file (corrupted?): {exc}") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a readable torch file (corrupted or truncated?): expected {expected}, got "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint with ``torch.load(weights_only=True)`` (or an exported ``.safetensors`` file).

    Raises:
        CheckpointError: missing file; not a torch file (random bytes, corrupted, truncated); objects other than
            tensors and plain types; not a PAIF checkpoint; wrong format version; missing keys.
    """
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        return _check_loaded(_load_safetensors(path, map_location), path)
    return _check_loaded(read_torch_file(path, "a .pt file written by save_checkpoint", map_location), path)


def _check_loaded(ckpt: Any, path: Path) -> dict[str, Any]:
    """The format checks of :func:`load_checkpoint` on a loaded object."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"checkpoint {path}: expected a PAIF checkpoint (format {FORMAT!r}), got {got!r}; a bare state_dict "
            "or another project's file cannot be loaded, save it with trainer.checkpoint.save_checkpoint"
        )
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: expected format version {FORMAT_VERSION}, got {ckpt.get('format_version')!r}; "
            "use the code version that wrote it or convert it"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing key(s) {missing}; expected all of {list(REQUIRED_KEYS)}")
    seg = ckpt["segmenter"]
    if not isinstance(seg, dict) or "variant" not in seg or "num_classes" not in seg:
        raise CheckpointError(f"checkpoint {path}: expected segmenter {{'variant', 'num_classes'}}, got {seg!r}")
    return ckpt


def _load_safetensors(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """A checkpoint dict from an exported ``.safetensors`` file (weights + the JSON metadata; no training state)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state_dict = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file (corrupted or truncated?): "
                              f"{type(exc).__name__}: {exc}") from exc
    if SAFETENSORS_KEY not in meta:
        raise CheckpointError(f"checkpoint {path}: expected a safetensors file exported by `python -m "
                              f"trainer.checkpoint export` (metadata key {SAFETENSORS_KEY!r}), got metadata keys "
                              f"{sorted(meta)}; bare weights cannot be rebuilt into a model")
    try:
        ckpt = json.loads(meta[SAFETENSORS_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path}: metadata {SAFETENSORS_KEY!r} is not valid JSON ({exc})") from exc
    ckpt["state_dict"] = state_dict
    ckpt.setdefault("state", None)
    return ckpt


def export_safetensors(path: str | Path, out: str | Path) -> Path:
    """Write the weights of checkpoint ``path`` as ``out`` (safetensors), atomically, with the checkpoint's
    metadata and model card as JSON under the metadata key :data:`SAFETENSORS_KEY` (training state dropped).

    The file loads with ``safetensors.torch.load_file`` anywhere, and with :func:`load_model` here.
    """
    from safetensors.torch import save

    ckpt = load_checkpoint(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt["state_dict"].items()}
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "state")}
    text = json.dumps(meta, sort_keys=True, default=str)
    return atomic_write_bytes(save(tensors, metadata={SAFETENSORS_KEY: text}), out)


def _model_options(options: Any, where: str) -> dict[str, Any]:
    """Check forward options against ``search_space.pipeline.MODEL_OPTIONS``; returns them as a plain dict."""
    from search_space.pipeline import MODEL_OPTIONS

    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise CheckpointError(f"{where}: expected a dict of model options, got {type(options).__name__}")
    unknown = sorted(set(options) - set(MODEL_OPTIONS))
    if unknown:
        raise CheckpointError(f"{where}: unknown model option(s) {unknown}; expected a subset of "
                              f"{sorted(MODEL_OPTIONS)} (a checkpoint from a newer version of this code?)")
    return _plain(dict(options), where)


def _mismatch(model_sd: Mapping[str, torch.Tensor], ckpt_sd: Mapping[str, torch.Tensor]) -> list[str]:
    def head(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

    missing = sorted(set(model_sd) - set(ckpt_sd))
    unexpected = sorted(set(ckpt_sd) - set(model_sd))
    shapes = sorted(
        f"{k} (model {tuple(model_sd[k].shape)} vs checkpoint {tuple(ckpt_sd[k].shape)})"
        for k in set(model_sd) & set(ckpt_sd)
        if tuple(model_sd[k].shape) != tuple(ckpt_sd[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing in checkpoint: {head(missing)}")
    if unexpected:
        problems.append(f"not in model: {head(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {head(shapes)}")
    return problems


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the ``FusionSegModel`` from a checkpoint and load its weights.

    Returns:
        ``(model, meta)``: the model in eval mode on ``map_location``; ``meta`` is the checkpoint without
        ``state_dict`` (format_version, created, genotype dict, segmenter, model options, train_cfg, versions,
        state); ``meta["model"]`` always holds the options the model was built with.
    Raises:
        CheckpointError: everything :func:`load_checkpoint` raises, an invalid genotype, or weights that
            do not match the architecture (the mismatched keys are named).
    """
    from search_space.pipeline import build_model

    ckpt = load_checkpoint(path, map_location=map_location)
    try:
        genotype = genotype_from_dict(ckpt["genotype"])
    except Exception as exc:  # GenotypeError, TypeError, ... from user data
        raise CheckpointError(f"checkpoint {path}: invalid genotype {ckpt['genotype']!r}: {exc}") from exc
    seg = ckpt["segmenter"]
    options = _model_options(ckpt.get("model"), f"checkpoint {path}: model")
    try:
        decoder = seg.get("decoder_hidden_size")
        model = build_model(genotype, segmenter=seg["variant"], num_classes=int(seg["num_classes"]),
                            pretrained=None, decoder_hidden_size=None if decoder is None else int(decoder), **options)
    except ValueError as exc:  # bad option values
        raise CheckpointError(
            f"checkpoint {path}: cannot build the model with {seg} and options {options}: {exc}") from exc
    problems = _mismatch(model.state_dict(), ckpt["state_dict"])
    if problems:
        raise CheckpointError(
            f"checkpoint {path}: weights do not match genotype/segmenter {genotype_to_dict(genotype)} {seg}: "
            + "; ".join(problems)
        )
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.to(map_location).eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    meta["model"] = dict(getattr(model, "build_options", options))
    meta["path"] = str(path)
    meta["num_parameters"] = int(sum(p.numel() for p in model.parameters()))
    return model, meta


# ------------------------------------------------------------------------------------------------- CLI
def init_checkpoint(
    path: str | Path,
    genotype: Any = "paif",
    segmenter: str = "b0",
    num_classes: int = 9,
    channels: int | None = None,
    seed: int = 0,
    decoder_hidden_size: int | None = None,
) -> Path:
    """Save a randomly initialised model (no pretrained weights) as a checkpoint, for tests and demos;
    ``decoder_hidden_size``: the segmenter's head width (None: the variant's)."""
    from search_space.pipeline import build_model

    geno = resolve_genotype(genotype, channels=channels)
    torch.manual_seed(seed)
    model = build_model(geno, segmenter=segmenter, num_classes=num_classes, pretrained=None,
                        decoder_hidden_size=decoder_hidden_size)
    train_cfg = {"note": "random initialisation, not trained", "seed": seed}
    card = {"training": {"mode": "init", "summary": "random initialisation, not trained", "recipe": {"seed": seed}}}
    return save_checkpoint(path, model, geno, {"variant": segmenter, "num_classes": num_classes}, train_cfg,
                           card=card)


def _summary(path: str | Path) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    n = sum(int(t.numel()) for t in ckpt["state_dict"].values() if isinstance(t, torch.Tensor))
    return {
        "path": str(path), "format_version": ckpt["format_version"], "created": ckpt.get("created"),
        "genotype": ckpt["genotype"], "segmenter": ckpt["segmenter"], "model": ckpt.get("model", {}),
        "tensors": len(ckpt["state_dict"]),
        "values": n, "train_cfg": ckpt["train_cfg"], "versions": ckpt["versions"],
        "state": sorted(ckpt["state"]) if isinstance(ckpt.get("state"), dict) else None,
    }


def info(path: str | Path) -> dict[str, Any]:
    """The model card of a checkpoint (:func:`trainer.card.full_card`), also for files written before cards."""
    ckpt = load_checkpoint(path)
    ckpt["path"] = str(path)
    return full_card(ckpt)


_COMMANDS = ("info", "export", "init")


def _command_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.checkpoint", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="print the model card")
    pi.add_argument("checkpoint", help=".pt checkpoint or exported .safetensors")
    pi.add_argument("--json", action="store_true", help="print the card as JSON")
    pe = sub.add_parser("export", help="export the weights")
    pe.add_argument("checkpoint")
    pe.add_argument("--safetensors", required=True, metavar="OUT", help="output .safetensors file")
    pn = sub.add_parser("init", help="write a randomly initialised checkpoint")
    _init_args(pn)
    return p


def _init_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--genotype", default="paif", help="name in search_space.genotype.GENOTYPES or a JSON file")
    p.add_argument("--segmenter", default="b0", help="SegFormer variant")
    p.add_argument("--num-classes", type=int, default=9)
    p.add_argument("--channels", type=int, default=None, help="override the genotype's channel width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ckpt.pt", help="output path for init")


def _run_command(args: argparse.Namespace) -> None:
    if args.command == "info":
        card = info(args.checkpoint)
        print(json.dumps(card, indent=2, default=str) if args.json else render(card))
    elif args.command == "export":
        out = export_safetensors(args.checkpoint, args.safetensors)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB; weights content hash "
              f"{info(out)['content_hash']})")
    else:
        path = init_checkpoint(args.out, args.genotype, args.segmenter, args.num_classes, args.channels, args.seed)
        print(json.dumps(_summary(path), indent=2))


@entry_point
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _COMMANDS:
        args = _command_parser().parse_args(argv)
        try:
            _run_command(args)
        except CheckpointError as exc:
            print(f"error: {exc}")
            return 2
        return 0
    p = argparse.ArgumentParser(prog="python -m trainer.checkpoint", description=__doc__.split("\n")[0],
                                epilog="subcommands: info CKPT [--json], export CKPT --safetensors OUT, init ...")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--init", action="store_true", help="write a randomly initialised checkpoint")
    mode.add_argument("--info", metavar="CKPT", help="print a checkpoint's metadata as JSON")
    _init_args(p)
    args = p.parse_args(argv)
    if args.init:
        path = init_checkpoint(args.out, args.genotype, args.segmenter, args.num_classes, args.channels, args.seed)
        print(json.dumps(_summary(path), indent=2))
    else:
        print(json.dumps(_summary(args.info), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
