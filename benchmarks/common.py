"""Shared pieces of the benchmarks: LM-head shapes, realistic inputs, FLOP counts, timers, memory, run stamp.

Inputs (``make_inputs``) are drawn so the softmax looks like a trained LM's, not uniform noise, because
gradient-filtering methods (Cut Cross-Entropy's default) skip vocabulary tiles whose probabilities are
below bf16 resolution and so run faster on peaked distributions:

* logits ``z[t, v] = log_prior[v] + s * n[t, v]``. ``log_prior = -log(rank)`` is a Zipf(1) unigram prior
  over a random permutation of the vocabulary (a few tokens are likely everywhere, as in real text; the
  permutation keeps them scattered so a method must find them, CCE sorts its vocabulary for this);
  ``n[t, v] = h'[t] . w'[v]`` is unit-variance Gaussian context noise. Both live in the real inputs: hidden
  column 0 is 1 and weight column 0 holds ``log_prior``; the other columns are Gaussian.
* ``s`` is found by bisection on 256 rows so the mean softmax entropy is ``target_entropy`` (2.0 nats by
  default, a typical next-token entropy of an SFT model on its own responses).
* labels are sampled from the model's own softmax (so mean NLL is close to the entropy), then masked:
  per prompt, a prompt prefix of ``U[15 %, 50 %]`` of ``T`` positions is ``ignore_index`` for all ``K``
  responses; each response then keeps ``U[25 %, 100 %]`` of the remaining positions and the rest is
  right padding (``ignore_index``). About 40 % of positions are targets.
The measured entropy, label NLL, mean max-probability and the fraction of softmax entries below the bf16
filter threshold of CCE (``finfo(bf16).eps / 32``) are recorded with every result.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata as _md
import math
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass

import torch

IGNORE_INDEX = -100
OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# LM heads: name -> (D, V).
HEADS = {
    "llama3-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 152064),
    "gemma2-2b": (2304, 256000),
}
# CPU smoke heads: the same heads with D and V divided by 16 (for checking the pipeline, not for speed).
TINY_HEADS = {f"{k}/16": (d // 16, v // 16) for k, (d, v) in HEADS.items()}

MODES = ("fwd", "bwd", "fwd_bwd", "fwd_nograd")
MODE_DOC = {
    "fwd": "forward with autograd recording (inputs require grad)",
    "bwd": "backward only (graph from an untimed forward, retain_graph=True)",
    "fwd_bwd": "forward + backward",
    "fwd_nograd": "forward under torch.no_grad() (reference-model pass)",
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One benchmark shape: ``tokens = B * K * T`` positions through a ``[V, D]`` head."""

    head: str
    D: int
    V: int
    B: int
    K: int
    T: int
    dtype: str

    @property
    def tokens(self) -> int:
        return self.B * self.K * self.T

    def key(self) -> str:
        return f"{self.head} N={self.tokens} (B={self.B},K={self.K},T={self.T}) {self.dtype}"

    def asdict(self) -> dict:
        return {**asdict(self), "tokens": self.tokens}


def make_case(head: str, tokens: int, K: int, dtype: str, heads=None, max_T: int = 1024) -> Case:
    """``tokens`` positions as ``B`` prompts x ``K`` responses x ``T`` (``T <= max_T``)."""
    D, V = (heads or {**HEADS, **TINY_HEADS})[head]
    T = min(max_T, tokens // K)
    B = tokens // (K * T)
    if B * K * T != tokens:
        raise ValueError(f"tokens={tokens} is not B*K*T with K={K}, T={T}")
    return Case(head, D, V, B, K, T, dtype)


def grid(device: str, quick: bool):
    """``(likelihood, loss)`` cases of both harnesses, most important first: ``(head, positions, K, dtype)``
    and ``(head, positions, K, loss)``. ``python -m benchmarks.compare`` runs them all (``quick``: the
    short list); the pytest-benchmark suite runs the first of the short list by default, the rest under
    ``-m slow``."""
    if device == "cpu":
        h = "llama3-8b/16"
        if quick:
            # bf16 matmuls are slow on CPU: keep those cases small.
            lik = [(h, 512, 2, "fp32"), (h, 1024, 4, "fp32"), (h, 256, 2, "bf16")]
            loss = [(h, 512, 4, "pair_mnm"), (h, 512, 2, "simpo")]
        else:
            lik = [(hd, n, 4, "fp32") for hd in TINY_HEADS for n in (256, 1024, 2048)]
            lik += [(hd, 256, 2, "bf16") for hd in TINY_HEADS]
            lik += [(h, 1024, k, "fp32") for k in (2, 8)]
            loss = [(h, 1024, k, "pair_mnm") for k in (2, 4, 8)] + [(h, 1024, 2, "simpo")]
        return lik, loss
    if quick:
        # One run of about 6 min on an H100: every head at 8k positions in bf16, a longer and a
        # shorter batch, and fp32 once.
        lik = [(h, 8192, 4, "bf16") for h in HEADS]
        lik += [("llama3-8b", 32768, 8, "bf16"), ("llama3-8b", 2048, 2, "bf16"), ("llama3-8b", 8192, 4, "fp32")]
        return lik, [("llama3-8b", 8192, 4, "pair_mnm"), ("llama3-8b", 8192, 2, "simpo")]
    lik = [(h, 8192, 4, "bf16") for h in HEADS]
    lik += [("llama3-8b", 8192, k, "bf16") for k in (2, 8)]
    lik += [(h, n, 4, "bf16") for h in HEADS for n in (2048, 32768)]
    lik += [(h, 8192, 4, "fp32") for h in HEADS]
    lik += [(h, n, 4, "fp32") for h in HEADS for n in (2048, 32768)]
    loss = [("llama3-8b", 8192, k, "pair_mnm") for k in (2, 4, 8)] + [("llama3-8b", 8192, 2, "simpo")]
    return lik, loss


# ----------------------------------------------------------------------------------------------- inputs
def _entropy(z: torch.Tensor) -> torch.Tensor:
    logp = z.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def make_inputs(case: Case, device, seed: int = 0, target_entropy: float = 2.0, mask: bool = True):
    """fp32 ``hidden [B, K, T, D]``, ``weight [V, D]``, int64 ``labels [B, K, T]`` and a stats dict.

    See the module docstring for how they are drawn. Cast ``hidden``/``weight`` to the case dtype after.
    """
    device = torch.device(device)
    B, K, T, D, V = case.B, case.K, case.T, case.D, case.V
    N = B * K * T
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)

    ranks = torch.randperm(V, generator=cpu_gen).to(device) + 1
    weight = torch.randn(V, D, device=device, generator=gen) / math.sqrt(D - 1)  # [V, D]
    weight[:, 0] = -torch.log(ranks.float())  # Zipf(1) log-prior
    hidden = torch.randn(N, D, device=device, generator=gen)  # [N, D]
    hidden[:, 0] = 1.0

    # Calibrate the context-noise scale s on a few rows: entropy(prior + s * noise) = target_entropy.
    rows = hidden[: min(N, 256)]
    prior = weight[:, 0]
    noise = rows[:, 1:] @ weight[:, 1:].T  # [r, V]
    lo, hi = 0.0, 64.0
    for _ in range(40):
        s = 0.5 * (lo + hi)
        if _entropy(prior + s * noise).mean().item() > target_entropy:
            lo = s
        else:
            hi = s
    del noise
    hidden[:, 1:] *= s

    # Labels sampled from the model's own softmax, in row chunks.
    labels = torch.empty(N, dtype=torch.long, device=device)
    chunk = max(1, min(N, (1 << 28) // (V * 4)))
    for i in range(0, N, chunk):
        probs = (hidden[i : i + chunk] @ weight.T).softmax(-1)
        labels[i : i + chunk] = torch.multinomial(probs, 1, generator=gen)[:, 0]
        del probs

    # Statistics of the drawn distribution on the first rows.
    z = (hidden[:256] @ weight.T).float()
    logp = z.log_softmax(-1)
    p = logp.exp()
    eps = torch.finfo(torch.bfloat16).eps / 32
    stats = {
        "logit_scale_s": s,
        "target_entropy_nats": target_entropy,
        "entropy_nats": _entropy(z).mean().item(),
        "label_nll_nats": -logp.gather(-1, labels[:256, None]).mean().item(),
        "mean_max_prob": p.max(-1).values.mean().item(),
        "frac_probs_below_bf16_filter_eps": (p < eps).float().mean().item(),
    }
    del z, logp, p

    labels = labels.view(B, K, T)
    hidden = hidden.view(B, K, T, D)
    if mask:
        t = torch.arange(T, device=device)
        prompt = (torch.rand(B, 1, 1, generator=cpu_gen) * 0.35 + 0.15).mul(T).long().to(device)  # [B, 1, 1]
        keep = torch.rand(B, K, 1, generator=cpu_gen).to(device) * 0.75 + 0.25
        end = prompt + ((T - prompt) * keep).long().clamp_min(1)  # [B, K, 1]
        labels = torch.where((t >= prompt) & (t < end), labels, IGNORE_INDEX)
    valid = labels != IGNORE_INDEX
    stats["valid_tokens"] = int(valid.sum())
    stats["valid_fraction"] = stats["valid_tokens"] / N
    return hidden, weight, labels, stats


# ----------------------------------------------------------------------------------------------- FLOPs
def flops(mode: str, tokens: int, D: int, V: int) -> int:
    """Floor FLOPs of the op: forward 2·T·D·V (the logits GEMM); backward 6·T·D·V (the logits recomputed,
    because the loss's weights are known only after the forward, then the dH and dW GEMMs);
    forward+backward 8·T·D·V."""
    per = {"fwd": 2, "fwd_nograd": 2, "bwd": 6, "fwd_bwd": 8}[mode]
    return per * tokens * D * V


# ----------------------------------------------------------------------------------------------- timing
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _set_grads_none(tensors) -> None:
    for x in tensors or ():
        x.grad = None


def synced(fn, grads, device):
    """``fn`` with its input grads reset before and a device sync after (for wall-clock timers)."""

    def run():
        _set_grads_none(grads)
        out = fn()
        sync(device)
        return out

    return run


def bench_ms(fn, device, grad_to_none=None, quick: bool = False) -> dict:
    """Median (and 20/80 % quantiles) of ``fn``'s wall time in ms.

    CUDA: ``triton.testing.do_bench`` (clears L2 between calls, sets ``grad_to_none`` grads to None).
    CPU: ``time.perf_counter`` around each call after one warm-up call, at least 3 calls and up to ~1 s.
    """
    if torch.device(device).type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(
            fn, warmup=10 if quick else 25, rep=40 if quick else 100, grad_to_none=grad_to_none,
            quantiles=[0.5, 0.2, 0.8],
        )
        return {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2], "timer": "triton.testing.do_bench"}
    _set_grads_none(grad_to_none)
    fn()
    times = []
    budget = 0.3 if quick else 1.0
    while len(times) < 3 or (sum(times) < budget and len(times) < 50):
        _set_grads_none(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    q = lambda f: 1e3 * times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"ms": 1e3 * statistics.median(times), "ms_p20": q(0.2), "ms_p80": q(0.8), "timer": "perf_counter"}


def peak_extra_bytes(fn, device, grad_to_none=None):
    """Peak CUDA memory allocated during one call of ``fn`` minus memory allocated just before it.

    Grads of ``grad_to_none`` are set to None first, so for modes with a backward the result includes
    the gradient outputs (dH, dW) the call creates; callers subtract their size to get the workspace.
    The tensors ``fn`` returns are alive at the peak and are counted. None on CPU (not measured).
    """
    if torch.device(device).type != "cuda":
        return None
    _set_grads_none(grad_to_none)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    _set_grads_none(grad_to_none)
    return peak - before


def gemm_tflops(tokens: int, D: int, V: int, dtype, device, weight=None, quick: bool = False) -> dict:
    """Rate of ``torch.mm([n, D], [D, V])`` in ``dtype`` (the logits GEMM of the op), n = min(tokens, 8192)
    on CUDA (the rate is flat beyond that), ``tokens`` on CPU."""
    n = min(tokens, 8192) if torch.device(device).type == "cuda" else tokens
    a = torch.randn(n, D, device=device, dtype=dtype)
    b = (weight if weight is not None and weight.dtype == dtype else torch.randn(V, D, device=device, dtype=dtype)).T
    t = bench_ms(lambda: torch.mm(a, b), device, quick=quick)
    return {"gemm_rows": n, "gemm_ms": t["ms"], "gemm_tflops": 2 * n * D * V / (t["ms"] * 1e-3) / 1e12}


# ----------------------------------------------------------------------------------------------- stamp
def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - a missing git only loses the stamp
        return None


def _version(dist: str) -> str | None:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return None


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return "cpu-smoke"


def run_stamp(device) -> dict:
    """Device, date, versions and git commit for every results file."""
    import triton

    # A copy of the tree without .git (e.g. shipped to a GPU machine) gets the commit from the environment.
    commit = _git("rev-parse", "HEAD")
    if not commit or not re.fullmatch(r"[0-9a-f]{40}", commit):  # no repo, or one without commits
        commit = os.environ.get("MPPO_GIT_COMMIT") or None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    device = torch.device(device)
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "mppo_kernels": getattr(__import__("mppo_kernels"), "__version__", None),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy") or _version("cut_cross_entropy"),
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
    }
