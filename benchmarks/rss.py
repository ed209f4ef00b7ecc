"""Peak resident-memory growth of one call of each likelihood provider on CPU (CUDA uses
``torch.cuda.max_memory_allocated``, ``measure.peak_extra_bytes``).

``rss_growth(case, names)`` runs a child process (``python -m benchmarks.rss SPEC``) that builds the case's
inputs and, per provider: makes one small warm-up call (lazy initialisation, compilation), collects
garbage, resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), reads ``VmRSS``, makes
one call of ``mode`` and reads ``VmHWM``: growth = VmHWM - VmRSS before the call. The child runs with glibc
told to serve every block of 64 KiB or more by mmap (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor goes
back to the kernel at once: the baseline is the live inputs and a provider measured after another does not
reuse pages the first one left resident. The child never times anything, so this setting does not touch
the timings. ``workspace = growth - size of dH and dW`` (the gradients the call returns).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

if __package__ in (None, ""):  # `python benchmarks/rss.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.common import DTYPES, IGNORE_INDEX, Case
from benchmarks.stamp import REPO_ROOT

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 10), "MALLOC_TRIM_THRESHOLD_": "0"}
METHOD = "peak RSS growth of one call in a child process (VmHWM - VmRSS; large blocks mmapped)"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _warmup_inputs(hidden, weight, labels):
    # One sequence, 16 positions, all of them targets: every code path of the real call, tiny memory.
    t = min(16, labels.shape[-1])
    h = hidden[:1, :1, :t].detach().clone()
    y = labels[:1, :1, :t].clone()
    return h, weight, torch.where(y == IGNORE_INDEX, 0, y)


def _one_call(fn, hidden, weight, labels, mode, upstream):
    from benchmarks.providers import make_call

    call, grads = make_call(fn, hidden, weight, labels, mode, upstream)
    out = call()
    grad_bytes = sum(x.grad.numel() * x.grad.element_size() for x in grads if x.grad is not None)
    return out, grads, grad_bytes


def _child(spec: dict) -> dict:
    from benchmarks.common import make_inputs, make_upstream
    from benchmarks.providers import likelihood_providers

    case = Case(**spec["case"])
    hidden, weight, labels, stats = make_inputs(case, "cpu", seed=spec["seed"], target_entropy=spec["target_entropy"])
    dtype = DTYPES[case.dtype]
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    upstream = make_upstream(case, "cpu", seed=spec["seed"] + 1)
    providers = likelihood_providers()
    out = {}
    for name in spec["providers"]:
        p = providers.get(name)
        why = f"missing: unknown provider {name!r}" if p is None else p.unavailable("cpu", case, spec["mode"])
        if why:
            out[name] = {"error": why}
            continue
        try:
            fn = p.bind(case, stats["valid_tokens"], **spec.get("settings", {}).get(name, {}))
            h, w = hidden.detach(), weight.detach()
            wh, ww, wy = _warmup_inputs(h, w, labels)
            res = _one_call(fn, wh, ww.detach(), wy, spec["mode"], upstream[:1, :1])
            del res, wh, ww, wy
            h.grad = w.grad = None
            gc.collect()
            _reset_peak()
            before = _status_kib("VmRSS")
            res = _one_call(fn, h, w, labels, spec["mode"], upstream)
            peak = _status_kib("VmHWM")
            growth = 1024 * (peak - before)
            out[name] = {"rss_growth_bytes": growth, "grad_bytes": res[2], "workspace_bytes": growth - res[2],
                         "rss_before_bytes": 1024 * before}
            del res
        except Exception as err:  # noqa: BLE001 - one provider's failure is its row, not the child's
            out[name] = {"error": f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]}
        finally:
            hidden.grad = weight.grad = None
            gc.collect()
    return out


def rss_growth(case: Case, names, mode: str = "fwd_bwd", seed: int = 0, target_entropy: float = 2.0,
               settings: dict | None = None, timeout_s: float = 900.0) -> dict:
    """``{provider: {"rss_growth_bytes", "grad_bytes", "workspace_bytes", ...} | {"error": "..."}}``.

    The case's ``dtype`` and ``targets`` apply; ``settings`` maps a provider to its swept settings.
    """
    spec = {"case": {k: v for k, v in case.asdict().items() if k != "tokens"}, "providers": list(names),
            "mode": mode, "seed": seed, "target_entropy": target_entropy, "settings": settings or {}}
    env = {**os.environ, **MALLOC_ENV}
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.rss", json.dumps(spec)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {n: {"error": f"error: RSS child timed out after {timeout_s:.0f} s"} for n in names}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {n: {"error": f"error: RSS child exited {done.returncode}: {tail}"[:300]} for n in names}
    return json.loads(lines[-1])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m benchmarks.rss SPEC_JSON  (see benchmarks.rss.rss_growth)")
    try:
        _reset_peak()
        _status_kib("VmHWM")
    except OSError as err:
        raise SystemExit(f"cannot measure peak RSS here (/proc/self/clear_refs, /proc/self/status): {err}")
    print(json.dumps(_child(json.loads(argv[0]))))


if __name__ == "__main__":
    main()
