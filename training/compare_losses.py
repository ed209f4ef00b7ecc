"""The loss study: every loss of ``mppo_kernels.losses.LOSSES`` trained on the embedded task with the same model,
data, optimizer and number of steps, over several seeds; held-out greedy exact match and likelihood-top
accuracy as mean ± std, written to ``training/results/loss_study/`` (results.json, results.md, loss_study.png),
stamped with date, machine, versions and commit::

    python training/compare_losses.py                    # 14 losses x 3 seeds, in one process
    python training/compare_losses.py --losses pair_mnm dpo --seeds 0 --max-steps 4 --out-dir /tmp/study   # smoke

Each loss runs with its own default hyperparameters (``LossSpec.defaults``) and the embedded default's learning
rate; a seed changes the model's initialization, the generated task data and the data order, the same for
every loss. The ranking it gives is of these losses on this synthetic task at this budget, nothing more.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: `training.*`

from mppo_kernels.losses import LOSSES  # noqa: E402
from training.checkpoint import atomic_write  # noqa: E402
from training.inprocess import run_train  # noqa: E402
from benchmarks.stamp import run_stamp  # noqa: E402

METRICS = {"eval/exact_match": "exact match", "eval/likelihood_top_accuracy": "likelihood-top acc.",
           "eval/correct_chars": "correct chars"}
MPPO = "MPPO, arXiv 2412.15244"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--losses", nargs="+", default=sorted(LOSSES), choices=sorted(LOSSES), metavar="LOSS")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                     "loss_study"))
    g = p.add_argument_group("the budget, the same for every loss (train.py options)")
    g.add_argument("--task", default="reverse")
    g.add_argument("--task-length", type=int, default=4, help="4, not the default 6: at this budget exact match on "
                   "6 symbols stays near 0 for every loss, which would rank nothing")
    g.add_argument("--train-size", type=int, default=4096)
    g.add_argument("--eval-size", type=int, default=256)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--per-device-batch-size", type=int, default=32)
    g.add_argument("--max-steps", type=int, default=128)
    g.add_argument("--lr", type=float, default=3e-3)
    return p.parse_args(argv)


BUDGET_KEYS = ("task", "task_length", "train_size", "eval_size", "hidden_size", "num_layers", "per_device_batch_size",
               "max_steps", "lr")


def train_argv(args, loss: str, seed: int, out_dir: str) -> list[str]:
    """train.py's options of one run: the budget, then what differs (the loss, the seed, where it writes)."""
    budget = [x for k in BUDGET_KEYS for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    return [*budget, "--eval-every", "0", "--report-to", "none", "--no-save-model", "--no-progress", "--overwrite",
            "--loss", loss, "--seed", str(seed), "--output-dir", out_dir]


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(runs: list[dict]) -> dict:
    """``{loss: {metric: {mean, std, n}, "train_seconds": ...}}`` over the seeds (std: sample, n - 1)."""
    out = {}
    for loss in dict.fromkeys(r["loss"] for r in runs):
        mine = [r for r in runs if r["loss"] == loss]
        out[loss] = {k: mean_std([r[k] for r in mine]) for k in (*METRICS, "train_seconds")}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = tempfile.mkdtemp(prefix="loss-study-")
    runs, started, load_start = [], time.time(), os.getloadavg()[0]
    total = len(args.seeds) * len(args.losses)
    try:
        for seed in args.seeds:
            for loss in args.losses:
                log = io.StringIO()  # train.py's own lines, shown only if the run fails
                try:
                    with contextlib.redirect_stdout(log):
                        s = run_train(train_argv(args, loss, seed, os.path.join(work, f"{loss}-{seed}")))
                except Exception:
                    print(log.getvalue()[-3000:], file=sys.stderr)
                    raise
                runs.append({"loss": loss, "seed": seed, "train_seconds": s["train_seconds"],
                             "wall_seconds": s["total_seconds"],
                             **{k: s["after"][k] for k in METRICS}})
                r = runs[-1]
                print(f"[{len(runs)}/{total}] {loss} seed {seed}: exact match {r['eval/exact_match']:.3f}, "
                      f"likelihood-top {r['eval/likelihood_top_accuracy']:.3f} ({s['train_seconds']:.1f} s training)",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"budget": {k: getattr(args, k) for k in BUDGET_KEYS}, "seeds": args.seeds,
              "wall_seconds": round(time.time() - started, 1), "stamp": run_stamp(), "runs": runs,
              # Above the core count, other work shared the CPU: the times then say little about the losses.
              "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
              "summary": summarize(runs)}
    result["conclusion"] = conclusion(result["summary"])
    write_outputs(result, args.out_dir)
    print(f"\n{table(result)}\n\n{result['conclusion']}\n\nwritten to {args.out_dir}/ in "
          f"{result['wall_seconds']:.0f} s")
    return result


def ranked(summary: dict, metric: str) -> list[str]:
    return sorted(summary, key=lambda loss: -summary[loss][metric]["mean"])


def conclusion(summary: dict) -> str:
    """Where Pair-MNM lands (the MPPO paper's Table 2 puts it first among MPPO's variants), from the numbers."""
    em = "eval/exact_match"
    order = ranked(summary, em)
    best = order[0]
    fmt = lambda loss: f"{summary[loss][em]['mean']:.3f} ± {summary[loss][em]['std']:.3f}"  # noqa: E731
    text = f"By held-out exact match the best loss is {best} ({fmt(best)})."
    if "pair_mnm" not in summary:
        return text
    variants = [loss for loss in order if LOSSES[loss].paper == MPPO]
    lead = summary[best][em]["mean"] - summary["pair_mnm"][em]["mean"]
    noise = summary[best][em]["std"] + summary["pair_mnm"][em]["std"]
    text += (f" pair_mnm ({fmt('pair_mnm')}) ranks {order.index('pair_mnm') + 1} of {len(order)} by exact match, "
             f"{variants.index('pair_mnm') + 1} of the {len(variants)} MPPO variants run, and "
             f"{ranked(summary, 'eval/likelihood_top_accuracy').index('pair_mnm') + 1} of {len(order)} by "
             "likelihood-top accuracy.")
    if best != "pair_mnm":
        text += (f" Its gap to {best} ({lead:.3f}) is {'within' if lead <= noise else 'larger than'} the two "
                 f"standard deviations added ({noise:.3f}).")
    return text


def table(result: dict) -> str:
    s = result["summary"]
    lines = ["| rank | loss | exact match | likelihood-top acc. | correct chars (of "
             f"{result['budget']['task_length']}) | training s / run | paper |", "|---|---|---|---|---|---|---|"]
    for i, loss in enumerate(ranked(s, "eval/exact_match"), 1):
        cells = [f"{s[loss][k]['mean']:.3f} ± {s[loss][k]['std']:.3f}" for k in METRICS]
        cells[2] = f"{s[loss]['eval/correct_chars']['mean']:.2f} ± {s[loss]['eval/correct_chars']['std']:.2f}"
        lines.append(f"| {i} | `{loss}` | {' | '.join(cells)} | {s[loss]['train_seconds']['mean']:.1f} | "
                     f"{LOSSES[loss].paper} |")
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "results.json"), json.dumps(result, indent=1))
    st, b = result["stamp"], result["budget"]
    md = [f"# Loss study on the embedded task ({b['task']}, length {b['task_length']})", "",
          f"{st['date_utc']} · {st['device']} ({st['cpu_count']} cores) · torch {st['torch']} · transformers "
          f"{st['transformers']} · commit `{st['git_commit'][:12]}` (uncommitted changes: {st['git_dirty']}) · "
          f"{result['wall_seconds']:.0f} s in all (1-minute load average {result['load_average_1min']['start']:.1f} at "
          f"the start, {result['load_average_1min']['end']:.1f} at the end)", "",
          f"Every loss: {b['max_steps']} steps of {b['per_device_batch_size']} prompts from {b['train_size']} "
          f"generated training prompts (K = 4 corrupted answers each), a {b['num_layers']}-layer Llama of hidden size "
          f"{b['hidden_size']}, AdamW lr {b['lr']} cosine, the loss's default hyperparameters; seeds "
          f"{', '.join(map(str, result['seeds']))}. Held-out ({b['eval_size']} prompts never trained on): greedy exact "
          "match of the policy's own answer, the fraction of prompts whose best response gets the top mean "
          "log-likelihood (chance 0.25), and the mean correct characters of the greedy answer. Mean ± sample std "
          "over the seeds.", "", table(result), "", result["conclusion"], "", "![loss study](loss_study.png)", ""]
    atomic_write(os.path.join(out_dir, "results.md"), "\n".join(md))
    plot(result, os.path.join(out_dir, "loss_study.png"))


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    order = ranked(s, "eval/exact_match")[::-1]  # best at the top
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.42 * len(order) + 1.6), sharey=True)
    for ax, key in zip(axes, ("eval/exact_match", "eval/likelihood_top_accuracy")):
        y = range(len(order))
        ax.barh(y, [s[loss][key]["mean"] for loss in order], xerr=[s[loss][key]["std"] for loss in order],
                color=["tab:orange" if loss == "pair_mnm" else "tab:blue" for loss in order], alpha=0.75, capsize=3)
        for i, loss in enumerate(order):  # every seed, not only the mean
            vals = [r[key] for r in result["runs"] if r["loss"] == loss]
            ax.plot(vals, [i] * len(vals), "k.", ms=4)
        ax.set(title=f"held-out {METRICS[key]}", xlim=(0, 1.02), yticks=list(y), yticklabels=order)
        ax.grid(axis="x", alpha=0.3)
    axes[1].axvline(0.25, color="gray", ls="--", lw=0.8)  # chance with K = 4
    b, st = result["budget"], result["stamp"]
    fig.suptitle(f"embedded {b['task']} task (length {b['task_length']}), {b['max_steps']} steps, seeds "
                 f"{result['seeds']} (mean ± std; dots: the seeds)", fontsize=10)
    fig.text(0.01, 0.005, f"{st['date_utc']} · {st['device']} · commit {st['git_commit'][:12]} "
             f"(dirty: {st['git_dirty']})", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
