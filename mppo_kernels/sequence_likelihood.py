"""Per-sequence log-likelihood of every response, from last hidden states and the LM head, without logits.

Layout (top to bottom): configs, Triton kernels, host functions (Triton and chunked-torch), the
autograd.Function, and the functional API ``fused_sequence_likelihood``.

Design, for ``n`` target tokens (ignored positions are compacted away first), hidden size D, vocab V:

* forward: one kernel computes (token-block x vocab-split) logit tiles with ``tl.dot`` over D, keeps an
  online max / sum-exp per row and picks out the target logit. Only O(n x splits) floats are written;
  the splits are merged by a tiny torch log-sum-exp. 2·n·D·V FLOPs.
* backward: the loss's per-token weight g_t is only known now, so the logits are recomputed (no
  ``[n, V]`` buffer is kept between passes). For each vocab chunk of ``vocab_chunk_size`` columns one
  kernel writes the logit gradient dZ = g·(onehot(y) − softmax) for that chunk in the input dtype, and two
  cuBLAS GEMMs consume it: dW[chunk] = dZᵀ·H (complete, written once) and dH += dZ·W[chunk] (fp32
  accumulator). No atomics, so the result is deterministic. 6·n·D·V FLOPs.
"""

from __future__ import annotations

import functools
import os

import torch

from mppo_kernels.checks import accumulation_dtype, check_sequence_likelihood_inputs

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; the chunked torch path needs none
    triton = None

__all__ = ["fused_sequence_likelihood", "sequence_logprob_fwd", "sequence_logprob_bwd", "SequenceLikelihoodFunction"]


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------

# Columns of the logit gradient materialized at once in the backward. [n, 4096] bf16 is 64 MiB at 8k tokens
# (1.6 % of the naive fp32 logits) and keeps both GEMMs of a chunk large enough to run at full rate.
DEFAULT_VOCAB_CHUNK = 4096


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _gpu_configs():
    # bf16/fp16 tiles in the usual Hopper/Ampere GEMM range; fp32 configs that overflow shared memory are
    # pruned by the autotuner (OutOfResources).
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4), (64, 64, 32, 4, 3)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


# Small tiles under the interpreter so that odd test shapes cross several tiles and splits.
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}
# Below this many logits (n x V) a fixed config is used: autotuning (compiling and timing every config
# for each new shape) costs far more than it could win on a problem this small.
_AUTOTUNE_MIN_LOGITS = 1 << 24
_SMALL_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}


# ---------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _logits_tile(
        p_h, p_w, p_b,                      # hidden [N, D], weight [V, D], bias [V]
        rows, m_rows, o_v, m_v,             # row ids into hidden [BLOCK_M], vocab ids [BLOCK_N] and masks
        D, stride_h, stride_w,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        b_z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        p_hr = p_h + rows.to(tl.int64)[:, None] * stride_h
        p_wr = p_w + o_v.to(tl.int64)[:, None] * stride_w
        for k0 in range(0, D, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < D
            b_h = tl.load(p_hr + o_k[None, :], mask=m_rows[:, None] & m_k[None, :], other=0.0)
            b_w = tl.load(p_wr + o_k[None, :], mask=m_v[:, None] & m_k[None, :], other=0.0)
            if DOT_F32:  # the CPU interpreter's bf16 tl.dot is wrong (seen with triton 3.9); fp32 is exact
                b_h = b_h.to(tl.float32)
                b_w = b_w.to(tl.float32)
            b_z = tl.dot(b_h, tl.trans(b_w), b_z, input_precision=PRECISION)
        if HAS_BIAS:
            b_z += tl.load(p_b + o_v, mask=m_v, other=0.0).to(tl.float32)[None, :]
        return b_z

    @triton.jit
    def sequence_logprob_fwd_kernel(
        p_h, p_w, p_b, p_rows, p_y,         # hidden [N, D], weight [V, D], bias [V], rows [n], targets [n]
        p_m, p_s, p_tgt,                    # out: split max [S, n], split sum-exp [S, n], target logit [n]
        n, V, D,
        stride_h, stride_w,
        HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        i_m = tl.program_id(0)
        i_s = tl.program_id(1)
        o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = o_m < n
        rows = tl.load(p_rows + o_m, mask=m_m, other=0)
        b_y = tl.load(p_y + o_m, mask=m_m, other=-1)
        # Splitting the vocabulary gives the GPU enough programs, and whole waves of them (_vocab_splits).
        v_per_split = tl.cdiv(tl.cdiv(V, tl.num_programs(1)), BLOCK_N) * BLOCK_N
        v_lo = i_s * v_per_split
        v_hi = tl.minimum(v_lo + v_per_split, V)
        b_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        b_sum = tl.zeros((BLOCK_M,), tl.float32)
        for v0 in range(v_lo, v_hi, BLOCK_N):
            o_v = v0 + tl.arange(0, BLOCK_N)
            m_v = o_v < v_hi
            b_z = _logits_tile(p_h, p_w, p_b, rows, m_m, o_v, m_v, D, stride_h, stride_w,
                               HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, PRECISION)
            b_z = tl.where(m_v[None, :], b_z, float("-inf"))
            hit = o_v[None, :] == b_y[:, None]
            # Exactly one tile of one split holds a row's target; others must not write.
            tl.store(p_tgt + o_m, tl.sum(tl.where(hit, b_z, 0.0), 1),
                     mask=m_m & (b_y >= v0) & (b_y < v0 + BLOCK_N) & (b_y < v_hi))
            b_new = tl.maximum(b_max, tl.max(b_z, 1))
            # A row whose logits so far are all -inf (a bias banning a block of tokens) has no finite max:
            # shifting by it would compute exp(-inf - (-inf)) = NaN. Its sum is 0, and any finite shift keeps it 0.
            b_shift = tl.where(b_new == float("-inf"), 0.0, b_new)
            b_sum = b_sum * tl.exp(b_max - b_shift) + tl.sum(tl.exp(b_z - b_shift[:, None]), 1)
            b_max = b_new
        tl.store(p_m + i_s * n + o_m, b_max, mask=m_m)
        tl.store(p_s + i_s * n + o_m, b_sum, mask=m_m)

    @triton.jit
    def sequence_logprob_bwd_kernel(
        p_h, p_w, p_b, p_rows, p_y,         # as in the forward
        p_lse, p_g,                         # log-sum-exp [n], dL/d(token log-prob) [n]
        p_dz,                               # out: logit gradient of the chunk [n, v_hi - v_lo]
        n, v_lo, v_hi, D,
        stride_h, stride_w, stride_dz,
        HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        i_m = tl.program_id(0)
        i_v = tl.program_id(1)
        o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = o_m < n
        o_v = v_lo + i_v * BLOCK_N + tl.arange(0, BLOCK_N)
        m_v = o_v < v_hi
        rows = tl.load(p_rows + o_m, mask=m_m, other=0)
        b_y = tl.load(p_y + o_m, mask=m_m, other=-1)
        b_lse = tl.load(p_lse + o_m, mask=m_m, other=0.0)
        b_g = tl.load(p_g + o_m, mask=m_m, other=0.0)
        b_z = _logits_tile(p_h, p_w, p_b, rows, m_m, o_v, m_v, D, stride_h, stride_w,
                           HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, PRECISION)
        b_p = tl.exp(b_z - b_lse[:, None])
        b_dz = b_g[:, None] * (tl.where(o_v[None, :] == b_y[:, None], 1.0, 0.0) - b_p)
        p_out = p_dz + o_m.to(tl.int64)[:, None] * stride_dz + (o_v - v_lo)[None, :]
        tl.store(p_out, b_dz.to(p_dz.dtype.element_ty), mask=m_m[:, None] & m_v[None, :])

    _fwd_tuned = triton.autotune(configs=_gpu_configs(), key=["D", "V", "HAS_BIAS", "PRECISION"])(
        sequence_logprob_fwd_kernel
    )
    # The chunk bounds change every launch; tune on the problem shape only.
    _bwd_tuned = triton.autotune(configs=_gpu_configs(), key=["D", "HAS_BIAS", "PRECISION"])(
        sequence_logprob_bwd_kernel
    )


# ---------------------------------------------------------------------------------------------------------
# Host functions
# ---------------------------------------------------------------------------------------------------------


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    triton_ok = triton is not None and (device.type == "cuda" or _interpreting()) and dtype != torch.float64
    if impl == "triton" and not triton_ok:
        raise ValueError(
            f"impl='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1), and no float64; got "
            f"{dtype} on {device}{'' if triton is not None else ' without triton installed'}"
        )
    if impl == "auto":
        # The interpreter is for testing the kernels (asked for with impl="triton"), never a CPU default.
        return "triton" if triton_ok and device.type == "cuda" else "torch"
    return impl


def _launch_args(hidden2d: torch.Tensor):
    """Kernel flags shared by both passes: how to run tl.dot and which config path to take."""
    interp = _interpreting()
    precision = "ieee"
    if hidden2d.dtype == torch.float32 and not interp and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"  # follow torch's own matmul setting, so ours and the baselines agree
    return {"DOT_F32": interp, "PRECISION": precision}, interp


_MAX_SPLITS = 32


def _vocab_splits(m_blocks: int, V: int, block_n: int, sms: int) -> int:
    """Vocabulary splits of the forward grid ``(m_blocks, splits)``: the count that fills the last wave of
    programs best (fewest splits among near-ties), each split at least two vocabulary tiles long.

    A partly empty last wave is what costs: 24 token blocks x 6 splits on 132 SMs is 1.09 waves and runs
    at ~55 % of the rate of 24 x 11 = 264 programs (exactly 2 waves).
    """
    cap = max(1, min(_MAX_SPLITS, triton.cdiv(V, 2 * block_n)))
    fill = [m_blocks * s / (triton.cdiv(m_blocks * s, sms) * sms) for s in range(1, cap + 1)]
    best = max(fill)
    return next(s for s, f in enumerate(fill, 1) if f >= 0.98 * best)


def _kernel(plain, tuned, n: int, V: int, interp: bool):
    """``(kernel, launch kwargs)``: the autotuned kernel for LM-head sized problems, else a fixed config."""
    if interp:
        return plain, _INTERPRETER_BLOCKS
    if n * V < _AUTOTUNE_MIN_LOGITS:
        return plain, _SMALL_CONFIG
    return tuned, {}


def _fwd_grid(n: int, V: int, config: dict, sms: int | None):
    """``(n_splits, grid)`` of the forward. The split count is fixed before the launch, whatever config
    the autotuner tries: every config then writes every row of the split buffers, so no row can keep a
    partial sum from a config tried before the chosen one (the merge would count it twice). It is chosen
    for the large tiles LM heads tune to; smaller tiles only make more, shorter programs."""
    if sms is None:  # the interpreter: a few splits, so that tests cross split boundaries
        n_splits = max(1, min(3, triton.cdiv(V, config["BLOCK_N"])))
    else:
        n_splits = _vocab_splits(triton.cdiv(n, config.get("BLOCK_M", 128)), V, config.get("BLOCK_N", 256), sms)
    return n_splits, lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), n_splits)


def _fwd_triton(hidden2d, weight, bias, rows, targets):
    n, (V, D) = rows.numel(), weight.shape
    flags, interp = _launch_args(hidden2d)
    kernel, config = _kernel(sequence_logprob_fwd_kernel, _fwd_tuned, n, V, interp)
    n_splits, grid = _fwd_grid(n, V, config, None if interp else _num_sms(hidden2d.device.index or 0))
    split_max = torch.empty((n_splits, n), device=hidden2d.device, dtype=torch.float32)
    split_sum = torch.empty((n_splits, n), device=hidden2d.device, dtype=torch.float32)
    # NaN stays for a target that is out of range when validation is off: never a silent number.
    target_logit = torch.full((n,), float("nan"), device=hidden2d.device, dtype=torch.float32)
    args = (hidden2d, weight, bias if bias is not None else weight, rows, targets, split_max, split_sum,
            target_logit, n, V, D, hidden2d.stride(0), weight.stride(0))
    kernel[grid](*args, HAS_BIAS=bias is not None, **flags, **config)
    top = split_max.max(0).values
    lse = top + (split_sum * torch.exp(split_max - top)).sum(0).log()
    return lse, target_logit


def _fwd_torch(hidden2d, weight, bias, rows, targets, vocab_chunk):
    h = hidden2d.index_select(0, rows).to(accumulation_dtype(hidden2d.dtype))  # [n, D]
    lse = torch.full((rows.numel(),), float("-inf"), device=h.device, dtype=h.dtype)
    target_logit = torch.full_like(lse, float("nan"))
    for v_lo in range(0, weight.shape[0], vocab_chunk):
        z = _logits_torch(h, weight, bias, v_lo, v_lo + vocab_chunk)  # [n, Vc]
        lse = torch.logaddexp(lse, z.logsumexp(-1))
        local = targets - v_lo
        inside = (local >= 0) & (local < z.shape[1])
        picked = z.gather(1, torch.where(inside, local, 0).unsqueeze(1)).squeeze(1)
        target_logit = torch.where(inside, picked, target_logit)
    return lse, target_logit


def _logits_torch(h_acc, weight, bias, v_lo, v_hi):
    z = h_acc @ weight[v_lo:v_hi].to(h_acc.dtype).T
    return z if bias is None else z + bias[v_lo:v_hi].to(h_acc.dtype)


@functools.lru_cache(maxsize=None)
def _has_mixed_addmm(device_index: int) -> bool:
    """Whether ``torch.addmm(..., out_dtype=float32)`` takes bf16/fp16 operands into an fp32 output here
    (CUDA, torch >= 2.9): cuBLAS then accumulates into the fp32 buffer in the GEMM's epilogue."""
    try:
        dev = torch.device("cuda", device_index)
        acc = torch.ones(2, 2, device=dev)
        a = torch.ones(2, 2, device=dev, dtype=torch.bfloat16)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool((acc == 3).all())
    except (TypeError, RuntimeError):
        return False


def _addmm_acc_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in fp32 and ``a``, ``b`` possibly bf16/fp16.

    The fallback rounds each chunk's partial product to the input dtype before the fp32 sum, and moves
    the [n, D] partial through memory twice more; the fused form avoids both where torch supports it.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _has_mixed_addmm(a.device.index or 0):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += a @ b


def _compact(labels: torch.Tensor, ignore_index: int):
    """Flat row ids and int64 targets of the positions that are scored. One host sync (the count)."""
    flat = labels.reshape(-1)
    rows = (flat != ignore_index).nonzero().squeeze(1)
    return rows, flat.index_select(0, rows).long()  # any integer labels; gather and the kernels index with int64


def sequence_logprob_fwd(hidden, weight, bias, labels, ignore_index, impl, vocab_chunk):
    """Token log-probs of the target positions.

    Args:
        hidden: ``[..., T, D]``; weight ``[V, D]``; bias ``[V]`` or None; labels ``[..., T]``.

    Returns:
        ``(rows [n], targets [n], lse [n], token_logps [..., T])``: flat ids of the n scored positions,
        their targets and log-sum-exp (fp32), and the per-token log-probs with 0 at ignored positions.
    """
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden2d.stride(-1) != 1:
        hidden2d = hidden2d.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    rows, targets = _compact(labels, ignore_index)
    acc = accumulation_dtype(hidden.dtype)
    if rows.numel() == 0:
        lse = torch.zeros(0, device=hidden.device, dtype=acc)
        target_logit = lse
    elif impl == "triton":
        lse, target_logit = _fwd_triton(hidden2d, weight, bias, rows, targets)
    else:
        lse, target_logit = _fwd_torch(hidden2d, weight, bias, rows, targets, vocab_chunk)
    token_logps = torch.zeros(labels.numel(), device=hidden.device, dtype=acc)
    token_logps.index_copy_(0, rows, target_logit - lse)  # unique rows: deterministic, unlike index_add_
    return rows, targets, lse, token_logps.view(labels.shape)


def sequence_logprob_bwd(hidden, weight, bias, rows, targets, lse, grad_tokens, need, impl, vocab_chunk):
    """Gradients from dL/d(token log-prob) of the n scored positions.

    Args:
        grad_tokens: ``[n]`` fp32 upstream gradient per scored position.
        need: ``(hidden, weight, bias)`` booleans; skipped gradients are returned as None and cost nothing.

    Returns:
        ``(d_hidden [..., T, D], d_weight [V, D], d_bias [V])`` in the input dtype (or None).
    """
    need_h, need_w, need_b = need
    D = hidden.shape[-1]
    V = weight.shape[0]
    hidden2d = hidden.reshape(-1, D)
    if hidden2d.stride(-1) != 1:
        hidden2d = hidden2d.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    dtype, n = hidden.dtype, rows.numel()
    acc = accumulation_dtype(hidden.dtype)

    d_weight = torch.zeros_like(weight) if need_w and n == 0 else (torch.empty_like(weight) if need_w else None)
    d_bias = torch.zeros(V, device=weight.device, dtype=acc) if need_b else None
    d_hidden_rows = torch.zeros((n, D), device=hidden.device, dtype=acc) if need_h else None
    if n:
        # The torch path works in fp32 throughout; the Triton path hands dZ to cuBLAS in the input dtype,
        # which is what torch's own backward of a bf16 linear layer does with its logit gradient.
        # [n, D] copy of the scored rows: the dW GEMM's operand (and the torch path's logits input).
        # Every position scored (rows is arange): the hidden states are the operand already, no copy.
        all_rows = n == hidden2d.shape[0]
        h_rows = (hidden2d if all_rows else hidden2d.index_select(0, rows)) if (need_w or impl == "torch") else None
        h_acc = h_rows.to(acc) if impl == "torch" else None
        if impl == "triton":
            flags, interp = _launch_args(hidden2d)
            kernel, config = _kernel(sequence_logprob_bwd_kernel, _bwd_tuned, n, V, interp)
        for v_lo in range(0, V, vocab_chunk):
            v_hi = min(v_lo + vocab_chunk, V)
            if impl == "triton":
                dz = torch.empty((n, v_hi - v_lo), device=hidden.device, dtype=dtype)
                args = (hidden2d, weight, bias if bias is not None else weight, rows, targets, lse, grad_tokens,
                        dz, n, v_lo, v_hi, D, hidden2d.stride(0), weight.stride(0), dz.stride(0))
                grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(v_hi - v_lo, meta["BLOCK_N"]))  # noqa: E731,B023
                kernel[grid](*args, HAS_BIAS=bias is not None, **flags, **config)
                w_chunk, h_chunk = weight[v_lo:v_hi], h_rows
            else:
                z = _logits_torch(h_acc, weight, bias, v_lo, v_hi)
                local = targets - v_lo
                inside = (local >= 0) & (local < v_hi - v_lo)
                onehot = torch.zeros_like(z).scatter_(1, torch.where(inside, local, 0)[:, None], inside[:, None].to(acc))
                dz = grad_tokens[:, None].to(acc) * (onehot - torch.exp(z - lse[:, None]))
                w_chunk, h_chunk = weight[v_lo:v_hi].to(acc), h_acc
            if need_w:  # complete for this chunk: no cross-chunk accumulation
                if dz.dtype == d_weight.dtype:
                    torch.mm(dz.T, h_chunk, out=d_weight[v_lo:v_hi])  # no temporary
                else:  # the torch path's fp32 product, rounded to the weight dtype
                    d_weight[v_lo:v_hi] = dz.T @ h_chunk
            if need_h:
                _addmm_acc_(d_hidden_rows, dz, w_chunk)
            if need_b:
                d_bias[v_lo:v_hi] = dz.sum(0, dtype=acc)
    d_hidden = None
    if need_h:
        d_hidden = torch.zeros((hidden2d.shape[0], D), device=hidden.device, dtype=dtype)
        d_hidden.index_copy_(0, rows, d_hidden_rows.to(dtype))
        d_hidden = d_hidden.view(hidden.shape)
    return d_hidden, d_weight, d_bias.to(dtype) if need_b else None


# ---------------------------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------------------------


def _sequence_reduce(token_logps, count, reduction):
    total = token_logps.sum(-1)
    logp = total / count.clamp_min(1) if reduction == "mean" else total
    return torch.where(count > 0, logp, float("nan"))  # an empty sequence is never "log p = 0"


class SequenceLikelihoodFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, impl, vocab_chunk):
        rows, targets, lse, token_logps = sequence_logprob_fwd(hidden, weight, bias, labels, ignore_index, impl,
                                                               vocab_chunk)
        count = (labels != ignore_index).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, rows, targets, lse, count)
        ctx.reduction, ctx.impl, ctx.vocab_chunk = reduction, impl, vocab_chunk
        ctx.set_materialize_grads(False)
        return _sequence_reduce(token_logps, count, reduction), token_logps

    @staticmethod
    def backward(ctx, grad_seq, grad_tok):
        with torch.no_grad():
            grads = SequenceLikelihoodFunction._backward(ctx, grad_seq, grad_tok)
        if torch.is_grad_enabled() and any(ctx.needs_input_grad[:3]):
            grads = _refuse_double_backward(grads)
        return (*grads, None, None, None, None, None)

    @staticmethod
    def _backward(ctx, grad_seq, grad_tok):
        hidden, weight, bias, rows, targets, lse, count = ctx.saved_tensors
        acc = lse.dtype
        T = hidden.shape[-2]
        grad_tokens = torch.zeros(rows.numel(), device=rows.device, dtype=acc)
        if grad_seq is not None:
            per_seq = grad_seq.to(acc)
            if ctx.reduction == "mean":
                per_seq = per_seq / count.clamp_min(1)
            # Sequences without tokens have no rows, so their (possibly NaN) gradient is never read.
            grad_tokens += per_seq.reshape(-1).index_select(0, rows // T)
        if grad_tok is not None:
            grad_tokens += grad_tok.reshape(-1).to(acc).index_select(0, rows)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        return sequence_logprob_bwd(hidden, weight, bias, rows, targets, lse, grad_tokens, need, ctx.impl,
                                    ctx.vocab_chunk)


_DOUBLE_BACKWARD = (
    "fused_sequence_likelihood has no second-order gradient: its gradient was taken with create_graph=True "
    "and is now being differentiated, which would silently drop the op's own second-order terms. Use "
    "mppo_kernels.reference.sequence_likelihood_reference where a double backward is needed."
)


def _refuse_double_backward(grads):
    """The gradients, each an alias whose own backward raises: taking them with ``create_graph=True`` works,
    differentiating them fails loudly instead of returning second-order gradients without the op's terms
    (``once_differentiable`` cannot tell, because the incoming gradients of ``out.sum()`` need no grad)."""
    present = [g for g in grads if g is not None]
    delayed = getattr(getattr(torch._C, "_functions", None), "DelayedError", None)
    if delayed is None:  # a torch without the private node: refuse the create_graph backward itself
        raise RuntimeError(_DOUBLE_BACKWARD)
    aliases = delayed(_DOUBLE_BACKWARD.encode(), len(present))(
        *[g.detach().requires_grad_() for g in present])
    aliases = iter(aliases if isinstance(aliases, tuple) else (aliases,))
    return tuple(next(aliases) if g is not None else None for g in grads)


# ---------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------


def fused_sequence_likelihood(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_token_logps: bool = False,
    sequence_mask: torch.Tensor | None = None,
    validate: bool = True,
    vocab_chunk_size: int | None = None,
    impl: str = "auto",
):
    """Log-likelihood of each sequence under the LM head, without building the ``[tokens, V]`` logits.

    Equals, up to fp32 summation order (see ``mppo_kernels.reference``)::

        logits = F.linear(hidden, weight, bias).float()                     # [..., T, V]
        mask = labels != ignore_index                                       # [..., T]
        token_logps = logits.log_softmax(-1).gather(-1, labels.clamp(0)[..., None])[..., 0] * mask
        logp = token_logps.sum(-1) / mask.sum(-1)       # reduction="mean"; "sum" drops the division

    With ``reduction="mean"``, ``logp.exp()`` is MPPO's reward p (geometric-mean token likelihood).

    Args:
        hidden: ``[..., T, D]`` float32 / bfloat16 / float16 last hidden states, e.g. ``[B, K, T, D]``.
        weight: ``[V, D]`` LM-head weight, same dtype as ``hidden``.
        labels: ``[..., T]`` integer targets; ``labels[..., t]`` is the token predicted from
            ``hidden[..., t]`` (already shifted). ``ignore_index`` marks prompt and padding positions.
        bias: ``[V]`` or None.
        reduction: ``"mean"`` (length-normalized: MPPO, SimPO, ORPO) or ``"sum"`` (DPO, KTO, MMPO).
        return_token_logps: also return the ``[..., T]`` per-token log-probs (0 at ignored positions);
            gradients flow through both outputs.
        sequence_mask: ``[...]`` bool, False marks padding sequences (e.g. ragged groups padded to K).
            Such sequences may have no target tokens; they come out as NaN, and losses given the same mask
            ignore them. A real sequence without target tokens raises (its log-likelihood is undefined,
            not 0). Without validation, every empty sequence comes out as NaN.
        validate: check shapes, dtypes, devices, label range and empty sequences, naming the offending
            argument and index. Costs one host sync; the op itself syncs once more to count the target
            tokens it compacts (ignored positions cost no FLOPs). With ``validate=False``, an
            out-of-range label gives NaN for its sequence rather than reading outside the weight.
        vocab_chunk_size: vocabulary columns whose logit gradient the backward holds at once
            (memory ``n_tokens x chunk`` in the input dtype; default 4096).
        impl: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked, any device,
            fp32 math; the CPU path) or ``"auto"`` (Triton on CUDA, else torch).

    Returns:
        ``[...]`` float32 per-sequence log-likelihood (float64 for float64 inputs), and the ``[..., T]``
        per-token log-probs when ``return_token_logps``. Gradients come back in the input dtype, with the
        log-sum-exp, the dot products and the weight-gradient accumulation in fp32. The weight gradient is
        skipped when ``weight.requires_grad`` is False (frozen head, LoRA); under ``torch.no_grad`` (e.g. a
        reference model) nothing is kept for backward.

    Under autocast, hidden, weight and bias are cast to the autocast dtype first, as ``F.linear`` would.

    Example::

        out = model.model(input_ids, attention_mask=mask)                  # decoder only, no logits
        logp = fused_sequence_likelihood(out.last_hidden_state[:, :-1], model.lm_head.weight,
                                         input_ids[:, 1:].masked_fill(~target_mask, -100))
    """
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = bias.to(dt) if isinstance(bias, torch.Tensor) else bias
    if validate:
        check_sequence_likelihood_inputs(hidden, weight, labels, bias, ignore_index, reduction, sequence_mask)
    elif reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be one of ('mean', 'sum'), got {reduction!r}")
    vocab_chunk = DEFAULT_VOCAB_CHUNK if vocab_chunk_size is None else int(vocab_chunk_size)
    if vocab_chunk <= 0:
        raise ValueError(f"vocab_chunk_size must be positive, got {vocab_chunk_size}")
    impl = _resolve_impl(impl, hidden.device, hidden.dtype)

    tensors = (hidden, weight) + ((bias,) if bias is not None else ())
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            logp, token_logps = SequenceLikelihoodFunction.apply(hidden, weight, bias, labels, ignore_index,
                                                                 reduction, impl, vocab_chunk)
        else:
            *_, token_logps = sequence_logprob_fwd(hidden, weight, bias, labels, ignore_index, impl, vocab_chunk)
            logp = _sequence_reduce(token_logps, (labels != ignore_index).sum(-1), reduction)
    return (logp, token_logps) if return_token_logps else logp
