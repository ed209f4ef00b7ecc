"""rounds.py end to end at a tiny size: round 1 on the corruptions, on-policy samples from round 1's saved
model, round 2 from that model on them, exact match on the same held-out prompts before and after."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from tests.training.test_train import ROOT, _env  # noqa: E402


def test_two_rounds(tmp_path):
    out = tmp_path / "rounds"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "training", "rounds.py"), "--output-dir", str(out), "--train-size", "128",
         "--eval-size", "32", "--per-device-batch-size", "8", "--eval-every", "0", "--round2-max-steps", "2",
         "--num-samples", "3", "--no-progress", "--hidden-size", "32", "--num-layers", "1", "--max-steps", "4",
         "--report-to", "none"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in res["rows"]] == ["before training", "round 1", "round 2"]
    assert all(r["eval/generated_prompts"] == 32 for r in res["rows"])
    assert res["round2_starts_equal_round1_ends"] and "(equal to round 1 after)" in proc.stdout
    prov = json.loads((out / "round2_data.provenance.json").read_text())
    assert prov["settings"]["policy"] == str(out / "round1" / "final") and prov["settings"]["num_samples"] == 3
    settings = json.loads((out / "round2" / "run_settings.json").read_text())
    assert settings["model"] == str(out / "round1" / "final") and settings["dataset"] == str(out / "round2_data.jsonl")
    assert "exact match" in proc.stdout.splitlines()[-5]
