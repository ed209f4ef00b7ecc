"""Compile the op's Triton kernels ahead of time for real GPU targets, without a GPU.

The interpreter runs kernel semantics on CPU but skips code generation; this catches what only the
compiler sees (layouts, shared-memory overflow, type errors) for Ampere (sm_80) and Hopper (sm_90).
Run in a process without TRITON_INTERPRET. Prints one line per kernel/target/dtype.
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mppo_kernels.kernels import triton_likelihood as tk

GEMM = {"HAS_BIAS": True, "SOFTCAP": True, "DOT_F32": False}
KERNELS = {  # kernel: (argument types, constexprs besides the tile config, whether it must use tensor cores)
    tk.sequence_logprob_fwd_kernel: (["*{dt}", "*{dt}", "*{dt}", "*i64", "*i64", "*fp32", "*fp32", "*fp32", "*{dt}"]
                                     + ["i32"] * 7 + ["fp32"] * 2, {**GEMM, "KEEP": True}, True),
    tk.sequence_logprob_bwd_kernel: (["*{dt}", "*{dt}", "*{dt}", "*i64", "*i64", "*fp32", "*fp32", "*{dt}"]
                                     + ["i32"] * 7 + ["fp32"] * 3, GEMM, True),
    tk.saved_logit_grad_kernel: (["*{dt}", "*i64", "*fp32", "*fp32", "*{dt}"] + ["i32"] * 5 + ["fp32"] * 2,
                                 {"SOFTCAP": True}, False),
}


def compile_kernel(kernel, dtype, capability, config):
    types, constants, gemm = KERNELS[kernel]
    constants = dict(constants)
    if gemm:
        constants.update(config.kwargs, PRECISION="ieee" if dtype == "fp32" else "tf32")
    else:
        constants.update(BLOCK_M=config.kwargs["BLOCK_M"], BLOCK_N=config.kwargs["BLOCK_N"])
    names = kernel.arg_names
    signature = dict(zip(names, (s.format(dt=dtype) for s in types)))
    signature.update({c: "constexpr" for c in constants})
    # What the JIT would specialize for 16-aligned tensors and strides: without it no vectorized async copies.
    aligned = [i for i, n in enumerate(names) if n.startswith("p_") or n.startswith("stride") or n == "D"]
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(c),): v for c, v in constants.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    opts = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=opts)


def main():
    config = tk.gpu_configs()[0]
    for capability in (80, 90):
        for dtype in ("bf16", "fp32"):
            for kernel, (_, _, gemm) in KERNELS.items():
                compiled = compile_kernel(kernel, dtype, capability, config)
                ptx = compiled.asm["ptx"]
                tensor_cores = ("wgmma" in ptx or "mma.sync" in ptx) if dtype == "bf16" and gemm else True
                print(f"sm_{capability} {dtype} {kernel.__name__}: shared={compiled.metadata.shared} "
                      f"tensor_cores={tensor_cores if gemm else 'n/a (no dot)'}")
                if not tensor_cores:
                    sys.exit(f"{kernel.__name__} does not use tensor cores for {dtype} on sm_{capability}")


if __name__ == "__main__":
    main()
