"""Input checks shared by the fused ops and their plain-torch twins.

Every check names the argument and, for data errors, the first offending index, so a bad batch fails
with a sentence instead of a silent number.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum")
# Integer dtypes whose comparisons torch implements on every device (not uint16/32/64).
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _first_index(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


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
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
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
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be an integer tensor (int64; int32, int16, int8 or uint8), got {labels.dtype}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., T, D] with at least 2 dims, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    V, D = weight.shape
    if hidden.shape[-1] != D:
        raise ValueError(f"hidden's last dim {hidden.shape[-1]} differs from weight's D={D} (weight is [V, D])")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}"
        )
    if V == 0 or D == 0:
        raise ValueError(f"weight must have V > 0 and D > 0, got shape {tuple(weight.shape)}")
    devices = {("hidden", hidden.device), ("weight", weight.device), ("labels", labels.device)}
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must be [V] = ({V},), got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        devices.add(("bias", bias.device))
    if sequence_mask is not None:
        if not isinstance(sequence_mask, torch.Tensor) or sequence_mask.dtype != torch.bool:
            raise TypeError("sequence_mask must be a bool tensor")
        if tuple(sequence_mask.shape) != tuple(labels.shape[:-1]):
            raise ValueError(
                f"sequence_mask shape {tuple(sequence_mask.shape)} must equal labels.shape[:-1] = "
                f"{tuple(labels.shape[:-1])}"
            )
        devices.add(("sequence_mask", sequence_mask.device))
    if len({d for _, d in devices}) > 1:
        raise ValueError("all tensors must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in sorted(devices, key=str)))
    if labels.shape[:-1].numel() == 0:  # no sequences at all; T = 0 instead makes every sequence empty
        return

    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= V))
    empty = ~valid.any(-1)
    if sequence_mask is not None:
        empty &= sequence_mask
    has_bad, has_empty = torch.stack([bad.any(), empty.any()]).tolist()  # the one host sync
    if has_bad:
        idx = _first_index(bad)
        raise ValueError(
            f"labels{list(idx)} = {int(labels[idx])} is outside [0, V={V}) and is not ignore_index={ignore_index}"
        )
    if has_empty:
        idx = _first_index(empty)
        raise ValueError(
            f"sequence {list(idx)} has no target tokens (every label is ignore_index={ignore_index}); its "
            "log-likelihood is undefined, not 0. Drop it, or mark it as padding with sequence_mask (it then "
            "comes out as NaN and losses given the same mask ignore it)."
        )
