"""train.py's options: the parser, ``parse_args`` with every check and the defaults that depend on the
model and data, the loss and its ``--hparam`` values, and ``UsageError`` for what only shows later."""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from mppo_kernels.losses import LOSSES, resolve_hparams
from training import data as D
from training import embedded


class UsageError(ValueError):
    """A model, option or run directory that cannot be used as given; printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Preference training of any causal LM with the fused sequence-likelihood op (MPPO losses and "
        "peers).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML/JSON file of option values (keys as the long options, - or _); "
                   "command-line options override it")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="hub id or local path of an AutoModelForCausalLM (default: embedded tiny Llama)")
    g.add_argument("--tokenizer", help="tokenizer id/path (default: --model's)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="dtype the weights are loaded in (bf16 autocast is separate: --mixed-precision)")
    g.add_argument("--attn-implementation", help="e.g. sdpa, flash_attention_2, eager")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
    g.add_argument("--lora-alpha", type=float, default=None, help="default: 2 * lora-r")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-target-modules", default="all-linear",
                   help="comma-separated module names or 'all-linear' (the LM head stays frozen)")
    g.add_argument("--skip-parity-probe", action="store_true",
                   help="skip the start-up check that the training path's log-likelihoods of a few training rows "
                   "equal those of the model's own forward(...).logits (fp32, eval mode; see training/heads.py)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="hub id or local .json/.jsonl/.parquet file (default: embedded task)")
    g.add_argument("--dataset-format", choices=D.FORMATS, help="schema; detected from the columns by default")
    g.add_argument("--split", help="training split (default per schema: train / train_prefs)")
    g.add_argument("--eval-split", help="held-out split (default per schema: test / test_prefs; else carved "
                   "from the training split)")
    g.add_argument("--eval-size", type=float, default=None,
                   help="held-out rows carved from train when there is no eval split: a count, or a fraction "
                   "< 1 (default 0.02, at most 1000); embedded: number of held-out prompts (default 512)")
    g.add_argument("--max-eval-rows", type=int, default=1000, help="cap on held-out rows evaluated")
    g.add_argument("--max-train-rows", type=int, default=None, help="use only the first N training rows")
    g.add_argument("--score-field", default="overall_score", choices=["overall_score", "fine-grained_score"],
                   help="UltraFeedback score to use")
    g.add_argument("--max-length", type=int, default=1024, help="prompt + response tokens")
    g.add_argument("--max-prompt-length", type=int, default=512, help="prompt tokens (left-truncated)")
    g.add_argument("--min-response-fraction", type=float, default=0.5,
                   help="drop (and count) a response that truncation leaves with less than this fraction of its tokens")
    g.add_argument("--num-proc", type=int, default=None, help="processes for tokenization")
    g.add_argument("--packing", default="prefix", choices=["prefix", "none"],
                   help="batch layout for the policy and the reference model: prefix = each prompt encoded once, "
                   "its responses after it, groups packed without padding (training/packing.py); falls back to none "
                   "(padded [B*K, T] rows), with a notice, where the model's attention cannot take the mask")
    g.add_argument("--pack-max-tokens", type=int, default=None,
                   help="tokens per packed row (default: the longest prompt group of the micro-batch; a longer group "
                   "gets a row of its own)")
    g = p.add_argument_group("embedded default (used when --model / --dataset are not given)")
    g.add_argument("--task", default="reverse", choices=embedded.TASKS)
    g.add_argument("--task-length", type=int, default=6, help="symbols per prompt (digits per number for add)")
    g.add_argument("--num-responses", type=int, default=4, help="K responses per prompt")
    g.add_argument("--train-size", type=int, default=4096, help="generated training prompts")
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--num-heads", type=int, default=4)
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="pair_mnm", help="a name in mppo_kernels.losses.LOSSES")
    g.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="loss hyperparameter, e.g. --hparam beta=0.1 (repeatable; defaults from the loss spec)")
    g.add_argument("--precompute-ref", action="store_true",
                   help="compute reference log-probs once, with the initial policy, before training")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (embedded model: 3e-3; LoRA: 5e-6; full fine-tuning: 5e-7)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    g.add_argument("--scheduler", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--per-device-batch-size", type=int, default=None, help="prompts per device per micro-step "
                   "(embedded: 32, else 1)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs of data)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the training prompts when --max-steps "
                   "is not given (embedded: 2, else 1)")
    g.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="auto: bf16/fp16 when the accelerate config asks for it, else bf16 autocast on a "
                   "bf16-capable GPU, else none (CPU)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/default")
    g.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N steps (0: only "
                   "before and after training; default: embedded 32, else 0)")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: per-device batch size")
    g.add_argument("--generation-eval", default="auto", choices=["auto", "embedded", "none"],
                   help="greedy exact match of the policy's own answers at every held-out evaluation, checked by the "
                   "embedded task's verifier: auto = on the embedded held-out prompts when training on the embedded "
                   "task; embedded = on them whatever --dataset is (data of the same --task, e.g. on-policy samples)")
    g.add_argument("--generation-eval-prompts", type=int, default=None,
                   help="held-out prompts generated (default: all of the embedded task's held-out prompts, "
                   "--eval-size; 512 with --dataset)")
    g.add_argument("--generation-batch-size", type=int, default=256, help="prompts per generate call")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: none)")
    g.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (0: all)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint dir, or the latest in --output-dir ('auto' / no value)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of another run found in --output-dir (else the run refuses to start)")
    g.add_argument("--allow-setting-changes", action="store_true",
                   help="with --resume: continue a checkpoint whose run settings differ from these (printed)")
    g.add_argument("--stop-after-steps", type=int, default=None,
                   help="stop after this many steps without changing the schedule (simulates an interruption)")
    g.add_argument("--log-every", type=int, default=1, help="JSONL/tracker record every N steps")
    g.add_argument("--report-to", default="auto", choices=["auto", "tensorboard", "none"],
                   help="accelerate tracker; auto = TensorBoard when installed")
    g.add_argument("--no-save-model", action="store_true", help="do not save the final model")
    g.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bar")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.config:
        with open(args.config) as f:
            if args.config.endswith((".yaml", ".yml")):
                import yaml

                cfg = yaml.safe_load(f) or {}
            else:
                cfg = json.load(f)
        known = {a.dest for a in parser._actions}
        cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
        unknown = sorted(set(cfg) - known)
        if unknown:
            parser.error(f"unknown keys in {args.config}: {unknown}")
        parser.set_defaults(**cfg)
    args = parser.parse_args(argv)
    is_embedded_model, is_embedded_data = args.model is None, args.dataset is None
    for name, default in (("lr", 3e-3 if is_embedded_model else 5e-6 if args.lora_r else 5e-7),
                          ("eval_every", 32 if is_embedded_data else 0), ("epochs", 2.0 if is_embedded_data else 1.0),
                          ("eval_size", 512 if is_embedded_data else None),
                          ("per_device_batch_size", 32 if is_embedded_data else 1)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if is_embedded_data:
        args.max_length = min(args.max_length, 4 * args.task_length + 8)
        args.max_prompt_length = min(args.max_prompt_length, 2 * args.task_length + 4)
    for name, low in (("per_device_batch_size", 1), ("gradient_accumulation_steps", 1), ("max_length", 2),
                      ("warmup_steps", 0), ("max_prompt_length", 1), ("task_length", 1), ("num_responses", 1), ("train_size", 1),
                      ("hidden_size", 1), ("num_layers", 1), ("num_heads", 1), ("lora_r", 0), ("log_every", 1),
                      ("eval_every", 0), ("save_every", 0), ("save_total_limit", 0), ("max_steps", 1),
                      ("stop_after_steps", 1), ("eval_batch_size", 1), ("max_train_rows", 1), ("max_eval_rows", 0),
                      ("generation_eval_prompts", 1), ("generation_batch_size", 1), ("pack_max_tokens", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    for name, positive in (("lr", True), ("epochs", True), ("max_grad_norm", False), ("weight_decay", False),
                           ("lora_alpha", True), ("eval_size", True)):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            parser.error(f"--{name.replace('_', '-')} must be finite and {'> 0' if positive else '>= 0'}, got {value}")
    if not 0 <= args.min_response_fraction <= 1:
        parser.error(f"--min-response-fraction must be in [0, 1], got {args.min_response_fraction}")
    if not 0 <= args.lora_dropout < 1:
        parser.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if is_embedded_model and args.tokenizer:
        parser.error("--tokenizer needs --model: the embedded model is built for its own character tokenizer")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        parser.error("--mixed-precision fp16 needs a CUDA GPU (CPU autocast has no fp16); use bf16 or no")
    if args.resume not in (None, "auto") and not os.path.isdir(args.resume):
        parser.error(f"--resume {args.resume}: no such checkpoint directory")
    if args.allow_setting_changes and not args.resume:
        parser.error("--allow-setting-changes applies to --resume only")
    for name in ("model", "tokenizer"):
        value = getattr(args, name)
        if value and D.looks_like_path(value) and not os.path.exists(value):
            parser.error(f"--{name} {value}: no such file or directory")
    if args.max_prompt_length > args.max_length:
        parser.error(f"--max-prompt-length {args.max_prompt_length} exceeds --max-length {args.max_length}")
    if args.dataset is not None:
        try:
            D.resolve_source(args.dataset)  # a missing local path fails here, not after the model has loaded
        except D.DataError as e:
            parser.error(str(e))
    if is_embedded_model and args.hidden_size % args.num_heads:
        parser.error(f"--hidden-size {args.hidden_size} must be a multiple of --num-heads {args.num_heads}")
    args.hparams = resolve_loss(parser, args)
    return args


def resolve_loss(parser, args) -> dict:
    """The loss's hyperparameters (its defaults, overridden by --hparam); an unknown --loss or hyperparameter
    fails here, before any model or data is loaded."""
    if args.loss not in LOSSES:
        parser.error(f"unknown --loss {args.loss!r}; choose from {', '.join(sorted(LOSSES))}")
    hparams = parse_hparams(parser, args.hparam)
    if args.dataset is None and "score_scale" in LOSSES[args.loss].defaults and "score_scale" not in hparams:
        # Embedded scores count correct characters, 0..answer length; point losses need score/scale in [0, 1].
        hparams["score_scale"] = float(embedded.answer_length(args.task, args.task_length))
    try:
        return resolve_hparams(args.loss, hparams)[1]
    except (TypeError, ValueError) as e:
        parser.error(f"--hparam for --loss {args.loss}: {e}")


def parse_hparams(parser, items) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if not _ or not key:
            parser.error(f"--hparam expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
