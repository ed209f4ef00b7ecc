"""The plain-torch math every likelihood provider must reproduce, the high-precision oracle built on it,
and the check that marks a provider wrong.

    logits = hidden @ weight.T                                  # [n, V]
    logits = c * tanh(logits / c)                               # softcap c (Gemma-2), when given
    token_logp = log_softmax(logits)[label]                     # 0 where label == ignore_index
    logp[b, k] = mean over targets t of token_logp[b, k, t]     # [B, K]

The oracle runs this in fp32 on CUDA and fp64 elsewhere, from the case's (already cast) inputs, over row
chunks with autograd, so it never holds the ``[N, V]`` logits and gives ``logp`` and the gradients dH, dW
of ``sum(upstream * logp)``. A provider is checked on its output (with and without autograd) and on both
gradients in the same run as its timing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.common import IGNORE_INDEX

# A provider is wrong when an error exceeds TOLERANCE_ULPS units of its input dtype's rounding (fp32: a
# floor of 1e-4, accumulation-order noise over ~1e5 vocabulary entries stays far below it). bf16: 0.0625,
# fp16: 0.0078. Rounding the logits or gradients to the input dtype stays inside; a dropped term, a wrong
# scale or a stale partial sum does not.
TOLERANCE_ULPS = 8
TOLERANCE_FLOOR = 1e-4


def tolerance(dtype: torch.dtype) -> float:
    return max(TOLERANCE_ULPS * torch.finfo(dtype).eps, TOLERANCE_FLOOR)


def transform_logits(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def token_logps(hidden2d, weight, labels1d, softcap=None, compute_dtype=torch.float32) -> torch.Tensor:
    """``hidden2d [n, D]``, ``weight [V, D]``, ``labels1d [n]`` -> token log-probs ``[n]`` in
    ``compute_dtype``, 0 at ``ignore_index``. The matmul runs in the input dtype (as plain training code
    does), the soft-cap and the log-softmax in ``compute_dtype``."""
    z = transform_logits((hidden2d @ weight.T).to(compute_dtype), softcap)  # [n, V]
    valid = labels1d != IGNORE_INDEX
    lp = z.log_softmax(-1).gather(-1, torch.where(valid, labels1d, 0)[:, None])[:, 0]
    return torch.where(valid, lp, 0.0)


def per_sequence_mean(token_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``token_values [..., T]`` (0 at ignored positions) -> mean over targets ``[...]``."""
    valid = labels != IGNORE_INDEX
    return token_values.sum(-1) / valid.sum(-1)


@dataclass
class Oracle:
    logp: torch.Tensor  # [B, K]
    dhidden: torch.Tensor  # [B, K, T, D]
    dweight: torch.Tensor  # [V, D]
    dtype: torch.dtype


def oracle(hidden, weight, labels, upstream, softcap=None, chunk: int = 1024, dtype=None) -> Oracle:
    """``logp [B, K]`` and the gradients of ``sum(upstream * logp)`` w.r.t. hidden and weight, in ``dtype``
    (default fp32 on CUDA, fp64 elsewhere), from ``hidden [B, K, T, D]``, ``weight [V, D]``,
    ``labels [B, K, T]``, ``upstream [B, K]``; row chunks of ``chunk`` keep memory at ``chunk x V``."""
    dt = dtype or (torch.float32 if hidden.is_cuda else torch.float64)
    D = hidden.shape[-1]
    h = hidden.detach().reshape(-1, D)
    y = labels.reshape(-1)
    w = weight.detach().to(dt).requires_grad_(True)
    count = (labels != IGNORE_INDEX).sum(-1)  # [B, K]
    # d logp[b, k] / d token_logp[t] = 1 / count[b, k]: each token's weight in sum(upstream * logp).
    per_token = (upstream.to(dt) / count.to(dt))[..., None].expand(labels.shape).reshape(-1)
    tok = torch.zeros(h.shape[0], dtype=dt, device=h.device)
    dh = torch.zeros(h.shape, dtype=dt, device=h.device)
    with torch.enable_grad():
        for s in range(0, h.shape[0], chunk):
            hc = h[s : s + chunk].to(dt).requires_grad_(True)
            lp = token_logps(hc, w, y[s : s + chunk], softcap, compute_dtype=dt)
            (lp * per_token[s : s + chunk]).sum().backward()
            tok[s : s + chunk] = lp.detach()
            dh[s : s + chunk] = hc.grad
    logp = per_sequence_mean(tok.view(labels.shape), labels)
    return Oracle(logp, dh.view(hidden.shape), w.grad, dt)


def _rel(got, ref) -> float:
    """``||got - ref|| / ||ref||`` (inf for a missing or non-finite gradient)."""
    if got is None:
        return float("inf")
    diff = (got.to(ref.dtype) - ref).norm().item()
    scale = ref.norm().item()
    err = diff / scale if scale > 0 else diff
    return err if err == err else float("inf")


def _abs(got, ref) -> float:
    err = (got.to(ref.dtype) - ref).abs().max().item()
    return err if err == err else float("inf")


def check(fn, hidden, weight, labels, upstream, ref: Oracle, backward: bool = True) -> dict:
    """Run ``fn`` once with autograd and once without; its errors against ``ref`` and a verdict.

    Returns ``max_abs_err`` (logp, the larger of both calls), ``dhidden_rel_err``, ``dweight_rel_err``
    (relative Frobenius norms), ``tolerance``, ``correct`` and ``check`` (``"ok"`` or what is wrong).
    ``backward=False`` (a provider without a backward for these inputs) checks the no-grad output only.
    """
    errs = {}
    if backward:
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        out = fn(h, w, labels)
        out.backward(upstream)
        errs = {"max_abs_err": _abs(out.detach(), ref.logp), "dhidden_rel_err": _rel(h.grad, ref.dhidden),
                "dweight_rel_err": _rel(w.grad, ref.dweight)}
        del out, h, w
    with torch.no_grad():
        out_ng = fn(hidden.detach(), weight.detach(), labels)
    errs["max_abs_err"] = max(errs.get("max_abs_err", 0.0), _abs(out_ng, ref.logp))
    del out_ng
    tol = tolerance(hidden.dtype)
    bad = [f"{k.replace('_err', '')} {v:.2g} > {tol:.2g}" for k, v in errs.items() if not v <= tol]
    verdict = "ok" if backward else "ok (output only: no backward)"
    return {"dhidden_rel_err": None, "dweight_rel_err": None, **errs, "tolerance": tol,
            "oracle_dtype": str(ref.dtype).replace("torch.", ""), "correct": not bad,
            "check": verdict if not bad else "wrong: " + ", ".join(bad)}
