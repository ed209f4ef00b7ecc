"""The batch every loss reads: B prompts x K scored responses, with padding made harmless.

``make_groups`` replaces padded (and, without validation, unscored) entries with ``torch.where`` before any
arithmetic, so NaN there reaches neither a loss nor its gradient, and finds each prompt's best and worst
response by the tie rules the losses share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mppo_kernels.checks import accumulation_dtype


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

    def mean_over_real(self, x: torch.Tensor) -> torch.Tensor:
        """``[B]`` mean of ``x [B, K]`` over each prompt's real responses."""
        return torch.where(self.mask, x, 0.0).sum(-1) / self.mask.sum(-1).clamp_min(1)


def _extremes(dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill values below and above every score of ``dtype``, for ranking with padding left out."""
    if dtype.is_floating_point:
        low, high = -math.inf, math.inf
    else:
        low, high = torch.iinfo(dtype).min, torch.iinfo(dtype).max
    return torch.tensor(low, dtype=dtype, device=device), torch.tensor(high, dtype=dtype, device=device)


def make_groups(logps, scores, ref_logps, response_mask) -> Groups:
    dtype = accumulation_dtype(logps.dtype)
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
