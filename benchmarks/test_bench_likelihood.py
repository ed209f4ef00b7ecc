"""pytest-benchmark: per-sequence log-likelihood, every provider x mode on a few shapes.

    pytest benchmarks --benchmark-only                                   # default subset
    pytest benchmarks --benchmark-only -m slow                           # larger CUDA shapes
    pytest benchmarks --benchmark-only --benchmark-json out.json         # extra_info has TFLOP/s, memory

Benchmarks are grouped by shape and mode, so pytest-benchmark's table compares providers side by side.
``ours`` is timed with ``validate=False`` (no input-check host sync). extra_info holds useful TFLOP/s
(8·N_valid·D·V for fwd+bwd, 2·N_valid·D·V forward, 6·N_valid·D·V backward), peak extra CUDA memory and
the max abs error against an fp32 oracle. The provider comparison with GEMM rates, targets, a markdown
table and plots is ``python -m benchmarks.compare``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import MODES, flops, grid, make_case, peak_extra_bytes, synced
from benchmarks.providers import likelihood_providers, make_call, oracle_logp
from benchmarks.conftest import DEVICE

PROVIDERS = likelihood_providers()

_LIKELIHOOD, _ = grid(DEVICE.type, quick=True)
CASES = [pytest.param(make_case(h, n, k, dt), id=f"{h.replace('/', '_')}-N{n}-K{k}-{dt}",
                      marks=[pytest.mark.slow] if i else [])
         for i, (h, n, k, dt) in enumerate(_LIKELIHOOD)]


def _provider_param(name):
    # torch.compile takes ~15 s per graph on a 2-core CPU: keep it out of the CPU default run.
    marks = [pytest.mark.slow] if name == "torch_compile_chunked" and DEVICE.type != "cuda" else []
    return pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", [_provider_param(n) for n in PROVIDERS])
@pytest.mark.parametrize("case", CASES)
def test_sequence_likelihood(benchmark, case_inputs, case, provider, mode):
    p = PROVIDERS[provider]
    why = p.unavailable(DEVICE, case.K, case.dtype, mode)
    if why:
        pytest.skip(why)
    hidden, weight, labels, stats = case_inputs(case)
    with torch.no_grad():
        err = (p.fn(hidden, weight, labels).float() - oracle_logp(hidden, weight, labels)).abs().max().item()
    upstream = torch.randn(case.B, case.K, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    call, grads = make_call(p.fn, hidden, weight, labels, mode, upstream)
    run = synced(call, grads, DEVICE)
    run()  # warm-up: compile / autotune before the memory measurement

    benchmark.group = f"likelihood {case.key()} {mode}"
    benchmark.extra_info.update(
        case=case.asdict(), provider=provider, mode=mode, max_abs_err_vs_fp32=err,
        valid_tokens=stats["valid_tokens"], entropy_nats=stats["entropy_nats"],
        peak_extra_bytes=peak_extra_bytes(call, DEVICE, grads),
    )
    benchmark(run)
    if getattr(benchmark, "stats", None):  # None under --benchmark-disable
        median_s = benchmark.stats.stats.median
        benchmark.extra_info["tflops_useful"] = flops(mode, stats["valid_tokens"], case.D, case.V) / median_s / 1e12
    assert err == err, "provider returned NaN"
