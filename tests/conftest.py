"""Test setup: run the real Triton kernels through the interpreter when there is no GPU, and poison
``torch.empty`` so any output element a kernel forgets to write shows up as NaN."""

import os

import torch

# Must happen before triton is first imported (mppo_kernels imports it lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


def _poisoned(fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        if out.dtype.is_floating_point:
            out.fill_(float("nan"))
        elif out.dtype in (torch.int32, torch.int64):
            out.fill_(torch.iinfo(out.dtype).min)
        return out

    return wrapper


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def small_native_tiles(monkeypatch):
    """Small tiles for the native CPU kernels, as the interpreter gets (conftest of the Triton path): odd test
    shapes then cross several token tiles, vocabulary tiles and threads' shares of the vocabulary."""
    from mppo_kernels.kernels import native

    monkeypatch.setattr(native, "BLOCK_M", 16)
    monkeypatch.setattr(native, "BLOCK_V", 32)
