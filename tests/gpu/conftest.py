"""The GPU suite's fixtures: one diffusers DiT and ours on the same weights, the report, the library's defaults
restored around each test. Settings and the report live in suite.py."""

from __future__ import annotations

import pytest

from bench.fast_paths import reset
from bench.pair import our_dit, reference_dit
from suite import SCALE, Report


@pytest.fixture(scope="session")
def report():
    return Report()


@pytest.fixture(scope="session")
def scale():
    return SCALE


@pytest.fixture(scope="session")
def models():
    """(diffusers' DiT, ours) on one set of weights. Ours is quantised to FP8 by the FP8 tests, which run last."""
    ref = reference_dit(SCALE)
    return ref, our_dit(ref, SCALE)


@pytest.fixture(autouse=True)
def _library_defaults():
    """Each test starts and ends with the library's defaults (fused ops on, automatic attention)."""
    reset()
    yield
    reset()
