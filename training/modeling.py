"""The model: loading it (a hub id, a local directory or the embedded tiny Llama), LoRA, saving it, and the
trained module, a causal LM whose preference loss is computed inside ``forward`` through the fused op.

Why a wrapper module: the fused op reads the LM-head weight directly (it never calls the head, so full
``[tokens, V]`` logits are never built). Sharded data-parallel engines only materialize a parameter inside
the forward of a module that owns it:

- DDP: nothing special; gradients of the head and decoder are all-reduced as usual.
- FSDP (training/configs/fsdp.yaml, FSDP2): this module is the root (decoder layers become their own units
  by the transformer auto-wrap policy; embeddings, final norm and LM head stay in the root unit). The root's
  parameters are all-gathered before ``PreferenceModel.forward`` and again before its backward, exactly as
  for a plain ``nn.Linear`` head that saves its weight for backward, so the op sees the full head weight.
- DeepSpeed ZeRO-3: parameters are gathered by per-module forward hooks, and the head's own forward never
  runs, so the head weight (and bias) is registered as an *external parameter* of this module with
  ``deepspeed.zero.register_external_parameter``: ZeRO gathers it around this module's forward and backward.
  ``GatheredParameters`` is not used for training: the op's autograd saves the weight for its backward,
  which runs after such a context has re-partitioned it.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from mppo_kernels import fused_packed_likelihood, fused_sequence_likelihood
from mppo_kernels.fused_loss import fused_packed_preference_loss, fused_preference_loss
from mppo_kernels.losses import LOSSES, preference_loss
from training import embedded, packing
from training.data import IGNORE_INDEX
from training.heads import head_transform
from training.options import UsageError


def load_model_and_tokenizer(args):
    """``(model, tokenizer)``: ``--model`` from the hub or a directory, else the embedded tiny Llama."""
    if args.model is None:
        tokenizer = embedded.build_char_tokenizer()
        model = embedded.build_tiny_llama(tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers,
                                          num_heads=args.num_heads, max_positions=max(64, args.max_length),
                                          seed=args.seed)
        if args.dtype not in ("float32", "auto"):
            model = model.to(getattr(torch, args.dtype))
        return model, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, "tokenizer" if args.tokenizer else "model", args.tokenizer or args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": getattr(torch, args.dtype) if args.dtype != "auto" else "auto"}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    model = _from_pretrained(AutoModelForCausalLM, "model", args.model, **kwargs)
    return model, tokenizer


def _from_pretrained(auto_class, option: str, name: str, **kwargs):
    """``auto_class.from_pretrained``; a path or hub id that cannot be loaded is reported in one line."""
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:  # missing files, offline hub, unknown architecture
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"--{option} {name}: cannot load it ({type(e).__name__}: {first})") from None


def apply_lora(model, args):
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r,
                        lora_dropout=args.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def save_final_model(accelerator, pm, tokenizer, path: str):
    """Save the policy (adapter only for LoRA) and tokenizer; the full state is gathered under FSDP/ZeRO-3."""
    state = accelerator.get_state_dict(pm)
    unwrapped = accelerator.unwrap_model(pm)
    if accelerator.is_main_process:
        policy_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        unwrapped.model.save_pretrained(path, state_dict=policy_state, save_function=accelerator.save)
        tokenizer.save_pretrained(path)
    accelerator.wait_for_everyone()


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft → transformers


def decoder_of(model) -> nn.Module:
    """The decoder backbone (``LlamaModel`` of a ``LlamaForCausalLM``): last hidden states, no logits."""
    base = _base(model)
    if hasattr(base, "get_decoder"):
        dec = base.get_decoder()
        if dec is not None and dec is not base:
            return dec
    return getattr(base, base.base_model_prefix)


def head_of(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = _base(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def last_hidden(model, input_ids, attention_mask, response_mask) -> torch.Tensor:
    """``[B, K, T, D]`` decoder output; padding responses (``response_mask`` False) are not run, left 0."""
    B, K, T = input_ids.shape
    out = decoder_of(model)(
        input_ids=input_ids[response_mask], attention_mask=attention_mask[response_mask], use_cache=False
    ).last_hidden_state  # [N, T, D], N = number of real responses
    hidden = out.new_zeros(B, K, T, out.shape[-1])
    hidden[response_mask] = out
    return hidden


def packed_hidden(model, packed: dict) -> torch.Tensor:
    """``[R, L, D]`` decoder output of a packed batch (``training.packing``): every prompt run once, its
    responses after it under the prefix-sharing mask, with the position ids of the padded layout."""
    decoder = decoder_of(model)
    # An eager mask is added to the scores, in the dtype transformers gives its own (the embeddings').
    mask = packing.attention_mask(decoder, packed, decoder.get_input_embeddings().weight.dtype)
    return decoder(input_ids=packed["input_ids"], attention_mask=mask, position_ids=packed["position_ids"],
                   use_cache=False).last_hidden_state


class PreferenceModel(nn.Module):
    """Owns the policy (and, when needed, a frozen reference copy) and returns the loss from ``forward``.

    Reference log-probs come, in order of preference, from the batch (``--precompute-ref``), from the
    policy with its LoRA adapter disabled (no copy), or from a frozen deep copy of the initial model.
    """

    def __init__(self, model, loss_name: str, *, hparams: dict | None = None, ignore_index: int = IGNORE_INDEX,
                 reference: str = "auto", zero3: bool = False):
        super().__init__()
        if loss_name not in LOSSES:
            raise ValueError(f"unknown loss {loss_name!r}; choose from {sorted(LOSSES)}")
        if reference not in ("auto", "precomputed"):
            raise ValueError(f"reference must be 'auto' or 'precomputed', got {reference!r}")
        self.model = model
        self.loss_name = loss_name
        self.spec = LOSSES[loss_name]
        self.hparams = dict(hparams or {})
        self.ignore_index = ignore_index
        self.reference = reference
        self.uses_adapter_ref = False
        self.ref_model = None
        if self.spec.needs_reference and reference == "auto":
            if hasattr(model, "disable_adapter"):
                self.uses_adapter_ref = True
            elif zero3:
                # Under ZeRO-3 the weights may already be partitioned (zero.Init at load time), and a deep
                # copy of a partitioned module is not a usable model.
                raise ValueError(
                    f"--loss {loss_name} needs reference log-probs; under DeepSpeed ZeRO-3 pass --precompute-ref "
                    "(computed once with the initial policy) or train a LoRA adapter (--lora-r), whose disabled "
                    "adapter is the reference")
            else:
                self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        # The op's logit scale and soft-cap of each model's head, read once: a head the op cannot express
        # fails here, before anything is trained.
        self.head_transform = head_transform(model)
        self.ref_head_transform = head_transform(self.ref_model) if self.ref_model is not None else self.head_transform
        if zero3:
            import deepspeed  # only reached under accelerate's DeepSpeed integration, which imports it anyway

            for p in head_of(self.model):
                if p is not None:
                    deepspeed.zero.register_external_parameter(self, p)

    def _head(self, model, dtype):
        weight, bias = head_of(model)
        return weight.to(dtype), (bias.to(dtype) if bias is not None else None)  # autocast: hidden is bf16

    def _transform(self, model) -> dict:
        """``logit_scale`` / ``softcap`` keywords of the op for ``model`` (the policy or the reference copy)."""
        return (self.ref_head_transform if model is self.ref_model else self.head_transform)._asdict()

    def policy_logps(self, input_ids=None, attention_mask=None, labels=None, response_mask=None, packed=None,
                     reduction: str = "mean") -> torch.Tensor:
        """``[B, K]`` log-likelihood of the policy through the training path (decoder, LM head, op; padded or
        ``packed`` batch as in ``forward``), NaN at padding: what the start-up parity probe
        (``training.heads.parity_probe``) checks against the model's own logits."""
        if packed is not None:
            return self._packed_logps(self.model, packed, response_mask, reduction)
        hidden = last_hidden(self.model, input_ids, attention_mask, response_mask)
        weight, bias = self._head(self.model, hidden.dtype)
        return fused_sequence_likelihood(hidden, weight, labels, bias=bias, ignore_index=self.ignore_index,
                                         reduction=reduction, sequence_mask=response_mask,
                                         **self._transform(self.model))

    @torch.no_grad()
    def reference_logps(self, input_ids, attention_mask, labels, response_mask, packed=None) -> torch.Tensor:
        """``[B, K]`` reference log-likelihood (the loss's reduction; NaN at padding) through the op's
        forward-only path; of the ``packed`` batch when given (``input_ids``, ``attention_mask``, ``labels``
        unused)."""
        if self.uses_adapter_ref:
            model, ctx = self.model, self.model.disable_adapter()
        else:
            model, ctx = (self.ref_model if self.ref_model is not None else self.model), contextlib.nullcontext()
        with ctx:
            if packed is not None:
                return self._packed_logps(model, packed, response_mask, self.spec.reduction)
            hidden = last_hidden(model, input_ids, attention_mask, response_mask)
            weight, bias = self._head(model, hidden.dtype)
            return fused_sequence_likelihood(hidden, weight, labels, bias=bias, ignore_index=self.ignore_index,
                                             reduction=self.spec.reduction, sequence_mask=response_mask,
                                             **self._transform(model))

    def _packed_logps(self, model, packed: dict, response_mask, reduction: str) -> torch.Tensor:
        """``[B, K]`` log-likelihoods of a packed batch under ``model``, NaN at padding responses."""
        hidden = packed_hidden(model, packed)  # [R, L, D]
        weight, bias = self._head(model, hidden.dtype)
        return fused_packed_likelihood(
            hidden, weight, packed["rows"], packed["targets"], packed["seq_ids"], response_mask.numel(), bias=bias,
            ignore_index=self.ignore_index, reduction=reduction, sequence_mask=response_mask.reshape(-1),
            **self._transform(model),
        ).view(response_mask.shape)

    def forward(self, input_ids=None, attention_mask=None, labels=None, scores=None, response_mask=None,
                ref_logps=None, mode: str = "train", packed=None):
        """``mode="train"``: ``(loss, metrics)`` through ``fused_preference_loss``.
        ``mode="eval"``: ``(loss, logps)`` with ``logps [B, K]`` the mean log-likelihood (NaN at padding).
        ``mode="ref"``: the reference log-probs ``[B, K]`` for precomputing (policy before training).
        A ``packed`` batch (``training.packing.pack_rows``) replaces ``input_ids``, ``attention_mask`` and
        ``labels``; the results are those of the padded layout."""
        if mode == "ref":
            return self.reference_logps(input_ids, attention_mask, labels, response_mask, packed)
        if self.spec.needs_reference and ref_logps is None:
            if self.reference == "precomputed":
                # The policy is no longer the initial model: computing them now would be silently wrong.
                raise ValueError(f"loss {self.loss_name!r} with reference='precomputed' needs the batch's "
                                 "ref_logps (the dataset's precomputed column is missing)")
            ref_logps = self.reference_logps(input_ids, attention_mask, labels, response_mask, packed)
        if not self.spec.needs_reference:
            ref_logps = None
        if packed is not None:
            return self._forward_packed(packed, scores, response_mask, ref_logps, mode)
        hidden = last_hidden(self.model, input_ids, attention_mask, response_mask)  # [B, K, T, D]
        weight, bias = self._head(self.model, hidden.dtype)
        if mode == "train":
            return fused_preference_loss(
                self.loss_name, hidden, weight, labels, scores, bias=bias, ref_logps=ref_logps,
                response_mask=response_mask, ignore_index=self.ignore_index, **self._transform(self.model),
                **self.hparams)
        if mode == "eval":
            sum_logps = fused_sequence_likelihood(hidden, weight, labels, bias=bias, ignore_index=self.ignore_index,
                                                  reduction="sum", sequence_mask=response_mask,
                                                  **self._transform(self.model))  # [B, K]
            mean_logps = sum_logps / (labels != self.ignore_index).sum(-1).clamp_min(1)
            logps = mean_logps if self.spec.reduction == "mean" else sum_logps
            loss = preference_loss(self.loss_name, logps, scores, ref_logps=ref_logps,
                                   response_mask=response_mask, **self.hparams)
            return loss, mean_logps
        raise ValueError(f"mode must be 'train', 'eval' or 'ref', got {mode!r}")

    def _forward_packed(self, packed: dict, scores, response_mask, ref_logps, mode: str):
        """``forward`` of a packed batch: the same outputs through the op's packed form."""
        if mode == "train":
            hidden = packed_hidden(self.model, packed)  # [R, L, D]
            weight, bias = self._head(self.model, hidden.dtype)
            return fused_packed_preference_loss(
                self.loss_name, hidden, weight, packed["rows"], packed["targets"], packed["seq_ids"], scores,
                bias=bias, ref_logps=ref_logps, response_mask=response_mask, ignore_index=self.ignore_index,
                **self._transform(self.model), **self.hparams)
        if mode == "eval":
            sum_logps = self._packed_logps(self.model, packed, response_mask, "sum")  # [B, K]
            counts = torch.bincount(packed["seq_ids"], minlength=response_mask.numel()).view(response_mask.shape)
            mean_logps = sum_logps / counts.clamp_min(1)
            logps = mean_logps if self.spec.reduction == "mean" else sum_logps
            loss = preference_loss(self.loss_name, logps, scores, ref_logps=ref_logps,
                                   response_mask=response_mask, **self.hparams)
            return loss, mean_logps
        raise ValueError(f"mode must be 'train', 'eval' or 'ref', got {mode!r}")
