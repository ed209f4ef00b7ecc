"""Run directories and checkpoints: the settings that identify a run, refusing to mix two runs in one
directory, atomic checkpoints, and resuming only the run a checkpoint belongs to.

A run writes ``run_settings.json`` next to its outputs, and every checkpoint stores the same settings in
its ``trainer_state.json``. A new run refuses a directory that holds a run with other settings (or an
unfinished run with the same settings, which ``--resume`` should continue) unless told ``--overwrite``; a
resumed run refuses a checkpoint whose settings differ unless told ``--allow-setting-changes``. Either way
the differences are named.
"""

from __future__ import annotations

import json
import os
import shutil

SETTINGS_FILE = "run_settings.json"
# Everything a run writes into its --output-dir: what --overwrite removes (and nothing else of the directory).
RUN_FILES = (SETTINGS_FILE, "metrics.jsonl", "summary.json", "training_curves.png", "ref_logps.pt")
RUN_DIRS = ("checkpoints", "final", "mppo")  # mppo/: the TensorBoard project

# Options that change what is trained, or how: a checkpoint continues a run only if these are equal. Logging,
# evaluation and saving cadence, paths and the per-device split of the global batch do not count.
TRAJECTORY_OPTIONS = (
    "model", "tokenizer", "dtype", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    "dataset", "dataset_format", "split", "eval_split", "eval_size", "max_train_rows", "max_eval_rows",
    "score_field", "max_length", "max_prompt_length", "min_response_fraction", "task", "task_length", "num_responses", "train_size",
    "hidden_size", "num_layers", "num_heads", "loss", "hparams", "precompute_ref", "lr", "weight_decay",
    "warmup_steps", "scheduler", "max_grad_norm", "max_steps", "epochs", "seed",
)


class RunDirError(ValueError):
    """A run directory or checkpoint that must not be used as asked; the message says why and what to pass."""


def run_settings(args, *, global_batch_size: int, mixed_precision: str) -> dict:
    """The JSON-able settings that identify a run (see ``TRAJECTORY_OPTIONS``)."""
    settings = {k: getattr(args, k, None) for k in TRAJECTORY_OPTIONS}
    settings["hparams"] = {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                           for k, v in sorted((settings["hparams"] or {}).items())}
    settings.update(global_batch_size=global_batch_size, mixed_precision=mixed_precision)
    return json.loads(json.dumps(settings))  # what reading it back from the file gives (tuples -> lists)


def prepare_run_dir(args, accelerator, settings: dict):
    """``(start_step, checkpoint or None)``: refuse a directory holding another run, or a checkpoint of
    another run, naming the differences; clear a run being replaced; record this run's settings."""
    ckpt, state = None, None
    if args.resume:
        ckpt = latest_checkpoint(args.output_dir) if args.resume == "auto" else args.resume
        if ckpt is None:
            accelerator.print(f"--resume: no checkpoint in {args.output_dir}/checkpoints, starting from scratch")
        else:
            state, diff = resume_state(ckpt, settings, allow_changes=args.allow_setting_changes)
            if diff:
                accelerator.print(f"warning: resuming {ckpt} with changed settings: {'; '.join(diff)}")
    action = check_output_dir(args.output_dir, settings, overwrite=args.overwrite) if ckpt is None else None
    accelerator.wait_for_everyone()  # every process has checked before the main one changes anything
    if accelerator.is_main_process:
        if action == "replace":
            accelerator.print(f"replacing the outputs of the earlier run in {args.output_dir}")
            clear_run(args.output_dir)
        write_settings(args.output_dir, settings)
    accelerator.wait_for_everyone()
    return (state["step"] if state else 0), ckpt


def differences(old: dict, new: dict) -> list[str]:
    """``["lr 0.001 -> 0.003", ...]`` for every setting that differs between two runs."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"{key.replace('_', '-')} {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}")
    return out


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path} cannot be read ({type(e).__name__}: {e}); it is not a usable run file") from None


def check_output_dir(output_dir: str, settings: dict, *, overwrite: bool) -> str | None:
    """Whether a new run may write into ``output_dir``: None when it holds no run; ``"replace"`` when the
    previous run must be cleared first (``--overwrite``, or a finished run with the same settings).
    Raises ``RunDirError`` naming the differences otherwise. Reads only; ``clear_run`` does the removing."""
    present = [n for n in RUN_FILES + RUN_DIRS if os.path.exists(os.path.join(output_dir, n))]
    if not present:
        return None
    if overwrite:
        return "replace"
    settings_path = os.path.join(output_dir, SETTINGS_FILE)
    if not os.path.exists(settings_path):
        raise RunDirError(
            f"--output-dir {output_dir} already holds run outputs ({', '.join(present)}) of a run whose settings "
            "are unknown; pass --overwrite to replace them, or choose another --output-dir")
    diff = differences(_read_json(settings_path), settings)
    if diff:
        raise RunDirError(
            f"--output-dir {output_dir} holds another run ({'; '.join(diff)}); pass --overwrite to replace it, "
            "--resume to continue it with its own settings, or choose another --output-dir")
    if not os.path.exists(os.path.join(output_dir, "summary.json")) and latest_checkpoint(output_dir):
        raise RunDirError(
            f"--output-dir {output_dir} holds an unfinished run with these settings and a checkpoint; pass "
            "--resume to continue it, or --overwrite to start it again")
    return "replace"  # the same run, finished: re-running it replaces its outputs


def clear_run(output_dir: str) -> None:
    """Remove what a previous run wrote (``RUN_FILES``, ``RUN_DIRS``); other files of the directory stay."""
    for name in RUN_FILES:
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            os.remove(path)
    for name in RUN_DIRS:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def write_settings(output_dir: str, settings: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    atomic_write(os.path.join(output_dir, SETTINGS_FILE), json.dumps(settings, indent=1))


def resume_state(ckpt: str, settings: dict, *, allow_changes: bool) -> tuple[dict, list[str]]:
    """``(trainer_state, differences)`` of checkpoint ``ckpt``; raises ``RunDirError`` when it is not a
    checkpoint, cannot be read, or belongs to a run with other settings (unless ``allow_changes``)."""
    state_path = os.path.join(ckpt, "trainer_state.json")
    if not os.path.isfile(state_path):
        raise RunDirError(f"--resume {ckpt}: not a checkpoint directory (no trainer_state.json in it)")
    state = _read_json(state_path)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise RunDirError(f"{state_path} has no step number; the checkpoint is damaged")
    saved = state.get("settings")
    diff = ["(the checkpoint records no settings)"] if saved is None else differences(saved, settings)
    if diff and not allow_changes:
        raise RunDirError(
            f"checkpoint {ckpt} belongs to a run with other settings ({'; '.join(diff)}); resume with that run's "
            "options, or pass --allow-setting-changes to continue it with these")
    return state, diff


def latest_checkpoint(output_dir: str) -> str | None:
    path = os.path.join(output_dir, "checkpoints", "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    ckpt = os.path.join(output_dir, "checkpoints", name)
    return ckpt if os.path.isdir(ckpt) else None


def atomic_write(path: str, text: str):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, keep: int):
    """Write the checkpoint to a temporary directory, then ``os.replace`` it into place: a run killed while
    saving leaves the previous checkpoint (and the ``latest`` pointer to it) intact."""
    root = os.path.join(output_dir, "checkpoints")
    name = f"step-{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)  # model, optimizer, scheduler, RNG states of every process
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write(os.path.join(tmp, "trainer_state.json"), json.dumps(state, indent=1))
        if os.path.exists(final):
            trash = os.path.join(root, f".old-{name}")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write(os.path.join(root, "latest"), name)
        if keep > 0:
            done = sorted(d for d in os.listdir(root) if d.startswith("step-"))
            for old in done[:-keep]:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, ckpt: str) -> None:
    """``accelerator.load_state``, with a damaged or incompatible checkpoint reported in one line."""
    try:
        accelerator.load_state(ckpt)
    except Exception as e:  # torch.load, safetensors and accelerate raise many types for a damaged file
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise RunDirError(f"checkpoint {ckpt} cannot be loaded ({type(e).__name__}: {first})") from None
