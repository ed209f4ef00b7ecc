"""Batched generation with a causal LM (``model.generate``, KV cache): prompts encoded as the trainer encodes
them (``training.data.prompt_token_ids``: the chat template with the generation prompt, else BOS + text),
left-padded into one batch, the new tokens decoded up to the first EOS.

Sampling is reproducible per batch: batch ``j`` of a prompt list (prompts ``[j*B, (j+1)*B)``) draws from a
generator seeded with ``(seed, j)``, so the samples of a prompt depend only on the model, the prompt list,
the batch size and the seed; a resumed run regenerates the same samples as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.data import prompt_token_ids


@dataclass(frozen=True)
class Sampling:
    """What ``model.generate`` is told; fields left out inherit the model's ``generation_config``."""

    max_new_tokens: int
    num_samples: int = 1  # K responses per prompt
    do_sample: bool = False  # False: greedy (num_samples must be 1)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off (transformers would otherwise fill in 50)

    def generation_config(self, model, tokenizer):
        from transformers import GenerationConfig

        eos = getattr(model.generation_config, "eos_token_id", None)
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                      num_return_sequences=self.num_samples, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=eos if eos is not None else tokenizer.eos_token_id)
        if self.do_sample:  # set for greedy decoding, transformers warns that they are ignored
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return GenerationConfig(**kwargs)


def stop_ids(config) -> set[int]:
    eos = config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def encode_prompts(tokenizer, prompts, max_prompt_length: int | None = None) -> list[list[int]]:
    """Token ids of each prompt (a string or chat messages), the end kept when longer than ``max_prompt_length``."""
    ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    return [x[-max_prompt_length:] for x in ids] if max_prompt_length else ids


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], sampling: Sampling, *, seed: int | None = None):
    """One ``model.generate`` call for a batch of prompts: ``(texts, finished)``, each ``[len(prompt_ids)]``
    lists of ``sampling.num_samples``; ``finished`` says whether the response ended with EOS (else it was cut
    at ``max_new_tokens``). ``seed`` seeds the sampling without touching the global RNG's state."""
    if not prompt_ids or any(len(x) == 0 for x in prompt_ids):
        raise ValueError("generate needs at least one prompt, each with at least one token")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    width = max(len(x) for x in prompt_ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in prompt_ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompt_ids], device=device)
    config = sampling.generation_config(model, tokenizer)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    finally:
        model.train(was_training)
    stops, k = stop_ids(config), sampling.num_samples
    texts, finished = [], []
    for row in out[:, width:].tolist():  # [len(prompt_ids) * K, new tokens], the K samples of a prompt adjacent
        end = next((i for i, t in enumerate(row) if t in stops), None)
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
        finished.append(end is not None)
    return ([texts[i : i + k] for i in range(0, len(texts), k)],
            [finished[i : i + k] for i in range(0, len(finished), k)])


def batch_seed(seed: int, batch_index: int) -> int:
    return seed * 1_000_003 + batch_index


def sample_batches(model, tokenizer, prompt_ids: list[list[int]], sampling: Sampling, *, batch_size: int,
                   seed: int, skip=lambda start, stop: False):
    """``(start, texts, finished)`` for each batch ``[start, start + batch_size)`` of ``prompt_ids``, seeded
    by ``(seed, batch index)``; ``skip(start, stop)`` True leaves a batch out (resuming)."""
    for j, start in enumerate(range(0, len(prompt_ids), batch_size)):
        stop = min(start + batch_size, len(prompt_ids))
        if skip(start, stop):
            continue
        texts, finished = generate(model, tokenizer, prompt_ids[start:stop], sampling, seed=batch_seed(seed, j))
        yield start, texts, finished
