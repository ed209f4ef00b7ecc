"""What a causal LM does to its logits after the LM head, and the start-up probe that the training path
computes the same likelihood as the model's own ``forward(...).logits``.

The fused op computes ``log_softmax(c·tanh(s·(h·Wᵀ + b) / c))`` (``mppo_kernels.reference.transform_logits``):
a logit scale ``s`` and a soft-cap ``c``. ``head_transform`` reads them from the config, family by family
as each ``*ForCausalLM.forward`` of transformers 5.x applies them after (or, for a bias-free head, before)
``lm_head``:

- ``final_logit_softcapping`` (Gemma-2/3/3n/4, VaultGemma, NanoChat, Inkling-2, any config that has it):
  ``c·tanh(z / c)``; RecurrentGemma's ``logits_soft_cap`` and xLSTM's ``output_logit_soft_cap`` likewise.
- Cohere's ``logit_scale`` and Falcon-H1's ``lm_head_multiplier``: ``z·s``. HyperCLOVA X multiplies by its
  ``logits_scaling``, Granite divides by its own (``s = 1 / logits_scaling``).
- MiniCPM3 (``logits_scaling = hidden_size / dim_model_base``) and Inkling (``logits_mup_width_multiplier``)
  divide the hidden states before a bias-free head, which is ``s = 1 / m`` on the logits.

What the two transforms cannot express is refused by name (a head module with its own ``forward``, e.g.
Dory's per-token logit scale or a LoRA adapter on the head; a prediction head between the decoder and the
output embedding; a vocabulary cut after the head). Everything else, including remote-code models and
subclasses this table cannot know, is checked by ``parity_probe`` on real rows before training.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from torch import nn

from mppo_kernels.reference import transform_logits
from training.options import UsageError

# model_type (of the text config) -> (how, config field), for the families that do not name their transform
# ``final_logit_softcapping`` (which every other family is read by, as a soft-cap).
_RULES = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe", "cohere_compass_text"), ("multiply", "logit_scale")),
    "falcon_h1": ("multiply", "lm_head_multiplier"),
    "hyperclovax": ("multiply", "logits_scaling"),  # MuP: the opposite of Granite's use of the same field
    **dict.fromkeys(("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid",
                     "granitemoeshared"), ("divide", "logits_scaling")),
    "minicpm3": ("divide hidden", "logits_scaling"),
    "inkling_text": ("divide hidden", "logits_mup_width_multiplier"),
    "recurrent_gemma": ("softcap", "logits_soft_cap"),
    "xlstm": ("softcap", "output_logit_soft_cap"),
}

# Heads that read the decoder output through more than a linear map, or cut the vocabulary after it.
_REFUSED = {
    "modernbert-decoder": "its logits come from a prediction head (dense, activation, norm) between the "
                          "decoder's output and the output embedding",
    "gemma4_assistant": "its logits come from a projected state and an ordered-embedding lookup",
    "gemma4_unified_assistant": "its logits come from a projected state and an ordered-embedding lookup",
}

# The rows compared: few and short, so that the check costs one small fp32 forward (two prompts of at most
# 96 tokens, each with two responses of at most 32).
PROBE_PROMPTS, PROBE_RESPONSES, PROBE_PROMPT_TOKENS, PROBE_RESPONSE_TOKENS = 2, 2, 96, 32
PROBE_TOLERANCE = 1e-4  # nats per token, absolute and relative: fp32 summation order gives ~1e-6


class HeadTransform(NamedTuple):
    """The op's ``logit_scale`` and ``softcap`` for a model; None is none. ``**t._asdict()`` passes them."""

    logit_scale: float | None = None
    softcap: float | None = None


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft -> transformers


def _name(model) -> str:
    return type(_base(model)).__name__


def _text_config(model):
    config = _base(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _number(model, cfg, field: str) -> float | None:
    """``cfg.<field>`` as a positive finite float (None when unset); anything else is one clear line."""
    value = getattr(cfg, field, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise UsageError(f"{_name(model)}: config.{field} = {value!r} is not a positive finite number, so its "
                         "logit transform cannot be reproduced")
    return float(value)


def _read(model) -> tuple[HeadTransform, list[str]]:
    """The transform and the config fields it was read from (``["config.logit_scale = 0.0625"]``)."""
    base = _base(model)
    head = base.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise UsageError(f"{_name(model)} has no LM-head weight (get_output_embeddings() is {type(head).__name__})")
    if type(head).forward is not nn.Linear.forward:
        # The op reads head.weight and head.bias only: whatever the module's own forward adds is lost.
        raise UsageError(f"{_name(model)}: its LM head is a {type(head).__module__}.{type(head).__name__} with its "
                         "own forward (a per-token scale, a quantized or adapted head: LoRA on the LM head is not "
                         "supported), which the fused op, reading only its weight and bias, cannot reproduce")
    cfg = _text_config(model)
    model_type = getattr(cfg, "model_type", "")
    if model_type in _REFUSED:
        raise UsageError(f"{_name(model)} ({model_type}) is not supported: {_REFUSED[model_type]}, which the fused "
                         "op cannot express")
    scale = cap = None
    fields = []
    how, field = _RULES.get(model_type, ("softcap", "final_logit_softcapping"))
    value = _number(model, cfg, field)
    if value is not None:
        fields.append(f"config.{field} = {value:g}")
        if how == "softcap":
            cap = value
        elif how == "multiply":
            scale = value
        else:  # divide, divide hidden
            scale = 1.0 / value
            if how == "divide hidden" and getattr(head, "bias", None) is not None:
                raise UsageError(f"{_name(model)} divides its hidden states by config.{field} before an LM head "
                                 "with a bias, which no logit scale reproduces")
    if model_type == "inkling_text":
        unpadded = getattr(cfg, "unpadded_vocab_size", None)
        if unpadded is not None and unpadded < head.weight.shape[0]:
            raise UsageError(f"{_name(model)} cuts its logits to config.unpadded_vocab_size = {unpadded} of the LM "
                             f"head's {head.weight.shape[0]} rows, which the fused op does not do")
    if scale == 1.0:
        scale = None  # the plain head, exactly as without the field
    return HeadTransform(scale, cap), fields


def head_transform(model) -> HeadTransform:
    """``(logit_scale, softcap)`` that make the op compute ``model``'s own logits; a head the two cannot
    express raises ``UsageError`` naming it. Reads the config only (no device work; fine under ZeRO-3)."""
    return _read(model)[0]


def describe(model) -> str:
    """One phrase for logs and errors: ``"logit_scale 0.0625 (config.logit_scale = 0.0625)"``."""
    t, fields = _read(model)
    parts = [f"{k} {v:g}" for k, v in t._asdict().items() if v is not None]
    return f"{', '.join(parts)} ({'; '.join(fields)})" if parts else "none (plain LM head)"


@contextlib.contextmanager
def _fp32_eval(model):
    """``model`` in fp32 and eval mode, with TF32 off, restored exactly afterwards (bf16/fp16 -> fp32 -> back
    is lossless). In place, so the memory is that of one fp32 copy, not two."""
    changed = []
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                    changed.append((t, t.dtype))
                    t.data = t.data.float()  # .data keeps the Parameter (and tied weights) the same object
    modes = [(m, m.training) for m in model.modules()]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for m, training in modes:
            m.training = training
        for t, dtype in changed:
            t.data = t.data.to(dtype)


def probe_rows(ds, prompts: int = PROBE_PROMPTS, responses: int = PROBE_RESPONSES,
               prompt_tokens: int = PROBE_PROMPT_TOKENS, response_tokens: int = PROBE_RESPONSE_TOKENS) -> list[dict]:
    """The first ``prompts`` rows of a tokenized dataset, each cut to its first ``responses`` responses, the
    prompt's last ``prompt_tokens`` and each response's first ``response_tokens`` tokens: real rows, short
    enough that the probe costs one small fp32 forward."""
    cols = ds[list(range(min(prompts, len(ds))))]
    rows = []
    for row in (dict(zip(cols, vals)) for vals in zip(*cols.values())):
        rows.append({"prompt_ids": list(row["prompt_ids"])[-prompt_tokens:],
                     "response_ids": [list(r)[:response_tokens] for r in row["response_ids"][:responses]],
                     "scores": list(row["scores"])[:responses]})
    if not rows:
        raise UsageError("parity probe: the training set has no rows to compare")
    return rows


def own_logps(model, batch: dict, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, K] mean log-likelihood, NaN at padding; [N, T, V] fp32 logits of the N real responses)`` from
    the model's own ``forward(...).logits`` (log-softmax, gather) on a padded ``[B, K, T]`` batch."""
    real = batch["response_mask"]
    labels = batch["labels"][real]  # [N, T]
    logits = model(input_ids=batch["input_ids"][real], attention_mask=batch["attention_mask"][real],
                   use_cache=False).logits.float()
    valid = labels != ignore_index
    token = logits.log_softmax(-1).gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    out = torch.full(real.shape, float("nan"), dtype=logits.dtype, device=logits.device)
    out[real] = (token * valid).sum(-1) / valid.sum(-1).clamp_min(1)
    return out, logits


def parity_probe(pm, ds, tokenizer, make_batch=None, *, tolerance: float = PROBE_TOLERANCE) -> dict:
    """Compare, in fp32 and eval mode, the per-sequence mean log-likelihood of the training path
    (``pm.policy_logps``: decoder, LM-head weight, the op with ``head_transform``, on the batch layout
    ``make_batch`` builds, padded by default) with the model's own ``forward(...).logits``, on a few short
    rows of the tokenized dataset ``ds`` (``probe_rows``).

    Returns ``{"model", "rows", "max_abs_diff", "max_rel_diff", "transform"}``; a disagreement beyond
    ``tolerance`` (nats per token, absolute plus relative) raises ``UsageError`` naming the model class,
    the size of the disagreement and what the training path cannot reproduce.
    """
    import datasets

    from training.data import make_batch as padded_batch

    model = pm.model
    small = datasets.Dataset.from_list(probe_rows(ds))
    device = next(model.parameters()).device
    with _fp32_eval(model):
        padded = padded_batch(small, range(len(small)), tokenizer, device)
        own, logits = own_logps(model, padded, pm.ignore_index)
        batch = (make_batch or padded_batch)(small, range(len(small)), tokenizer, device)
        keys = ("input_ids", "attention_mask", "labels", "response_mask", "packed")
        ours = pm.policy_logps(**{k: v for k, v in batch.items() if k in keys}, reduction="mean")
        real = padded["response_mask"]
        own, ours = own[real].double(), ours[real].double()
        diff = (ours - own).abs()
        rel = diff / own.abs().clamp_min(1e-12)
        ok = bool(torch.isfinite(ours).all() and (diff <= tolerance * (1 + own.abs())).all())
        result = {"model": _name(model), "rows": len(own), "max_abs_diff": float(diff.max()),
                  "max_rel_diff": float(rel.max()), "transform": describe(model)}
        if not ok:
            raise UsageError(
                f"parity probe: {_name(model)}'s own forward(...).logits and the training path disagree on "
                f"{len(own)} training rows: mean log-likelihood per token differs by up to "
                f"{result['max_abs_diff']:.3g} nats (relative {result['max_rel_diff']:.3g}; tolerance {tolerance:g}) with the head transform read "
                f"from its config, {result['transform']}; {_diagnose(model, padded, logits, pm.ignore_index)}. "
                "Training would optimize a likelihood the model itself does not give; --skip-parity-probe skips "
                "this check")
    return result


def _diagnose(model, padded: dict, logits, ignore_index) -> str:
    """Which part the training path cannot reproduce, from the raw head output ``z`` on the decoder's last
    hidden state against the model's own logits at the target positions."""
    from training.modeling import decoder_of, head_of

    weight, bias = head_of(model)
    if logits.shape[-1] != weight.shape[0]:
        return (f"unsupported: its logits have {logits.shape[-1]} entries per position but its LM head "
                f"{weight.shape[0]} rows (a vocabulary cut or extension after the head)")
    real = padded["response_mask"]
    labels = padded["labels"][real]
    hidden = decoder_of(model)(input_ids=padded["input_ids"][real], attention_mask=padded["attention_mask"][real],
                               use_cache=False).last_hidden_state
    z = torch.nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    at = labels != ignore_index
    own, z = logits[at].double(), z[at].double()
    t = head_transform(model)
    expected = transform_logits(z, t.logit_scale, t.softcap)
    if (own - expected).abs().max() <= 1e-4 * (1 + own.abs().max()):
        return ("its logits are that transform of its LM head on its decoder's last hidden state, so the "
                "difference lies in the training path's own hidden states or op call, not in the model's head")
    if t != HeadTransform() and (own - z).abs().max() <= 1e-4 * (1 + own.abs().max()):
        return ("unsupported: its logits are its LM head's plain output, so its forward does not apply the "
                "transform its config names (a config field this model's code does not use)")
    k = float((own * z).sum() / (z * z).sum().clamp_min(1e-300))
    if (own - k * z).norm() <= 1e-4 * own.norm():
        return (f"unsupported: its forward multiplies the head's logits by {k:.6g}, a logit scale its config "
                "does not name as read here")
    return ("unsupported: its logits are not c·tanh(s·z / c) of its LM head's output z on the decoder's last "
            f"hidden state for that transform (max |difference| {float((own - expected).abs().max()):.3g}): a "
            "transform of the hidden states or the logits around the head that the fused op (a logit scale and a "
            "soft-cap only) cannot express")
