"""Triton kernels of the token log-likelihood op, and their launchers.

* forward: one kernel computes (token-block x vocab-split) logit tiles with ``tl.dot`` over D, keeps an
  online max / sum-exp per row and picks out the target logit. Only O(n x splits) floats are written; the
  splits are merged by a tiny torch log-sum-exp. 2·n·D·V FLOPs.
* backward: the loss's per-token weight g_t is only known now, so the logits are recomputed (no ``[n, V]``
  buffer is kept between passes). For each vocab chunk of ``vocab_chunk`` columns one kernel writes the
  logit gradient dZ = g·(onehot(y) − softmax)·transform' for that chunk in the input dtype, and two cuBLAS
  GEMMs consume it: dW[chunk] = dZᵀ·H (complete, written once) and dH += dZ·W[chunk] (fp32 accumulator). No
  atomics, so the result is deterministic. 6·n·D·V FLOPs.

The logit transform is ``z = c·tanh(s·x / c)`` with soft-capping (``softcap = c``) and ``z = s·x`` without,
``x = h·Wᵀ + b``. ``launch_forward`` and ``launch_logit_grad`` are the documented single launches (the
benchmark's stage breakdown times them); ``forward`` and ``backward`` are the host functions of
``mppo_kernels.kernels``.
"""

from __future__ import annotations

import functools
import os

import torch

from mppo_kernels.kernels import DEFAULT_VOCAB_CHUNK, OpSettings

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; the other implementations need none
    triton = None

__all__ = ["available", "forward", "backward", "launch_forward", "launch_logit_grad"]


def available() -> bool:
    return triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------


def gpu_configs():
    # bf16/fp16 tiles in the usual Hopper/Ampere GEMM range; fp32 configs that overflow shared memory are
    # pruned by the autotuner (OutOfResources).
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4), (64, 64, 32, 4, 3)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


# Small tiles under the interpreter so that odd test shapes cross several tiles and splits.
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}
# Below this many logits (n x V) a fixed config is used: autotuning (compiling and timing every config
# for each new shape) costs far more than it could win on a problem this small.
AUTOTUNE_MIN_LOGITS = 1 << 24
SMALL_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
MAX_SPLITS = 32


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _tanh(x):
        # From exp(-2|x|) <= 1, which cannot overflow: exact at saturation, absolute error ~fp32 eps near 0.
        # (libdevice's tanh has no one import path across triton 3.2 - 3.9, nor an interpreter version.)
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def _logits_tile(
        p_h, p_w, p_b,                      # hidden [N, D], weight [V, D], bias [V]
        rows, m_rows, o_v, m_v,             # row ids into hidden [BLOCK_M], vocab ids [BLOCK_N] and masks
        D, stride_h, stride_w, pre,         # pre: s, or s / c with soft-capping
        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """``u = pre·(h·Wᵀ + b)`` of one tile, fp32; the caller applies ``c·tanh(u)`` when soft-capping."""
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
        return b_z * pre

    @triton.jit
    def sequence_logprob_fwd_kernel(
        p_h, p_w, p_b, p_rows, p_y,         # hidden [N, D], weight [V, D], bias [V], rows [n], targets [n]
        p_m, p_s, p_tgt,                    # out: split max [S, n], split sum-exp [S, n], target logit [n]
        p_zs,                               # out (KEEP): logits of rows < n_keep [n_keep, V], input dtype
        n, V, D, n_keep,
        stride_h, stride_w, stride_zs,
        pre, softcap,                       # logit transform: z = softcap·tanh(u) or u, u = pre·(h·Wᵀ + b)
        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, KEEP: tl.constexpr, DOT_F32: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        i_m = tl.program_id(0)
        i_s = tl.program_id(1)
        o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = o_m < n
        rows = tl.load(p_rows + o_m, mask=m_m, other=0)
        b_y = tl.load(p_y + o_m, mask=m_m, other=-1)
        # Splitting the vocabulary gives the GPU enough programs, and whole waves of them (vocab_splits).
        v_per_split = tl.cdiv(tl.cdiv(V, tl.num_programs(1)), BLOCK_N) * BLOCK_N
        v_lo = i_s * v_per_split
        v_hi = tl.minimum(v_lo + v_per_split, V)
        b_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        b_sum = tl.zeros((BLOCK_M,), tl.float32)
        for v0 in range(v_lo, v_hi, BLOCK_N):
            o_v = v0 + tl.arange(0, BLOCK_N)
            m_v = o_v < v_hi
            b_z = _logits_tile(p_h, p_w, p_b, rows, m_m, o_v, m_v, D, stride_h, stride_w, pre,
                               HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, PRECISION)
            if SOFTCAP:
                b_z = softcap * _tanh(b_z)
            if KEEP:  # the backward reads these instead of recomputing them
                p_out = p_zs + o_m.to(tl.int64)[:, None] * stride_zs + o_v[None, :]
                tl.store(p_out, b_z.to(p_zs.dtype.element_ty), mask=(m_m & (o_m < n_keep))[:, None] & m_v[None, :])
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
        p_dz,                               # out: gradient w.r.t. x = h·Wᵀ + b of the chunk [n, v_hi - v_lo]
        n, v_lo, v_hi, D,
        stride_h, stride_w, stride_dz,
        pre, softcap, scale,                # transform as in the forward; scale = s = dz/dx without soft-capping
        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
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
        b_z = _logits_tile(p_h, p_w, p_b, rows, m_m, o_v, m_v, D, stride_h, stride_w, pre,
                           HAS_BIAS, SOFTCAP, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, PRECISION)
        if SOFTCAP:
            b_t = _tanh(b_z)
            b_z = softcap * b_t
        b_p = tl.exp(b_z - b_lse[:, None])
        b_dz = b_g[:, None] * (tl.where(o_v[None, :] == b_y[:, None], 1.0, 0.0) - b_p) * scale
        if SOFTCAP:  # d/dx c·tanh(s·x / c) = s·(1 − tanh²)
            b_dz = b_dz * (1.0 - b_t * b_t)
        p_out = p_dz + o_m.to(tl.int64)[:, None] * stride_dz + (o_v - v_lo)[None, :]
        tl.store(p_out, b_dz.to(p_dz.dtype.element_ty), mask=m_m[:, None] & m_v[None, :])

    @triton.jit
    def saved_logit_grad_kernel(
        p_zs, p_y, p_lse, p_g,              # kept logits [n_keep, V], targets, log-sum-exp, dL/d(token log-prob)
        p_dz,                               # out: as the backward kernel's, for rows < n_keep
        n_keep, v_lo, v_hi,
        stride_zs, stride_dz,
        softcap, scale,
        SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        i_m = tl.program_id(0)
        i_v = tl.program_id(1)
        o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = o_m < n_keep
        o_v = v_lo + i_v * BLOCK_N + tl.arange(0, BLOCK_N)
        m_v = o_v < v_hi
        m = m_m[:, None] & m_v[None, :]
        b_y = tl.load(p_y + o_m, mask=m_m, other=-1)
        b_lse = tl.load(p_lse + o_m, mask=m_m, other=0.0)
        b_g = tl.load(p_g + o_m, mask=m_m, other=0.0)
        b_z = tl.load(p_zs + o_m.to(tl.int64)[:, None] * stride_zs + o_v[None, :], mask=m, other=0.0).to(tl.float32)
        b_dz = b_g[:, None] * (tl.where(o_v[None, :] == b_y[:, None], 1.0, 0.0) - tl.exp(b_z - b_lse[:, None])) * scale
        if SOFTCAP:  # z = c·t, so 1 − t² = 1 − (z / c)²
            b_t = b_z / softcap
            b_dz = b_dz * (1.0 - b_t * b_t)
        p_out = p_dz + o_m.to(tl.int64)[:, None] * stride_dz + (o_v - v_lo)[None, :]
        tl.store(p_out, b_dz.to(p_dz.dtype.element_ty), mask=m)

    _fwd_tuned = triton.autotune(configs=gpu_configs(), key=["D", "V", "HAS_BIAS", "SOFTCAP", "PRECISION"])(
        sequence_logprob_fwd_kernel
    )
    # The chunk bounds change every launch; tune on the problem shape only.
    _bwd_tuned = triton.autotune(configs=gpu_configs(), key=["D", "HAS_BIAS", "SOFTCAP", "PRECISION"])(
        sequence_logprob_bwd_kernel
    )


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _flags(hidden2d: torch.Tensor, settings: OpSettings) -> dict:
    """Constexpr flags and scalars shared by both kernels."""
    interp = interpreting()
    precision = "ieee"
    if hidden2d.dtype == torch.float32 and not interp and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"  # follow torch's own matmul setting, so ours and the baselines agree
    return {"DOT_F32": interp, "PRECISION": precision, "SOFTCAP": bool(settings.softcap),
            "pre": settings.pre, "softcap": settings.softcap or 1.0}


def vocab_splits(m_blocks: int, V: int, block_n: int, sms: int) -> int:
    """Vocabulary splits of the forward grid ``(m_blocks, splits)``: the count that fills the last wave of
    programs best (fewest splits among near-ties), each split at least two vocabulary tiles long.

    A partly empty last wave is what costs: 24 token blocks x 6 splits on 132 SMs is 1.09 waves and runs
    at ~55 % of the rate of 24 x 11 = 264 programs (exactly 2 waves).
    """
    cap = max(1, min(MAX_SPLITS, triton.cdiv(V, 2 * block_n)))
    fill = [m_blocks * s / (triton.cdiv(m_blocks * s, sms) * sms) for s in range(1, cap + 1)]
    best = max(fill)
    return next(s for s, f in enumerate(fill, 1) if f >= 0.98 * best)


def _kernel(plain, tuned, n: int, V: int):
    """``(kernel, launch kwargs)``: the autotuned kernel for LM-head sized problems, else a fixed config."""
    if interpreting():
        return plain, INTERPRETER_BLOCKS
    if n * V < AUTOTUNE_MIN_LOGITS:
        return plain, SMALL_CONFIG
    return tuned, {}


def forward_grid(n: int, V: int, config: dict, sms: int | None):
    """``(n_splits, grid)`` of the forward. The split count is fixed before the launch, whatever config
    the autotuner tries: every config then writes every row of the split buffers, so no row can keep a
    partial sum from a config tried before the chosen one (the merge would count it twice). It is chosen
    for the large tiles LM heads tune to; smaller tiles only make more, shorter programs."""
    if sms is None:  # the interpreter: a few splits, so that tests cross split boundaries
        n_splits = max(1, min(3, triton.cdiv(V, config["BLOCK_N"])))
    else:
        n_splits = vocab_splits(triton.cdiv(n, config.get("BLOCK_M", 128)), V, config.get("BLOCK_N", 256), sms)
    return n_splits, lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), n_splits)


def launch_forward(hidden2d, weight, bias, rows, targets, settings: OpSettings, saved=None):
    """One launch of the forward kernel: ``(split_max [S, n], split_sum [S, n], target_logit [n])`` fp32,
    unmerged (``forward`` merges the S vocabulary splits). ``saved [cap, V]`` (input dtype): also write the
    logits of the first ``min(n, cap)`` rows there, for the backward."""
    n, (V, D) = rows.numel(), weight.shape
    kernel, config = _kernel(sequence_logprob_fwd_kernel, _fwd_tuned, n, V)
    n_splits, grid = forward_grid(n, V, config, None if interpreting() else _num_sms(hidden2d.device.index or 0))
    split_max = torch.empty((n_splits, n), device=hidden2d.device, dtype=torch.float32)
    split_sum = torch.empty((n_splits, n), device=hidden2d.device, dtype=torch.float32)
    # NaN stays for a target that is out of range when validation is off: never a silent number.
    target_logit = torch.full((n,), float("nan"), device=hidden2d.device, dtype=torch.float32)
    keep = saved is not None and saved.shape[0] > 0
    kernel[grid](
        p_h=hidden2d, p_w=weight, p_b=bias if bias is not None else weight, p_rows=rows, p_y=targets,
        p_m=split_max, p_s=split_sum, p_tgt=target_logit, p_zs=saved if keep else split_max,
        n=n, V=V, D=D, n_keep=min(n, saved.shape[0]) if keep else 0,
        stride_h=hidden2d.stride(0), stride_w=weight.stride(0), stride_zs=saved.stride(0) if keep else 0,
        HAS_BIAS=bias is not None, KEEP=keep, **_flags(hidden2d, settings), **config,
    )
    return split_max, split_sum, target_logit


def forward(hidden2d, weight, bias, rows, targets, settings: OpSettings, saved=None):
    split_max, split_sum, target_logit = launch_forward(hidden2d, weight, bias, rows, targets, settings, saved)
    top = split_max.max(0).values
    lse = top + (split_sum * torch.exp(split_max - top)).sum(0).log()
    return lse, target_logit


def launch_logit_grad(dz, hidden2d, weight, bias, rows, targets, lse, grad, v_lo: int, settings: OpSettings):
    """One launch of the backward kernel: writes ``dz [n, v_hi - v_lo]`` (any float dtype), the gradient of
    the loss w.r.t. ``x = h·Wᵀ + b`` for vocabulary columns ``[v_lo, v_lo + dz.shape[1])``."""
    n, (V, D) = rows.numel(), weight.shape
    v_hi = v_lo + dz.shape[1]
    kernel, config = _kernel(sequence_logprob_bwd_kernel, _bwd_tuned, n, V)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(v_hi - v_lo, meta["BLOCK_N"]))  # noqa: E731
    kernel[grid](
        p_h=hidden2d, p_w=weight, p_b=bias if bias is not None else weight, p_rows=rows, p_y=targets,
        p_lse=lse, p_g=grad, p_dz=dz, n=n, v_lo=v_lo, v_hi=v_hi, D=D,
        stride_h=hidden2d.stride(0), stride_w=weight.stride(0), stride_dz=dz.stride(0),
        scale=settings.logit_scale, HAS_BIAS=bias is not None, **_flags(hidden2d, settings), **config,
    )


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


def addmm_acc_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
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


def backward_chunk(n: int, V: int) -> int:
    """Vocabulary columns per backward chunk when the caller leaves it open: 4096, or as many as keep the
    chunk's logit gradient at 2^24 entries (32 MiB in bf16) when few rows are scored, so a small problem
    still launches enough programs and its GEMMs have a long inner dimension (600 rows: 28k columns)."""
    wide = -(-(1 << 24) // max(n, 1) // 256) * 256
    return min(V, max(DEFAULT_VOCAB_CHUNK, wide))


def launch_saved_logit_grad(dz, saved, targets, lse, grad, v_lo: int, settings: OpSettings):
    """Like ``launch_logit_grad`` for the rows whose logits the forward kept (``saved [n_keep, V]``): no GEMM."""
    n_keep = dz.shape[0]
    v_hi = v_lo + dz.shape[1]
    blocks = INTERPRETER_BLOCKS if interpreting() else {"BLOCK_M": 64, "BLOCK_N": 128}
    grid = (triton.cdiv(n_keep, blocks["BLOCK_M"]), triton.cdiv(v_hi - v_lo, blocks["BLOCK_N"]))
    saved_logit_grad_kernel[grid](
        p_zs=saved, p_y=targets, p_lse=lse, p_g=grad, p_dz=dz, n_keep=n_keep, v_lo=v_lo, v_hi=v_hi,
        stride_zs=saved.stride(0), stride_dz=dz.stride(0), softcap=settings.softcap or 1.0,
        scale=settings.logit_scale, SOFTCAP=bool(settings.softcap), BLOCK_M=blocks["BLOCK_M"],
        BLOCK_N=blocks["BLOCK_N"])


def backward(hidden2d, weight, bias, rows, targets, lse, grad, need, settings: OpSettings, *, all_rows=False,
             saved=None):
    """``all_rows``: ``rows`` is ``arange(N)`` (every position scored), so the hidden states are the dW GEMM's
    operand as they are, without an ``[n, D]`` copy of the scored rows. ``saved``: the logits the forward
    kept for its first rows (``launch_forward``), which are then not recomputed."""
    need_h, need_w, need_b = need
    n, (V, D) = rows.numel(), weight.shape
    # dZ goes to cuBLAS in the input dtype, which is what torch's own backward of a bf16 linear layer does
    # with its logit gradient.
    h_rows = (hidden2d if all_rows else hidden2d.index_select(0, rows)) if need_w else None
    d_weight = torch.empty_like(weight) if need_w else None
    d_bias = torch.zeros(V, device=weight.device, dtype=torch.float32) if need_b else None
    d_rows = torch.zeros((n, D), device=hidden2d.device, dtype=torch.float32) if need_h else None
    chunk = settings.vocab_chunk or backward_chunk(n, V)
    dz_buf = torch.empty((n, min(chunk, V)), device=hidden2d.device, dtype=hidden2d.dtype)
    k = min(n, saved.shape[0]) if saved is not None else 0
    for v_lo in range(0, V, chunk):
        v_hi = min(v_lo + chunk, V)
        dz = dz_buf[:, : v_hi - v_lo]
        if k:
            launch_saved_logit_grad(dz[:k], saved, targets[:k], lse[:k], grad[:k], v_lo, settings)
        if k < n:
            launch_logit_grad(dz[k:], hidden2d, weight, bias, rows[k:], targets[k:], lse[k:], grad[k:], v_lo, settings)
        if need_w:  # complete for this chunk: no cross-chunk accumulation
            torch.mm(dz.T, h_rows, out=d_weight[v_lo:v_hi])
        if need_h:
            addmm_acc_(d_rows, dz, weight[v_lo:v_hi])
        if need_b:
            d_bias[v_lo:v_hi] = dz.sum(0, dtype=torch.float32)
    return d_rows, d_weight, d_bias
