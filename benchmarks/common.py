"""Shapes, inputs and FLOP counts shared by both benchmark harnesses (``compare.py`` and the pytest suite).

Every case runs twice (``Case.targets``): ``"all"``, every position a target, where every provider does
the same work; and ``"masked"``, the realistic prompt + padding mask, where providers that compute every
position (naive, torch_compile_chunked, liger_flce) do 2-3x the work of those that compute only targets.

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
* labels are sampled from the model's own softmax (so mean NLL is close to the entropy). With
  ``targets="masked"``: per prompt, a prompt prefix of ``U[15 %, 50 %]`` of ``T`` positions is
  ``ignore_index`` for all ``K`` responses; each response then keeps ``U[25 %, 100 %]`` of the remaining
  positions and the rest is right padding (``ignore_index``). About 40 % of positions are targets. Both
  variants of a case draw the same hidden states, weight and labels; only the mask differs.
The measured entropy, label NLL, mean max-probability and the fraction of softmax entries below the bf16
filter threshold of CCE (``finfo(bf16).eps / 32``) are recorded with every result.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

IGNORE_INDEX = -100
OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)

# LM heads: name -> (D, V).
HEADS = {
    "llama3-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 152064),
    "gemma2-2b": (2304, 256000),
}
# CPU smoke heads: the same heads with D and V divided by 16 (for checking the pipeline, not for speed).
TINY_HEADS = {f"{k}/16": (d // 16, v // 16) for k, (d, v) in HEADS.items()}
GEMMA2_SOFTCAP = 30.0  # Gemma-2's final_logit_softcapping: logits = c * tanh(logits / c)

MODES = ("fwd", "bwd", "fwd_bwd", "fwd_nograd")
MODE_DOC = {
    "fwd": "forward with autograd recording (inputs require grad)",
    "bwd": "backward only (graph from an untimed forward, retain_graph=True)",
    "fwd_bwd": "forward + backward",
    "fwd_nograd": "forward under torch.no_grad() (reference-model pass)",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGETS = ("all", "masked")
# fp16 training scales the loss (GradScaler) so that small gradients do not underflow; without it, fp16
# logit gradients of ~1e-9 flush to zero and every method's dH is off by ~2 %.
FP16_LOSS_SCALE = 2.0**12


@dataclass(frozen=True)
class Case:
    """One benchmark shape: ``tokens = B * K * T`` positions through a ``[V, D]`` head.

    ``targets``: ``"all"`` (every position a target: equal work for every provider) or ``"masked"``
    (prompt + padding are ``ignore_index``). ``softcap``: logits ``c * tanh(z / c)`` (Gemma-2) or None.
    """

    head: str
    D: int
    V: int
    B: int
    K: int
    T: int
    dtype: str
    targets: str = "masked"
    softcap: float | None = None

    def __post_init__(self):
        if self.targets not in TARGETS:
            raise ValueError(f"Case.targets must be one of {TARGETS}, got {self.targets!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Case.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def tokens(self) -> int:
        return self.B * self.K * self.T

    def key(self) -> str:
        cap = f" softcap={self.softcap:g}" if self.softcap is not None else ""
        return f"{self.head} N={self.tokens} (B={self.B},K={self.K},T={self.T}) {self.dtype} targets={self.targets}{cap}"

    def shape_key(self) -> tuple:
        """What ``make_inputs`` draws from: both ``targets`` variants and every dtype share the tensors."""
        return (self.head, self.D, self.V, self.B, self.K, self.T)

    def asdict(self) -> dict:
        return {**asdict(self), "tokens": self.tokens}


def make_case(head: str, tokens: int, K: int, dtype: str, heads=None, max_T: int = 1024,
              targets: str = "masked", softcap: float | None = None) -> Case:
    """``tokens`` positions as ``B`` prompts x ``K`` responses x ``T`` (``T <= max_T``)."""
    heads = heads or {**HEADS, **TINY_HEADS}
    if head not in heads:
        raise ValueError(f"unknown head {head!r}; known: {sorted(heads)}")
    D, V = heads[head]
    T = min(max_T, tokens // K)
    B = tokens // (K * T) if T else 0
    if T == 0 or B * K * T != tokens:
        raise ValueError(f"tokens={tokens} is not B*K*T with K={K}, T={T}")
    return Case(head, D, V, B, K, T, dtype, targets, softcap)


def _both(specs, heads=None) -> list[Case]:
    """Every ``(head, tokens, K, dtype, softcap)`` spec with all positions targets, then all masked."""
    return [make_case(h, n, k, dt, heads, targets=t, softcap=cap) for t in TARGETS for h, n, k, dt, cap in specs]


def grid(device: str, quick: bool):
    """``(likelihood cases, loss cases)`` of both harnesses, most important first.

    Likelihood cases are ``Case``s, the equal-work (``targets="all"``) ones first; loss cases are
    ``(Case, loss name)``. ``python -m benchmarks.compare`` runs them all (``quick``: the short list); the
    pytest-benchmark suite runs the first spec (both ``targets``) by default, the rest under ``-m slow``.
    """
    if device == "cpu":
        h, g = "llama3-8b/16", "gemma2-2b/16"
        if quick:
            # bf16 and (much more) fp16 matmuls are slow on CPU: keep those cases small.
            specs = [(h, 512, 2, "fp32", None), (h, 256, 2, "bf16", None), (h, 128, 2, "fp16", None),
                     (g, 256, 2, "fp32", GEMMA2_SOFTCAP)]
            loss = [(h, 512, 4, "pair_mnm"), (h, 512, 2, "simpo")]
        else:
            specs = [(hd, n, 4, "fp32", None) for hd in TINY_HEADS for n in (256, 1024, 2048)]
            specs += [(hd, 256, 2, dt, None) for hd in TINY_HEADS for dt in ("bf16", "fp16")]
            specs += [(h, 1024, k, "fp32", None) for k in (2, 8)] + [(g, 1024, 4, "fp32", GEMMA2_SOFTCAP)]
            loss = [(h, 1024, k, "pair_mnm") for k in (2, 4, 8)] + [(h, 1024, 2, "simpo")]
        return _both(specs), [(make_case(hd, n, k, "fp32"), name) for hd, n, k, name in loss]
    bf16 = [(hd, 8192, 4, "bf16", None) for hd in HEADS]
    bf16 += [("llama3-8b", 32768, 8, "bf16", None), ("llama3-8b", 2048, 2, "bf16", None),
             ("gemma2-2b", 8192, 4, "bf16", GEMMA2_SOFTCAP)]
    loss = [("llama3-8b", 8192, 4, "pair_mnm"), ("llama3-8b", 8192, 2, "simpo")]
    if quick:
        # The shapes in bf16 (equal work first), then fp16 and fp32 on one head.
        lik = _both(bf16) + _both([("llama3-8b", 8192, 4, "fp16", None)]) + _both([("llama3-8b", 8192, 4, "fp32", None)])
    else:
        more = [("llama3-8b", 8192, k, "bf16", None) for k in (2, 8)]
        more += [(hd, n, 4, "bf16", None) for hd in ("qwen2.5-7b", "gemma2-2b") for n in (2048, 32768)]
        other = [(hd, n, 4, dt, None) for dt in ("fp16", "fp32") for hd in HEADS for n in (2048, 8192)]
        lik = _both(bf16 + more) + _both(other)
        loss += [("llama3-8b", 8192, k, "pair_mnm") for k in (2, 8)]
    return lik, [(make_case(hd, n, k, "bf16"), name) for hd, n, k, name in loss]


# ----------------------------------------------------------------------------------------------- inputs
def _entropy(z: torch.Tensor) -> torch.Tensor:
    logp = z.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def make_inputs(case: Case, device, seed: int = 0, target_entropy: float = 2.0):
    """fp32 ``hidden [B, K, T, D]``, ``weight [V, D]``, int64 ``labels [B, K, T]`` and a stats dict.

    See the module docstring for how they are drawn; ``case.targets`` picks the mask, ``case.dtype`` is
    ignored (cast ``hidden``/``weight`` to it after).
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
    if case.targets == "masked":
        t = torch.arange(T, device=device)
        prompt = (torch.rand(B, 1, 1, generator=cpu_gen) * 0.35 + 0.15).mul(T).long().to(device)  # [B, 1, 1]
        keep = torch.rand(B, K, 1, generator=cpu_gen).to(device) * 0.75 + 0.25
        end = prompt + ((T - prompt) * keep).long().clamp_min(1)  # [B, K, 1]
        labels = torch.where((t >= prompt) & (t < end), labels, IGNORE_INDEX)
    valid = labels != IGNORE_INDEX
    stats["valid_tokens"] = int(valid.sum())
    stats["valid_fraction"] = stats["valid_tokens"] / N
    return hidden, weight, labels, stats


def make_upstream(case: Case, device, seed: int = 1) -> torch.Tensor:
    """The upstream gradient dL/dlogp ``[B, K]`` of a case: standard normal, like a loss's (times
    ``FP16_LOSS_SCALE`` for fp16)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    up = torch.randn(case.B, case.K, device=device, generator=gen)
    return up * FP16_LOSS_SCALE if case.dtype == "fp16" else up


# ----------------------------------------------------------------------------------------------- FLOPs
FLOPS_PER_MODE = {"fwd": 2, "fwd_nograd": 2, "bwd": 4, "fwd_bwd": 6}


def flops(mode: str, tokens: int, D: int, V: int, recompute: bool = False) -> int:
    """FLOPs of ``mode`` over ``tokens`` rows of a ``[V, D]`` head.

    Without ``recompute`` (the headline): the work of a method that keeps its logits, forward 2·n·D·V (the
    logits GEMM), backward 4·n·D·V (the dH and dW GEMMs), forward+backward 6·n·D·V. ``recompute=True``
    adds the 2·n·D·V of recomputing the logits in the backward (8·n·D·V for forward+backward), the work a
    bounded-memory method such as ours (without a logits budget), Liger or CCE actually does.
    """
    if mode not in FLOPS_PER_MODE:
        raise ValueError(f"unknown mode {mode!r}; known: {sorted(FLOPS_PER_MODE)}")
    per = FLOPS_PER_MODE[mode] + (2 if recompute and mode in ("bwd", "fwd_bwd") else 0)
    return per * tokens * D * V
