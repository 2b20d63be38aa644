"""Shared test setup: every test runs once per CPU instruction-set path this machine has.

The autouse fixture forces avx512, avx2 and scalar in turn (``optkern.set_cpu_isa``), so each kernel check is
made on every path; ``OPTKERN_CPU_ISA`` set in the environment restricts the run to that one path.
"""

import os
import zlib

import numpy as np
import pytest

import optkern

_ORDER = ("scalar", "avx2", "avx512")
_BEST = optkern.cpu_best_isa()
AVAILABLE_ISAS = [i for i in _ORDER if _ORDER.index(i) <= _ORDER.index(_BEST)]
if os.environ.get("OPTKERN_CPU_ISA"):
    AVAILABLE_ISAS = [os.environ["OPTKERN_CPU_ISA"]]


@pytest.fixture(params=AVAILABLE_ISAS, autouse=True)
def cpu_isa(request):
    """The CPU path under test (every test runs on each)."""
    optkern.set_cpu_isa(request.param)
    yield request.param
    optkern.set_cpu_isa(AVAILABLE_ISAS[-1])


@pytest.fixture
def rng(request):
    """A fresh, reproducible generator per test (seeded from the test's name)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


def pytest_report_header(config):
    return f"optkern: cpu paths {AVAILABLE_ISAS} (best {_BEST}), threads {optkern.get_num_threads()}, " \
           f"cuda {optkern.cuda_available()}"
