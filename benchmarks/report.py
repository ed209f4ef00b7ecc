"""Markdown table and PNG plots from a ``compare.py`` results JSON.

    python -m benchmarks.report benchmarks/results/<device>/results.json            # rewrites results.md and *.png
    python -m benchmarks.report benchmarks/results/<device>/results.json --readme   # compact table for README
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict

TARGETS = {
    "liger": 1.3,  # liger_flce fwd+bwd time / ours >= 1.3
    "cce_exact": 1.0,  # cce_exact fwd+bwd time / ours >= 1.0
    "pct_gemm": 65.0,  # ours achieved rate on 8·N·D·V / measured GEMM rate >= 65 %
    "workspace": 5.0,  # ours fwd+bwd workspace / naive fp32 logits <= 5 %
    "nograd": 0.3,  # ours fwd no-grad time / ours fwd+bwd time <= 0.3
}
MIB = 1 << 20


def _group_key(r) -> tuple:
    return (r["section"], r.get("loss"), r["head"], r["tokens"], r["B"], r["K"], r["T"], r["dtype"])


def _groups(rows):
    groups = OrderedDict()
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    return groups


def _by(rows, provider, mode):
    for r in rows:
        if r["provider"] == provider and r["mode"] == mode:
            return r
    return None


def _ok(r) -> bool:
    return r is not None and r.get("status") == "ok"


def _fmt(x, spec="{:.2f}"):
    return "—" if x is None else spec.format(x)


def _status_cell(r) -> str:
    if r is None:
        return "not run"
    s = r["status"]
    if s == "ok":
        return None
    note = (r.get("note") or "").replace("|", "/").replace("\n", " ")
    if s in ("missing", "unsupported", "skipped", "error"):
        return note if note.startswith(s) else f"{s}: {note}" if note else s
    return s.upper() if s == "oom" else s


def _cell(r, key, spec="{:.2f}", scale=1.0):
    if _status_cell(r) is not None:
        return "—"
    v = r.get(key)
    return _fmt(None if v is None else v * scale, spec)


def _time_cell(r) -> str:
    """A per-mode time, or a one-word status (the reason is in the notes under the table)."""
    if _ok(r):
        return _fmt(r.get("ms"))
    return "not run" if r is None else {"oom": "OOM"}.get(r["status"], r["status"])


def _notes(rows, providers, modes) -> list[str]:
    """Reasons for cells that show a status word (rows that are a status from end to end say it inline)."""
    out = []
    for p in providers:
        per_mode = [_by(rows, p, m) for m in modes]
        statuses = {_status_cell(r) for r in per_mode}
        if len(statuses) == 1 and None not in statuses and "OOM" not in statuses:
            continue
        for m, r in zip(modes, per_mode):
            if r is not None and r["status"] != "ok" and r.get("note"):
                out.append(f"- {p} {m}: {r['note']}")
    return ["", *out] if out else []


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def _row_line(provider, rows, modes, ours_fb) -> str:
    per_mode = [_by(rows, provider, m) for m in modes]
    statuses = {_status_cell(r) for r in per_mode}
    fb = _by(rows, provider, "fwd_bwd")
    if len(statuses) == 1 and None not in statuses and "OOM" not in statuses:
        (why,) = statuses
        return f"| {provider} | {why} |" + " — |" * (len(modes) + 7)
    cells = [_time_cell(r) for r in per_mode]
    speed = _ratio(fb["ms"], ours_fb["ms"]) if _ok(fb) and _ok(ours_fb) else None
    err = next((r.get("max_abs_err") for r in per_mode if r and r.get("max_abs_err") is not None), None)
    return (
        f"| {provider} | " + " | ".join(cells)
        + f" | {_cell(fb, 'tflops_useful', '{:.3g}')} | {_cell(fb, 'pct_gemm', '{:.0f} %')}"
        + f" | {_cell(fb, 'tflops_all_positions', '{:.3g}')}"
        + f" | {_cell(fb, 'peak_extra_bytes', '{:.0f}', 1 / MIB)} | {_cell(fb, 'workspace_bytes', '{:.0f}', 1 / MIB)}"
        + f" | {_cell(fb, 'workspace_pct_naive_logits', '{:.1f} %')}"
        + f" | {_fmt(speed, '{:.2f}×')} | {_fmt(err, '{:.1e}')} |"
    )


def _check(value, goal, higher_is_better, spec):
    if value is None:
        return "—", "n/a"
    met = value >= goal if higher_is_better else value <= goal
    return spec.format(value), "met" if met else "not met"


def _targets(rows, smoke: bool = False) -> list[str]:
    """Goals computed from this run's rows (CUDA goals; on CPU the numbers are shown but not judged)."""
    _judge = _check if not smoke else (lambda *a: (_check(*a)[0], "not judged (CPU smoke)"))
    ours_fb = _by(rows, "ours", "fwd_bwd")
    ours_ng = _by(rows, "ours", "fwd_nograd")
    out = ["", "| target | goal | this run | |", "|---|---|---|---|"]

    def base_ratio(provider):
        r = _by(rows, provider, "fwd_bwd")
        if not _ok(r):
            return None, _status_cell(r)
        if not _ok(ours_fb):
            return None, "ours: " + str(_status_cell(ours_fb))
        return r["ms"] / ours_fb["ms"], None

    for label, provider, goal in (("liger_flce", "liger_flce", TARGETS["liger"]), ("cce_exact", "cce_exact", TARGETS["cce_exact"])):
        v, why = base_ratio(provider)
        shown, verdict = _judge(v, goal, True, "{:.2f}×")
        out.append(f"| fwd+bwd time {label} / ours | ≥ {goal:.2f}× | {shown} | {verdict if why is None else 'n/a: ' + why} |")
    pct = ours_fb.get("pct_gemm") if _ok(ours_fb) else None
    shown, verdict = _judge(pct, TARGETS["pct_gemm"], True, "{:.0f} %")
    out.append(f"| ours fwd+bwd rate on 8·N_valid·D·V / measured GEMM rate | ≥ {TARGETS['pct_gemm']:.0f} % | {shown} | {verdict} |")
    ws = ours_fb.get("workspace_pct_naive_logits") if _ok(ours_fb) else None
    shown, verdict = _judge(ws, TARGETS["workspace"], False, "{:.2f} %")
    out.append(f"| ours fwd+bwd workspace / naive fp32 logits (N·V·4 B) | ≤ {TARGETS['workspace']:.0f} % | {shown} | {verdict} |")
    ng = _ratio(ours_ng["ms"], ours_fb["ms"]) if _ok(ours_ng) and _ok(ours_fb) else None
    shown, verdict = _judge(ng, TARGETS["nograd"], False, "{:.2f}×")
    out.append(f"| ours no-grad forward / ours fwd+bwd | ≤ {TARGETS['nograd']:.2f}× | {shown} | {verdict} |")
    return out


def _likelihood_table(rows, modes) -> list[str]:
    names = {"fwd": "fwd ms", "bwd": "bwd ms", "fwd_bwd": "fwd+bwd ms", "fwd_nograd": "no-grad fwd ms"}
    head = (
        "| provider | " + " | ".join(names[m] for m in modes)
        + " | fwd+bwd TFLOP/s (useful) | % GEMM | TFLOP/s (all positions) | peak extra MiB | workspace MiB"
        + " | workspace / naive fp32 logits | fwd+bwd time / ours | max abs err vs fp32 |"
    )
    ours_fb = _by(rows, "ours", "fwd_bwd")
    providers = list(OrderedDict.fromkeys(r["provider"] for r in rows))
    lines = [head, "|" + "---|" * (len(modes) + 9)]
    lines += [_row_line(p, rows, modes, ours_fb) for p in providers]
    return lines + _notes(rows, providers, modes)


def _loss_table(rows) -> list[str]:
    modes = [m for m in ("fwd", "fwd_bwd", "fwd_nograd") if any(r["mode"] == m for r in rows)]
    names = {"fwd": "fwd ms", "fwd_bwd": "fwd+bwd ms", "fwd_nograd": "no-grad fwd ms"}
    lines = [
        "| provider | " + " | ".join(names[m] for m in modes)
        + " | fwd+bwd TFLOP/s (useful) | peak extra MiB | workspace MiB | fwd+bwd time / ours | loss | abs diff vs naive |",
        "|" + "---|" * (len(modes) + 7),
    ]
    ours_fb = _by(rows, "ours", "fwd_bwd")
    for p in OrderedDict.fromkeys(r["provider"] for r in rows):
        per_mode = [_by(rows, p, m) for m in modes]
        statuses = {_status_cell(r) for r in per_mode}
        if len(statuses) == 1 and None not in statuses and "OOM" not in statuses:
            lines.append(f"| {p} | {statuses.pop()} |" + " — |" * (len(modes) + 5))
            continue
        fb = _by(rows, p, "fwd_bwd")
        speed = _ratio(fb["ms"], ours_fb["ms"]) if _ok(fb) and _ok(ours_fb) else None
        val = next((r.get("loss_value") for r in per_mode if r and r.get("loss_value") is not None), None)
        diff = next((r.get("max_abs_err") for r in per_mode if r and r.get("max_abs_err") is not None), None)
        lines.append(
            f"| {p} | " + " | ".join(_time_cell(r) for r in per_mode)
            + f" | {_cell(fb, 'tflops_useful', '{:.3g}')} | {_cell(fb, 'peak_extra_bytes', '{:.0f}', 1 / MIB)}"
            + f" | {_cell(fb, 'workspace_bytes', '{:.0f}', 1 / MIB)} | {_fmt(speed, '{:.2f}×')}"
            + f" | {_fmt(val, '{:.4f}')} | {_fmt(diff, '{:.1e}')} |"
        )
    return lines + _notes(rows, list(OrderedDict.fromkeys(r["provider"] for r in rows)), modes)


def _group_title(rows) -> str:
    r = rows[0]
    st = r.get("input_stats") or {}
    gemm = r.get("gemm_tflops")
    what = "log-likelihood" if r["section"] == "likelihood" else f"loss `{r['loss']}`"
    return (
        f"### {what}: {r['head']} (D={r['D']}, V={r['V']}), N={r['tokens']} positions (B={r['B']}, K={r['K']}, "
        f"T={r['T']}), {r['dtype']}\n\n"
        f"{100 * st.get('valid_fraction', float('nan')):.0f} % of positions are targets; softmax entropy "
        f"{st.get('entropy_nats', float('nan')):.2f} nats, mean max-prob {st.get('mean_max_prob', float('nan')):.2f}, "
        f"{100 * st.get('frac_probs_below_bf16_filter_eps', float('nan')):.1f} % of probabilities below CCE's bf16 "
        f"filter eps. GEMM reference: {_fmt(gemm, '{:.3g}')} TFLOP/s ({r['dtype']} mm [{r.get('gemm_rows')}, {r['D']}] × "
        f"[{r['D']}, {r['V']}]); bf16 mm {_fmt(r.get('gemm_tflops_bf16'), '{:.3g}')} TFLOP/s."
    )


def markdown(data) -> str:
    stamp, rows, config = data["stamp"], data["rows"], data.get("config", {})
    cpu = stamp["device_type"] != "cuda"
    out = [f"# Benchmark results: {stamp['device']}", ""]
    out.append(
        f"{stamp['date_utc']} · torch {stamp['torch']} · triton {stamp['triton']} · CUDA {stamp['cuda']} · "
        f"mppo-kernels {stamp['mppo_kernels']} at git `{(stamp['git_commit'] or '?')[:12]}`"
        f"{' (+ uncommitted changes)' if stamp.get('git_dirty') else ''} · liger-kernel {stamp['liger_kernel'] or 'not installed'}"
        f" · cut-cross-entropy {stamp['cut_cross_entropy'] or 'not installed'} · {stamp['cpu_count']} CPU cores"
    )
    out.append("")
    out.append(f"Command: `{config.get('command', '?')}`")
    out.append("")
    if cpu:
        out += [
            "**CPU smoke results, not speed claims.** Tiny heads (D and V divided by 16), a plain "
            "`perf_counter` timer, no memory measurement; they only show that every provider and mode runs "
            "end to end and agrees with the fp32 oracle. The targets below are defined for CUDA and are "
            "printed only to exercise the report.",
            "",
        ]
    out += [
        "Definitions. Times are medians (CUDA: `triton.testing.do_bench`; CPU: `time.perf_counter`). "
        "*useful* FLOPs count target (non-ignored) positions only: 2·N_valid·D·V for a forward, 8·N_valid·D·V "
        "for forward+backward (logits recomputed in backward); *all positions* counts N = B·K·T. "
        "% GEMM = useful fwd+bwd rate / rate of a `torch.mm` of the logits' shape in the case dtype, timed in "
        "the same run. *peak extra* = `torch.cuda.max_memory_allocated()` during one call minus memory "
        "allocated just before it (inputs live, their `.grad` None), so it includes the gradients dH, dW the "
        "call creates; *workspace* = peak extra minus the size of dH and dW in the input dtype. "
        "*naive fp32 logits* = N·V·4 bytes. Gradients flow to both hidden and weight; the upstream gradient "
        "is a random [B, K] vector. `max abs err` is the largest |logp - oracle| over sequences, oracle = fp32 "
        "log-softmax on the same (cast) inputs.",
        "",
    ]
    for key, grp in _groups(rows).items():
        out.append(_group_title(grp))
        out.append("")
        if key[0] == "likelihood":
            modes = [m for m in ("fwd", "bwd", "fwd_bwd", "fwd_nograd") if any(r["mode"] == m for r in grp)]
            out += _likelihood_table(grp, modes)
            out += _targets(grp, smoke=cpu)
        else:
            out += _loss_table(grp)
        out.append("")
    return "\n".join(out) + "\n"


def plots(data, outdir) -> list[str]:
    """fwd+bwd time vs positions per head (one line per provider); peak extra memory likewise on CUDA."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    stamp = data["stamp"]
    rows = [r for r in data["rows"] if r["section"] == "likelihood" and r["mode"] == "fwd_bwd" and r["status"] == "ok"]
    written = []
    metrics = [("ms", "fwd+bwd median time (ms)", "fwd_bwd_time.png")]
    if stamp["device_type"] == "cuda":
        metrics.append(("peak_extra_bytes", "fwd+bwd peak extra memory (MiB)", "fwd_bwd_memory.png"))
    heads = list(OrderedDict.fromkeys(r["head"] for r in rows))
    dtypes = list(OrderedDict.fromkeys(r["dtype"] for r in rows))
    if not rows:
        return []
    absent = OrderedDict()  # providers with no fwd+bwd point, and why
    for r in data["rows"]:
        if r["section"] == "likelihood" and r["mode"] == "fwd_bwd" and r["status"] != "ok":
            absent.setdefault(r["provider"], r.get("note") or r["status"])
    for r in rows:
        absent.pop(r["provider"], None)
    for key, ylabel, fname in metrics:
        fig, axes = plt.subplots(len(dtypes), len(heads), figsize=(5 * len(heads), 3.8 * len(dtypes) + 0.6), squeeze=False)
        for i, dtype in enumerate(dtypes):
            for j, head in enumerate(heads):
                ax = axes[i][j]
                sub = [r for r in rows if r["head"] == head and r["dtype"] == dtype]
                for provider in OrderedDict.fromkeys(r["provider"] for r in sub):
                    pts = {}
                    for r in sub:  # per token count keep the case with K closest to 4
                        if r["provider"] == provider and r.get(key) is not None:
                            old = pts.get(r["tokens"])
                            if old is None or abs(r["K"] - 4) < abs(old["K"] - 4):
                                pts[r["tokens"]] = r
                    xs = sorted(pts)
                    ys = [pts[x][key] / (MIB if key.endswith("bytes") else 1) for x in xs]
                    if xs:
                        ax.plot(xs, ys, marker="o", label=provider)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("positions N = B·K·T")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{head} {dtype}")
                ax.grid(True, which="both", alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=8)
        tag = "CPU SMOKE (not speed claims)" if stamp["device_type"] != "cuda" else ""
        fig.suptitle(
            f"{stamp['device']} · torch {stamp['torch']} · triton {stamp['triton']} · "
            f"git {(stamp['git_commit'] or '?')[:10]} · {stamp['date_utc']} {tag}",
            fontsize=9,
        )
        if absent:
            fig.text(0.01, 0.005, "not shown: " + "; ".join(f"{p} ({why})" for p, why in absent.items()),
                     fontsize=7, va="bottom", wrap=True)
        fig.tight_layout(rect=(0, 0.04 if absent else 0, 1, 1))
        path = os.path.join(outdir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def readme_snippet(data, group: int = 0) -> str:
    """A compact table of one likelihood case (default: the first, the grid's headline case) for the README."""
    groups = [g for k, g in _groups(data["rows"]).items() if k[0] == "likelihood"]
    if not groups:
        return ""
    rows = groups[group]
    lines = [_group_title(rows).replace("### ", "**", 1).replace("\n\n", "**\n\n", 1), ""]
    lines += ["| provider | fwd+bwd ms | no-grad fwd ms | peak extra MiB (fwd+bwd) | max abs err vs fp32 |", "|---|---|---|---|---|"]
    for p in OrderedDict.fromkeys(r["provider"] for r in rows):
        fb, ng = _by(rows, p, "fwd_bwd"), _by(rows, p, "fwd_nograd")
        err = next((r.get("max_abs_err") for r in (fb, ng) if r and r.get("max_abs_err") is not None), None)
        bad = _status_cell(fb)
        if bad is not None and bad == _status_cell(ng) and bad != "OOM":
            lines.append(f"| {p} | {bad} | — | — | — |")
        else:
            lines.append(
                f"| {p} | {_cell(fb, 'ms')} | {_cell(ng, 'ms')} | {_cell(fb, 'peak_extra_bytes', '{:.0f}', 1 / MIB)} | {_fmt(err, '{:.1e}')} |"
            )
    return "\n".join(lines) + "\n"


def write_report(data, outdir) -> list[str]:
    md = os.path.join(outdir, "results.md")
    with open(md, "w") as f:
        f.write(markdown(data))
    return [md, *plots(data, outdir)]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    readme = "--readme" in argv
    argv = [a for a in argv if a != "--readme"]
    if len(argv) != 1:
        raise SystemExit(__doc__)
    with open(argv[0]) as f:
        data = json.load(f)
    if readme:
        print(readme_snippet(data), end="")
        return
    for path in write_report(data, os.path.dirname(os.path.abspath(argv[0]))):
        print(path)


if __name__ == "__main__":
    main()
