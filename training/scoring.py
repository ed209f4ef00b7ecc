"""Scorers of (prompt, response) pairs for augment.py: a reward model (``AutoModelForSequenceClassification``
with a scalar head, on the chat-formatted conversation) or a Python function given as ``module:function``.
Each returns one finite float per pair, or None for a pair it cannot score (an unscorable response)."""

from __future__ import annotations

import importlib
import math
import os
import sys

import torch

from training.data import DataError, prompt_token_ids, to_score


class ScorerError(ValueError):
    """A scorer that cannot be loaded or that fails; one line naming the option."""


def conversation_ids(tokenizer, prompt, response: str) -> list[int]:
    """The reward model's input: the prompt and the response as one chat, through the tokenizer's chat template
    when it has one, else as the trainer tokenizes them (BOS + prompt, then the response and EOS)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt_token_ids(tokenizer, prompt) + tokenizer(response, add_special_tokens=False)["input_ids"] + eos


class RewardModelScorer:
    """``AutoModelForSequenceClassification.from_pretrained(name)``; its one logit (``num_labels == 1``), taken by
    transformers at the last non-padding token, is the score. A conversation longer than ``max_length`` tokens
    (default: the model's ``max_position_embeddings``) is unscorable rather than scored truncated."""

    def __init__(self, name: str, *, dtype: str = "float32", batch_size: int = 16, max_length: int | None = None,
                 device=None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from training.modeling import _from_pretrained

        self.name, self.batch_size = name, batch_size
        self.tokenizer = _from_pretrained(AutoTokenizer, "reward-model", name)
        kwargs = {"dtype": getattr(torch, dtype) if dtype != "auto" else "auto"}
        self.model = _from_pretrained(AutoModelForSequenceClassification, "reward-model", name, **kwargs)
        if self.model.config.num_labels != 1:
            raise ScorerError(f"--reward-model {name}: expected a scalar head (num_labels=1), got "
                              f"num_labels={self.model.config.num_labels}")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # transformers needs it to find each row's last token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", None)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()

    def describe(self) -> dict:
        return {"reward_model": self.name, "max_length": self.max_length,
                "revision": getattr(self.model.config, "_commit_hash", None)}

    @torch.no_grad()
    def __call__(self, pairs: list[tuple]) -> list[float | None]:
        ids = []
        for prompt, response in pairs:
            try:
                x = conversation_ids(self.tokenizer, prompt, response)
            except DataError:
                x = None
            ids.append(x if x and (self.max_length is None or len(x) <= self.max_length) else None)
        scores = [None] * len(pairs)
        todo = [i for i, x in enumerate(ids) if x is not None]
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(todo), self.batch_size):
            rows = [ids[i] for i in todo[start : start + self.batch_size]]
            width = max(map(len, rows))
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in rows], device=self.device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in rows], device=self.device)
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist()  # [B]
            for i, v in zip(todo[start : start + self.batch_size], logits):
                scores[i] = v if math.isfinite(v) else None
        return scores


class FunctionScorer:
    """``module:function`` called as ``function(prompt, response)``; a return value that is not a finite
    number (None, NaN, "N/A") makes the response unscorable. The current directory is importable, as with
    ``python -m``."""

    def __init__(self, spec: str):
        module, _, name = spec.partition(":")
        if not module or not name:
            raise ScorerError(f"--scorer expects module:function, got {spec!r}")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ScorerError(f"--scorer {spec}: cannot import {module} ({type(e).__name__}: {e})") from None
        self.fn = getattr(mod, name, None)
        if not callable(self.fn):
            raise ScorerError(f"--scorer {spec}: {module} has no function {name}")
        self.spec = spec

    def describe(self) -> dict:
        return {"scorer": self.spec}

    def __call__(self, pairs: list[tuple]) -> list[float | None]:
        out = []
        for i, (prompt, response) in enumerate(pairs):
            try:
                out.append(to_score(self.fn(prompt, response)))
            except Exception as e:  # the user's function: report it as one line naming the pair
                raise ScorerError(f"--scorer {self.spec} raised {type(e).__name__}: {e} (prompt {prompt!r:.80}, "
                                  f"response {response!r:.80})") from None
        return out


class VerifierScorer(FunctionScorer):
    """The embedded task's own verifier (``embedded.verifier``): correct characters against the computed answer."""

    def __init__(self, task: str, length: int):
        from training import embedded

        self.fn, self.spec = embedded.verifier(task, length), f"training.embedded.verifier({task!r}, {length})"
