"""Forward passes over a whole dataset, sharded across processes: the held-out evaluation, the reference
log-probs computed once before training (``--precompute-ref``), and the policy's own greedy generations on
held-out prompts of a verifiable task (exact match, correct characters)."""

from __future__ import annotations

import math

import torch

from training.data import make_batch
from training.embedded import correct_characters
from training.generation import Sampling, encode_prompts, generate


def shard_indices(n: int, rank: int, world: int) -> tuple[list[int], list[bool]]:
    """This rank's rows ``rank::world``, padded by repetition to the same count on every rank (the padded
    copies are flagged False), so every rank runs the same number of collective forwards."""
    mine = list(range(rank, n, world))
    pad = math.ceil(n / world) - len(mine)
    return mine + [mine[-1] if mine else 0] * pad, [True] * len(mine) + [False] * pad


def _sharded_batches(model, ds, tokenizer, accelerator, batch_size: int, batch_fn=make_batch):
    """``(indices, valid, batch)`` over this process's shard (``shard_indices``), the model in eval mode;
    ``batch_fn`` builds the batches (``make_batch`` padded, ``packing.make_packed_batch`` packed)."""
    was_training = model.training
    model.eval()
    idx, valid = shard_indices(len(ds), accelerator.process_index, accelerator.num_processes)
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        yield chunk, valid[start : start + batch_size], batch_fn(ds, chunk, tokenizer, accelerator.device)
    model.train(was_training)


@torch.no_grad()
def evaluate(model, ds, tokenizer, accelerator, batch_size: int, batch_fn=make_batch) -> dict:
    """Held-out loss and ``likelihood_top_accuracy``: the fraction of prompts whose best-scored response has
    the highest mean log-likelihood (a prompt counts when the top-likelihood response has the maximum score;
    the loss's own ``reward_top_accuracy`` ranks by the loss's reward instead)."""
    totals = torch.zeros(4, device=accelerator.device, dtype=torch.float64)  # correct, count, loss*n, chance
    for _, ok, batch in _sharded_batches(model, ds, tokenizer, accelerator, batch_size, batch_fn):
        with accelerator.autocast():
            loss, logps = model(**batch, mode="eval")  # logps: [B, K] mean log-likelihood
        mask = batch["response_mask"]
        top = logps.float().masked_fill(~mask, -float("inf")).argmax(-1)
        best = batch["scores"].masked_fill(~mask, -float("inf")).amax(-1)
        correct = (batch["scores"].gather(-1, top[:, None])[:, 0] == best).double()
        n_best = ((batch["scores"] == best[:, None]) & mask).sum(-1).double()
        chance = n_best / mask.sum(-1).double()
        w = torch.tensor(ok, device=correct.device, dtype=torch.float64)
        totals += torch.stack([(correct * w).sum(), w.sum(), loss.double() * w.sum(), (chance * w).sum()])
    totals = accelerator.reduce(totals, reduction="sum")
    n = max(totals[1].item(), 1.0)
    return {"eval/likelihood_top_accuracy": totals[0].item() / n, "eval/loss": totals[2].item() / n,
            "eval/chance": totals[3].item() / n, "eval/prompts": int(totals[1].item())}


@torch.no_grad()
def precompute_reference(model, ds, tokenizer, accelerator, batch_size: int, desc: str,
                         batch_fn=make_batch) -> list[list[float]]:
    """The ``ref_logps`` column of ``ds`` (the loss's reduction, one value per response), computed with the
    model as it is: the initial policy."""
    k_max = max(len(r) for r in ds["scores"])
    out_idx, out_val = [], []
    for chunk, valid, batch in _sharded_batches(model, ds, tokenizer, accelerator, batch_size, batch_fn):
        with accelerator.autocast():
            ref = model(**batch, mode="ref").float()  # [B, K]
        ref = torch.nn.functional.pad(ref, (0, k_max - ref.shape[1]), value=float("nan"))
        ids = torch.tensor([i if ok else -1 for i, ok in zip(chunk, valid)], device=ref.device)
        out_idx.append(accelerator.gather(ids))
        out_val.append(accelerator.gather(ref))
    table = {i: v for i, v in zip(torch.cat(out_idx).tolist(), torch.cat(out_val).cpu()) if i >= 0}
    column = [table[i][: len(s)].tolist() for i, s in enumerate(ds["scores"])]
    accelerator.print(f"precomputed reference log-probs for {len(column)} {desc} rows")
    return column


@torch.no_grad()
def evaluate_generation(policy, tokenizer, prompts: list, answers: list[str], accelerator, *, batch_size: int) -> dict:
    """Greedy generations of ``policy`` (the unwrapped causal LM) for ``prompts``: ``eval/exact_match``, the
    fraction equal to their answer, and ``eval/correct_chars``, the mean of the task's score
    (``embedded.correct_characters``). Whole batches are shared out over the processes (batch ``j`` to rank
    ``j % world``), so a prompt is decoded in the same batch whatever the number of processes; generation runs
    no collective, only the final sum does."""
    ids = encode_prompts(tokenizer, prompts)
    sampling = Sampling(max_new_tokens=max(len(a) for a in answers) + 1)  # + 1: room for EOS, so run-ons show
    totals = torch.zeros(3, device=accelerator.device, dtype=torch.float64)  # exact, correct chars, count
    starts = range(0, len(ids), batch_size)
    for start in starts[accelerator.process_index :: accelerator.num_processes]:
        with accelerator.autocast():
            texts, _ = generate(policy, tokenizer, ids[start : start + batch_size], sampling)
        for (text,), answer in zip(texts, answers[start : start + batch_size]):
            totals += torch.tensor([text == answer, correct_characters(text, answer), 1.0], dtype=torch.float64,
                                   device=totals.device)
    totals = accelerator.reduce(totals, reduction="sum")
    n = max(totals[2].item(), 1.0)
    return {"eval/exact_match": totals[0].item() / n, "eval/correct_chars": totals[1].item() / n,
            "eval/generated_prompts": int(totals[2].item())}
