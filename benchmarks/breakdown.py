"""Where the op's time goes on a GPU: each stage of the forward and backward, timed alone, against the
bf16 GEMM rate measured in the same run.

    python -m benchmarks.breakdown                       # Llama-3-8B head, 8192 positions, bf16
    python -m benchmarks.breakdown --D 2304 --V 256000   # Gemma-2-2B head

Every position is a target here (no mask), so the FLOP counts are the op's floor (`common.flops`): forward
2·N·D·V, backward 6·N·D·V (logits recomputed, dH and dW). Stages: the forward kernel; the backward's
logit-gradient kernel over all vocabulary chunks; the dW and dH GEMMs over all chunks; the whole
backward as the op runs it; the op's forward+backward through autograd.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import triton
import triton.testing

from mppo_kernels import fused_sequence_likelihood
from mppo_kernels import sequence_likelihood as sl


def _ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--D", type=int, default=4096)
    ap.add_argument("--V", type=int, default=128256)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--chunk", type=int, nargs="+", default=[sl.DEFAULT_VOCAB_CHUNK])
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    N, D, V = a.N, a.D, a.V
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(N, D, device="cuda", generator=g)).to(dt)
    weight = (torch.randn(V, D, device="cuda", generator=g) / D**0.5 * 3).to(dt)
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    rows = torch.arange(N, device="cuda")
    flop = 2 * N * D * V
    out = []

    def emit(stage, ms, nflop):
        tf = nflop / (ms * 1e-3) / 1e12
        out.append({"stage": stage, "ms": ms, "tflops": tf})
        print(f"{stage:<44} {ms:9.3f} ms {tf:8.1f} TFLOP/s", flush=True)

    b = torch.randn(V, D, device="cuda", dtype=dt)
    emit("torch.mm [N,D]x[D,V] (GEMM reference)", _ms(lambda: torch.mm(hidden, b.T)), flop)

    fwd = lambda: sl.sequence_logprob_fwd(hidden, weight, None, labels, -100, "triton", 4096)  # noqa: E731
    emit("forward kernel + split merge", _ms(fwd), flop)
    _, _, lse, _ = fwd()
    grad = torch.randn(N, device="cuda", generator=g)
    flags, _ = sl._launch_args(hidden)
    for chunk in a.chunk:
        dz = torch.empty((N, chunk), device="cuda", dtype=dt)

        def dz_all():
            for v_lo in range(0, V, chunk):
                v_hi = min(v_lo + chunk, V)
                grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), triton.cdiv(v_hi - v_lo, meta["BLOCK_N"]))  # noqa: E731,B023
                sl._bwd_tuned[grid](hidden, weight, weight, rows, labels, lse, grad, dz, N, v_lo, v_hi, D,
                                    hidden.stride(0), weight.stride(0), dz.stride(0), HAS_BIAS=False, **flags)

        emit(f"bwd logit-gradient kernel, chunk {chunk}", _ms(dz_all), flop)
        dw = torch.empty_like(weight)
        dh = torch.zeros(N, D, device="cuda", dtype=torch.float32)

        def gemm_dw():
            for v_lo in range(0, V, chunk):
                v_hi = min(v_lo + chunk, V)
                torch.mm(dz[:, : v_hi - v_lo].T, hidden, out=dw[v_lo:v_hi])

        def gemm_dh():
            for v_lo in range(0, V, chunk):
                v_hi = min(v_lo + chunk, V)
                sl._addmm_acc_(dh, dz[:, : v_hi - v_lo], weight[v_lo:v_hi])

        emit(f"dW GEMMs, chunk {chunk}", _ms(gemm_dw), flop)
        emit(f"dH GEMMs (+fp32 accumulate), chunk {chunk}", _ms(gemm_dh), flop)

        def bwd():
            sl.sequence_logprob_bwd(hidden, weight, None, rows, labels, lse, grad, (True, True, False), "triton", chunk)

        emit(f"whole backward, chunk {chunk}", _ms(bwd), 3 * flop)
        h = hidden.view(1, N, D).detach().requires_grad_()
        w = weight.detach().requires_grad_()
        y = labels.view(1, N)

        def fb():
            h.grad = w.grad = None
            fused_sequence_likelihood(h, w, y, validate=False, vocab_chunk_size=chunk).sum().backward()

        emit(f"op forward+backward (autograd), chunk {chunk}", _ms(fb), 4 * flop)
    for name, cfg in (("fwd", sl._fwd_tuned), ("bwd", sl._bwd_tuned)):
        print(f"autotuned {name}: {getattr(cfg, 'best_config', None)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"N": N, "D": D, "V": V, "dtype": a.dtype, "device": torch.cuda.get_device_name(), "rows": out}, f,
                      indent=1)


if __name__ == "__main__":
    main()
