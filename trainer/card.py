"""Model cards: what a PAIF checkpoint is, how it was made and how it scored, stored inside the checkpoint.

After Mitchell et al., "Model Cards for Model Reporting" (FAT* 2019), for the fusion + segmentation models of
PAIF (Liu et al., ACM MM 2023). A checkpoint (``trainer.checkpoint``) already holds the genotype, the segmenter,
the forward options, the resolved training config and the library versions; its ``card`` adds what those do not
say plainly, as tensors-free plain types (``torch.load(weights_only=True)`` still opens it)::

    "card": {"card_version": 1,
             "content_hash": "sha256:<hex>",           # of the weights alone (content_hash)
             "training": {"mode": "aat", "summary": "...", "recipe": {...}, "progress": {...}},
             "data": {"root": ..., "train_split": ..., "train_images": n, ...},
             "evaluations": [{"date", "data", "split", "images", "threats": {name: {"eps_255", "miou"}}, ...}],
             "notes": [...]}

:func:`full_card` assembles the card a reader wants (architecture, training, data, evaluations, versions, hash
checked against the weights) from any checkpoint, also from one written before cards existed (it then says
what is missing); :func:`render` prints it (``python -m trainer.checkpoint info CKPT``).
``trainer/evaluate.py`` appends one entry per evaluation (:func:`evaluation_entry`).
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping

import torch

__all__ = ["CARD_VERSION", "MAX_EVALUATIONS", "content_hash", "new_card", "training_from_config",
           "evaluation_entry", "full_card", "render", "parameter_counts"]

CARD_VERSION = 1
MAX_EVALUATIONS = 200
"""The oldest evaluation entries are dropped beyond this many (a checkpoint evaluated in a loop stays small)."""

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def content_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"sha256:<hex>"`` over every tensor's name, dtype, shape and bytes, in name order.

    Depends on the weights only (not on the file's metadata or the card), so it identifies a model across
    re-saves, appended evaluations and the safetensors export.
    """
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def parameter_counts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Learned values (BatchNorm running statistics excluded): ``{"total", "fusion", "segmenter"}``."""
    counts = {"total": 0, "fusion": 0, "segmenter": 0}
    for name, t in state_dict.items():
        if name.endswith(_BUFFERS):
            continue
        n = int(t.numel())
        counts["total"] += n
        part = name.split(".", 1)[0]
        if part in counts:
            counts[part] += n
    return counts


def new_card(training: Mapping[str, Any], data: Mapping[str, Any] | None, state_dict: Mapping[str, torch.Tensor],
             notes: list[str] | None = None, evaluations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A card for a checkpoint being written (``trainer.checkpoint.save_checkpoint``)."""
    return {"card_version": CARD_VERSION, "content_hash": content_hash(state_dict), "training": dict(training),
            "data": dict(data or {}), "evaluations": list(evaluations or []), "notes": list(notes or [])}


# ---------------------------------------------------------------------------------------------- training
def _eps_text(values: Any) -> str:
    vals = values if isinstance(values, (list, tuple)) else [values]
    return "/".join(f"{float(v) * 255:g}" for v in vals) + "/255"


def _summary(mode: str, cfg: Mapping[str, Any]) -> str:
    attack = cfg.get("attack") or {}
    kind = f"{str(attack.get('kind', 'pgd')).upper()}-{attack.get('steps', '?')}"
    if mode == "aat":
        aat = cfg.get("aat") or {}
        return (f"adaptive adversarial training (AAT): Reptile pretext over eps {_eps_text(aat.get('eps', []))}, "
                f"then online {kind} with an adaptive eps")
    if mode == "at":
        return f"plain adversarial training, {kind} at eps {_eps_text(attack.get('at_eps', 0.0))}"
    if mode == "clean":
        return "standard training without attacks (the paper's w/o AAT)"
    if mode == "fusion":
        eps = float(attack.get("fusion_eps", 0.0) or 0.0)
        adv = f", adversarially against the label-free fusion attack {kind} at eps {_eps_text(eps)}" if eps > 0 else ""
        return ("fusion net only, on unlabelled pairs, with the reference-free fusion loss" + adv
                + "; the segmenter is NOT trained (its weights are the initial ones)")
    return f"mode {mode!r}"


_RECIPE_KEYS = ("genotype", "channels", "segmenter", "pretrained", "init_from", "inputs", "seg_scale", "seed",
                "epochs", "max_steps", "lambda_fusion", "lambda_seg", "data.batch_size", "data.crop", "data.flip",
                "optim.lr", "optim.weight_decay", "optim.warmup_steps", "attack.kind", "attack.steps",
                "attack.at_eps", "attack.fusion_eps", "attack.adv_weight", "aat.eps", "aat.meta_iters",
                "aat.inner_steps", "precision", "devices")


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def training_from_config(train_cfg: Mapping[str, Any], state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The card's ``training`` section from a resolved retrain config (``trainer.module.RetrainConfig`` as a dict).

    ``recipe`` keeps the settings that define the run (the full config stays in ``train_cfg``); ``progress``
    the step, epoch and validation metrics of ``state`` when given.
    """
    mode = str(train_cfg.get("mode", "unknown"))
    recipe = {k: v for k in _RECIPE_KEYS if (v := _get(train_cfg, k)) is not None}
    unused = {"aat": ("attack.fusion_eps",), "at": ("aat.", "attack.fusion_eps"),
              "clean": ("aat.", "attack."),
              "fusion": ("aat.", "lambda_", "attack.at_eps", "segmenter", "pretrained", "seg_scale")}.get(mode, ())
    recipe = {k: v for k, v in recipe.items() if not k.startswith(unused)}
    out: dict[str, Any] = {"mode": mode, "summary": _summary(mode, train_cfg), "recipe": recipe}
    if state:
        progress = {k: state[k] for k in ("global_step", "epoch", "best_score", "metrics_step") if k in state}
        metrics = state.get("metrics") or {}
        if metrics:
            progress["metrics"] = dict(metrics)
        out["progress"] = progress
    return out


# ---------------------------------------------------------------------------------------------- evaluations
def evaluation_entry(report: Mapping[str, Any], report_path: str | None = None) -> dict[str, Any]:
    """One ``evaluations`` entry from a ``trainer/evaluate.py`` report (threat models and their mIoU)."""
    data = report.get("data") or {}
    cfg = report.get("config") or {}
    labelled = bool(data.get("labelled"))
    entry: dict[str, Any] = {
        "date": report.get("created"), "data": data.get("root"), "split": data.get("split"),
        "images": data.get("num_images"), "labelled": labelled,
        "miou_convention": report.get("miou_convention") if labelled else None,
        "quick_check": bool(cfg.get("steps") or cfg.get("resize")),
        "report": report_path,
    }
    clean = report.get("clean") or {}
    if labelled:
        seg = clean.get("segmentation") or {}
        entry["clean"] = {"miou": seg.get("miou"), "miou_objects": seg.get("miou_objects")}
    else:
        entry["clean"] = {"fusion": dict(clean.get("fusion") or {})}
    threats = {}
    for name, t in (report.get("threats") or {}).items():
        item: dict[str, Any] = {"eps_255": t.get("eps_255")}
        if labelled:
            seg = t.get("segmentation") or {}
            item.update(miou=seg.get("miou"), miou_objects=seg.get("miou_objects"))
        else:
            item["fused_psnr"] = t.get("fused_psnr")
        threats[name] = item
    entry["threats"] = threats
    return entry


# ---------------------------------------------------------------------------------------------- reading
def full_card(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """Everything a reader wants to know about a checkpoint, as one dict (works without a stored card).

    ``content_hash`` is recomputed from the weights; ``hash_ok`` says whether it equals the stored one
    (None when the card has none). ``missing`` lists the sections an old checkpoint cannot tell.
    """
    card = ckpt.get("card") if isinstance(ckpt.get("card"), Mapping) else None
    sd = ckpt.get("state_dict") or {}
    actual = content_hash(sd)
    stored = card.get("content_hash") if card else None
    missing = []
    if card is None:
        missing.append("model card (the checkpoint was written before cards existed)")
        training = training_from_config(ckpt.get("train_cfg") or {}, ckpt.get("state")) \
            if isinstance(ckpt.get("train_cfg"), Mapping) and "mode" in ckpt["train_cfg"] else None
        if training is None:
            missing.append("training mode and recipe")
        data = _data_from_config(ckpt.get("train_cfg"))
        if data is None:
            missing.append("training data")
        evaluations: list[Any] = []
        notes: list[str] = []
    else:
        training, data = card.get("training"), card.get("data") or None
        evaluations, notes = list(card.get("evaluations") or []), list(card.get("notes") or [])
    return {
        "path": ckpt.get("path"), "created": ckpt.get("created"), "format_version": ckpt.get("format_version"),
        "card_version": card.get("card_version") if card else None,
        "content_hash": actual, "stored_hash": stored, "hash_ok": None if stored is None else stored == actual,
        "genotype": ckpt.get("genotype"), "segmenter": ckpt.get("segmenter"), "model": ckpt.get("model") or {},
        "parameters": parameter_counts(sd), "training": training, "data": data, "evaluations": evaluations,
        "notes": notes, "versions": ckpt.get("versions") or {}, "missing": missing,
    }


def _data_from_config(train_cfg: Any) -> dict[str, Any] | None:
    data = train_cfg.get("data") if isinstance(train_cfg, Mapping) else None
    if not isinstance(data, Mapping) or "root" not in data:
        return None
    return {k: data[k] for k in ("root", "train_split", "val_split") if k in data}


def _pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.1f} %"


def _genotype_text(g: Any) -> str:
    if not isinstance(g, Mapping):
        return repr(g)
    cells = [f"{k}: {' -> '.join(v)}" for k, v in g.items() if isinstance(v, list)]
    rest = [f"{k} {v}" for k, v in g.items() if not isinstance(v, list) and k != "version"]
    return "; ".join(cells + rest)


def _evaluation_line(e: Mapping[str, Any]) -> str:
    head = f"{e.get('date') or '?'}  {e.get('data')}:{e.get('split')} ({e.get('images')} images"
    head += ", labelled)" if e.get("labelled") else ", unlabelled)"
    parts = []
    if e.get("labelled"):
        parts.append(f"clean mIoU {_pct((e.get('clean') or {}).get('miou'))}")
        for name, t in (e.get("threats") or {}).items():
            parts.append(f"{name} (eps {float(t.get('eps_255') or 0):g}/255) {_pct(t.get('miou'))}")
    else:
        fusion = (e.get("clean") or {}).get("fusion") or {}
        if fusion:
            parts.append("clean " + ", ".join(f"{k} {float(v):.3g}" for k, v in fusion.items() if v is not None))
        for name, t in (e.get("threats") or {}).items():
            psnr = t.get("fused_psnr")
            parts.append(f"{name} (eps {float(t.get('eps_255') or 0):g}/255) fused PSNR "
                         f"{'n/a' if psnr is None else f'{float(psnr):.1f} dB'}")
    flag = "  [quick check: attack steps or image size overridden, not the protocol]" if e.get("quick_check") else ""
    return head + flag + "\n      " + "; ".join(parts)


def render(card: Mapping[str, Any]) -> str:
    """The card as text (what ``python -m trainer.checkpoint info`` prints)."""
    lines = [f"PAIF checkpoint {card.get('path') or ''}".rstrip(),
             f"  created          {card.get('created') or 'unknown'}"]
    if card.get("hash_ok") is None:
        lines.append(f"  content hash     {card['content_hash']} (computed now; no hash was stored)")
    else:
        verdict = "matches the weights" if card["hash_ok"] else f"DOES NOT MATCH the stored {card['stored_hash']}"
        lines.append(f"  content hash     {card['content_hash']} ({verdict})")
    for item in card.get("missing") or []:
        lines.append(f"  not recorded     {item}")
    seg = card.get("segmenter") or {}
    p = card.get("parameters") or {}
    model = card.get("model") or {}
    lines += ["Architecture",
              f"  fusion genotype  {_genotype_text(card.get('genotype'))}",
              f"  segmenter        SegFormer MiT-{seg.get('variant', '?')}, {seg.get('num_classes', '?')} classes"
              + (f", decoder width {seg['decoder_hidden_size']}" if seg.get("decoder_hidden_size") else ""),
              f"  forward options  " + (", ".join(f"{k}={v}" for k, v in model.items()) or "defaults"),
              f"  parameters       {p.get('total', 0):,} (fusion {p.get('fusion', 0):,}, "
              f"segmenter {p.get('segmenter', 0):,})"]
    training = card.get("training")
    lines.append("Training")
    if training:
        lines.append(f"  mode             {training.get('mode')}: {training.get('summary', '')}")
        recipe = training.get("recipe") or {}
        if recipe:
            lines.append("  recipe           " + ", ".join(f"{k}={v}" for k, v in recipe.items()))
        prog = training.get("progress") or {}
        if prog:
            metrics = prog.get("metrics") or {}
            text = ", ".join(f"{k} {v}" for k, v in prog.items() if k != "metrics")
            if metrics:
                text += "; " + ", ".join(f"{k} {float(v):.4g}" for k, v in metrics.items())
            lines.append(f"  progress         {text}")
    else:
        lines.append("  not recorded")
    data = card.get("data")
    lines.append("Data")
    lines.append("  " + (", ".join(f"{k} {v}" for k, v in data.items()) if data else "not recorded"))
    evals = card.get("evaluations") or []
    lines.append(f"Evaluations ({len(evals)})")
    lines += [f"  {_evaluation_line(e)}" for e in evals] or ["  none recorded (trainer/evaluate.py appends one per run)"]
    for note in card.get("notes") or []:
        lines.append(f"Note: {note}")
    versions = card.get("versions") or {}
    lines += ["Library versions", "  " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(lines)
