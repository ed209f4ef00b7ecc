"""Preference losses over K scored responses per prompt, from per-response log-likelihoods ``[B, K]``.

Every loss of MPPO (arXiv 2412.15244) — Point-CE, Point-MSE, Pair-Single, Pair-MNS, Pair-MNM, Pair-MCS,
Pair-MCM, List-MLE — and of its peers DPO, SimPO, ORPO, KTO, MMPO (arXiv 2410.03145) and Multi-DPO
(arXiv 2412.07812), chosen by name::

    logp = fused_sequence_likelihood(hidden, weight, labels, reduction=LOSSES[name].reduction,
                                     sequence_mask=response_mask)                 # [B, K]
    loss = preference_loss(name, logp, scores, ref_logps=ref, response_mask=response_mask)

``mppo_kernels.fused_loss`` does both in one call and adds the logged metrics. Where things are:
``functions`` (each loss, its formula and its declaration), ``registry`` (``LOSSES``, hyperparameter
rules), ``groups`` (the batch with padding made harmless, best / worst / ties), ``metrics``; input and data
checks are in ``mppo_kernels.checks``.

Conventions shared by every loss (``s`` scores, ``logp`` log-likelihoods, all ``[B, K]``):

* Padding. ``response_mask`` marks real responses of ragged groups padded to K. Padded ``logps``,
  ``scores`` and ``ref_logps`` may hold anything, NaN included: they are replaced with ``torch.where``
  before any arithmetic, so they reach neither the loss nor its gradient (their gradient is exactly 0).
* Best and worst. "Best" is the real response with the highest score; among tied best the first (lowest
  index) is taken, and the other tied-best responses are never used as its negatives (an equal-score pair
  carries no preference). "Worst" is the first real response with the lowest score. Losses defined on one
  pair (DPO, SimPO, ORPO, KTO, MMPO) take chosen = best and rejected = worst; with K = 2 that is the
  usual pair. Scores are ranked in their own dtype.
* Ties. A pair of equal scores contributes nothing to any pairwise or list-wise term. A prompt whose real
  responses all have the same score carries no preference: it is left out of every loss except the two
  point-wise ones, and the loss is the mean over the prompts that remain. If no prompt of the batch
  carries a preference the loss is 0 — still a graph on ``logps``, whose gradient is 0 — never NaN.
* Reduction over prompts: the mean over counted prompts of each prompt's loss.

Input errors (shapes, dtypes, a missing reference, an unknown name or hyperparameter) always raise. Data
errors (non-finite values at real responses, positive log-likelihoods, too few real responses, Point-CE
scores out of range) are checked with one host synchronization, skipped with ``validate=False``;
nothing else in this package synchronizes with the device.
"""

from __future__ import annotations

import torch

from mppo_kernels.checks import check_loss_data, check_loss_inputs
from mppo_kernels.losses.functions import log1mexp  # noqa: F401  (registers every loss)
from mppo_kernels.losses.groups import Groups, make_groups
from mppo_kernels.losses.metrics import loss_metrics
from mppo_kernels.losses.registry import LOSSES, LossSpec, resolve_hparams

__all__ = [
    "LOSSES",
    "LossSpec",
    "Groups",
    "log1mexp",
    "preference_loss",
    "preference_metrics",
    "preference_loss_and_metrics",
    "resolve_hparams",
    "check_loss_inputs",
]


def _prepare(name, logps, scores, ref_logps, response_mask, validate, hparams):
    spec, hp = resolve_hparams(name, hparams)
    if not isinstance(logps, torch.Tensor) or not logps.dtype.is_floating_point:
        kind = str(logps.dtype) if isinstance(logps, torch.Tensor) else type(logps).__name__
        raise TypeError(f"logps must be a floating-point [B, K] tensor, got {kind}")
    check_loss_inputs(spec, tuple(logps.shape), scores, ref_logps, response_mask, logps=logps)
    if not spec.needs_reference:
        ref_logps = None  # one batch may be passed to every loss by name; the reference is simply unused
    if validate:
        check_loss_data(spec, hp, logps, scores, ref_logps, response_mask)
    return spec, hp, make_groups(logps, scores, ref_logps, response_mask)


def _loss(spec: LossSpec, hp: dict, g: Groups) -> torch.Tensor:
    per_prompt = spec.fn(g, **hp)  # [B]
    counted = g.has_pref if spec.needs_preference else g.n_real > 0
    # where (not a product) so a non-finite value of an uncounted prompt cannot reach the sum or the gradient.
    return torch.where(counted, per_prompt, 0.0).sum() / counted.sum().clamp_min(1)


def preference_loss(
    name: str,
    logps: torch.Tensor,
    scores: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    validate: bool = True,
    **hparams,
) -> torch.Tensor:
    """Scalar preference loss ``name`` of B prompts with K scored responses each: the mean over prompts.

    Args:
        name: a key of ``LOSSES``: ``point_ce``, ``point_mse``, ``pair_single``, ``pair_mns``, ``pair_mnm``,
            ``pair_mcs``, ``pair_mcm``, ``list_mle``, ``dpo``, ``simpo``, ``orpo``, ``kto``, ``mmpo``,
            ``multi_dpo``.
        logps: ``[B, K]`` log-likelihood of each response with ``LOSSES[name].reduction`` over its tokens
            (mean for MPPO variants, SimPO, ORPO; sum for DPO, KTO, MMPO, Multi-DPO). Differentiable.
        scores: ``[B, K]`` response scores (higher is better), any real dtype; never differentiated.
        ref_logps: ``[B, K]`` reference-model log-likelihoods, same reduction; required when
            ``LOSSES[name].needs_reference``, ignored otherwise.
        response_mask: ``[B, K]`` bool, False at padding of ragged groups (their values may be NaN).
        validate: check the data (finite values at real responses, log-likelihoods ≤ 0, enough real
            responses per prompt, Point-CE/MSE score range, a KTO ``kl`` tensor) with one host sync, naming
            the first bad index. Without it, a real response whose score is not finite is left out.
        **hparams: the loss's hyperparameters (``LOSSES[name].defaults`` lists them with their defaults).

    Returns:
        0-dim loss, fp32 (fp64 for fp64 ``logps``). See the module docstring for ties and padding.

    Example::

        loss = preference_loss("pair_mnm", logps, scores, response_mask=mask)
        loss = preference_loss("dpo", sum_logps, scores, ref_logps=ref_sum_logps, beta=0.1)
    """
    spec, hp, g = _prepare(name, logps, scores, ref_logps, response_mask, validate, hparams)
    return _loss(spec, hp, g)


def preference_loss_and_metrics(
    name: str,
    logps: torch.Tensor,
    scores: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
    validate: bool = True,
    **hparams,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(preference_loss(...), preference_metrics(...))`` from one preparation of the batch."""
    spec, hp, g = _prepare(name, logps, scores, ref_logps, response_mask, validate, hparams)
    return _loss(spec, hp, g), loss_metrics(spec, hp, g, token_counts)


def preference_metrics(
    name: str,
    logps: torch.Tensor,
    scores: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    token_counts: torch.Tensor | None = None,
    validate: bool = False,
    **hparams,
) -> dict[str, torch.Tensor]:
    """Training metrics of loss ``name`` on this batch: detached 0-dim fp32 tensors, no host sync.

    The reward is the loss's own: ``p`` for MPPO variants, ``β·logp`` for SimPO, ``logp`` (mean,
    β-free) for ORPO, ``β·(logp − ref_logp)`` for DPO, KTO, MMPO and Multi-DPO. Chosen is the best
    response and rejected the worst, for every loss (Pair-Single's random negative included). Means run
    over the prompts that carry a preference; when none does, those metrics are NaN (undefined, not 0).

    Keys (TRL's names and meanings where they apply):
        ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (chosen reward
        strictly above rejected), ``logps/chosen``, ``logps/rejected`` (the loss's reduction),
        ``reward_top_accuracy`` (the response with the highest reward has the best score; ties in reward go
        to the first), ``mean_p`` (mean over real responses of exp(mean log-likelihood); for sum-reduction
        losses only when ``token_counts [B, K]`` is given), and ``kl`` (KTO's baseline z) or ORPO's
        ``nll_loss`` (chosen token-mean NLL), ``log_odds_chosen`` (mean log odds ratio of chosen over
        rejected) and ``log_odds_ratio`` (mean of log σ(log odds), the term ORPO's λ multiplies).
    """
    spec, hp, g = _prepare(name, logps, scores, ref_logps, response_mask, validate, hparams)
    return loss_metrics(spec, hp, g, token_counts)
