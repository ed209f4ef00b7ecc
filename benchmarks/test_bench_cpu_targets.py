"""pytest-benchmark: the CPU targets (``benchmarks/cpu_targets.py``) as ratios from one run.

The benchmark fixture times ours' forward+backward at T = 4096 target tokens; naive's forward+backward, ours'
no-grad forward and the peak-RSS growth of both at T and 2T are measured in the same test. The ratios go to
``extra_info`` and to the session summary ("benchmark ratios"); they are measured, not asserted (a timing
assertion would fail on a busy machine). What is asserted: ours agrees with naive (values and gradients)
and every measurement exists. CPU only: on CUDA the GPU suite (``python -m benchmarks.compare``) applies.
Marked ``slow`` (about 2 minutes on 2 cores: seconds per call at this shape, and two child processes):

    pytest benchmarks --benchmark-only -m slow -k cpu_targets
"""

from __future__ import annotations

import pytest

from benchmarks import cpu_targets
from benchmarks.common import make_inputs, make_upstream
from benchmarks.conftest import DEVICE, SUMMARY
from benchmarks.measure import synced
from benchmarks.providers import likelihood_providers, make_call

SAMPLES = 3  # each forward+backward takes seconds on 2 cores; compare.py takes benchmarks.measure.MIN_SAMPLES


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU targets (the GPU has its own in compare.py)")
def test_cpu_targets(benchmark):
    case, _ = cpu_targets.cases()
    hidden, weight, labels, stats = make_inputs(case, "cpu")
    ours = likelihood_providers()["ours"].bind(case, stats["valid_tokens"])
    call, grads = make_call(ours, hidden, weight, labels, "fwd_bwd", make_upstream(case, "cpu"))
    benchmark.group = f"cpu targets {case.key()}"
    benchmark.pedantic(synced(call, grads, "cpu"), rounds=SAMPLES, iterations=1, warmup_rounds=1)
    known = {"ours_fwd_bwd": benchmark.stats.stats.median * 1e3} if getattr(benchmark, "stats", None) else {}
    del call, grads, hidden, weight
    result = cpu_targets.measure(samples=SAMPLES, known_ms=known, log=lambda msg: None)
    verdicts = cpu_targets.verdicts(result)
    benchmark.extra_info.update(ratios=result["ratios"], verdicts=verdicts, rss=result["rss"],
                                check=result["times"]["check"])
    SUMMARY.append(f"CPU targets ({case.key()}, {SAMPLES} samples each):")
    for k, v in result["ratios"].items():
        SUMMARY.append(f"  {cpu_targets.LABELS[k]:<44} {'—' if v is None else f'{v:.3f}'}  (goal ≤ "
                       f"{cpu_targets.GOALS[k][0]:g}: {verdicts[k]})")
    assert result["times"]["check"]["correct"], f"ours disagrees with naive: {result['times']['check']['check']}"
    missing = {k: v for k, v in result["ratios"].items() if v is None}
    assert not missing, f"not measured: {missing}; RSS: {result['rss']}"
