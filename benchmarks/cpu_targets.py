"""The CPU targets of the op, measured as ratios in one run: ours (``fused_sequence_likelihood`` with
``impl="auto"``, whatever CPU path that picks) against naive PyTorch, fp32, forward+backward, every
position a target, on a ``[32000, 256]`` head:

* time: ours / naive at ``T`` = 4096 target tokens;
* peak RSS growth of one call (``benchmarks/rss.py``, a child process): ours / naive at ``T`` and at
  ``2T``, and ours' workspace (growth minus the dH, dW it returns) at ``2T`` / at ``T`` (flat in T: far
  below 2);
* ours forward without autograd / ours forward+backward.

``python -m benchmarks.compare --device cpu`` runs this with its other cases (``results.json`` key
``cpu_targets``); ``benchmarks/test_bench_cpu_targets.py`` runs it in the pytest-benchmark suite.
"""

from __future__ import annotations

import os

import torch

from benchmarks.common import Case, make_inputs, make_upstream
from benchmarks.measure import sample_ms
from benchmarks.oracle import Oracle, check
from benchmarks.providers import likelihood_providers, make_call
from benchmarks.rss import METHOD, rss_growth

HEAD, D, V = "d256-v32k", 256, 32000
TOKENS = 4096
GOALS = {  # name -> (goal, higher is better)
    "time_ours_over_naive": (1.1, False),
    "rss_ours_over_naive": (0.05, False),
    "rss_ours_over_naive_2T": (0.05, False),
    "workspace_ours_2T_over_T": (1.25, False),
    "nograd_over_fwd_bwd": (0.35, False),
}
LABELS = {
    "time_ours_over_naive": "fwd+bwd time, ours / naive (T)",
    "rss_ours_over_naive": "peak RSS growth, ours / naive (T)",
    "rss_ours_over_naive_2T": "peak RSS growth, ours / naive (2T)",
    "workspace_ours_2T_over_T": "ours workspace, 2T / T (flat in T)",
    "nograd_over_fwd_bwd": "ours no-grad forward / ours fwd+bwd (T)",
}


def cases() -> tuple[Case, Case]:
    """``T`` and ``2T`` target tokens as ``[1, 4, T / 4]``, fp32, every position a target."""
    return tuple(Case(HEAD, D, V, 1, 4, n // 4, "fp32", "all") for n in (TOKENS, 2 * TOKENS))


def _times(case: Case, samples: int, seed: int, known_ms: dict) -> dict:
    hidden, weight, labels, stats = make_inputs(case, "cpu", seed=seed)
    upstream = make_upstream(case, "cpu", seed=seed + 1)
    p = likelihood_providers()
    naive, ours = (p[n].bind(case, stats["valid_tokens"]) for n in ("naive", "ours"))
    # naive fp32 is the reference here (its error against the fp64 oracle is ~1e-6, see the smoke cases):
    # the fp64 oracle of this shape would cost more than the whole measurement.
    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    logp = naive(h, w, labels)
    logp.backward(upstream)
    ref = Oracle(logp.detach(), h.grad, w.grad, torch.float32)
    out = {"check": check(ours, hidden, weight, labels, upstream, ref)}
    del h, w, logp, ref
    for key, name, fn, mode in (("naive_fwd_bwd", "naive", naive, "fwd_bwd"), ("ours_fwd_bwd", "ours", ours, "fwd_bwd"),
                                ("ours_fwd_nograd", "ours", ours, "fwd_nograd")):
        if key in known_ms:
            out[key] = {"ms": known_ms[key], "timer": "pytest-benchmark"}
            continue
        call, grads = make_call(fn, hidden.detach(), weight.detach(), labels, mode, upstream)
        out[key] = sample_ms(call, "cpu", grads, min_samples=samples, min_total_ms=0.0)
    return out


def _ratio(a, b):
    return None if a is None or not b else a / b


def measure(samples: int = 10, seed: int = 0, known_ms: dict | None = None, log=print) -> dict:
    """Every number of the CPU targets; ``known_ms`` takes timings already made elsewhere (same keys as
    the result's: ``naive_fwd_bwd``, ``ours_fwd_bwd``, ``ours_fwd_nograd``)."""
    case_t, case_2t = cases()
    log(f"cpu targets: timing naive and ours at {case_t.key()} ({samples} samples each)")
    times = _times(case_t, samples, seed, known_ms or {})
    log(f"cpu targets: peak RSS at T and 2T ({METHOD})")
    rss = {"T": rss_growth(case_t, ["naive", "ours"], seed=seed), "2T": rss_growth(case_2t, ["naive", "ours"], seed=seed)}

    def get(n, which, key="rss_growth_bytes"):
        return rss[n][which].get(key)

    ms = {k: times[k]["ms"] for k in ("naive_fwd_bwd", "ours_fwd_bwd", "ours_fwd_nograd")}
    ratios = {
        "time_ours_over_naive": _ratio(ms["ours_fwd_bwd"], ms["naive_fwd_bwd"]),
        "rss_ours_over_naive": _ratio(get("T", "ours"), get("T", "naive")),
        "rss_ours_over_naive_2T": _ratio(get("2T", "ours"), get("2T", "naive")),
        "workspace_ours_2T_over_T": _ratio(get("2T", "ours", "workspace_bytes"), get("T", "ours", "workspace_bytes")),
        "nograd_over_fwd_bwd": _ratio(ms["ours_fwd_nograd"], ms["ours_fwd_bwd"]),
    }
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None  # other work slows CPU timings
    return {"cases": {"T": case_t.asdict(), "2T": case_2t.asdict()}, "times": times, "rss": rss, "load_avg_1m": load,
            "rss_method": METHOD, "ratios": ratios, "goals": {k: g for k, (g, _) in GOALS.items()}}


def verdicts(result: dict) -> dict:
    """``{name: "met" | "not met" | "n/a: why"}``; a wrong ours is never "met"."""
    if not result["times"]["check"]["correct"]:
        return {k: f"n/a: ours is wrong ({result['times']['check']['check']})" for k in GOALS}
    out = {}
    for k, (goal, higher) in GOALS.items():
        v = result["ratios"].get(k)
        if v is None:
            errors = [r.get("error") for which in result["rss"].values() for r in which.values() if r.get("error")]
            out[k] = "n/a: " + (errors[0] if errors else "not measured")
        else:
            out[k] = "met" if (v >= goal if higher else v <= goal) else "not met"
    return out


def markdown(result: dict) -> list[str]:
    mib = 1 << 20
    t, r = result["times"], result["rss"]
    ms = lambda k: f"{t[k]['ms']:.1f} ms ({t[k].get('samples', '?')} samples)"  # noqa: E731
    rss = lambda w, n: (f"{r[w][n]['rss_growth_bytes'] / mib:.0f} MiB" if "rss_growth_bytes" in r[w][n]  # noqa: E731
                        else r[w][n].get("error", "?"))
    c = result["cases"]["T"]
    lines = [
        f"### CPU targets: fp32, every position a target, D={c['D']}, V={c['V']}, T={c['tokens']} tokens (and 2T)",
        "",
        f"naive fwd+bwd {ms('naive_fwd_bwd')}, ours fwd+bwd {ms('ours_fwd_bwd')}, ours no-grad forward "
        f"{ms('ours_fwd_nograd')}. Memory, {result['rss_method']}: naive {rss('T', 'naive')} / "
        f"{rss('2T', 'naive')}, ours {rss('T', 'ours')} / {rss('2T', 'ours')} at T / 2T. ours vs naive fp32: "
        f"{t['check']['check']} (logp {t['check']['max_abs_err']:.1e}, dH {t['check']['dhidden_rel_err']:.1e}, "
        f"dW {t['check']['dweight_rel_err']:.1e}). 1-minute load average at the end of the measurement: "
        f"{result.get('load_avg_1m')} (other work on the machine slows both sides).",
        "",
        "| target | goal | this run | |",
        "|---|---|---|---|",
    ]
    for k, verdict in verdicts(result).items():
        v = result["ratios"].get(k)
        lines.append(f"| {LABELS[k]} | ≤ {GOALS[k][0]:g} | {'—' if v is None else f'{v:.3f}'} | {verdict} |")
    return lines
