"""Preference training of any causal LM with the fused sequence-likelihood op (MPPO losses and peers).

The loss is computed from the decoder's last hidden states and the LM-head weight through the fused op,
so full ``[tokens, V]`` logits are never built. With no arguments it runs the embedded default: a tiny
Llama, a character tokenizer and a generated, verifiable multi-response task (training/embedded.py); it
prints the held-out fraction of prompts whose best response gets the highest mean log-likelihood, before
and after training (about 35 s on a 2-core CPU)::

    python training/train.py                                   # embedded default -> runs/default/
    python training/train.py --config training/configs/run_default.yaml --loss dpo
    accelerate launch --multi_gpu --num_processes 2 training/train.py   # 2 processes; gloo when no CUDA

A real model (one GPU, LoRA; README "Training" has full fine-tuning and DDP / FSDP / ZeRO-3)::

    accelerate launch training/train.py --model meta-llama/Meta-Llama-3-8B-Instruct --dtype bfloat16 \\
        --dataset princeton-nlp/llama3-ultrafeedback-armorm --loss pair_mnm --lora-r 64 \\
        --per-device-batch-size 2 --gradient-accumulation-steps 32 --max-length 2048 \\
        --gradient-checkpointing --output-dir runs/llama3-8b-armorm-mnm
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: `training.*`

from training import checkpoint as C  # noqa: E402
from training import data as D  # noqa: E402
from training import embedded  # noqa: E402

IGNORE_INDEX = -100


class UsageError(ValueError):
    """A model, option or run directory that cannot be used as given; printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------- options
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
    if args.lr is None:
        args.lr = 3e-3 if is_embedded_model else 5e-6 if args.lora_r else 5e-7
    if args.eval_every is None:
        args.eval_every = 32 if is_embedded_data else 0
    if is_embedded_data and args.eval_size is None:
        args.eval_size = 512
    if args.epochs is None:
        args.epochs = 2.0 if is_embedded_data else 1.0
    if args.per_device_batch_size is None:
        args.per_device_batch_size = 32 if is_embedded_data else 1
    if is_embedded_data:
        args.max_length = min(args.max_length, 4 * args.task_length + 8)
        args.max_prompt_length = min(args.max_prompt_length, 2 * args.task_length + 4)
    for name, low in (("per_device_batch_size", 1), ("gradient_accumulation_steps", 1), ("max_length", 2),
                      ("warmup_steps", 0),
                      ("max_prompt_length", 1), ("task_length", 1), ("num_responses", 1), ("train_size", 1),
                      ("hidden_size", 1), ("num_layers", 1), ("num_heads", 1), ("lora_r", 0), ("log_every", 1),
                      ("eval_every", 0), ("save_every", 0), ("save_total_limit", 0), ("max_steps", 1),
                      ("stop_after_steps", 1), ("eval_batch_size", 1), ("max_train_rows", 1), ("max_eval_rows", 0)):
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
    from mppo_kernels.losses import LOSSES, resolve_hparams

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


# ------------------------------------------------------------------------------------- model and data
def load_model_and_tokenizer(args):
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


def load_data(args, tokenizer, min_responses: int, log):
    """``(train, eval, counts)`` tokenized ``datasets.Dataset``s."""
    import datasets

    kwargs = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                  min_responses=min_responses, score_field=args.score_field, num_proc=args.num_proc,
                  min_kept_fraction=args.min_response_fraction)
    if args.dataset is None:
        n_eval = int(args.eval_size)
        train_rows, eval_rows = embedded.make_task_splits(
            args.train_size, n_eval, task=args.task, length=args.task_length, k=args.num_responses,
            seed=args.seed)
        train_raw, eval_raw = datasets.Dataset.from_list(train_rows), datasets.Dataset.from_list(eval_rows)
        fmt, source, eval_source = "responses", "embedded task", "embedded task (held-out)"
    else:
        train_raw, eval_raw = D.load_splits(args.dataset, args.split, args.eval_split)
        fmt = args.dataset_format or D.detect_format(train_raw.column_names)
        # Rows are named where the user can find them: in the file, or in the hub dataset's test split.
        source = eval_source = args.dataset
        if eval_raw is not None:
            eval_source = f"{args.dataset} ({eval_raw.split} split)"
        else:  # a local file, or a hub dataset without a test split: carve held-out rows from it
            n = len(train_raw)
            size = args.eval_size if args.eval_size is not None else min(1000, max(1, int(0.02 * n)))
            size = int(size * n) if size < 1 else int(size)
            if not 0 < size < n:
                raise UsageError(f"--eval-size {args.eval_size} takes {size} of the {n} rows of {args.dataset} for "
                                 "held-out evaluation, leaving none for one of the two splits")
            parts = train_raw.train_test_split(test_size=size, seed=args.seed, shuffle=True)
            train_raw, eval_raw = parts["train"], parts["test"]
    if args.max_train_rows:
        train_raw = train_raw.select(range(min(args.max_train_rows, len(train_raw))))
    if args.max_eval_rows:
        eval_raw = eval_raw.select(range(min(args.max_eval_rows, len(eval_raw))))
    train, counts = D.prepare_dataset(train_raw, tokenizer, fmt=fmt, source=source,
                                      log=lambda s: log("train " + s), **kwargs)
    eval_ds, eval_counts = D.prepare_dataset(eval_raw, tokenizer, fmt=fmt, source=eval_source,
                                             log=lambda s: log("held-out " + s), **kwargs)
    return train, eval_ds, {"train": counts, "eval": eval_counts}


def rows_of(ds, indices) -> list[dict]:
    cols = ds[list(indices)]
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def make_batch(ds, indices, tokenizer, device) -> dict:
    batch = D.collate(rows_of(ds, indices), pad_id=tokenizer.pad_token_id, ignore_index=IGNORE_INDEX)
    return {k: v.to(device) for k, v in batch.items()}


def shard_indices(n: int, rank: int, world: int) -> tuple[list[int], list[bool]]:
    """This rank's rows ``rank::world``, padded by repetition to the same count on every rank (the padded
    copies are flagged False), so every rank runs the same number of collective forwards."""
    per_rank = math.ceil(n / world)
    mine = list(range(rank, n, world))
    valid = [True] * len(mine)
    while len(mine) < per_rank:
        mine.append(mine[-1] if mine else 0)
        valid.append(False)
    return mine, valid


# --------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, ds, tokenizer, accelerator, batch_size: int) -> dict:
    """Held-out loss and ``best_top``: the fraction of prompts whose best-scored response has the highest
    mean log-likelihood (a prompt counts when the top-likelihood response has the maximum score)."""
    was_training = model.training
    model.eval()
    idx, valid = shard_indices(len(ds), accelerator.process_index, accelerator.num_processes)
    totals = torch.zeros(4, device=accelerator.device, dtype=torch.float64)  # correct, count, loss*n, chance
    for start in range(0, len(idx), batch_size):
        chunk, ok = idx[start : start + batch_size], valid[start : start + batch_size]
        batch = make_batch(ds, chunk, tokenizer, accelerator.device)
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
    if was_training:
        model.train()
    n = max(totals[1].item(), 1.0)
    return {"eval/best_top_accuracy": totals[0].item() / n, "eval/loss": totals[2].item() / n,
            "eval/chance": totals[3].item() / n, "eval/prompts": int(totals[1].item())}


@torch.no_grad()
def precompute_reference(model, ds, tokenizer, accelerator, batch_size: int, desc: str):
    """Add a ``ref_logps`` column (the loss's reduction) computed once with the initial policy."""
    idx, valid = shard_indices(len(ds), accelerator.process_index, accelerator.num_processes)
    k_max = max(len(r) for r in ds["scores"])
    out_idx, out_val = [], []
    model.eval()
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        batch = make_batch(ds, chunk, tokenizer, accelerator.device)
        with accelerator.autocast():
            ref = model(**batch, mode="ref").float()  # [B, K]
        ref = torch.nn.functional.pad(ref, (0, k_max - ref.shape[1]), value=float("nan"))
        ids = torch.tensor([i if ok else -1 for i, ok in zip(chunk, valid[start : start + batch_size])],
                           device=ref.device)
        out_idx.append(accelerator.gather(ids))
        out_val.append(accelerator.gather(ref))
    model.train()
    ids, vals = torch.cat(out_idx).tolist(), torch.cat(out_val).cpu()
    table = {}
    for i, v in zip(ids, vals):
        if i >= 0:
            table[i] = v
    column = [table[i][: len(s)].tolist() for i, s in enumerate(ds["scores"])]
    accelerator.print(f"precomputed reference log-probs for {len(column)} {desc} rows")
    return ds.add_column("ref_logps", column)


# -------------------------------------------------------------------------------------- metrics, plot
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
        with open(self.path) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("step") == 0 and "eval/best_top_accuracy" in rec:
                        return {k: v for k, v in rec.items() if k != "step"}
        return None


def plot_curves(jsonl_path: str, png_path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(jsonl_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/best_top_accuracy" in r]
    margin_key = next((k for k in ("train/rewards/margins", "train/p/mean") if any(k in r for r in train)), None)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["train/loss"] for r in train], lw=0.8, label="train")
    axes[0].plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-", label="held-out")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot([r["step"] for r in evals], [r["eval/best_top_accuracy"] for r in evals], "o-", label="held-out")
    pts = [r for r in train if "train/best_top_accuracy" in r]
    if pts:  # by the loss's reward on the training batch (p for MPPO losses), noisier than held-out
        axes[1].plot([r["step"] for r in pts], [r["train/best_top_accuracy"] for r in pts], lw=0.6, alpha=0.6,
                     label="train batch (loss's reward)")
    if evals:
        axes[1].axhline(evals[0]["eval/chance"], color="gray", ls="--", label="chance")
    axes[1].set(title="best response has top likelihood", xlabel="step", ylim=(0, 1))
    axes[1].legend()
    if margin_key:
        pts = [r for r in train if margin_key in r]
        axes[2].plot([r["step"] for r in pts], [r[margin_key] for r in pts], lw=0.8)
        axes[2].set(title=margin_key, xlabel="step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def lr_lambda_factory(kind: str, warmup: int, total: int):
    def lr_lambda(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * frac)) if kind == "cosine" else 1.0 - frac

    return lr_lambda


def _float(v):
    return v.item() if torch.is_tensor(v) else float(v)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    """Train as the options say; returns the summary. Problems with options, data, the run directory or a
    checkpoint raise ``UsageError``/``DataError``/``RunDirError`` (``cli`` prints them as one line)."""
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    try:
        result = train(args, accelerator)
        # No process may tear the process group down while another still uses it: a rank that exits early
        # makes the other one abort at shutdown ("terminate called without an active exception").
        accelerator.wait_for_everyone()
        return result
    finally:
        accelerator.end_training()  # on every path, errors included: trackers closed, process group destroyed


def cli(argv=None) -> None:
    try:
        main(argv)
    except (UsageError, D.DataError, C.RunDirError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)


def make_accelerator(args):
    from accelerate import Accelerator

    mixed = args.mixed_precision
    if mixed == "auto":
        # `accelerate launch` always exports ACCELERATE_MIXED_PRECISION ("no" unless configured), so "no"
        # cannot tell "asked for none" from "not asked": on a bf16 GPU it reads as not asked.
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        if launched in ("bf16", "fp16", "fp8"):
            mixed = None  # what accelerate launch / the config file says
        else:
            mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    trackers = None
    if args.report_to != "none":
        try:
            import tensorboard  # noqa: F401

            trackers = "tensorboard"
        except ImportError:
            if args.report_to == "tensorboard":
                raise
    # Without CUDA, accelerate joins the processes of a multi-process launch (torchrun, or `accelerate launch
    # --multi_gpu --num_processes N`) over gloo only when told to use the CPU; otherwise each would train alone.
    cpu_multiprocess = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=cpu_multiprocess,
                              mixed_precision=mixed, log_with=trackers, project_dir=args.output_dir)
    accelerator.trackers_wanted = trackers is not None
    return accelerator


def prepare_run_dir(args, accelerator, settings: dict):
    """``(start_step, checkpoint or None)``: refuse a directory holding another run, or a checkpoint of
    another run, naming the differences; clear a run being replaced; record this run's settings."""
    ckpt, state = None, None
    if args.resume:
        ckpt = C.latest_checkpoint(args.output_dir) if args.resume == "auto" else args.resume
        if ckpt is None:
            accelerator.print(f"--resume: no checkpoint in {args.output_dir}/checkpoints, starting from scratch")
        else:
            state, diff = C.resume_state(ckpt, settings, allow_changes=args.allow_setting_changes)
            if diff:
                accelerator.print(f"warning: resuming {ckpt} with changed settings: {'; '.join(diff)}")
    action = C.check_output_dir(args.output_dir, settings, overwrite=args.overwrite) if ckpt is None else None
    accelerator.wait_for_everyone()  # every process has checked before the main one changes anything
    if accelerator.is_main_process:
        if action == "replace":
            accelerator.print(f"replacing the outputs of the earlier run in {args.output_dir}")
            C.clear_run(args.output_dir)
        C.write_settings(args.output_dir, settings)
    accelerator.wait_for_everyone()
    return (state["step"] if state else 0), ckpt


def train(args, accelerator) -> dict:
    from accelerate.utils import DistributedType, set_seed

    log = accelerator.print
    trackers = "tensorboard" if accelerator.trackers_wanted else None
    import datasets
    import transformers

    # One progress bar (training); tokenizing/filtering/saving bars would bury the skip counts in the log.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    set_seed(args.seed)  # identical initialization on every process
    world, b, ga = accelerator.num_processes, args.per_device_batch_size, args.gradient_accumulation_steps
    global_bs = b * world * ga
    settings = C.run_settings(args, global_batch_size=global_bs, mixed_precision=accelerator.mixed_precision)
    start_step, ckpt = prepare_run_dir(args, accelerator, settings)  # before anything slow is loaded

    from training.modeling import PreferenceModel, loss_api

    spec, hparams = loss_api()[0][args.loss], args.hparams
    min_responses = spec.min_responses

    t0 = time.time()
    model, tokenizer = load_model_and_tokenizer(args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r:
        model = apply_lora(model, args)
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
    with accelerator.main_process_first():
        train_ds, eval_ds, counts = load_data(args, tokenizer, min_responses, log)
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 partitions at load time)
    n_params = sum(numel(p) for p in model.parameters())
    n_train = sum(numel(p) for p in model.parameters() if p.requires_grad)
    log(f"model: {n_params:,} parameters ({n_train:,} trained); loss {args.loss} {hparams}")

    spe = D.steps_per_epoch(len(train_ds), global_bs)
    max_steps = args.max_steps or max(1, int(args.epochs * spe))
    warmup = args.warmup_steps if args.warmup_steps is not None else int(0.05 * max_steps)
    eval_bs = args.eval_batch_size or b

    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    zero3 = is_deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3
    pm = PreferenceModel(model, args.loss, hparams=hparams, ignore_index=IGNORE_INDEX,
                         reference="precomputed" if args.precompute_ref else "auto", zero3=zero3)

    def make_optimizer(module):
        params = [p for p in module.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))

    if is_deepspeed:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        # There is no DataLoader to infer the micro-batch from; DeepSpeed needs it to build its engine.
        ds_config["train_micro_batch_size_per_gpu"] = b
        # DeepSpeed clips inside its own step (accelerator.clip_grad_norm_ only reads the norm back), with
        # the config's value; "auto" would become accelerate's 1.0 rather than --max-grad-norm.
        if ds_config.get("gradient_clipping", "auto") == "auto":
            ds_config["gradient_clipping"] = args.max_grad_norm
    # Model and optimizer are prepared together: FSDP2 requires it (it swaps the optimizer's parameters for
    # the sharded ones), FSDP1 and DeepSpeed rebuild the optimizer's parameter lists from it.
    # The schedule is stepped by hand once per optimizer step (a prepared scheduler steps num_processes
    # times per call) on the torch optimizer, whose param_groups the ZeRO / FSDP wrappers read lr from.
    base_optimizer = make_optimizer(pm)
    pm, optimizer = accelerator.prepare(pm, base_optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(base_optimizer, lr_lambda_factory(args.scheduler, warmup, max_steps))
    accelerator.register_for_checkpointing(scheduler)

    resumed_from = None
    if ckpt is not None:
        C.load_checkpoint(accelerator, ckpt)
        resumed_from = ckpt
        log(f"resumed from {ckpt} at step {start_step}")

    if spec.needs_reference and args.precompute_ref:
        # The reference is the initial policy; after a resume the policy has moved, so the values are
        # recomputed only on a fresh start and stored with the run.
        ref_path = os.path.join(args.output_dir, "ref_logps.pt")
        if start_step == 0:
            train_ds = precompute_reference(pm, train_ds, tokenizer, accelerator, eval_bs, "train")
            eval_ds = precompute_reference(pm, eval_ds, tokenizer, accelerator, eval_bs, "held-out")
            if accelerator.is_main_process:
                os.makedirs(args.output_dir, exist_ok=True)
                # Plain lists (datasets returns lazy Column objects), which torch.load's weights_only accepts.
                torch.save({"train": list(train_ds["ref_logps"]), "eval": list(eval_ds["ref_logps"])},
                           ref_path + ".tmp")
                os.replace(ref_path + ".tmp", ref_path)
        else:
            if not os.path.isfile(ref_path):
                raise C.RunDirError(f"{ref_path} is missing: the resumed --precompute-ref run needs the reference "
                                    "log-probs computed when it started (they cannot be recomputed now)")
            saved = torch.load(ref_path)
            train_ds = train_ds.add_column("ref_logps", saved["train"])
            eval_ds = eval_ds.add_column("ref_logps", saved["eval"])

    metrics_log = MetricsLog(os.path.join(args.output_dir, "metrics.jsonl"), accelerator.is_main_process,
                             start_step if resumed_from else None)
    if trackers:
        accelerator.init_trackers("mppo", config={k: v for k, v in vars(args).items()
                                                  if isinstance(v, (int, float, str, bool))})
    log(f"training: {len(train_ds)} prompts, {max_steps} steps of {global_bs} prompts ({world} processes x {b} "
        f"x {ga} accumulation), lr {args.lr}, warmup {warmup}; held-out: {len(eval_ds)} prompts; "
        f"{'one process' if world == 1 else accelerator.distributed_type.value} on {accelerator.device.type}, "
        f"mixed precision {accelerator.mixed_precision}")

    def run_eval(step):
        res = evaluate(pm, eval_ds, tokenizer, accelerator, eval_bs)
        record = {"step": step, **res}
        metrics_log.write(record)
        if trackers:
            accelerator.log(res, step=step)
        return res

    before = None
    if start_step == 0:
        before = run_eval(0)
        log(f"held-out best-response-top accuracy before training: {before['eval/best_top_accuracy']:.3f} "
            f"(chance {before['eval/chance']:.3f}, {before['eval/prompts']} prompts)")
    elif accelerator.is_main_process:
        before = metrics_log.first_eval()  # the interrupted run's step-0 evaluation

    from tqdm.auto import tqdm

    pm.train()
    bar = tqdm(total=max_steps, initial=start_step, disable=args.no_progress or not accelerator.is_local_main_process,
               desc="train", dynamic_ncols=True)
    t_train, last, step = time.time(), None, start_step
    for step in range(start_step, max_steps):
        gidx = D.global_batch_indices(len(train_ds), step, global_bs, args.seed)
        sums, grad_norm = {}, None
        for micro in range(ga):
            idx = D.micro_batch_indices(gidx, micro, accelerator.process_index, world, b)
            batch = make_batch(train_ds, idx, tokenizer, accelerator.device)
            with accelerator.accumulate(pm):
                with accelerator.autocast():
                    loss, metrics = pm(**batch, mode="train")
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(pm.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / ga
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        done = step + 1
        if done % args.log_every == 0 or done == max_steps:
            keys = sorted(sums)
            vals = accelerator.reduce(torch.stack([sums[k] for k in keys]), reduction="mean").tolist()
            record = {"step": done, "epoch": round(done / spe, 4), "lr": lr,
                      **{f"train/{k}": v for k, v in zip(keys, vals)}}
            if grad_norm is not None:
                record["train/grad_norm"] = _float(grad_norm)
            metrics_log.write(record)
            if trackers:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=done)
            last = record
            bar.set_postfix(loss=f"{record['train/loss']:.4f}", refresh=False)
        bar.update(1)
        if args.eval_every and done % args.eval_every == 0 and done < max_steps:
            res = run_eval(done)
            if accelerator.is_local_main_process:
                bar.write(f"step {done}: held-out best-top accuracy {res['eval/best_top_accuracy']:.3f}")
        if args.save_every and done % args.save_every == 0:
            C.save_checkpoint(accelerator, args.output_dir, done,
                              {"step": done, "global_batch_size": global_bs, "seed": args.seed, "world_size": world,
                               "max_steps": max_steps, "settings": settings}, args.save_total_limit)
        if args.stop_after_steps and done >= args.stop_after_steps and done < max_steps:
            bar.close()
            log(f"stopping after step {done} (--stop-after-steps)")
            return {"stopped_at": done}
    bar.close()
    train_seconds = time.time() - t_train

    after = run_eval(max_steps)
    summary = {"steps": max_steps, "train_seconds": round(train_seconds, 2),
               "total_seconds": round(time.time() - t0, 2), "after": after, "before": before,
               "resumed_from": resumed_from, "final_train": last, "data_counts": counts}
    if accelerator.is_main_process:
        plot_curves(metrics_log.path, os.path.join(args.output_dir, "training_curves.png"))
        C.atomic_write(os.path.join(args.output_dir, "summary.json"), json.dumps(summary, indent=1))
    if not args.no_save_model:
        save_final_model(accelerator, pm, tokenizer, os.path.join(args.output_dir, "final"))
    acc_before = f"{before['eval/best_top_accuracy']:.3f}" if before else "n/a (resumed)"
    log(f"held-out best-response-top accuracy: before {acc_before} -> after "
        f"{after['eval/best_top_accuracy']:.3f} (chance {after['eval/chance']:.3f}, {after['eval/prompts']} "
        f"prompts); {max_steps - start_step} steps in {train_seconds:.1f} s; outputs in {args.output_dir}/")
    return summary


def save_final_model(accelerator, pm, tokenizer, path: str):
    """Save the policy (adapter only for LoRA) and tokenizer; the full state is gathered under FSDP/ZeRO-3."""
    state = accelerator.get_state_dict(pm)
    unwrapped = accelerator.unwrap_model(pm)
    if accelerator.is_main_process:
        policy_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        unwrapped.model.save_pretrained(path, state_dict=policy_state, save_function=accelerator.save)
        tokenizer.save_pretrained(path)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    cli()
