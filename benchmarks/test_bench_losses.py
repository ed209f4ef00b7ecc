"""pytest-benchmark: end-to-end preference losses (hidden states -> scalar loss, forward and forward+backward).

Compares ``mppo_kernels.fused_loss.fused_preference_loss`` (ours) with the two-stage naive path (plain-torch
log-likelihoods, then ``mppo_kernels.losses.preference_loss``) and, for SimPO with K = 2, Liger's
``LigerFusedLinearSimPOLoss`` (beta 2.0, gamma 1.0, no NLL term). Providers whose modules are not there
yet, or not installed, are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import flops, grid
from benchmarks.conftest import DEVICE
from benchmarks.measure import MIN_SAMPLES, peak_extra_bytes, synced
from benchmarks.providers import loss_inputs, loss_providers, make_call

PROVIDERS = loss_providers()
_, CASES = grid(DEVICE.type, quick=True)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case,loss", [pytest.param(c, n, id=f"{n}-{c.head.replace('/', '_')}-N{c.tokens}-K{c.K}-{c.dtype}")
                                       for c, n in CASES])
def test_preference_loss(benchmark, case_inputs, loss, case, provider, mode):
    p = PROVIDERS[provider]
    why = p.unavailable(DEVICE, case, mode)
    if why is None and p.extra.get("only_loss") not in (None, loss):
        why = f"unsupported: {provider} has only {p.extra['only_loss']}"
    if why:
        pytest.skip(why)
    hidden, weight, labels, stats = case_inputs(case)
    hidden, labels, scores = loss_inputs(hidden, labels, seed=2)

    def fn(h, w, y):
        return p.fn(loss, h, w, y, scores)

    call, grads = make_call(fn, hidden, weight, labels, mode, torch.ones((), device=DEVICE))
    synced(call, grads, DEVICE)()  # warm-up: compile / autotune before the memory measurement
    benchmark.group = f"loss {loss} {case.key()} {mode}"
    benchmark.extra_info.update(
        case=case.asdict(), loss=loss, provider=provider, mode=mode, valid_tokens=stats["valid_tokens"],
        peak_extra_bytes=peak_extra_bytes(call, DEVICE, grads),
    )
    out = benchmark.pedantic(synced(call, grads, DEVICE), rounds=MIN_SAMPLES, iterations=1)
    if mode == "fwd":
        assert torch.isfinite(out).all(), "loss is not finite"
    if getattr(benchmark, "stats", None):
        median_s = benchmark.stats.stats.median
        benchmark.extra_info["tflops"] = flops(mode, stats["valid_tokens"], case.D, case.V) / median_s / 1e12
