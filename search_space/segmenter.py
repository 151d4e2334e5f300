"""SegFormer segmentation network built from a config (Xie et al., "SegFormer", NeurIPS 2021), used by PAIF
(Liu et al., ACM MM 2023) as the perception network behind the fusion net.

``build_segmenter("b0")`` builds a randomly initialised MiT-b0 SegFormer from ``transformers.SegformerConfig``
(no network access). With ``pretrained=<local directory>`` the weights load with ``local_files_only=True``; a
hub id is only fetched when ``allow_download=True`` (never in tests).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rgbt.classes import IGNORE_INDEX, NUM_CLASSES

__all__ = ["MIT_VARIANTS", "Segmenter", "build_segmenter", "custom_head_width", "segformer_config",
           "set_mit_norm_eps"]

_logger = logging.getLogger(__name__)

MIT_VARIANTS: dict[str, dict[str, Any]] = {
    # hidden sizes, depths and decoder width of the MiT encoders (SegFormer paper, Table 1/6)
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
    "b3": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3], "decoder_hidden_size": 768},
    "b4": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3], "decoder_hidden_size": 768},
    "b5": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "decoder_hidden_size": 768},
}
"""MiT-b0..b5; all share heads (1, 2, 5, 8), sr ratios (8, 4, 2, 1), patch sizes (7, 3, 3, 3), mlp ratio 4."""


def segformer_config(variant: str = "b0", num_classes: int = NUM_CLASSES, **overrides: Any):
    """A ``transformers.SegformerConfig`` for MiT ``variant`` with ``num_classes`` labels."""
    from transformers import SegformerConfig

    key = variant.lower().removeprefix("mit-").removeprefix("mit_")
    if key not in MIT_VARIANTS:
        raise ValueError(f"segmenter variant: expected one of {sorted(MIT_VARIANTS)}, got {variant!r}")
    kwargs = dict(MIT_VARIANTS[key], num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1],
                  num_labels=num_classes, semantic_loss_ignore_index=IGNORE_INDEX)
    kwargs.update(overrides)
    return SegformerConfig(**kwargs)


class Segmenter(nn.Module):
    """Wraps ``SegformerForSemanticSegmentation``: normalised RGB (B, 3, H, W) -> logits (B, K, ⌈H/4⌉, ⌈W/4⌉)."""

    def __init__(self, model: nn.Module, variant: str) -> None:
        super().__init__()
        self.model = model
        self.variant = variant

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def build_segmenter(variant: str = "b0", num_classes: int = NUM_CLASSES, pretrained: str | Path | None = None,
                    allow_download: bool = False, decoder_hidden_size: int | None = None) -> Segmenter:
    """SegFormer MiT-``variant`` with ``num_classes`` outputs.

    Args:
        variant: "b0" .. "b5".
        num_classes: output classes (9 for MFNet / MSRS).
        pretrained: None (random init), a local directory with ``config.json`` + weights, or a hub id
            (only with ``allow_download=True``; otherwise only the local cache is consulted).
        allow_download: permit network access for a hub id.
        decoder_hidden_size: width of the all-MLP head; None takes the variant's (256 for b0/b1, 768 for b2..b5).
            The published PAIF MiT-b3 uses 256. Only for ``pretrained=None``.
    Returns:
        :class:`Segmenter`, ``forward(rgb_normalised (B, 3, H, W)) -> logits (B, num_classes, H/4, W/4)``.
    """
    from transformers import SegformerForSemanticSegmentation

    overrides = {} if decoder_hidden_size is None else {"decoder_hidden_size": int(decoder_hidden_size)}
    if pretrained is None:
        return Segmenter(SegformerForSemanticSegmentation(segformer_config(variant, num_classes, **overrides)), variant)
    if overrides:
        raise ValueError(f"build_segmenter: expected decoder_hidden_size=None with pretrained weights, got "
                         f"{decoder_hidden_size} (the head width comes from the pretrained config)")
    local = Path(pretrained).is_dir()
    if not local and not allow_download:
        _logger.info("pretrained %s is not a local directory: looking in the local hub cache only", pretrained)
    try:
        model = SegformerForSemanticSegmentation.from_pretrained(
            str(pretrained), num_labels=num_classes, ignore_mismatched_sizes=True,
            local_files_only=local or not allow_download, semantic_loss_ignore_index=IGNORE_INDEX,
        )
    except OSError as exc:
        raise FileNotFoundError(
            f"pretrained SegFormer weights: expected a local directory with config.json and weights "
            f"(or a cached hub id), got {str(pretrained)!r}; download them once, or pass allow_download=True "
            f"({exc})") from exc
    return Segmenter(model, variant)


def custom_head_width(segmenter: nn.Module | None, variant: str) -> int | None:
    """The width of ``segmenter``'s all-MLP head when it is not ``variant``'s default (``build_segmenter(
    decoder_hidden_size=...)`` or pretrained weights with another head), else None; None also without a segmenter.
    Checkpoints record it as ``segmenter.decoder_hidden_size`` so that loading them rebuilds the same shapes."""
    if segmenter is None:
        return None
    width = int(segmenter.model.config.decoder_hidden_size)
    return None if width == MIT_VARIANTS.get(variant, {}).get("decoder_hidden_size") else width


def set_mit_norm_eps(segmenter: nn.Module, eps: float) -> int:
    """Set ``eps`` of the MiT encoder's block LayerNorms (before attention, before the MLP) and stage-output
    LayerNorms; the patch-embedding and sequence-reduction LayerNorms keep theirs.

    The published MiT (SegFormer's ``mix_transformer.py``) uses eps 1e-6 for exactly these norms and 1e-5 for the
    others; transformers uses 1e-5 for all. Works for the transformers 4 and 5 module names.

    Returns:
        The number of LayerNorms changed (2 per block + 1 per stage).
    """
    if eps <= 0:
        raise ValueError(f"set_mit_norm_eps: expected eps > 0, got {eps}")
    changed = 0
    for name, module in segmenter.named_modules():
        if isinstance(module, nn.LayerNorm) and ".decode_head." not in f".{name}." \
                and "patch_embeddings" not in name and ".attention." not in f".{name}.":
            module.eps = eps
            changed += 1
    if changed == 0:
        raise ValueError("set_mit_norm_eps: expected a SegFormer segmenter with LayerNorms, found none")
    return changed
