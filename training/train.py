"""Preference training of any causal LM with the fused sequence-likelihood op (MPPO losses and peers).

The loss is computed from the decoder's last hidden states and the LM-head weight through the fused op,
so full ``[tokens, V]`` logits are never built. With no arguments it runs the embedded default: a tiny
Llama, a character tokenizer and a generated, verifiable multi-response task (training/embedded.py); it
prints the held-out fraction of prompts whose best response gets the highest mean log-likelihood, and the
fraction the policy itself answers exactly (greedy decoding, checked by the task's verifier), before and
after training (about 35 s on a 2-core CPU)::

    python training/train.py                                   # embedded default -> runs/default/
    python training/train.py --config training/configs/run_default.yaml --loss dpo
    accelerate launch --multi_gpu --num_processes 2 training/train.py   # 2 processes; gloo when no CUDA

A real model (one GPU, LoRA; README "Training" has full fine-tuning and DDP / FSDP / ZeRO-3)::

    accelerate launch training/train.py --model meta-llama/Meta-Llama-3-8B-Instruct --dtype bfloat16 \\
        --dataset princeton-nlp/llama3-ultrafeedback-armorm --loss pair_mnm --lora-r 64 \\
        --per-device-batch-size 2 --gradient-accumulation-steps 32 --max-length 2048 \\
        --gradient-checkpointing --output-dir runs/llama3-8b-armorm-mnm

This file is the run, phase by phase as ``main`` calls them; the pieces live next to it: options.py (the
options and their checks), modeling.py (loading the model, LoRA, the module that computes the loss),
heads.py (the LM head's logit scale / soft-cap and the start-up parity probe against the model's own logits),
data.py (dataset readers, tokenization, batches), packing.py (prefix-shared packed batches), embedded.py
(the default model and task), evaluation.py (held-out accuracy, precomputed reference), metrics_log.py
(metrics.jsonl, the plot), checkpoint.py (the run directory, checkpoints, resuming).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: `training.*`

from mppo_kernels.losses import LOSSES  # noqa: E402
from training import checkpoint as C  # noqa: E402
from training import data as D  # noqa: E402
from training import embedded, heads, packing  # noqa: E402
from training.evaluation import evaluate, evaluate_generation, precompute_reference  # noqa: E402
from training.metrics_log import MetricsLog, plot_curves  # noqa: E402
from training.modeling import (PreferenceModel, apply_lora, decoder_of, load_model_and_tokenizer,  # noqa: E402
                               save_final_model)
from training.options import UsageError, parse_args  # noqa: E402


def cli(argv=None) -> None:
    try:
        main(argv)
    except (UsageError, D.DataError, C.RunDirError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> dict:
    """Train as the options say; returns the summary. Problems with options, data, the run directory or a
    checkpoint raise ``UsageError``/``DataError``/``RunDirError`` (``cli`` prints them as one line)."""
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    try:
        run = setup(args, accelerator)
        load_model(run)
        load_data(run)
        check_head(run)
        prepare_training(run)
        load_reference(run)
        stopped_at = train(run)
        result = {"stopped_at": stopped_at} if stopped_at else finish(run)
        # No process may tear the process group down while another still uses it: a rank that exits early
        # makes the other one abort at shutdown ("terminate called without an active exception").
        accelerator.wait_for_everyone()
        return result
    finally:
        accelerator.end_training()  # on every path, errors included: trackers closed, process group destroyed


@dataclass
class Run:
    """What the phases hand on to each other; ``setup`` makes it, each later phase fills in its part."""

    args: argparse.Namespace
    accelerator: Accelerator
    global_batch_size: int = 0  # prompts per optimizer step, over all processes and micro-steps
    eval_batch_size: int = 0
    settings: dict | None = None  # what identifies the run (checkpoint.run_settings)
    start_step: int = 0
    checkpoint: str | None = None  # the one resumed from
    started: float = 0.0
    model: torch.nn.Module | None = None  # the PreferenceModel, wrapped by accelerate once prepared
    tokenizer: Any = None
    make_batch: Any = D.make_batch  # (ds, indices, tokenizer, device) -> batch: padded, or packed (choose_layout)
    train_ds: Any = None
    eval_ds: Any = None
    data_counts: dict | None = None
    optimizer: Any = None
    scheduler: Any = None
    steps_per_epoch: int = 0
    max_steps: int = 0
    warmup: int = 0
    metrics_log: MetricsLog | None = None
    before: dict | None = None  # held-out evaluation at step 0
    generation: tuple | None = None  # (prompts, answers) of the generation eval, () when it does not apply
    last: dict | None = None  # latest training record
    train_seconds: float = 0.0


def make_accelerator(args) -> Accelerator:
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


def setup(args, accelerator) -> Run:
    """Seed every process alike and claim the run directory, before anything slow is loaded."""
    import datasets
    import transformers

    # One progress bar (training); tokenizing/filtering/saving bars would bury the skip counts in the log.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    set_seed(args.seed)  # identical initialization on every process
    b, ga = args.per_device_batch_size, args.gradient_accumulation_steps
    run = Run(args, accelerator, global_batch_size=b * accelerator.num_processes * ga,
              eval_batch_size=args.eval_batch_size or b)
    run.settings = C.run_settings(args, global_batch_size=run.global_batch_size,
                                  mixed_precision=accelerator.mixed_precision)
    run.start_step, run.checkpoint = C.prepare_run_dir(args, accelerator, run.settings)
    run.started = time.time()
    return run


def load_model(run: Run) -> None:
    """The policy (gradient checkpointing, LoRA), wrapped in the PreferenceModel that computes the loss."""
    args, accelerator = run.args, run.accelerator
    model, run.tokenizer = load_model_and_tokenizer(args)
    run.make_batch = choose_layout(args, model, accelerator)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r:
        model = apply_lora(model, args)
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
    zero3 = (accelerator.distributed_type == DistributedType.DEEPSPEED
             and accelerator.state.deepspeed_plugin.zero_stage == 3)
    run.model = PreferenceModel(model, args.loss, hparams=args.hparams, zero3=zero3,
                                reference="precomputed" if args.precompute_ref else "auto")


def choose_layout(args, model, accelerator):
    """The batch builder of --packing: prefix-shared packed batches where the model's attention takes the mask
    (flex_attention block masks on CUDA unless --attn-implementation says otherwise), else the padded layout;
    either way said in one line."""
    if args.packing == "none":
        return D.make_batch
    decoder = decoder_of(model)
    why = packing.unsupported_reason(decoder, max_length=args.max_length, device=accelerator.device)
    if (why is None and accelerator.device.type == "cuda" and args.attn_implementation is None
            and getattr(model, "_supports_flex_attn", False) and not getattr(model.config, "attention_dropout", 0)):
        model.set_attn_implementation("flex_attention")  # block-sparse: masked-out tiles are skipped, not computed
    if why:
        accelerator.print(f"packing: the padded layout instead of --packing prefix ({why})")
        return D.make_batch
    accelerator.print(f"packing: prefix-shared packed batches ({decoder.config._attn_implementation} masks)")
    return functools.partial(packing.make_packed_batch, max_tokens=args.pack_max_tokens)


def load_data(run: Run) -> None:
    """The training and held-out splits, tokenized, with the counts of what was skipped."""
    args, log = run.args, run.accelerator.print
    kwargs = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                  min_responses=LOSSES[args.loss].min_responses, score_field=args.score_field,
                  num_proc=args.num_proc, min_kept_fraction=args.min_response_fraction)
    with run.accelerator.main_process_first():
        train_raw, eval_raw, fmt, source, eval_source = raw_splits(args)
        run.train_ds, counts = D.prepare_dataset(train_raw, run.tokenizer, fmt=fmt, source=source,
                                                 log=lambda s: log("train " + s), **kwargs)
        run.eval_ds, eval_counts = D.prepare_dataset(eval_raw, run.tokenizer, fmt=fmt, source=eval_source,
                                                     log=lambda s: log("held-out " + s), **kwargs)
    run.data_counts = {"train": counts, "eval": eval_counts}


def check_head(run: Run) -> None:
    """The parity probe (training/heads.py), before anything is trained or sharded: the training path's
    log-likelihoods of a few training rows must equal those of the model's own ``forward(...).logits``
    (fp32, eval mode), else every process stops with one error. The main process probes alone (under FSDP's
    CPU-RAM-efficient loading the others hold no weights yet) and hands its verdict to the others."""
    args, accelerator, log = run.args, run.accelerator, run.accelerator.print
    policy = run.model.model
    if args.skip_parity_probe:
        log(f"parity probe: skipped (--skip-parity-probe); head transform read from the config: "
            f"{heads.describe(policy)}")
        return
    if any(hasattr(p, "ds_id") for p in policy.parameters()):
        log(f"parity probe: skipped, ZeRO-3 partitioned the weights at load time; head transform read from the "
            f"config: {heads.describe(policy)}")
        return
    verdict, failure = None, None
    if accelerator.is_main_process:
        try:
            res = heads.parity_probe(run.model, run.train_ds, run.tokenizer, run.make_batch)
            verdict = (True, f"parity probe: {res['model']}'s own logits and the training path "
                             f"agree on {res['rows']} training rows (up to {res['max_abs_diff']:.2g} nats per token "
                             f"in fp32); head transform: {res['transform']}")
        except Exception as e:  # noqa: BLE001 - the other processes must stop too, whatever stopped this one
            failure = e
            verdict = (False, str(e) if isinstance(e, UsageError) else
                       f"parity probe: the main process failed ({type(e).__name__}: {e})")
    if accelerator.num_processes > 1:
        verdict = broadcast_object_list([verdict])[0]
    if failure is not None:
        raise failure
    if not verdict[0]:
        raise UsageError(verdict[1])
    log(verdict[1])


def raw_splits(args):
    """``(train, eval, format, train source, eval source)``, untokenized: the embedded task, or --dataset's
    splits (held-out rows carved from the training split when it has no eval split), capped in rows."""
    import datasets

    if args.dataset is None:
        train_rows, eval_rows = embedded.make_task_splits(
            args.train_size, int(args.eval_size), task=args.task, length=args.task_length, k=args.num_responses,
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
        else:  # a local file, or a hub dataset without a test split
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
    return train_raw, eval_raw, fmt, source, eval_source


def prepare_training(run: Run) -> None:
    """Optimizer and learning-rate schedule, prepared with the model by accelerate (which places or shards
    it: the phases after this one run the prepared model); on --resume, the checkpoint's state."""
    args, accelerator, log = run.args, run.accelerator, run.accelerator.print
    policy = run.model.model
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 partitions at load time)
    log(f"model: {sum(numel(p) for p in policy.parameters()):,} parameters "
        f"({sum(numel(p) for p in policy.parameters() if p.requires_grad):,} trained); loss {args.loss} {args.hparams}")
    run.steps_per_epoch = D.steps_per_epoch(len(run.train_ds), run.global_batch_size)
    run.max_steps = args.max_steps or max(1, int(args.epochs * run.steps_per_epoch))
    run.warmup = args.warmup_steps if args.warmup_steps is not None else int(0.05 * run.max_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        # There is no DataLoader to infer the micro-batch from; DeepSpeed needs it to build its engine.
        ds_config["train_micro_batch_size_per_gpu"] = args.per_device_batch_size
        # DeepSpeed clips inside its own step (accelerator.clip_grad_norm_ only reads the norm back), with
        # the config's value; "auto" would become accelerate's 1.0 rather than --max-grad-norm.
        if ds_config.get("gradient_clipping", "auto") == "auto":
            ds_config["gradient_clipping"] = args.max_grad_norm
    # Model and optimizer are prepared together: FSDP2 requires it (it swaps the optimizer's parameters for
    # the sharded ones), FSDP1 and DeepSpeed rebuild the optimizer's parameter lists from it.
    # The schedule is stepped by hand once per optimizer step (a prepared scheduler steps num_processes
    # times per call) on the torch optimizer, whose param_groups the ZeRO / FSDP wrappers read lr from.
    base_optimizer = torch.optim.AdamW([p for p in run.model.parameters() if p.requires_grad], lr=args.lr,
                                       weight_decay=args.weight_decay, betas=(0.9, 0.95))
    run.model, run.optimizer = accelerator.prepare(run.model, base_optimizer)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        base_optimizer, lr_schedule(args.scheduler, run.warmup, run.max_steps))
    accelerator.register_for_checkpointing(run.scheduler)
    if run.checkpoint is not None:
        C.load_checkpoint(accelerator, run.checkpoint)
        log(f"resumed from {run.checkpoint} at step {run.start_step}")


def lr_schedule(kind: str, warmup: int, total: int):
    """The LambdaLR factor of each step: linear warmup, then cosine or linear decay to 0, or constant."""
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * frac)) if kind == "cosine" else 1.0 - frac

    return factor


def load_reference(run: Run) -> None:
    """With --precompute-ref: reference log-probs as a column of both datasets, computed with the initial
    policy on a fresh start and stored with the run; a resumed run's policy has moved, so it reads them back."""
    args, accelerator = run.args, run.accelerator
    if not (LOSSES[args.loss].needs_reference and args.precompute_ref):
        return
    path = os.path.join(args.output_dir, "ref_logps.pt")
    if run.start_step == 0:
        columns = {"train": precompute_reference(run.model, run.train_ds, run.tokenizer, accelerator,
                                                 run.eval_batch_size, "train", run.make_batch),
                   "eval": precompute_reference(run.model, run.eval_ds, run.tokenizer, accelerator,
                                                run.eval_batch_size, "held-out", run.make_batch)}
        if accelerator.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
            torch.save(columns, path + ".tmp")
            os.replace(path + ".tmp", path)
    elif os.path.isfile(path):
        columns = torch.load(path)
    else:
        raise C.RunDirError(f"{path} is missing: the resumed --precompute-ref run needs the reference "
                            "log-probs computed when it started (they cannot be recomputed now)")
    run.train_ds = run.train_ds.add_column("ref_logps", columns["train"])
    run.eval_ds = run.eval_ds.add_column("ref_logps", columns["eval"])


def train(run: Run) -> int | None:
    """Optimizer steps from ``run.start_step`` with logging, held-out evaluation and checkpoints; returns the
    step it stopped after when --stop-after-steps cuts the run short, else None."""
    args, accelerator, log = run.args, run.accelerator, run.accelerator.print
    world, b, ga = accelerator.num_processes, args.per_device_batch_size, args.gradient_accumulation_steps
    run.metrics_log = MetricsLog(os.path.join(args.output_dir, "metrics.jsonl"), accelerator.is_main_process,
                                 run.start_step if run.checkpoint else None)
    if accelerator.trackers_wanted:
        accelerator.init_trackers("mppo", config={k: v for k, v in vars(args).items()
                                                  if isinstance(v, (int, float, str, bool))})
    log(f"training: {len(run.train_ds)} prompts, {run.max_steps} steps of {run.global_batch_size} prompts ({world} "
        f"processes x {b} x {ga} accumulation), lr {args.lr}, warmup {run.warmup}; held-out: {len(run.eval_ds)} "
        f"prompts; {'one process' if world == 1 else accelerator.distributed_type.value} on "
        f"{accelerator.device.type}, mixed precision {accelerator.mixed_precision}")
    if run.start_step == 0:
        run.before = run_eval(run, 0)
        log(f"held-out likelihood-top accuracy before training: {_accuracy(run.before)} {_chance(run.before)}"
            f"{_generation(run.before)}")
    elif accelerator.is_main_process:
        run.before = run.metrics_log.first_eval()  # the interrupted run's step-0 evaluation

    run.model.train()
    bar = tqdm(total=run.max_steps, initial=run.start_step, desc="train", dynamic_ncols=True,
               disable=args.no_progress or not accelerator.is_local_main_process)
    t_train = time.time()
    for step in range(run.start_step, run.max_steps):
        sums, grad_norm = optimizer_step(run, step)
        lr = run.scheduler.get_last_lr()[0]
        run.scheduler.step()
        done = step + 1
        if done % args.log_every == 0 or done == run.max_steps:
            run.last = log_step(run, done, lr, sums, grad_norm)
            bar.set_postfix(loss=f"{run.last['train/loss']:.4f}", refresh=False)
        bar.update(1)
        if args.eval_every and done % args.eval_every == 0 and done < run.max_steps:
            res = run_eval(run, done)
            if accelerator.is_local_main_process:
                bar.write(f"step {done}: held-out likelihood-top accuracy {_accuracy(res)}"
                          + (f", exact match {res['eval/exact_match']:.3f}" if "eval/exact_match" in res else ""))
        if args.save_every and done % args.save_every == 0:
            C.save_checkpoint(accelerator, args.output_dir, done,
                              {"step": done, "global_batch_size": run.global_batch_size, "seed": args.seed,
                               "world_size": world, "max_steps": run.max_steps, "settings": run.settings},
                              args.save_total_limit)
        if args.stop_after_steps and done >= args.stop_after_steps and done < run.max_steps:
            bar.close()
            log(f"stopping after step {done} (--stop-after-steps)")
            return done
    bar.close()
    run.train_seconds = time.time() - t_train
    return None


def optimizer_step(run: Run, step: int) -> tuple[dict, Any]:
    """One optimizer step on the global batch of ``step``, accumulated over micro-batches: this process's
    micro-batch mean of the loss and its metrics, and the gradient norm (None when not clipped)."""
    args, accelerator, pm = run.args, run.accelerator, run.model
    ga = args.gradient_accumulation_steps
    gidx = D.global_batch_indices(len(run.train_ds), step, run.global_batch_size, args.seed)
    sums, grad_norm = {}, None
    for micro in range(ga):
        idx = D.micro_batch_indices(gidx, micro, accelerator.process_index, accelerator.num_processes,
                                    args.per_device_batch_size)
        batch = run.make_batch(run.train_ds, idx, run.tokenizer, accelerator.device)
        with accelerator.accumulate(pm):
            with accelerator.autocast():
                loss, metrics = pm(**batch, mode="train")
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(pm.parameters(), args.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float() / ga
    return sums, grad_norm


def log_step(run: Run, done: int, lr: float, sums: dict, grad_norm) -> dict:
    """The training record of step ``done``: the loss and its metrics averaged over the processes."""
    keys = sorted(sums)
    vals = run.accelerator.reduce(torch.stack([sums[k] for k in keys]), reduction="mean").tolist()
    values = {"epoch": round(done / run.steps_per_epoch, 4), "lr": lr, **{f"train/{k}": v for k, v in zip(keys, vals)}}
    if grad_norm is not None:
        values["train/grad_norm"] = grad_norm.item() if torch.is_tensor(grad_norm) else float(grad_norm)
    return _record(run, done, values)


def run_eval(run: Run, step: int) -> dict:
    res = evaluate(run.model, run.eval_ds, run.tokenizer, run.accelerator, run.eval_batch_size, run.make_batch)
    if run.generation is None:
        run.generation = generation_set(run)
    if run.generation:
        policy = run.accelerator.unwrap_model(run.model).model
        res.update(evaluate_generation(policy, run.tokenizer, *run.generation, run.accelerator,
                                       batch_size=run.args.generation_batch_size))
    _record(run, step, res)
    return res


def generation_set(run: Run) -> tuple:
    """``(prompts, answers)`` of the greedy generation eval: the embedded task's held-out prompts (those of
    ``raw_splits`` when training on the task, else rebuilt from --task, --task-length, --num-responses and
    --seed) and their computed answers; ``()``, said once in the log, when it does not apply."""
    args, accelerator = run.args, run.accelerator
    if args.generation_eval == "none":
        return ()
    if args.generation_eval == "auto" and args.dataset is not None:
        accelerator.print(f"generation eval: skipped (no verifier for --dataset {args.dataset}; --generation-eval "
                          "embedded checks the embedded task's held-out prompts)")
        return ()
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # generate() would run the sharded policy outside the wrapper whose forward gathers its weights.
        accelerator.print(f"generation eval: skipped under {accelerator.distributed_type.value}")
        return ()
    if args.dataset is None:
        prompts = list(raw_splits(args)[1]["prompt"])
    else:
        prompts = [r["prompt"] for r in embedded.make_task_rows(
            args.generation_eval_prompts or 512, task=args.task, length=args.task_length, k=args.num_responses,
            seed=args.seed)]
    prompts = prompts[: args.generation_eval_prompts or len(prompts)]
    return prompts, [embedded.task_answer(p, args.task, args.task_length) for p in prompts]


def _record(run: Run, step: int, values: dict) -> dict:
    """``{"step": step, **values}``, written to metrics.jsonl and (without the step) to the tracker."""
    record = {"step": step, **values}
    run.metrics_log.write(record)
    if run.accelerator.trackers_wanted:
        run.accelerator.log(values, step=step)
    return record


def _accuracy(res: dict) -> str:
    return f"{res['eval/likelihood_top_accuracy']:.3f}"


def _chance(res: dict) -> str:
    return f"(chance {res['eval/chance']:.3f}, {res['eval/prompts']} prompts)"


def _generation(res: dict) -> str:
    if "eval/exact_match" not in res:
        return ""
    return (f"; greedy exact match {res['eval/exact_match']:.3f}, correct characters {res['eval/correct_chars']:.2f} "
            f"({res['eval/generated_prompts']} prompts)")


def finish(run: Run) -> dict:
    """Held-out evaluation after training, summary.json, the plot, the final model and the closing line."""
    args, accelerator = run.args, run.accelerator
    after = run_eval(run, run.max_steps)
    summary = {"steps": run.max_steps, "train_seconds": round(run.train_seconds, 2),
               "total_seconds": round(time.time() - run.started, 2), "after": after, "before": run.before,
               "resumed_from": run.checkpoint, "final_train": run.last, "data_counts": run.data_counts}
    if accelerator.is_main_process:
        plot_curves(run.metrics_log.path, os.path.join(args.output_dir, "training_curves.png"))
        C.atomic_write(os.path.join(args.output_dir, "summary.json"), json.dumps(summary, indent=1))
    if not args.no_save_model:
        save_final_model(accelerator, run.model, run.tokenizer, os.path.join(args.output_dir, "final"))
    before = _accuracy(run.before) if run.before else "n/a (resumed)"
    exact = ""
    if "eval/exact_match" in after:
        exact_before = f"{run.before['eval/exact_match']:.3f}" if "eval/exact_match" in (run.before or {}) else "n/a"
        exact = (f"; greedy exact match: before {exact_before} -> after {after['eval/exact_match']:.3f} "
                 f"(correct characters {after['eval/correct_chars']:.2f})")
    accelerator.print(f"held-out likelihood-top accuracy: before {before} -> after {_accuracy(after)} "
                      f"{_chance(after)}{exact}; {run.max_steps - run.start_step} steps in {run.train_seconds:.1f} s; "
                      f"outputs in {args.output_dir}/")
    return summary


if __name__ == "__main__":
    cli()
