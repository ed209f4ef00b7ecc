"""Per-sequence log-likelihood of every response, from last hidden states and the LM head, without logits.

Layout (top to bottom): choosing an implementation, the two ``torch.library`` custom ops (forward and
backward: schemas, CPU and CUDA kernels, fake kernels, autograd), and the functional API, padded
(``fused_sequence_likelihood``, ``[..., T]`` labels) and packed (``fused_packed_likelihood``, an explicit
hidden row and sequence id per target token). The kernels live in ``mppo_kernels.kernels``: Triton
(CUDA), native C++ (CPU, ``csrc/``) and chunked torch (the fallback), one module each.

The ops see only shapes: their outputs and saved tensors are ``[M]`` per target position whatever the
data, and the compaction to the ``n <= M`` scored positions (ignored positions cost no FLOPs) happens
inside them. So ``torch.compile(fullgraph=True)`` traces through the functional API with
``validate=False`` (validation reads values on the host, which a compiled graph cannot do). The CUDA
kernel is an opaque custom op rather than a traced ``triton_op``: the backward sizes its cuBLAS GEMMs by
the number of scored positions, a host value that a traced graph would turn into a data-dependent shape.
"""

from __future__ import annotations

from typing import Optional

import torch

from mppo_kernels.checks import (
    accumulation_dtype,
    check_logit_transform,
    check_packed_likelihood_inputs,
    check_sequence_likelihood_inputs,
)
from mppo_kernels.kernels import DEFAULT_VOCAB_CHUNK, OpSettings, native, torch_likelihood, triton_likelihood

__all__ = ["fused_sequence_likelihood", "fused_packed_likelihood", "available_impls", "DEFAULT_VOCAB_CHUNK"]

_IMPLS = {"triton": triton_likelihood, "native": native, "torch": torch_likelihood}


# ---------------------------------------------------------------------------------------------------------
# Choosing an implementation
# ---------------------------------------------------------------------------------------------------------


def available_impls(device: str = "cpu") -> list[str]:
    """The ``impl`` values that run on ``device`` here (``"triton"`` on CPU only under ``TRITON_INTERPRET=1``)."""
    dev = torch.device(device)
    out = ["triton"] if triton_likelihood.available() and (dev.type == "cuda" or triton_likelihood.interpreting()) else []
    return out + (["native"] if dev.type == "cpu" and native.available() else []) + ["torch"]


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    if impl not in ("auto", "triton", "native", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton', 'native' or 'torch', got {impl!r}")
    has_triton = triton_likelihood.available()
    triton_ok = has_triton and (device.type == "cuda" or triton_likelihood.interpreting()) and dtype != torch.float64
    if impl == "triton" and not triton_ok:
        raise ValueError(
            f"impl='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1), and no float64; got "
            f"{dtype} on {device}{'' if has_triton else ' without triton installed'}")
    if impl == "native" and not (device.type == "cpu" and native.available()):
        raise ValueError(f"impl='native' needs a CPU tensor and the built extension; got {device}"
                         + ("" if native.available() else f" ({native.load_error()})"))
    if impl != "auto":
        return impl
    if device.type == "cuda":  # the interpreter is for testing the kernels, never a default
        return "triton" if triton_ok else "torch"
    if device.type == "cpu":
        if native.available():
            return "native"
        native.warn_fallback()
    return "torch"


# ---------------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------------


def _compact(targets: torch.Tensor, rows: Optional[torch.Tensor], ignore_index: int):
    """``(keep, rows, targets)`` of the scored positions: their indices into ``targets``, the hidden row and
    the int64 target of each. One host sync (the count)."""
    keep = (targets != ignore_index).nonzero().squeeze(1)
    hidden_rows = keep if rows is None else rows.index_select(0, keep).long()
    return keep, hidden_rows, targets.index_select(0, keep).long()


def _settings(logit_scale: float, softcap: float, vocab_chunk: int) -> OpSettings:
    return OpSettings(logit_scale=logit_scale, softcap=softcap, vocab_chunk=vocab_chunk)


def _kept_rows(positions: int, V: int, dtype: torch.dtype, logits_budget: int, impl: str) -> int:
    """Rows whose logits the forward keeps for the backward: as many as ``logits_budget`` bytes hold in the
    input dtype, at most one per position (a shape from the input shapes, not from the data). The native
    CPU kernels always recompute."""
    if logits_budget <= 0 or impl == "native":
        return 0
    return min(positions, logits_budget // (V * torch.empty((), dtype=dtype).element_size()))


def _forward(hidden, weight, bias, targets, rows, ignore_index, settings, impl, logits_budget):
    acc = accumulation_dtype(hidden.dtype)
    M, V = targets.shape[0], weight.shape[0]
    keep, hidden_rows, tgt = _compact(targets, rows, ignore_index)
    token = torch.zeros(M, device=hidden.device, dtype=acc)
    lse = torch.zeros(M, device=hidden.device, dtype=acc)
    saved = torch.empty((_kept_rows(M, V, hidden.dtype, logits_budget, impl), V), device=hidden.device,
                        dtype=hidden.dtype)
    if keep.numel():
        kw = {"saved": saved} if saved.shape[0] else {}
        l, t = _IMPLS[impl].forward(hidden, weight, bias, hidden_rows, tgt, settings, **kw)
        token.index_copy_(0, keep, t - l)  # unique positions: deterministic, unlike index_add_
        lse.index_copy_(0, keep, l)
    return token, lse, saved


def _backward_grads(grad, hidden, weight, bias, targets, rows, lse, saved, ignore_index, settings, impl, need_hidden,
                    need_weight, need_bias):
    keep, hidden_rows, tgt = _compact(targets, rows, ignore_index)
    need = (need_hidden, need_weight, need_bias and bias is not None)
    d_rows, d_weight, d_bias = None, None, None
    if keep.numel() and any(need):
        acc = accumulation_dtype(hidden.dtype)
        g, l = grad.to(acc).index_select(0, keep), lse.index_select(0, keep)
        kw = {"saved": saved} if saved.shape[0] else {}
        d_rows, d_weight, d_bias = _IMPLS[impl].backward(
            hidden, weight, bias, hidden_rows, tgt, l, g, need, settings,
            all_rows=rows is None and keep.numel() == hidden.shape[0], **kw)
    d_hidden = hidden.new_empty(0)  # each unneeded gradient its own empty tensor: outputs may not alias
    if need_hidden:
        if d_rows is None:
            d_hidden = torch.zeros_like(hidden)
        elif rows is None:  # one target per row: a copy
            d_hidden = torch.zeros_like(hidden).index_copy_(0, hidden_rows, d_rows.to(hidden.dtype))
        else:  # rows repeat (a prompt row shared by K responses): summed in fp32, then rounded
            d_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=d_rows.dtype).index_add_(
                0, hidden_rows, d_rows).to(hidden.dtype)
    if need_weight:
        d_weight = torch.zeros_like(weight) if d_weight is None else d_weight
    if need_bias and bias is not None:
        d_bias = torch.zeros_like(bias) if d_bias is None else d_bias.to(bias.dtype)
    return (d_hidden, d_weight if need_weight else hidden.new_empty(0),
            d_bias if need_bias and bias is not None else hidden.new_empty(0))


@torch.library.custom_op("mppo_kernels::token_logprobs", mutates_args=(), device_types=("cpu", "cuda"))
def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   rows: Optional[torch.Tensor], ignore_index: int, logit_scale: float, softcap: float,
                   vocab_chunk: int, impl: str, logits_budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(token_logp [M], lse [M], kept [R, V])`` of ``targets [M]`` under the head, fp32 (fp64 for fp64 inputs);
    ``kept`` holds the logits of the first R scored positions for the backward (R from ``logits_budget`` bytes,
    ``_kept_rows``; 0 by default).

    ``hidden [N, D]`` (last dim contiguous), ``weight [V, D]``, ``bias [V]`` or None; ``rows [M]`` is the hidden
    row each target is predicted from (None: ``M == N`` and target i is predicted from row i). Positions with
    ``targets == ignore_index`` give 0 and cost nothing; an out-of-range target gives NaN.
    """
    with torch.no_grad():  # the op's autograd is its own (register_autograd below)
        return _forward(hidden, weight, bias, targets, rows, ignore_index, _settings(logit_scale, softcap, vocab_chunk),
                        impl, logits_budget)


@token_logprobs.register_fake
def _(hidden, weight, bias, targets, rows, ignore_index, logit_scale, softcap, vocab_chunk, impl, logits_budget):
    acc = accumulation_dtype(hidden.dtype)
    M, V = targets.shape[0], weight.shape[0]
    return (targets.new_empty(targets.shape, dtype=acc), targets.new_empty(targets.shape, dtype=acc),
            hidden.new_empty((_kept_rows(M, V, hidden.dtype, logits_budget, impl), V)))


@torch.library.custom_op("mppo_kernels::token_logprobs_backward", mutates_args=(), device_types=("cpu", "cuda"))
def token_logprobs_backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor], targets: torch.Tensor, rows: Optional[torch.Tensor],
                            lse: torch.Tensor, kept: torch.Tensor, ignore_index: int, logit_scale: float,
                            softcap: float, vocab_chunk: int, impl: str, need_hidden: bool, need_weight: bool,
                            need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d_hidden [N, D], d_weight [V, D], d_bias [V])`` in the input dtype from ``grad [M]`` = dL/d token_logp;
    a gradient not asked for is an empty ``[0]`` tensor. Sums and the dH accumulation run in fp32."""
    with torch.no_grad():
        return _backward_grads(grad, hidden, weight, bias, targets, rows, lse, kept, ignore_index,
                               _settings(logit_scale, softcap, vocab_chunk), impl, need_hidden, need_weight, need_bias)


@token_logprobs_backward.register_fake
def _(grad, hidden, weight, bias, targets, rows, lse, kept, ignore_index, logit_scale, softcap, vocab_chunk, impl,
      need_hidden, need_weight, need_bias):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape) if need_weight else hidden.new_empty(0),
            bias.new_empty(bias.shape) if need_bias and bias is not None else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, rows, *settings, _budget = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, rows, output[1], output[2])
    ctx.settings = settings  # ignore_index, logit_scale, softcap, vocab_chunk, impl
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_token, _grad_lse, _grad_kept):
    hidden, weight, bias, targets, rows, lse, kept = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    grads = token_logprobs_backward(grad_token, hidden, weight, bias, targets, rows, lse, kept, *ctx.settings,
                                    need[0], need[1], need[2] and bias is not None)
    grads = tuple(g if n else None for g, n in zip(grads, need))
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        grads = _refuse_double_backward(grads)
    return (*grads, None, None, None, None, None, None, None, None)


token_logprobs.register_autograd(_backward, setup_context=_setup_context)

_DOUBLE_BACKWARD = (
    "fused_sequence_likelihood has no second-order gradient: its gradient was taken with create_graph=True "
    "and is now being differentiated, which would silently drop the op's own second-order terms. Use "
    "mppo_kernels.reference.sequence_likelihood_reference where a double backward is needed."
)


def _refuse_double_backward(grads):
    """The gradients, each an alias whose own backward raises: taking them with ``create_graph=True`` works,
    differentiating them fails loudly instead of returning second-order gradients without the op's terms."""
    present = [g for g in grads if g is not None]
    delayed = getattr(getattr(torch._C, "_functions", None), "DelayedError", None)
    if delayed is None:  # a torch without the private node: refuse the create_graph backward itself
        raise RuntimeError(_DOUBLE_BACKWARD)
    if not present:
        return grads
    aliases = delayed(_DOUBLE_BACKWARD.encode(), len(present))(*[g.detach().requires_grad_() for g in present])
    aliases = iter(aliases if isinstance(aliases, tuple) else (aliases,))
    return tuple(next(aliases) if g is not None else None for g in grads)


# ---------------------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------------------


def _prepare(hidden, weight, bias, validate: bool, check, vocab_chunk_size, impl, logit_scale, softcap, logits_budget):
    """Autocast, checks and settings shared by both forms: ``(hidden2d, weight, bias, impl, settings)``."""
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = bias.to(dt) if isinstance(bias, torch.Tensor) else bias
    if validate:
        if torch.compiler.is_compiling():
            raise RuntimeError("validate=True reads the labels on the host, which a compiled graph cannot do: pass "
                               "validate=False inside torch.compile (and validate the batch outside it)")
        check(hidden, weight, bias)
    scale, cap = check_logit_transform(logit_scale, softcap)
    chunk = 0 if vocab_chunk_size is None else int(vocab_chunk_size)  # 0: the backend's choice
    if vocab_chunk_size is not None and chunk <= 0:
        raise ValueError(f"vocab_chunk_size must be positive, got {vocab_chunk_size}")
    budget = 0 if logits_budget is None else logits_budget
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"logits_budget must be None or a number of bytes >= 0, got {logits_budget!r}")
    # Kept logits serve only a backward: none without one.
    if not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                            for t in (hidden, weight, bias))):
        budget = 0
    impl = _resolve_impl(impl, hidden.device, hidden.dtype)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    hidden2d = hidden2d if hidden2d.stride(-1) == 1 else hidden2d.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    return hidden2d, weight, bias, impl, (scale, cap, chunk, impl, budget)


def _token_logps(hidden2d, weight, bias, targets, rows, ignore_index, settings):
    with torch.autocast(hidden2d.device.type, enabled=False):
        return torch.ops.mppo_kernels.token_logprobs(hidden2d, weight, bias, targets, rows, ignore_index, *settings)[0]


def _sequence_reduce(total, count, reduction):
    logp = total / count.clamp_min(1) if reduction == "mean" else total
    return torch.where(count > 0, logp, float("nan"))  # an empty sequence is never "log p = 0"


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
    logit_scale: float | None = None,
    softcap: float | None = None,
    logits_budget: int | None = None,
):
    """Log-likelihood of each sequence under the LM head, without building the ``[tokens, V]`` logits.

    Equals, up to fp32 summation order (see ``mppo_kernels.reference``)::

        logits = F.linear(hidden, weight, bias).float()                     # [..., T, V]
        logits = softcap * tanh(logits * logit_scale / softcap)             # only with logit_scale / softcap
        mask = labels != ignore_index                                       # [..., T]
        token_logps = logits.log_softmax(-1).gather(-1, labels.clamp(0)[..., None])[..., 0] * mask
        logp = token_logps.sum(-1) / mask.sum(-1)       # reduction="mean"; "sum" drops the division

    With ``reduction="mean"``, ``logp.exp()`` is MPPO's reward p (geometric-mean token likelihood).

    Args:
        hidden: ``[..., T, D]`` float32 / bfloat16 / float16 / float64 last hidden states, e.g. ``[B, K, T, D]``.
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
            out-of-range label gives NaN for its sequence rather than reading outside the weight. Inside
            ``torch.compile`` pass ``validate=False``.
        vocab_chunk_size: vocabulary columns whose logit gradient the backward holds at once (Triton and
            torch paths; memory ``n_tokens x chunk`` in the input dtype). Default: 4096, and on the Triton
            path more when few positions are scored (at most 2^24 gradient entries).
        impl: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"native"`` (the C++ CPU kernels,
            tiled over tokens and vocabulary), ``"torch"`` (chunked, any device) or ``"auto"`` (Triton on
            CUDA, native on CPU when built, else torch with one warning).
        logit_scale: multiply the logits by it (Cohere's ``logit_scale``; Granite's ``1 / logits_scaling``).
        softcap: soft-cap the (scaled) logits to ``softcap·tanh(z / softcap)`` (Gemma-2's
            ``final_logit_softcapping``). None (default) for neither: today's plain head.
        logits_budget: bytes the forward may spend keeping logits for the backward (Triton and torch paths):
            the logits of as many scored positions as fit are kept in the input dtype (with the fp32
            log-sum-exp) and not recomputed, 6·n·D·V FLOPs for those instead of 8·n·D·V. None (default): none
            kept, the workspace stays bounded by ``vocab_chunk_size``. Used only when a backward will run.

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
    def check(h, w, b):
        check_sequence_likelihood_inputs(h, w, labels, b, ignore_index, reduction, sequence_mask)

    hidden2d, weight, bias, impl, settings = _prepare(hidden, weight, bias, validate, check, vocab_chunk_size, impl,
                                                      logit_scale, softcap, logits_budget)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be one of ('mean', 'sum'), got {reduction!r}")
    token_logps = _token_logps(hidden2d, weight, bias, labels.reshape(-1), None, ignore_index, settings)
    token_logps = token_logps.view(labels.shape)  # [..., T]
    logp = _sequence_reduce(token_logps.sum(-1), (labels != ignore_index).sum(-1), reduction)
    return (logp, token_logps) if return_token_logps else logp


def fused_packed_likelihood(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_token_logps: bool = False,
    sequence_mask: torch.Tensor | None = None,
    validate: bool = True,
    vocab_chunk_size: int | None = None,
    impl: str = "auto",
    logit_scale: float | None = None,
    softcap: float | None = None,
    logits_budget: int | None = None,
):
    """Per-sequence log-likelihood from packed hidden rows: each target token names the row it is predicted
    from and the sequence it belongs to. For prefix-shared batches, where a prompt's last row predicts the
    first token of each of its K responses, so every response's log-likelihood comes from one pass over the
    prompt. Semantics, reductions, transforms and errors as ``fused_sequence_likelihood``; equals::

        logits = F.linear(hidden.flatten(0, -2)[rows], weight, bias).float()       # [n, V]
        token_logps = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]   # [n]
        logp = zeros(num_seqs).index_add_(0, seq_ids, token_logps) / counts        # reduction="mean"

    Args:
        hidden: ``[..., D]`` hidden rows (e.g. ``[1, L, D]`` of a packed decoder pass), N rows in all.
        rows: ``[n]`` integer index into the N rows of the row each target is predicted from (may repeat).
        targets: ``[n]`` integer token ids (``ignore_index`` to skip one).
        seq_ids: ``[n]`` integer sequence of each target, in ``[0, num_seqs)``.
        num_seqs: number of sequences (a Python int, so the output shape is known without the data).
        sequence_mask: ``[num_seqs]`` bool, False marks padding sequences (may be empty; NaN out).
        Other arguments as in ``fused_sequence_likelihood``.

    Returns:
        ``[num_seqs]`` float32 (float64 for float64 inputs), and the ``[n]`` token log-probs when
        ``return_token_logps``. Gradients flow to every row (summed over the targets that share it).
    """
    def check(h, w, b):
        check_packed_likelihood_inputs(h, w, rows, targets, seq_ids, num_seqs, b, ignore_index, reduction,
                                       sequence_mask)

    hidden2d, weight, bias, impl, settings = _prepare(hidden, weight, bias, validate, check, vocab_chunk_size, impl,
                                                      logit_scale, softcap, logits_budget)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be one of ('mean', 'sum'), got {reduction!r}")
    token_logps = _token_logps(hidden2d, weight, bias, targets, rows, ignore_index, settings)  # [n]
    seq = seq_ids.long()
    total = token_logps.new_zeros(num_seqs).index_add(0, seq, token_logps)
    count = torch.zeros(num_seqs, device=seq.device, dtype=torch.long).index_add(0, seq, (targets != ignore_index).long())
    logp = _sequence_reduce(total, count, reduction)
    return (logp, token_logps) if return_token_logps else logp
