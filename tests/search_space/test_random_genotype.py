"""search_space.genotype.random_genotype: seeded, valid, and uniform over every slot of the space."""
from __future__ import annotations

import math
from collections import Counter

import pytest

from search_space.cells import DEFAULT_RULES
from search_space.genotype import GenotypeError, random_genotype
from search_space.ops import DEFAULT_CANDIDATES


def test_same_seed_same_genotype_and_seeds_differ():
    a, b = random_genotype(3, channels=16), random_genotype(3, channels=16)
    assert a == b and a.channels == 16 and a.steps == 2
    assert len({random_genotype(s).to_json() for s in range(20)}) == 20


def test_every_slot_is_uniform_over_its_choices():
    n = 2000
    samples = [random_genotype(s).to_sample() for s in range(n)]
    for label in samples[0]:
        choices = DEFAULT_RULES if label == "rule" else DEFAULT_CANDIDATES
        counts = Counter(x[label] for x in samples)
        assert set(counts) == set(choices)
        p = 1 / len(choices)
        tol = 4 * math.sqrt(p * (1 - p) / n)  # 4 binomial standard deviations
        assert all(abs(c / n - p) < tol for c in counts.values()), (label, counts)


def test_restricted_space_and_bad_input():
    g = random_genotype(0, candidates=["sepconv_k3", "eca_k3"], rules=["add"], steps=3, channels=8)
    assert set(g.ops) <= {"sepconv_k3", "eca_k3"} and g.rule == "add" and g.steps == 3
    with pytest.raises(GenotypeError, match="steps"):
        random_genotype(0, steps=0)
    with pytest.raises(GenotypeError, match="non-empty"):
        random_genotype(0, candidates=[])
