"""Plain-torch twins of the package's ops: the oracle for tests and the naive baseline for benchmarks.

These materialize the full ``[tokens, V]`` logits in fp32, exactly as naive training code does, so they
are the semantics the fused kernels must reproduce and the memory they must avoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mppo_kernels.checks import accumulation_dtype, check_sequence_likelihood_inputs

__all__ = ["sequence_likelihood_reference"]


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
):
    """Per-sequence log-likelihood through full logits; same contract as ``fused_sequence_likelihood``.

    Args:
        hidden: ``[..., T, D]`` last hidden states.
        weight: ``[V, D]`` LM-head weight.
        labels: ``[..., T]`` integer targets; ``labels[..., t]`` is predicted from ``hidden[..., t]``.

    Returns:
        ``[...]`` float32 (float64 for float64 inputs) log-likelihood, and the ``[..., T]`` per-token
        log-probs (0 at ignored positions) when ``return_token_logps``. Sequences without target tokens
        are NaN (they raise when ``validate`` unless ``sequence_mask`` marks them as padding).

    The matmul runs in the input dtype and the log-softmax in fp32, like naive training code::

        logits = F.linear(hidden, weight, bias).float()
        token_logps = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0] * (labels != ignore_index)
        logp = token_logps.sum(-1) / (labels != ignore_index).sum(-1)   # reduction="mean"
    """
    if validate:
        check_sequence_likelihood_inputs(hidden, weight, labels, bias, ignore_index, reduction, sequence_mask)
    logits = F.linear(hidden, weight, bias).to(accumulation_dtype(hidden.dtype))  # [..., T, V]
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < weight.shape[0])
    safe = torch.where(valid & in_range, labels, 0).long()
    token_logps = logits.log_softmax(-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    # An out-of-range label (possible only without validation) is NaN, as in the fused op: never a number.
    token_logps = torch.where(valid, torch.where(in_range, token_logps, float("nan")), 0.0)  # [..., T]
    count = valid.sum(-1)
    logp = token_logps.sum(-1)
    if reduction == "mean":
        logp = logp / count.clamp_min(1)
    logp = torch.where(count > 0, logp, float("nan"))  # an empty sequence is never "log p = 0"
    return (logp, token_logps) if return_token_logps else logp
