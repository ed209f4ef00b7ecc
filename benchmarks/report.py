"""Markdown tables and PNG plots from a ``compare.py`` results JSON.

    python -m benchmarks.report benchmarks/results/<device>/results.json              # rewrites results.md and *.png
    python -m benchmarks.report benchmarks/results/<device>/results.json --readme     # prints the README table
    python -m benchmarks.report benchmarks/results/<device>/results.json --readme README.md
        # replaces the table between the <!-- benchmark-table --> markers of README.md with it

A provider whose output or gradients miss the oracle (``check`` is not ``ok``) is shown as wrong and never
ranked: no time ratio, no target met through it.
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict

from benchmarks import cpu_targets
from benchmarks.stamp import describe

MIB = 1 << 20
# Goals of the GPU run, equal work (every position a target), bf16; each results.md judges them per case.
GOALS = {
    "speed_vs_naive": 0.95,  # ours fwd+bwd speed / naive's
    "speed_vs_liger": 1.2,  # ... / tuned Liger's (the faster of liger_flce, liger_flce_compacted)
    "speed_vs_cce": 2.0,  # ... / cce_exact's
    "workspace_pct": 3.0,  # ours workspace / naive's fp32 logits (N·V·4 B), %
    "pct_gemm": 55.0,  # ours 6·N·D·V rate / the same run's cuBLAS GEMM rate, %
    "budget_speed_vs_naive": 1.2,
    "budget_speed_vs_liger": 1.5,
    "budget_speed_vs_compacted": 1.0,  # masked cases: ours_budget / naive_compacted
    "budget_peak_vs_naive": 0.35,  # ours_budget peak extra memory / naive's
    "budget_pct_gemm": 70.0,
}
MARKER_BEGIN, MARKER_END = "<!-- benchmark-table:begin -->", "<!-- benchmark-table:end -->"


# ----------------------------------------------------------------------------------------------- helpers
def _group_key(r) -> tuple:
    return (r["section"], r.get("loss"), r["head"], r["tokens"], r["B"], r["K"], r["T"], r["dtype"],
            r.get("targets", "masked"), r.get("softcap"))


def _groups(rows, section=None):
    groups = OrderedDict()
    for r in rows:
        if section is None or r["section"] == section:
            groups.setdefault(_group_key(r), []).append(r)
    # Equal work first: every-position-a-target cases, then masked ones, each in run order.
    return OrderedDict(sorted(groups.items(), key=lambda kv: kv[0][8] != "all"))


def _by(rows, provider, mode):
    return next((r for r in rows if r["provider"] == provider and r["mode"] == mode), None)


def _ok(r) -> bool:
    return r is not None and r.get("status") == "ok"


def _ranked(r) -> bool:
    """Measured and checked correct: only such rows enter ratios and targets."""
    return _ok(r) and r.get("correct") is True


def _fmt(x, spec="{:.2f}"):
    return "—" if x is None else spec.format(x)


def _status_word(r) -> str:
    if r is None:
        return "not run"
    return {"oom": "OOM"}.get(r["status"], r["status"])


def _reason(rows) -> str | None:
    """The reason shared by every row of a provider that never ran, else None."""
    if all(r["status"] not in ("ok", "oom") for r in rows):
        notes = {(r.get("note") or r["status"]).replace("|", "/") for r in rows}
        if len(notes) == 1:
            return notes.pop()
    return None


def _check_cell(r) -> str:
    if r is None or r.get("correct") is None:
        return (r or {}).get("check") or "—"
    errs = " / ".join(_fmt(r.get(k), "{:.1e}") for k in ("max_abs_err", "dhidden_rel_err", "dweight_rel_err"))
    return errs if r["correct"] else f"**WRONG** {errs}"


def _speedup(other, ours) -> float | None:
    """How many times faster ``ours`` is than ``other`` (fwd+bwd), both ranked; else None."""
    return other["ms"] / ours["ms"] if _ranked(other) and _ranked(ours) else None


def _mib(r, key):
    return None if r is None or r.get(key) is None else r[key] / MIB


def _every_position_sentence(rows) -> str:
    rows = [r for r in rows if r["section"] == "likelihood"]
    every = list(OrderedDict.fromkeys(r["provider"] for r in rows if r.get("computes") == "all"))
    rest = list(OrderedDict.fromkeys(r["provider"] for r in rows if r.get("computes") != "all"))
    if not every:
        return "Every provider computes the logits of target positions only."
    return (f"{', '.join(every)} compute the logits of every position (prompt and padding too), so on masked "
            f"cases they do N / N_valid times the work of the others ({', '.join(rest)}), which compute target "
            "positions only; on equal-work cases (every position a target) all do the same work.")


# ----------------------------------------------------------------------------------------------- tables
def _group_title(rows) -> str:
    r = rows[0]
    st = r.get("input_stats") or {}
    what = "log-likelihood" if r["section"] == "likelihood" else f"loss `{r['loss']}`"
    work = ("**equal work**: every position a target" if r.get("targets") == "all"
            else f"masked: {100 * r['valid_tokens'] / r['tokens']:.0f} % of positions are targets")
    cap = f", soft-cap {r['softcap']:g}" if r.get("softcap") is not None else ""
    return (
        f"### {what}: {r['head']} (D={r['D']}, V={r['V']}), N={r['tokens']} positions (B={r['B']}, K={r['K']}, "
        f"T={r['T']}), {r['dtype']}{cap}\n\n"
        f"{work}; softmax entropy {st.get('entropy_nats', float('nan')):.2f} nats, mean max-prob "
        f"{st.get('mean_max_prob', float('nan')):.2f}, {100 * st.get('frac_probs_below_bf16_filter_eps', float('nan')):.1f} % "
        f"of probabilities below CCE's bf16 filter eps. GEMM reference: {_fmt(r.get('gemm_tflops'), '{:.3g}')} TFLOP/s "
        f"({r['dtype']} mm [{r.get('gemm_rows')}, {r['D']}] × [{r['D']}, {r['V']}])."
    )


def _time_cell(r) -> str:
    return _fmt(r["ms"]) if _ok(r) else _status_word(r)


def _likelihood_table(rows, modes) -> list[str]:
    names = {"fwd": "fwd ms", "bwd": "bwd ms", "fwd_bwd": "fwd+bwd ms (p20–p80, spread, n)", "fwd_nograd": "no-grad fwd ms"}
    lines = [
        "| provider | computes | " + " | ".join(names[m] for m in modes)
        + " | fwd+bwd TFLOP/s (6·N_valid·D·V) | % GEMM | TFLOP/s incl. recompute (8·N_valid·D·V) | peak extra MiB"
        + " | workspace MiB | workspace / naive fp32 logits | fwd+bwd time / ours | err logp / dH / dW |",
        "|" + "---|" * (len(modes) + 10),
    ]
    ours_fb = _by(rows, "ours", "fwd_bwd")
    notes = []
    for p in OrderedDict.fromkeys(r["provider"] for r in rows):
        per_mode = [_by(rows, p, m) for m in modes]
        present = [r for r in per_mode if r is not None]
        computes = "every position" if present[0].get("computes") == "all" else "targets"
        why = _reason(present)
        if why is not None:
            lines.append(f"| {p} | {computes} | {why} |" + " — |" * (len(modes) + 7))
            continue
        fb = _by(rows, p, "fwd_bwd")
        cells = [_time_cell(r) for r in per_mode]
        if _ok(fb):
            spread = _fmt(None if fb.get("spread") is None else 100 * fb["spread"], "{:.0f} %")
            cells[modes.index("fwd_bwd")] = f"{fb['ms']:.2f} ({fb['ms_p20']:.2f}–{fb['ms_p80']:.2f}, {spread}, {fb['samples']})"
        ratio = "wrong: not ranked" if _ok(fb) and fb.get("correct") is False else _fmt(
            None if not _ranked(fb) or not _ranked(ours_fb) else fb["ms"] / ours_fb["ms"], "{:.2f}×")
        ws_pct = fb.get("workspace_pct_naive_logits") if _ok(fb) else None
        lines.append(
            f"| {p} | {computes} | " + " | ".join(cells)
            + f" | {_fmt(fb.get('tflops') if _ok(fb) else None, '{:.3g}')} | {_fmt(fb.get('pct_gemm') if _ok(fb) else None, '{:.0f} %')}"
            + f" | {_fmt(fb.get('tflops_recompute') if _ok(fb) else None, '{:.3g}')}"
            + f" | {_fmt(_mib(fb, 'peak_extra_bytes'), '{:.0f}')} | {_fmt(_mib(fb, 'workspace_bytes'), '{:.0f}')}"
            + f" | {_fmt(ws_pct, '{:.1f} %')} | {ratio} | {_check_cell(present[0])} |"
        )
        for r in present:
            if r["status"] != "ok" and r.get("note"):
                notes.append(f"- {p} {r['mode']}: {r['note']}")
        if fb is not None and fb.get("tuning"):
            sweep = ", ".join(f"{_settings(t['settings'])}: " + (f"{t['ms']:.2f} ms" if "ms" in t else t["error"])
                              for t in fb["tuning"]["sweep"])
            notes.append(f"- {p}: swept {sweep}; used {_settings(fb['tuning']['chosen'])}")
        if fb is not None and fb.get("memory_note"):
            notes.append(f"- {p} memory: {fb['memory_note']}")
    return lines + (["", *notes] if notes else [])


def _settings(s: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items()) or "defaults"


def _verdict(value, goal, higher, smoke, why=None):
    if value is None:
        return "—", f"n/a: {why}" if why else "n/a"
    met = value >= goal if higher else value <= goal
    return value, "not judged (CPU smoke)" if smoke else ("met" if met else "not met")


def _targets(rows, smoke: bool) -> list[str]:
    """The GPU goals computed from one case's rows (equal-work bf16 cases; masked: the compacted goal)."""
    r0 = rows[0]
    equal = r0.get("targets") == "all"
    fb = {p: _by(rows, p, "fwd_bwd") for p in OrderedDict.fromkeys(r["provider"] for r in rows)}
    ours, budget = fb.get("ours"), fb.get("ours_budget")
    liger = [r for r in (fb.get("liger_flce"), fb.get("liger_flce_compacted")) if _ranked(r)]
    best_liger = min(liger, key=lambda r: r["ms"]) if liger else fb.get("liger_flce")

    def why(*rs):
        for r in rs:
            if r is None:
                return "not run"
            if not _ok(r):
                return f"{r['provider']}: {r.get('note') or r['status']}"
            if r.get("correct") is not True:
                return f"{r['provider']} wrong or unchecked: {r.get('check')}"
        return None

    items = []
    if equal:
        for label, other, goal in (("naive", fb.get("naive"), "speed_vs_naive"), ("tuned Liger", best_liger, "speed_vs_liger"),
                                   ("cce_exact", fb.get("cce_exact"), "speed_vs_cce")):
            items.append((f"ours fwd+bwd speed / {label}'s", "≥", goal, "{:.2f}×", _speedup(other, ours), True, why(ours, other)))
        ws = ours.get("workspace_pct_naive_logits") if _ranked(ours) else None
        items.append(("ours workspace / naive fp32 logits", "≤", "workspace_pct", "{:.2f} %", ws, False, why(ours)))
        items.append(("ours 6·N·D·V rate / GEMM rate", "≥", "pct_gemm", "{:.0f} %", ours.get("pct_gemm") if _ranked(ours) else None,
                      True, why(ours)))
        for label, other, goal in (("naive", fb.get("naive"), "budget_speed_vs_naive"),
                                   ("tuned Liger", best_liger, "budget_speed_vs_liger")):
            items.append((f"ours_budget fwd+bwd speed / {label}'s", "≥", goal, "{:.2f}×", _speedup(other, budget), True,
                          why(budget, other)))
        naive = fb.get("naive")
        peak = (budget["peak_extra_bytes"] / naive["peak_extra_bytes"]
                if _ranked(budget) and _ranked(naive) and naive.get("peak_extra_bytes") and budget.get("peak_extra_bytes") is not None
                else None)
        items.append(("ours_budget peak memory / naive's", "≤", "budget_peak_vs_naive", "{:.2f}×", peak, False, why(budget, naive)))
        items.append(("ours_budget 6·N·D·V rate / GEMM rate", "≥", "budget_pct_gemm", "{:.0f} %",
                      budget.get("pct_gemm") if _ranked(budget) else None, True, why(budget)))
    else:
        items.append(("ours_budget fwd+bwd speed / naive_compacted's", "≥", "budget_speed_vs_compacted", "{:.2f}×",
                      _speedup(fb.get("naive_compacted"), budget), True, why(budget, fb.get("naive_compacted"))))
    judged_here = r0["dtype"] == "bf16"
    out = ["", "| target | goal | this run | |", "|---|---|---|---|"]
    for label, op, goal, spec, value, higher, reason in items:
        value, verdict = _verdict(value, GOALS[goal], higher, smoke, reason)
        if not judged_here and not smoke and verdict in ("met", "not met"):
            verdict = f"{verdict} (goal set for bf16)"
        goal_s = spec.format(GOALS[goal])
        out.append(f"| {label} | {op} {goal_s} | {value if value == '—' else spec.format(value)} | {verdict} |")
    return out


def _loss_table(rows) -> list[str]:
    modes = [m for m in ("fwd", "fwd_bwd") if any(r["mode"] == m for r in rows)]
    lines = [
        "| provider | " + " | ".join({"fwd": "fwd ms", "fwd_bwd": "fwd+bwd ms"}[m] for m in modes)
        + " | peak extra MiB | workspace MiB | fwd+bwd time / ours | loss | abs diff vs naive |",
        "|" + "---|" * (len(modes) + 6),
    ]
    ours_fb = _by(rows, "ours", "fwd_bwd")
    for p in OrderedDict.fromkeys(r["provider"] for r in rows):
        per_mode = [_by(rows, p, m) for m in modes]
        why = _reason([r for r in per_mode if r is not None])
        if why is not None:
            lines.append(f"| {p} | {why} |" + " — |" * (len(modes) + 4))
            continue
        fb = _by(rows, p, "fwd_bwd")
        speed = fb["ms"] / ours_fb["ms"] if _ok(fb) and _ok(ours_fb) else None
        val = next((r.get("loss_value") for r in per_mode if r and r.get("loss_value") is not None), None)
        diff = next((r.get("max_abs_err") for r in per_mode if r and r.get("max_abs_err") is not None), None)
        lines.append(
            f"| {p} | " + " | ".join(_time_cell(r) for r in per_mode)
            + f" | {_fmt(_mib(fb, 'peak_extra_bytes'), '{:.0f}')} | {_fmt(_mib(fb, 'workspace_bytes'), '{:.0f}')}"
            + f" | {_fmt(speed, '{:.2f}×')} | {_fmt(val, '{:.4f}')} | {_fmt(diff, '{:.1e}')} |"
        )
    return lines


def _header(data) -> list[str]:
    stamp, config = data["stamp"], data.get("config", {})
    return [
        f"# Benchmark results: {stamp['device']}",
        "",
        f"{stamp['date_utc']} · torch {stamp['torch']} · triton {stamp.get('triton')} · CUDA {stamp['cuda']} · "
        f"mppo-kernels {stamp['mppo_kernels']} at {describe(stamp)} · liger-kernel "
        f"{stamp.get('liger_kernel') or 'not installed'} · cut-cross-entropy {stamp.get('cut_cross_entropy') or 'not installed'}"
        f" (CCE_AUTOTUNE={stamp.get('cce_autotune_env')}) · {stamp['cpu_count']} CPU cores",
        "",
        f"Command: `{config.get('command', '?')}`",
        "",
    ]


DEFINITIONS = (
    "Definitions. Times: median (p50) of at least {samples} timed calls (more until {min_ms:.0f} ms were "
    "timed; CUDA: one event pair per call with L2 flushed, CPU: `time.perf_counter`), p20–p80 and n from the "
    "same samples, spread = (p80 - p20) / p50. Utilization counts 6·N_valid·D·V for forward+backward (2 "
    "forward, 4 backward: the work of a method that keeps its logits), N_valid = target positions; the "
    "8·N_valid·D·V column adds the logits "
    "recomputed in the backward, which ours without a logits budget, Liger and CCE do. % GEMM = the 6·N_valid "
    "rate / a `torch.mm` of the logits' shape in the case dtype, timed in the same run. *peak extra* = peak "
    "memory during one call minus memory just before it (CUDA: `max_memory_allocated`; CPU: peak RSS growth "
    "in a child process), including the dH, dW the call returns; *workspace* = peak extra minus dH and dW. "
    "*naive fp32 logits* = N·V·4 bytes. Every provider is checked in the same run: logp (max abs error, with "
    "and without autograd) and dH, dW (relative Frobenius error) against an oracle in {oracle} from the same "
    "cast inputs; a provider beyond 8 units of its dtype's rounding (bf16 0.0625, fp16 0.0078, fp32 1e-4) is "
    "**WRONG** and not ranked. The upstream gradient is a random [B, K] vector (×4096 for fp16, as loss "
    "scaling does)."
)


def markdown(data) -> str:
    stamp, rows, config = data["stamp"], data["rows"], data.get("config", {})
    cpu = stamp["device_type"] != "cuda"
    out = _header(data)
    if cpu:
        out += [
            "**CPU smoke results, not speed claims** (except the CPU targets, which are this machine's). Tiny "
            "heads (D and V divided by 16) check that every provider and mode runs end to end and agrees with "
            "the oracle; the GPU targets below are printed only to exercise the report.",
            "",
        ]
    out += [DEFINITIONS.format(samples=config.get("samples", 10), min_ms=config.get("min_time_ms", 0),
                               oracle="fp64" if cpu else "fp32"), "", _every_position_sentence(rows), ""]
    ct = data.get("cpu_targets")
    if ct and "ratios" in ct:
        out += cpu_targets.markdown(ct) + [""]
    elif ct:
        out += ["### CPU targets", "", f"not measured: {ct.get('error') or ct.get('skipped')}", ""]
    for key, grp in _groups(rows, "likelihood").items():
        modes = [m for m in ("fwd", "bwd", "fwd_bwd", "fwd_nograd") if any(r["mode"] == m for r in grp)]
        out += [_group_title(grp), ""] + _likelihood_table(grp, modes)
        if "fwd_bwd" in modes:
            out += _targets(grp, smoke=cpu)
        out.append("")
    for key, grp in _groups(rows, "loss").items():
        out += [_group_title(grp), ""] + _loss_table(grp) + [""]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- README
def readme_snippet(data) -> str:
    """One line per likelihood case (equal work first), one column per provider: fwd+bwd ms, × ours'
    time, workspace MiB; wrong providers marked."""
    groups = _groups(data["rows"], "likelihood")
    if not groups:
        return ""
    providers = list(OrderedDict.fromkeys(r["provider"] for g in groups.values() for r in g))
    stamp = data["stamp"]
    lines = [
        f"Forward+backward, median ms (time / ours) · workspace MiB, from `{data.get('config', {}).get('command', '?')}` "
        f"on {stamp['device']}, {stamp['date_utc']}, torch {stamp['torch']}, {describe(stamp)}. "
        + _every_position_sentence(data["rows"]),
        "",
        "| case | " + " | ".join(providers) + " |",
        "|---|" + "---|" * len(providers),
    ]
    for grp in groups.values():
        r0 = grp[0]
        cap = f", soft-cap {r0['softcap']:g}" if r0.get("softcap") is not None else ""
        work = "every position a target" if r0.get("targets") == "all" else f"masked ({100 * r0['valid_tokens'] / r0['tokens']:.0f} % targets)"
        cells, ours = [], _by(grp, "ours", "fwd_bwd")
        for p in providers:
            fb = _by(grp, p, "fwd_bwd")
            if fb is None:
                cells.append("—")
            elif not _ok(fb):
                cells.append(_status_word(fb))
            elif fb.get("correct") is False:
                cells.append(f"**wrong** ({fb['check'][len('wrong: '):]})")
            else:
                ratio = f" ({fb['ms'] / ours['ms']:.2f}×)" if _ranked(fb) and _ranked(ours) else ""
                ws = f" · {fb['workspace_bytes'] / MIB:.0f} MiB" if fb.get("workspace_bytes") is not None else ""
                cells.append(f"{fb['ms']:.1f}{ratio}{ws}")
        lines.append(f"| {r0['head']}, N={r0['tokens']} (K={r0['K']}), {r0['dtype']}{cap}, {work} | " + " | ".join(cells) + " |")
    ct = data.get("cpu_targets")
    if ct and "ratios" in ct:
        lines += [""] + [line.replace("### ", "**", 1) + "**" if line.startswith("### ") else line
                         for line in cpu_targets.markdown(ct)]
    return "\n".join(lines) + "\n"


def update_readme(path: str, snippet: str) -> None:
    """Replace the text between ``MARKER_BEGIN`` and ``MARKER_END`` in ``path`` with ``snippet``."""
    with open(path) as f:
        text = f.read()
    if MARKER_BEGIN not in text or MARKER_END not in text:
        raise SystemExit(f"{path}: no {MARKER_BEGIN} ... {MARKER_END} block to replace")
    head, rest = text.split(MARKER_BEGIN, 1)
    _, tail = rest.split(MARKER_END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{MARKER_BEGIN}\n{snippet}{MARKER_END}{tail}")


# ----------------------------------------------------------------------------------------------- plots
def plots(data, outdir) -> list[str]:
    """Equal-work (every position a target, no soft-cap) fwd+bwd time and peak extra memory vs positions,
    one panel per head and dtype, one line per provider; wrong providers left out and named."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    stamp = data["stamp"]
    lik = [r for r in data["rows"] if r["section"] == "likelihood" and r["mode"] == "fwd_bwd"
           and r.get("targets") == "all" and r.get("softcap") is None]
    rows = [r for r in lik if _ranked(r)]
    if not rows:
        return []
    absent = OrderedDict()
    for r in lik:
        if not _ranked(r):
            absent.setdefault(r["provider"], r.get("note") or r.get("check") or r["status"])
    for r in rows:
        absent.pop(r["provider"], None)
    heads = list(OrderedDict.fromkeys(r["head"] for r in rows))
    dtypes = list(OrderedDict.fromkeys(r["dtype"] for r in rows))
    written = []
    for key, ylabel, fname in (("ms", "fwd+bwd median time (ms)", "fwd_bwd_time.png"),
                               ("peak_extra_bytes", "fwd+bwd peak extra memory (MiB)", "fwd_bwd_memory.png")):
        if not any(r.get(key) is not None for r in rows):
            continue
        fig, axes = plt.subplots(len(dtypes), len(heads), figsize=(5 * len(heads), 3.8 * len(dtypes) + 0.6), squeeze=False)
        for i, dtype in enumerate(dtypes):
            for j, head in enumerate(heads):
                ax = axes[i][j]
                sub = [r for r in rows if r["head"] == head and r["dtype"] == dtype and r.get(key) is not None]
                for provider in OrderedDict.fromkeys(r["provider"] for r in sub):
                    pts = {}
                    for r in sub:  # per token count keep the case with K closest to 4
                        old = pts.get(r["tokens"])
                        if r["provider"] == provider and (old is None or abs(r["K"] - 4) < abs(old["K"] - 4)):
                            pts[r["tokens"]] = r
                    xs = sorted(pts)
                    ax.plot(xs, [pts[x][key] / (MIB if key.endswith("bytes") else 1) for x in xs], marker="o", label=provider)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("positions N = B·K·T (every one a target)")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{head} {dtype}")
                ax.grid(True, which="both", alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=8)
        tag = " · CPU SMOKE (not speed claims)" if stamp["device_type"] != "cuda" else ""
        fig.suptitle(f"{stamp['device']} · torch {stamp['torch']} · {describe(stamp).replace('`', '')} · "
                     f"{stamp['date_utc']}{tag}", fontsize=9)
        if absent:
            fig.text(0.01, 0.005, "not shown: " + "; ".join(f"{p} ({why})" for p, why in absent.items())[:400],
                     fontsize=7, va="bottom", wrap=True)
        fig.tight_layout(rect=(0, 0.05 if absent else 0, 1, 1))
        path = os.path.join(outdir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(data, outdir) -> list[str]:
    md = os.path.join(outdir, "results.md")
    with open(md, "w") as f:
        f.write(markdown(data))
    return [md, *plots(data, outdir)]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    readme = None
    if "--readme" in argv:
        i = argv.index("--readme")
        readme = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].endswith(".json") else ""
        del argv[i : i + (2 if readme else 1)]
    if len(argv) != 1:
        raise SystemExit(__doc__)
    try:
        with open(argv[0]) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"{argv[0]}: cannot read a results JSON: {err}")
    if readme is not None:
        snippet = readme_snippet(data)
        if readme:
            update_readme(readme, snippet)
            print(f"updated {readme}")
        else:
            print(snippet, end="")
        return
    for path in write_report(data, os.path.dirname(os.path.abspath(argv[0]))):
        print(path)


if __name__ == "__main__":
    main()
