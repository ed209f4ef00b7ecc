"""fused_sequence_likelihood against its plain-torch twin and an fp64 ground truth, outputs and gradients.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py); ``impl="torch"`` is the
chunked CPU path. Error rule (as in flash-attention's tests): |ours - fp64| <= 2 * |torch low precision -
fp64| + a small tolerance, per output and per gradient.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mppo_kernels
from mppo_kernels import fused_sequence_likelihood, sequence_likelihood_reference
from helpers import IMPLS, TOL, assert_close_to_truth, check_against_truth, make_inputs, run
from mppo_kernels import sequence_likelihood as sl
from mppo_kernels.kernels import native
from mppo_kernels.kernels import triton_likelihood as tk

pytestmark = pytest.mark.usefixtures("small_native_tiles")

CASES = [  # (leading dims, T, D, V, dtype, reduction, bias)
    ((5,), 37, 48, 211, torch.float32, "mean", True),
    ((2, 3), 37, 48, 211, torch.float16, "sum", False),
    ((2, 1), 37, 48, 211, torch.bfloat16, "mean", True),
    ((1, 8), 19, 40, 173, torch.float32, "sum", True),
    ((2, 2, 2), 11, 33, 97, torch.bfloat16, "sum", True),
    ((3, 4), 64, 64, 256, torch.float16, "mean", True),
    ((1,), 1, 16, 5, torch.float32, "mean", False),
    ((2, 5), 23, 48, 211, torch.bfloat16, "mean", False),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lead,T,D,V,dtype,reduction,bias", CASES, ids=lambda x: str(x).replace(" ", ""))
def test_matches_fp64_reference(device, impl, lead, T, D, V, dtype, reduction, bias):
    hidden, weight, b, labels = make_inputs(lead, T, D, V, dtype, device, bias=bias, seed=hash((lead, T)) % 1000)
    g = torch.Generator().manual_seed(1)
    grad_seq = torch.randn(*lead, generator=g).to(device)
    grad_tok = torch.randn(*lead, T, generator=g).to(device)
    ours = run(fused_sequence_likelihood, hidden, weight, b, labels, grad_seq, grad_tok, reduction=reduction,
               impl=impl, vocab_chunk_size=64)
    lowp = run(sequence_likelihood_reference, hidden, weight, b, labels, grad_seq, grad_tok, reduction=reduction)
    truth = run(sequence_likelihood_reference, hidden.double(), weight.double(),
                b.double() if b is not None else None, labels, grad_seq, grad_tok, reduction=reduction)
    for name, o, lo, tr in zip(["logp", "token_logps", "d_hidden", "d_weight", "d_bias"], ours, lowp, truth):
        if tr is None:
            assert o is None
            continue
        assert o.dtype == (torch.float32 if name.endswith("logp") or name == "token_logps" else dtype), name
        assert o.shape == tr.shape, name
        assert_close_to_truth(name, o, lo, tr, dtype)
    assert (ours[1][labels == -100] == 0).all(), "ignored positions must have token log-prob 0"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_vocab_chunk_does_not_change_result(device, impl, chunk):
    hidden, weight, b, labels = make_inputs((2, 3), 13, 24, 71, torch.float32, device)
    g = torch.Generator().manual_seed(2)
    gs, gt = torch.randn(2, 3, generator=g).to(device), torch.randn(2, 3, 13, generator=g).to(device)
    a = run(fused_sequence_likelihood, hidden, weight, b, labels, gs, gt, impl=impl, vocab_chunk_size=chunk)
    r = run(sequence_likelihood_reference, hidden.double(), weight.double(), b.double(), labels, gs, gt)
    for x, y in zip(a, r):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_repeated_calls_are_bitwise_equal(device, impl):
    hidden, weight, b, labels = make_inputs((2, 3), 37, 48, 211, torch.bfloat16, device)
    gs, gt = torch.randn(2, 3, device=device), torch.randn(2, 3, 37, device=device)
    first = run(fused_sequence_likelihood, hidden, weight, b, labels, gs, gt, impl=impl, vocab_chunk_size=64)
    second = run(fused_sequence_likelihood, hidden, weight, b, labels, gs, gt, impl=impl, vocab_chunk_size=64)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_skips_weight_gradient(device, impl, monkeypatch):
    hidden, weight, _, labels = make_inputs((2, 2), 17, 32, 67, torch.float32, device, bias=False)
    seen = []
    backend = sl._IMPLS[impl]
    real_bwd = backend.backward
    monkeypatch.setattr(backend, "backward", lambda *a, **k: seen.append(a[7]) or real_bwd(*a, **k))
    h = hidden.clone().requires_grad_()
    fused_sequence_likelihood(h, weight, labels, impl=impl).sum().backward()
    assert seen == [(True, False, False)]
    h64 = hidden.double().requires_grad_()
    sequence_likelihood_reference(h64, weight.double(), labels).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)

    # and the other way round: a frozen trunk (hidden without grad) skips the hidden gradient
    seen.clear()
    w = weight.clone().requires_grad_()
    fused_sequence_likelihood(hidden, w, labels, impl=impl).sum().backward()
    assert seen == [(False, True, False)]
    assert w.grad is not None and hidden.grad is None


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_only_saves_nothing(device, impl):
    hidden, weight, b, labels = make_inputs((2, 3), 17, 32, 67, torch.float16, device)
    hidden.requires_grad_()
    with torch.no_grad():
        logp = fused_sequence_likelihood(hidden, weight, labels, bias=b, impl=impl)
    assert logp.grad_fn is None and logp.dtype == torch.float32
    ref = sequence_likelihood_reference(hidden.double(), weight.double(), labels, bias=b.double())
    torch.testing.assert_close(logp.double(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_sequence_raises_naming_its_index(device, impl):
    hidden, weight, _, labels = make_inputs((2, 3), 9, 16, 31, torch.float32, device, bias=False)
    labels[1, 2] = -100
    with pytest.raises(ValueError, match=r"sequence \[1, 2\] has no target tokens"):
        fused_sequence_likelihood(hidden, weight, labels, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_padding_sequences_are_nan_never_zero(device, impl, reduction):
    hidden, weight, _, labels = make_inputs((2, 3), 9, 16, 31, torch.float32, device, bias=False)
    labels[0, 2] = -100
    mask = torch.ones(2, 3, dtype=torch.bool, device=device)
    mask[0, 2] = False
    h = hidden.clone().requires_grad_()
    logp = fused_sequence_likelihood(h, weight, labels, sequence_mask=mask, reduction=reduction, impl=impl)
    assert torch.isnan(logp[0, 2]) and torch.isfinite(logp[mask]).all()
    # A loss that masks the padding gets finite gradients and none on the padding's positions.
    torch.where(mask, logp, 0.0).sum().backward()
    assert torch.isfinite(h.grad).all() and (h.grad[0, 2] == 0).all()
    # Without validation an empty sequence is NaN as well, whatever the mask.
    unchecked = fused_sequence_likelihood(hidden, weight, labels, validate=False, reduction=reduction, impl=impl)
    assert torch.isnan(unchecked[0, 2])
    # A sequence the mask calls real still raises.
    mask[0, 2], mask[1, 0] = True, False
    with pytest.raises(ValueError, match=r"sequence \[0, 2\]"):
        fused_sequence_likelihood(hidden, weight, labels, sequence_mask=mask, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_label_without_validation_is_nan(device, impl):
    hidden, weight, _, labels = make_inputs((3,), 9, 16, 31, torch.float32, device, bias=False)
    labels[1, -1] = 31
    out = fused_sequence_likelihood(hidden, weight, labels, validate=False, impl=impl)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_logits_are_stable(device, impl):
    hidden, weight, b, labels = make_inputs((2, 2), 21, 32, 97, torch.float32, device, scale=40.0)
    gs, gt = torch.ones(2, 2, device=device), torch.zeros(2, 2, 21, device=device)
    truth = check_against_truth(hidden, weight, b, labels, gs, gt, torch.float32, impl=impl, vocab_chunk_size=32)
    assert truth[0].min() < -100  # logits in the hundreds: a naive exp would overflow


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs_and_int32_labels(device, impl):
    hidden, weight, b, labels = make_inputs((2, 3), 20, 32, 67, torch.float32, device)
    h = hidden[:, :, :-1]  # the usual [:, :-1] shift: non-contiguous
    y = labels[:, :, 1:].to(torch.int32)
    ours = fused_sequence_likelihood(h, weight, y, bias=b, impl=impl)
    ref = sequence_likelihood_reference(h.double(), weight.double(), y.long(), bias=b.double())
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_casts_like_linear(device, impl):
    hidden, weight, b, labels = make_inputs((2, 2), 9, 32, 67, torch.float32, device)
    w = weight.clone().requires_grad_()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = fused_sequence_likelihood(hidden, w, labels, bias=b, impl=impl)
    out.sum().backward()
    assert w.grad.dtype == torch.float32  # flows back to the fp32 master weight
    ref = fused_sequence_likelihood(hidden.bfloat16(), weight.bfloat16(), labels, bias=b.bfloat16(), impl=impl)
    torch.testing.assert_close(out, ref)


def test_impls_agree_and_torch_path_handles_float64(device):
    hidden, weight, b, labels = make_inputs((2, 3), 15, 24, 50, torch.float64, device)
    out = fused_sequence_likelihood(hidden, weight, labels, bias=b)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, sequence_likelihood_reference(hidden, weight, labels, bias=b))
    hidden, weight, b, labels = make_inputs((2,), 5, 6, 11, torch.float64, device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_sequence_likelihood(h, w, labels, bias=b, reduction="sum", vocab_chunk_size=4,
                                                  return_token_logps=True),
        leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V,banned", [(128, slice(0, 64)), (100, slice(64, None)), (211, slice(30, 190))])
def test_banned_vocabulary_blocks_are_not_nan(device, impl, V, banned):
    """A bias of -inf over whole vocabulary tiles (banned tokens): a tile whose logits are all -inf must not
    turn the online log-sum-exp into exp(-inf - (-inf)) = NaN."""
    hidden, weight, b, labels = make_inputs((2, 3), 13, 24, V, torch.float32, device)
    b[banned] = float("-inf")
    allowed = torch.ones(V, dtype=torch.bool, device=device)
    allowed[banned] = False
    choices = allowed.nonzero().squeeze(1)
    labels = torch.where(labels == -100, labels, choices[labels.clamp(0) % choices.numel()])
    gs, gt = torch.randn(2, 3, device=device), torch.randn(2, 3, 13, device=device)
    ours = run(fused_sequence_likelihood, hidden, weight, b, labels, gs, gt, impl=impl, vocab_chunk_size=48)
    truth = run(sequence_likelihood_reference, hidden.double(), weight.double(), b.double(), labels, gs, gt)
    for name, o, t in zip(["logp", "tok", "dh", "dw", "db"], ours, truth):
        assert torch.isfinite(o).all(), name
        torch.testing.assert_close(o.double(), t, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_second_order_gradient_raises_instead_of_dropping_terms(device, impl):
    hidden, weight, _, labels = make_inputs((2, 3), 9, 16, 31, torch.float32, device, bias=False)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (g,) = torch.autograd.grad(fused_sequence_likelihood(h, w, labels, impl=impl).sum() + 0.5 * (h**2).sum(), h,
                               create_graph=True)
    # The first-order gradient itself is right, with or without create_graph.
    h64 = hidden.double().requires_grad_()
    (g64,) = torch.autograd.grad(sequence_likelihood_reference(h64, weight.double(), labels).sum(), h64)
    torch.testing.assert_close(g.detach().double(), g64 + hidden.double(), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="no second-order gradient"):
        g.sum().backward()


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_length_sequences_raise_or_are_nan(device, impl):
    hidden = torch.randn(2, 0, 8, device=device)
    weight = torch.randn(11, 8, device=device)
    labels = torch.zeros(2, 0, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match=r"sequence \[0\] has no target tokens"):
        fused_sequence_likelihood(hidden, weight, labels, impl=impl)
    with pytest.raises(ValueError, match=r"sequence \[0\] has no target tokens"):
        sequence_likelihood_reference(hidden, weight, labels)
    padding = torch.zeros(2, dtype=torch.bool, device=device)
    assert torch.isnan(fused_sequence_likelihood(hidden, weight, labels, sequence_mask=padding, impl=impl)).all()
    assert torch.isnan(fused_sequence_likelihood(hidden, weight, labels, validate=False, impl=impl)).all()
    # No sequences at all is not an error: an empty result.
    assert fused_sequence_likelihood(hidden[:0], weight, labels[:0], impl=impl).shape == (0,)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_small_integer_labels_equal_int64(device, impl, label_dtype):
    hidden, weight, b, labels = make_inputs((2, 3), 11, 16, 97, torch.float32, device)
    if label_dtype == torch.uint8:  # no room for -100: ignore_index=255 instead
        labels, ignore = labels.masked_fill(labels == -100, 255), 255
    else:
        ignore = -100
    gs, gt = torch.randn(2, 3, device=device), torch.randn(2, 3, 11, device=device)
    small = run(fused_sequence_likelihood, hidden, weight, b, labels.to(label_dtype), gs, gt, impl=impl,
                ignore_index=ignore)
    wide = run(fused_sequence_likelihood, hidden, weight, b, labels, gs, gt, impl=impl, ignore_index=ignore)
    for x, y in zip(small, wide):
        assert torch.equal(x, y)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        fused_sequence_likelihood(hidden, weight, labels.to(torch.uint16), ignore_index=ignore)


# --- bad input --------------------------------------------------------------------------------------------

BAD = {
    "hidden_dtype": (dict(hidden=lambda h: h.long()), TypeError, "hidden must be"),
    "weight_dtype": (dict(weight=lambda w: w.half()), TypeError, "weight dtype"),
    "bias_dtype": (dict(bias=lambda b: b.half()), TypeError, "bias dtype"),
    "float_labels": (dict(labels=lambda y: y.float()), TypeError, "labels must be an integer"),
    "bool_labels": (dict(labels=lambda y: y > 0), TypeError, "labels must be an integer"),
    "labels_shape": (dict(labels=lambda y: y[:, :, :-1]), ValueError, "labels shape"),
    "hidden_D": (dict(hidden=lambda h: h[..., :-1]), ValueError, "hidden's last dim"),
    "weight_rank": (dict(weight=lambda w: w[None]), ValueError, r"weight must be \[V, D\]"),
    "hidden_rank": (dict(hidden=lambda h: h[0, 0, 0], labels=lambda y: y[0, 0, 0]), ValueError, "hidden must be"),
    "bias_shape": (dict(bias=lambda b: b[:-1]), ValueError, r"bias must be \[V\]"),
    "label_too_big": (dict(labels=lambda y: y.index_put((torch.tensor(1), torch.tensor(2), torch.tensor(4)),
                                                        torch.tensor(31))), ValueError,
                      r"labels\[1, 2, 4\] = 31 is outside \[0, V=31\)"),
    "label_negative": (dict(labels=lambda y: y.index_put((torch.tensor(0), torch.tensor(1), torch.tensor(8)),
                                                         torch.tensor(-5))), ValueError, r"labels\[0, 1, 8\] = -5"),
    "not_a_tensor": (dict(weight=lambda w: w.tolist()), TypeError, "weight must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_names_the_argument(case):
    hidden, weight, b, labels = make_inputs((2, 3), 9, 16, 31, torch.float32, "cpu")
    change, exc, msg = BAD[case]
    args = dict(hidden=hidden, weight=weight, bias=b, labels=labels)
    for k, f in change.items():
        args[k] = f(args[k])
    with pytest.raises(exc, match=msg):
        fused_sequence_likelihood(args["hidden"], args["weight"], args["labels"], bias=args["bias"])
    with pytest.raises(exc, match=msg):  # the twin checks the same way
        sequence_likelihood_reference(args["hidden"], args["weight"], args["labels"], bias=args["bias"])


def test_bad_options():
    hidden, weight, _, labels = make_inputs((2,), 9, 16, 31, torch.float32, "cpu", bias=False)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused_sequence_likelihood(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused_sequence_likelihood(hidden, weight, labels, reduction="avg", validate=False)
    with pytest.raises(ValueError, match="impl must be"):
        fused_sequence_likelihood(hidden, weight, labels, impl="cuda")
    with pytest.raises(ValueError, match="vocab_chunk_size must be positive"):
        fused_sequence_likelihood(hidden, weight, labels, vocab_chunk_size=0)
    with pytest.raises(ValueError, match="sequence_mask shape"):
        fused_sequence_likelihood(hidden, weight, labels, sequence_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="sequence_mask must be a bool"):
        fused_sequence_likelihood(hidden, weight, labels, sequence_mask=torch.ones(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch_names_tensors():
    hidden, weight, _, labels = make_inputs((2,), 9, 16, 31, torch.float32, "cpu", bias=False)
    with pytest.raises(ValueError, match="one device"):
        fused_sequence_likelihood(hidden.cuda(), weight, labels.cuda())


def test_public_api():
    assert mppo_kernels.fused_sequence_likelihood is fused_sequence_likelihood
    assert mppo_kernels.reference.sequence_likelihood_reference is sequence_likelihood_reference
    assert isinstance(mppo_kernels.__version__, str)
    assert "F.linear(hidden, weight, bias)" in fused_sequence_likelihood.__doc__  # states its torch twin


# --- property test ----------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    T=st.integers(1, 24), D=st.integers(1, 40), V=st.integers(2, 150),
    reduction=st.sampled_from(["mean", "sum"]), bias=st.booleans(),
    impl=st.sampled_from(IMPLS), chunk=st.integers(1, 200), seed=st.integers(0, 2**16),
)
def test_property_random_shapes(device, lead, T, D, V, reduction, bias, impl, chunk, seed):
    hidden, weight, b, labels = make_inputs(tuple(lead), T, D, V, torch.float32, device, bias=bias, seed=seed)
    g = torch.Generator().manual_seed(seed)
    gs = torch.randn(*lead, generator=g).to(device)
    gt = torch.randn(*lead, T, generator=g).to(device)
    ours = run(fused_sequence_likelihood, hidden, weight, b, labels, gs, gt, reduction=reduction, impl=impl,
               vocab_chunk_size=chunk)
    truth = run(sequence_likelihood_reference, hidden.double(), weight.double(),
                b.double() if b is not None else None, labels, gs, gt, reduction=reduction)
    for o, t in zip(ours, truth):
        if t is None:
            assert o is None
        else:
            torch.testing.assert_close(o.double(), t, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_larger_shapes(device, impl, dtype):
    hidden, weight, b, labels = make_inputs((2, 4), 129, 256, 1031, dtype, device)
    gs, gt = torch.randn(2, 4, device=device), torch.randn(2, 4, 129, device=device)
    check_against_truth(hidden, weight, b, labels, gs, gt, dtype, impl=impl, vocab_chunk_size=300)


@pytest.mark.skipif(not tk.available(), reason="needs triton")
def test_kernels_compile_for_gpu_targets():
    """Code generation for sm_80 / sm_90 (the interpreter never runs the compiler)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "compile_for_gpu.py")
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("this triton build has no ptxas to compile with")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("sm_")]
    assert len(lines) == 12 and not any("tensor_cores=False" in line for line in lines), proc.stdout
    assert sum("tensor_cores=True" in line for line in lines) == 8, proc.stdout  # the two GEMM kernels


@pytest.mark.skipif(not tk.available(), reason="needs triton")
def test_vocab_splits_fill_whole_waves():
    # 24 token blocks on 132 SMs: 11 splits make exactly two waves (6 would leave the second nearly empty).
    assert tk.vocab_splits(24, 128256, 256, 132) == 11
    for m_blocks in (1, 7, 64, 300, 1563):
        s = tk.vocab_splits(m_blocks, 128256, 256, 132)
        assert 1 <= s <= tk.MAX_SPLITS
        programs = m_blocks * s
        assert programs / (-(-programs // 132) * 132) >= 0.9 or s == tk.MAX_SPLITS
    assert tk.vocab_splits(4, 300, 256, 132) == 1  # a vocabulary of two tiles is not split further


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the autotuned kernels run on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autotuned_path_on_lm_head_sized_problem(dtype):
    # n x V above the autotuning threshold: the tuned configs (large tiles, vocabulary splits) run.
    lead, T, D, V = (2,), 1100, 64, 8200
    assert 2 * T * V >= tk.AUTOTUNE_MIN_LOGITS
    hidden, weight, b, labels = make_inputs(lead, T, D, V, dtype, "cuda", prompt=False, holes=False)
    gs, gt = torch.randn(*lead, device="cuda"), torch.randn(*lead, T, device="cuda")
    check_against_truth(hidden, weight, b, labels, gs, gt, dtype)


@pytest.mark.skipif(not tk.available(), reason="needs triton")
def test_forward_split_count_does_not_depend_on_the_config():
    # The autotuner launches every config on the same buffers; a config that wrote more split rows than
    # the chosen one would leave stale partial sums behind (seen on an H100 with the Gemma-2 head).
    for n, V in [(3600, 256000), (2200, 8200), (2949, 128256), (5, 300)]:
        n_splits, grid = tk.forward_grid(n, V, {}, 132)
        for c in tk.gpu_configs():
            assert grid(c.kwargs)[1] == n_splits
            assert grid(c.kwargs)[0] == -(-n // c.kwargs["BLOCK_M"])


@pytest.mark.skipif(not tk.available(), reason="needs triton")
def test_backward_chunk_widens_for_few_rows():
    assert tk.backward_chunk(8192, 128256) == 4096  # LM-head sized problems keep the 4096 default
    wide = tk.backward_chunk(600, 128256)
    assert wide % 256 == 0 and 600 * (wide - 256) < 1 << 24 <= 600 * wide  # 2^24 entries, rounded up
    assert tk.backward_chunk(3, 100) == 100  # never wider than the vocabulary
