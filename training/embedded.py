"""The embedded default: a character tokenizer, a tiny Llama and a verifiable multi-response preference task.

Nothing is downloaded. The task is generated deterministically from a seed, and every response's quality
is checked, not judged: a prompt is a string of symbols and an instruction, the correct answer is computed
(reversed, sorted, copied or summed), and each of the K responses is the correct answer with a distinct
number of its characters corrupted. A response's score is its number of correct characters, so the best
response is unique and "does the model give the best response the highest likelihood" is measurable.

    reverse:  prompt "q7c2m9<"   responses "9m2c7q" (score 6), "9m2x7q" (5), "4m2xaq" (3), ...
"""

from __future__ import annotations

import random
import re

CHARS = "0123456789abcdefghijklmnopqrstuvwxyz+-*=<>:,. \n"
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
TASKS = ("reverse", "copy", "sort", "add")


def build_char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` built in code (no files, no downloads), no chat template.

    Characters outside ``CHARS`` (upper case, non-ASCII) become ``<unk>``; the data readers drop and count
    texts that contain it (``response:unknown_tokens``, ``row:prompt_unknown_tokens``) instead of training on them.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_llama(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     max_positions: int = 64, seed: int = 0):
    """A small ``LlamaForCausalLM`` from a ``LlamaConfig`` (untied head), initialized from ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def answer_length(task: str, length: int) -> int:
    """Characters in every answer (the top score) of ``task`` with ``length`` symbols per prompt."""
    return length + 1 if task == "add" else length


def _answer(task: str, x: str) -> str:
    if task == "reverse":
        return x[::-1]
    if task == "copy":
        return x
    if task == "sort":
        return "".join(sorted(x))
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


_MARKS = {"reverse": "<", "copy": ">", "sort": ":"}


def task_answer(prompt, task: str, length: int) -> str | None:
    """The correct answer of ``prompt``, a prompt of ``task`` with ``length`` symbols, or None when it is not one
    (another task, length or shape, or not a string): the verifier's ground truth."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if not isinstance(prompt, str):
        return None
    if task == "add":
        # Operands are written without leading zeros, so the length comes from the task, not the prompt.
        m = re.fullmatch(r"(\d{1,%d})\+(\d{1,%d})=" % (length, length), prompt)
        return str(int(m[1]) + int(m[2])).zfill(length + 1) if m else None
    x = prompt[:-1]
    if len(x) != length or not prompt.endswith(_MARKS[task]) or not set(x) <= set(CHARS) - {"\n", " "}:
        return None
    return _answer(task, x)


def correct_characters(response: str, answer: str) -> int:
    """The task's score: positions where ``response`` has the answer's character, less one for every character
    beyond the answer's length (so a response that runs on never ties the exact answer), never below 0. For
    the task's own corrupted responses, which have the answer's length, it is the plain count of correct characters."""
    matches = sum(r == a for r, a in zip(response, answer))
    return max(0, matches - max(0, len(response) - len(answer)))


def verifier(task: str, length: int):
    """``score(prompt, response) -> float | None``: ``correct_characters`` against the computed answer, None for
    a prompt that is not one of ``task`` (an unscorable response)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")

    def score(prompt, response: str) -> float | None:
        answer = task_answer(prompt, task, length)
        return None if answer is None else float(correct_characters(response, answer))

    score.__qualname__ = f"verifier({task!r}, {length})"
    return score


def _make_example(rng: random.Random, task: str, length: int, k: int, alphabet: str) -> dict:
    if task == "add":
        a, b = rng.randrange(10**length), rng.randrange(10**length)
        prompt = f"{a}+{b}="
        answer = str(a + b).zfill(length + 1)
        alphabet = "0123456789"
    else:
        x = "".join(rng.choice(alphabet) for _ in range(length))
        prompt = f"{x}{'<' if task == 'reverse' else '>' if task == 'copy' else ':'}"
        answer = _answer(task, x)
    n = len(answer)
    # Distinct error counts give distinct scores: the best response is unique (and not always perfect).
    errors = rng.sample(range(0, n + 1), k) if k <= n + 1 else [min(i, n) for i in range(k)]
    responses, scores = [], []
    for e in errors:
        chars = list(answer)
        for pos in rng.sample(range(n), e):
            chars[pos] = rng.choice([c for c in alphabet if c != answer[pos]])
        responses.append("".join(chars))
        scores.append(float(sum(c == t for c, t in zip(chars, answer))))
    return {"prompt": prompt, "responses": responses, "scores": scores}


def make_task_rows(n: int, *, task: str = "reverse", length: int = 6, k: int = 4, seed: int = 0,
                   alphabet: str = "abcdefghijklmnop") -> list[dict]:
    """``n`` rows ``{prompt, responses[k], scores[k]}`` (the local JSONL schema), reproducible from ``seed``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    rng = random.Random(f"{task}-{length}-{k}-{seed}")
    return [_make_example(rng, task, length, k, alphabet) for _ in range(n)]


def make_task_splits(n_train: int, n_eval: int, **kwargs) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows; held-out prompts never appear in train. The held-out rows are
    ``make_task_rows(n_eval, **kwargs)`` whatever ``n_train`` is, so a run on other data of the same task can
    rebuild them (``--generation-eval embedded``)."""
    rows = make_task_rows(n_train + 2 * n_eval, **kwargs)
    eval_rows = rows[:n_eval]
    seen = {r["prompt"] for r in eval_rows}
    train_rows = [r for r in rows[n_eval:] if r["prompt"] not in seen][:n_train]
    return train_rows, eval_rows
