"""Preference data: one reader per dataset schema, tokenization with prompt masking, skip counting, batching.

Every schema is normalized to the local JSONL schema, one prompt with K >= 1 scored responses::

    {"prompt": "text or [{role, content}, ...]", "responses": ["...", ...], "scores": [7.5, ...]}

then tokenized to ``prompt_ids`` / ``response_ids[K]`` / ``scores[K]``. Responses that cannot be trained on
(missing/NaN/"N/A" score, empty text, truncated to nothing) are dropped and counted by reason; rows left
with too few responses (or with every score tied, for pair/list losses) are dropped and counted too.
"""

from __future__ import annotations

import math
import os
from collections import Counter

import torch

FORMATS = ("ultrafeedback", "armorm", "binarized", "responses")


# ----------------------------------------------------------------------------------------------- loading
def load_raw_dataset(source: str, split: str | None = None):
    """``datasets.Dataset`` from a local .json/.jsonl/.parquet file (or a directory of them) or a hub id."""
    import datasets

    if os.path.isfile(source):
        ext = source.rsplit(".", 1)[-1].lower()
        builder = {"json": "json", "jsonl": "json", "parquet": "parquet"}.get(ext)
        if builder is None:
            raise ValueError(f"local dataset {source!r}: expected a .json, .jsonl or .parquet file")
        return datasets.load_dataset(builder, data_files=source, split="train")
    if os.path.isdir(source):
        return datasets.load_dataset(source, split=split or "train")
    return datasets.load_dataset(source, split=split or "train")


def detect_format(columns) -> str:
    """The schema of a dataset from its column names (override with ``--dataset-format``)."""
    cols = set(columns)
    if {"instruction", "completions"} <= cols:
        return "ultrafeedback"
    if {"all_generated_responses", "all_rm_scores"} <= cols:
        return "armorm"
    if {"chosen", "rejected", "score_chosen", "score_rejected"} <= cols:
        return "binarized"
    if {"prompt", "responses", "scores"} <= cols:
        return "responses"
    raise ValueError(
        f"cannot tell the dataset schema from its columns {sorted(cols)}; expected one of: "
        "UltraFeedback (instruction, completions), ArmoRM (prompt, all_generated_responses, all_rm_scores), "
        "binarized (prompt, chosen, rejected, score_chosen, score_rejected) or the local schema "
        "(prompt, responses, scores); or pass --dataset-format"
    )


# ------------------------------------------------------------------------------------------ normalizing
def to_score(x) -> float | None:
    """A finite float, or None for missing, NaN, inf, "N/A" and other non-numbers."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _ultrafeedback_score(completion: dict, field: str) -> float | None:
    score = to_score(completion.get(field))
    if score is None and field == "fine-grained_score":
        # Recompute from the aspect ratings, leaving out the "N/A" ones.
        ratings = [to_score(a.get("Rating")) for a in (completion.get("annotations") or {}).values()
                   if isinstance(a, dict)]
        ratings = [r for r in ratings if r is not None]
        score = sum(ratings) / len(ratings) if ratings else None
    return score


def _message_text(messages) -> str:
    return (messages[-1] or {}).get("content") or "" if messages else ""


def normalize_row(row: dict, fmt: str, *, score_field: str = "overall_score"):
    """``(prompt, responses, scores)`` of one row of schema ``fmt``; a score is None when unusable."""
    if fmt == "ultrafeedback":
        completions = row.get("completions") or []
        return (row.get("instruction") or "", [c.get("response") or "" for c in completions],
                [_ultrafeedback_score(c, score_field) for c in completions])
    if fmt == "armorm":
        responses = list(row.get("all_generated_responses") or [])
        scores = list(row.get("all_rm_scores") or [])
        scores += [None] * (len(responses) - len(scores))
        return row.get("prompt") or "", responses, [to_score(s) for s in scores[: len(responses)]]
    if fmt == "binarized":
        chosen, rejected = row.get("chosen") or [], row.get("rejected") or []
        prompt = list(chosen[:-1]) if len(chosen) > 2 else row.get("prompt") or ""  # multi-turn: the history
        return (prompt, [_message_text(chosen), _message_text(rejected)],
                [to_score(row.get("score_chosen")), to_score(row.get("score_rejected"))])
    if fmt == "responses":
        responses = list(row.get("responses") or [])
        scores = list(row.get("scores") or [])
        scores += [None] * (len(responses) - len(scores))
        return row.get("prompt") or "", responses, [to_score(s) for s in scores[: len(responses)]]
    raise ValueError(f"unknown dataset format {fmt!r}; choose from {FORMATS}")


# ------------------------------------------------------------------------------------------- tokenizing
def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """Prompt ids through the chat template when the tokenizer has one, else the plain text after BOS."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n".join(m.get("content") or "" for m in messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + ids


def tokenize_row(row: dict, tokenizer, *, fmt: str, max_length: int, max_prompt_length: int,
                 min_responses: int = 2, skip_ties: bool = True, score_field: str = "overall_score") -> dict:
    """Tokenize one row. Returns ids plus ``dropped`` (reason per dropped response) and ``skip`` (row reason)."""
    prompt, responses, scores = normalize_row(row, fmt, score_field=score_field)
    out = {"prompt_ids": [], "response_ids": [], "scores": [], "dropped": [], "skip": ""}
    empty = not prompt.strip() if isinstance(prompt, str) else not any((m or {}).get("content") for m in prompt)
    prompt_ids = [] if empty else prompt_token_ids(tokenizer, prompt)[-max_prompt_length:]  # keep the end
    if not prompt_ids:
        # The first response token is predicted from the last prompt position: there must be one.
        out["skip"] = "empty_prompt"
        out["dropped"] = []
        return out
    room = max_length - len(prompt_ids)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text, score in zip(responses, scores):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if isinstance(text, str) and text.strip() else []
        if score is None:
            out["dropped"].append("nan_or_missing_score")
        elif not ids:
            out["dropped"].append("empty_response")
        elif room <= 0:
            out["dropped"].append("truncated_to_nothing")
        else:
            out["response_ids"].append((ids + eos)[:room])
            out["scores"].append(float(score))
    out["prompt_ids"] = prompt_ids
    if len(out["response_ids"]) < min_responses:
        out["skip"] = f"fewer_than_{min_responses}_responses"
    elif skip_ties and min_responses >= 2 and len(set(out["scores"])) == 1:
        out["skip"] = "all_scores_tied"
    return out


def prepare_dataset(raw, tokenizer, *, fmt: str | None = None, max_length: int = 1024,
                    max_prompt_length: int = 512, min_responses: int = 2, skip_ties: bool = True,
                    score_field: str = "overall_score", num_proc: int | None = None, log=print):
    """Tokenize a raw ``datasets.Dataset``; returns ``(dataset, counts)`` and logs the skip counts.

    ``counts`` maps ``"rows"``, ``"kept"``, ``"response:<reason>"`` and ``"row:<reason>"`` to numbers.
    """
    fmt = fmt or detect_format(raw.column_names)
    if max_prompt_length > max_length:
        raise ValueError(f"max_prompt_length {max_prompt_length} exceeds max_length {max_length}")
    kwargs = dict(fmt=fmt, max_length=max_length, max_prompt_length=max_prompt_length,
                  min_responses=min_responses, skip_ties=skip_ties, score_field=score_field)
    tok = raw.map(lambda r: tokenize_row(r, tokenizer, **kwargs), remove_columns=raw.column_names,
                  num_proc=num_proc, desc=f"tokenizing ({fmt})")
    counts = Counter({"rows": len(tok)})
    for reasons in tok["dropped"]:
        counts.update(f"response:{r}" for r in reasons)
    counts.update(f"row:{s}" for s in tok["skip"] if s)
    kept = tok.filter(lambda s: s == "", input_columns="skip").remove_columns(["dropped", "skip"])
    counts["kept"] = len(kept)
    if log is not None:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if ":" in k) or "none"
        log(f"data ({fmt}): {counts['rows']} rows, {counts['kept']} kept; skipped: {detail}")
    return kept, dict(counts)


# --------------------------------------------------------------------------------------------- batching
def collate(rows: list[dict], *, pad_id: int, ignore_index: int = -100) -> dict:
    """Pad a list of tokenized rows to ``[B, K, T]`` (K = most responses in the batch).

    ``labels[b, k, t]`` is the token predicted from position t, i.e. ``input_ids[b, k, t + 1]`` where that
    token is a response token, else ``ignore_index`` (prompt, padding, last position).
    """
    B = len(rows)
    K = max(len(r["response_ids"]) for r in rows)
    T = max(len(r["prompt_ids"]) + len(resp) for r in rows for resp in r["response_ids"])
    input_ids = torch.full((B, K, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, K, T), dtype=torch.long)
    labels = torch.full((B, K, T), ignore_index, dtype=torch.long)
    scores = torch.zeros((B, K), dtype=torch.float32)
    response_mask = torch.zeros((B, K), dtype=torch.bool)
    has_ref = all("ref_logps" in r for r in rows)
    ref_logps = torch.zeros((B, K), dtype=torch.float32) if has_ref else None
    for b, r in enumerate(rows):
        p = list(r["prompt_ids"])
        for k, resp in enumerate(r["response_ids"]):
            ids = torch.tensor(p + list(resp), dtype=torch.long)
            n = ids.numel()
            input_ids[b, k, :n] = ids
            attention_mask[b, k, :n] = 1
            labels[b, k, len(p) - 1 : n - 1] = ids[len(p):]  # hidden[t] predicts token t + 1
            scores[b, k] = r["scores"][k]
            response_mask[b, k] = True
            if has_ref:
                ref_logps[b, k] = r["ref_logps"][k]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "scores": scores,
             "response_mask": response_mask}
    if has_ref:
        batch["ref_logps"] = ref_logps
    return batch


def steps_per_epoch(n_rows: int, global_batch_size: int) -> int:
    if n_rows < global_batch_size:
        raise ValueError(f"{n_rows} training rows are fewer than one global batch ({global_batch_size})")
    return n_rows // global_batch_size


def global_batch_indices(n_rows: int, step: int, global_batch_size: int, seed: int) -> list[int]:
    """Row indices of optimizer step ``step`` (0-based): epoch-wise seeded shuffles, incomplete batch dropped.

    A pure function of its arguments, so the data order of a resumed run is that of an uninterrupted one.
    """
    spe = steps_per_epoch(n_rows, global_batch_size)
    epoch, pos = divmod(step, spe)
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[pos * global_batch_size : (pos + 1) * global_batch_size].tolist()


def micro_batch_indices(global_indices: list[int], micro_step: int, rank: int, world_size: int,
                        per_device_batch_size: int) -> list[int]:
    """This rank's share of micro-step ``micro_step``: the global batch is cut into (micro, rank) pieces."""
    start = (micro_step * world_size + rank) * per_device_batch_size
    return global_indices[start : start + per_device_batch_size]
