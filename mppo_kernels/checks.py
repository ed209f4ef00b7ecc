"""Input checks of the fused op, its plain-torch twin and the losses, and the dtype rule they share.

Every check names the argument and, for data errors, the first offending index, so a bad batch fails
with a sentence instead of a silent number. Shape, dtype and device checks never synchronize with the
device; each data check (values) synchronizes once.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum")
# Integer dtypes whose comparisons torch implements on every device (not uint16/32/64).
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums, log-sum-exps and log-likelihoods are computed and returned in: fp32, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def first_index(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


def _kind(x) -> str:
    return str(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__


def _one_device(named: dict) -> None:
    """Raise naming each tensor's device when the tensors of ``named`` (None values skipped) are on several."""
    devices = {n: t.device for n, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("all tensors must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in
                                                                                 sorted(devices.items())))


def check_logit_transform(logit_scale, softcap) -> tuple[float, float]:
    """``(s, c)`` of the op's logit transform ``c·tanh(s·x / c)`` (``s·x`` when ``c`` is 0), from the optional
    arguments; None means none (s = 1, c = 0). Checked always: plain numbers, no device work."""
    out = []
    for name, value, default in (("logit_scale", logit_scale, 1.0), ("softcap", softcap, 0.0)):
        if value is None:
            out.append(default)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0 (None for no {name}), got {value!r}")
        out.append(float(value))
    return out[0], out[1]


def _check_head(hidden, weight, bias, ignore_index, reduction, hidden_rank: int) -> None:
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if hidden.dim() < hidden_rank:
        dims = "[..., T, D]" if hidden_rank == 2 else "[..., D]"
        raise ValueError(f"hidden must be {dims} with at least {hidden_rank} dims, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    V, D = weight.shape
    if hidden.shape[-1] != D:
        raise ValueError(f"hidden's last dim {hidden.shape[-1]} differs from weight's D={D} (weight is [V, D])")
    if V == 0 or D == 0:
        raise ValueError(f"weight must have V > 0 and D > 0, got shape {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must be [V] = ({V},), got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")


def _check_index(name: str, t, length: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64; int32, int16, int8 or uint8), got {t.dtype}")
    if length is not None and tuple(t.shape) != (length,):
        raise ValueError(f"{name} must be [n] like targets = ({length},), got shape {tuple(t.shape)}")


def _check_sequence_mask(sequence_mask, shape: tuple, what: str) -> None:
    if sequence_mask is None:
        return
    if not isinstance(sequence_mask, torch.Tensor) or sequence_mask.dtype != torch.bool:
        raise TypeError("sequence_mask must be a bool tensor")
    if tuple(sequence_mask.shape) != shape:
        raise ValueError(f"sequence_mask shape {tuple(sequence_mask.shape)} must equal {what} = {shape}")


_EMPTY = ("has no target tokens{}; its log-likelihood is undefined, not 0. Drop it, or mark it as padding with "
          "sequence_mask (it then comes out as NaN and losses given the same mask ignore it).")


def check_sequence_likelihood_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    sequence_mask: torch.Tensor | None = None,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument (and index) for any input the op would misread.

    Shape/dtype/device checks cost nothing; the label-range and empty-sequence checks read the labels
    once and synchronize with the device once.
    """
    _check_head(hidden, weight, bias, ignore_index, reduction, hidden_rank=2)
    _check_index("labels", labels)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}"
        )
    _check_sequence_mask(sequence_mask, tuple(labels.shape[:-1]), "labels.shape[:-1]")
    _one_device({"hidden": hidden, "weight": weight, "labels": labels, "bias": bias, "sequence_mask": sequence_mask})
    if labels.shape[:-1].numel() == 0:  # no sequences at all; T = 0 instead makes every sequence empty
        return

    V = weight.shape[0]
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= V))
    empty = ~valid.any(-1)
    if sequence_mask is not None:
        empty &= sequence_mask
    has_bad, has_empty = torch.stack([bad.any(), empty.any()]).tolist()  # the one host sync
    if has_bad:
        idx = first_index(bad)
        raise ValueError(
            f"labels{list(idx)} = {int(labels[idx])} is outside [0, V={V}) and is not ignore_index={ignore_index}"
        )
    if has_empty:
        idx = first_index(empty)
        raise ValueError(f"sequence {list(idx)} " + _EMPTY.format(f" (every label is ignore_index={ignore_index})"))


def check_packed_likelihood_inputs(hidden, weight, rows, targets, seq_ids, num_seqs, bias, ignore_index, reduction,
                                   sequence_mask=None) -> None:
    """The packed form's checks (``fused_packed_likelihood``): as ``check_sequence_likelihood_inputs``, plus
    ``rows`` inside ``[0, N)`` and ``seq_ids`` inside ``[0, num_seqs)``; one host sync for the values."""
    _check_head(hidden, weight, bias, ignore_index, reduction, hidden_rank=1)
    _check_index("targets", targets)
    if targets.dim() != 1:
        raise ValueError(f"targets must be [n], got shape {tuple(targets.shape)}")
    n = targets.shape[0]
    _check_index("rows", rows, n)
    _check_index("seq_ids", seq_ids, n)
    if isinstance(num_seqs, bool) or not isinstance(num_seqs, int) or num_seqs < 0:
        raise TypeError(f"num_seqs must be an int >= 0, got {num_seqs!r}")
    _check_sequence_mask(sequence_mask, (num_seqs,), "(num_seqs,)")
    _one_device({"hidden": hidden, "weight": weight, "rows": rows, "targets": targets, "seq_ids": seq_ids,
                 "bias": bias, "sequence_mask": sequence_mask})
    if num_seqs == 0 and n == 0:
        return
    V, N = weight.shape[0], hidden.shape[:-1].numel()
    valid = targets != ignore_index
    count = torch.zeros(num_seqs, dtype=torch.long, device=targets.device)
    in_seq = (seq_ids >= 0) & (seq_ids < num_seqs)
    count.index_add_(0, torch.where(in_seq & valid, seq_ids, 0).long(), (in_seq & valid).long())
    empty = count == 0
    if sequence_mask is not None:
        empty &= sequence_mask
    checks = [
        (valid & ((targets < 0) | (targets >= V)), lambda i: f"targets[{i}] = {int(targets[i])} is outside "
         f"[0, V={V}) and is not ignore_index={ignore_index}"),
        ((rows < 0) | (rows >= N), lambda i: f"rows[{i}] = {int(rows[i])} is outside [0, N={N}) (hidden has N rows)"),
        (~in_seq, lambda i: f"seq_ids[{i}] = {int(seq_ids[i])} is outside [0, num_seqs={num_seqs})"),
        (empty, lambda i: f"sequence {i} " + _EMPTY.format("")),
    ]
    flags = torch.stack([bad.any() for bad, _ in checks]).tolist()  # the one host sync
    for (bad, message), flagged in zip(checks, flags):
        if flagged:
            raise ValueError(message(first_index(bad)[0]))


def check_loss_inputs(spec, shape: tuple, scores, ref_logps, response_mask, *, logps=None) -> None:
    """Shapes, dtypes, devices and the reference requirement of loss ``spec``; no device synchronization.

    Args:
        shape: the ``(B, K)`` every input must have (``logps.shape``, or ``hidden.shape[:2]`` before the op).
    """
    if len(shape) != 2:
        raise ValueError(f"logps must be [B, K] (prompts x responses), got shape {shape}")
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a [B, K] tensor, got {type(scores).__name__}")
    if scores.dtype == torch.bool or scores.dtype.is_complex:
        raise TypeError(f"scores must be a real-valued tensor, got {scores.dtype}")
    if tuple(scores.shape) != shape:
        raise ValueError(f"scores shape {tuple(scores.shape)} must equal logps shape [B, K] = {shape}")
    if spec.needs_reference:
        if ref_logps is None:
            raise ValueError(
                f"{spec.name} needs ref_logps: the reference model's [B, K] log-likelihoods with reduction="
                f"{spec.reduction!r} (e.g. fused_sequence_likelihood under torch.no_grad()); got None"
            )
        if not isinstance(ref_logps, torch.Tensor) or not ref_logps.dtype.is_floating_point:
            raise TypeError(f"ref_logps must be a floating-point [B, K] tensor, got {_kind(ref_logps)}")
        if tuple(ref_logps.shape) != shape:
            raise ValueError(f"ref_logps shape {tuple(ref_logps.shape)} must equal logps shape [B, K] = {shape}")
    if response_mask is not None:
        if not isinstance(response_mask, torch.Tensor) or response_mask.dtype != torch.bool:
            raise TypeError(f"response_mask must be a bool [B, K] tensor, got {_kind(response_mask)}")
        if tuple(response_mask.shape) != shape:
            raise ValueError(f"response_mask shape {tuple(response_mask.shape)} must equal logps shape [B, K] = "
                             f"{shape}")
    _one_device({"scores": scores, "logps": logps, "response_mask": response_mask,
                 "ref_logps": ref_logps if spec.needs_reference else None})


def check_loss_data(spec, hp: dict, logps, scores, ref_logps, response_mask) -> None:
    """Data errors at real responses of loss ``spec``, naming the first index; one host synchronization."""
    real = response_mask if response_mask is not None else torch.ones_like(logps, dtype=torch.bool)
    s = scores.detach().double()
    checks = [  # (bad [B, K] or [B] mask, message builder)
        (real & ~torch.isfinite(logps), lambda i: f"logps{list(i)} = {logps[i].item()} at a real response; "
         "log-likelihoods of real responses must be finite (mark padding with response_mask)"),
        (real & (logps > 0), lambda i: f"logps{list(i)} = {logps[i].item():.6g} > 0 is not a log-likelihood "
         "(pass log-probabilities, not losses or NLLs)"),
        (real & ~torch.isfinite(s), lambda i: f"scores{list(i)} = {scores[i].item()} at a real response; "
         "every real response needs a finite score"),
    ]
    if ref_logps is not None and spec.needs_reference:
        checks += [
            (real & ~torch.isfinite(ref_logps), lambda i: f"ref_logps{list(i)} = {ref_logps[i].item()} at a real "
             "response; reference log-likelihoods of real responses must be finite"),
            (real & (ref_logps > 0), lambda i: f"ref_logps{list(i)} = {ref_logps[i].item():.6g} > 0 is not a "
             "log-likelihood"),
        ]
    n_real = real.sum(-1)
    checks.append((n_real < spec.min_responses, lambda i: (
        f"prompt {i[0]} has {int(n_real[i])} real response{'s' if int(n_real[i]) != 1 else ''}; "
        f"{spec.name} needs at least {spec.min_responses}")))
    if isinstance(hp.get("kl"), torch.Tensor):  # a number is checked with the other hyperparameters
        kl = hp["kl"].detach().to(logps.device)
        checks.append((~torch.isfinite(kl) | (kl < 0), lambda i: (
            f"{spec.name} hyperparameter kl = {kl.item()} must be finite and >= 0 (a KL estimate)")))
    if "score_scale" in hp:
        scale = hp["score_scale"]
        checks.append((real & torch.isfinite(s) & ((s < 0) | (s > scale)), lambda i: (
            f"scores{list(i)} = {scores[i].item():.6g} is outside [0, score_scale={scale}]; {spec.name} targets "
            "score / score_scale must lie in [0, 1] (set score_scale to the top of your score range)")))
    flags = torch.stack([bad.any() for bad, _ in checks]).tolist()  # the one host sync
    for (bad, message), flagged in zip(checks, flags):
        if flagged:
            raise ValueError(message(first_index(bad)))
