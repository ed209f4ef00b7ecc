"""Plain-torch twins of the package's ops: the oracle for tests and the naive baseline for benchmarks.

These materialize the full ``[tokens, V]`` logits in fp32, exactly as naive training code does, so they
are the semantics the fused kernels must reproduce and the memory they must avoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mppo_kernels.checks import (
    accumulation_dtype,
    check_logit_transform,
    check_packed_likelihood_inputs,
    check_sequence_likelihood_inputs,
)

__all__ = ["sequence_likelihood_reference", "packed_likelihood_reference", "transform_logits"]


def transform_logits(logits: torch.Tensor, logit_scale: float | None = None, softcap: float | None = None):
    """``logits · s``, then ``c · tanh(logits / c)``: the logit scaling (Cohere's ``logit_scale``, Granite's
    ``1 / logits_scaling``) and soft-capping (Gemma-2's ``final_logit_softcapping``) of the models' heads."""
    s, c = check_logit_transform(logit_scale, softcap)
    if s != 1.0:
        logits = logits * s
    return c * torch.tanh(logits / c) if c else logits


def _token_logps(logits, labels, ignore_index, V):
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < V)
    safe = torch.where(valid & in_range, labels, 0).long()
    token_logps = logits.log_softmax(-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    # An out-of-range label (possible only without validation) is NaN, as in the fused op: never a number.
    return torch.where(valid, torch.where(in_range, token_logps, float("nan")), 0.0), valid


def _reduce(total, count, reduction):
    logp = total / count.clamp_min(1) if reduction == "mean" else total
    return torch.where(count > 0, logp, float("nan"))  # an empty sequence is never "log p = 0"


def sequence_likelihood_reference(
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
    logit_scale: float | None = None,
    softcap: float | None = None,
):
    """Per-sequence log-likelihood through full logits; same contract as ``fused_sequence_likelihood``.

    Args:
        hidden: ``[..., T, D]`` last hidden states.
        weight: ``[V, D]`` LM-head weight.
        labels: ``[..., T]`` integer targets; ``labels[..., t]`` is predicted from ``hidden[..., t]``.
        logit_scale, softcap: the head's logit transform (``transform_logits``); None for none.

    Returns:
        ``[...]`` float32 (float64 for float64 inputs) log-likelihood, and the ``[..., T]`` per-token
        log-probs (0 at ignored positions) when ``return_token_logps``. Sequences without target tokens
        are NaN (they raise when ``validate`` unless ``sequence_mask`` marks them as padding).

    The matmul runs in the input dtype and the transform and log-softmax in fp32, like naive training code::

        logits = transform_logits(F.linear(hidden, weight, bias).float(), logit_scale, softcap)
        token_logps = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0] * (labels != ignore_index)
        logp = token_logps.sum(-1) / (labels != ignore_index).sum(-1)   # reduction="mean"
    """
    if validate:
        check_sequence_likelihood_inputs(hidden, weight, labels, bias, ignore_index, reduction, sequence_mask)
    logits = F.linear(hidden, weight, bias).to(accumulation_dtype(hidden.dtype))  # [..., T, V]
    logits = transform_logits(logits, logit_scale, softcap)
    token_logps, valid = _token_logps(logits, labels, ignore_index, weight.shape[0])  # [..., T]
    logp = _reduce(token_logps.sum(-1), valid.sum(-1), reduction)
    return (logp, token_logps) if return_token_logps else logp


def packed_likelihood_reference(
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
    logit_scale: float | None = None,
    softcap: float | None = None,
):
    """The packed form through full logits; same contract as ``fused_packed_likelihood``::

        logits = transform_logits(F.linear(hidden.flatten(0, -2)[rows], weight, bias).float(), ...)   # [n, V]
        token_logps = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]                      # [n]
        logp = zeros(num_seqs).index_add_(0, seq_ids, token_logps) / counts                          # "mean"
    """
    if validate:
        check_packed_likelihood_inputs(hidden, weight, rows, targets, seq_ids, num_seqs, bias, ignore_index,
                                       reduction, sequence_mask)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.long())
    logits = transform_logits(F.linear(h, weight, bias).to(accumulation_dtype(hidden.dtype)), logit_scale, softcap)
    token_logps, valid = _token_logps(logits, targets, ignore_index, weight.shape[0])  # [n]
    total = token_logps.new_zeros(num_seqs).index_add(0, seq_ids.long(), token_logps)
    count = torch.zeros(num_seqs, dtype=torch.long, device=targets.device).index_add(0, seq_ids.long(), valid.long())
    logp = _reduce(total, count, reduction)
    return (logp, token_logps) if return_token_logps else logp
