"""The token log-likelihood op in plain torch, chunked over the vocabulary: any device, fp32 math (fp64 for
fp64 inputs). The fallback where neither the Triton kernels nor the native CPU kernels run.

Workspace: a few ``[n, vocab_chunk]`` tiles in the accumulation dtype (the scored rows are not tiled).
"""

from __future__ import annotations

import torch

from mppo_kernels.checks import accumulation_dtype
from mppo_kernels.kernels import DEFAULT_VOCAB_CHUNK, OpSettings

__all__ = ["forward", "backward"]


def _logits(h_acc, weight, bias, v_lo, v_hi, settings: OpSettings):
    """``(z, t)``: the transformed logits of columns ``[v_lo, v_hi)``, and tanh(u) when soft-capping."""
    u = h_acc @ weight[v_lo:v_hi].to(h_acc.dtype).T
    if bias is not None:
        u = u + bias[v_lo:v_hi].to(h_acc.dtype)
    if settings.pre != 1.0:
        u = u * settings.pre
    if not settings.softcap:
        return u, None
    t = torch.tanh(u)
    return settings.softcap * t, t


def forward(hidden2d, weight, bias, rows, targets, settings: OpSettings, saved=None):
    """``saved [cap, V]``: also keep the logits of the first ``min(n, cap)`` rows there (input dtype)."""
    h = hidden2d.index_select(0, rows).to(accumulation_dtype(hidden2d.dtype))  # [n, D]
    k = min(rows.numel(), saved.shape[0]) if saved is not None else 0
    chunk = settings.vocab_chunk or DEFAULT_VOCAB_CHUNK
    lse = torch.full((rows.numel(),), float("-inf"), device=h.device, dtype=h.dtype)
    target_logit = torch.full_like(lse, float("nan"))  # stays NaN for an out-of-range target
    for v_lo in range(0, weight.shape[0], chunk):
        z, _ = _logits(h, weight, bias, v_lo, v_lo + chunk, settings)  # [n, Vc]
        if k:
            saved[:k, v_lo : v_lo + z.shape[1]] = z[:k]
        lse = torch.logaddexp(lse, z.logsumexp(-1))
        local = targets - v_lo
        inside = (local >= 0) & (local < z.shape[1])
        picked = z.gather(1, torch.where(inside, local, 0).unsqueeze(1)).squeeze(1)
        target_logit = torch.where(inside, picked, target_logit)
    return lse, target_logit


def backward(hidden2d, weight, bias, rows, targets, lse, grad, need, settings: OpSettings, *, all_rows=False,
             saved=None):
    """``saved``: the logits the forward kept for its first rows, which are then not recomputed."""
    need_h, need_w, need_b = need
    acc = accumulation_dtype(hidden2d.dtype)
    n, (V, D) = rows.numel(), weight.shape
    h = (hidden2d if all_rows else hidden2d.index_select(0, rows)).to(acc)
    d_weight = torch.empty_like(weight) if need_w else None
    d_bias = torch.zeros(V, device=weight.device, dtype=acc) if need_b else None
    d_rows = torch.zeros((n, D), device=hidden2d.device, dtype=acc) if need_h else None
    g = grad.to(acc)[:, None]
    k = min(n, saved.shape[0]) if saved is not None else 0
    chunk = settings.vocab_chunk or DEFAULT_VOCAB_CHUNK
    for v_lo in range(0, V, chunk):
        v_hi = min(v_lo + chunk, V)
        z, t = _logits(h[k:], weight, bias, v_lo, v_hi, settings)
        if k:  # kept rows: their logits as the forward computed them, in the input dtype
            kept = saved[:k, v_lo:v_hi].to(acc)
            z = torch.cat([kept, z])
            if t is not None:
                t = torch.cat([kept / settings.softcap, t])
        local = targets - v_lo
        inside = (local >= 0) & (local < v_hi - v_lo)
        onehot = torch.zeros_like(z).scatter_(1, torch.where(inside, local, 0)[:, None], inside[:, None].to(acc))
        dz = g * (onehot - torch.exp(z - lse[:, None])) * settings.logit_scale  # d loss / d(h·Wᵀ + b)
        if t is not None:
            dz = dz * (1 - t * t)
        if need_w:  # complete for this chunk: no cross-chunk accumulation
            d_weight[v_lo:v_hi] = dz.T @ h
        if need_h:
            d_rows.addmm_(dz, weight[v_lo:v_hi].to(acc))
        if need_b:
            d_bias[v_lo:v_hi] = dz.sum(0)
    return d_rows, d_weight, d_bias
