"""PAIF search space (Liu et al., ACM MM 2023): candidate ops, guided-filter decomposition, chain cells,
the searchable fusion space (NNI 3.0 ``ModelSpace``), genotypes, the SegFormer segmenter and the
fusion → segmentation pipeline."""
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
