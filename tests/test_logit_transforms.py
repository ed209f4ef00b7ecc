"""The head's logit transforms (``logit_scale``, ``softcap``) in every implementation, against the fp64 ground
truth through full logits, values and gradients; logits large enough that tanh saturates; bad values."""

import pytest
import torch

from helpers import IMPLS, TOL, assert_close_to_truth, make_inputs, run
from mppo_kernels import fused_sequence_likelihood, sequence_likelihood_reference
from mppo_kernels.reference import transform_logits

pytestmark = pytest.mark.usefixtures("small_native_tiles")

TRANSFORMS = [  # (logit_scale, softcap): Cohere-like scale, Granite-like 1/scaling, Gemma-2-like cap, both
    (0.0625, None), (1 / 3.0, None), (None, 2.5), (1.7, 4.0)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("logit_scale,softcap", TRANSFORMS)
def test_transforms_match_fp64(device, impl, dtype, logit_scale, softcap):
    hidden, weight, b, labels = make_inputs((2, 3), 23, 40, 137, dtype, device, scale=3.0, seed=7)
    g = torch.Generator().manual_seed(3)
    gs, gt = torch.randn(2, 3, generator=g).to(device), torch.randn(2, 3, 23, generator=g).to(device)
    kw = dict(logit_scale=logit_scale, softcap=softcap)
    ours = run(fused_sequence_likelihood, hidden, weight, b, labels, gs, gt, impl=impl, vocab_chunk_size=48, **kw)
    lowp = run(sequence_likelihood_reference, hidden, weight, b, labels, gs, gt, **kw)
    truth = run(sequence_likelihood_reference, hidden.double(), weight.double(), b.double(), labels, gs, gt, **kw)
    for name, o, lo, t in zip(["logp", "tok", "dh", "dw", "db"], ours, lowp, truth):
        assert_close_to_truth(name, o, lo, t, dtype)
    # the transform changes the answer: this is not the plain head's likelihood
    plain = sequence_likelihood_reference(hidden.double(), weight.double(), labels, bias=b.double())
    assert (plain - truth[0]).abs().max() > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_saturates_without_nan(device, impl):
    """Logits in the hundreds against a cap of 3: tanh saturates to ±1, its derivative underflows to 0."""
    hidden, weight, b, labels = make_inputs((2, 2), 19, 32, 97, torch.float32, device, scale=60.0, seed=1)
    gs, gt = torch.ones(2, 2, device=device), torch.zeros(2, 2, 19, device=device)
    ours = run(fused_sequence_likelihood, hidden, weight, b, labels, gs, gt, impl=impl, softcap=3.0)
    truth = run(sequence_likelihood_reference, hidden.double(), weight.double(), b.double(), labels, gs, gt, softcap=3.0)
    z = transform_logits(torch.nn.functional.linear(hidden.double(), weight.double(), b.double()), softcap=3.0)
    assert (z.abs() > 2.999).float().mean() > 0.3  # a real share of the logits sits on the cap
    for name, o, t in zip(["logp", "tok", "dh", "dw", "db"], ours, truth):
        assert torch.isfinite(o).all(), name
        torch.testing.assert_close(o.double(), t, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_default_is_the_plain_head(device, impl):
    hidden, weight, b, labels = make_inputs((2, 3), 11, 16, 53, torch.float32, device)
    plain = fused_sequence_likelihood(hidden, weight, labels, bias=b, impl=impl)
    same = fused_sequence_likelihood(hidden, weight, labels, bias=b, impl=impl, logit_scale=1.0)
    torch.testing.assert_close(plain, same, rtol=0, atol=0)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(softcap=0.0), ValueError, "softcap must be finite and > 0"),
    (dict(softcap=-30.0), ValueError, "softcap must be finite and > 0"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale must be finite and > 0"),
    (dict(logit_scale=float("inf")), ValueError, "logit_scale must be finite and > 0"),
    (dict(logit_scale=0), ValueError, "logit_scale must be finite and > 0"),
    (dict(softcap=True), TypeError, "softcap must be a number or None"),
    (dict(logit_scale=torch.tensor(2.0)), TypeError, "logit_scale must be a number or None"),
])
def test_bad_transform_values_name_the_argument(kw, exc, msg):
    hidden, weight, _, labels = make_inputs((2,), 9, 16, 31, torch.float32, "cpu", bias=False)
    with pytest.raises(exc, match=msg):
        fused_sequence_likelihood(hidden, weight, labels, **kw)
    with pytest.raises(exc, match=msg):
        fused_sequence_likelihood(hidden, weight, labels, validate=False, **kw)  # no data to read: always checked
    with pytest.raises(exc, match=msg):
        sequence_likelihood_reference(hidden, weight, labels, **kw)
