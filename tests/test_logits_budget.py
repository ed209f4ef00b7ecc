"""``logits_budget``: the forward keeps the logits of as many scored positions as the budget holds and the
backward reads them instead of recomputing them. Same values and gradients as without it (fp64 truth bound),
fewer rows recomputed, nothing kept without a backward."""

import pytest
import torch

from helpers import IMPLS, assert_close_to_truth, make_inputs, run
from mppo_kernels import fused_packed_likelihood, fused_sequence_likelihood, sequence_likelihood_reference
from mppo_kernels.kernels import torch_likelihood, triton_likelihood

BUDGET_IMPLS = [i for i in IMPLS if i != "native"]  # the native CPU kernels always recompute


def _budget(rows, V, dtype):
    return rows * V * torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("impl", BUDGET_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kept", [0, 17, 10_000])  # none, some, every scored position
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_budget_matches_fp64(device, impl, dtype, kept, softcap):
    hidden, weight, b, labels = make_inputs((2, 3), 21, 32, 101, dtype, device, seed=4)
    g = torch.Generator().manual_seed(2)
    gs, gt = torch.randn(2, 3, generator=g).to(device), torch.randn(2, 3, 21, generator=g).to(device)
    kw = dict(softcap=softcap, logit_scale=0.7)
    ours = run(fused_sequence_likelihood, hidden, weight, b, labels, gs, gt, impl=impl, vocab_chunk_size=40,
               logits_budget=_budget(kept, 101, dtype), **kw)
    lowp = run(sequence_likelihood_reference, hidden, weight, b, labels, gs, gt, **kw)
    truth = run(sequence_likelihood_reference, hidden.double(), weight.double(), b.double(), labels, gs, gt, **kw)
    for name, o, lo, t in zip(["logp", "tok", "dh", "dw", "db"], ours, lowp, truth):
        assert_close_to_truth(name, o, lo, t, dtype)
    if dtype == torch.float32:  # fp32 logits kept exactly: the same numbers as recomputing them
        plain = run(fused_sequence_likelihood, hidden, weight, b, labels, gs, gt, impl=impl, vocab_chunk_size=40, **kw)
        for o, p in zip(ours, plain):
            torch.testing.assert_close(o, p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", BUDGET_IMPLS)
def test_kept_rows_are_not_recomputed(device, impl, monkeypatch):
    hidden, weight, b, labels = make_inputs((2, 2), 15, 16, 67, torch.float32, device, prompt=False, holes=False)
    n = int((labels != -100).sum())
    recomputed = []
    if impl == "triton":
        real = triton_likelihood.launch_logit_grad
        monkeypatch.setattr(triton_likelihood, "launch_logit_grad",
                            lambda dz, *a, **k: recomputed.append(dz.shape[0]) or real(dz, *a, **k))
    else:
        real = torch_likelihood._logits
        monkeypatch.setattr(torch_likelihood, "_logits", lambda h, *a: recomputed.append(h.shape[0]) or real(h, *a))
    h = hidden.clone().requires_grad_()
    fused_sequence_likelihood(h, weight, labels, bias=b, impl=impl, logits_budget=_budget(n - 5, 67, torch.float32),
                              vocab_chunk_size=4096).sum().backward()
    # torch path: its forward computes every row once, the backward the 5 rows that did not fit
    assert recomputed[-1] == 5, recomputed


def test_nothing_is_kept_without_a_backward(monkeypatch):
    hidden, weight, b, labels = make_inputs((2, 2), 15, 16, 67, torch.float32, "cpu")
    seen = []
    real = torch_likelihood.forward
    monkeypatch.setattr(torch_likelihood, "forward", lambda *a, **k: seen.append("saved" in k) or real(*a, **k))
    with torch.no_grad():
        fused_sequence_likelihood(hidden, weight, labels, impl="torch", logits_budget=1 << 30)
    fused_sequence_likelihood(hidden.requires_grad_(), weight, labels, impl="torch", logits_budget=1 << 30)
    assert seen == [False, True]


def test_budget_in_the_packed_form():
    hidden, weight, _, labels = make_inputs((1,), 30, 16, 53, torch.float64, "cpu", bias=False)
    rows = torch.tensor([3, 3, 3, 4, 5, 9, 10, 20, 21, 22])
    targets, seq_ids = labels[0, :10].clamp(0), torch.tensor([0, 1, 2, 0, 0, 1, 1, 2, 2, 2])
    out = []
    for budget in (None, _budget(4, 53, torch.float64)):
        h = hidden.clone().requires_grad_()
        logp = fused_packed_likelihood(h, weight, rows, targets, seq_ids, 3, impl="torch", logits_budget=budget)
        logp.sum().backward()
        out.append((logp, h.grad))
    torch.testing.assert_close(out[0], out[1])


@pytest.mark.parametrize("bad", [-1, 2.5, True, "1GB"])
def test_bad_budget_is_named(bad):
    hidden, weight, _, labels = make_inputs((2,), 9, 16, 31, torch.float32, "cpu", bias=False)
    with pytest.raises(ValueError, match="logits_budget must be None or a number of bytes >= 0"):
        fused_sequence_likelihood(hidden, weight, labels, logits_budget=bad)
