"""Tests of the benchmark harness itself: the stamp, the oracle's verdicts, the baseline adapters (on
stand-in packages with the installed libraries' call signatures), the report, the comparison and the
breakdown end to end on CPU.

Each test runs its subject once through the ``benchmark`` fixture (``benchmark.pedantic(..., rounds=1)``)
so that CI's ``pytest benchmarks --benchmark-only`` runs it; the timing itself is incidental.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

from benchmarks import compare, report
from benchmarks.common import IGNORE_INDEX, Case, make_inputs, make_upstream
from benchmarks.oracle import check, oracle, per_sequence_mean, token_logps, tolerance
from benchmarks.stamp import git_state

HERE = os.path.dirname(os.path.abspath(__file__))
SHA = "0123456789abcdef0123456789abcdef01234567"


def once(benchmark, fn, *args, **kwargs):
    return benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=1, iterations=1)


def _tiny(targets="masked", dtype="fp32", softcap=None):
    case = Case("tiny", 32, 300, 1, 2, 24, dtype, targets, softcap)
    hidden, weight, labels, stats = make_inputs(case, "cpu", seed=3)
    dt = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype])
    return case, hidden.to(dt), weight.to(dt), labels, stats, make_upstream(case, "cpu")


# ----------------------------------------------------------------------------------------------- stamp
def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_stamp_commit_and_dirty_flag(benchmark, tmp_path):
    bare = tmp_path / "copy"
    bare.mkdir()
    # A tree without git history: "unknown" unless the environment says otherwise, never a guessed False.
    assert once(benchmark, git_state, cwd=str(bare), env={}) == {
        "git_commit": "unknown", "git_dirty": "unknown", "git_source": "none"}
    assert git_state(cwd=str(bare), env={"MPPO_GIT_COMMIT": SHA}) == {
        "git_commit": SHA, "git_dirty": "unknown", "git_source": "environment"}
    assert git_state(cwd=str(bare), env={"MPPO_GIT_COMMIT": SHA, "MPPO_GIT_DIRTY": "false"})["git_dirty"] is False
    assert git_state(cwd=str(bare), env={"MPPO_GIT_COMMIT": SHA, "MPPO_GIT_DIRTY": "true"})["git_dirty"] is True
    for env, name in (({"MPPO_GIT_COMMIT": "abc"}, "MPPO_GIT_COMMIT"),
                      ({"MPPO_GIT_COMMIT": SHA, "MPPO_GIT_DIRTY": "maybe"}, "MPPO_GIT_DIRTY"),
                      ({"MPPO_GIT_DIRTY": "false"}, "MPPO_GIT_COMMIT")):
        with pytest.raises(ValueError, match=name):
            git_state(cwd=str(bare), env=env)
    if shutil.which("git") is None:
        pytest.skip("git not installed: the repository half of the test needs it")
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "code.py")
    _git(repo, "commit", "-q", "-m", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert git_state(cwd=str(repo), env={}) == {"git_commit": head, "git_dirty": False, "git_source": "git"}
    (repo / "benchmarks" / "results" / "results.json").write_text("{}")  # results do not make the code dirty
    assert git_state(cwd=str(repo), env={})["git_dirty"] is False
    (repo / "new.py").write_text("")  # an untracked source file does
    assert git_state(cwd=str(repo), env={})["git_dirty"] is True
    os.remove(repo / "new.py")
    (repo / "code.py").write_text("x = 2\n")
    assert git_state(cwd=str(repo), env={})["git_dirty"] is True
    with pytest.raises(ValueError, match="git HEAD"):  # a stale commit from the environment is refused
        git_state(cwd=str(repo), env={"MPPO_GIT_COMMIT": SHA})


# ----------------------------------------------------------------------------------------------- oracle
def _plain(hidden, weight, labels, softcap=None):
    tok = token_logps(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), softcap)
    return per_sequence_mean(tok.view(labels.shape), labels)


def test_oracle_marks_wrong_output_and_wrong_gradients(benchmark):
    case, hidden, weight, labels, _, up = _tiny(softcap=5.0)
    ref = once(benchmark, oracle, hidden, weight, labels, up, 5.0)
    assert check(lambda h, w, y: _plain(h, w, y, 5.0), hidden, weight, labels, up, ref)["correct"]
    # Forgetting the soft-cap, shifting the output, cutting dW or dH: each is caught by its own error.
    cases = {
        "max_abs_err": lambda h, w, y: _plain(h, w, y),
        "dweight_rel_err": lambda h, w, y: _plain(h, w.detach(), y),
        "dhidden_rel_err": lambda h, w, y: _plain(h * 0.5 + h.detach() * 0.5, w, y, 5.0),
    }
    for err, fn in cases.items():
        got = check(fn, hidden, weight, labels, up, ref)
        assert not got["correct"] and got[err] > got["tolerance"], (err, got)
    shifted = check(lambda h, w, y: _plain(h, w, y, 5.0) + 1e-3, hidden, weight, labels, up, ref)
    assert shifted["check"].startswith("wrong: max_abs") and "dhidden" not in shifted["check"]
    # The fp32 branch (the CUDA oracle) agrees with the fp64 one.
    ref32 = oracle(hidden, weight, labels, up, 5.0, dtype=torch.float32)
    assert torch.allclose(ref32.dweight.double(), ref.dweight, rtol=1e-4, atol=1e-7)
    assert tolerance(torch.bfloat16) == 8 * torch.finfo(torch.bfloat16).eps and tolerance(torch.float32) == 1e-4


# ----------------------------------------------------------------------------------------------- baselines
def _fake_liger(new_signature: bool):
    calls = []

    def nll(_input, weight, target, ignore_index, reduction, softcap):
        assert reduction == "none" and _input.dim() == 2 and ignore_index == IGNORE_INDEX
        return -token_logps(_input, weight, target, softcap)  # per-token NLL [n], 0 at ignored rows

    if new_signature:
        def forward(ctx, _input, weight, target, bias=None, ce_weight=None, ignore_index=-100, lse_square_scale=0.0,
                    label_smoothing=0.0, reduction="mean", softcap=None, return_z_loss=False, accum_dtype=None,
                    chunk_mem_const=1):
            pass
    else:  # liger-kernel before ce_weight, soft-capping and the chunking setting
        def forward(ctx, _input, weight, target, bias=None, ignore_index=-100, lse_square_scale=0.0,
                    label_smoothing=0.0, reduction="mean"):
            pass

    class Function:
        @staticmethod
        def apply(*args):
            kw = dict(zip(list(inspect.signature(forward).parameters)[1:], args))
            calls.append(kw)
            return nll(kw["_input"], kw["weight"], kw["target"], kw["ignore_index"], kw["reduction"], kw.get("softcap")), None

    Function.forward = staticmethod(forward)
    return Function, calls


def _install(monkeypatch, name, **attrs):
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        mod = sys.modules.get(".".join(parts[:i])) if i < len(parts) else None
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), mod or types.ModuleType(".".join(parts[:i])))
    for k, v in attrs.items():
        setattr(sys.modules[name], k, v)


def test_baseline_adapters_bind_by_the_installed_signature(benchmark, monkeypatch):
    from benchmarks import providers

    case, hidden, weight, labels, stats, up = _tiny(softcap=5.0)
    ref = oracle(hidden, weight, labels, up, 5.0)
    new, calls = _fake_liger(new_signature=True)
    _install(monkeypatch, "liger_kernel.ops.fused_linear_cross_entropy", LigerFusedLinearCrossEntropyFunction=new)
    liger = {p.name: p for p in once(benchmark, providers._liger_providers)}
    for name in ("liger_flce", "liger_flce_compacted"):
        p = liger[name]
        assert [s["chunk_mem_const"] for s in p.sweep] == list(providers.LIGER_CHUNK_MEM_CONSTS)
        assert p.unavailable("cpu", case, "fwd_bwd").startswith("unsupported: Liger")  # CUDA only
        assert check(p.bind(case, stats["valid_tokens"], chunk_mem_const=4), hidden, weight, labels, up, ref)["correct"]
        assert calls[-1]["chunk_mem_const"] == 4 and calls[-1]["softcap"] == 5.0 and calls[-1]["bias"] is None
    assert calls[-1]["_input"].shape[0] == stats["valid_tokens"]  # the compacted one gets target rows only
    assert liger["liger_flce"].computes == "all" and liger["liger_flce_compacted"].computes == "targets"

    old, _ = _fake_liger(new_signature=False)
    _install(monkeypatch, "liger_kernel.ops.fused_linear_cross_entropy", LigerFusedLinearCrossEntropyFunction=old)
    p = {p.name: p for p in providers._liger_providers()}["liger_flce"]
    assert p.sweep == ({},) and "no chunking setting" in p.notes
    assert p.unavailable("cuda", case, "fwd_bwd") == "unsupported: this liger-kernel has no softcap argument"
    plain = dataclasses.replace(case, softcap=None)
    assert check(p.bind(plain, stats["valid_tokens"]), hidden, weight, labels, up, oracle(hidden, weight, labels, up))["correct"]

    def linear_cross_entropy(e, c, targets, bias=None, ignore_index=-100, softcap=None, reduction="mean", shift=0,
                             filter_eps="auto"):
        assert reduction == "none"
        flat = token_logps(e.reshape(-1, e.shape[-1]), c, targets.reshape(-1), softcap)
        return -flat.view(targets.shape)

    _install(monkeypatch, "cut_cross_entropy", linear_cross_entropy=linear_cross_entropy)
    _install(monkeypatch, "cut_cross_entropy.tl_autotune", _AUTOTUNE=True)
    cce = {p.name: p for p in providers._cce_providers()}
    assert "autotune on" in cce["cce_exact"].notes and cce["cce_exact"].backward_dtypes == ("bf16", "fp16")
    assert check(cce["cce_filtered"].bind(case, stats["valid_tokens"]), hidden, weight, labels, up, ref)["correct"]


# ----------------------------------------------------------------------------------------------- report
def _row(provider, mode, ms, targets="all", correct=True, computes="targets", **kw):
    r = {"section": "likelihood", "loss": None, "head": "h", "D": 8, "V": 16, "B": 1, "K": 2, "T": 4, "tokens": 8,
         "dtype": "bf16", "targets": targets, "softcap": None, "provider": provider, "computes": computes,
         "mode": mode, "status": "ok", "note": None, "ms": ms, "ms_p20": ms, "ms_p80": ms, "samples": 10,
         "valid_tokens": 8 if targets == "all" else 4, "correct": correct, "check": "ok" if correct else "wrong: max_abs 0.3 > 0.06",
         "max_abs_err": 0.3 if not correct else 1e-6, "dhidden_rel_err": 1e-3, "dweight_rel_err": 1e-3,
         "workspace_bytes": 1 << 20, "peak_extra_bytes": 2 << 20, "workspace_pct_naive_logits": 1.0,
         "tflops": 1.0, "pct_gemm": 60.0, "tflops_recompute": 1.3}
    r.update(kw)
    return r


def test_report_puts_equal_work_first_and_never_ranks_a_wrong_provider(benchmark, tmp_path):
    rows = [_row("naive", "fwd_bwd", 4.0, "masked", computes="all"), _row("ours", "fwd_bwd", 2.0, "masked"),
            _row("naive", "fwd_bwd", 5.0, computes="all"), _row("bad", "fwd_bwd", 1.0, correct=False),
            _row("ours", "fwd_bwd", 2.5),
            _row("liger_flce", "fwd_bwd", None, computes="all", status="missing", note="missing: liger-kernel not installed")]
    stamp = {"date_utc": "d", "device": "dev", "device_type": "cuda", "cpu_count": 1, "torch": "t", "triton": "x",
             "cuda": "c", "mppo_kernels": "0", "git_commit": SHA, "git_dirty": False, "git_source": "environment"}
    data = {"stamp": stamp, "config": {"command": "c", "samples": 10}, "rows": rows}
    md = once(benchmark, report.markdown, data)
    assert md.index("**equal work**") < md.index("masked: 50 %")
    assert "git `0123456789ab` (dirty: false, from environment)" in md
    assert "naive, liger_flce compute the logits of every position" in md  # said of every provider, run or not
    bad_line = next(line for line in md.splitlines() if line.startswith("| bad |"))
    assert "wrong: not ranked" in bad_line and "**WRONG**" in bad_line
    assert "| ours fwd+bwd speed / naive's | ≥ 0.95× | 2.00× | met |" in md
    assert "missing: liger-kernel not installed" in md
    snippet = report.readme_snippet(data)
    assert snippet.index("bf16, every position a target |") < snippet.index("bf16, masked (50 % targets) |")
    assert "**wrong**" in snippet and "5.0 (2.00×) · 1 MiB" in snippet
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{report.MARKER_BEGIN}\nold table\n{report.MARKER_END}\nafter\n")
    report.update_readme(str(readme), snippet)
    text = readme.read_text()
    assert "old table" not in text and snippet in text and text.startswith("before") and text.endswith("after\n")


# ----------------------------------------------------------------------------------------------- end to end
def test_compare_cpu_run_checks_times_and_measures_every_provider(benchmark, tmp_path):
    out = tmp_path / "res"
    argv = ["--device", "cpu", "--heads", "llama3-8b/16", "--tokens", "64", "--K", "2", "--modes", "fwd_bwd",
            "--providers", "naive", "naive_compacted", "ours", "liger_flce",
            "--samples", "2", "--min-time-ms", "0", "--no-losses", "--no-cpu-targets", "--out", str(out)]
    once(benchmark, compare.main, argv)
    data = json.loads((out / "results.json").read_text())
    assert data["stamp"]["git_source"] in ("git", "environment", "none")
    rows = {(r["targets"], r["provider"], r["mode"]): r for r in data["rows"]}
    assert {t for t, _, _ in rows} == {"all", "masked"}
    if "cannot measure peak RSS" in (rows[("all", "naive", "fwd_bwd")].get("memory_note") or ""):
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    for targets in ("all", "masked"):
        for name in ("naive", "naive_compacted", "ours"):
            fb = rows[(targets, name, "fwd_bwd")]
            assert fb["status"] == "ok" and fb["correct"] is True, fb
            assert fb["samples"] >= 2 and len(fb["ms_samples"]) == fb["samples"] and fb["ms_p20"] <= fb["ms_p80"]
            assert fb["peak_extra_bytes"] > 0 and "RSS" in fb["memory_method"]
        naive = rows[(targets, "naive", "fwd_bwd")]
        assert naive["peak_extra_bytes"] >= naive["naive_logits_fp32_bytes"]  # its fp32 logits were resident
        assert rows[(targets, "liger_flce", "fwd_bwd")]["status"] == "missing"
    assert rows[("all", "naive", "fwd_bwd")]["valid_tokens"] == 64 > rows[("masked", "naive", "fwd_bwd")]["valid_tokens"]
    md = (out / "results.md").read_text()
    assert md.index("**equal work**") < md.index("masked:") and "| target | goal |" in md
    assert (out / "fwd_bwd_time.png").exists() and (out / "fwd_bwd_memory.png").exists()
    assert len((out / "results.jsonl").read_text().splitlines()) == len(data["rows"])


def test_breakdown_cpu_runs_the_public_stages(benchmark, tmp_path):
    from benchmarks import breakdown

    path = tmp_path / "breakdown.json"
    once(benchmark, breakdown.main, ["--device", "cpu", "--heads", "llama3-8b/16", "--N", "64", "--samples", "2",
                                     "--json", str(path)])
    data = json.loads(path.read_text())
    stages = {r["stage"]: r for r in data["rows"]}
    assert data["stamp"]["device_type"] == "cpu" and "git_dirty" in data["stamp"]
    assert stages["op no-grad forward"]["ms"] > 0 and stages["torch.mm [N,D]x[D,V] (GEMM reference)"]["ms"] > 0
    assert any(s.startswith("op forward+backward (autograd)") and "ms" in r for s, r in stages.items())
    assert stages["Triton kernel stages"]["error"].startswith(("unsupported", "missing"))


def test_gpu_suite_script_parses(benchmark):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    done = once(benchmark, subprocess.run, ["bash", "-n", os.path.join(HERE, "gpu_suite.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_gpu_suite_runs_end_to_end_on_cpu(benchmark, tmp_path):
    """The whole script with SUITE_DEVICE=cpu: every part runs and says so in status.txt (~1 minute)."""
    env = {**os.environ, "OUT": str(tmp_path), "SUITE_DEVICE": "cpu", "PYTHON": sys.executable}
    done = once(benchmark, subprocess.run, ["bash", os.path.join(HERE, "gpu_suite.sh")], env=env,
                capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    status = (tmp_path / "benchmarks" / "results" / "cpu-suite-check" / "status.txt").read_text()
    for part in ("compare: ok", "report: ok", "breakdown: ok", "tests: ok"):
        assert part in status, status
