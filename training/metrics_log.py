"""The run's metrics on disk: ``metrics.jsonl`` (one record per logged step and per held-out evaluation)
and ``training_curves.png``, drawn from it at the end of the run."""

from __future__ import annotations

import json
import os


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Append-only JSONL of records ``{"step": int, ...}``; on resume, records after the checkpoint are
    dropped so the file reads as one uninterrupted run."""

    def __init__(self, path: str, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        with open(path, "w") as f:
            f.writelines(kept)

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def first_eval(self) -> dict | None:
        """The step-0 held-out evaluation recorded before the run was interrupted (None if absent)."""
        if not (self.enabled and os.path.exists(self.path)):
            return None
        for rec in read_records(self.path):
            if rec.get("step") == 0 and "eval/likelihood_top_accuracy" in rec:
                return {k: v for k, v in rec.items() if k != "step"}
        return None


def plot_curves(jsonl_path: str, png_path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(jsonl_path)
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/likelihood_top_accuracy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["train/loss"] for r in train], lw=0.8, label="train")
    axes[0].plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-", label="held-out")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot([r["step"] for r in evals], [r["eval/likelihood_top_accuracy"] for r in evals], "o-",
                 label="held-out, by mean log-likelihood")
    pts = [r for r in train if "train/reward_top_accuracy" in r]
    if pts:  # p for MPPO losses; one training batch, so noisier than held-out
        axes[1].plot([r["step"] for r in pts], [r["train/reward_top_accuracy"] for r in pts], lw=0.6, alpha=0.6,
                     label="train batch, by the loss's reward")
    if evals:
        axes[1].axhline(evals[0]["eval/chance"], color="gray", ls="--", label="chance (ranking)")
    gens = [r for r in evals if "eval/exact_match" in r]
    if gens:  # what the policy itself answers, next to how it ranks given answers
        axes[1].plot([r["step"] for r in gens], [r["eval/exact_match"] for r in gens], "s-",
                     label="held-out greedy exact match")
    axes[1].set(title="held-out: best response ranked top; own answer exact" if gens
                else "best-scored response ranked top", xlabel="step", ylim=(0, 1))
    axes[1].legend()
    pts = [r for r in train if "train/rewards/margins" in r]
    axes[2].plot([r["step"] for r in pts], [r["train/rewards/margins"] for r in pts], lw=0.8)
    axes[2].set(title="train/rewards/margins", xlabel="step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
