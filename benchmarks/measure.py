"""Timing and CUDA-memory measurement for the benchmarks (peak RSS on CPU: ``benchmarks/rss.py``).

``sample_ms`` returns the real samples and their quantiles, never a single-call estimate: at least
``min_samples`` timed calls (10 by default) and more until ``min_total_ms`` of calls were timed, so long
calls get the samples they need and short ones get more.
"""

from __future__ import annotations

import gc
import math
import time

import torch

MIN_SAMPLES = 10
MAX_SAMPLES = 200
_L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2, as triton.testing.do_bench does


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def set_grads_none(tensors) -> None:
    for x in tensors or ():
        x.grad = None


def synced(fn, grads, device):
    """``fn`` with its input grads reset before and a device sync after (for wall-clock timers)."""

    def run():
        set_grads_none(grads)
        out = fn()
        sync(device)
        return out

    return run


def quantile(sorted_xs, q: float) -> float:
    """Linear-interpolation quantile of an ascending list (numpy's default)."""
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(samples_ms, timer: str) -> dict:
    """``ms`` (median), ``ms_p20``/``ms_p80``, ``spread`` = (p80 - p20) / p50, the count and the samples."""
    xs = sorted(samples_ms)
    p20, p50, p80 = (quantile(xs, q) for q in (0.2, 0.5, 0.8))
    return {"ms": p50, "ms_p20": p20, "ms_p80": p80, "spread": (p80 - p20) / p50 if p50 > 0 else None,
            "samples": len(xs), "ms_samples": [round(x, 6) for x in samples_ms], "timer": timer}


def sample_ms(fn, device, grad_to_none=None, min_samples: int = MIN_SAMPLES, min_total_ms: float = 300.0,
              warmup: int = 1) -> dict:
    """Time ``fn`` (grads of ``grad_to_none`` set to None before each call, outside the timed region).

    CUDA: one event pair per call, with L2 flushed before each call. CPU: ``time.perf_counter``.
    ``warmup`` untimed calls first (compilation, autotuning, allocator warm-up).
    """
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        set_grads_none(grad_to_none)
        fn()
    sync(device)
    if cuda:
        return summarize(_cuda_samples(fn, device, grad_to_none, min_samples, min_total_ms), "cuda events, L2 flushed")
    times, total = [], 0.0
    while len(times) < min_samples or (total < min_total_ms and len(times) < MAX_SAMPLES):
        set_grads_none(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
        total += times[-1]
    return summarize(times, "time.perf_counter")


def _cuda_samples(fn, device, grad_to_none, min_samples, min_total_ms) -> list[float]:
    # As triton.testing.do_bench: estimate from a few calls, then queue every timed call without a host
    # sync in between (launch latency hides behind the previous call) and read the events at the end.
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        set_grads_none(grad_to_none)
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    n = min(MAX_SAMPLES, max(min_samples, math.ceil(min_total_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        set_grads_none(grad_to_none)
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def peak_extra_bytes(fn, device, grad_to_none=None):
    """Peak CUDA memory allocated during one call of ``fn`` minus memory allocated just before it.

    Grads of ``grad_to_none`` are set to None first, so for modes with a backward the result includes
    the gradient outputs (dH, dW) the call creates; callers subtract their size to get the workspace.
    The tensors ``fn`` returns are alive at the peak and are counted. None off CUDA (``benchmarks/rss.py``
    measures CPU processes).
    """
    if torch.device(device).type != "cuda":
        return None
    set_grads_none(grad_to_none)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    set_grads_none(grad_to_none)
    return peak - before


def gemm_tflops(tokens: int, D: int, V: int, dtype, device, weight=None) -> dict:
    """Rate of ``torch.mm([n, D], [D, V])`` in ``dtype`` (the logits GEMM of the op), n = min(tokens, 8192)
    on CUDA (the rate is flat beyond that), ``tokens`` on CPU."""
    n = min(tokens, 8192) if torch.device(device).type == "cuda" else tokens
    a = torch.randn(n, D, device=device, dtype=dtype)
    b = (weight if weight is not None and weight.dtype == dtype else torch.randn(V, D, device=device, dtype=dtype)).T
    t = sample_ms(lambda: torch.mm(a, b), device, min_samples=5, min_total_ms=100.0)
    return {"gemm_rows": n, "gemm_ms": t["ms"], "gemm_tflops": 2 * n * D * V / (t["ms"] * 1e-3) / 1e12}
