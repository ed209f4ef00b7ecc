"""The op's packed form: per-sequence log-likelihoods from hidden rows with an explicit row and sequence per
target, against its plain-torch twin and the fp64 truth (values and gradients, rows shared by several
targets), equal to the padded form on the same data, and its errors."""

import pytest
import torch

from helpers import IMPLS, assert_close_to_truth
from mppo_kernels import fused_packed_likelihood, fused_sequence_likelihood, packed_likelihood_reference

pytestmark = pytest.mark.usefixtures("small_native_tiles")


def prefix_shared(B, P, lengths, D, V, dtype, device, seed=0):
    """A prefix-shared packed layout and the padded layout of the same sequences.

    Prompt b (``P`` tokens) is followed by its responses of ``lengths[b]`` tokens each, all in one row of
    hidden states ``[1, L, D]``; response k's first token is predicted from the prompt's last row. Returns
    ``(packed, padded)``: ``(hidden, rows, targets, seq_ids, num_seqs)`` and ``(hidden [S, T, D], labels)``
    where the padded hidden rows are copies of the packed ones (a prompt encoded once, shared)."""
    g = torch.Generator().manual_seed(seed)
    pieces, rows, targets, seq_ids = [], [], [], []
    padded = []  # per sequence: (hidden [P + len, D] it sees, labels)
    offset, s = 0, 0
    for b in range(B):
        prompt = torch.randn(P, D, generator=g)
        pieces.append(prompt)
        last_prompt_row = offset + P - 1
        offset += P
        for n in lengths[b]:
            resp = torch.randn(n, D, generator=g)
            tok = torch.randint(0, V, (n,), generator=g)
            pieces.append(resp)
            # token j of the response is predicted from the row before it: the prompt's last row for j = 0
            rows += [last_prompt_row] + list(range(offset, offset + n - 1))
            targets += tok.tolist()
            seq_ids += [s] * n
            seq_h = torch.cat([prompt, resp])
            labels = torch.full((P + n,), -100, dtype=torch.long)
            labels[P - 1 : P - 1 + n] = tok
            padded.append((seq_h, labels))
            offset += n
            s += 1
    hidden = torch.cat(pieces)[None].to(dtype).to(device)
    T = max(h.shape[0] for h, _ in padded)
    h_pad = torch.zeros(len(padded), T, D)
    y_pad = torch.full((len(padded), T), -100, dtype=torch.long)
    for i, (h, y) in enumerate(padded):
        h_pad[i, : h.shape[0]], y_pad[i, : y.shape[0]] = h, y
    t = lambda x: torch.tensor(x, device=device)  # noqa: E731
    return ((hidden, t(rows), t(targets), t(seq_ids), s), (h_pad.to(dtype).to(device), y_pad.to(device)))


def grads(fn, hidden, weight, bias, *args, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    out = fn(leaves[0], leaves[1], *args, bias=leaves[2], **kw)
    g = torch.Generator().manual_seed(5)
    (out * torch.randn(out.shape, generator=g).to(out)).sum().backward()
    return [out.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_packed_matches_fp64_with_shared_rows(device, impl, dtype, reduction):
    (hidden, rows, targets, seq_ids, S), _ = prefix_shared(3, 5, [[4, 7, 1], [3], [6, 2]], 24, 97, dtype, device)
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(97, 24, generator=g) / 3).to(dtype).to(device)
    bias = torch.randn(97, generator=g).to(dtype).to(device)
    args = (rows, targets, seq_ids, S)
    ours = grads(fused_packed_likelihood, hidden, weight, bias, *args, reduction=reduction, impl=impl,
                 vocab_chunk_size=40)
    lowp = grads(packed_likelihood_reference, hidden, weight, bias, *args, reduction=reduction)
    truth = grads(packed_likelihood_reference, hidden.double(), weight.double(), bias.double(), *args,
                  reduction=reduction)
    for name, o, lo, t in zip(["logp", "dh", "dw", "db"], ours, lowp, truth):
        assert o.shape == t.shape, name
        assert_close_to_truth(name, o, lo, t, dtype)
    # the shared prompt rows collect the gradient of every response they start
    assert (truth[1][0, 4] != 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_equals_padded(device, impl):
    """The same sequences, the prompt encoded once (packed) or once per response (padded): the same numbers."""
    packed, (h_pad, y_pad) = prefix_shared(2, 4, [[3, 5, 2], [6, 1]], 16, 61, torch.float64 if impl == "torch" else
                                           torch.float32, device, seed=3)
    hidden, rows, targets, seq_ids, S = packed
    w = torch.randn(61, 16, dtype=hidden.dtype, device=device) / 4
    a = fused_packed_likelihood(hidden, w, rows, targets, seq_ids, S, impl=impl)
    b = fused_sequence_likelihood(h_pad, w, y_pad, impl=impl)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    a_tok = fused_packed_likelihood(hidden, w, rows, targets, seq_ids, S, impl=impl, return_token_logps=True)[1]
    torch.testing.assert_close(a_tok, fused_sequence_likelihood(h_pad, w, y_pad, impl=impl, return_token_logps=True)[1][
        y_pad != -100], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_empty_sequences(device, impl):
    (hidden, rows, targets, seq_ids, S), _ = prefix_shared(1, 3, [[2, 2]], 8, 19, torch.float32, device)
    w = torch.randn(19, 8, device=device)
    # sequence 2 exists but has no tokens: an error unless the mask calls it padding, NaN without validation
    with pytest.raises(ValueError, match="sequence 2 has no target tokens"):
        fused_packed_likelihood(hidden, w, rows, targets, seq_ids, S + 1, impl=impl)
    mask = torch.tensor([True, True, False], device=device)
    out = fused_packed_likelihood(hidden, w, rows, targets, seq_ids, S + 1, sequence_mask=mask, impl=impl)
    assert torch.isnan(out[2]) and torch.isfinite(out[:2]).all()
    assert torch.isnan(fused_packed_likelihood(hidden, w, rows, targets, seq_ids, S + 1, validate=False, impl=impl)[2])
    # an ignored target costs nothing and counts for nothing
    t2 = targets.clone()
    t2[1] = -100
    out = fused_packed_likelihood(hidden, w, rows, t2, seq_ids, S, impl=impl, reduction="sum")
    ref = packed_likelihood_reference(hidden, w, rows, t2, seq_ids, S, reduction="sum")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


BAD = {
    "row_too_big": (dict(rows=lambda r: r.index_fill(0, torch.tensor([2]), 99)), ValueError,
                    r"rows\[2\] = 99 is outside \[0, N=11\)"),
    "row_negative": (dict(rows=lambda r: r.index_fill(0, torch.tensor([0]), -1)), ValueError, r"rows\[0\] = -1"),
    "target_too_big": (dict(targets=lambda t: t.index_fill(0, torch.tensor([3]), 19)), ValueError,
                       r"targets\[3\] = 19 is outside \[0, V=19\)"),
    "seq_too_big": (dict(seq_ids=lambda s: s.index_fill(0, torch.tensor([1]), 7)), ValueError,
                    r"seq_ids\[1\] = 7 is outside \[0, num_seqs=2\)"),
    "rows_shape": (dict(rows=lambda r: r[:-1]), ValueError, r"rows must be \[n\] like targets"),
    "float_targets": (dict(targets=lambda t: t.float()), TypeError, "targets must be an integer tensor"),
    "seq_dtype": (dict(seq_ids=lambda s: s > 0), TypeError, "seq_ids must be an integer tensor"),
    "num_seqs": (dict(num_seqs=lambda n: 2.0), TypeError, "num_seqs must be an int"),
    "hidden_D": (dict(hidden=lambda h: h[..., :-1]), ValueError, "hidden's last dim"),
    "mask_shape": (dict(sequence_mask=lambda m: torch.ones(3, dtype=torch.bool)), ValueError,
                   r"sequence_mask shape \(3,\) must equal \(num_seqs,\) = \(2,\)"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_packed_bad_input_names_the_argument(case):
    (hidden, rows, targets, seq_ids, S), _ = prefix_shared(1, 3, [[4, 4]], 8, 19, torch.float32, "cpu")
    args = dict(hidden=hidden, weight=torch.randn(19, 8), rows=rows, targets=targets, seq_ids=seq_ids, num_seqs=S,
                sequence_mask=None)
    change, exc, msg = BAD[case]
    for k, f in change.items():
        args[k] = f(args[k])
    for fn in (fused_packed_likelihood, packed_likelihood_reference):
        with pytest.raises(exc, match=msg):
            fn(args["hidden"], args["weight"], args["rows"], args["targets"], args["seq_ids"], args["num_seqs"],
               sequence_mask=args["sequence_mask"])


def test_packed_out_of_range_target_without_validation_is_nan():
    (hidden, rows, targets, seq_ids, S), _ = prefix_shared(1, 3, [[4, 4]], 8, 19, torch.float32, "cpu")
    targets = targets.clone()
    targets[5] = 25  # in sequence 1
    out = fused_packed_likelihood(hidden, torch.randn(19, 8), rows, targets, seq_ids, S, validate=False)
    assert torch.isfinite(out[0]) and torch.isnan(out[1])

