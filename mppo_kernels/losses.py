"""Preference losses over K scored responses per prompt, from per-response log-likelihoods ``[B, K]``.

Every loss of MPPO (arXiv 2412.15244) — Point-CE, Point-MSE, Pair-Single, Pair-MNS, Pair-MNM, Pair-MCS,
Pair-MCM, List-MLE — and of its peers DPO, SimPO, ORPO, KTO, MMPO (arXiv 2410.03145) and Multi-DPO
(arXiv 2412.07812), written once, each a short function with its formula. Switch between them by name::

    logp = fused_sequence_likelihood(hidden, weight, labels, reduction=LOSSES[name].reduction,
                                     sequence_mask=response_mask)                 # [B, K]
    loss = preference_loss(name, logp, scores, ref_logps=ref, response_mask=response_mask)

``mppo_kernels.fused_loss`` does both in one call and adds the logged metrics.

Conventions shared by every loss (``s`` scores, ``logp`` log-likelihoods, all ``[B, K]``):

* Rewards. MPPO variants use ``p = exp(logp)`` with the mean (length-normalized) log-likelihood: no β,
  no reference model. DPO, KTO, MMPO and Multi-DPO use ``h = β·(logp − ref_logp)`` with summed
  log-likelihoods (``ref_logps`` must be computed with the same reduction). SimPO uses ``β·logp``
  (mean); ORPO's metrics use ``logp`` (mean) itself.
* Padding. ``response_mask`` marks real responses of ragged groups padded to K. Padded ``logps``,
  ``scores`` and ``ref_logps`` may hold anything, NaN included: they are replaced with ``torch.where``
  before any arithmetic, so they reach neither the loss nor its gradient (their gradient is exactly 0).
* Best and worst. "Best" is the real response with the highest score; among tied best the first (lowest
  index) is taken, and the other tied-best responses are never used as its negatives (an equal-score pair
  carries no preference). "Worst" is the first real response with the lowest score. Losses defined on one
  pair (DPO, SimPO, ORPO, KTO, MMPO) take chosen = best and rejected = worst; with K = 2 that is the
  usual pair.
* Ties. A pair of equal scores contributes nothing to any pairwise or list-wise term. A prompt whose real
  responses all have the same score carries no preference: it is left out of every loss except the two
  point-wise ones, and the loss is the mean over the prompts that remain. If no prompt of the batch
  carries a preference the loss is 0 — still a graph on ``logps``, whose gradient is 0 — never NaN.
* Reduction over prompts: the mean over counted prompts of each prompt's loss as written below.

Input errors (shapes, dtypes, a missing reference, an unknown name or hyperparameter) always raise. Data
errors (non-finite values at real responses, positive log-likelihoods, too few real responses, Point-CE
scores out of range) are checked with one host synchronization, skipped with ``validate=False``;
nothing else in this module synchronizes with the device.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

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

_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, accurate everywhere (Mächler, 2012).

    ``log(-expm1(x))`` near 0, where ``1 − exp(x)`` cancels, and ``log1p(-exp(x))`` below ``−ln 2``,
    where ``expm1`` would round to −1. Both branches see clamped inputs so that neither produces inf/NaN
    whose zero-weighted gradient would still poison the backward (0 · inf = NaN). ``x`` is clamped to
    ``≤ −eps(dtype)``: a log-likelihood that rounds to 0 (p = 1 in that dtype) gives a large finite value
    (−15.9 in fp32) instead of −inf.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    near_zero = x > -_LN2
    a = torch.log(-torch.expm1(torch.where(near_zero, x, -_LN2)))
    b = torch.log1p(-torch.exp(torch.where(near_zero, -_LN2, x)))
    return torch.where(near_zero, a, b)


# ---------------------------------------------------------------------------------------------------------
# The batch, with padding made harmless
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Groups:
    """B prompts x K responses. Tensors are ``[B, K]`` unless noted; padded entries are 0, never NaN."""

    logps: torch.Tensor  # compute dtype (fp32, or fp64 for fp64 inputs)
    scores: torch.Tensor  # the caller's dtype: ranked as given, never rounded to the compute dtype
    ref: torch.Tensor | None  # compute dtype, or None when the loss needs no reference
    mask: torch.Tensor  # bool, real responses (with a finite score)
    best: torch.Tensor  # [B] int64: first real response with the highest score
    worst: torch.Tensor  # [B] int64: first real response with the lowest score
    has_pref: torch.Tensor  # [B] bool: the best score is above the worst (two different real scores)
    n_real: torch.Tensor  # [B] int64

    def at(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``x[b, idx[b]]`` for every prompt: ``[B]``."""
        return x.gather(-1, idx[:, None]).squeeze(-1)

    def pairs(self) -> torch.Tensor:
        """``[B, K, K]`` bool: ``[b, i, j]`` when real i is scored strictly above real j."""
        s, m = self.scores, self.mask
        return m[:, :, None] & m[:, None, :] & (s[:, :, None] > s[:, None, :])

    def negatives(self) -> torch.Tensor:
        """``[B, K]`` bool: real responses scored strictly below the best (tied-best ones are excluded)."""
        return self.mask & (self.scores < self.at(self.scores, self.best)[:, None])

    def p(self) -> torch.Tensor:
        return self.logps.exp()

    def logratio(self) -> torch.Tensor:
        return self.logps - self.ref


def _groups(logps, scores, ref_logps, response_mask) -> Groups:
    dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    mask = response_mask if response_mask is not None else torch.ones_like(logps, dtype=torch.bool)
    scores = scores.detach()
    if scores.dtype.is_floating_point:
        # validate=True refuses a non-finite score at a real response; without the check such a response has no
        # usable score and is left out as padding is, so it reaches neither the loss nor its gradient.
        mask = mask & torch.isfinite(scores)
    lp = torch.where(mask, logps.to(dtype), 0.0)
    # Ranking in fp32 would tie int64 scores 2**24 + 1 and 2**24, or fp64 scores 1e-9 apart.
    s = torch.where(mask, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    ref = torch.where(mask, ref_logps.to(dtype), 0.0) if ref_logps is not None else None
    low, high = _extremes(s.dtype, s.device)
    # argmax/argmin return the first extreme index: that is the tie rule for best and worst.
    best = torch.where(mask, s, low).argmax(-1)
    worst = torch.where(mask, s, high).argmin(-1)
    n_real = mask.sum(-1)
    has_pref = (n_real >= 2) & (s.gather(-1, best[:, None]) > s.gather(-1, worst[:, None])).squeeze(-1)
    return Groups(lp, s, ref, mask, best, worst, has_pref, n_real)


def _extremes(dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill values below and above every score of ``dtype``, for ranking with padding left out."""
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    low, high = (-math.inf, math.inf) if dtype.is_floating_point else (info.min, info.max)
    return torch.tensor(low, dtype=dtype, device=device), torch.tensor(high, dtype=dtype, device=device)


def _mean_over_real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0.0).sum(-1) / mask.sum(-1).clamp_min(1)


# ---------------------------------------------------------------------------------------------------------
# The losses: each returns the per-prompt loss [B]; prompts that are not counted may hold any finite value
# ---------------------------------------------------------------------------------------------------------


def _point_targets(g: Groups, score_scale: float) -> torch.Tensor:
    # validate=True rejects scores outside [0, score_scale]; the clamp only keeps validate=False bounded.
    return (g.scores.double() / score_scale).clamp(0.0, 1.0).to(g.logps.dtype)


def point_ce(g: Groups, *, score_scale: float) -> torch.Tensor:
    """Point-CE (MPPO §3.2): ``−[s·log p + (1 − s)·log(1 − p)]``, ``s = score / score_scale``.

    A binary cross-entropy that pulls each ``p = exp(logp)`` (mean log-likelihood) towards its scaled
    score (UltraFeedback's 1–10 scores become 0.1–1 with the default scale 10). ``log(1 − p)`` is
    ``log1mexp(logp)``, stable for p near 1. Per prompt: the mean over its real responses. Every prompt
    with a real response counts, whatever its scores.
    """
    s = _point_targets(g, score_scale)
    ll = s * g.logps + (1.0 - s) * log1mexp(g.logps)
    return -_mean_over_real(ll, g.mask)


def point_mse(g: Groups, *, score_scale: float) -> torch.Tensor:
    """Point-MSE (MPPO §3.2): ``(s − p)²``, ``s = score / score_scale``; per prompt the mean over real responses.

    The paper prints the objective as ``−E[(s − p)²]``; minimizing that would push p away from s, so the
    sign is a typo and the squared error itself is minimized here.
    """
    s = _point_targets(g, score_scale)
    return _mean_over_real((s - g.p()) ** 2, g.mask)


def pair_single(g: Groups, *, negative: str, generator: torch.Generator | None) -> torch.Tensor:
    """Pair-Single (MPPO §3.3): ``−log σ(p_w − p_l)``, w = best, l = one response scored below it.

    ``negative="random"`` (the paper) draws l uniformly among the responses scored strictly below the
    best, with ``generator`` (or torch's global RNG on the device of ``logps`` when None; accelerate
    checkpoints that state, so a resumed run draws the same negatives). ``negative="worst"`` takes the
    worst response: deterministic, and it consumes no random numbers.
    """
    p = g.p()
    if negative == "worst":
        lose = g.worst
    else:
        if generator is None:
            u = torch.rand(g.mask.shape, device=g.mask.device)
        else:
            u = torch.rand(g.mask.shape, generator=generator, device=generator.device).to(g.mask.device)
        # The argmax of i.i.d. uniforms over a set is uniform over that set.
        lose = torch.where(g.negatives(), u, -1.0).argmax(-1)
    return -F.logsigmoid(g.at(p, g.best) - g.at(p, lose))


def pair_mns(g: Groups) -> torch.Tensor:
    """Pair-MNS (MPPO §3.3): ``−Σ_l log σ(p_w − p_l)`` over every response l scored below the best w."""
    p = g.p()
    terms = -F.logsigmoid(g.at(p, g.best)[:, None] - p)
    return torch.where(g.negatives(), terms, 0.0).sum(-1)


def pair_mnm(g: Groups) -> torch.Tensor:
    """Pair-MNM (MPPO §3.3; the paper's best): ``−log σ(N·p_w − Σ_l p_l)``, l over the N responses below w.

    N counts the negatives actually used: a prompt with ties for best or ragged padding has fewer.
    """
    p, neg = g.p(), g.negatives()
    margin = neg.sum(-1) * g.at(p, g.best) - torch.where(neg, p, 0.0).sum(-1)
    return -F.logsigmoid(margin)


def pair_mcs(g: Groups) -> torch.Tensor:
    """Pair-MCS (MPPO §3.3): ``−Σ_{s_i > s_j} log σ(p_i − p_j)`` over all strictly ordered pairs."""
    p = g.p()
    terms = -F.logsigmoid(p[:, :, None] - p[:, None, :])  # [B, K, K]
    return torch.where(g.pairs(), terms, 0.0).sum((-2, -1))


def pair_mcm(g: Groups) -> torch.Tensor:
    """Pair-MCM (MPPO §3.3): ``−log σ(Σ_{s_i > s_j} (p_i − p_j))``, the same pairs merged into one margin."""
    p = g.p()
    margin = torch.where(g.pairs(), p[:, :, None] - p[:, None, :], 0.0).sum((-2, -1))
    return -F.logsigmoid(margin)


def list_mle(g: Groups) -> torch.Tensor:
    """List-MLE (MPPO §3.4): ``−Σ_i log(exp(p_(i)) / Σ_{j≥i} exp(p_(j)))``, responses sorted best first.

    Ties: response i competes with itself and the responses scored strictly below it,
    ``−Σ_i [p_i − log Σ_{j: j = i or s_j < s_i} exp(p_j)]``. Without ties that is exactly the sorted
    formula; with ties, tied responses never enter each other's denominators, so no order is imposed
    among them (a Plackett–Luce likelihood of the score order that treats ties as unordered).
    """
    p = g.p()
    K = p.shape[-1]
    competes = g.pairs() | torch.eye(K, dtype=torch.bool, device=p.device)  # [B, K, K]
    lse = torch.where(competes, p[:, None, :], -math.inf).logsumexp(-1)  # [B, K], finite: the diagonal is in
    return torch.where(g.mask, lse - p, 0.0).sum(-1)


def dpo(g: Groups, *, beta: float) -> torch.Tensor:
    """DPO (arXiv 2305.18290): ``−log σ(h_w − h_l)``, ``h = β·(logp − ref_logp)`` on summed log-likelihoods."""
    h = beta * g.logratio()
    return -F.logsigmoid(g.at(h, g.best) - g.at(h, g.worst))


def multi_dpo(g: Groups, *, beta: float, weighting: str) -> torch.Tensor:
    """Multi-DPO (arXiv 2412.07812): a normalized weighted sum of DPO terms over the ranked responses.

    ``Σ_{s_i > s_j} w_ij·(−log σ(h_i − h_j)) / Σ_{s_i > s_j} w_ij`` with ``h = β·(logp − ref_logp)``.
    The paper's exact weights were not available to us; this is our reading: every strictly ordered pair
    is a DPO term, ``weighting="uniform"`` gives them equal weight (the mean DPO loss over the pairs) and
    ``weighting="margin"`` weights them by the score gap ``s_i − s_j``. Either way it equals DPO when a
    prompt has two differently scored responses.
    """
    h = beta * g.logratio()
    pairs = g.pairs()
    if weighting == "margin":  # normalized in fp64, so huge or close scores give finite, exact weights
        w = torch.where(pairs, g.scores[:, :, None].double() - g.scores[:, None, :].double(), 0.0)
    else:
        w = pairs.double()
    total = w.sum((-2, -1), keepdim=True)
    w = (w / torch.where(total > 0, total, 1.0)).to(h.dtype)
    terms = -F.logsigmoid(h[:, :, None] - h[:, None, :])
    return torch.where(pairs, w * terms, 0.0).sum((-2, -1))


def simpo(g: Groups, *, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (arXiv 2405.14734): ``−log σ(β·(logp_w − logp_l) − γ)`` on mean log-likelihoods, no reference."""
    return -F.logsigmoid(beta * (g.at(g.logps, g.best) - g.at(g.logps, g.worst)) - gamma)


def _orpo_log_odds(g: Groups) -> torch.Tensor:
    lw, ll = g.at(g.logps, g.best), g.at(g.logps, g.worst)
    return (lw - ll) - (log1mexp(lw) - log1mexp(ll))


def orpo(g: Groups, *, lam: float) -> torch.Tensor:
    """ORPO (arXiv 2403.07691): ``−logp_w − λ·log σ(log_odds)`` on mean log-likelihoods, no reference.

    ``log_odds = (logp_w − logp_l) − (log(1 − p_w) − log(1 − p_l))`` with ``log(1 − p) = log1mexp(logp)``;
    ``−logp_w`` is the chosen response's token-mean NLL (the SFT term). ``lam`` is the paper's λ (TRL's
    ``ORPOConfig.beta``).
    """
    return -g.at(g.logps, g.best) - lam * F.logsigmoid(_orpo_log_odds(g))


def _kto_kl(g: Groups, kl) -> torch.Tensor:
    if isinstance(kl, torch.Tensor):  # validate=True refuses a negative or NaN one; clamped like the estimate
        return kl.detach().to(device=g.logps.device, dtype=g.logps.dtype).clamp_min(0.0)
    if kl is not None:
        return g.logps.new_full((), kl)  # a fill, not a host-to-device copy
    mean_ratio = torch.where(g.mask, g.logratio(), 0.0).sum() / g.mask.sum().clamp_min(1)
    return mean_ratio.clamp_min(0.0).detach()


def kto(g: Groups, *, beta: float, desirable_weight: float, undesirable_weight: float, kl) -> torch.Tensor:
    """KTO (arXiv 2402.01306): ``[λ_D·(1 − σ(β·(r_w − z))) + λ_U·(1 − σ(β·(z − r_l)))] / 2``.

    ``r = logp − ref_logp`` (summed log-likelihoods); the best response is the desirable example and the
    worst the undesirable one (the halving makes a K = 2 batch equal TRL's mean over its 2B examples).
    ``z`` is the KL baseline, detached and clamped at 0. KTO estimates it from mismatched
    prompt/response pairs, which need an extra forward pass the fused op does not make; by default it is
    estimated within the batch as the mean of ``r`` over every real response of every prompt (all K, not
    only the two used), i.e. per micro-batch and per process. Pass ``kl=`` (a number or a 0-dim tensor,
    e.g. a mismatched-pair estimate, all-reduced across processes) to override it.
    """
    r = g.logratio()
    z = _kto_kl(g, kl)
    want = desirable_weight * (1.0 - torch.sigmoid(beta * (g.at(r, g.best) - z)))
    avoid = undesirable_weight * (1.0 - torch.sigmoid(beta * (z - g.at(r, g.worst))))
    return 0.5 * (want + avoid)


def mmpo(g: Groups, *, beta: float, gamma: float) -> torch.Tensor:
    """MMPO (arXiv 2410.03145): ``−q·log σ(Δ) − (1 − q)·log σ(−Δ)``, ``q = σ(γ·(s_w − s_l))``.

    ``Δ = h_w − h_l`` with ``h = β·(logp − ref_logp)`` (summed). The soft target q grows with the raw
    score margin; as γ → ∞, q → 1 and the loss becomes DPO.
    """
    h = beta * g.logratio()
    delta = g.at(h, g.best) - g.at(h, g.worst)
    gap = g.at(g.scores, g.best).double() - g.at(g.scores, g.worst).double()  # fp64: scores keep their precision
    q = torch.sigmoid(gamma * gap).to(delta.dtype)
    return -(q * F.logsigmoid(delta) + (1.0 - q) * F.logsigmoid(-delta))


# ---------------------------------------------------------------------------------------------------------
# Rewards (the quantity the metrics report for each response), one per family
# ---------------------------------------------------------------------------------------------------------


def _reward_p(g: Groups, hp) -> torch.Tensor:
    return g.p()


def _reward_beta_logp(g: Groups, hp) -> torch.Tensor:
    return hp["beta"] * g.logps


def _reward_logp(g: Groups, hp) -> torch.Tensor:
    return g.logps


def _reward_beta_logratio(g: Groups, hp) -> torch.Tensor:
    return hp["beta"] * g.logratio()


# ---------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """What a loss needs from the fused op and the batch.

    Attributes:
        name: registry key, e.g. ``"pair_mnm"``.
        fn: ``fn(groups, **hparams) -> [B]`` per-prompt loss.
        reduction: ``"mean"`` or ``"sum"``, the op's reduction over tokens its ``logps`` must use.
        needs_reference: whether ``ref_logps`` (same reduction, from the reference model) is required.
        defaults: hyperparameters and their defaults; exactly these names are accepted.
        min_responses: real responses every prompt must have (1 point-wise, 2 otherwise).
        reward: ``reward(groups, hparams) -> [B, K]``, the per-response reward the metrics report.
        reward_doc: that reward in words.
        formula: the per-prompt loss in one line.
        paper: where it comes from.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    reduction: str
    needs_reference: bool
    defaults: Mapping[str, Any]
    min_responses: int
    reward: Callable[[Groups, Mapping[str, Any]], torch.Tensor]
    reward_doc: str
    formula: str
    paper: str

    @property
    def needs_preference(self) -> bool:
        """Whether a prompt counts only when its real responses have at least two different scores."""
        return self.min_responses >= 2


def _spec(name, fn, reduction, needs_reference, defaults, reward, reward_doc, formula, paper, min_responses=2):
    return LossSpec(name, fn, reduction, needs_reference, MappingProxyType(dict(defaults)), min_responses, reward,
                    reward_doc, formula, paper)


_MPPO = "MPPO, arXiv 2412.15244"
LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        _spec("point_ce", point_ce, "mean", False, {"score_scale": 10.0}, _reward_p, "p",
              "−[s·log p + (1−s)·log(1−p)], s = score/score_scale, mean over responses", _MPPO,
              min_responses=1),
        _spec("point_mse", point_mse, "mean", False, {"score_scale": 10.0}, _reward_p, "p",
              "(s − p)², s = score/score_scale, mean over responses", _MPPO, min_responses=1),
        _spec("pair_single", pair_single, "mean", False, {"negative": "random", "generator": None}, _reward_p, "p",
              "−log σ(p_w − p_l), l drawn among responses below w", _MPPO),
        _spec("pair_mns", pair_mns, "mean", False, {}, _reward_p, "p", "−Σ_l log σ(p_w − p_l)", _MPPO),
        _spec("pair_mnm", pair_mnm, "mean", False, {}, _reward_p, "p", "−log σ(N·p_w − Σ_l p_l)", _MPPO),
        _spec("pair_mcs", pair_mcs, "mean", False, {}, _reward_p, "p", "−Σ_{s_i>s_j} log σ(p_i − p_j)", _MPPO),
        _spec("pair_mcm", pair_mcm, "mean", False, {}, _reward_p, "p", "−log σ(Σ_{s_i>s_j} (p_i − p_j))", _MPPO),
        _spec("list_mle", list_mle, "mean", False, {}, _reward_p, "p",
              "−Σ_i [p_i − log Σ_{j=i or s_j<s_i} exp p_j]", _MPPO),
        _spec("dpo", dpo, "sum", True, {"beta": 0.1}, _reward_beta_logratio, "β·(logp − ref_logp)",
              "−log σ(h_w − h_l), h = β·(logp − ref_logp)", "DPO, arXiv 2305.18290"),
        _spec("simpo", simpo, "mean", False, {"beta": 2.0, "gamma": 1.0}, _reward_beta_logp, "β·logp",
              "−log σ(β·(logp_w − logp_l) − γ)", "SimPO, arXiv 2405.14734"),
        _spec("orpo", orpo, "mean", False, {"lam": 0.1}, _reward_logp, "logp",
              "−logp_w − λ·log σ(log odds_w − log odds_l), odds = p/(1−p)", "ORPO, arXiv 2403.07691"),
        _spec("kto", kto, "sum", True,
              {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0, "kl": None},
              _reward_beta_logratio, "β·(logp − ref_logp)",
              "[λ_D·(1 − σ(β(r_w − z))) + λ_U·(1 − σ(β(z − r_l)))]/2, r = logp − ref_logp",
              "KTO, arXiv 2402.01306"),
        _spec("mmpo", mmpo, "sum", True, {"beta": 0.01, "gamma": 2.2}, _reward_beta_logratio,
              "β·(logp − ref_logp)",
              "−q·log σ(h_w − h_l) − (1−q)·log σ(h_l − h_w), q = σ(γ·(s_w − s_l))", "MMPO, arXiv 2410.03145"),
        _spec("multi_dpo", multi_dpo, "sum", True, {"beta": 0.1, "weighting": "uniform"}, _reward_beta_logratio,
              "β·(logp − ref_logp)", "Σ_{s_i>s_j} w_ij·(−log σ(h_i − h_j)) / Σ w_ij",
              "Multi-DPO, arXiv 2412.07812"),
    )
}


# ---------------------------------------------------------------------------------------------------------
# Hyperparameters and input checks
# ---------------------------------------------------------------------------------------------------------

# name -> (kind, rule): "number" values must be real and finite and satisfy the rule.
_HPARAM_RULES = {
    "score_scale": ("number", "> 0"),
    "beta": ("number", "> 0"),
    "gamma": ("number", ">= 0"),
    "lam": ("number", ">= 0"),
    "desirable_weight": ("number", ">= 0"),
    "undesirable_weight": ("number", ">= 0"),
    "kl": ("number_or_tensor_or_none", ">= 0"),
    "negative": ("choice", ("random", "worst")),
    "weighting": ("choice", ("uniform", "margin")),
    "generator": ("generator", None),
}


def _check_number(loss: str, key: str, value, rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{loss} hyperparameter {key} must be a real number, got {value!r}")
    if not math.isfinite(value) or (rule == "> 0" and value <= 0) or (rule == ">= 0" and value < 0):
        raise ValueError(f"{loss} hyperparameter {key} must be finite and {rule}, got {value!r}")


def resolve_hparams(name: str, hparams: Mapping[str, Any]) -> tuple[LossSpec, dict]:
    """``(spec, defaults merged with hparams)``; unknown names (of loss or hyperparameter) and bad values raise."""
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    spec = LOSSES[name]
    unknown = sorted(set(hparams) - set(spec.defaults))
    if unknown:
        accepted = ", ".join(sorted(spec.defaults)) or "none"
        raise TypeError(f"{name} got unknown hyperparameter(s) {', '.join(unknown)}; it accepts: {accepted}")
    hp = {**spec.defaults, **hparams}
    for key, value in hp.items():
        kind, rule = _HPARAM_RULES[key]
        if kind == "number":
            _check_number(name, key, value, rule)
        elif kind == "number_or_tensor_or_none":
            if isinstance(value, torch.Tensor):
                if value.dim() != 0 or not value.dtype.is_floating_point:
                    raise TypeError(f"{name} hyperparameter {key} must be a 0-dim float tensor, got {value!r}")
            elif value is not None:
                _check_number(name, key, value, rule)
        elif kind == "choice":
            if value not in rule:
                raise ValueError(f"{name} hyperparameter {key} must be one of {rule}, got {value!r}")
        elif value is not None and not isinstance(value, torch.Generator):
            raise TypeError(f"{name} hyperparameter {key} must be a torch.Generator or None, got {_kind(value)}")
    return spec, hp


def _shape(t) -> tuple:
    return tuple(t.shape)


def _kind(x) -> str:
    return str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__


def check_loss_inputs(spec: LossSpec, shape: tuple, scores, ref_logps, response_mask, *,
                      logps: torch.Tensor | None = None) -> None:
    """Shapes, dtypes, devices and the reference requirement; no device synchronization.

    Args:
        shape: the ``(B, K)`` every input must have (``logps.shape``, or ``hidden.shape[:2]`` before the op).
    """
    if len(shape) != 2:
        raise ValueError(f"logps must be [B, K] (prompts x responses), got shape {shape}")
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a [B, K] tensor, got {type(scores).__name__}")
    if scores.dtype == torch.bool or scores.dtype.is_complex:
        raise TypeError(f"scores must be a real-valued tensor, got {scores.dtype}")
    if _shape(scores) != shape:
        raise ValueError(f"scores shape {_shape(scores)} must equal logps shape [B, K] = {shape}")
    devices = {("scores", scores.device)}
    if logps is not None:
        devices.add(("logps", logps.device))
    if spec.needs_reference:
        if ref_logps is None:
            raise ValueError(
                f"{spec.name} needs ref_logps: the reference model's [B, K] log-likelihoods with reduction="
                f"{spec.reduction!r} (e.g. fused_sequence_likelihood under torch.no_grad()); got None"
            )
        if not isinstance(ref_logps, torch.Tensor) or not ref_logps.dtype.is_floating_point:
            raise TypeError(f"ref_logps must be a floating-point [B, K] tensor, got {_kind(ref_logps)}")
        if _shape(ref_logps) != shape:
            raise ValueError(f"ref_logps shape {_shape(ref_logps)} must equal logps shape [B, K] = {shape}")
        devices.add(("ref_logps", ref_logps.device))
    if response_mask is not None:
        if not isinstance(response_mask, torch.Tensor) or response_mask.dtype != torch.bool:
            raise TypeError(f"response_mask must be a bool [B, K] tensor, got {_kind(response_mask)}")
        if _shape(response_mask) != shape:
            raise ValueError(f"response_mask shape {_shape(response_mask)} must equal logps shape [B, K] = {shape}")
        devices.add(("response_mask", response_mask.device))
    if len({d for _, d in devices}) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in sorted(devices, key=str))
        raise ValueError(f"all tensors must be on one device, got {where}")


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


def _check_data(spec: LossSpec, hp: dict, logps, scores, ref_logps, response_mask) -> None:
    """Data errors at real responses, with the index; one host synchronization."""
    real = response_mask if response_mask is not None else torch.ones_like(logps, dtype=torch.bool)
    s = scores.detach().double()
    checks = [  # (bad [B, K] or [B] mask, message builder)
        (real & ~torch.isfinite(logps), lambda i: f"logps{list(i)} = {logps[i].item()} at a real response; "
         "log-likelihoods of real responses must be finite (mark padding with response_mask)"),
        (real & (logps > 0), lambda i: f"logps{list(i)} = {logps[i].item():.6g} > 0 is not a log-likelihood "
         "(pass log-probabilities, not losses or NLLs)"),
        (real & ~torch.isfinite(s), lambda i: f"scores{list(i)} = {scores[i].item()} at a real response; "
         "every real response needs a finite score"),
    ]
    if ref_logps is not None and spec.needs_reference:
        checks += [
            (real & ~torch.isfinite(ref_logps), lambda i: f"ref_logps{list(i)} = {ref_logps[i].item()} at a real "
             "response; reference log-likelihoods of real responses must be finite"),
            (real & (ref_logps > 0), lambda i: f"ref_logps{list(i)} = {ref_logps[i].item():.6g} > 0 is not a "
             "log-likelihood"),
        ]
    n_real = real.sum(-1)
    checks.append((n_real < spec.min_responses, lambda i: (
        f"prompt {i[0]} has {int(n_real[i])} real response{'s' if int(n_real[i]) != 1 else ''}; "
        f"{spec.name} needs at least {spec.min_responses}")))
    if isinstance(hp.get("kl"), torch.Tensor):  # a number is checked with the other hyperparameters
        kl = hp["kl"].detach().to(logps.device)
        checks.append((~torch.isfinite(kl) | (kl < 0), lambda i: (
            f"{spec.name} hyperparameter kl = {kl.item()} must be finite and >= 0 (a KL estimate)")))
    if "score_scale" in hp:
        scale = hp["score_scale"]
        checks.append((real & torch.isfinite(s) & ((s < 0) | (s > scale)), lambda i: (
            f"scores{list(i)} = {scores[i].item():.6g} is outside [0, score_scale={scale}]; {spec.name} targets "
            "score / score_scale must lie in [0, 1] (set score_scale to the top of your score range)")))
    flags = torch.stack([bad.any() for bad, _ in checks]).tolist()  # the one host sync
    for (bad, message), flagged in zip(checks, flags):
        if flagged:
            raise ValueError(message(_first(bad)))


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def _prepare(name, logps, scores, ref_logps, response_mask, validate, hparams):
    spec, hp = resolve_hparams(name, hparams)
    if not isinstance(logps, torch.Tensor) or not logps.dtype.is_floating_point:
        raise TypeError(f"logps must be a floating-point [B, K] tensor, got {_kind(logps)}")
    check_loss_inputs(spec, _shape(logps), scores, ref_logps, response_mask, logps=logps)
    if not spec.needs_reference:
        ref_logps = None  # one batch may be passed to every loss by name; the reference is simply unused
    if validate:
        _check_data(spec, hp, logps, scores, ref_logps, response_mask)
    return spec, hp, _groups(logps, scores, ref_logps, response_mask)


def _loss(spec: LossSpec, hp: dict, g: Groups) -> torch.Tensor:
    per_prompt = spec.fn(g, **hp)  # [B]
    counted = g.has_pref if spec.needs_preference else g.n_real > 0
    # where (not a product) so a non-finite value of an uncounted prompt cannot reach the sum or the gradient.
    return torch.where(counted, per_prompt, 0.0).sum() / counted.sum().clamp_min(1)


def _metrics(spec: LossSpec, hp: dict, g: Groups, token_counts) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        reward = spec.reward(g, hp)  # [B, K]
        pref = g.has_pref
        n_pref = pref.sum().to(g.logps.dtype)  # 0 -> the prompt means below are NaN: undefined, not 0

        def over_prompts(x):
            return (torch.where(pref, x.to(g.logps.dtype), 0.0).sum() / n_pref).float()

        r_c, r_r = g.at(reward, g.best), g.at(reward, g.worst)
        top = torch.where(g.mask, reward, -math.inf).argmax(-1)
        out = {
            "rewards/chosen": over_prompts(r_c),
            "rewards/rejected": over_prompts(r_r),
            "rewards/margins": over_prompts(r_c - r_r),
            "rewards/accuracies": over_prompts(r_c > r_r),
            "logps/chosen": over_prompts(g.at(g.logps, g.best)),
            "logps/rejected": over_prompts(g.at(g.logps, g.worst)),
            "best_top_accuracy": over_prompts(g.at(g.scores, top) == g.at(g.scores, g.best)),
        }
        mean_logps = g.logps
        if spec.reduction == "sum":
            mean_logps = None if token_counts is None else g.logps / token_counts.to(g.logps.dtype).clamp_min(1)
        if mean_logps is not None:
            p_real = torch.where(g.mask, mean_logps.exp(), 0.0)
            out["mean_p"] = (p_real.sum() / g.mask.sum()).float()  # NaN without real responses
        if spec.name == "kto":
            out["kl"] = _kto_kl(g, hp["kl"]).float()
        if spec.name == "orpo":
            out["nll_loss"] = over_prompts(-g.at(g.logps, g.best))
            out["log_odds_ratio"] = over_prompts(_orpo_log_odds(g))
    return out


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
        scores: ``[B, K]`` response scores (higher is better); never differentiated.
        ref_logps: ``[B, K]`` reference-model log-likelihoods, same reduction; required when
            ``LOSSES[name].needs_reference``, ignored otherwise.
        response_mask: ``[B, K]`` bool, False at padding of ragged groups (their values may be NaN).
        validate: check the data (finite values at real responses, log-likelihoods ≤ 0, enough real
            responses per prompt, Point-CE/MSE score range) with one host sync, naming the first bad index.
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
    return _loss(spec, hp, g), _metrics(spec, hp, g, token_counts)


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

    Keys (TRL's names where they apply):
        ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (chosen reward
        strictly above rejected), ``logps/chosen``, ``logps/rejected`` (the loss's reduction),
        ``best_top_accuracy`` (the response with the highest reward has the best score; ties in reward go
        to the first), ``mean_p`` (mean over real responses of exp(mean log-likelihood); for sum-reduction
        losses only when ``token_counts [B, K]`` is given), and ``kl`` (KTO's baseline z) or ``nll_loss`` and
        ``log_odds_ratio`` (ORPO).
    """
    spec, hp, g = _prepare(name, logps, scores, ref_logps, response_mask, validate, hparams)
    return _metrics(spec, hp, g, token_counts)
