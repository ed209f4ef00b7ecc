"""pytest-benchmark: per-sequence log-likelihood, every provider x mode on the shared grid's shapes.

    pytest benchmarks --benchmark-only                                   # default subset
    pytest benchmarks --benchmark-only -m slow                           # the rest of the short grid
    pytest benchmarks --benchmark-only --benchmark-json out.json         # extra_info: TFLOP/s, memory, errors

Benchmarks are grouped by case and mode, so pytest-benchmark's table compares providers side by side; the
default run takes the grid's first shape twice (every position a target, then masked). Each test first
checks the provider's output and gradients against the oracle (``benchmarks/oracle.py``) and fails if it
is wrong, then times ``benchmarks.measure.MIN_SAMPLES`` rounds. Swept settings (Liger's chunking) stay at
their defaults here; ``python -m benchmarks.compare`` sweeps them. extra_info holds the errors, TFLOP/s on
6·N_valid·D·V (forward 2·, backward 4·) and peak extra CUDA memory.
"""

from __future__ import annotations

import pytest

from benchmarks.common import MODES, flops, grid
from benchmarks.conftest import DEVICE
from benchmarks.measure import MIN_SAMPLES, peak_extra_bytes, synced
from benchmarks.oracle import check
from benchmarks.providers import likelihood_providers, make_call

PROVIDERS = likelihood_providers()
_LIKELIHOOD, _ = grid(DEVICE.type, quick=True)


def _spec(c):
    return (c.head, c.tokens, c.K, c.dtype, c.softcap)


CASES = [pytest.param(c, id=f"{c.head.replace('/', '_')}-N{c.tokens}-K{c.K}-{c.dtype}-{c.targets}"
                      + (f"-softcap{c.softcap:g}" if c.softcap is not None else ""),
                      marks=[] if _spec(c) == _spec(_LIKELIHOOD[0]) else [pytest.mark.slow])
         for c in _LIKELIHOOD]


def _provider_param(name):
    # torch.compile takes ~15 s per graph on a 2-core CPU: keep it out of the CPU default run.
    marks = [pytest.mark.slow] if name == "torch_compile_chunked" and DEVICE.type != "cuda" else []
    return pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", [_provider_param(n) for n in PROVIDERS])
@pytest.mark.parametrize("case", CASES)
def test_sequence_likelihood(benchmark, case_inputs, case_oracle, case, provider, mode):
    p = PROVIDERS[provider]
    why = p.unavailable(DEVICE, case, mode)
    if why:
        pytest.skip(why)
    hidden, weight, labels, stats = case_inputs(case)
    upstream, ref = case_oracle(case)
    fn = p.bind(case, stats["valid_tokens"])
    verdict = check(fn, hidden, weight, labels, upstream, ref, backward=p.unavailable(DEVICE, case, "fwd_bwd") is None)
    call, grads = make_call(fn, hidden, weight, labels, mode, upstream)
    run = synced(call, grads, DEVICE)
    run()  # warm-up: compile / autotune before the memory measurement

    benchmark.group = f"likelihood {case.key()} {mode}"
    benchmark.extra_info.update(
        case=case.asdict(), provider=provider, computes=p.computes, mode=mode, valid_tokens=stats["valid_tokens"],
        entropy_nats=stats["entropy_nats"], peak_extra_bytes=peak_extra_bytes(call, DEVICE, grads), **verdict,
    )
    benchmark.pedantic(run, rounds=MIN_SAMPLES, iterations=1)
    if getattr(benchmark, "stats", None):  # None under --benchmark-disable
        median_s = benchmark.stats.stats.median
        benchmark.extra_info["tflops"] = flops(mode, stats["valid_tokens"], case.D, case.V) / median_s / 1e12
    assert verdict["correct"], f"{provider} on {case.key()}: {verdict['check']}"
