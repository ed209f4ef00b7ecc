"""The op as a torch op: ``torch.library.opcheck`` of both custom ops, ``torch.compile(fullgraph=True)`` against
eager, the native CPU kernels' super-blocks and threads, and the fallback when the extension is absent."""

import importlib.util
import os
import warnings

import pytest
import torch

from helpers import IMPLS, make_inputs
from mppo_kernels import fused_packed_likelihood, fused_sequence_likelihood, sequence_likelihood_reference
from mppo_kernels import sequence_likelihood as sl
from mppo_kernels.kernels import native

pytestmark = pytest.mark.usefixtures("small_native_tiles")
CPU_IMPLS = [i for i in IMPLS if i != "triton"]  # opcheck and compile run the real kernels, not the interpreter
OPS = torch.ops.mppo_kernels


def op_args(impl, *, bias=True, rows=False, dtype=torch.float32, budget=0):
    hidden, weight, b, labels = make_inputs((2, 3), 13, 24, 71, dtype, "cpu", bias=bias)
    h2, y = hidden.reshape(-1, 24), labels.reshape(-1)
    r = None
    if rows:  # a packed layout: some rows predict two targets
        r = torch.arange(h2.shape[0]).flip(0) // 2
    return [h2.requires_grad_(), weight.requires_grad_(), b.requires_grad_() if b is not None else None, y, r, -100,
            0.5, 3.0, 32, impl, budget]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("bias,rows,budget", [(True, False, 0), (False, True, 0), (True, False, 20 * 71 * 4)])
def test_opcheck_forward(impl, bias, rows, budget):
    torch.library.opcheck(OPS.token_logprobs, op_args(impl, bias=bias, rows=rows, budget=budget))


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("need,budget", [((True, True, True), 0), ((True, False, False), 0), ((False, True, True), 0),
                                         ((True, True, True), 20 * 71 * 4)])
def test_opcheck_backward(impl, need, budget):
    args = op_args(impl, rows=True, budget=budget)
    with torch.no_grad():
        token, lse, kept = OPS.token_logprobs(*args)
    assert kept.shape == ((20 if budget and impl != "native" else 0), 71)
    grad = torch.randn_like(token)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:-1]]
    torch.library.opcheck(OPS.token_logprobs_backward, [grad, *detached[:5], lse, kept, *detached[5:], *need])


def _compiled_vs_eager(fn, *inputs):
    eager_leaves = [x.detach().clone().requires_grad_() for x in inputs]
    comp_leaves = [x.detach().clone().requires_grad_() for x in inputs]
    eager = fn(*eager_leaves)
    eager.backward()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)(*comp_leaves)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(comp_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_compile_fullgraph_matches_eager(impl):
    hidden, weight, b, labels = make_inputs((2, 3), 13, 24, 71, torch.float32, "cpu")

    def loss(h, w, bias):  # the op inside a larger graph: a transform before, a loss after
        logp = fused_sequence_likelihood(torch.tanh(h), w, labels, bias=bias, validate=False, impl=impl, softcap=4.0)
        return -(logp.exp() * torch.arange(3.0)).sum()

    _compiled_vs_eager(loss, hidden, weight, b)


def test_compile_fullgraph_packed():
    hidden, weight, _, labels = make_inputs((1,), 40, 16, 53, torch.float32, "cpu", bias=False)
    rows = torch.tensor([3, 3, 3, 4, 5, 9, 10, 20, 21, 22])
    targets = labels[0, :10].clamp(0)
    seq_ids = torch.tensor([0, 1, 2, 0, 0, 1, 1, 2, 2, 2])

    def loss(h, w):
        return fused_packed_likelihood(h, w, rows, targets, seq_ids, 3, validate=False).sum()

    _compiled_vs_eager(loss, hidden, weight)


def test_validation_inside_compile_is_refused_clearly():
    hidden, weight, _, labels = make_inputs((2,), 9, 16, 31, torch.float32, "cpu", bias=False)
    torch._dynamo.reset()
    fn = torch.compile(lambda h, w: fused_sequence_likelihood(h, w, labels), fullgraph=True)
    with pytest.raises(Exception, match="pass validate=False inside torch.compile"):
        fn(hidden, weight)
    # outside a compiled region validation works as always
    with pytest.raises(ValueError, match="outside"):
        fused_sequence_likelihood(hidden, weight, labels.index_fill(1, torch.tensor([3]), 31))


@pytest.mark.skipif(not native.available(), reason="the native extension is not built")
@pytest.mark.parametrize("super_rows", [16, 48])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_super_blocks_and_threads(monkeypatch, super_rows, threads):
    """Super-blocks smaller than the scored rows, and 1 or 2 threads sharing the vocabulary tiles: the same
    answer as the fp64 truth (bf16 weight: the fp32 weight-gradient accumulator across super-blocks)."""
    monkeypatch.setattr(native, "SUPER_ROWS", super_rows)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            hidden, weight, b, labels = make_inputs((3, 2), 29, 24, 83, dtype, "cpu", seed=super_rows)
            leaves = [x.clone().requires_grad_() for x in (hidden, weight, b)]
            fused_sequence_likelihood(*leaves[:2], labels, bias=leaves[2], impl="native", reduction="sum").sum().backward()
            ref = [x.double().requires_grad_() for x in (hidden, weight, b)]
            sequence_likelihood_reference(*ref[:2], labels, bias=ref[2], reduction="sum").sum().backward()
            for x, r in zip(leaves, ref):
                torch.testing.assert_close(x.grad.double(), r.grad, rtol=tol, atol=tol * r.grad.abs().max().item())
    finally:
        torch.set_num_threads(before)


def test_fallback_without_the_extension(monkeypatch):
    """No extension: "auto" takes the chunked torch path with one warning saying why and how to build it;
    asking for "native" is refused with the reason."""
    monkeypatch.setattr(native, "_state", {"ok": False, "error": "ImportError: no module named mppo_kernels._C"})
    hidden, weight, _, labels = make_inputs((2,), 9, 16, 31, torch.float32, "cpu", bias=False)
    with pytest.warns(RuntimeWarning, match="native CPU kernels are not built .*ImportError.*--no-build-isolation"):
        out = fused_sequence_likelihood(hidden, weight, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        again = fused_sequence_likelihood(hidden, weight, labels)
    torch.testing.assert_close(out, again)
    torch.testing.assert_close(out.double(), sequence_likelihood_reference(hidden.double(), weight.double(), labels))
    assert sl.available_impls("cpu")[-1] == "torch" and "native" not in sl.available_impls("cpu")
    with pytest.raises(ValueError, match="impl='native' needs .*no module named"):
        fused_sequence_likelihood(hidden, weight, labels, impl="native")


def test_setup_skips_the_build_when_asked(monkeypatch, capsys):
    """MPPO_KERNELS_NO_NATIVE=1 makes setup.py build no extension (and say so), so the package installs."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    spec = importlib.util.spec_from_file_location("mppo_setup", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr("setuptools.setup", lambda **kw: None)
    spec.loader.exec_module(module)
    monkeypatch.setenv("MPPO_KERNELS_NO_NATIVE", "1")
    assert module._extensions() == ([], {})
    assert "MPPO_KERNELS_NO_NATIVE=1" in capsys.readouterr().err
    monkeypatch.delenv("MPPO_KERNELS_NO_NATIVE")
    exts, cmdclass = module._extensions()
    assert [e.name for e in exts] == ["mppo_kernels._C"] and "build_ext" in cmdclass
