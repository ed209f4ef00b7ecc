"""Every preference loss against a loop-based fp64 implementation written straight from its formula, plus
identities between losses, fp64 gradcheck, tie and padding behaviour, metrics and input errors."""

import decimal
import math

import pytest
import torch

import mppo_kernels
from mppo_kernels.losses import LOSSES, log1mexp, preference_loss, preference_loss_and_metrics, preference_metrics

NAMES = sorted(LOSSES)
POINT = ("point_ce", "point_mse")
PREF_NAMES = [n for n in NAMES if n not in POINT]
REF_NAMES = ("dpo", "kto", "mmpo", "multi_dpo")


# ------------------------------------------------------------------------------------------------ fixtures


def make_batch(B=5, K=4, seed=0, *, ties=True, ragged=True, ref_offset=0.0, dtype=torch.float64):
    """Random ``[B, K]`` logps, scores, ref_logps and mask; padded entries are NaN.

    Prompt 0 has all real scores equal (no preference) when ``ties``; every prompt has >= 2 real responses.
    """
    g = torch.Generator().manual_seed(seed)
    logps = -(torch.rand(B, K, generator=g, dtype=torch.float64) * 2.5 + 0.05)
    ref = (logps + 0.3 * torch.randn(B, K, generator=g, dtype=torch.float64) - ref_offset).clamp(max=-0.01)
    if ties:
        scores = torch.randint(1, 5, (B, K), generator=g).double()
        scores[0] = 3.0
    else:
        scores = torch.stack([torch.randperm(K, generator=g) for _ in range(B)]).double() + 1.0
    mask = torch.ones(B, K, dtype=torch.bool)
    if ragged:
        for b in range(1, B):
            n = int(torch.randint(2, K + 1, (1,), generator=g))
            mask[b, torch.randperm(K, generator=g)[n:]] = False
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    logps, ref, scores = (torch.where(mask, t, nan) for t in (logps, ref, scores))
    return logps.to(dtype), scores, ref.to(dtype), mask


def logsig(x):
    return -torch.log1p(torch.exp(-x))


def loop_loss(name, logps, scores, ref, mask, **hparams):
    """The loss from its formula: python loops over prompts, responses and pairs of fp64 scalars."""
    hp = {**LOSSES[name].defaults, **hparams}
    B, K = logps.shape
    z = None
    if name == "kto":
        ratios = [logps[b, k] - ref[b, k] for b in range(B) for k in range(K) if mask[b, k]]
        z = hp["kl"] if hp["kl"] is not None else max(float(sum(ratios).detach() / len(ratios)), 0.0)
    total, counted = 0.0, 0
    for b in range(B):
        real = [k for k in range(K) if mask[b, k]]
        s = {k: float(scores[b, k]) for k in real}
        lp = {k: logps[b, k] for k in real}
        p = {k: torch.exp(lp[k]) for k in real}
        if name in POINT:
            terms = []
            for k in real:
                t = s[k] / hp["score_scale"]
                if name == "point_ce":
                    terms.append(-(t * lp[k] + (1 - t) * torch.log(1 - p[k])))
                else:
                    terms.append((t - p[k]) ** 2)
            total, counted = total + sum(terms) / len(terms), counted + 1
            continue
        top, bottom = max(s.values()), min(s.values())
        if top == bottom:
            continue  # no preference
        w = min(k for k in real if s[k] == top)
        l = min(k for k in real if s[k] == bottom)
        negs = [k for k in real if s[k] < top]
        pairs = [(i, j) for i in real for j in real if s[i] > s[j]]
        h = {k: hp.get("beta", 1.0) * (lp[k] - ref[b, k]) for k in real} if name in REF_NAMES else None
        if name == "pair_single":
            assert hp["negative"] == "worst"
            loss = -logsig(p[w] - p[l])
        elif name == "pair_mns":
            loss = sum(-logsig(p[w] - p[j]) for j in negs)
        elif name == "pair_mnm":
            loss = -logsig(len(negs) * p[w] - sum(p[j] for j in negs))
        elif name == "pair_mcs":
            loss = sum(-logsig(p[i] - p[j]) for i, j in pairs)
        elif name == "pair_mcm":
            loss = -logsig(sum(p[i] - p[j] for i, j in pairs))
        elif name == "list_mle":
            loss = 0.0
            for i in real:
                denom = sum(torch.exp(p[j]) for j in real if j == i or s[j] < s[i])
                loss = loss - (p[i] - torch.log(denom))
        elif name == "dpo":
            loss = -logsig(h[w] - h[l])
        elif name == "multi_dpo":
            weights = [1.0 if hp["weighting"] == "uniform" else s[i] - s[j] for i, j in pairs]
            loss = sum(wt * -logsig(h[i] - h[j]) for wt, (i, j) in zip(weights, pairs)) / sum(weights)
        elif name == "simpo":
            loss = -logsig(hp["beta"] * (lp[w] - lp[l]) - hp["gamma"])
        elif name == "orpo":
            odds = lambda k: lp[k] - torch.log(1 - p[k])  # noqa: E731
            loss = -lp[w] - hp["lam"] * logsig(odds(w) - odds(l))
        elif name == "kto":
            r_w, r_l = lp[w] - ref[b, w], lp[l] - ref[b, l]
            want = hp["desirable_weight"] * (1 - torch.sigmoid(hp["beta"] * (r_w - z)))
            avoid = hp["undesirable_weight"] * (1 - torch.sigmoid(hp["beta"] * (z - r_l)))
            loss = (want + avoid) / 2
        elif name == "mmpo":
            q = 1 / (1 + math.exp(-hp["gamma"] * (s[w] - s[l])))
            loss = -q * logsig(h[w] - h[l]) - (1 - q) * logsig(h[l] - h[w])
        else:
            raise AssertionError(name)
        total, counted = total + loss, counted + 1
    return total / counted


# Default hyperparameters plus a non-default setting of each loss.
CASES = [(n, {}) for n in NAMES if n != "pair_single"] + [
    ("pair_single", {"negative": "worst"}),
    ("point_ce", {"score_scale": 5.0}),
    ("point_mse", {"score_scale": 4.0}),
    ("dpo", {"beta": 0.5}),
    ("simpo", {"beta": 2.5, "gamma": 0.5}),
    ("orpo", {"lam": 0.3}),
    ("kto", {"kl": 0.7, "beta": 0.3, "desirable_weight": 1.5, "undesirable_weight": 0.5}),
    ("mmpo", {"beta": 0.2, "gamma": 1.0}),
    ("multi_dpo", {"weighting": "margin", "beta": 0.3}),
]


def case_id(case):
    name, hp = case
    return name + "".join(f"-{k}={v}" for k, v in hp.items())


# ------------------------------------------------------------------------------------------------ registry


def test_registry_declares_reduction_reference_and_defaults():
    expected = {  # name: (reduction, needs_reference, defaults)
        "point_ce": ("mean", False, {"score_scale": 10.0}),
        "point_mse": ("mean", False, {"score_scale": 10.0}),
        "pair_single": ("mean", False, {"negative": "random", "generator": None}),
        "pair_mns": ("mean", False, {}),
        "pair_mnm": ("mean", False, {}),
        "pair_mcs": ("mean", False, {}),
        "pair_mcm": ("mean", False, {}),
        "list_mle": ("mean", False, {}),
        "dpo": ("sum", True, {"beta": 0.1}),
        "simpo": ("mean", False, {"beta": 2.0, "gamma": 1.0}),
        "orpo": ("mean", False, {"lam": 0.1}),
        "kto": ("sum", True, {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0, "kl": None}),
        "mmpo": ("sum", True, {"beta": 0.01, "gamma": 2.2}),
        "multi_dpo": ("sum", True, {"beta": 0.1, "weighting": "uniform"}),
    }
    assert sorted(expected) == NAMES
    for name, (reduction, needs_ref, defaults) in expected.items():
        spec = LOSSES[name]
        declared = (spec.name, spec.reduction, spec.needs_reference, dict(spec.defaults))
        assert declared == (name, reduction, needs_ref, defaults)
        assert callable(spec.fn)
    assert mppo_kernels.preference_loss is preference_loss and mppo_kernels.LOSSES is LOSSES


# ------------------------------------------------------------------------------------- against the formula


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_loop_reference(case, seed):
    name, hp = case
    logps, scores, ref, mask = make_batch(B=6, K=5, seed=seed, ref_offset=0.4 * seed)
    leaves = [logps.clone().requires_grad_(), ref.clone().requires_grad_()]
    ours = preference_loss(name, leaves[0], scores, ref_logps=leaves[1], response_mask=mask, **hp)
    g_ours = torch.autograd.grad(ours, leaves, allow_unused=True)
    leaves2 = [logps.clone().requires_grad_(), ref.clone().requires_grad_()]
    truth = loop_loss(name, leaves2[0], scores, leaves2[1], mask, **hp)
    g_truth = torch.autograd.grad(truth, leaves2, allow_unused=True)
    assert ours.dtype == torch.float64 and ours.dim() == 0
    torch.testing.assert_close(ours, truth.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(g_ours, g_truth):
        a = torch.zeros_like(logps) if a is None else a
        b = torch.zeros_like(logps) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_kto_batch_kl_estimate_is_used_and_clamped():
    """z > 0 (policy ahead of the reference) moves the loss; z < 0 is clamped to 0 (= passing kl=0)."""
    logps, scores, ref, mask = make_batch(seed=3, ref_offset=1.0)  # mean log-ratio about +1
    # With λ_D = λ_U the first-order effect of z cancels between the two terms; unequal weights expose it.
    kw = dict(ref_logps=ref, response_mask=mask, beta=1.0, undesirable_weight=2.0)
    ahead = preference_loss("kto", logps, scores, **kw)
    assert (ahead - preference_loss("kto", logps, scores, kl=0.0, **kw)).abs() > 1e-2
    _, metrics = preference_loss_and_metrics("kto", logps, scores, ref_logps=ref, response_mask=mask)
    ratio = (logps - ref)[mask].mean()
    torch.testing.assert_close(metrics["kl"], ratio.float())
    behind = preference_loss("kto", logps - 3.0, scores, **kw)  # mean log-ratio about -2: z = 0
    torch.testing.assert_close(behind, preference_loss("kto", logps - 3.0, scores, kl=0.0, **kw), rtol=0, atol=0)


def test_list_mle_without_ties_is_the_sorted_formula():
    logps, scores, _, _ = make_batch(B=4, K=5, seed=7, ties=False, ragged=False)
    p = logps.exp()
    total = 0.0
    for b in range(4):
        order = sorted(range(5), key=lambda k: -scores[b, k])
        for i in range(5):
            rest = torch.stack([p[b, j] for j in order[i:]])
            total += -(p[b, order[i]] - torch.logsumexp(rest, 0))
    torch.testing.assert_close(preference_loss("list_mle", logps, scores), total / 4, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------ identities


def test_pair_losses_and_list_mle_agree_at_k2():
    logps, scores, _, _ = make_batch(B=6, K=2, seed=11, ties=False, ragged=False)
    p = logps.exp()
    w = scores.argmax(-1, keepdim=True)
    l = 1 - w
    expected = -torch.nn.functional.logsigmoid(p.gather(1, w) - p.gather(1, l)).mean()
    for name, hp in [("pair_single", {}), ("pair_single", {"negative": "worst"}), ("pair_mns", {}),
                     ("pair_mnm", {}), ("pair_mcs", {}), ("pair_mcm", {}), ("list_mle", {})]:
        torch.testing.assert_close(preference_loss(name, logps, scores, **hp), expected, rtol=1e-12, atol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("weighting", ["uniform", "margin"])
def test_multi_dpo_equals_dpo_with_two_real_responses(weighting):
    logps, scores, ref, _ = make_batch(B=6, K=2, seed=12, ties=False, ragged=False)
    for beta in (0.1, 0.7):
        torch.testing.assert_close(
            preference_loss("multi_dpo", logps, scores, ref_logps=ref, beta=beta, weighting=weighting),
            preference_loss("dpo", logps, scores, ref_logps=ref, beta=beta), rtol=1e-12, atol=0)
    # Ragged K = 4 groups with two real responses each behave as K = 2.
    logps4, scores4, ref4, _ = make_batch(B=6, K=4, seed=13, ties=False, ragged=False)
    mask = torch.zeros(6, 4, dtype=torch.bool)
    mask[:, 1] = mask[:, 3] = True
    torch.testing.assert_close(
        preference_loss("multi_dpo", logps4, scores4, ref_logps=ref4, response_mask=mask, weighting=weighting),
        preference_loss("dpo", logps4, scores4, ref_logps=ref4, response_mask=mask), rtol=1e-12, atol=0)


def test_mmpo_approaches_dpo_as_gamma_grows():
    logps, scores, ref, mask = make_batch(seed=14)
    for b in range(1, 5):  # prompt by prompt: mmpo - dpo = (1 - q)·Δ, whose sign varies across prompts
        batch = dict(ref_logps=ref[b:b + 1], response_mask=mask[b:b + 1], beta=0.3)
        dpo = preference_loss("dpo", logps[b:b + 1], scores[b:b + 1], **batch)
        gaps = [(preference_loss("mmpo", logps[b:b + 1], scores[b:b + 1], gamma=gamma, **batch) - dpo).abs().item()
                for gamma in (0.5, 2.0, 8.0, 40.0)]
        assert all(x > y for x, y in zip(gaps[:3], gaps[1:3])) and gaps[0] > 1e-4, (b, gaps)
        assert gaps[-1] < 1e-15, (b, gaps)  # integer scores: margins >= 1, and σ(40) = 1 in fp64


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("case", CASES + [("pair_single", {})], ids=case_id)
def test_gradcheck_fp64(case):
    name, hp = case
    logps, scores, ref, mask = make_batch(B=3, K=4, seed=5, ref_offset=-0.5)  # KTO: z clamped to 0, exactly
    spec = LOSSES[name]

    def fn(lp, rf):
        extra = {"generator": torch.Generator().manual_seed(0)} if name == "pair_single" else {}
        return preference_loss(name, lp, scores, ref_logps=rf, response_mask=mask, validate=False, **hp, **extra)

    inputs = (logps.clone().requires_grad_(), ref.clone().requires_grad_(spec.needs_reference))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("name", NAMES)
def test_padding_never_leaks(name):
    """NaN (or any value) at padded logps, scores and ref_logps changes neither the loss nor any gradient."""
    logps, scores, ref, mask = make_batch(seed=21, dtype=torch.float32)
    out = []
    for fill in (float("nan"), 123.0):
        lp = torch.where(mask, logps, fill).requires_grad_()
        rf = torch.where(mask, ref, fill).requires_grad_()
        s = torch.where(mask, scores, fill)
        gen = {"generator": torch.Generator().manual_seed(0)} if name == "pair_single" else {}
        loss = preference_loss(name, lp, s, ref_logps=rf, response_mask=mask, validate=False, **gen)
        loss.backward()
        rf_grad = rf.grad if rf.grad is not None else torch.zeros_like(rf)  # losses without a reference
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and torch.isfinite(rf_grad).all()
        assert (lp.grad[~mask] == 0).all() and (rf_grad[~mask] == 0).all()
        assert (rf.grad is not None) == LOSSES[name].needs_reference
        out.append((loss.detach(), lp.grad, rf_grad))
    for a, b in zip(*out):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------- ties


def test_first_tied_best_is_chosen_and_other_tied_best_is_no_negative():
    logps = torch.tensor([[-1.0, -0.5, -0.8, -2.0]], dtype=torch.float64, requires_grad=True)
    scores = torch.tensor([[3.0, 5.0, 5.0, 1.0]], dtype=torch.float64)
    ref = torch.full_like(logps, -1.0)
    p = logps.detach().exp()
    ls = torch.nn.functional.logsigmoid
    expected = {  # best = response 1 (first of the tied 1, 2), worst = 3, response 2 is never a negative
        "pair_mns": -ls(p[0, 1] - p[0, 0]) - ls(p[0, 1] - p[0, 3]),
        "pair_mnm": -ls(2 * p[0, 1] - p[0, 0] - p[0, 3]),
        "pair_single": -ls(p[0, 1] - p[0, 3]),
        "dpo": -ls(0.1 * (logps[0, 1] - logps[0, 3])).detach(),
    }
    for name, value in expected.items():
        hp = {"negative": "worst"} if name == "pair_single" else {}
        loss = preference_loss(name, logps, scores, ref_logps=ref, **hp)
        (grad,) = torch.autograd.grad(loss, logps)
        torch.testing.assert_close(loss.detach(), value, rtol=1e-12, atol=0)
        assert grad[0, 2] == 0 and grad[0, 1] < 0, (name, grad)
    # Pairs inside the tie carry no preference: Pair-MCS has the 4 pairs across score levels, not 5.
    pairs = [(1, 0), (2, 0), (1, 3), (2, 3), (0, 3)]
    torch.testing.assert_close(preference_loss("pair_mcs", logps, scores).detach(),
                               sum(-ls(p[0, i] - p[0, j]) for i, j in pairs), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_all_equal_group_is_left_out_of_preference_losses(name):
    logps, scores, ref, mask = make_batch(seed=31)  # prompt 0 has all-equal scores
    hp = {"negative": "worst"} if name == "pair_single" else {}  # random draws depend on B
    full = preference_loss(name, logps, scores, ref_logps=ref, response_mask=mask, **hp)
    rest = preference_loss(name, logps[1:], scores[1:], ref_logps=ref[1:], response_mask=mask[1:], **hp)
    if name in POINT:  # point-wise losses need no preference: prompt 0 counts
        expected = (loop_loss(name, logps[:1], scores[:1], ref[:1], mask[:1]) + 4 * rest) / 5
        torch.testing.assert_close(full, expected, rtol=1e-12, atol=0)
    elif name == "kto":  # the batch KL baseline still averages over prompt 0's responses
        torch.testing.assert_close(full, loop_loss(name, logps, scores, ref, mask), rtol=1e-12, atol=0)
    else:
        torch.testing.assert_close(full, rest, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", PREF_NAMES)
def test_batch_without_any_preference_gives_zero_loss_with_a_graph(name):
    logps = (-torch.rand(3, 4) - 0.1).requires_grad_()
    scores = torch.full((3, 4), 7.0)
    ref = torch.full((3, 4), -1.0)
    loss = preference_loss(name, logps, scores, ref_logps=ref)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logps.grad, torch.zeros_like(logps))
    # Equal-score pairs at K = 2 are the same case.
    assert preference_loss(name, logps[:, :2], scores[:, :2], ref_logps=ref[:, :2]).item() == 0.0


@pytest.mark.parametrize("name", PREF_NAMES)
def test_scores_are_ranked_in_their_own_dtype(name):
    """int64 scores 2**24 + 1 vs 2**24 and fp64 scores 1e-9 apart are different in their own dtype; cast to
    the fp32 log-likelihoods' dtype first they would tie, and the prompt would carry no preference (loss 0)."""
    logps = torch.tensor([[-1.0, -2.0, -1.5]])
    ref = torch.tensor([[-1.2, -1.8, -1.5]])
    hp = {"negative": "worst"} if name == "pair_single" else {}
    expected = preference_loss(name, logps, torch.tensor([[2.0, 1.0, 0.0]]), ref_logps=ref, **hp)
    for scores in (torch.tensor([[2**24 + 2, 2**24 + 1, 2**24]]),
                   torch.tensor([[1.0 + 2e-9, 1.0 + 1e-9, 1.0]], dtype=torch.float64)):
        got = preference_loss(name, logps, scores, ref_logps=ref, **hp)
        assert got.item() > 0, scores
        if name != "mmpo":  # only the order counts; MMPO's soft target depends on the gap itself
            torch.testing.assert_close(got, expected)


def test_mmpo_and_margin_weights_use_the_exact_score_gap():
    logps, ref = torch.tensor([[-1.0, -2.0, -1.5]]), torch.tensor([[-1.2, -1.8, -1.5]])
    huge = torch.tensor([[3e300, 2e300, 1e300]], dtype=torch.float64)  # overflows fp32
    for name, hp in (("mmpo", {}), ("multi_dpo", {"weighting": "margin"})):
        loss = preference_loss(name, logps, huge, ref_logps=ref, **hp)
        same_ratios = preference_loss(name, logps, torch.tensor([[3.0, 2.0, 1.0]]), ref_logps=ref, **hp)
        assert torch.isfinite(loss)
        if name == "multi_dpo":  # the weights are normalized: scaling every gap changes nothing
            torch.testing.assert_close(loss, same_ratios)
    # q = σ(γ·gap) with a gap of 1e-9 in fp64 scores: 0.5 + γ·gap/4, not exactly 0.5
    tiny = preference_loss("mmpo", logps[:, :2].double(), torch.tensor([[1.0 + 1e-9, 1.0]], dtype=torch.float64),
                           ref_logps=ref[:, :2].double())
    tie_q = preference_loss("mmpo", logps[:, :2].double(), torch.tensor([[1.0 + 1e-15, 1.0]], dtype=torch.float64),
                            ref_logps=ref[:, :2].double())
    assert tiny != tie_q


def test_kto_tensor_kl_is_checked_and_clamped_like_a_number():
    logps, scores, ref, mask = make_batch(seed=3, dtype=torch.float32)
    kw = dict(ref_logps=ref, response_mask=mask)
    for bad in (torch.tensor(-5.0), torch.tensor(float("nan")), torch.tensor(float("inf"))):
        _err(ValueError, "kto hyperparameter kl = .* must be finite and >= 0", "kto", logps, scores, kl=bad, **kw)
    _err(ValueError, "kl must be finite and >= 0", "kto", logps, scores, kl=-5.0, **kw)
    # Without validation a negative estimate is clamped at 0, exactly as the batch estimate is.
    clamped = preference_loss("kto", logps, scores, kl=torch.tensor(-5.0), validate=False, **kw)
    torch.testing.assert_close(clamped, preference_loss("kto", logps, scores, kl=0.0, **kw), rtol=0, atol=0)
    torch.testing.assert_close(preference_loss("kto", logps, scores, kl=torch.tensor(0.7), **kw),
                               preference_loss("kto", logps, scores, kl=0.7, **kw))


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_score_without_validation_leaves_the_response_out(name):
    """validate=False cannot raise on a NaN score at a real response; the response is then left out exactly as
    padding is, so neither the loss nor any gradient is NaN (MMPO used to give a finite loss, NaN gradient)."""
    logps, scores, ref, mask = make_batch(B=4, K=4, seed=91, dtype=torch.float32, ragged=False, ties=False)
    gen = (lambda: {"generator": torch.Generator().manual_seed(0)}) if name == "pair_single" else dict
    for bad in (float("nan"), float("inf"), -float("inf")):
        s = scores.clone()
        s[1, 0] = bad
        lp = logps.clone().requires_grad_()
        loss = preference_loss(name, lp, s, ref_logps=ref, response_mask=mask, validate=False, **gen())
        loss.backward()
        out = mask.clone()
        out[1, 0] = False
        lp2 = logps.clone().requires_grad_()
        expected = preference_loss(name, lp2, scores, ref_logps=ref, response_mask=out, validate=False, **gen())
        expected.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all(), (name, bad)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(lp.grad, lp2.grad)


# ---------------------------------------------------------------------------------------------- Pair-Single


def _single_negatives(logps, scores, mask, **hp):
    """The negative each prompt used, recovered from which logps get a gradient (-1: no pair)."""
    lp = logps.clone().requires_grad_()
    preference_loss("pair_single", lp, scores, response_mask=mask, **hp).backward()
    pushed_down = lp.grad > 0
    return torch.where(pushed_down.any(-1), pushed_down.float().argmax(-1), -1)


def test_pair_single_random_negative_is_reproducible_and_valid():
    logps, scores, _, mask = make_batch(B=8, K=5, seed=41)
    draws = [_single_negatives(logps, scores, mask, generator=torch.Generator().manual_seed(s)) for s in range(40)]
    again = _single_negatives(logps, scores, mask, generator=torch.Generator().manual_seed(3))
    assert torch.equal(draws[3], again)
    best = torch.where(mask, scores, -math.inf).max(-1).values
    for b in range(8):
        allowed = {k for k in range(5) if mask[b, k] and scores[b, k] < best[b]} or {-1}  # -1: no preference
        seen = {int(d[b]) for d in draws}
        assert seen == allowed, (b, seen, allowed)  # only negatives, and every one of them in 40 draws
    torch.manual_seed(123)
    a = preference_loss("pair_single", logps, scores, response_mask=mask)
    torch.manual_seed(123)
    b = preference_loss("pair_single", logps, scores, response_mask=mask)
    assert torch.equal(a, b)


def test_pair_single_worst_is_deterministic_and_draws_nothing():
    logps, scores, _, mask = make_batch(B=8, K=5, seed=42)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    neg = _single_negatives(logps, scores, mask, negative="worst")
    assert torch.equal(torch.get_rng_state(), before)
    worst = torch.where(mask, scores, math.inf).argmin(-1)
    has_pref = neg >= 0
    assert has_pref.sum() >= 5 and torch.equal(neg[has_pref], worst[has_pref])


# ------------------------------------------------------------------------------------------------ point-wise


def test_log1mexp_is_accurate_and_point_ce_stays_finite_near_p_1():
    x = torch.tensor([-1e-12, -1e-7, -1e-3, -0.5, -math.log(2), -0.7, -5.0, -40.0], dtype=torch.float64)
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        truth = torch.tensor([float((1 - decimal.Decimal(v).exp()).ln()) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), truth, rtol=1e-14, atol=0)
    torch.testing.assert_close(log1mexp(x.float()[2:]), truth.float()[2:], rtol=1e-6, atol=0)
    # fp32 log p of -1e-9: the naive form rounds 1 - p to 0; ours is finite with a finite gradient.
    lp = torch.tensor([[-1e-9, -0.3]], requires_grad=True)
    assert torch.isinf(torch.log(1 - torch.exp(lp.detach()))).any()
    loss = preference_loss("point_ce", lp, torch.tensor([[5.0, 9.0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()


def test_point_mse_is_minimized_at_p_equal_target():
    scores = torch.tensor([[2.0, 7.0, 9.5]], dtype=torch.float64)
    lp = (scores / 10).log().requires_grad_()
    loss = preference_loss("point_mse", lp, scores)
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(0.0, abs=1e-30) and torch.all(grad.abs() < 1e-15)
    lower = preference_loss("point_mse", lp.detach() - 0.1, scores)
    assert lower.item() > 0  # moving p away from s costs


# --------------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("name", NAMES)
def test_metrics_are_detached_scalars(name):
    logps, scores, ref, mask = make_batch(seed=51, dtype=torch.float32)
    lp = logps.clone().requires_grad_()
    counts = torch.randint(3, 9, logps.shape)
    gen = lambda: {"generator": torch.Generator().manual_seed(0)} if name == "pair_single" else {}  # noqa: E731
    loss, m = preference_loss_and_metrics(name, lp, scores, ref_logps=ref, response_mask=mask, token_counts=counts,
                                          **gen())
    required = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "reward_top_accuracy", "mean_p"}
    assert required <= set(m)
    for key, v in m.items():
        assert v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad and torch.isfinite(v), key
    torch.testing.assert_close(loss, preference_loss(name, lp, scores, ref_logps=ref, response_mask=mask, **gen()))
    torch.testing.assert_close(m["rewards/margins"], m["rewards/chosen"] - m["rewards/rejected"])
    assert 0 <= m["rewards/accuracies"] <= 1 and 0 <= m["reward_top_accuracy"] <= 1 and 0 < m["mean_p"] <= 1


def test_metric_values_for_dpo_and_pair_mnm():
    logps = torch.tensor([[-3.0, -5.0, -4.0], [-6.0, -2.0, -9.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-4.0, -4.0, -4.0], [-5.0, -5.0, -5.0], [-1.0, -2.0, -3.0]])
    scores = torch.tensor([[9.0, 1.0, 5.0], [8.0, 2.0, 3.0], [4.0, 4.0, 4.0]])  # prompt 2: no preference
    counts = torch.tensor([[3, 5, 2], [2, 4, 6], [1, 1, 1]])
    m = preference_metrics("dpo", logps, scores, ref_logps=ref, token_counts=counts, beta=0.5)
    # prompt 0: chosen 0 (h=0.5), rejected 1 (h=-0.5); prompt 1: chosen 0 (h=-0.5), rejected 1 (h=1.5)
    torch.testing.assert_close(m["rewards/chosen"], torch.tensor(0.0))
    torch.testing.assert_close(m["rewards/rejected"], torch.tensor(0.5))
    torch.testing.assert_close(m["rewards/accuracies"], torch.tensor(0.5))
    torch.testing.assert_close(m["logps/chosen"], torch.tensor(-4.5))
    # highest reward: prompt 0 -> response 0 (best: yes), prompt 1 -> response 1 (score 2: no)
    torch.testing.assert_close(m["reward_top_accuracy"], torch.tensor(0.5))
    torch.testing.assert_close(m["mean_p"], (logps / counts).exp().mean())
    assert "mean_p" not in preference_metrics("dpo", logps, scores, ref_logps=ref)  # sum logps, no counts
    m = preference_metrics("pair_mnm", logps, scores)
    torch.testing.assert_close(m["rewards/chosen"], (torch.tensor(-3.0).exp() + torch.tensor(-6.0).exp()) / 2)
    torch.testing.assert_close(m["mean_p"], logps.exp().mean())
    # ORPO's metrics carry TRL's names and meanings: log_odds_chosen is the mean log odds ratio,
    # log_odds_ratio the mean of log σ(log odds) (the term λ multiplies), nll_loss the chosen NLL.
    m = preference_metrics("orpo", logps / 10, scores)
    lw, ll = torch.tensor([-0.3, -0.6]), torch.tensor([-0.5, -0.2])  # chosen, rejected of prompts 0, 1
    log_odds = (lw - ll) - (torch.log1p(-lw.exp()) - torch.log1p(-ll.exp()))
    torch.testing.assert_close(m["log_odds_chosen"], log_odds.mean())
    torch.testing.assert_close(m["log_odds_ratio"], torch.nn.functional.logsigmoid(log_odds).mean())
    torch.testing.assert_close(m["nll_loss"], -lw.mean())
    nan = preference_metrics("pair_mnm", logps[2:], scores[2:])
    assert torch.isnan(nan["rewards/chosen"]) and torch.isfinite(nan["mean_p"])  # undefined, not 0


# ---------------------------------------------------------------------------------------------------- errors


def _err(exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        preference_loss(*args, **kwargs)


def test_input_errors_name_the_argument():
    logps, scores, ref, mask = make_batch(B=3, K=4, seed=61, dtype=torch.float32)
    _err(ValueError, "unknown loss 'pair_xyz'", "pair_xyz", logps, scores)
    _err(TypeError, r"pair_mnm got unknown hyperparameter\(s\) beta; it accepts: none", "pair_mnm", logps, scores,
         beta=0.1)
    _err(TypeError, "dpo got unknown hyperparameter.*gama.*accepts: beta", "dpo", logps, scores, ref_logps=ref,
         gama=1.0)
    _err(ValueError, "negative must be one of", "pair_single", logps, scores, response_mask=mask, negative="best")
    _err(ValueError, "beta must be finite and > 0", "dpo", logps, scores, ref_logps=ref, beta=-1.0)
    _err(TypeError, "beta must be a real number", "simpo", logps, scores, beta="2")
    _err(TypeError, "generator must be a torch.Generator", "pair_single", logps, scores, generator=0)
    for name in REF_NAMES:
        _err(ValueError, f"{name} needs ref_logps", name, logps, scores, response_mask=mask)
    _err(ValueError, r"logps must be \[B, K\]", "pair_mnm", logps[0], scores[0])
    _err(ValueError, r"logps must be \[B, K\]", "pair_mnm", logps[None], scores[None])
    _err(ValueError, r"scores shape \(3, 3\) must equal", "pair_mnm", logps, scores[:, :3])
    _err(ValueError, r"ref_logps shape \(3, 3\) must equal", "dpo", logps, scores, ref_logps=ref[:, :3])
    _err(TypeError, "response_mask must be a bool", "pair_mnm", logps, scores, response_mask=mask.float())
    _err(TypeError, "logps must be a floating-point", "pair_mnm", logps.long(), scores)
    _err(TypeError, "scores must be a \\[B, K\\] tensor", "pair_mnm", logps, [[1.0] * 4] * 3)


def test_data_errors_name_the_index():
    logps, scores, ref, mask = make_batch(B=3, K=4, seed=62, dtype=torch.float32)
    mask = torch.ones(3, 4, dtype=torch.bool)
    logps, ref = logps.nan_to_num(-1.0), ref.nan_to_num(-1.0)
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 3)
    bad = scores.clone()
    bad[1, 2] = float("nan")
    _err(ValueError, r"scores\[1, 2\] = nan at a real response", "pair_mnm", logps, bad)
    masked = mask.clone()
    masked[1, 2] = False
    preference_loss("pair_mnm", logps, bad, response_mask=masked)  # NaN at padding is fine
    lp = logps.clone()
    lp[2, 0] = float("nan")
    _err(ValueError, r"logps\[2, 0\] = nan at a real response", "simpo", lp, scores)
    lp = logps.clone()
    lp[0, 3] = 0.25
    _err(ValueError, r"logps\[0, 3\] = 0.25 > 0 is not a log-likelihood", "point_ce", lp, scores)
    rf = ref.clone()
    rf[2, 1] = float("inf")
    _err(ValueError, r"ref_logps\[2, 1\] = inf", "dpo", logps, scores, ref_logps=rf)
    one = mask.clone()
    one[1, 1:] = False
    _err(ValueError, "prompt 1 has 1 real response; pair_mnm needs at least 2", "pair_mnm", logps, scores,
         response_mask=one)
    _err(ValueError, "prompt 1 has 1 real response; dpo needs at least 2", "dpo", logps, scores, ref_logps=ref,
         response_mask=one)
    preference_loss("point_mse", logps, scores, response_mask=one)  # one real response is enough point-wise
    none = mask.clone()
    none[2] = False
    _err(ValueError, "prompt 2 has 0 real responses; point_ce needs at least 1", "point_ce", logps, scores,
         response_mask=none)
    _err(ValueError, r"scores\[0, 3\] = 4 is outside \[0, score_scale=3.0\]", "point_ce", logps, scores,
         score_scale=3.0)


def test_validate_false_never_synchronizes(monkeypatch):
    """With validate=False no loss or metric reads a value back to the host."""
    logps, scores, ref, mask = make_batch(seed=71, dtype=torch.float32)
    counts = torch.full(logps.shape, 4)
    if torch.cuda.is_available():
        batch = [t.cuda() for t in (logps, scores, ref, mask, counts)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for name in NAMES:
                for hp in ({}, {"kl": 0.5}) if name == "kto" else ({},):
                    lp = batch[0].clone().requires_grad_()
                    loss, _ = preference_loss_and_metrics(name, lp, batch[1], ref_logps=batch[2],
                                                          response_mask=batch[3], token_counts=batch[4],
                                                          validate=False, **hp)
                    loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def no_sync(*args, **kwargs):
        raise AssertionError("host synchronization")

    for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, no_sync)
    for name in NAMES:
        loss, metrics = preference_loss_and_metrics(name, logps, scores, ref_logps=ref, response_mask=mask,
                                                    token_counts=counts, validate=False)
        assert loss.dim() == 0 and len(metrics) >= 8
    monkeypatch.undo()
    assert torch.isfinite(loss)


def test_every_default_hyperparameter_is_accepted():
    """Training passes ``{**LOSSES[name].defaults, **overrides}``: every default key must be accepted."""
    logps, scores, ref, mask = make_batch(seed=81, dtype=torch.float32)
    for name in NAMES:
        loss = preference_loss(name, logps, scores, ref_logps=ref, response_mask=mask, **LOSSES[name].defaults)
        assert torch.isfinite(loss), name
