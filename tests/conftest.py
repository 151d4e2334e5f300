"""Shared pytest fixtures for the whole test suite."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic RGB-T dataset in the MSRS layout, generated once per test session.

    6 train / 2 val / 2 test scenes of 64x80 (seed 0), every split holding day and night scenes and all 9
    classes; ``<root>/{train,val,test}/{vi,ir,Segmentation_labels}/<name>.png`` plus ``meta.json``.
    Treat it as read-only.
    """
    from rgbt.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic_rgbt")
    generate_dataset(root, n_train=6, n_val=2, n_test=2, size=(64, 80), seed=0)
    return root
