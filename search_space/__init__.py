"""PAIF search space (Liu et al., ACM MM 2023): candidate ops, guided-filter decomposition, chain cells,
the searchable fusion space (NNI 3.0 ``ModelSpace``), genotypes, the SegFormer segmenter and the
fusion → segmentation pipeline."""
import os as _os
import sys as _sys


def _skip_nni_framework_shortcuts() -> None:
    """Turn off NNI's framework shortcuts (``nni.set_default_framework("none")``) unless the user chose a framework
    (``NNI_FRAMEWORK``) or ``nni.nas`` is already imported.

    With NNI's default, ``pytorch``, importing any ``nni.nas`` module also imports NNI's Lightning evaluator, and with
    it ``pytorch_lightning`` and ``torchmetrics``: most of the 10-14 s it takes a process that only builds or runs a
    network (``derive/export_genotype.py``, ``trainer/evaluate.py``, ``trainer.warmstart``) to import this package
    (``bench/import_cost.py``). Nothing here uses the shortcut names: the search imports every NNI module it uses by
    its full name (``nni.nas.evaluator.pytorch``, ``nni.nas.oneshot.pytorch``).
    """
    if "NNI_FRAMEWORK" in _os.environ or "nni.nas" in _sys.modules:
        return
    from nni.common.framework import set_default_framework

    set_default_framework("none")


_skip_nni_framework_shortcuts()

from search_space.cells import DEFAULT_RULES, FUSION_RULES, ChainCell, FusionRule
from search_space.decompose import GuidedDecomposition, box_filter, guided_filter
from search_space.fusion_space import FusionSpace
from search_space.genotype import GENOTYPES, Genotype, GenotypeError, build_fusion_net, get_genotype
from search_space.ops import DEFAULT_CANDIDATES, OPS, get_padding
from search_space.pipeline import FusionSegModel, FusionSegOutput, build_model, normalize_per_image
from search_space.segmenter import build_segmenter

__all__ = [
    "OPS", "DEFAULT_CANDIDATES", "get_padding", "box_filter", "guided_filter", "GuidedDecomposition",
    "ChainCell", "FUSION_RULES", "DEFAULT_RULES", "FusionRule", "FusionSpace", "Genotype", "GenotypeError",
    "GENOTYPES", "build_fusion_net", "get_genotype", "build_segmenter", "FusionSegModel", "FusionSegOutput",
    "build_model", "normalize_per_image",
]
