"""Builds the native CPU kernels (csrc/) into ``mppo_kernels._C``; everything else is in pyproject.toml.

The extension is compiled against the torch found at build time, so torch must be installed first and the
build must see it: ``pip install --no-build-isolation -e .`` (an isolated build environment has no torch,
and would otherwise fetch one that may not match the installed torch). The package installs without the
extension, and then uses the chunked torch path on CPU with one warning, when:

* ``MPPO_KERNELS_NO_NATIVE=1`` is set (skip the build),
* torch is not importable at build time (an isolated build), or
* compiling fails (no C++ compiler, no OpenMP): a warning says why, the install goes on.

What the build needs: a C++17 compiler (g++ >= 9 or clang), OpenMP (libgomp, which the torch wheels ship),
and the Python headers.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _warn(msg: str) -> None:
    print(f"mppo-kernels: {msg}; the package installs without the native CPU kernels (chunked torch path on CPU)",
          file=sys.stderr)


def _extensions():
    if os.environ.get("MPPO_KERNELS_NO_NATIVE", "0") == "1":
        _warn("MPPO_KERNELS_NO_NATIVE=1")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _warn("torch is not importable at build time (use pip install --no-build-isolation)")
        return [], {}

    class OptionalBuild(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001  (any compiler failure must leave an installable package)
                _warn(f"building {ext.name} failed ({type(e).__name__}: {e})")

    ext = CppExtension(
        "mppo_kernels._C",
        ["csrc/sequence_likelihood_cpu.cpp"],
        extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuild}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
