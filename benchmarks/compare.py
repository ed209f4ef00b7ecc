"""Compare per-sequence log-likelihood providers (and end-to-end preference losses) on LM-head shapes.

    python -m benchmarks.compare --quick                  # GPU: 6 likelihood + 2 loss cases (~6 min)
    python -m benchmarks.compare                          # GPU: the grid below, stops starting cases at --budget-s
    python -m benchmarks.compare --device cpu --quick     # CPU smoke run on tiny heads (checks the pipeline)
    python -m benchmarks.report benchmarks/results/<device>/results.json   # redo the table and plots

Providers: see ``benchmarks/providers.py`` (naive, torch_compile_chunked, liger_flce, cce_exact,
cce_filtered, ours; losses: naive, torch_compile_chunked, ours, liger_simpo). Modes: fwd, bwd, fwd_bwd,
fwd_nograd. Inputs: see ``benchmarks/common.py`` (peaked softmax, ~2 nats, prompt + padding masks).

Writes ``benchmarks/results/<device>/`` (``--out`` to change): ``results.jsonl`` (one line per
measurement, appended as it goes), ``results.json`` (stamp + config + rows) and ``results.md`` rewritten
after every case, and ``fwd_bwd_time.png`` (+ ``fwd_bwd_memory.png`` on CUDA) at the end. Each case runs
under try/except: an OOM is recorded as ``oom``, another failure as ``error`` with its message; CUDA's
cache is emptied between cases. Baselines need ``pip install 'mppo-kernels[bench]'``; a missing one is
a ``missing: <reason>`` row.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

if __package__ in (None, ""):  # `python benchmarks/compare.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import report
from benchmarks.common import (
    DTYPES,
    HEADS,
    MODES,
    OOM_ERRORS,
    REPO_ROOT,
    TINY_HEADS,
    bench_ms,
    device_slug,
    flops,
    gemm_tflops,
    grid,
    make_case,
    make_inputs,
    peak_extra_bytes,
    run_stamp,
    sync,
)
from benchmarks.providers import likelihood_providers, loss_inputs, loss_providers, make_call, oracle_logp

LOSSES = ("pair_mnm", "simpo")


def _error_note(err: Exception) -> str:
    """``"Type: first line of the message"``, at most 300 characters."""
    first = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {first}"[:300]


class Runner:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.t0 = time.time()
        self.stamp = run_stamp(self.device)
        self.outdir = args.out or os.path.join(REPO_ROOT, "benchmarks", "results", device_slug(self.device))
        os.makedirs(self.outdir, exist_ok=True)
        self.jsonl = os.path.join(self.outdir, "results.jsonl")
        open(self.jsonl, "w").close()
        self.rows = []
        self.config = {"command": "python -m benchmarks.compare " + " ".join(sys.argv[1:]), **vars(args)}
        self._gemm = {}
        self._inputs = {}

    # ------------------------------------------------------------------------------------------ plumbing
    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)

    def over_budget(self) -> bool:
        return time.time() - self.t0 > self.args.budget_s

    def emit(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        note = row.get("note") or ""
        shown = f"{row['ms']:.3f} ms" if row["status"] == "ok" else note if note.startswith(row["status"]) else f"{row['status']}: {note}"
        if row["status"] == "ok" and row.get("peak_extra_bytes") is not None:
            shown += f", peak extra {row['peak_extra_bytes'] / 2**20:.0f} MiB"
        self.log(f"  {row['provider']:<22} {row['mode']:<10} {shown}")

    def flush(self, final: bool = False) -> None:
        data = {"stamp": self.stamp, "config": self.config, "rows": self.rows}
        with open(os.path.join(self.outdir, "results.json"), "w") as f:
            json.dump(data, f, indent=1)
        with open(os.path.join(self.outdir, "results.md"), "w") as f:
            f.write(report.markdown(data))
        if final:
            for p in report.plots(data, self.outdir):
                self.log(f"wrote {p}")

    def cleanup(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def inputs(self, case):
        key = (case.head, case.B, case.K, case.T)
        if key not in self._inputs:
            self._inputs.clear()
            self.cleanup()
            self._inputs[key] = make_inputs(
                case, self.device, seed=self.args.seed, target_entropy=self.args.target_entropy, mask=not self.args.no_mask
            )
        return self._inputs[key]

    def gemm(self, case, dtype_name):
        key = (min(case.tokens, 8192) if self.device.type == "cuda" else case.tokens, case.D, case.V, dtype_name)
        if key not in self._gemm:
            try:
                self._gemm[key] = gemm_tflops(case.tokens, case.D, case.V, DTYPES[dtype_name], self.device, quick=self.args.quick)
            except Exception as err:  # noqa: BLE001 - an OOM here loses only the % GEMM column
                self._gemm[key] = {"gemm_rows": key[0], "gemm_ms": None, "gemm_tflops": None,
                                   "gemm_error": f"{type(err).__name__}: {err}"[:200]}
            self.cleanup()
        return self._gemm[key]

    def base_row(self, section, case, provider, mode, stats, loss=None) -> dict:
        g = self.gemm(case, case.dtype)
        g16 = self.gemm(case, "bf16") if case.dtype != "bf16" else g
        return {
            "section": section, "loss": loss, **case.asdict(), "provider": provider.name,
            "provider_notes": provider.notes, "mode": mode, "status": None, "note": None,
            "gemm_rows": g["gemm_rows"], "gemm_tflops": g["gemm_tflops"], "gemm_tflops_bf16": g16["gemm_tflops"],
            "naive_logits_fp32_bytes": case.tokens * case.V * 4, "input_stats": stats,
        }

    # ------------------------------------------------------------------------------------------ measuring
    def measure(self, row, fn, hidden, weight, labels, mode, upstream, case, stats) -> None:
        """Time and memory of one (provider, mode); fills ``row`` in place, never raises."""
        call = None
        try:
            call, grads = make_call(fn, hidden, weight, labels, mode, upstream)
            t = bench_ms(call, self.device, grads, quick=self.args.quick)
            sync(self.device)
            mem = peak_extra_bytes(call, self.device, grads)
            useful = flops(mode, stats["valid_tokens"], case.D, case.V)
            grad_bytes = sum(x.numel() * x.element_size() for x in grads) if mode in ("bwd", "fwd_bwd") else 0
            row.update(t)
            row.update(
                status="ok", useful_flops=useful,
                tflops_useful=useful / (t["ms"] * 1e-3) / 1e12,
                tflops_all_positions=flops(mode, case.tokens, case.D, case.V) / (t["ms"] * 1e-3) / 1e12,
                peak_extra_bytes=mem, grad_bytes=grad_bytes,
                workspace_bytes=None if mem is None else mem - grad_bytes,
            )
            if row["gemm_tflops"]:
                row["pct_gemm"] = 100 * row["tflops_useful"] / row["gemm_tflops"]
            if row["gemm_tflops_bf16"]:
                row["pct_bf16_gemm"] = 100 * row["tflops_useful"] / row["gemm_tflops_bf16"]
            if mem is not None:
                row["workspace_pct_naive_logits"] = 100 * row["workspace_bytes"] / row["naive_logits_fp32_bytes"]
        except OOM_ERRORS as err:
            row.update(status="oom", note=str(err).splitlines()[0][:160])
        except Exception as err:  # noqa: BLE001 - recorded, the run goes on
            row.update(status="error", note=_error_note(err))
        finally:
            del call
            hidden.grad = weight.grad = None
            self.cleanup()

    def measure_or_skip(self, row, why, provider, fn, hidden, weight, labels, mode, upstream, case, stats) -> None:
        """Measure one (provider, mode) into ``row``, or record why not (unavailable, time budget); emit it."""
        why_mode = why or provider.unavailable(self.device, case.K, case.dtype, mode)
        if why_mode is not None:
            row.update(status=why_mode.split(":")[0], note=why_mode)
        elif self.over_budget():
            row.update(status="skipped", note=f"skipped: time budget {self.args.budget_s:.0f} s spent")
        else:
            self.measure(row, fn, hidden, weight, labels, mode, upstream, case, stats)
        self.emit(row)

    def case_tensors(self, case):
        hidden32, weight32, labels, stats = self.inputs(case)
        dtype = DTYPES[case.dtype]
        hidden = hidden32.to(dtype).detach()
        weight = weight32.to(dtype).detach()
        return hidden, weight, labels, stats

    def run_likelihood(self, case, providers) -> None:
        self.log(f"likelihood {case.key()}")
        try:
            hidden, weight, labels, stats = self.case_tensors(case)
            oracle = oracle_logp(hidden, weight, labels)
        except Exception as err:  # noqa: BLE001
            self.log(f"  input generation failed: {type(err).__name__}: {err}")
            self.cleanup()
            return
        gen = torch.Generator(device=self.device).manual_seed(self.args.seed + 1)
        upstream = torch.randn(case.B, case.K, device=self.device, generator=gen)  # dL/dlogp [B, K]
        self.log(
            f"  inputs: {100 * stats['valid_fraction']:.0f} % targets, entropy {stats['entropy_nats']:.2f} nats, "
            f"{100 * stats['frac_probs_below_bf16_filter_eps']:.1f} % probs < bf16 filter eps, "
            f"GEMM {self.gemm(case, case.dtype)['gemm_tflops'] or float('nan'):.3g} TFLOP/s"
        )
        for p in providers.values():
            why = p.unavailable(self.device, case.K)
            err = None
            if why is None and not self.over_budget():
                try:
                    with torch.no_grad():
                        err = (p.fn(hidden, weight, labels).float() - oracle).abs().max().item()
                except OOM_ERRORS:
                    err = None  # the modes below will say OOM
                except Exception as e:  # noqa: BLE001
                    why = f"error: {_error_note(e)}"
                self.cleanup()
            for mode in self.args.modes:
                row = self.base_row("likelihood", case, p, mode, stats)
                row["max_abs_err"] = err
                self.measure_or_skip(row, why, p, p.fn, hidden, weight, labels, mode, upstream, case, stats)
            self.flush()
        del hidden, weight, labels
        self.cleanup()

    def run_loss(self, case, loss_name, providers) -> None:
        self.log(f"loss {loss_name} {case.key()}")
        try:
            hidden, weight, labels, stats = self.case_tensors(case)
            hidden, labels, scores = loss_inputs(hidden, labels, seed=self.args.seed + 2)
        except Exception as err:  # noqa: BLE001
            self.log(f"  input generation failed: {type(err).__name__}: {err}")
            return
        upstream = torch.ones((), device=self.device)
        ref = None
        for p in providers.values():
            why = p.unavailable(self.device, case.K)
            if why is None and p.extra.get("only_loss") not in (None, loss_name):
                why = f"unsupported: {p.name} has only {p.extra['only_loss']}"
            fn = (lambda h, w, y, _f=p.fn: _f(loss_name, h, w, y, scores)) if why is None else None
            value = diff = None
            if why is None and not self.over_budget():
                try:
                    with torch.no_grad():
                        value = fn(hidden, weight, labels).float().item()
                    if p.name == "naive":
                        ref = value
                    diff = None if ref is None else abs(value - ref)
                except OOM_ERRORS:
                    pass
                except Exception as e:  # noqa: BLE001
                    why = f"error: {_error_note(e)}"
                self.cleanup()
            for mode in ("fwd", "fwd_bwd"):
                row = self.base_row("loss", case, p, mode, stats, loss=loss_name)
                row.update(loss_value=value, max_abs_err=diff)
                self.measure_or_skip(row, why, p, fn, hidden, weight, labels, mode, upstream, case, stats)
            self.flush()
        self.cleanup()

    def run(self) -> None:
        a = self.args
        lik, loss = grid(self.device.type, a.quick)
        heads = {**HEADS, **TINY_HEADS}
        if a.heads or a.tokens or a.K or a.dtypes:
            hs = a.heads or sorted({c[0] for c in lik})
            lik = [(h, n, k, dt) for h in hs for n in (a.tokens or [8192]) for k in (a.K or [4]) for dt in (a.dtypes or ["bf16"])]
            loss = [(h, n, k, name) for h in hs for n in (a.tokens or [8192]) for k in (a.K or [4]) for name in LOSSES]
        if a.no_losses:
            loss = []
        self.log(f"device {self.stamp['device']}; writing {self.outdir}")
        lp = likelihood_providers()
        lp = {k: v for k, v in lp.items() if not a.providers or k in a.providers}
        for p in lp.values():
            self.log(f"provider {p.name:<22} {p.unavailable(self.device) or 'available'}")
        for head, n, k, dt in lik:
            try:
                self.run_likelihood(make_case(head, n, k, dt, heads), lp)
            except Exception as err:  # noqa: BLE001 - never lose the rows already measured
                self.log(f"  case failed: {type(err).__name__}: {err}")
            self.cleanup()
            self.flush()
        if loss:
            lsp = loss_providers()
            for p in lsp.values():
                self.log(f"loss provider {p.name:<14} {p.unavailable(self.device) or 'available'}")
            for head, n, k, name in loss:
                try:
                    self.run_loss(make_case(head, n, k, a.loss_dtype, heads), name, lsp)
                except Exception as err:  # noqa: BLE001
                    self.log(f"  case failed: {type(err).__name__}: {err}")
                self.cleanup()
                self.flush()
        self.flush(final=True)
        self.log(f"done: {sum(r['status'] == 'ok' for r in self.rows)} ok of {len(self.rows)} rows -> {self.outdir}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small subset, shorter timing")
    ap.add_argument("--heads", nargs="+", choices=sorted({**HEADS, **TINY_HEADS}), help="override the grid")
    ap.add_argument("--tokens", nargs="+", type=int, help="positions N = B*K*T (override the grid)")
    ap.add_argument("--K", nargs="+", type=int, help="responses per prompt (override the grid)")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="override the grid")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--providers", nargs="+", help="likelihood providers to run (default: all)")
    ap.add_argument("--no-losses", action="store_true", help="skip the end-to-end loss section")
    ap.add_argument("--loss-dtype", choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no measurement after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-entropy", type=float, default=2.0, help="mean softmax entropy of the inputs (nats)")
    ap.add_argument("--no-mask", action="store_true", help="every position is a target (no prompt/padding mask)")
    ap.add_argument("--out", help="output folder (default benchmarks/results/<device>/)")
    args = ap.parse_args(argv)
    args.loss_dtype = args.loss_dtype or ("fp32" if args.device == "cpu" else "bf16")
    if args.device == "cpu" and args.heads is None and (args.tokens or args.K or args.dtypes):
        args.heads = ["llama3-8b/16"]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu)")
    Runner(args).run()


if __name__ == "__main__":
    main()
