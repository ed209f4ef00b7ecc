"""Providers of the per-sequence log-likelihood ``hidden [B, K, T, D], weight [V, D], labels [B, K, T] ->
logp [B, K]`` (mean over target tokens, fp32), and of end-to-end preference losses.

Every provider computes the same quantity, so each one is checked against an fp32 oracle before it is
timed. Baselines are optional (``pip install 'mppo-kernels[bench]'``); a missing or unsupported one is
reported with its reason, never dropped.

Likelihood providers:
  naive                  ``mppo_kernels.reference.sequence_likelihood_reference``: full logits in the
                         input dtype, fp32 log-softmax (what plain training code does).
  torch_compile_chunked  ``benchmarks/chunked_compile.py``: token chunks, Inductor-fused softmax, logits
                         recomputed in backward, no atomics.
  liger_flce             ``LigerFusedLinearCrossEntropyFunction`` with ``reduction="none"`` (per-token NLL;
                         Liger defers the gradient to backward in this mode and recomputes the logits),
                         then a masked per-sequence mean.
  cce_exact              ``cut_cross_entropy.linear_cross_entropy(..., reduction="none", filter_eps=None)``
                         (no gradient filtering), then a per-sequence mean.
  cce_filtered           the same with CCE's default ``filter_eps="high"`` (skips gradient tiles below
                         bf16 resolution).
  ours                   ``mppo_kernels.fused_sequence_likelihood(..., validate=False)`` (``validate=False``
                         skips the input check's host sync; the inputs are known valid).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from benchmarks.common import IGNORE_INDEX

BENCH_EXTRA = "pip install 'mppo-kernels[bench]'"


@dataclass
class Provider:
    name: str
    fn: Callable | None  # (hidden, weight, labels) -> [B, K] fp32, or a loss provider (see below)
    missing: str | None = None  # why it cannot be imported
    cuda_only: str | None = None  # why it needs CUDA (None: runs anywhere)
    only_K: int | None = None
    backward_dtypes: tuple | None = None  # dtypes its backward accepts (None: any)
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def unavailable(self, device, K: int | None = None, dtype: str | None = None, mode: str | None = None) -> str | None:
        """``"missing: ..."`` / ``"unsupported: ..."`` or None when the provider can run this case."""
        if self.missing:
            return f"missing: {self.missing}"
        if self.cuda_only and torch.device(device).type != "cuda":
            return f"unsupported: {self.cuda_only}"
        if self.only_K is not None and K is not None and K != self.only_K:
            return f"unsupported: K={K} (only K={self.only_K})"
        if self.backward_dtypes and mode in ("bwd", "fwd_bwd") and dtype is not None and dtype not in self.backward_dtypes:
            return f"unsupported: backward needs {'/'.join(self.backward_dtypes)} inputs, not {dtype}"
        return None


def _per_sequence_mean(token_nll: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # token_nll [..., T] (0 at ignored positions) -> mean log-likelihood [...]. The product with the mask
    # (a no-op on the values) gives token_nll a contiguous gradient: CCE's backward calls
    # grad_out.view(-1), which fails on the stride-0 gradient a bare .sum(-1) hands back.
    valid = labels != IGNORE_INDEX
    return -(token_nll * valid).sum(-1) / valid.sum(-1)


def _import_error(dist: str, err: Exception) -> str:
    if isinstance(err, ModuleNotFoundError):
        return f"{dist} not installed ({BENCH_EXTRA})"
    return f"{dist} failed to import: {type(err).__name__}: {err}"


# ----------------------------------------------------------------------------------------------- likelihood
def _naive(hidden, weight, labels):
    from mppo_kernels.reference import sequence_likelihood_reference

    return sequence_likelihood_reference(hidden, weight, labels, validate=False)


def _ours(hidden, weight, labels):
    from mppo_kernels import fused_sequence_likelihood

    return fused_sequence_likelihood(hidden, weight, labels, validate=False)


def _chunked(hidden, weight, labels):
    from benchmarks.chunked_compile import chunked_compiled_sequence_likelihood

    return chunked_compiled_sequence_likelihood(hidden, weight, labels, ignore_index=IGNORE_INDEX)


def _liger_provider() -> Provider:
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except Exception as err:  # noqa: BLE001 - any import failure is reported, not raised
        return Provider("liger_flce", None, missing=_import_error("liger-kernel", err))

    def fn(hidden, weight, labels):
        D = hidden.shape[-1]
        # apply(_input [BT, H], weight [V, H], target [BT], bias, ce_weight, ignore_index,
        #       lse_square_scale, label_smoothing, reduction) -> (loss, z_loss, token_accuracy, predicted_tokens)
        nll = LigerFusedLinearCrossEntropyFunction.apply(
            hidden.reshape(-1, D), weight, labels.reshape(-1), None, None, IGNORE_INDEX, 0.0, 0.0, "none"
        )[0]
        return _per_sequence_mean(nll.view(labels.shape), labels)

    return Provider("liger_flce", fn, cuda_only="Liger's Triton kernels need CUDA")


def _cce_providers() -> list[Provider]:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as err:  # noqa: BLE001
        reason = _import_error("cut-cross-entropy", err)
        return [Provider("cce_exact", None, missing=reason), Provider("cce_filtered", None, missing=reason)]

    def make(filter_eps):
        def fn(hidden, weight, labels):
            nll = linear_cross_entropy(
                hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="none", filter_eps=filter_eps
            )  # [B, K, T], 0 at ignored positions
            return _per_sequence_mean(nll, labels)

        return fn

    why = "CCE's Triton kernels need CUDA"
    # cce_backward.py asserts "Backwards requires embeddings to be bf16 or fp16"; its fp32 forward runs.
    bwd = ("bf16",)
    return [
        Provider("cce_exact", make(None), cuda_only=why, backward_dtypes=bwd, notes="filter_eps=None"),
        Provider("cce_filtered", make("high"), cuda_only=why, backward_dtypes=bwd, notes='filter_eps="high" (default)'),
    ]


def likelihood_providers() -> dict[str, Provider]:
    providers = [
        Provider("naive", _naive, notes="full logits, fp32 log-softmax"),
        Provider("torch_compile_chunked", _chunked, notes="benchmarks/chunked_compile.py"),
        _liger_provider(),
        *_cce_providers(),
        Provider("ours", _ours, notes="fused_sequence_likelihood(validate=False)"),
    ]
    return {p.name: p for p in providers}


@torch.no_grad()
def oracle_logp(hidden, weight, labels, chunk: int = 1024) -> torch.Tensor:
    """fp32 per-sequence mean log-likelihood from the inputs upcast to fp32, in row chunks (never OOMs on
    the logits), for checking every provider."""
    D = hidden.shape[-1]
    h = hidden.reshape(-1, D)
    y = labels.reshape(-1)
    w = weight.float()
    tok = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        z = h[s : s + chunk].float() @ w.T
        valid = y[s : s + chunk] != IGNORE_INDEX
        lp = z.log_softmax(-1).gather(-1, torch.where(valid, y[s : s + chunk], 0)[:, None])[:, 0]
        tok[s : s + chunk] = torch.where(valid, lp, 0.0)
    return _per_sequence_mean(-tok.view(labels.shape), labels)


def make_call(fn, hidden, weight, labels, mode: str, seq_grad: torch.Tensor):
    """A zero-argument callable running ``mode`` of ``fn`` and the tensors whose grads it writes.

    ``seq_grad [B, K]`` is the upstream gradient dL/dlogp (random, like a loss's). ``bwd`` runs an untimed
    forward here and times ``backward(retain_graph=True)``.
    """
    if mode == "fwd_nograd":

        def call():
            with torch.no_grad():
                return fn(hidden, weight, labels)

        return call, []
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    grads = [hidden, weight]
    if mode == "fwd":
        return (lambda: fn(hidden, weight, labels)), grads
    if mode == "fwd_bwd":
        return (lambda: fn(hidden, weight, labels).backward(seq_grad)), grads
    if mode == "bwd":
        out = fn(hidden, weight, labels)
        return (lambda: out.backward(seq_grad, retain_graph=True)), grads
    raise ValueError(f"unknown mode {mode!r}")


# ----------------------------------------------------------------------------------------------- losses
# A loss provider's fn is (name, hidden [B,K,T,D], weight, labels [B,K,T], scores [B,K]) -> scalar loss.
SIMPO_BETA, SIMPO_GAMMA = 2.0, 1.0  # SimPO's values for Llama-3-8B base (SimPO paper, arXiv 2405.14734)


def _accepts(fn, *names) -> dict:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {n: v for n, v in names if n in params or any(p.kind == p.VAR_KEYWORD for p in params.values())}


def _loss_kwargs(fn, name: str) -> dict:
    if name == "simpo":
        return _accepts(fn, ("beta", SIMPO_BETA), ("gamma", SIMPO_GAMMA))
    return {}


def loss_providers() -> dict[str, Provider]:
    out = []
    try:
        from mppo_kernels.losses import preference_loss
    except Exception as err:  # noqa: BLE001
        reason = f"mppo_kernels.losses not available: {type(err).__name__}: {err}"
        out += [Provider("naive", None, missing=reason), Provider("torch_compile_chunked", None, missing=reason)]
    else:

        def two_stage(likelihood):
            def fn(name, hidden, weight, labels, scores):
                logps = likelihood(hidden, weight, labels)  # [B, K]
                return preference_loss(name, logps, scores, **_loss_kwargs(preference_loss, name))

            return fn

        out += [
            Provider("naive", two_stage(_naive), notes="reference logps + losses.preference_loss"),
            Provider("torch_compile_chunked", two_stage(_chunked), notes="chunked logps + preference_loss"),
        ]
    try:
        from mppo_kernels.fused_loss import fused_preference_loss
    except Exception as err:  # noqa: BLE001
        out.append(Provider("ours", None, missing=f"mppo_kernels.fused_loss not available: {type(err).__name__}: {err}"))
    else:

        def ours(name, hidden, weight, labels, scores):
            return fused_preference_loss(name, hidden, weight, labels, scores,
                                         **_loss_kwargs(fused_preference_loss, name))[0]

        out.append(Provider("ours", ours, notes="fused_loss.fused_preference_loss"))
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
    except Exception as err:  # noqa: BLE001
        out.append(Provider("liger_simpo", None, missing=_import_error("liger-kernel", err)))
    else:

        def liger_simpo(name, hidden, weight, labels, scores):
            if name != "simpo":
                raise NotImplementedError("Liger has SimPO only")
            loss_fn = LigerFusedLinearSimPOLoss(
                beta=SIMPO_BETA, gamma=SIMPO_GAMMA, compute_nll_loss=False, compiled=hidden.is_cuda
            )
            # Liger wants [2B, T, D] stacked chosen-then-rejected; the inputs are ordered that way by
            # ``order_chosen_first`` before timing.
            B, K, T, D = hidden.shape
            h = hidden.transpose(0, 1).reshape(K * B, T, D)
            y = labels.transpose(0, 1).reshape(K * B, T)
            return loss_fn(weight, h, y)[0]

        out.append(
            Provider(
                "liger_simpo", liger_simpo, only_K=2,
                notes="chunked_loss.LigerFusedLinearSimPOLoss (torch.compile'd on CUDA, eager on CPU)",
                extra={"only_loss": "simpo"},
            )
        )
    return {p.name: p for p in out}


def loss_inputs(hidden, labels, seed: int):
    """``(hidden, labels, scores [B, K])`` for the loss cases: scores in [1, 11) without ties, the K responses
    of each prompt reordered by descending score (response 0 = chosen, as Liger's pair layout wants), once,
    before timing."""
    B, K = labels.shape[:2]
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randint(1, 11, (B, K), generator=gen).float() + torch.rand(B, K, generator=gen)).to(hidden.device)
    order = scores.argsort(dim=1, descending=True)  # [B, K]
    idx = torch.arange(B, device=scores.device)[:, None]
    return hidden[idx, order].contiguous(), labels[idx, order].contiguous(), scores[idx, order].contiguous()
