"""The training-step benchmark's CPU smoke mode (``python -m benchmarks.train_step --device cpu --tiny``), run
as a user runs it, in a subprocess, once through the ``benchmark`` fixture so that CI's
``pytest benchmarks --benchmark-only`` runs it (the timing itself is incidental)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_writes_results_and_the_methods_agree(benchmark, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--device", "cpu", "--tiny", "--K", "2", "4", "--steps", "1",
           "--warmup", "1", "--out", str(tmp_path)]
    proc = benchmark.pedantic(subprocess.run, args=(cmd,), kwargs=dict(cwd=ROOT, env=env, capture_output=True, text=True,
                                                                        timeout=300), rounds=1, iterations=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["stamp"]["device_type"] == "cpu" and result["stamp"]["git_dirty"] in (True, False, "unknown")
    assert (tmp_path / "train_step.png").stat().st_size > 10_000
    assert "CPU smoke, not judged" in (tmp_path / "results.md").read_text()
    rows = result["rows"]
    for model in ("llama-3.2-1b", "qwen2.5-0.5b"):
        for K in (2, 4):
            got = {r["method"]: r for r in rows if r["model"] == model and r["K"] == K}
            assert sorted(got) == (["a_logits", "b_padded", "c_packed"] + (["d_liger"] if K == 2 else []))
            for m in ("a_logits", "b_padded", "c_packed"):
                assert got[m]["status"] == "ok" and got[m]["tokens_per_s"] > 0, got[m]
            # Same rows, same weights (lr = 0): every layout computes the same loss.
            loss = got["a_logits"]["loss"]
            assert got["b_padded"]["loss"] == pytest.approx(loss, rel=1e-5)
            assert got["c_packed"]["loss"] == pytest.approx(loss, rel=1e-5)
            # The packed decoder runs fewer tokens than the padded one (each prompt once, no padding).
            assert got["c_packed"]["decoder_tokens"] < got["b_padded"]["decoder_tokens"]
            assert got["c_packed"]["unique_tokens"] == got["b_padded"]["unique_tokens"]
            if K == 2:  # liger-kernel needs CUDA; here it is either not installed or refused, with the reason
                assert got["d_liger"]["status"] in ("missing", "unsupported") and got["d_liger"]["note"]
