"""The native CPU kernels of ``csrc/`` (``torch.ops.mppo_kernels_cpu``), when the extension was built.

``pip install -e .`` compiles ``csrc/sequence_likelihood_cpu.cpp`` into ``mppo_kernels._C`` where a C++
compiler and torch are present at build time (``--no-build-isolation``, see setup.py); without it the CPU
falls back to ``mppo_kernels.kernels.torch_likelihood`` with one warning, the first time it is needed.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from mppo_kernels.kernels import OpSettings

__all__ = ["available", "forward", "backward", "BLOCK_M", "BLOCK_V"]

# Token and vocabulary tile of the C++ loops: a [256, 512] fp32 logit tile (512 KiB) stays in a core's L2
# cache while it is reused, and the weight-gradient GEMM on it gets an inner dimension of 256 (with 128 it
# ran ~7 % slower in CPU time at D = 256, V = 32000).
BLOCK_M, BLOCK_V = 256, 512
# Scored rows processed at once (0: as many as keep the backward's per-thread hidden-gradient shares within
# 8 MiB); tests set it small to cross super-block boundaries.
SUPER_ROWS = 0
_state: dict = {}


def load_error() -> str | None:
    """Why the extension is not available (None when it is)."""
    available()
    return _state.get("error")


def available() -> bool:
    if "ok" not in _state:
        try:
            importlib.import_module("mppo_kernels._C")  # registers torch.ops.mppo_kernels_cpu.*
            torch.ops.mppo_kernels_cpu.forward  # noqa: B018  (raises if the registration is missing)
            _state["ok"] = True
        except (ImportError, OSError, AttributeError, RuntimeError) as e:
            _state["ok"], _state["error"] = False, f"{type(e).__name__}: {e}"
    return _state["ok"]


def warn_fallback() -> None:
    if not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(
            "mppo_kernels: the native CPU kernels are not built (" + str(load_error()) + "); using the chunked "
            "torch path on CPU, which is slower and uses more memory. Reinstall with a C++ compiler: "
            "pip install --no-build-isolation -e . (README, Install).", RuntimeWarning, stacklevel=3)


def forward(hidden2d, weight, bias, rows, targets, settings: OpSettings):
    return torch.ops.mppo_kernels_cpu.forward(hidden2d, weight, bias, rows, targets, settings.logit_scale,
                                              settings.softcap, BLOCK_M, BLOCK_V, SUPER_ROWS)


def backward(hidden2d, weight, bias, rows, targets, lse, grad, need, settings: OpSettings, *, all_rows=False):
    need_h, need_w, need_b = need
    d_rows, d_w, d_b = torch.ops.mppo_kernels_cpu.backward(
        grad, hidden2d, weight, bias, rows, targets, lse, settings.logit_scale, settings.softcap, BLOCK_M, BLOCK_V,
        SUPER_ROWS, need_h, need_w, need_b and bias is not None)
    return (d_rows if need_h else None), (d_w if need_w else None), (d_b if need_b else None)
