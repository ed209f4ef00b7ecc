"""Fuzzing the op and the losses with hypothesis: random shapes, masks, banned vocabulary blocks, label and
score dtypes, empty and padding sequences, validation on and off. Each example either raises a clear
``ValueError``/``TypeError`` or matches the fp64 plain-torch computation, values and gradients.

CI runs a fixed, derandomized set of examples (never flaky); ``--hypothesis-seed=random``-style exploration
is one environment variable away: ``MPPO_FUZZ_EXAMPLES=2000 MPPO_FUZZ_RANDOM=1 pytest tests/test_fuzz.py``.
"""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mppo_kernels import fused_sequence_likelihood, sequence_likelihood_reference
from mppo_kernels import sequence_likelihood as sl
from mppo_kernels.losses import LOSSES, preference_loss

IMPLS = sl.available_impls("cuda" if torch.cuda.is_available() else "cpu")
FUZZ = settings(
    max_examples=int(os.environ.get("MPPO_FUZZ_EXAMPLES", "200")),
    derandomize=not os.environ.get("MPPO_FUZZ_RANDOM"),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _op_case(data, device):
    lead = tuple(data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=3), label="lead"))
    T, D, V = data.draw(st.integers(0, 17)), data.draw(st.integers(1, 33)), data.draw(st.integers(1, 140))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    impl = "torch" if dtype == torch.float64 else data.draw(st.sampled_from(IMPLS), label="impl")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, T, D, generator=g, dtype=torch.float64) * data.draw(st.sampled_from([0.1, 1.0, 8.0]))
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    allowed = torch.ones(V, dtype=torch.bool)
    bias = None
    if data.draw(st.booleans(), label="bias"):
        bias = torch.randn(V, generator=g, dtype=torch.float64)
        lo = data.draw(st.integers(0, V - 1), label="ban_start")
        hi = data.draw(st.integers(lo, V - 1), label="ban_stop")  # at least one token stays allowed
        bias[lo:hi] = -math.inf
        allowed[lo:hi] = False
    choices = allowed.nonzero().squeeze(1)
    labels = choices[torch.randint(0, choices.numel(), (*lead, T), generator=g)]
    density = data.draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]), label="density")
    label_dtype = data.draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]), label="labels")
    ignore = 255 if label_dtype == torch.uint8 else -100
    if label_dtype == torch.uint8 and V > 255:
        label_dtype = torch.int16
    labels = labels.masked_fill(torch.rand(*lead, T, generator=g) >= density, ignore)
    if data.draw(st.booleans(), label="out_of_range") and labels.numel() and V < 120:
        labels.view(-1)[0] = V  # one label outside [0, V)
    mask = None
    if data.draw(st.booleans(), label="sequence_mask"):
        mask = torch.rand(*lead, generator=g) < 0.7
    to = dict(device=device)
    return dict(hidden=hidden.to(dtype).to(**to), weight=weight.to(dtype).to(**to),
                bias=None if bias is None else bias.to(dtype).to(**to), labels=labels.to(label_dtype).to(**to),
                ignore=ignore, mask=None if mask is None else mask.to(**to), impl=impl,
                reduction=data.draw(st.sampled_from(["mean", "sum"]), label="reduction"),
                validate=data.draw(st.booleans(), label="validate"), chunk=data.draw(st.integers(1, 64)))


@FUZZ
@given(data=st.data())
def test_op_raises_clearly_or_matches_fp64(device, data):
    c = _op_case(data, device)
    labels, ignore, V = c["labels"], c["ignore"], c["weight"].shape[0]
    valid = labels != ignore
    out_of_range = (valid & (labels.long() >= V)).any().item()
    empty = ~valid.any(-1)
    real_empty = (empty & c["mask"] if c["mask"] is not None else empty).any().item()
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (c["hidden"], c["weight"],
                                                                                      c["bias"])]
    kw = dict(bias=leaves[2], ignore_index=ignore, reduction=c["reduction"], sequence_mask=c["mask"],
              return_token_logps=True)
    if c["validate"] and (out_of_range or real_empty):
        with pytest.raises(ValueError, match="is outside|has no target tokens"):
            fused_sequence_likelihood(leaves[0], leaves[1], labels, impl=c["impl"], vocab_chunk_size=c["chunk"], **kw)
        return
    logp, tok = fused_sequence_likelihood(leaves[0], leaves[1], labels, impl=c["impl"], validate=c["validate"],
                                          vocab_chunk_size=c["chunk"], **kw)
    truth_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    kw.update(bias=truth_leaves[2], validate=False)
    t_logp, t_tok = sequence_likelihood_reference(truth_leaves[0], truth_leaves[1], labels.long(), **{
        **kw, "ignore_index": ignore})
    # A sequence with an out-of-range label is NaN without validation (never a silent number).
    bad_seq = empty | (valid & (labels.long() >= V)).any(-1)
    assert torch.isnan(logp[bad_seq]).all() and torch.isfinite(logp[~bad_seq]).all()
    torch.testing.assert_close(logp[~bad_seq].double(), t_logp[~bad_seq].detach(), rtol=1e-4, atol=1e-4)
    if not logp.numel() or bad_seq.all() or not torch.is_grad_enabled():
        return
    g = torch.Generator().manual_seed(1)
    gs = torch.randn(logp.shape, generator=g).to(device)
    ok = ~bad_seq  # upstream gradients only where the values are defined
    ok_tok = ok[..., None].expand_as(tok)
    for lp, tk, lv in ((logp, tok, leaves), (t_logp, t_tok, truth_leaves)):
        loss = torch.where(ok, lp * gs.to(lp.dtype), 0.0).sum() + torch.where(ok_tok, tk, 0.0).sum()
        loss.backward()
    for name, a, b in zip(("hidden", "weight", "bias"), leaves, truth_leaves):
        if a is not None:
            torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-4, msg=name)


def _loss_case(data):
    B, K = data.draw(st.integers(1, 5), label="B"), data.draw(st.integers(1, 5), label="K")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    g = torch.Generator().manual_seed(seed)
    logps = -(torch.rand(B, K, generator=g, dtype=torch.float64) * 3 + 1e-3)
    ref = (logps + 0.3 * torch.randn(B, K, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    kind = data.draw(st.sampled_from(["int64", "float32", "float64", "huge", "close"]), label="scores")
    if kind == "int64":
        scores = torch.randint(0, 4, (B, K), generator=g) + 2**40
    elif kind == "huge":
        scores = torch.randint(0, 4, (B, K), generator=g).double() * 1e300
    elif kind == "close":
        scores = 1.0 + torch.randint(0, 4, (B, K), generator=g).double() * 1e-12
    else:
        scores = torch.randint(0, 4, (B, K), generator=g).to(getattr(torch, kind))
    mask = torch.rand(B, K, generator=g) < 0.8
    nan = torch.tensor(math.nan, dtype=torch.float64)
    logps, ref = torch.where(mask, logps, nan), torch.where(mask, ref, nan)
    if scores.dtype.is_floating_point and data.draw(st.booleans(), label="nan_score"):
        scores[0, 0] = math.nan
    name = data.draw(st.sampled_from(sorted(LOSSES)), label="loss")
    hp = {"negative": "worst"} if name == "pair_single" else {}
    if name in ("point_ce", "point_mse"):
        hp["score_scale"] = float(scores.double().nan_to_num(0.0).abs().max().clamp_min(1)) * 2
    if name == "kto" and data.draw(st.booleans(), label="kl"):
        hp["kl"] = torch.tensor(data.draw(st.sampled_from([-1.0, 0.0, 0.5, math.nan])))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    return dict(name=name, logps=logps.to(dtype), scores=scores, ref=ref.to(dtype), mask=mask, hp=hp,
                validate=data.draw(st.booleans(), label="validate"))


@FUZZ
@given(data=st.data())
def test_losses_raise_clearly_or_give_finite_loss_and_gradients(data):
    c = _loss_case(data)
    lp = c["logps"].clone().requires_grad_()
    kw = dict(ref_logps=c["ref"], response_mask=c["mask"], validate=c["validate"], **c["hp"])
    if c["validate"]:
        try:
            loss = preference_loss(c["name"], lp, c["scores"], **kw)
        except ValueError as e:  # too few real responses, a NaN score or a bad kl at a real response
            assert "prompt" in str(e) or "scores[" in str(e) or "kl =" in str(e), e
            return
    else:
        loss = preference_loss(c["name"], lp, c["scores"], **kw)
    kl = c["hp"].get("kl")
    if isinstance(kl, torch.Tensor) and math.isnan(kl.item()):  # a NaN estimate without validation: NaN out,
        assert torch.isnan(loss) or loss.item() == 0.0  # unless no prompt carries a preference
        return
    loss.backward()
    assert torch.isfinite(loss), c
    assert torch.isfinite(lp.grad).all() and (lp.grad[~c["mask"]] == 0).all(), c
