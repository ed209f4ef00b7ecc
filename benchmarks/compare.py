"""Compare per-sequence log-likelihood providers (and end-to-end preference losses) on LM-head shapes.

    python -m benchmarks.compare --quick                  # GPU: the issue's shapes, equal work first
    python -m benchmarks.compare                          # GPU: the larger grid, stops starting cases at --budget-s
    python -m benchmarks.compare --device cpu --quick     # CPU smoke run on tiny heads + the CPU targets
    python -m benchmarks.report benchmarks/results/<device>/results.json   # redo the table and plots

Providers: ``benchmarks/providers.py``. Shapes and inputs: ``benchmarks/common.py`` (every case twice:
every position a target, then the realistic prompt + padding mask). Per case, every provider is first
checked against the oracle (output with and without autograd, dH and dW; ``benchmarks/oracle.py``), its
settings swept where it has some (Liger's chunking), then timed per mode (at least ``--samples`` timed
calls, more until ``--min-time-ms``; p20/p50/p80 and the spread from the samples) and its peak extra
memory measured (CUDA: ``max_memory_allocated``; CPU: peak RSS growth in a child process,
``benchmarks/rss.py``). On CPU the run ends with the CPU targets (``benchmarks/cpu_targets.py``).

Writes ``benchmarks/results/<device>/`` (``--out`` to change): ``results.jsonl`` (one line per
measurement, appended as it goes), ``results.json`` (stamp + config + rows) and ``results.md`` rewritten
after every case, and ``fwd_bwd_time.png`` / ``fwd_bwd_memory.png`` at the end. Each measurement runs
under try/except: an OOM is recorded as ``oom``, another failure as ``error`` with its message; CUDA's
cache is emptied between cases. A baseline that is not installed is a ``missing: <reason>`` row.
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

from benchmarks import cpu_targets, report
from benchmarks.common import (DTYPES, HEADS, MODES, OOM_ERRORS, TARGETS, TINY_HEADS, flops, grid, make_case,
                               make_inputs, make_upstream)
from benchmarks.measure import MIN_SAMPLES, gemm_tflops, peak_extra_bytes, sample_ms, sync
from benchmarks.oracle import check, oracle
from benchmarks.providers import likelihood_providers, loss_inputs, loss_providers, make_call
from benchmarks.rss import METHOD as RSS_METHOD
from benchmarks.rss import rss_growth
from benchmarks.stamp import REPO_ROOT, device_slug, run_stamp

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
        self.cpu_targets = None
        self.config = {"command": "python -m benchmarks.compare " + " ".join(sys.argv[1:]), **vars(args)}
        self._gemm = {}
        self._inputs = {}

    # ------------------------------------------------------------------------------------------ plumbing
    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)

    def over_budget(self) -> bool:
        return time.time() - self.t0 > self.args.budget_s

    def emit(self, row: dict, quiet: bool = False) -> None:
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        if quiet:
            return
        note = row.get("note") or ""
        shown = note if note.startswith(row["status"]) else f"{row['status']}: {note}"
        if row["status"] == "ok":
            shown = f"{row['ms']:.3f} ms (p20 {row['ms_p20']:.3f}, p80 {row['ms_p80']:.3f}, n={row['samples']})"
            if row.get("peak_extra_bytes") is not None:
                shown += f", peak extra {row['peak_extra_bytes'] / 2**20:.0f} MiB"
            if row.get("check") not in (None, "ok"):
                shown += f", {row['check']}"
        self.log(f"  {row['provider']:<22} {row['mode']:<10} {shown}")

    def data(self) -> dict:
        return {"stamp": self.stamp, "config": self.config, "rows": self.rows, "cpu_targets": self.cpu_targets}

    def flush(self, final: bool = False) -> None:
        data = self.data()
        # Written whole and renamed into place: a run killed by its time limit leaves the last complete file.
        for name, text in (("results.json", json.dumps(data, indent=1)), ("results.md", report.markdown(data))):
            path = os.path.join(self.outdir, name)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
        if final:
            for p in report.plots(data, self.outdir):
                self.log(f"wrote {p}")

    def cleanup(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def case_tensors(self, case):
        """``hidden``/``weight`` in the case dtype, ``labels``, stats (fp32 draws cached per shape)."""
        key = (case.shape_key(), case.targets)
        if key not in self._inputs:
            self._inputs.clear()
            self.cleanup()
            self._inputs[key] = make_inputs(case, self.device, seed=self.args.seed, target_entropy=self.args.target_entropy)
        hidden32, weight32, labels, stats = self._inputs[key]
        dtype = DTYPES[case.dtype]
        return hidden32.to(dtype).detach(), weight32.to(dtype).detach(), labels, stats

    def gemm(self, case):
        key = (min(case.tokens, 8192) if self.device.type == "cuda" else case.tokens, case.D, case.V, case.dtype)
        if key not in self._gemm:
            try:
                self._gemm[key] = gemm_tflops(case.tokens, case.D, case.V, DTYPES[case.dtype], self.device)
            except Exception as err:  # noqa: BLE001 - an OOM here loses only the % GEMM column
                self._gemm[key] = {"gemm_rows": key[0], "gemm_ms": None, "gemm_tflops": None,
                                   "gemm_error": _error_note(err)}
            self.cleanup()
        return self._gemm[key]

    def base_row(self, section, case, provider, mode, stats, loss=None) -> dict:
        g = self.gemm(case)
        return {
            "section": section, "loss": loss, **case.asdict(), "provider": provider.name,
            "provider_notes": provider.notes, "computes": provider.computes, "mode": mode, "status": None,
            "note": None, "gemm_rows": g["gemm_rows"], "gemm_tflops": g["gemm_tflops"],
            "naive_logits_fp32_bytes": case.tokens * case.V * 4, "valid_tokens": stats["valid_tokens"],
            "input_stats": stats,
        }

    # ------------------------------------------------------------------------------------------ measuring
    def time_call(self, fn, hidden, weight, labels, mode, upstream, samples=None, min_ms=None) -> tuple[dict, list]:
        call, grads = make_call(fn, hidden, weight, labels, mode, upstream)
        t = sample_ms(call, self.device, grads, min_samples=samples or self.args.samples,
                      min_total_ms=self.args.min_time_ms if min_ms is None else min_ms)
        sync(self.device)
        return t, call, grads

    def measure(self, row, fn, hidden, weight, labels, mode, upstream, case, rss) -> None:
        """Time and memory of one (provider, mode); fills ``row`` in place, never raises."""
        call = None
        try:
            t, call, grads = self.time_call(fn, hidden, weight, labels, mode, upstream)
            n_valid = row["valid_tokens"]
            work = flops(mode, n_valid, case.D, case.V)
            grad_bytes = sum(x.numel() * x.element_size() for x in grads) if mode in ("bwd", "fwd_bwd") else 0
            row.update(t)
            row.update(status="ok", flops_6nvdv=work, tflops=work / (t["ms"] * 1e-3) / 1e12,
                       tflops_recompute=flops(mode, n_valid, case.D, case.V, recompute=True) / (t["ms"] * 1e-3) / 1e12)
            if row["gemm_tflops"]:
                row["pct_gemm"] = 100 * row["tflops"] / row["gemm_tflops"]
                row["pct_gemm_recompute"] = 100 * row["tflops_recompute"] / row["gemm_tflops"]
            if self.device.type == "cuda":
                mem = peak_extra_bytes(call, self.device, grads)
                row.update(peak_extra_bytes=mem, grad_bytes=grad_bytes, workspace_bytes=mem - grad_bytes,
                           memory_method="torch.cuda.max_memory_allocated during one call")
            elif mode == "fwd_bwd" and rss is not None:
                r = rss.get(row["provider"], {"error": "not measured"})
                if "rss_growth_bytes" in r:
                    row.update(peak_extra_bytes=r["rss_growth_bytes"], grad_bytes=r["grad_bytes"],
                               workspace_bytes=r["workspace_bytes"], memory_method=RSS_METHOD)
                else:
                    row["memory_note"] = r["error"]
            if row.get("workspace_bytes") is not None:
                row["workspace_pct_naive_logits"] = 100 * row["workspace_bytes"] / row["naive_logits_fp32_bytes"]
        except OOM_ERRORS as err:
            row.update(status="oom", note=str(err).splitlines()[0][:160])
        except Exception as err:  # noqa: BLE001 - recorded, the run goes on
            row.update(status="error", note=_error_note(err))
        finally:
            del call
            hidden.grad = weight.grad = None
            self.cleanup()

    def skip_reason(self, why, provider, case, mode) -> str | None:
        why = why or provider.unavailable(self.device, case, mode)
        if why is None and self.over_budget():
            why = f"skipped: time budget {self.args.budget_s:.0f} s spent"
        return why

    def tune(self, p, case, n_valid, hidden, weight, labels, upstream) -> tuple[dict, dict | None]:
        """The fastest of ``p.sweep``'s settings on forward+backward (3 samples each), and the record."""
        if len(p.sweep) < 2:
            return {}, None
        timings = []
        for settings in p.sweep:
            try:
                t, _, _ = self.time_call(p.bind(case, n_valid, **settings), hidden, weight, labels, "fwd_bwd", upstream,
                                         samples=3, min_ms=0.0)
                timings.append({"settings": settings, "ms": t["ms"]})
            except Exception as err:  # noqa: BLE001 - a setting that fails (OOM) is recorded and passed over
                timings.append({"settings": settings, "error": _error_note(err)})
            finally:
                hidden.grad = weight.grad = None
                self.cleanup()
        ok = [t for t in timings if "ms" in t]
        best = min(ok, key=lambda t: t["ms"])["settings"] if ok else p.sweep[0]
        return best, {"chosen": best, "sweep": timings}

    def run_likelihood(self, case, providers) -> None:
        self.log(f"likelihood {case.key()}")
        try:
            hidden, weight, labels, stats = self.case_tensors(case)
            upstream = make_upstream(case, self.device, seed=self.args.seed + 1)  # dL/dlogp [B, K]
            ref = oracle(hidden, weight, labels, upstream, case.softcap)
        except Exception as err:  # noqa: BLE001
            self.log(f"  input or oracle failed: {_error_note(err)}")
            self.cleanup()
            return
        n_valid = stats["valid_tokens"]
        self.log(
            f"  inputs: {100 * stats['valid_fraction']:.0f} % targets, entropy {stats['entropy_nats']:.2f} nats, "
            f"{100 * stats['frac_probs_below_bf16_filter_eps']:.1f} % probs < bf16 filter eps, "
            f"GEMM {self.gemm(case)['gemm_tflops'] or float('nan'):.3g} TFLOP/s"
        )
        rss = None
        if self.device.type == "cpu" and "fwd_bwd" in self.args.modes and not self.args.no_rss and not self.over_budget():
            names = [n for n, p in providers.items() if p.unavailable(self.device, case, "fwd_bwd") is None]
            rss = rss_growth(case, names, seed=self.args.seed, target_entropy=self.args.target_entropy)
        for p in providers.values():
            why = self.skip_reason(None, p, case, None)
            settings, tuning, verdict = {}, None, {}
            if why is None:
                backward = p.unavailable(self.device, case, "fwd_bwd") is None
                try:
                    if backward and "fwd_bwd" in self.args.modes:
                        settings, tuning = self.tune(p, case, n_valid, hidden, weight, labels, upstream)
                    verdict = check(p.bind(case, n_valid, **settings), hidden, weight, labels, upstream, ref, backward)
                except OOM_ERRORS as err:
                    verdict = {"correct": None, "check": f"not checked: OOM ({str(err).splitlines()[0][:80]})"}
                except Exception as err:  # noqa: BLE001
                    why = f"error: {_error_note(err)}"
                finally:
                    hidden.grad = weight.grad = None
                    self.cleanup()
            fn = p.bind(case, n_valid, **settings) if why is None else None
            if why is not None:
                self.log(f"  {p.name:<22} {why}")
            for mode in self.args.modes:
                row = self.base_row("likelihood", case, p, mode, stats)
                row.update(verdict, settings=settings, tuning=tuning)
                why_mode = self.skip_reason(why, p, case, mode)
                if why_mode is not None:
                    row.update(status=why_mode.split(":")[0], note=why_mode)
                else:
                    self.measure(row, fn, hidden, weight, labels, mode, upstream, case, rss)
                self.emit(row, quiet=why is not None)
            self.flush()
        del hidden, weight, labels, ref
        self.cleanup()

    def run_loss(self, case, loss_name, providers) -> None:
        self.log(f"loss {loss_name} {case.key()}")
        try:
            hidden, weight, labels, stats = self.case_tensors(case)
            hidden, labels, scores = loss_inputs(hidden, labels, seed=self.args.seed + 2)
        except Exception as err:  # noqa: BLE001
            self.log(f"  input generation failed: {_error_note(err)}")
            return
        upstream = torch.ones((), device=self.device)
        ref = None
        for p in providers.values():
            why = p.unavailable(self.device, case)
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
                why_mode = self.skip_reason(why, p, case, mode)
                if why_mode is not None:
                    row.update(status=why_mode.split(":")[0], note=why_mode)
                else:
                    self.measure(row, fn, hidden, weight, labels, mode, upstream, case, None)
                self.emit(row)
            self.flush()
        self.cleanup()

    def run_cpu_targets(self) -> None:
        if self.over_budget():
            self.cpu_targets = {"skipped": f"time budget {self.args.budget_s:.0f} s spent"}
            return
        try:
            self.cpu_targets = cpu_targets.measure(samples=self.args.samples, seed=self.args.seed, log=self.log)
            for k, v in cpu_targets.verdicts(self.cpu_targets).items():
                self.log(f"  {cpu_targets.LABELS[k]:<44} {self.cpu_targets['ratios'][k] or float('nan'):.3f}  {v}")
        except Exception as err:  # noqa: BLE001 - never lose the rows already measured
            self.cpu_targets = {"error": _error_note(err)}
            self.log(f"  cpu targets failed: {_error_note(err)}")

    def run(self) -> None:
        a = self.args
        lik, loss = cases(a)
        self.log(f"device {self.stamp['device']}; writing {self.outdir}")
        lp = likelihood_providers()
        lp = {k: v for k, v in lp.items() if not a.providers or k in a.providers}
        for p in lp.values():
            self.log(f"provider {p.name:<22} {p.unavailable(self.device) or 'available'}")
        for case in lik:
            try:
                self.run_likelihood(case, lp)
            except Exception as err:  # noqa: BLE001 - never lose the rows already measured
                self.log(f"  case failed: {_error_note(err)}")
            self.cleanup()
            self.flush()
        if self.device.type == "cpu" and not a.no_cpu_targets:
            self.run_cpu_targets()
            self.flush()
        if loss:
            lsp = loss_providers()
            for p in lsp.values():
                self.log(f"loss provider {p.name:<14} {p.unavailable(self.device) or 'available'}")
            for case, name in loss:
                try:
                    self.run_loss(case, name, lsp)
                except Exception as err:  # noqa: BLE001
                    self.log(f"  case failed: {_error_note(err)}")
                self.cleanup()
                self.flush()
        self.flush(final=True)
        self.log(f"done: {sum(r['status'] == 'ok' for r in self.rows)} ok of {len(self.rows)} rows -> {self.outdir}")


def cases(a):
    """The likelihood and loss cases of a run: the grid, or the product of the overriding options."""
    lik, loss = grid(a.device, a.quick)
    heads = {**HEADS, **TINY_HEADS}
    if a.heads or a.tokens or a.K or a.dtypes or a.softcap is not None:
        hs = a.heads or list(dict.fromkeys(c.head for c in lik))
        dts = a.dtypes or (["fp32"] if a.device == "cpu" else ["bf16"])
        tokens = a.tokens or ([512] if a.device == "cpu" else [8192])
        lik = [make_case(h, n, k, dt, heads, targets=t, softcap=a.softcap)
               for t in TARGETS for h in hs for n in tokens for k in (a.K or [4]) for dt in dts]
        loss = [(make_case(h, n, k, a.loss_dtype, heads), name) for h in hs for n in tokens for k in (a.K or [4])
                for name in LOSSES]
    lik = [c for c in lik if c.targets in a.targets]
    return lik, ([] if a.no_losses else loss)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="the short grid")
    ap.add_argument("--heads", nargs="+", choices=sorted({**HEADS, **TINY_HEADS}), help="override the grid")
    ap.add_argument("--tokens", nargs="+", type=int, help="positions N = B*K*T (override the grid)")
    ap.add_argument("--K", nargs="+", type=int, help="responses per prompt (override the grid)")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="override the grid")
    ap.add_argument("--softcap", type=float, help="soft-cap every overriding case's logits at this value")
    ap.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS),
                    help="all: every position a target (equal work); masked: prompt + padding ignored")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--providers", nargs="+", help="likelihood providers to run (default: all)")
    ap.add_argument("--samples", type=int, default=MIN_SAMPLES, help="timed calls per measurement, at least")
    ap.add_argument("--min-time-ms", type=float, default=200.0, help="time more calls until this much was timed")
    ap.add_argument("--no-losses", action="store_true", help="skip the end-to-end loss section")
    ap.add_argument("--loss-dtype", choices=sorted(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--no-rss", action="store_true", help="CPU: skip the peak-RSS child processes")
    ap.add_argument("--no-cpu-targets", action="store_true", help="CPU: skip the CPU targets")
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no measurement after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-entropy", type=float, default=2.0, help="mean softmax entropy of the inputs (nats)")
    ap.add_argument("--out", help="output folder (default benchmarks/results/<device>/)")
    args = ap.parse_args(argv)
    args.loss_dtype = args.loss_dtype or ("fp32" if args.device == "cpu" else "bf16")
    if args.samples < 1:
        ap.error(f"--samples must be at least 1, got {args.samples}")
    unknown = sorted(set(args.providers or ()) - set(likelihood_providers()))
    if unknown:
        ap.error(f"--providers: unknown {unknown}; known: {sorted(likelihood_providers())}")
    if args.device == "cpu" and args.heads is None and (args.tokens or args.K or args.dtypes or args.softcap is not None):
        args.heads = ["llama3-8b/16"]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu)")
    Runner(args).run()


if __name__ == "__main__":
    main()
