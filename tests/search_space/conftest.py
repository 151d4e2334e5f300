"""Shared fixtures of the search-space tests."""
from __future__ import annotations

import warnings

import pytest

from search_space import cpp_ext


@pytest.fixture(scope="module")
def extension():
    """The compiled C++ kernels (``search_space.cpp_ext``); the requesting tests are skipped, with the reason, when
    they are turned off or cannot be built here."""
    if cpp_ext.disabled():
        pytest.skip("PAIF_NO_CPP is set: the C++ kernels are turned off")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ext = cpp_ext.load_extension()
    if ext is None:
        pytest.skip(f"the C++ kernels could not be built here: {cpp_ext.failure()}")
    return ext
