"""fused_preference_loss / FusedPreferenceLoss end to end: loss, metrics and (hidden, weight, bias) gradients
equal those of the plain-torch path (reference log-likelihoods through full logits + preference_loss), for
every loss, through the Triton kernels (the interpreter on CPU) and the chunked torch path."""

import pytest
import torch

import mppo_kernels
from mppo_kernels import FusedPreferenceLoss, fused_preference_loss, sequence_likelihood_reference
from mppo_kernels import sequence_likelihood as sl
from mppo_kernels.losses import LOSSES, preference_loss_and_metrics

NAMES = sorted(LOSSES)
IMPLS = sl.available_impls("cuda" if torch.cuda.is_available() else "cpu")


def make_inputs(device, *, B=3, K=4, T=9, D=24, V=53, dtype=torch.float32, seed=0):
    """Ragged groups: prompt 1's last response is padding with no target tokens (its logp is NaN); prompt 1
    has a tie for best, prompt 2 all-equal scores (no preference)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, K, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D**0.5 * 2
    bias = torch.randn(V, generator=g) * 0.5
    ref_weight = weight + 0.1 * torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (B, K, T), generator=g)
    prompt_len = torch.randint(1, T // 2, (B, K), generator=g)
    labels = labels.masked_fill(torch.arange(T) < prompt_len[..., None], -100)
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[1, K - 1] = False
    labels[1, K - 1] = -100
    scores = torch.tensor([[2.0, 7.0, 4.0, 9.0], [8.0, 3.0, 8.0, 0.0], [5.0, 5.0, 5.0, 5.0]])[:B, :K]
    to = dict(device=device)
    return (hidden.to(dtype).to(**to), weight.to(dtype).to(**to), bias.to(dtype).to(**to),
            ref_weight.to(dtype).to(**to), labels.to(**to), scores.to(**to), mask.to(**to))


def reference_logps(hidden, ref_weight, labels, mask, name):
    with torch.no_grad():
        return sequence_likelihood_reference(hidden, ref_weight, labels, reduction=LOSSES[name].reduction,
                                             sequence_mask=mask)


def _hparams(name):
    return {"generator": torch.Generator().manual_seed(7)} if name == "pair_single" else {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", NAMES)
def test_fused_matches_reference_path(device, impl, name):
    hidden, weight, bias, ref_weight, labels, scores, mask = make_inputs(device)
    ref = reference_logps(hidden, ref_weight, labels, mask, name) if LOSSES[name].needs_reference else None
    assert ref is None or torch.isnan(ref[1, -1])  # the padding response reaches the loss as NaN

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, metrics = fused_preference_loss(name, leaves[0], leaves[1], labels, scores, bias=leaves[2], ref_logps=ref,
                                          response_mask=mask, impl=impl, **_hparams(name))
    loss.backward()

    plain = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logps = sequence_likelihood_reference(plain[0], plain[1], labels, bias=plain[2], sequence_mask=mask,
                                          reduction=LOSSES[name].reduction)
    want, want_metrics = preference_loss_and_metrics(name, logps, scores, ref_logps=ref, response_mask=mask,
                                                     token_counts=(labels != -100).sum(-1), **_hparams(name))
    want.backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert metrics.keys() == want_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=key: f"{k}: {m}")
    for what, ours, truth in zip(("hidden", "weight", "bias"), leaves, plain):
        assert torch.isfinite(ours.grad).all(), what
        scale = truth.grad.abs().max().item()
        assert scale > 0, f"{what}: the loss has no gradient"
        torch.testing.assert_close(ours.grad, truth.grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, w=what: f"{w}: {m}")
    # The padding response and the ignored positions get exactly zero gradient.
    assert (leaves[0].grad[1, -1] == 0).all() and (leaves[0].grad[labels == -100] == 0).all()


def test_module_matches_function(device):
    hidden, weight, bias, ref_weight, labels, scores, mask = make_inputs(device, seed=1)
    ref = reference_logps(hidden, ref_weight, labels, mask, "mmpo")
    module = FusedPreferenceLoss("mmpo", beta=0.05, gamma=1.0)
    assert (module.reduction, module.needs_reference) == ("sum", True)
    assert "mmpo" in repr(module) and "gamma=1.0" in repr(module)
    a, ma = module(hidden, weight, labels, scores, bias=bias, ref_logps=ref, response_mask=mask)
    b, mb = fused_preference_loss("mmpo", hidden, weight, labels, scores, bias=bias, ref_logps=ref,
                                  response_mask=mask, beta=0.05, gamma=1.0)
    assert torch.equal(a, b) and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert not torch.equal(a, fused_preference_loss("mmpo", hidden, weight, labels, scores, bias=bias, ref_logps=ref,
                                                    response_mask=mask)[0])  # the hyperparameters were used
    assert mppo_kernels.FusedPreferenceLoss is FusedPreferenceLoss


def test_call_styles_of_benchmarks_and_training(device):
    """Benchmarks: name + tensors (+ beta/gamma for SimPO), no mask. Training: every default hparam passed."""
    hidden, weight, bias, ref_weight, labels, scores, mask = make_inputs(device, seed=2)
    labels[1, -1] = 7  # every response real
    loss, metrics = fused_preference_loss("simpo", hidden, weight, labels, scores, beta=2.0, gamma=1.0)
    assert torch.isfinite(loss) and metrics["rewards/chosen"].dim() == 0
    for name in NAMES:
        ref = reference_logps(hidden, ref_weight, labels, mask, name) if LOSSES[name].needs_reference else None
        loss, _ = fused_preference_loss(name, hidden, weight, labels, scores, bias=bias, ref_logps=ref,
                                        response_mask=mask, validate=False, **dict(LOSSES[name].defaults))
        assert torch.isfinite(loss), name


def test_bf16_inputs_give_fp32_loss_and_bf16_gradients(device):
    hidden, weight, bias, _, labels, scores, mask = make_inputs(device, dtype=torch.bfloat16, seed=3)
    h = hidden.clone().requires_grad_()
    loss, metrics = fused_preference_loss("pair_mnm", h, weight, labels, scores, bias=bias, response_mask=mask)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and torch.isfinite(h.grad.float()).all()
    assert all(v.dtype == torch.float32 for v in metrics.values())


def test_fused_errors_name_the_argument(device):
    hidden, weight, bias, _, labels, scores, mask = make_inputs(device, seed=4)
    with pytest.raises(ValueError, match="dpo needs ref_logps"):
        fused_preference_loss("dpo", hidden, weight, labels, scores, response_mask=mask)
    with pytest.raises(ValueError, match=r"hidden must be a \[B, K, T, D\] tensor, got shape \(3, 4, 9\)"):
        fused_preference_loss("pair_mnm", hidden[..., 0], weight, labels, scores)
    with pytest.raises(ValueError, match=r"labels must be \[B, K, T\] = \(3, 4, 9\)"):
        fused_preference_loss("pair_mnm", hidden, weight, labels[..., :5], scores)
    with pytest.raises(ValueError, match=r"scores shape \(3, 3\) must equal"):
        fused_preference_loss("pair_mnm", hidden, weight, labels, scores[:, :3])
    with pytest.raises(ValueError, match="unknown loss 'dpo2'"):
        FusedPreferenceLoss("dpo2")
    with pytest.raises(TypeError, match="simpo got unknown hyperparameter.*lam"):
        FusedPreferenceLoss("simpo", lam=0.1)
    with pytest.raises(ValueError, match=r"sequence \[1, 3\] has no target tokens"):
        fused_preference_loss("pair_mnm", hidden, weight, labels, scores)  # the empty response is not marked
    bad = scores.clone()
    bad[0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"scores\[0, 2\] = nan at a real response"):
        fused_preference_loss("pair_mnm", hidden, weight, labels, bad, response_mask=mask)
