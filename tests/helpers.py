"""Shared helpers of the op's tests: random inputs with prompt / padding / hole masks, running an op with
upstream gradients, and the error rule against the fp64 ground truth (as in flash-attention's tests):
|ours - fp64| <= 2 * |torch low precision - fp64| + a small tolerance, per output and per gradient."""

import torch

from mppo_kernels import fused_sequence_likelihood, sequence_likelihood_reference
from mppo_kernels import sequence_likelihood as sl

IMPLS = sl.available_impls("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_inputs(lead, T, D, V, dtype, device, *, bias=True, seed=0, scale=1.0, prompt=True, holes=True):
    """Random inputs with a prompt prefix, right padding and holes masked by -100 in every sequence."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, T, D, generator=g) * scale
    weight = torch.randn(V, D, generator=g) / D**0.5 * 2.0
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, V, (*lead, T), generator=g)
    pos = torch.arange(T)
    if prompt:
        start = torch.randint(0, max(T // 2, 1), lead, generator=g)
        labels = labels.masked_fill(pos < start[..., None], -100)
    stop = torch.randint(max(T // 2, 1), T + 1, lead, generator=g)
    labels = labels.masked_fill(pos >= stop[..., None], -100)
    if holes:
        labels = labels.masked_fill(torch.rand(*lead, T, generator=g) < 0.1, -100)
    # Every sequence keeps at least one target token (empty ones are tested separately).
    first_free = labels.ne(-100).any(-1)
    fallback = torch.randint(0, V, lead, generator=g)
    labels[..., -1] = torch.where(first_free, labels[..., -1], fallback)
    to = dict(device=device)
    return (hidden.to(dtype).to(**to), weight.to(dtype).to(**to),
            b.to(dtype).to(**to) if b is not None else None, labels.to(**to))


def run(fn, hidden, weight, bias, labels, grad_seq, grad_tok, **kw):
    """Outputs and (hidden, weight, bias) gradients of fn for the upstream gradients given."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    logp, tok = fn(leaves[0], leaves[1], labels, bias=leaves[2], return_token_logps=True, **kw)
    loss = (logp * grad_seq.to(logp.dtype)).sum() + (tok * grad_tok.to(tok.dtype)).sum()
    loss.backward()
    return [logp.detach(), tok.detach()] + [t.grad if t is not None else None for t in leaves]


def assert_close_to_truth(name, ours, lowp, truth, dtype):
    ours, lowp, truth = ours.double(), lowp.double(), truth.double()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours - truth).abs().max().item()
    base = (lowp - truth).abs().max().item()
    bound = 2 * base + TOL[dtype] * max(truth.abs().max().item(), 1.0)
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (torch low-precision error {base:.3g})"


def check_against_truth(hidden, weight, b, labels, gs, gt, dtype, **kw):
    """Outputs and gradients of the op within the low-precision bound of the fp64 truth; returns the truth."""
    ours = run(fused_sequence_likelihood, hidden, weight, b, labels, gs, gt, **kw)
    lowp = run(sequence_likelihood_reference, hidden, weight, b, labels, gs, gt)
    truth = run(sequence_likelihood_reference, hidden.double(), weight.double(), b.double(), labels, gs, gt)
    for name, o, lo, t in zip(["logp", "tok", "dh", "dw", "db"], ours, lowp, truth):
        assert_close_to_truth(name, o, lo, t, dtype)
    return truth
