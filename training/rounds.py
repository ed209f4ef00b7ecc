"""Two rounds of preference training on the embedded task, the second on the policy's own samples (the
on-policy recipe of the Multi-DPO paper, arXiv 2412.07812, at toy scale)::

    python training/rounds.py                  # -> runs/rounds/
    python training/rounds.py --control        # + round 1 trained as long again on the corruptions, for comparison

1. round 1: train.py's embedded default, on the generated corruptions -> ``round1/``;
2. augment.py: K samples per training prompt from ``round1/final``, scored by the task's verifier ->
   ``round2_data.jsonl`` (+ provenance);
3. round 2: train.py from ``round1/final`` on those samples -> ``round2/``, with ``--generation-eval embedded`` so
   its exact match is measured on the same held-out prompts of the task as round 1's.

It prints the held-out greedy exact match and correct characters before training and after each round, and
writes them to ``rounds.json``. Options it does not know go to round 1's train.py (e.g. ``--hidden-size 64``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: `training.*`

from training import augment  # noqa: E402
from training import data as D  # noqa: E402
from training import embedded  # noqa: E402
from training.checkpoint import RunDirError, atomic_write  # noqa: E402
from training.inprocess import run_train  # noqa: E402
from training.options import UsageError  # noqa: E402
from training.scoring import ScorerError  # noqa: E402
from benchmarks.stamp import run_stamp  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="runs/rounds")
    p.add_argument("--overwrite", action="store_true", help="replace other runs found in the round directories")
    p.add_argument("--control", action="store_true", help="also continue round 1 on the corruptions with round 2's "
                   "budget: does the gain come from the on-policy data or from more training?")
    g = p.add_argument_group("both rounds")
    g.add_argument("--task", default="reverse")
    g.add_argument("--task-length", type=int, default=6)
    g.add_argument("--num-responses", type=int, default=4, help="K of round 1's generated data")
    g.add_argument("--train-size", type=int, default=4096)
    g.add_argument("--eval-size", type=int, default=512, help="held-out prompts (never sampled; exact match on them)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--loss", default="pair_mnm")
    g.add_argument("--per-device-batch-size", type=int, default=32)
    g.add_argument("--eval-every", type=int, default=32)
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("sampling and round 2")
    g.add_argument("--num-samples", type=int, default=4, help="on-policy samples per training prompt")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--sample-seed", type=int, default=0)
    g.add_argument("--sample-batch-size", type=int, default=256)
    g.add_argument("--round2-lr", type=float, default=3e-4)
    g.add_argument("--round2-epochs", type=float, default=1.0)
    g.add_argument("--round2-max-steps", type=int, help="overrides --round2-epochs")
    return p.parse_known_args(argv)


def main(argv=None) -> dict:
    args, round1_extra = parse_args(argv)
    if "--no-save-model" in round1_extra:
        raise UsageError("--no-save-model: round 2 samples from and starts at round 1's saved model")
    out = args.output_dir
    paths = {k: os.path.join(out, k) for k in ("round1", "round2", "control")}
    data = os.path.join(out, "round2_data.jsonl")
    task = ["--task", args.task, "--task-length", str(args.task_length), "--num-responses", str(args.num_responses),
            "--seed", str(args.seed)]
    common = [*task, "--loss", args.loss, "--per-device-batch-size", str(args.per_device_batch_size),
              "--eval-every", str(args.eval_every), *(["--no-progress"] if args.no_progress else []),
              *(["--overwrite"] if args.overwrite else [])]
    sizes = ["--train-size", str(args.train_size), "--eval-size", str(args.eval_size)]
    budget = (["--max-steps", str(args.round2_max_steps)] if args.round2_max_steps
              else ["--epochs", str(args.round2_epochs)])
    final1 = os.path.join(paths["round1"], "final")

    print("== round 1: the generated corruptions")
    s1 = run_train([*common, *sizes, *round1_extra, "--output-dir", paths["round1"]])
    print(f"== sampling {args.num_samples} responses per training prompt from {final1}")
    counts = augment.main(["--policy", final1, "--output", data, "--overwrite", "--num-samples", str(args.num_samples),
                           "--temperature", str(args.temperature), "--seed", str(args.sample_seed),
                           "--batch-size", str(args.sample_batch_size), "--task", args.task,
                           "--task-length", str(args.task_length), "--num-responses", str(args.num_responses),
                           *sizes, "--task-seed", str(args.seed), *(["--no-progress"] if args.no_progress else [])])
    with open(data) as f:
        best = [max(json.loads(line)["scores"]) for line in f]
    exact = sum(b == embedded.answer_length(args.task, args.task_length) for b in best) / max(1, len(best))
    print(f"the exact answer is among the samples of {exact:.1%} of the prompts (in the corruptions: "
          f"{exact_in_corruptions(args):.1%})")
    # Round 2 carves its own held-out rows from the samples for the ranking metrics; its exact match is on
    # the embedded held-out prompts, rebuilt from the same task options and seed.
    round2 = [*common, "--model", final1, "--lr", str(args.round2_lr), *budget, "--generation-eval", "embedded",
              "--generation-eval-prompts", str(s1["after"]["eval/generated_prompts"])]
    print("== round 2: the round-1 policy's own samples")
    s2 = run_train([*round2, "--dataset", data, "--output-dir", paths["round2"]])
    rows = [("before training", "", s1["before"]), ("round 1", "generated corruptions", s1["after"]),
            ("round 2", f"{counts['rows_written']} prompts x <= {args.num_samples} on-policy samples", s2["after"])]
    if args.control:
        print(f"== control: round 1 continued on the corruptions for round 2's {s2['steps']} steps")
        s3 = run_train([*round2, *sizes, "--max-steps", str(s2["steps"]), "--output-dir", paths["control"]])
        rows.append(("control", "round 1 + the corruptions again", s3["after"]))
    return report(rows, s1, s2, args, out, exact_in_samples=exact)


def exact_in_corruptions(args) -> float:
    rows, _ = embedded.make_task_splits(args.train_size, args.eval_size, task=args.task, length=args.task_length,
                                        k=args.num_responses, seed=args.seed)
    return sum(max(r["scores"]) == embedded.answer_length(args.task, args.task_length) for r in rows) / len(rows)


def report(rows, s1, s2, args, out, exact_in_samples: float) -> dict:
    n = s1["after"]["eval/generated_prompts"]
    print(f"\nheld-out greedy generations, the same {n} prompts of the embedded task ({args.task}, length "
          f"{args.task_length}) throughout:")
    print(f"{'':16} {'trained on':44} {'exact match':>11} {'correct chars':>13}")
    for name, what, res in rows:
        print(f"{name:16} {what:44} {res['eval/exact_match']:11.3f} {res['eval/correct_chars']:13.2f}")
    # Round 2 starts from round 1's final model, evaluated on the same prompts: the two must agree.
    same = all(s2["before"][k] == s1["after"][k] for k in ("eval/exact_match", "eval/correct_chars"))
    print(f"round 2 before training: exact match {s2['before']['eval/exact_match']:.3f} "
          f"({'equal to' if same else 'DIFFERENT from'} round 1 after)")
    result = {"rows": [{"round": name, "trained_on": what, **res} for name, what, res in rows],
              "round2_starts_equal_round1_ends": same, "exact_answer_among_samples": exact_in_samples,
              "options": vars(args), "stamp": run_stamp()}
    atomic_write(os.path.join(out, "rounds.json"), json.dumps(result, indent=1))
    return result


def cli(argv=None):
    try:
        main(argv)
    except (UsageError, D.DataError, RunDirError, ScorerError) as e:
        print(f"rounds.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
