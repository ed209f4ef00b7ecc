"""Chunked ``torch.compile`` baseline for the per-sequence log-likelihood (the "good plain PyTorch" provider).

Rows (tokens) are processed in chunks whose fp32 logits stay under ``chunk_bytes`` (512 MiB by default).
Forward keeps only the per-token log-sum-exp; backward recomputes each chunk's logits, forms
``G = g_t * (onehot(y_t) - softmax_t)`` (times ``1 - tanh^2(z / c)`` under a soft-cap ``c``) in the input
dtype and runs the two GEMMs ``dH = G W`` and ``dW += G^T H`` (dW accumulated in the input dtype, like
Liger's default). The elementwise work of a
chunk (log-softmax, gather, G) is fused by Inductor; the GEMMs go to cuBLAS. Equivalent to::

    logits = (hidden @ weight.T).float()
    logits = softcap * torch.tanh(logits / softcap)                      # only with a softcap
    token_logps = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0] * (labels != ignore_index)
    logp = token_logps.sum(-1) / (labels != ignore_index).sum(-1)
"""

from __future__ import annotations

import torch

__all__ = ["chunked_compiled_sequence_likelihood"]

_COMPILED = {}


def _compiled(fn):
    if fn not in _COMPILED:
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # one graph per (head, dtype, chunk) shape
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        _COMPILED[fn] = torch.compile(fn, dynamic=None)
    return _COMPILED[fn]


def _rows_dynamic(*tensors):
    # One graph for every chunk length (the last chunk, other token counts): only the row dim varies.
    for t in tensors:
        torch._dynamo.mark_dynamic(t, 0)
    return tensors


def _capped(z, softcap):
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _fwd_chunk(h, w, y, ignore_index: int, softcap):
    # h [c, D], w [V, D], y [c] -> token log-prob [c] (0 where ignored), lse [c]
    z = _capped((h @ w.T).float(), softcap)  # [c, V]
    lse = z.logsumexp(-1)
    valid = y != ignore_index
    tgt = z.gather(-1, torch.where(valid, y, 0)[:, None])[:, 0]
    return torch.where(valid, tgt - lse, 0.0), lse


def _grad_chunk(h, w, y, lse, g, ignore_index: int, softcap):
    # G [c, V] = g_t * (onehot(y_t) - softmax_t) * dcap/dz in h.dtype, 0 on ignored rows
    z = _capped((h @ w.T).float(), softcap)
    p = torch.exp(z - lse[:, None])
    valid = y != ignore_index
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == torch.where(valid, y, -1)[:, None]
    G = torch.where(valid, g, 0.0)[:, None] * (onehot.float() - p)
    if softcap is not None:
        G = G * (1 - (z / softcap) ** 2)  # d(c tanh(x / c))/dx = 1 - tanh^2(x / c)
    return G.to(h.dtype)


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk, softcap):
        # hidden [N, D], weight [V, D], labels [N] -> token log-probs [N] fp32
        N = hidden.shape[0]
        tok = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        fwd = _compiled(_fwd_chunk)
        for s in range(0, N, chunk):
            h, y = _rows_dynamic(hidden[s : s + chunk], labels[s : s + chunk])
            tok[s : s + chunk], lse[s : s + chunk] = fwd(h, weight, y, ignore_index, softcap)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.chunk, ctx.softcap = ignore_index, chunk, softcap
        return tok

    @staticmethod
    def backward(ctx, g):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        dH = torch.zeros_like(hidden) if need_h else None
        dW = torch.zeros_like(weight) if need_w else None
        grad = _compiled(_grad_chunk)
        g = g.float().contiguous()
        for s in range(0, hidden.shape[0], ctx.chunk):
            e = s + ctx.chunk
            h, y, l, gc = _rows_dynamic(hidden[s:e], labels[s:e], lse[s:e], g[s:e])
            G = grad(h, weight, y, l, gc, ctx.ignore_index, ctx.softcap)  # [c, V]
            if need_h:
                torch.mm(G, weight, out=dH[s:e])
            if need_w:
                dW.addmm_(G.T, hidden[s:e])
        return dH, dW, None, None, None, None


def default_chunk_rows(V: int, N: int, chunk_bytes: int = 512 << 20) -> int:
    rows = max(16, chunk_bytes // (V * 4))
    rows = 1 << (rows.bit_length() - 1)  # power of two
    return max(1, min(rows, N))


def chunked_compiled_sequence_likelihood(hidden, weight, labels, *, ignore_index: int = -100, chunk_rows=None,
                                         softcap: float | None = None):
    """``hidden [..., T, D]``, ``weight [V, D]``, ``labels [..., T]`` -> mean log-likelihood ``[...]`` fp32;
    ``softcap``: logits ``c * tanh(z / c)`` before the softmax."""
    D = hidden.shape[-1]
    h2 = hidden.reshape(-1, D)
    y = labels.reshape(-1)
    chunk = chunk_rows or default_chunk_rows(weight.shape[0], h2.shape[0])
    tok = _ChunkedTokenLogps.apply(h2, weight, y, ignore_index, chunk, softcap).view(labels.shape)
    count = (labels != ignore_index).sum(-1)
    return tok.sum(-1) / count
