"""Where the op's time goes: each stage of the forward and backward timed alone, against the GEMM rate
measured in the same run, stamped like the comparison table (``benchmarks/stamp.py``).

    python -m benchmarks.breakdown                                   # Llama-3-8B head, 8192 positions, bf16
    python -m benchmarks.breakdown --heads llama3-8b gemma2-2b --json breakdown.json
    python -m benchmarks.breakdown --device cpu --heads llama3-8b/16 --N 256   # public-API stages only

Inputs are ``benchmarks.common.make_inputs``' with every position a target, so the FLOP counts are those
of ``common.flops``: forward 2·N·D·V, backward 4·N·D·V plus 2·N·D·V to recompute the logits (8·N·D·V for
forward+backward; 6·N·D·V when a logits budget keeps them). Stages: the GEMM reference; the forward
kernel (one launch of ``triton_likelihood.launch_forward``) and the forward with its split merge; the
backward's logit-gradient kernel over all vocabulary chunks (``launch_logit_grad``); the dW and dH GEMMs
over all chunks; the whole backward; and through the public op: the no-grad forward, forward+backward,
and forward+backward with a logits budget (where the op has one). A stage whose helper is missing or
fails is recorded with its error and the others still run; stages that launch Triton directly need CUDA.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.common import DTYPES, HEADS, TINY_HEADS, make_case, make_inputs
from benchmarks.measure import sample_ms
from benchmarks.stamp import run_stamp


def _stages(hidden2d, weight, labels1d, chunk: int, device):
    """``(name, fn, flop multiple of N·D·V, why not)`` per stage; ``fn`` is None when the stage cannot run
    here (``why not`` says why) and may raise (recorded, not fatal)."""
    from mppo_kernels import fused_sequence_likelihood

    N, D = hidden2d.shape
    rows = torch.arange(N, device=device)
    stages = []
    b = torch.randn_like(weight)
    stages.append(("torch.mm [N,D]x[D,V] (GEMM reference)", lambda: torch.mm(hidden2d, b.T), 2, None))
    try:
        from mppo_kernels.kernels import OpSettings
        from mppo_kernels.kernels import triton_likelihood as tk
    except Exception as err:  # noqa: BLE001 - the op's own stages below still run
        why = f"missing: mppo_kernels.kernels.triton_likelihood: {type(err).__name__}: {err}"
    else:
        why = None if device.type == "cuda" else "unsupported: launches Triton kernels (CUDA)"
    if why is not None:
        stages.append(("Triton kernel stages", None, 2, why))
    else:
        settings = OpSettings(vocab_chunk=chunk)
        grad = torch.randn(N, device=device)
        lse_box = []

        def fwd():
            lse, _ = tk.forward(hidden2d, weight, None, rows, labels1d, settings)
            lse_box[:] = [lse]

        dz = torch.empty((N, chunk), device=device, dtype=hidden2d.dtype)
        dw = torch.empty_like(weight)
        dh = torch.zeros(N, D, device=device, dtype=torch.float32)
        V = weight.shape[0]
        spans = [(lo, min(lo + chunk, V)) for lo in range(0, V, chunk)]

        def logit_grad():
            for lo, hi in spans:
                tk.launch_logit_grad(dz[:, : hi - lo], hidden2d, weight, None, rows, labels1d, lse_box[0], grad, lo, settings)

        stages += [
            ("forward kernel (one launch, splits unmerged)",
             lambda: tk.launch_forward(hidden2d, weight, None, rows, labels1d, settings), 2, None),
            ("forward + split merge", fwd, 2, None),
            (f"bwd logit-gradient kernel, chunk {chunk}", logit_grad, 2, None),
            (f"dW GEMMs, chunk {chunk}",
             lambda: [torch.mm(dz[:, : hi - lo].T, hidden2d, out=dw[lo:hi]) for lo, hi in spans], 2, None),
            (f"dH GEMMs (+fp32 accumulate), chunk {chunk}",
             lambda: [tk.addmm_acc_(dh, dz[:, : hi - lo], weight[lo:hi]) for lo, hi in spans], 2, None),
            (f"whole backward, chunk {chunk}",
             lambda: tk.backward(hidden2d, weight, None, rows, labels1d, lse_box[0], grad, (True, True, False), settings,
                                 all_rows=True), 6, None),
        ]

    h = hidden2d.view(1, N, D).detach().requires_grad_()
    w = weight.detach().requires_grad_()
    y = labels1d.view(1, N)

    def op(**kw):
        def run():
            h.grad = w.grad = None
            fused_sequence_likelihood(h, w, y, validate=False, vocab_chunk_size=chunk, **kw).sum().backward()

        return run

    def nograd():
        with torch.no_grad():
            fused_sequence_likelihood(h, w, y, validate=False, vocab_chunk_size=chunk)

    stages += [("op no-grad forward", nograd, 2, None), (f"op forward+backward (autograd), chunk {chunk}", op(), 8, None)]
    if "logits_budget" in inspect.signature(fused_sequence_likelihood).parameters:
        budget = N * (weight.shape[0] * 4 + 64)
        stages.append((f"op forward+backward, logits_budget {budget / 2**30:.2f} GiB", op(logits_budget=budget), 6, None))
    else:
        stages.append(("op forward+backward with a logits budget", None, 6, "missing: op has no logits_budget argument"))
    return stages


def run_head(head, N, dtype, chunk, device, samples, emit) -> None:
    case = make_case(head, N, 1, dtype, max_T=N, targets="all")
    hidden, weight, labels, _ = make_inputs(case, device)
    dt = DTYPES[dtype]
    hidden2d, weight = hidden.reshape(N, case.D).to(dt), weight.to(dt)
    labels1d = labels.reshape(N)
    ndv = N * case.D * case.V
    for name, fn, mult, why in _stages(hidden2d, weight, labels1d, chunk, device):
        row = {"head": head, "N": N, "D": case.D, "V": case.V, "dtype": dtype, "stage": name, "flops": mult * ndv}
        if fn is None:
            row["error"] = why
        else:
            try:
                t = sample_ms(fn, device, min_samples=samples, min_total_ms=100.0)
                row.update(ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], samples=t["samples"],
                           tflops=mult * ndv / (t["ms"] * 1e-3) / 1e12)
            except Exception as err:  # noqa: BLE001 - one stage's failure is its row
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        emit(row)
    del hidden, weight, labels, hidden2d, labels1d
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--heads", nargs="+", default=["llama3-8b"], choices=sorted({**HEADS, **TINY_HEADS}))
    ap.add_argument("--N", type=int, default=8192, help="positions, every one a target")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--chunk", type=int, default=4096, help="the op's vocab_chunk_size")
    ap.add_argument("--samples", type=int, default=10, help="timed calls per stage, at least")
    ap.add_argument("--json", help="write stamp + rows here (rewritten after every stage)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu)")
    data = {"stamp": run_stamp(device), "config": {"command": "python -m benchmarks.breakdown " + " ".join(sys.argv[1:]),
                                                   **vars(a)}, "rows": []}

    def emit(row):
        data["rows"].append(row)
        shown = f"{row['ms']:9.3f} ms {row['tflops']:8.1f} TFLOP/s" if "ms" in row else row["error"]
        print(f"{row['head']:<14} {row['stage']:<52} {shown}", flush=True)
        if a.json:
            write(a.json, data)

    for head in a.heads:
        try:
            run_head(head, a.N, a.dtype, a.chunk, device, a.samples, emit)
        except Exception as err:  # noqa: BLE001 - keep the other heads' rows
            emit({"head": head, "stage": "inputs", "error": f"{type(err).__name__}: {err}"[:300]})
    if device.type == "cuda":
        try:
            from mppo_kernels.kernels import triton_likelihood as tk

            data["autotuned"] = {n: str(getattr(getattr(tk, k, None), "best_config", None))
                                 for n, k in (("fwd", "_fwd_tuned"), ("bwd", "_bwd_tuned"))}
        except Exception:  # noqa: BLE001 - the configs are a nicety
            pass
    if a.json:
        write(a.json, data)


def write(path: str, data: dict) -> None:
    """Whole file, renamed into place: a run killed by its time limit leaves the last complete one."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
