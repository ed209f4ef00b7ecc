"""Setup for ``pytest benchmarks --benchmark-only`` (run from the repo root).

tests/conftest.py does not apply here: no Triton interpreter and no NaN poisoning. The op runs its real
path (Triton on CUDA, its CPU path on CPU), so CPU numbers only show the suite works (except the CPU
targets, ``test_bench_cpu_targets.py``). Shapes: tiny heads on CPU, real LM heads on CUDA
(``benchmarks.common.grid``, shared with ``python -m benchmarks.compare``); larger cases carry the
``slow`` mark (pyproject deselects it by default: add ``-m slow`` or ``-m ''``).
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.common import DTYPES, make_inputs, make_upstream
from benchmarks.oracle import oracle

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SUMMARY = []  # lines printed at the end of the session (the CPU targets' ratios)


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError(
            "TRITON_INTERPRET=1 is set: the benchmarks would time the Triton interpreter. Unset it (the "
            "interpreter is only for tests/)."
        )


def pytest_terminal_summary(terminalreporter):
    if SUMMARY:
        terminalreporter.section("benchmark ratios")
        for line in SUMMARY:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def device():
    return DEVICE


_INPUTS, _ORACLES = {}, {}


@pytest.fixture(scope="session")
def case_inputs():
    """``case_inputs(case) -> (hidden, weight, labels, stats)`` in the case dtype, cached per shape."""

    def get(case):
        key = (case.shape_key(), case.targets)
        if key not in _INPUTS:
            _INPUTS.clear()  # one shape alive at a time (CUDA memory)
            _ORACLES.clear()
            _INPUTS[key] = make_inputs(case, DEVICE, seed=0)
        hidden, weight, labels, stats = _INPUTS[key]
        dtype = DTYPES[case.dtype]
        return hidden.to(dtype).detach(), weight.to(dtype).detach(), labels, stats

    return get


@pytest.fixture(scope="session")
def case_oracle(case_inputs):
    """``case_oracle(case) -> (upstream [B, K], oracle.Oracle)`` for the case's inputs, cached."""

    def get(case):
        if case.key() not in _ORACLES:
            hidden, weight, labels, _ = case_inputs(case)
            upstream = make_upstream(case, DEVICE)
            _ORACLES[case.key()] = (upstream, oracle(hidden, weight, labels, upstream, case.softcap))
        return _ORACLES[case.key()]

    return get
