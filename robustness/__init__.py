"""Attacks and threat models for infrared-visible fusion + segmentation (see DESIGN.md section 5)."""
from robustness.attacks import (
    CosPGD, FGSM, PGD, Attack, SegPGD, cospgd_weights, fusion_distance, model_guard, pixel_ce, seg_scores,
    segpgd_lambda, segpgd_weights,
)
from robustness.threats import (
    EPS_SWEEP, THREAT_MODELS, ThreatError, WorstCase, build_sweep, build_threat, load_threats_yaml,
    parse_eps, rescale_threat, resolve_threat,
)

__all__ = [
    "Attack", "PGD", "FGSM", "SegPGD", "CosPGD", "WorstCase",
    "pixel_ce", "segpgd_lambda", "segpgd_weights", "cospgd_weights", "seg_scores", "fusion_distance",
    "model_guard", "THREAT_MODELS", "EPS_SWEEP", "ThreatError", "build_threat", "build_sweep",
    "load_threats_yaml", "parse_eps", "rescale_threat", "resolve_threat",
]
