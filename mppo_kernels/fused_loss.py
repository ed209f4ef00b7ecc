"""Hidden states to preference loss in one call: the fused sequence-likelihood op, then a loss by name.

Glue only: the op (``mppo_kernels.sequence_likelihood``) gives every response's log-likelihood with the
reduction the loss declares, and ``mppo_kernels.losses`` holds the loss math and the metrics. Padded
(``fused_preference_loss``, ``[B, K, T, D]`` hidden states) and packed (``fused_packed_preference_loss``,
hidden rows shared by the responses of a prompt) batches give the same loss.
"""

from __future__ import annotations

import torch
from torch import nn

from mppo_kernels.checks import check_loss_inputs
from mppo_kernels.losses import preference_loss_and_metrics, resolve_hparams
from mppo_kernels.sequence_likelihood import fused_packed_likelihood, fused_sequence_likelihood

__all__ = ["fused_preference_loss", "fused_packed_preference_loss", "FusedPreferenceLoss"]


def fused_preference_loss(
    name: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    validate: bool = True,
    impl: str = "auto",
    vocab_chunk_size: int | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    logits_budget: int | None = None,
    **hparams,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Preference loss ``name`` of B prompts x K responses from last hidden states, without full logits.

    Equals, with ``spec = LOSSES[name]``::

        logps = fused_sequence_likelihood(hidden, weight, labels, bias=bias, reduction=spec.reduction,
                                          sequence_mask=response_mask)              # [B, K]
        loss = preference_loss(name, logps, scores, ref_logps=ref_logps, response_mask=response_mask,
                               **hparams)

    Args:
        name: a key of ``mppo_kernels.losses.LOSSES`` (14 losses; README has the table).
        hidden: ``[B, K, T, D]`` last hidden states (fp32 / bf16 / fp16).
        weight: ``[V, D]`` LM-head weight, dtype of ``hidden``; ``bias`` ``[V]`` or None.
        labels: ``[B, K, T]`` next-token targets, ``ignore_index`` at prompt and padding positions.
        scores: ``[B, K]`` response scores, higher is better.
        ref_logps: ``[B, K]`` reference-model log-likelihoods with ``LOSSES[name].reduction`` (sum for DPO,
            KTO, MMPO, Multi-DPO, which require it); ignored by losses that need no reference.
        response_mask: ``[B, K]`` bool, False at padding responses of ragged groups (they may have no
            target tokens; their NaN log-likelihoods never reach the loss or the gradients).
        validate: input checks of the op and of the loss (two host syncs); ``False`` skips both.
        impl, vocab_chunk_size, logit_scale, softcap, logits_budget: passed to ``fused_sequence_likelihood``.
        **hparams: the loss's hyperparameters (``LOSSES[name].defaults``).

    Returns:
        ``(loss, metrics)``: the 0-dim fp32 loss, and a dict of detached 0-dim fp32 tensors
        (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
        ``logps/chosen``, ``logps/rejected``, ``mean_p``, ``reward_top_accuracy``, and loss-specific
        extras; see ``mppo_kernels.losses.preference_metrics``).

    Example::

        hidden = model.model(ids.flatten(0, 1), attention_mask=am.flatten(0, 1)).last_hidden_state
        loss, metrics = fused_preference_loss("pair_mnm", hidden.unflatten(0, (B, K)), model.lm_head.weight,
                                              labels, scores, response_mask=response_mask)
        loss.backward()
    """
    spec, hp = resolve_hparams(name, hparams)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 4:
        raise ValueError(f"hidden must be a [B, K, T, D] tensor, got {_describe(hidden)}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(hidden.shape[:3]):
        raise ValueError(f"labels must be [B, K, T] = {tuple(hidden.shape[:3])}, got {_describe(labels)}")
    # Cheap checks of the loss's inputs before the expensive op runs.
    check_loss_inputs(spec, tuple(hidden.shape[:2]), scores, ref_logps, response_mask)
    logps = fused_sequence_likelihood(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=spec.reduction,
        sequence_mask=response_mask, validate=validate, vocab_chunk_size=vocab_chunk_size, impl=impl,
        logit_scale=logit_scale, softcap=softcap, logits_budget=logits_budget,
    )  # [B, K]
    token_counts = (labels != ignore_index).sum(-1)  # [B, K], for mean p of sum-reduction losses
    return preference_loss_and_metrics(
        name, logps, scores, ref_logps=ref_logps, response_mask=response_mask, token_counts=token_counts,
        validate=validate, **hp,
    )


def fused_packed_preference_loss(
    name: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    seq_ids: torch.Tensor,
    scores: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    validate: bool = True,
    impl: str = "auto",
    vocab_chunk_size: int | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    logits_budget: int | None = None,
    **hparams,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``fused_preference_loss`` on a packed batch: response k of prompt b is sequence ``b·K + k`` of
    ``fused_packed_likelihood`` (``[B, K]`` is the shape of ``scores``).

    Args:
        hidden: ``[..., D]`` hidden rows of the packed decoder pass (e.g. ``[1, L, D]``).
        rows, targets, seq_ids: ``[n]`` per target token: the hidden row it is predicted from, its id, and its
            sequence ``b·K + k`` (a padding response has no tokens; mark it False in ``response_mask``).
        scores, ref_logps, response_mask, and the rest: as in ``fused_preference_loss``.
    """
    spec, hp = resolve_hparams(name, hparams)
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a [B, K] tensor, got {_describe(scores)}")
    shape = tuple(scores.shape)
    check_loss_inputs(spec, shape, scores, ref_logps, response_mask)
    num_seqs = shape[0] * shape[1]
    seq_mask = response_mask.reshape(-1) if response_mask is not None else None
    logps = fused_packed_likelihood(
        hidden, weight, rows, targets, seq_ids, num_seqs, bias=bias, ignore_index=ignore_index,
        reduction=spec.reduction, sequence_mask=seq_mask, validate=validate, vocab_chunk_size=vocab_chunk_size,
        impl=impl, logit_scale=logit_scale, softcap=softcap, logits_budget=logits_budget,
    ).view(shape)  # [B, K]
    token_counts = torch.zeros(num_seqs, device=seq_ids.device, dtype=torch.long).index_add_(
        0, seq_ids.long(), (targets != ignore_index).long()).view(shape)
    return preference_loss_and_metrics(
        name, logps, scores, ref_logps=ref_logps, response_mask=response_mask, token_counts=token_counts,
        validate=validate, **hp,
    )


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


class FusedPreferenceLoss(nn.Module):
    """``fused_preference_loss`` as a module: the loss name, hyperparameters and the head's logit transform
    are fixed at construction.

    Example::

        loss_fn = FusedPreferenceLoss("simpo", beta=2.0, gamma=1.0)
        loss, metrics = loss_fn(hidden, lm_head.weight, labels, scores, response_mask=mask)
    """

    def __init__(self, name: str, ignore_index: int = -100, *, validate: bool = True, impl: str = "auto",
                 vocab_chunk_size: int | None = None, logit_scale: float | None = None, softcap: float | None = None,
                 logits_budget: int | None = None, **hparams):
        super().__init__()
        self.spec, self.hparams = resolve_hparams(name, hparams)  # unknown names fail here, not mid-training
        self.name = name
        self.ignore_index = ignore_index
        self.validate = validate
        self.impl = impl
        self.vocab_chunk_size = vocab_chunk_size
        self.logit_scale, self.softcap, self.logits_budget = logit_scale, softcap, logits_budget

    @property
    def reduction(self) -> str:
        return self.spec.reduction

    @property
    def needs_reference(self) -> bool:
        return self.spec.needs_reference

    def _options(self) -> dict:
        return dict(ignore_index=self.ignore_index, validate=self.validate, impl=self.impl,
                    vocab_chunk_size=self.vocab_chunk_size, logit_scale=self.logit_scale, softcap=self.softcap,
                    logits_budget=self.logits_budget, **self.hparams)

    def forward(self, hidden, weight, labels, scores, *, bias=None, ref_logps=None, response_mask=None):
        """``(loss, metrics)``; shapes as in ``fused_preference_loss``."""
        return fused_preference_loss(self.name, hidden, weight, labels, scores, bias=bias, ref_logps=ref_logps,
                                     response_mask=response_mask, **self._options())

    def forward_packed(self, hidden, weight, rows, targets, seq_ids, scores, *, bias=None, ref_logps=None,
                       response_mask=None):
        """``(loss, metrics)`` of a packed batch; shapes as in ``fused_packed_preference_loss``."""
        return fused_packed_preference_loss(self.name, hidden, weight, rows, targets, seq_ids, scores, bias=bias,
                                            ref_logps=ref_logps, response_mask=response_mask, **self._options())

    def extra_repr(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        head = "".join(f", {k}={v!r}" for k, v in (("logit_scale", self.logit_scale), ("softcap", self.softcap)) if v)
        return f"{self.name!r}, reduction={self.reduction!r}" + head + (f", {hp}" if hp else "")
