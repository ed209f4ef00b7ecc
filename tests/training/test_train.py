"""End-to-end training at tiny sizes, each run in a subprocess as a user would start it.

Subprocesses keep tests/conftest.py's NaN-poisoned ``torch.empty`` and ``TRITON_INTERPRET`` out of
transformers and accelerate (on CPU the op's ``impl="auto"`` takes its chunked torch path anyway), and give
every run a fresh accelerate state.

Tolerances: a resumed run and a run with a precomputed reference repeat the same CPU arithmetic in the same
order, so their losses must agree to float32 rounding (1e-6). Two processes sum the gradient over gloo in a
different order than one process accumulating two micro-batches; the difference (seen: ~1e-8) grows
through Adam over a few steps, so losses must agree within 1e-5.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "training", "train.py")

# A tiny model and short runs: each run is a few seconds, most of it imports.
TINY = ["--hidden-size", "32", "--num-layers", "1", "--num-heads", "4", "--train-size", "256", "--eval-size", "64",
        "--per-device-batch-size", "8", "--max-steps", "6", "--eval-every", "3", "--no-progress", "--no-save-model"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES="", **extra)
    return env


def run(args, *, launcher=(), timeout=300, **env):
    cmd = [*launcher, *(() if launcher else (sys.executable,)), TRAIN, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def run_fails(args, **env):
    """stderr of a run that must stop with one clear line (exit status 2, no traceback)."""
    proc = subprocess.run([sys.executable, TRAIN, *args], cwd=ROOT, env=_env(**env), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-6000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: "), proc.stderr[-3000:]
    return last


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(out_dir, key="train/loss"):
    return {r["step"]: r[key] for r in records(out_dir) if key in r}


def summary(out_dir):
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


def test_embedded_default_learns(tmp_path):
    """The embedded default at a reduced size: the held-out fraction of prompts whose best response gets the
    highest likelihood rises clearly above its start (chance is 0.25 with K = 4)."""
    out = tmp_path / "run"
    log = run(["--hidden-size", "64", "--num-layers", "1", "--train-size", "2048", "--eval-size", "256",
               "--epochs", "1", "--eval-every", "32", "--no-progress", "--output-dir", str(out)])
    s = summary(out)
    before, after = s["before"]["eval/likelihood_top_accuracy"], s["after"]["eval/likelihood_top_accuracy"]
    assert s["before"]["eval/chance"] == pytest.approx(0.25)
    assert after >= before + 0.25 and after >= 0.5, (before, after)
    assert s["after"]["eval/loss"] < s["before"]["eval/loss"]
    assert f"before {before:.3f} -> after {after:.3f}" in log
    assert "train data (responses): 2048 rows, 2048 kept; skipped: none" in log
    evals = [r["step"] for r in records(out) if "eval/likelihood_top_accuracy" in r]
    assert evals == [0, 32, 64]  # before, periodic, after
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert (out / "final" / "config.json").exists() and (out / "final" / "tokenizer.json").exists()
    # TensorBoard is optional (not in the [train] extra): its event file is written exactly when it is installed.
    import importlib.util

    has_tb = importlib.util.find_spec("tensorboard") is not None
    events = [n for _, _, files in os.walk(out) for n in files if n.startswith("events.out.tfevents")]
    assert bool(events) == has_tb


def test_resume_equals_uninterrupted(tmp_path):
    """Interrupted after step 3 (last checkpoint at step 2) and resumed: the losses of every step equal an
    uninterrupted run's. pair_single draws its negative from torch's global RNG, so this also checks that
    the RNG state comes back with the checkpoint."""
    args = [*TINY, "--loss", "pair_single", "--save-every", "2", "--save-total-limit", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run([*args, "--output-dir", str(full)])
    log = run([*args, "--output-dir", str(cut), "--stop-after-steps", "3"])
    assert "stopping after step 3" in log and not (cut / "summary.json").exists()
    ckpts = cut / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-00000002"
    log = run([*args, "--output-dir", str(cut), "--resume"])
    assert "resumed from" in log and "step-00000002 at step 2" in log
    expected, got = losses(full), losses(cut)
    assert sorted(got) == list(range(1, 7))  # step 3 of the interrupted run was replaced, not duplicated
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=0, abs=1e-6), step
    assert losses(cut, "eval/loss") == pytest.approx(losses(full, "eval/loss"), abs=1e-6)
    # Atomic checkpoints: no temporary directories left, the pointer names a complete checkpoint.
    assert sorted(os.listdir(ckpts)) == ["latest", "step-00000004", "step-00000006"]
    assert (ckpts / "latest").read_text() == "step-00000006"
    assert json.loads((ckpts / "step-00000006" / "trainer_state.json").read_text())["step"] == 6
    # The summary of the resumed run still reports the accuracy before training, from the first run's log.
    assert summary(cut)["before"] == summary(full)["before"]


def test_two_processes_equal_one(tmp_path):
    """2 processes x 8 prompts (gloo on CPU, DDP) against 1 process x 8 prompts x 2 accumulation steps:
    the same global batch of 16, so the same losses within 1e-5."""
    one, two = tmp_path / "one", tmp_path / "two"
    run([*TINY, "--gradient-accumulation-steps", "2", "--output-dir", str(one)])
    # `--cpu` would make accelerate start a single process; --multi_gpu is its torchrun launcher, and
    # train.py joins the processes over gloo when there is no CUDA.
    log = run([*TINY, "--output-dir", str(two)], launcher=(
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"),
        OMP_NUM_THREADS="1")
    assert "(2 processes x 8 x 1 accumulation)" in log and "MULTI_CPU on cpu" in log
    expected, got = losses(one), losses(two)
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=0, abs=1e-5), step
    # Held-out evaluation is sharded over the processes and summed: the same prompts are counted once.
    for a, b in zip((r for r in records(one) if "eval/loss" in r), (r for r in records(two) if "eval/loss" in r)):
        assert a["eval/prompts"] == b["eval/prompts"] == 64
        assert a["eval/likelihood_top_accuracy"] == b["eval/likelihood_top_accuracy"]
        assert a["eval/loss"] == pytest.approx(b["eval/loss"], abs=1e-5)


def test_reference_loss_on_the_fly_and_precomputed(tmp_path):
    """DPO needs reference log-probs: from a frozen copy of the initial model on every step, or computed
    once before training (--precompute-ref). Both give the same losses, also when the precomputed run is
    interrupted and resumed (it then reloads the stored values: the policy is no longer the reference)."""
    fly, pre = tmp_path / "fly", tmp_path / "pre"
    run([*TINY, "--loss", "dpo", "--output-dir", str(fly)])
    args = [*TINY, "--loss", "dpo", "--precompute-ref", "--save-every", "2", "--output-dir", str(pre)]
    log = run([*args, "--stop-after-steps", "3"])
    assert "precomputed reference log-probs for 256 train rows" in log
    assert (pre / "ref_logps.pt").exists()
    log = run([*args, "--resume"])
    assert "at step 2" in log and "precomputed reference" not in log
    expected, got = losses(fly), losses(pre)
    assert sorted(got) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=0, abs=1e-6), step
    first = next(r for r in records(fly) if "train/loss" in r)
    # At step 1 the policy is the reference: DPO's implicit rewards are 0 and the loss is log 2.
    assert first["train/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["train/loss"] == pytest.approx(0.693147, abs=1e-5)
    assert summary(fly)["after"]["eval/loss"] < 0.693147  # the policy moved away from the reference


SPY = r"""
import json, sys
import torch
from mppo_kernels.kernels import native, torch_likelihood

calls, head = [], {}

def spy_on(backend):
    original = backend.backward

    def spy(hidden, weight, bias, rows, targets, lse, grad, need, settings, **kw):
        calls.append({"need": list(need)})
        head.setdefault("weight", weight)  # shares the head's storage: an optimizer step would change it
        head.setdefault("initial", weight.detach().clone())
        return original(hidden, weight, bias, rows, targets, lse, grad, need, settings, **kw)

    backend.backward = spy  # the op's backward looks it up at call time

spy_on(native)
spy_on(torch_likelihood)
sys.path.insert(0, sys.argv[1])
from training import train

train.main(sys.argv[2:])
w = head["weight"]
print("SPY " + json.dumps({"calls": calls, "grad_is_none": w.grad is None,
                           "unchanged": bool(torch.equal(w.detach(), head["initial"]))}))
"""


def test_lora_frozen_head_skips_weight_gradient(tmp_path):
    """LoRA (peft, all-linear targets) leaves the LM head frozen: every backward of the op runs without the
    weight-gradient GEMMs, the head gets no gradient and does not change, and only the adapter is saved.
    With DPO the reference is the same model with its adapter disabled (no copy)."""
    out = tmp_path / "lora"
    args = [*TINY, "--loss", "dpo", "--lora-r", "4", "--output-dir", str(out)]
    args.remove("--no-save-model")
    proc = subprocess.run([sys.executable, "-c", SPY, ROOT, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SPY "))
    spy = json.loads(line[4:])
    assert len(spy["calls"]) == 6  # one backward per step
    assert all(c == {"need": [True, False, False]} for c in spy["calls"])
    assert spy["grad_is_none"] and spy["unchanged"]
    assert (out / "final" / "adapter_model.safetensors").exists() and not (out / "final" / "model.safetensors").exists()
    s = summary(out)
    assert s["after"]["eval/loss"] < s["before"]["eval/loss"]


EVERY_LOSS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from accelerate.state import AcceleratorState
from mppo_kernels.losses import LOSSES
from training import train

out = {}
for name in sorted(LOSSES):
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh accelerate state per run, as a new process
    s = train.main(["--loss", name, "--hidden-size", "32", "--num-layers", "1", "--train-size", "64",
                    "--eval-size", "16", "--per-device-batch-size", "8", "--max-steps", "2", "--eval-every", "0",
                    "--no-progress", "--no-save-model", "--report-to", "none", "--output-dir", f"{sys.argv[2]}/{name}"])
    out[name] = {"train": s["final_train"]["train/loss"], "before": s["before"]["eval/loss"],
                 "after": s["after"]["eval/loss"], "steps": s["steps"]}
print("LOSSES " + json.dumps(out))
"""


def test_every_loss_trains(tmp_path):
    """Each of the package's losses runs end to end (2 steps): reference losses with a frozen copy, point
    losses with score_scale set from the embedded task, and every held-out loss is finite."""
    import math

    from mppo_kernels.losses import LOSSES

    proc = subprocess.run([sys.executable, "-c", EVERY_LOSS, ROOT, str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    res = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("LOSSES "))[7:])
    assert sorted(res) == sorted(LOSSES)
    for name, r in res.items():
        assert r["steps"] == 2 and all(math.isfinite(r[k]) for k in ("train", "before", "after")), (name, r)


SAVE_MODEL = r"""
import sys
sys.path.insert(0, sys.argv[1])
from training import embedded

tok = embedded.build_char_tokenizer()
tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<assistant>{% endif %}")
embedded.build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=4).save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
"""


def test_local_model_directory_and_armorm_file(tmp_path):
    """The real-model path, offline: AutoModelForCausalLM / AutoTokenizer from a saved directory (with a chat
    template) and an ArmoRM-schema parquet file, with rows that must be skipped and counted."""
    import datasets

    model_dir = tmp_path / "model"
    proc = subprocess.run([sys.executable, "-c", SAVE_MODEL, ROOT, str(model_dir)], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sys.path.insert(0, ROOT)
    from training import embedded

    rows = [{"prompt": r["prompt"], "all_generated_responses": r["responses"], "all_rm_scores": r["scores"]}
            for r in embedded.make_task_rows(96, length=4, seed=5)]
    rows[0]["all_rm_scores"] = [float("nan")] * 4  # no usable score
    rows[1]["all_generated_responses"] = ["", "", "", rows[1]["all_generated_responses"][3]]  # 1 response left
    path = tmp_path / "armorm.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    out = tmp_path / "run"
    log = run(["--model", str(model_dir), "--dataset", str(path), "--eval-size", "16", "--max-length", "32",
               "--max-prompt-length", "16", "--per-device-batch-size", "8", "--max-steps", "4", "--lr", "1e-3",
               "--no-progress", "--output-dir", str(out)])
    assert "train data (armorm): 80 rows" in log and "held-out data (armorm): 16 rows" in log
    s = summary(out)
    counts = {k: s["data_counts"]["train"].get(k, 0) + s["data_counts"]["eval"].get(k, 0)
              for k in ("rows", "kept", "response:nan_or_missing_score", "response:empty_response",
                        "row:fewer_than_2_responses")}
    assert counts == {"rows": 96, "kept": 94, "response:nan_or_missing_score": 4, "response:empty_response": 3,
                      "row:fewer_than_2_responses": 2}
    assert sorted(r["step"] for r in records(out) if "train/loss" in r) == [1, 2, 3, 4]
    assert (out / "final" / "model.safetensors").exists()


def test_default_config_file_matches_builtin_defaults():
    """training/configs/run_default.yaml spells out what `train.py` with no arguments does."""
    sys.path.insert(0, ROOT)
    from training import train

    builtin = vars(train.parse_args([]))
    from_file = vars(train.parse_args(["--config", os.path.join(ROOT, "training", "configs", "run_default.yaml")]))
    assert from_file.pop("config").endswith("run_default.yaml") and builtin.pop("config") is None
    assert from_file == builtin


def test_run_directory_holds_one_run(tmp_path):
    """A new run never writes into another run's directory, and --resume never continues another run's
    checkpoint, without being told; the differences are named. (The bug: a second run overwrote the first's
    metrics, summary and model, and --resume then continued the other run's checkpoint.)"""
    out = tmp_path / "run"
    base = [*TINY, "--save-every", "2", "--output-dir", str(out)]
    run([*base, "--stop-after-steps", "2"])  # pair_mnm, interrupted with a checkpoint at step 2
    first_metrics = (out / "metrics.jsonl").read_text()
    err = run_fails([*base, "--loss", "dpo"])
    assert "holds another run (hparams {} -> {'beta': 0.1}; loss 'pair_mnm' -> 'dpo')" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == first_metrics  # untouched
    assert "unfinished run with these settings" in run_fails(base)  # same settings: it wants --resume
    err = run_fails([*base, "--resume", "--lr", "0.01"])
    assert "belongs to a run with other settings (lr 0.003 -> 0.01)" in err and "--allow-setting-changes" in err
    log = run([*base, "--resume", "--lr", "0.01", "--allow-setting-changes", "--max-steps", "3"])
    assert "warning: resuming" in log and "lr 0.003 -> 0.01" in log and "max-steps 6 -> 3" in log
    # A damaged checkpoint is one line, not a traceback from deep inside torch.
    ckpt = out / "checkpoints" / "step-00000002"
    weights = next(p for p in ckpt.iterdir() if p.name.startswith("model") and p.is_file())
    weights.write_bytes(b"not a checkpoint")
    err = run_fails([*base, "--resume", str(ckpt), "--max-steps", "3", "--allow-setting-changes"])
    assert f"checkpoint {ckpt} cannot be loaded" in err
    # --overwrite replaces the earlier run: nothing of it is left to resume or to mix into the metrics.
    run([*base, "--loss", "dpo", "--overwrite"])
    assert json.loads((out / "run_settings.json").read_text())["loss"] == "dpo"
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-00000004", "step-00000006"]
    assert sorted(losses(out)) == list(range(1, 7))
    # Re-running a finished run with the same settings replaces it (the README's main job can be run twice).
    assert "replacing the outputs of the earlier run" in run([*base, "--loss", "dpo"])


def test_dtype_applies_to_the_embedded_model():
    sys.path.insert(0, ROOT)
    import torch

    from training import train

    args = train.parse_args(["--dtype", "bfloat16", "--hidden-size", "16", "--num-layers", "1"])
    model, _ = train.load_model_and_tokenizer(args)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unloadable_model_is_one_line(tmp_path):
    (tmp_path / "model").mkdir()  # exists, but holds no model
    err = run_fails(["--model", str(tmp_path / "model"), "--output-dir", str(tmp_path / "o")])
    assert f"--model {tmp_path / 'model'}: cannot load it (" in err


@pytest.mark.parametrize("argv, message", [
    (["--loss", "nope"], "unknown --loss 'nope'"),
    (["--loss", "dpo", "--hparam", "beta=-1"], "beta must be finite and > 0"),
    (["--hparam", "gamma"], "--hparam expects KEY=VALUE"),
    (["--loss", "simpo", "--hparam", "tau=1"], "unknown hyperparameter(s) tau"),
    (["--per-device-batch-size", "0"], "--per-device-batch-size must be >= 1"),
    (["--dataset", "x.jsonl", "--max-length", "64", "--max-prompt-length", "65"], "exceeds --max-length 64"),
    # Options that used to be accepted and then ignored or misapplied:
    (["--lr", "inf"], "--lr must be finite and > 0, got inf"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be finite and >= 0, got -1.0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be finite and >= 0, got nan"),
    (["--warmup-steps", "-3"], "--warmup-steps must be >= 0, got -3"),
    (["--tokenizer", "gpt2"], "--tokenizer needs --model"),
    (["--mixed-precision", "fp16"], "--mixed-precision fp16 needs a CUDA GPU"),  # CPU autocast has no fp16
    (["--resume", "/nonexistent/ckpt"], "--resume /nonexistent/ckpt: no such checkpoint directory"),
    (["--model", "./no/such/model"], "--model ./no/such/model: no such file or directory"),
    (["--dataset", "data/train.jsonl"], "--dataset 'data/train.jsonl': no such file or directory"),
    (["--allow-setting-changes"], "--allow-setting-changes applies to --resume only"),
    (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
])
def test_bad_options_name_the_argument(argv, message, capsys, monkeypatch):
    sys.path.insert(0, ROOT)
    import torch

    from training import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_config_file_unknown_key(tmp_path, capsys):
    sys.path.insert(0, ROOT)
    from training import train

    cfg = tmp_path / "run.yaml"
    cfg.write_text("loss: pair_mnm\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(cfg)])
    err = capsys.readouterr().err
    assert "unknown keys" in err and "learning_rate" in err


def test_zero3_reference_copy_is_refused_with_the_fix_named():
    """Under ZeRO-3 weights may be partitioned at load time, so a deep-copied reference would be unusable:
    a reference loss without LoRA must ask for --precompute-ref (checked without DeepSpeed installed)."""
    sys.path.insert(0, ROOT)
    from training import embedded
    from training.modeling import PreferenceModel

    tok = embedded.build_char_tokenizer()
    model = embedded.build_tiny_llama(tok, hidden_size=16, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="--precompute-ref"):
        PreferenceModel(model, "dpo", zero3=True)
    with pytest.raises(ValueError, match="unknown loss"):
        PreferenceModel(model, "nope")
