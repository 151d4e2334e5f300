"""Attacks, threat models and gradient-masking checks for infrared-visible fusion + segmentation (DESIGN.md §5)."""
from robustness.attacks import (
    APGD, CosPGD, FGSM, PGD, Attack, SegPGD, Square, apgd_checkpoints, cospgd_weights, fusion_distance, model_guard,
    pixel_ce, seg_loss_per_image, seg_scores, segpgd_lambda, segpgd_weights,
)
from robustness.masking import MaskingChecks, loss_rose
from robustness.threats import (
    EPS_SWEEP, THREAT_MODELS, ThreatError, WorstCase, build_sweep, build_threat, load_threats_yaml,
    parse_eps, rescale_threat, resolve_threat,
)

__all__ = [
    "Attack", "PGD", "FGSM", "SegPGD", "CosPGD", "APGD", "Square", "WorstCase", "MaskingChecks", "loss_rose",
    "pixel_ce", "segpgd_lambda", "segpgd_weights", "cospgd_weights", "seg_loss_per_image", "apgd_checkpoints",
    "seg_scores", "fusion_distance", "model_guard", "THREAT_MODELS", "EPS_SWEEP", "ThreatError", "build_threat",
    "build_sweep", "load_threats_yaml", "parse_eps", "rescale_threat", "resolve_threat",
]
