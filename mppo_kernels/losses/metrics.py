"""The metrics logged with every loss: detached 0-dim fp32 tensors, computed without a host sync.

Chosen is the best response and rejected the worst, for every loss; the reward is the loss's own
(``LossSpec.reward``). Prompt means run over the prompts that carry a preference, and are NaN (undefined,
not 0) when none does.
"""

from __future__ import annotations

import math

import torch

from mppo_kernels.losses.groups import Groups
from mppo_kernels.losses.registry import LossSpec


def loss_metrics(spec: LossSpec, hp: dict, g: Groups, token_counts) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        reward = spec.reward(g, hp)  # [B, K]
        pref = g.has_pref
        n_pref = pref.sum().to(g.logps.dtype)  # 0 -> the prompt means below are NaN: undefined, not 0

        def over_prompts(x):
            if x.dim() == 0:
                return x.float()
            return (torch.where(pref, x.to(g.logps.dtype), 0.0).sum() / n_pref).float()

        r_c, r_r = g.at(reward, g.best), g.at(reward, g.worst)
        top = torch.where(g.mask, reward, -math.inf).argmax(-1)
        out = {
            "rewards/chosen": r_c,
            "rewards/rejected": r_r,
            "rewards/margins": r_c - r_r,
            "rewards/accuracies": r_c > r_r,
            "logps/chosen": g.at(g.logps, g.best),
            "logps/rejected": g.at(g.logps, g.worst),
            # Ranked by the loss's reward; the trainer's held-out likelihood_top_accuracy ranks by mean logp.
            "reward_top_accuracy": g.at(g.scores, top) == g.at(g.scores, g.best),
            **(spec.metrics(g, hp) if spec.metrics else {}),
        }
        out = {k: over_prompts(v) for k, v in out.items()}
        mean_logps = g.logps
        if spec.reduction == "sum":
            mean_logps = None if token_counts is None else g.logps / token_counts.to(g.logps.dtype).clamp_min(1)
        if mean_logps is not None:
            p_real = torch.where(g.mask, mean_logps.exp(), 0.0)
            out["mean_p"] = (p_real.sum() / g.mask.sum()).float()  # NaN without real responses
    return out
