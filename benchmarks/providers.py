"""Providers of the per-sequence log-likelihood ``hidden [B, K, T, D], weight [V, D], labels [B, K, T] ->
logp [B, K]`` (mean over target tokens, fp32), and of end-to-end preference losses.

Every provider computes the same quantity; each is checked (output and gradients, ``benchmarks/oracle.py``)
in the run that times it. Baselines are optional (``pip install 'mppo-kernels[bench]'``); a missing or
unsupported one is reported with its reason, never dropped. ``Provider.computes`` says whether it computes
the logits of every position (prompt and padding too) or of the target positions only.

Likelihood providers (``fn(hidden, weight, labels, *, softcap=None, **settings)``):
  naive                  every position: ``hidden @ W.T`` in the input dtype, fp32 (soft-cap,) log-softmax,
                         gather, masked mean (``oracle.token_logps``; what plain training code does).
  naive_compacted        the same on ``hidden[labels != ignore_index]`` only, as a careful user writes it.
  torch_compile_chunked  ``benchmarks/chunked_compile.py``: token chunks, Inductor-fused softmax, logits
                         recomputed in backward, no atomics (every position).
  liger_flce             ``LigerFusedLinearCrossEntropyFunction`` with ``reduction="none"`` (per-token NLL;
                         Liger defers the gradient to backward in this mode and recomputes the logits),
                         then a masked per-sequence mean (every position). Its chunking setting
                         (``chunk_mem_const``, where the installed version has it) is swept per case and
                         the fastest is used and recorded.
  liger_flce_compacted   the same on the target rows only.
  cce_exact              ``cut_cross_entropy.linear_cross_entropy(..., reduction="none", filter_eps=None)``
                         (no gradient filtering; CCE drops ignored rows itself), autotuned
                         (``CCE_AUTOTUNE=1`` unless the environment says otherwise).
  cce_filtered           the same with CCE's gradient filter (``filter_eps="high"``: skips gradient tiles
                         below bf16 resolution).
  ours                   ``mppo_kernels.fused_sequence_likelihood(..., validate=False)`` with ``impl="auto"``
                         (``validate=False`` skips the input check's host sync; the inputs are valid).
  ours_budget            the same with a ``logits_budget`` that holds every target row's logits, so the
                         backward need not recompute them (where the op has the argument).
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from benchmarks.common import IGNORE_INDEX
from benchmarks.oracle import per_sequence_mean, token_logps

BENCH_EXTRA = "pip install 'mppo-kernels[bench]'"
# CCE reads CCE_AUTOTUNE once, when it is first imported; tuned "as its users would" means on. Set here, at
# import, so the results stamp (taken before the providers are built) records the value the run uses.
os.environ.setdefault("CCE_AUTOTUNE", "1")
ALL, TARGETS_ONLY = "all", "targets"
LIGER_CHUNK_MEM_CONSTS = (1, 2, 4, 8)  # Liger's default is 1 (transient logits ~ chunk x H elements)


@dataclass
class Provider:
    name: str
    fn: Callable | None  # likelihood: (hidden, weight, labels, *, softcap, **settings) -> [B, K]; losses below
    computes: str = TARGETS_ONLY  # ALL: the logits of every position; TARGETS_ONLY: of target positions
    missing: str | None = None  # why it cannot be imported
    cuda_only: str | None = None  # why it needs CUDA (None: runs anywhere)
    only_K: int | None = None
    backward_dtypes: tuple | None = None  # dtypes its backward accepts (None: any)
    no_softcap: str | None = None  # "missing: ..." / "unsupported: ..." when it cannot soft-cap
    sweep: tuple = ({},)  # settings to try per case; the fastest forward+backward is used and recorded
    case_kwargs: Callable | None = None  # (case, n_valid) -> fixed keyword arguments for that case
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def unavailable(self, device, case=None, mode: str | None = None) -> str | None:
        """``"missing: ..."`` / ``"unsupported: ..."`` or None when the provider can run this case."""
        if self.missing:
            return f"missing: {self.missing}"
        if self.cuda_only and torch.device(device).type != "cuda":
            return f"unsupported: {self.cuda_only}"
        if case is None:
            return None
        if self.only_K is not None and case.K != self.only_K:
            return f"unsupported: K={case.K} (only K={self.only_K})"
        if getattr(case, "softcap", None) is not None and self.no_softcap:
            return self.no_softcap
        if self.backward_dtypes and mode in ("bwd", "fwd_bwd") and case.dtype not in self.backward_dtypes:
            return f"unsupported: backward needs {'/'.join(self.backward_dtypes)} inputs, not {case.dtype}"
        return None

    def bind(self, case, n_valid: int, **settings) -> Callable:
        """``(hidden, weight, labels) -> [B, K]`` for ``case`` with the given swept ``settings``."""
        kwargs = dict(self.case_kwargs(case, n_valid)) if self.case_kwargs else {}
        if case.softcap is not None:
            kwargs["softcap"] = case.softcap
        return functools.partial(self.fn, **kwargs, **settings)


def _import_error(dist: str, err: Exception) -> str:
    if isinstance(err, ModuleNotFoundError):
        return f"{dist} not installed ({BENCH_EXTRA})"
    return f"{dist} failed to import: {type(err).__name__}: {err}"


def _params(fn) -> dict:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def _compacted(labels):
    """Target mask ``[B, K, T]`` and, per target row, the index of its sequence in ``[B*K]``."""
    valid = labels != IGNORE_INDEX
    T = labels.shape[-1]
    seq = torch.arange(valid.numel() // T, device=labels.device).repeat_interleave(T)[valid.reshape(-1)]
    return valid, seq


def _sequence_mean_from_rows(token_values, valid, seq):
    """Compacted per-target values ``[n_valid]`` -> per-sequence mean ``[B, K]`` (fp32)."""
    sums = torch.zeros(valid.numel() // valid.shape[-1], dtype=torch.float32, device=valid.device)
    sums = sums.index_add(0, seq, token_values.float())
    return sums.view(valid.shape[:-1]) / valid.sum(-1)


# ----------------------------------------------------------------------------------------------- likelihood
def _naive(hidden, weight, labels, softcap=None):
    D = hidden.shape[-1]
    tok = token_logps(hidden.reshape(-1, D), weight, labels.reshape(-1), softcap)
    return per_sequence_mean(tok.view(labels.shape), labels)


def _naive_compacted(hidden, weight, labels, softcap=None):
    valid, seq = _compacted(labels)
    return _sequence_mean_from_rows(token_logps(hidden[valid], weight, labels[valid], softcap), valid, seq)


def _chunked(hidden, weight, labels, softcap=None):
    from benchmarks.chunked_compile import chunked_compiled_sequence_likelihood

    return chunked_compiled_sequence_likelihood(hidden, weight, labels, ignore_index=IGNORE_INDEX, softcap=softcap)


def _ours_providers() -> list[Provider]:
    try:
        from mppo_kernels import fused_sequence_likelihood as op
    except Exception as err:  # noqa: BLE001 - reported as a row, not raised
        why = f"mppo_kernels failed to import: {type(err).__name__}: {err}"
        return [Provider("ours", None, missing=why), Provider("ours_budget", None, missing=why)]
    params = _params(op)
    no_softcap = None if "softcap" in params else "missing: op has no softcap argument"

    def ours(hidden, weight, labels, **kwargs):
        return op(hidden, weight, labels, validate=False, impl="auto", **kwargs)

    def budget(case, n_valid):
        # 4 bytes per logit (every target row's logits even in fp32) and 64 per row (its fp32 log-sum-exp
        # and slack): a budget that fits the whole case in any input dtype.
        return {"logits_budget": n_valid * (case.V * 4 + 64)}

    notes = 'fused_sequence_likelihood(validate=False, impl="auto")'
    return [
        Provider("ours", ours, no_softcap=no_softcap, notes=notes),
        Provider("ours_budget", ours, no_softcap=no_softcap, case_kwargs=budget,
                 missing=None if "logits_budget" in params else "op has no logits_budget argument",
                 notes=notes + " + logits_budget = n_valid x (4 V + 64) bytes"),
    ]


def _liger_providers() -> list[Provider]:
    def unusable(why):
        return [Provider("liger_flce", None, computes=ALL, missing=why), Provider("liger_flce_compacted", None, missing=why)]

    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as F
    except Exception as err:  # noqa: BLE001
        return unusable(_import_error("liger-kernel", err))
    params = _params(F.forward)
    order = [n for n in params if n != "ctx"]
    lacking = [n for n in ("bias", "ignore_index", "reduction") if n not in params]
    if len(order) < 3 or lacking:
        return unusable(f"liger-kernel's LigerFusedLinearCrossEntropyFunction.forward{tuple(order)} lacks {lacking}")

    def apply(hidden2d, weight, target, **kwargs):
        # apply() takes positional arguments only, and their order differs between Liger versions: bind
        # by name from the installed signature.
        values = {order[0]: hidden2d, order[1]: weight, order[2]: target, "bias": None,
                  "ignore_index": IGNORE_INDEX, "reduction": "none", **kwargs}
        out = F.apply(*[values[n] if n in values else params[n].default for n in order])
        return out[0] if isinstance(out, tuple) else out  # per-token NLL [n], 0 at ignored rows

    def full(hidden, weight, labels, **kwargs):
        nll = apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), **kwargs)
        return per_sequence_mean(-nll.view(labels.shape), labels)

    def compacted(hidden, weight, labels, **kwargs):
        valid, seq = _compacted(labels)
        return _sequence_mean_from_rows(-apply(hidden[valid], weight, labels[valid], **kwargs), valid, seq)

    sweep = ({"chunk_mem_const": c} for c in LIGER_CHUNK_MEM_CONSTS) if "chunk_mem_const" in params else ({},)
    sweep = tuple(sweep)
    no_softcap = None if "softcap" in params else "unsupported: this liger-kernel has no softcap argument"
    why = "Liger's Triton kernels need CUDA"
    tuning = "chunk_mem_const swept" if len(sweep) > 1 else "this liger-kernel has no chunking setting"
    return [
        Provider("liger_flce", full, computes=ALL, cuda_only=why, no_softcap=no_softcap, sweep=sweep,
                 notes=f'reduction="none", {tuning}'),
        Provider("liger_flce_compacted", compacted, cuda_only=why, no_softcap=no_softcap, sweep=sweep,
                 notes=f'target rows only, reduction="none", {tuning}'),
    ]


def _cce_autotune_state() -> str:
    try:
        from cut_cross_entropy import tl_autotune

        return f"autotune {'on' if getattr(tl_autotune, '_AUTOTUNE') else 'off'}"
    except Exception:  # noqa: BLE001 - a version without the module: report the environment
        return f"CCE_AUTOTUNE={os.environ.get('CCE_AUTOTUNE')}"


def _cce_providers() -> list[Provider]:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as err:  # noqa: BLE001
        reason = _import_error("cut-cross-entropy", err)
        return [Provider("cce_exact", None, missing=reason), Provider("cce_filtered", None, missing=reason)]
    has_softcap = "softcap" in _params(linear_cross_entropy)

    def make(filter_eps):
        def fn(hidden, weight, labels, **kwargs):
            nll = linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="none",
                                       filter_eps=filter_eps, **kwargs)  # [B, K, T], 0 at ignored positions
            # The product with the mask (a no-op on the values) gives nll a contiguous gradient: CCE's
            # backward calls grad_out.view(-1), which fails on the stride-0 gradient of a bare sum.
            return per_sequence_mean(-nll * (labels != IGNORE_INDEX), labels)

        return fn

    common = dict(cuda_only="CCE's Triton kernels need CUDA",
                  # cce_backward.py asserts "Backwards requires embeddings to be bf16 or fp16".
                  backward_dtypes=("bf16", "fp16"),
                  no_softcap=None if has_softcap else "unsupported: this cut-cross-entropy has no softcap argument")
    state = _cce_autotune_state()
    return [
        Provider("cce_exact", make(None), notes=f"filter_eps=None, {state}", **common),
        Provider("cce_filtered", make("high"), notes=f'filter_eps="high", {state}', **common),
    ]


def likelihood_providers() -> dict[str, Provider]:
    naive = [
        Provider("naive", _naive, computes=ALL, notes="full logits, fp32 log-softmax"),
        Provider("naive_compacted", _naive_compacted, notes="hidden[mask] @ W.T, fp32 log-softmax"),
        Provider("torch_compile_chunked", _chunked, computes=ALL, notes="benchmarks/chunked_compile.py"),
    ]
    providers = naive + _liger_providers() + _cce_providers() + _ours_providers()
    return {p.name: p for p in providers}


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
    params = _params(fn)
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
            Provider("naive", two_stage(_naive), computes=ALL, notes="plain-torch logps + losses.preference_loss"),
            Provider("torch_compile_chunked", two_stage(_chunked), computes=ALL,
                     notes="chunked logps + preference_loss"),
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
            # Liger wants [2B, T, D] stacked chosen-then-rejected; ``loss_inputs`` orders the inputs
            # that way before timing.
            B, K, T, D = hidden.shape
            h = hidden.transpose(0, 1).reshape(K * B, T, D)
            y = labels.transpose(0, 1).reshape(K * B, T)
            return loss_fn(weight, h, y)[0]

        out.append(
            Provider(
                "liger_simpo", liger_simpo, computes=ALL, only_K=2,
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
