"""Prompts for augment.py: read from a seed dataset in any of the trainer's four schemas or from a plain list
(text or JSON Lines), deduplicated, and new prompts written by a generation model from few-shot seed prompts
(the first step of the Multi-DPO recipe, arXiv 2412.07812), deduplicated against the seed and each other."""

from __future__ import annotations

import json
import random
from collections import Counter

from training import data as D
from training.generation import Sampling, batch_seed, encode_prompts, generate


def text_of(prompt) -> str:
    """A prompt's text: the string, or its messages' contents one per line."""
    return prompt if isinstance(prompt, str) else "\n".join(m.get("content") or "" for m in prompt)


def prompt_key(prompt) -> str:
    """What two prompts must share to count as duplicates: the text with case and runs of whitespace ignored
    (and the roles of chat messages kept)."""
    if isinstance(prompt, str):
        return " ".join(prompt.split()).casefold()
    return json.dumps([[m.get("role"), " ".join((m.get("content") or "").split()).casefold()] for m in prompt])


def read_prompt_list(path: str) -> list:
    """A ``.txt`` file (one prompt per line) or ``.jsonl`` file (per line a JSON string, or an object whose
    ``prompt`` is a string or chat messages); DataError naming the line otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise D.DataError(f"--prompts {path}: cannot read it ({type(e).__name__}: {e})") from None
    if not path.endswith(".jsonl"):
        return [line for line in lines if line.strip()]
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise D.DataError(f"{path} line {n}: invalid JSON: {e.msg} (column {e.colno})") from None
        if isinstance(row, dict) and "prompt" in row:
            row = row["prompt"]
        if not _is_prompt(row):
            raise D.DataError(f"{path} line {n}: expected a prompt (a string, chat messages, or an object with a "
                              f"'prompt' field), got {type(row).__name__} {json.dumps(row)[:60]}")
        out.append(row)
    return out


def _is_prompt(x) -> bool:
    return isinstance(x, str) or (isinstance(x, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, type(None)))
        for m in x))


def read_seed_dataset(source: str, fmt: str | None = None, split: str | None = None) -> list:
    """The prompts of a dataset in any schema the trainer reads (``training.data.normalize_row``)."""
    raw = D.load_raw_dataset(source, split)
    fmt = fmt or D.detect_format(raw.column_names)
    out = []
    for i, row in enumerate(raw):
        try:
            out.append(D.normalize_row(row, fmt)[0])
        except D.DataError as e:
            raise D.DataError(f"{source} row {i}, {e}") from None
    return out


def deduplicate(prompts, counts: Counter, seen: set | None = None) -> list:
    """``prompts`` without empty ones and without repeats of an earlier one (``prompt_key``), counted in
    ``counts`` as ``prompt:empty`` / ``prompt:duplicate``; ``seen`` collects the keys kept."""
    seen = set() if seen is None else seen
    out = []
    for p in prompts:
        key = prompt_key(p)
        if not text_of(p).strip():
            counts["prompt:empty"] += 1
        elif key in seen:
            counts["prompt:duplicate"] += 1
        else:
            seen.add(key)
            out.append(p)
    return out


FEW_SHOT = ("Here are {k} example prompts, one per line:\n{examples}\nWrite one new prompt of the same kind, "
            "different from all of these. Reply with the new prompt only, on one line.")


def few_shot_request(examples: list) -> str:
    lines = "\n".join(f"- {' '.join(text_of(p).split())}" for p in examples)
    return FEW_SHOT.format(k=len(examples), examples=lines)


def parse_new_prompt(text: str) -> str:
    """The first non-empty line of the model's reply, without a list marker or surrounding quotes."""
    line = next((x.strip() for x in text.split("\n") if x.strip()), "")
    line = line[2:].strip() if line.startswith(("- ", "* ")) else line
    return line.strip().strip('"').strip()


def write_new_prompts(model, tokenizer, seeds: list, n: int, counts: Counter, *, few_shot: int, sampling: Sampling,
                      seed: int, batch_size: int, max_attempts: int | None = None, progress=None) -> list[str]:
    """Up to ``n`` new prompts, each written by ``model`` from ``few_shot`` seed prompts drawn at random,
    kept only when non-empty and new (``prompt_key``) against ``seeds`` and each other; counted in ``counts``
    as ``new_prompts_written`` and the drops ``new_prompt:empty`` / ``new_prompt:duplicate``. Gives up after
    ``max_attempts`` requests (default ``4 n``)."""
    if not seeds:
        raise D.DataError("--new-prompts needs seed prompts to show the generation model")
    rng = random.Random(f"new-prompts-{seed}")
    seen = {prompt_key(p) for p in seeds}
    max_attempts = max_attempts or 4 * n
    new, attempts, j = [], 0, 0
    while len(new) < n and attempts < max_attempts:
        size = min(batch_size, max_attempts - attempts)
        requests = [few_shot_request(rng.sample(seeds, min(few_shot, len(seeds)))) for _ in range(size)]
        texts, _ = generate(model, tokenizer, encode_prompts(tokenizer, requests), sampling, seed=batch_seed(seed, j))
        attempts, j = attempts + size, j + 1
        for (text,) in texts:
            prompt = parse_new_prompt(text)
            if not prompt:
                counts["new_prompt:empty"] += 1
            elif prompt_key(prompt) in seen:
                counts["new_prompt:duplicate"] += 1
            elif len(new) < n:
                seen.add(prompt_key(prompt))
                new.append(prompt)
                counts["new_prompts_written"] += 1
        if progress is not None:
            progress(len(new), attempts)
    return new
