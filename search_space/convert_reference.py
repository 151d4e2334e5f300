"""Convert a published PAIF checkpoint (LiuZhu-CV/PAIF, Liu et al., ACM MM 2023) into this project's format.

The authors released the weights of ``Network_MM_Searched`` (their "w/ AAT" and "w/o AAT" models, MiT-b3):
the fusion net under ``enhance_net.*`` and the SegFormer (MiT encoder + all-MLP head) under ``denoise_net.*``.
This maps every tensor onto ``search_space.pipeline.FusionSegModel`` (``fusion.*``, ``segmenter.model.*``),
checks every key and shape, and writes a ``trainer.checkpoint`` file whose ``model`` options reproduce the
published forward, so ``trainer.checkpoint.load_model`` / ``trainer/evaluate.py`` use it with no extra flag::

    python -m search_space.convert_reference CKPT.pth --out paif_published.pt
    python trainer/evaluate.py --checkpoint paif_published.pt ...

Accepted input: a bare state dict or one wrapped under ``state_dict`` / ``model`` / ``net`` / ``network``;
keys with or without the DataParallel ``module.`` prefix. MiT-b0..b5 and the number of classes are read from
the shapes. Strict: every published tensor is used or listed in :data:`DROPPED` with the reason; a missing,
unexpected or mis-shaped key stops the conversion with an error naming it.

Mapping notes: the published attention's ``kv`` Linear (``2C × C``; rows ``[:C]`` are the keys, ``[C:]`` the
values, as its forward reshapes to ``(…, 2, heads, C/heads)``) is split into transformers' key and value
projections; ``linear_c1..4`` (applied to stages 1..4) become ``linear_projections.0..3`` (the concatenation
order c4, c3, c2, c1 is the same in both heads). Forward differences that weights cannot carry are recorded as
:data:`PUBLISHED_OPTIONS` (see ``search_space.pipeline.build_model``).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import pickle
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from trainer.errors import PaifError, entry_point

__all__ = [
    "ConversionError", "Rule", "DROPPED", "PUBLISHED_OPTIONS", "WRAPPER_KEYS", "fusion_rules", "segmenter_rules",
    "unwrap_state_dict", "detect_variant", "convert_state_dict", "convert_checkpoint", "group_summary", "main",
]

log = logging.getLogger(__name__)

PUBLISHED_OPTIONS: dict[str, Any] = {
    "seg_norm": "published",      # clamp, whole-batch min-max, x255, ImageNet mean/std
    "color": "published",         # RGB2YCrCb / YCrCb2RGB with rounded coefficients
    "fusion_output": "tanh",      # the fusion head's raw tanh is the fused Y
    "mit_norm_eps": 1e-6,         # MiT block and stage-output LayerNorms: partial(nn.LayerNorm, eps=1e-6)
    "inputs": "both",             # both modalities
    "seg_scale": 1,               # the segmenter sees the fused image at its own size
}
"""``build_model`` options that reproduce the published forward; recorded in converted checkpoints."""

DROPPED: dict[str, str] = {
    "enhance_net.decompation.relu.weight":
        "a PReLU created in the decomposition cell that the published forward never calls",
    "denoise_net.classifier.weight":
        "WeTr's CAM classifier on stage-4 features: computed in the published forward but never reaches its output",
}
"""Published tensors that are deliberately not converted, with the reason (optional in the input)."""

WRAPPER_KEYS = ("state_dict", "model", "net", "network", "model_state_dict")
"""Keys under which a checkpoint may wrap its state dict (searched in this order, nested wrappers allowed)."""

_SR_RATIOS = (8, 4, 2, 1)  # MiT-b0..b5: stage 4 has no sequence reduction
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_WB = ("weight", "bias")


class ConversionError(PaifError, ValueError):
    """The published checkpoint cannot be converted; the message names the first key that does not fit."""


@dataclass(frozen=True)
class Rule:
    """One published tensor ``src`` → our tensor(s) ``dst``.

    Several ``dst`` keys split ``src`` along dim 0 in equal parts, in order (``kv`` → key, value).
    ``group`` names the key group for the summary table.
    """

    src: str
    dst: tuple[str, ...]
    group: str


# ------------------------------------------------------------------------------------------------ rules
def _module(src: str, dst: str, group: str, params: Iterable[str]) -> list[Rule]:
    return [Rule(f"{src}.{p}", (f"{dst}.{p}",), group) for p in params]


def fusion_rules() -> list[Rule]:
    """Rules for ``enhance_net.*`` (the published ``Network_Fusion_Searched``, genotype ``paif``) → ``fusion.*``.

    Every op of the published genotype is an ``_ops.i._op`` of a chain; ours are ``ops.i`` of a chain cell.
    """
    e, f = "enhance_net", "fusion"
    rules: list[Rule] = []

    def add(src: str, dst: str, params: Iterable[str] = ("weight",), group: str | None = None) -> None:
        rules.extend(_module(f"{e}.{src}", f"{f}.{dst}", group or f"{e}.{src.split('.')[0]}", params))

    for stem, ours in (("stem_1", "stem_ir"), ("stem_2", "stem_vis")):
        add(f"{stem}.0", f"{ours}.conv")
        add(f"{stem}.1", f"{ours}.act")
    for conv, ours in (("conv1x1_lf", "decomp_ir"), ("conv1x1_hf", "decomp_vis")):
        add(f"decompation.{conv}", f"{ours}.reduce", _WB, f"{e}.decompation.{conv}")

    def dense(src: str, dst: str, group: str) -> None:  # dense_k3_d1: three convs (dense concat) + PReLU
        for i in (1, 2, 3):
            add(f"{src}.conv{i}.conv", f"{dst}.conv{i}", group=group)
        add(f"{src}.lrelu", f"{dst}.act", group=group)

    chain_ir, chain_vis, chain = (f"{e}.decompation.chain", f"{e}.decompation.chain2", f"{e}.chain")
    dense("decompation.chain._ops.0._op", "cell_ir.ops.0", chain_ir)
    add("decompation.chain._ops.1._op.op.1.conv", "cell_ir.ops.1.body.1", group=chain_ir)  # dilconv_k3_d2
    add("decompation.chain._ops.1._op.op.2", "cell_ir.ops.1.body.2", group=chain_ir)
    add("decompation.chain._ops.1._op.op.3", "cell_ir.ops.1.body.3", _BN, chain_ir)
    dense("decompation.chain2._ops.0._op", "cell_vis.ops.0", chain_vis)
    dense("decompation.chain2._ops.1._op", "cell_vis.ops.1", chain_vis)
    add("spa.spatial.conv", "rule.conv")
    add("chain._ops.0._op.conv1", "cell_fused.ops.0.conv1", group=chain)  # eca_k3 block
    add("chain._ops.0._op.conv2.conv", "cell_fused.ops.0.conv2", group=chain)
    add("chain._ops.0._op.se.conv", "cell_fused.ops.0.eca", group=chain)
    add("chain._ops.0._op.relu", "cell_fused.ops.0.act", group=chain)
    add("chain._ops.1._op.op.0.conv", "cell_fused.ops.1.body.0", group=chain)  # residual_k7_d1
    add("chain._ops.1._op.op.1", "cell_fused.ops.1.body.1", group=chain)
    add("chain._ops.1._op.op.2", "cell_fused.ops.1.body.2", group=chain)
    add("chain._ops.1._op.op.3", "cell_fused.ops.1.body.3", _BN, chain)
    add("chain._ops.1._op.op.4", "cell_fused.ops.1.body.4", group=chain)
    for i, ours in ((0, "conv1"), (1, "conv2"), (2, "act")):
        add(f"stem_out.{i}", f"head.{ours}")
    return rules


# transformers' SegFormer module names: 5.x ("stages") and 4.x ("encoder"), {s} stage, {b} block
_HF_LAYOUTS: dict[str, dict[str, str]] = {
    "transformers>=5": {
        "patch": "segformer.stages.{s}.patch_embeddings", "block": "segformer.stages.{s}.blocks.{b}",
        "stage_norm": "segformer.stages.{s}.layer_norm", "norm1": "layernorm_before", "norm2": "layernorm_after",
        "q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.o_proj",
        "sr": "attention.sequence_reduction.sequence_reduction", "sr_norm": "attention.sequence_reduction.layer_norm",
        "fc1": "mlp.fc1", "dwconv": "mlp.dwconv.dwconv", "fc2": "mlp.fc2",
        "linear": "decode_head.linear_projections.{s}.proj",
    },
    "transformers<5": {
        "patch": "segformer.encoder.patch_embeddings.{s}", "block": "segformer.encoder.block.{s}.{b}",
        "stage_norm": "segformer.encoder.layer_norm.{s}", "norm1": "layer_norm_1", "norm2": "layer_norm_2",
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "o": "attention.output.dense", "sr": "attention.self.sr", "sr_norm": "attention.self.layer_norm",
        "fc1": "mlp.dense1", "dwconv": "mlp.dwconv.dwconv", "fc2": "mlp.dense2",
        "linear": "decode_head.linear_c.{s}.proj",
    },
}
_SEG = "segmenter.model"


def segformer_layout(target_keys: Iterable[str]) -> str:
    """Which transformers naming the target model uses (a key of ``_HF_LAYOUTS``)."""
    keys = set(target_keys)
    for name, names in _HF_LAYOUTS.items():
        if f"{_SEG}.{names['patch'].format(s=0)}.proj.weight" in keys:
            return name
    raise ConversionError(
        "target model: expected a transformers SegFormer with key "
        + " or ".join(f"{_SEG}.{n['patch'].format(s=0)}.proj.weight" for n in _HF_LAYOUTS.values())
        + "; this transformers version names its modules differently (add its layout to _HF_LAYOUTS)")


def segmenter_rules(depths: Sequence[int], layout: str = "transformers>=5") -> list[Rule]:
    """Rules for ``denoise_net.*`` (MiT encoder ``encoder.*`` + ``SegFormerHead`` ``decoder.*``) → ``segmenter.*``.

    Args:
        depths: blocks per stage (MiT-b0 ``[2, 2, 2, 2]``, MiT-b3 ``[3, 4, 18, 3]``).
        layout: a key of ``_HF_LAYOUTS`` (see :func:`segformer_layout`).
    """
    n = _HF_LAYOUTS[layout]
    enc, dec = "denoise_net.encoder", "denoise_net.decoder"
    rules: list[Rule] = []
    for s, depth in enumerate(depths):
        patch = f"{_SEG}.{n['patch'].format(s=s)}"
        group = f"{enc}.patch_embed{{1..4}}"
        rules += _module(f"{enc}.patch_embed{s + 1}.proj", f"{patch}.proj", group, _WB)
        rules += _module(f"{enc}.patch_embed{s + 1}.norm", f"{patch}.layer_norm", group, _WB)
        for b in range(depth):
            src, dst = f"{enc}.block{s + 1}.{b}", f"{_SEG}.{n['block'].format(s=s, b=b)}"
            blk = f"{enc}.block{{1..4}}.*"
            rules += _module(f"{src}.norm1", f"{dst}.{n['norm1']}", f"{blk}.norm1/norm2", _WB)
            rules += _module(f"{src}.attn.q", f"{dst}.{n['q']}", f"{blk}.attn.q/proj", _WB)
            rules += [Rule(f"{src}.attn.kv.{p}", (f"{dst}.{n['k']}.{p}", f"{dst}.{n['v']}.{p}"),
                           f"{blk}.attn.kv (split)") for p in _WB]
            rules += _module(f"{src}.attn.proj", f"{dst}.{n['o']}", f"{blk}.attn.q/proj", _WB)
            if _SR_RATIOS[s] > 1:
                rules += _module(f"{src}.attn.sr", f"{dst}.{n['sr']}", f"{blk}.attn.sr/norm", _WB)
                rules += _module(f"{src}.attn.norm", f"{dst}.{n['sr_norm']}", f"{blk}.attn.sr/norm", _WB)
            rules += _module(f"{src}.norm2", f"{dst}.{n['norm2']}", f"{blk}.norm1/norm2", _WB)
            for ours, theirs in (("fc1", "fc1"), ("dwconv", "dwconv.dwconv"), ("fc2", "fc2")):
                rules += _module(f"{src}.mlp.{theirs}", f"{dst}.{n[ours]}", f"{blk}.mlp", _WB)
        rules += _module(f"{enc}.norm{s + 1}", f"{_SEG}.{n['stage_norm'].format(s=s)}", f"{enc}.norm{{1..4}}", _WB)
    for s in range(len(depths)):
        rules += _module(f"{dec}.linear_c{s + 1}.proj", f"{_SEG}.{n['linear'].format(s=s)}",
                         f"{dec}.linear_c{{1..4}}", _WB)
    rules += _module(f"{dec}.linear_fuse.0", f"{_SEG}.decode_head.linear_fuse", f"{dec}.linear_fuse", ("weight",))
    rules += _module(f"{dec}.linear_fuse.1", f"{_SEG}.decode_head.batch_norm", f"{dec}.linear_fuse", _BN)
    rules += _module(f"{dec}.linear_pred", f"{_SEG}.decode_head.classifier", f"{dec}.linear_pred", _WB)
    return rules


# ------------------------------------------------------------------------------------------------ input
def unwrap_state_dict(obj: Any) -> "OrderedDict[str, torch.Tensor]":
    """The state dict inside a loaded checkpoint, with the DataParallel ``module.`` prefix removed.

    Accepts a bare ``{name: tensor}`` mapping or one nested under a key of :data:`WRAPPER_KEYS`.
    Non-tensor entries of a bare state dict are an error.
    """
    seen = []
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ConversionError(
                f"expected a state dict of tensors, or one wrapped under one of {list(WRAPPER_KEYS)}, "
                f"got a mapping with keys {sorted(map(str, obj))[:10]}{' under ' + '/'.join(seen) if seen else ''}")
        seen.append(inner)
        obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"expected a state dict (a mapping of name -> tensor), got {type(obj).__name__}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"key {key!r}: expected a tensor, got {type(value).__name__}")
        name = key[len("module."):] if key.startswith("module.") else key
        if name in out:
            raise ConversionError(f"key {name!r} appears both with and without the 'module.' prefix")
        out[name] = value
    return out


def detect_variant(sd: Mapping[str, torch.Tensor]) -> tuple[str, int, int]:
    """``(variant, num_classes, decoder_hidden_size)`` of a published state dict, read from its shapes.

    The MiT variant follows from the stage widths and depths; the head width is read separately, since the
    published code uses 256 for every variant (SegFormer's own b2..b5 heads are 768 wide).

    Raises:
        ConversionError: a key needed for the detection is missing, or the shapes fit no MiT-b0..b5.
    """
    from search_space.segmenter import MIT_VARIANTS

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise ConversionError(f"missing key {key!r}: expected the published PAIF state dict "
                                  "(enhance_net.* and denoise_net.*) to detect the MiT variant")
        return sd[key]

    hidden = [int(need(f"denoise_net.encoder.patch_embed{s}.proj.weight").shape[0]) for s in range(1, 5)]
    depths = []
    for s in range(1, 5):
        pattern = re.compile(rf"denoise_net\.encoder\.block{s}\.(\d+)\.")
        found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
        depths.append(max(found) + 1 if found else 0)
    decoder = int(need("denoise_net.decoder.linear_fuse.0.weight").shape[0])
    num_classes = int(need("denoise_net.decoder.linear_pred.weight").shape[0])
    for name, spec in MIT_VARIANTS.items():
        if (list(spec["hidden_sizes"]), list(spec["depths"])) == (hidden, depths):
            return name, num_classes, decoder
    raise ConversionError(
        f"expected the stage widths and depths of a MiT-b0..b5 encoder, got widths {hidden}, depths {depths}; "
        "known: " + "; ".join(f"{k}: {v['hidden_sizes']} {v['depths']}" for k, v in MIT_VARIANTS.items()))


# ------------------------------------------------------------------------------------------------ convert
def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def convert_state_dict(
    published: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    rules: Sequence[Rule],
    ignore_prefixes: Sequence[str] = (),
) -> "OrderedDict[str, torch.Tensor]":
    """Map ``published`` onto the keys, shapes and dtypes of ``target`` (our model's state dict) by ``rules``.

    Strict: every rule's source must be present with the shape ``target`` implies (split rules: the targets
    concatenated along dim 0); every published key must be used, dropped (:data:`DROPPED`) or under one of
    ``ignore_prefixes``; the rules must produce every target key exactly once.

    Raises:
        ConversionError: naming the first key that does not fit (missing, unexpected or of another shape),
            with the number of other problems.
    """
    produced = Counter(d for r in rules for d in r.dst)
    dup = sorted(d for d, n in produced.items() if n > 1)
    uncovered = sorted(set(target) - set(produced))
    unknown = sorted(set(produced) - set(target))
    if dup or uncovered or unknown:  # the rules do not fit our own model: a converter bug, not bad input
        raise ConversionError(
            f"conversion rules do not fit this model (a bug in search_space.convert_reference or a changed model): "
            f"our keys not produced {uncovered[:5]}, produced but not in the model {unknown[:5]}, duplicated {dup[:5]}")
    problems: list[str] = []
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for rule in rules:
        if rule.src not in published:
            want = _expected_shape(rule, target)
            problems.append(f"missing key {rule.src!r} (expected shape {want}, for {', '.join(rule.dst)})")
            continue
        src = published[rule.src]
        want = _expected_shape(rule, target)
        if _shape(src) != want:
            problems.append(f"key {rule.src!r}: expected shape {want} (for {', '.join(rule.dst)}), "
                            f"got {_shape(src)}")
            continue
        parts = src.chunk(len(rule.dst), dim=0) if len(rule.dst) > 1 else (src,)
        for dst, part in zip(rule.dst, parts):
            if part.is_floating_point() != target[dst].is_floating_point():
                problems.append(f"key {rule.src!r}: expected dtype {target[dst].dtype} (for {dst}), got {part.dtype}")
                break
            out[dst] = part.detach().to(dtype=target[dst].dtype).clone()
    used = {r.src for r in rules}
    for key, value in published.items():
        if key in used or any(key.startswith(p) for p in ignore_prefixes):
            continue
        if key in DROPPED:
            log.info("dropped %s %s: %s", key, _shape(value), DROPPED[key])
            continue
        problems.append(f"unexpected key {key!r} {_shape(value)}: not part of the published PAIF model "
                        "(remove it, or pass it with --ignore-prefix if it is extra state such as a loss module)")
    if problems:
        more = ""
        if len(problems) > 1:
            more = f" (and {len(problems) - 1} more problem(s): {'; '.join(problems[1:4])}"
            more += ", ...)" if len(problems) > 4 else ")"
        raise ConversionError(f"published checkpoint does not fit: {problems[0]}{more}")
    return OrderedDict((k, out[k]) for k in target)


def _expected_shape(rule: Rule, target: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    shapes = [_shape(target[d]) for d in rule.dst]
    if len(shapes) == 1:
        return shapes[0]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def group_summary(rules: Sequence[Rule], converted: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """One row per key group: published prefix, our prefix, number of published tensors and of parameters.

    Parameters count the values of converted tensors except BatchNorm running statistics.
    """
    rows: dict[str, dict[str, Any]] = {}
    for rule in rules:
        row = rows.setdefault(rule.group, {"published": rule.group, "ours": set(), "tensors": 0, "params": 0})
        row["tensors"] += 1
        for dst in rule.dst:
            row["ours"].add(_prefix(dst))
            if not dst.endswith(("running_mean", "running_var", "num_batches_tracked")):
                row["params"] += int(converted[dst].numel())
    for row in rows.values():
        row["ours"] = _join_prefixes(sorted(row["ours"]))
    return list(rows.values())


def _prefix(key: str) -> str:
    """Our key with numbers replaced by ``*`` and the parameter name removed (for the summary table)."""
    parts = key.split(".")[:-1]
    return ".".join("*" if p.isdigit() else p for p in parts)


def _join_prefixes(prefixes: Sequence[str]) -> str:
    """``a.b.{c,d.e}`` for ``["a.b.c", "a.b.d.e"]``."""
    if len(prefixes) == 1:
        return prefixes[0]
    split = [p.split(".") for p in prefixes]
    common = 0
    while all(len(s) > common + 1 and s[common] == split[0][common] for s in split):
        common += 1
    head = ".".join(split[0][:common])
    return f"{head}.{{{','.join('.'.join(s[common:]) for s in split)}}}"


# ------------------------------------------------------------------------------------------------ files
def _load(path: Path, trust_pickle: bool) -> Any:
    if not path.is_file():
        raise ConversionError(f"published checkpoint {path} does not exist: expected a .pth file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        raise ConversionError(
            f"{path}: holds objects other than tensors and plain types, so it cannot be loaded with "
            f"weights_only=True; if you trust the file, pass --trust-pickle ({str(exc).splitlines()[0]})") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ConversionError(f"{path}: not a readable torch file (corrupted or truncated?): {exc}") from exc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_checkpoint(src: str | Path, out: str | Path, ignore_prefixes: Sequence[str] = (),
                       trust_pickle: bool = False) -> dict[str, Any]:
    """Convert the published checkpoint ``src`` into our checkpoint ``out`` (genotype ``paif``).

    Returns:
        A summary: paths, variant, num_classes, tensor counts, dropped and ignored keys, options, key groups.
    Raises:
        ConversionError: unreadable input or a key that does not fit (named).
    """
    from search_space.genotype import GENOTYPES
    from search_space.pipeline import build_model
    from trainer.checkpoint import save_checkpoint

    src, out = Path(src), Path(out)
    published = unwrap_state_dict(_load(src, trust_pickle))
    variant, num_classes, decoder = detect_variant(published)
    genotype = GENOTYPES["paif"]
    seg_cfg = {"variant": variant, "num_classes": num_classes, "decoder_hidden_size": decoder}
    model = build_model(genotype, segmenter=variant, num_classes=num_classes, pretrained=None,
                        decoder_hidden_size=decoder, **PUBLISHED_OPTIONS)
    target = model.state_dict()
    rules = fusion_rules() + segmenter_rules(_depths(variant), segformer_layout(target))
    converted = convert_state_dict(published, target, rules, ignore_prefixes)
    model.load_state_dict(converted, strict=True)
    dropped = sorted(k for k in published if k in DROPPED)
    ignored = sorted(k for k in published if any(k.startswith(p) for p in ignore_prefixes))
    train_cfg = {"source": "published PAIF checkpoint (LiuZhu-CV/PAIF), converted by search_space.convert_reference",
                 "source_file": src.name, "source_sha256": _sha256(src), "dropped": dropped, "ignored": ignored}
    card = {"training": {"mode": "converted", "summary": f"published PAIF weights ({src.name}), converted; trained by "
                                                        "the paper's authors (MSRS, their recipe)",
                         "recipe": {"source_sha256": train_cfg["source_sha256"]}}}
    save_checkpoint(out, model, genotype, seg_cfg, train_cfg, model_cfg=PUBLISHED_OPTIONS, card=card)
    return {"source": str(src), "out": str(out), **seg_cfg,
            "published_tensors": len(published), "converted_tensors": len(converted),
            "dropped": {k: DROPPED[k] for k in dropped}, "ignored": ignored, "options": dict(PUBLISHED_OPTIONS),
            "groups": group_summary(rules, converted)}


def _depths(variant: str) -> list[int]:
    from search_space.segmenter import MIT_VARIANTS

    return list(MIT_VARIANTS[variant]["depths"])


@entry_point
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search_space.convert_reference", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="published PAIF checkpoint (.pth)")
    p.add_argument("--out", default="paif_published.pt", help="output checkpoint (trainer.checkpoint format)")
    p.add_argument("--ignore-prefix", action="append", default=[], metavar="PREFIX",
                   help="skip published keys with this prefix (after removing 'module.'); repeatable")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load with weights_only=False (runs code in the file: only for files you trust)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = convert_checkpoint(args.checkpoint, args.out, args.ignore_prefix, args.trust_pickle)
    print(f"converted {summary['source']} (MiT-{summary['variant']}, head width {summary['decoder_hidden_size']}, "
          f"{summary['num_classes']} classes, "
          f"{summary['published_tensors']} tensors) -> {summary['out']} ({summary['converted_tensors']} tensors)")
    print(f"options: {summary['options']}")
    for key, why in summary["dropped"].items():
        print(f"dropped {key}: {why}")
    for key in summary["ignored"]:
        print(f"ignored {key}")
    print(f"{'published':<50} {'tensors':>7} {'params':>11}  ours")
    for row in summary["groups"]:
        print(f"{row['published']:<50} {row['tensors']:>7} {row['params']:>11,}  {row['ours']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
