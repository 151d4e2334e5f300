"""Shared pytest fixtures for the whole test suite."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# One torch/OpenMP thread for the whole suite and the subprocesses it starts: the tests use tiny tensors, for
# which a second thread only adds synchronisation, and on a loaded 2-core machine OpenMP oversubscription makes
# small convolutions up to ~100x slower. Set before torch is imported by any test module.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# the data check's cache (trainer.datacheck) goes to a fresh folder per session, never the user's ~/.cache
os.environ.setdefault("PAIF_CACHE_DIR", tempfile.mkdtemp(prefix="paif-test-cache-"))


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the ``slow`` end-to-end tests first, the rest after them, each group in collection order.

    ``make test`` runs the suite on two pytest-xdist workers (one torch thread each). A worker that draws a
    minutes-long end-to-end test near the end leaves the other core idle for its tail; started first, the long
    tests overlap with the many short ones instead. The order of the tests themselves does not matter: every test
    makes its own files (``tmp_path``), and session fixtures are per worker.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)   # stable: collection order in a group


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
