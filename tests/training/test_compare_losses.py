"""The loss study script on a tiny budget (two losses, one seed, a few steps), and what it computes: one
budget for every loss, mean ± std over seeds, and a conclusion taken from the numbers."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from tests.training.test_train import ROOT, _env  # noqa: E402
from training import compare_losses as C  # noqa: E402


def test_every_loss_gets_the_same_budget():
    args = C.parse_args([])
    assert sorted(args.losses) == sorted(C.LOSSES) and len(args.seeds) >= 3
    a, b = C.train_argv(args, "pair_mnm", 0, "o"), C.train_argv(args, "dpo", 0, "o")
    assert [x for x in a if x not in ("pair_mnm", "dpo")] == [x for x in b if x not in ("pair_mnm", "dpo")]
    assert "--eval-every" in a and "--max-steps" in a


def test_summary_and_conclusion_follow_the_numbers():
    runs = [{"loss": loss, "seed": seed, "train_seconds": 1.0, "eval/exact_match": em,
             "eval/likelihood_top_accuracy": lt, "eval/correct_chars": 3.0}
            for loss, seed, em, lt in (("dpo", 0, 0.5, 0.9), ("dpo", 1, 0.7, 0.8),
                                       ("pair_mnm", 0, 0.4, 0.95), ("pair_mnm", 1, 0.4, 0.97))]
    s = C.summarize(runs)
    assert s["dpo"]["eval/exact_match"]["mean"] == pytest.approx(0.6)
    assert s["dpo"]["eval/exact_match"]["std"] == pytest.approx(0.1414213, abs=1e-6)  # sample std, n - 1
    assert s["pair_mnm"]["eval/exact_match"]["std"] == 0.0
    text = C.conclusion(s)
    assert text.startswith("By held-out exact match the best loss is dpo (0.600 ± 0.141).")
    assert "ranks 2 of 2 by exact match, 1 of the 1 MPPO variants run, and 1 of 2 by likelihood-top" in text
    assert "gap to dpo (0.200) is larger than the two standard deviations added (0.141)" in text


def test_study_runs_on_a_tiny_budget(tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "training", "compare_losses.py"), "--losses", "pair_mnm", "dpo",
         "--seeds", "0", "--max-steps", "3", "--train-size", "64", "--eval-size", "16", "--hidden-size", "32",
         "--num-layers", "1", "--per-device-batch-size", "8", "--out-dir", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert [(r["loss"], r["seed"]) for r in res["runs"]] == [("pair_mnm", 0), ("dpo", 0)]
    assert res["budget"]["max_steps"] == 3 and res["stamp"]["git_dirty"] in (True, False, "unknown")
    assert all(0 <= r["eval/exact_match"] <= 1 and 0 <= r["eval/likelihood_top_accuracy"] <= 1 for r in res["runs"])
    md = (out / "results.md").read_text()
    assert "| `pair_mnm` |" in md and "| `dpo` |" in md and res["conclusion"] in md and res["stamp"]["date_utc"] in md
    assert (out / "loss_study.png").stat().st_size > 10_000
    assert "[2/2] dpo seed 0: exact match" in proc.stdout
