"""Setup for ``pytest benchmarks --benchmark-only`` (run from the repo root).

tests/conftest.py does not apply here: no Triton interpreter and no NaN poisoning. The op runs its real
path (Triton on CUDA, chunked torch on CPU), so CPU numbers only show the suite works. Shapes: tiny heads
on CPU (the whole suite takes well under 2 minutes on 2 cores), real LM heads on CUDA; larger CUDA cases
carry the ``slow`` mark (pyproject deselects it by default: add ``-m slow`` or ``-m ''``).
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.common import DTYPES, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError(
            "TRITON_INTERPRET=1 is set: the benchmarks would time the Triton interpreter. Unset it (the "
            "interpreter is only for tests/)."
        )


@pytest.fixture(scope="session")
def device():
    return DEVICE


_INPUTS = {}


@pytest.fixture(scope="session")
def case_inputs():
    """``case_inputs(case) -> (hidden, weight, labels, stats)`` in the case dtype, cached per shape."""

    def get(case):
        key = (case.head, case.B, case.K, case.T)
        if key not in _INPUTS:
            _INPUTS.clear()  # one shape alive at a time (CUDA memory)
            _INPUTS[key] = make_inputs(case, DEVICE, seed=0)
        hidden, weight, labels, stats = _INPUTS[key]
        dtype = DTYPES[case.dtype]
        return hidden.to(dtype).detach(), weight.to(dtype).detach(), labels, stats

    return get

