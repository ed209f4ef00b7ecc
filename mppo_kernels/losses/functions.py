"""The losses: each a short function ``fn(groups, *, hyperparameters) -> [B]`` per-prompt loss, with its
formula and paper, declared once by ``@register`` (reduction, reference need, reward, extra metrics; the
hyperparameters' defaults and rules are the signature). Prompts a loss does not count may hold any finite
value: ``mppo_kernels.losses`` leaves them out with ``torch.where``.

MPPO (arXiv 2412.15244) rewards each response with ``p = exp(logp)`` on mean (length-normalized)
log-likelihoods, with no β and no reference model; DPO, KTO, MMPO and Multi-DPO use ``h = β·(logp −
ref_logp)`` on summed log-likelihoods; SimPO ``β·logp`` and ORPO's metrics ``logp`` (mean).
"""

from __future__ import annotations

import math
from typing import Annotated, Optional

import torch
import torch.nn.functional as F

from mppo_kernels.losses.groups import Groups
from mppo_kernels.losses.registry import Estimate, GeneratorOrNone, NonNegative, OneOf, Positive, register

MPPO = "MPPO, arXiv 2412.15244"
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


# Rewards the metrics report for each response, one per family.
def reward_p(g: Groups, hp) -> torch.Tensor:
    return g.p()


def reward_beta_logp(g: Groups, hp) -> torch.Tensor:
    return hp["beta"] * g.logps


def reward_logp(g: Groups, hp) -> torch.Tensor:
    return g.logps


def reward_beta_logratio(g: Groups, hp) -> torch.Tensor:
    return hp["beta"] * g.logratio()


def _point_targets(g: Groups, score_scale: float) -> torch.Tensor:
    # validate=True rejects scores outside [0, score_scale]; the clamp only keeps validate=False bounded.
    return (g.scores.double() / score_scale).clamp(0.0, 1.0).to(g.logps.dtype)


@register(reduction="mean", reward=reward_p, paper=MPPO, min_responses=1)
def point_ce(g: Groups, *, score_scale: Positive = 10.0) -> torch.Tensor:
    """Point-CE (MPPO §3.2): ``−[s·log p + (1 − s)·log(1 − p)]``, ``s = score / score_scale``.

    A binary cross-entropy that pulls each ``p = exp(logp)`` (mean log-likelihood) towards its scaled
    score (UltraFeedback's 1–10 scores become 0.1–1 with the default scale 10). ``log(1 − p)`` is
    ``log1mexp(logp)``, stable for p near 1. Per prompt: the mean over its real responses. Every prompt
    with a real response counts, whatever its scores.
    """
    s = _point_targets(g, score_scale)
    ll = s * g.logps + (1.0 - s) * log1mexp(g.logps)
    return -g.mean_over_real(ll)


@register(reduction="mean", reward=reward_p, paper=MPPO, min_responses=1)
def point_mse(g: Groups, *, score_scale: Positive = 10.0) -> torch.Tensor:
    """Point-MSE (MPPO §3.2): ``(s − p)²``, ``s = score / score_scale``; per prompt the mean over real responses.

    The paper prints the objective as ``−E[(s − p)²]``; minimizing that would push p away from s, so the
    sign is a typo and the squared error itself is minimized here.
    """
    s = _point_targets(g, score_scale)
    return g.mean_over_real((s - g.p()) ** 2)


@register(reduction="mean", reward=reward_p, paper=MPPO)
def pair_single(g: Groups, *, negative: Annotated[str, OneOf(("random", "worst"))] = "random",
                generator: Annotated[Optional[torch.Generator], GeneratorOrNone()] = None) -> torch.Tensor:
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


@register(reduction="mean", reward=reward_p, paper=MPPO)
def pair_mns(g: Groups) -> torch.Tensor:
    """Pair-MNS (MPPO §3.3): ``−Σ_l log σ(p_w − p_l)`` over every response l scored below the best w."""
    p = g.p()
    terms = -F.logsigmoid(g.at(p, g.best)[:, None] - p)
    return torch.where(g.negatives(), terms, 0.0).sum(-1)


@register(reduction="mean", reward=reward_p, paper=MPPO)
def pair_mnm(g: Groups) -> torch.Tensor:
    """Pair-MNM (MPPO §3.3; the paper's best): ``−log σ(N·p_w − Σ_l p_l)``, l over the N responses below w.

    N counts the negatives actually used: a prompt with ties for best or ragged padding has fewer.
    """
    p, neg = g.p(), g.negatives()
    margin = neg.sum(-1) * g.at(p, g.best) - torch.where(neg, p, 0.0).sum(-1)
    return -F.logsigmoid(margin)


@register(reduction="mean", reward=reward_p, paper=MPPO)
def pair_mcs(g: Groups) -> torch.Tensor:
    """Pair-MCS (MPPO §3.3): ``−Σ_{s_i > s_j} log σ(p_i − p_j)`` over all strictly ordered pairs."""
    p = g.p()
    terms = -F.logsigmoid(p[:, :, None] - p[:, None, :])  # [B, K, K]
    return torch.where(g.pairs(), terms, 0.0).sum((-2, -1))


@register(reduction="mean", reward=reward_p, paper=MPPO)
def pair_mcm(g: Groups) -> torch.Tensor:
    """Pair-MCM (MPPO §3.3): ``−log σ(Σ_{s_i > s_j} (p_i − p_j))``, the same pairs merged into one margin."""
    p = g.p()
    margin = torch.where(g.pairs(), p[:, :, None] - p[:, None, :], 0.0).sum((-2, -1))
    return -F.logsigmoid(margin)


@register(reduction="mean", reward=reward_p, paper=MPPO)
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


@register(reduction="sum", reference=True, reward=reward_beta_logratio, paper="DPO, arXiv 2305.18290")
def dpo(g: Groups, *, beta: Positive = 0.1) -> torch.Tensor:
    """DPO (arXiv 2305.18290): ``−log σ(h_w − h_l)``, ``h = β·(logp − ref_logp)`` on summed log-likelihoods."""
    h = beta * g.logratio()
    return -F.logsigmoid(g.at(h, g.best) - g.at(h, g.worst))


@register(reduction="sum", reference=True, reward=reward_beta_logratio, paper="Multi-DPO, arXiv 2412.07812")
def multi_dpo(g: Groups, *, beta: Positive = 0.1,
              weighting: Annotated[str, OneOf(("uniform", "margin"))] = "uniform") -> torch.Tensor:
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


@register(reduction="mean", reward=reward_beta_logp, paper="SimPO, arXiv 2405.14734")
def simpo(g: Groups, *, beta: Positive = 2.0, gamma: NonNegative = 1.0) -> torch.Tensor:
    """SimPO (arXiv 2405.14734): ``−log σ(β·(logp_w − logp_l) − γ)`` on mean log-likelihoods, no reference."""
    return -F.logsigmoid(beta * (g.at(g.logps, g.best) - g.at(g.logps, g.worst)) - gamma)


def _orpo_log_odds(g: Groups) -> torch.Tensor:
    lw, ll = g.at(g.logps, g.best), g.at(g.logps, g.worst)
    return (lw - ll) - (log1mexp(lw) - log1mexp(ll))


def _orpo_metrics(g: Groups, hp) -> dict:
    """TRL's ORPO metrics, TRL's meanings: the chosen NLL, the mean log odds and the mean log σ(log odds)."""
    log_odds = _orpo_log_odds(g)
    return {"nll_loss": -g.at(g.logps, g.best), "log_odds_chosen": log_odds, "log_odds_ratio": F.logsigmoid(log_odds)}


@register(reduction="mean", reward=reward_logp, metrics=_orpo_metrics, paper="ORPO, arXiv 2403.07691")
def orpo(g: Groups, *, lam: NonNegative = 0.1) -> torch.Tensor:
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


@register(reduction="sum", reference=True, reward=reward_beta_logratio, paper="KTO, arXiv 2402.01306",
          metrics=lambda g, hp: {"kl": _kto_kl(g, hp["kl"])})
def kto(g: Groups, *, beta: Positive = 0.1, desirable_weight: NonNegative = 1.0,
        undesirable_weight: NonNegative = 1.0, kl: Annotated[object, Estimate()] = None) -> torch.Tensor:
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


@register(reduction="sum", reference=True, reward=reward_beta_logratio, paper="MMPO, arXiv 2410.03145")
def mmpo(g: Groups, *, beta: Positive = 0.01, gamma: NonNegative = 2.2) -> torch.Tensor:
    """MMPO (arXiv 2410.03145): ``−q·log σ(Δ) − (1 − q)·log σ(−Δ)``, ``q = σ(γ·(s_w − s_l))``.

    ``Δ = h_w − h_l`` with ``h = β·(logp − ref_logp)`` (summed). The soft target q grows with the raw
    score margin; as γ → ∞, q → 1 and the loss becomes DPO.
    """
    h = beta * g.logratio()
    delta = g.at(h, g.best) - g.at(h, g.worst)
    gap = g.at(g.scores, g.best).double() - g.at(g.scores, g.worst).double()  # fp64: scores keep their precision
    q = torch.sigmoid(gamma * gap).to(delta.dtype)
    return -(q * F.logsigmoid(delta) + (1.0 - q) * F.logsigmoid(-delta))
