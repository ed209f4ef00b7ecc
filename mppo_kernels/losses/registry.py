"""The loss registry: ``@register`` declares a loss once, next to its function, and ``LOSSES`` maps names to it.

A declaration holds what the fused op and the trainer must know (the op's reduction, whether a reference
model is needed, how many real responses a prompt needs, the reward the metrics report, extra metrics);
the hyperparameters are the function's keyword-only arguments, whose defaults are the defaults and whose
``Annotated`` types carry the rule a value must pass::

    @register(reduction="sum", reference=True, reward=beta_logratio, paper="DPO, arXiv 2305.18290")
    def dpo(g: Groups, *, beta: Positive = 0.1) -> torch.Tensor: ...

so adding a hyperparameter is one line of the signature.
"""

from __future__ import annotations

import inspect
import math
import numbers
import typing
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, Callable, Mapping

import torch

# ------------------------------------------------------------------------------------- hyperparameter rules


def _number(loss: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{loss} hyperparameter {key} must be a real number, got {value!r}")
    return value


@dataclass(frozen=True)
class Number:
    """A finite real number ``> low`` (``strict``) or ``>= low``."""

    low: float
    strict: bool

    def check(self, loss: str, key: str, value) -> None:
        v = _number(loss, key, value)
        if not math.isfinite(v) or v < self.low or (self.strict and v == self.low):
            raise ValueError(f"{loss} hyperparameter {key} must be finite and {'>' if self.strict else '>='} "
                             f"{self.low:g}, got {value!r}")


@dataclass(frozen=True)
class OneOf:
    options: tuple

    def check(self, loss: str, key: str, value) -> None:
        if value not in self.options:
            raise ValueError(f"{loss} hyperparameter {key} must be one of {self.options}, got {value!r}")


class GeneratorOrNone:
    def check(self, loss: str, key: str, value) -> None:
        if value is not None and not isinstance(value, torch.Generator):
            kind = str(value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"{loss} hyperparameter {key} must be a torch.Generator or None, got {kind}")


class Estimate:
    """None (estimate it), a number >= 0, or a 0-dim float tensor (its value is a data check)."""

    def check(self, loss: str, key: str, value) -> None:
        if isinstance(value, torch.Tensor):
            if value.dim() != 0 or not value.dtype.is_floating_point:
                raise TypeError(f"{loss} hyperparameter {key} must be a 0-dim float tensor, got {value!r}")
        elif value is not None:
            Number(0.0, strict=False).check(loss, key, value)


Positive = Annotated[float, Number(0.0, strict=True)]
NonNegative = Annotated[float, Number(0.0, strict=False)]


# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class LossSpec:
    """What a loss needs from the fused op and the batch.

    Attributes:
        name: registry key, e.g. ``"pair_mnm"``.
        fn: ``fn(groups, **hparams) -> [B]`` per-prompt loss.
        reduction: ``"mean"`` or ``"sum"``, the op's reduction over tokens its ``logps`` must use.
        needs_reference: whether ``ref_logps`` (same reduction, from the reference model) is required.
        defaults: hyperparameters and their defaults; exactly these names are accepted.
        rules: the check of each hyperparameter's value.
        min_responses: real responses every prompt must have (1 point-wise, 2 otherwise).
        reward: ``reward(groups, hparams) -> [B, K]``, the per-response reward the metrics report.
        metrics: ``metrics(groups, hparams) -> {name: [B] per prompt or 0-dim}``, extra metrics, or None.
        paper: where it comes from.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    reduction: str
    needs_reference: bool
    defaults: Mapping[str, Any]
    rules: Mapping[str, Any]
    min_responses: int
    reward: Callable[..., torch.Tensor]
    metrics: Callable[..., dict] | None
    paper: str

    @property
    def needs_preference(self) -> bool:
        """Whether a prompt counts only when its real responses have at least two different scores."""
        return self.min_responses >= 2


LOSSES: dict[str, LossSpec] = {}


def register(*, reduction: str, reward: Callable, paper: str, reference: bool = False, min_responses: int = 2,
             metrics: Callable | None = None):
    """Declare the decorated ``fn(groups, *, **hparams) -> [B]`` as the loss ``fn.__name__``."""

    def wrap(fn):
        hints = typing.get_type_hints(fn, include_extras=True)
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]
        defaults = {p.name: p.default for p in params}
        rules = {p.name: hints[p.name].__metadata__[0] for p in params}
        LOSSES[fn.__name__] = LossSpec(fn.__name__, fn, reduction, reference, MappingProxyType(defaults),
                                       MappingProxyType(rules), min_responses, reward, metrics, paper)
        return fn

    return wrap


def resolve_hparams(name: str, hparams: Mapping[str, Any]) -> tuple[LossSpec, dict]:
    """``(spec, defaults merged with hparams)``; unknown names (of loss or hyperparameter) and bad values raise."""
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    spec = LOSSES[name]
    unknown = sorted(set(hparams) - set(spec.defaults))
    if unknown:
        accepted = ", ".join(sorted(spec.defaults)) or "none"
        raise TypeError(f"{name} got unknown hyperparameter(s) {', '.join(unknown)}; it accepts: {accepted}")
    hp = {**spec.defaults, **hparams}
    for key, value in hp.items():
        spec.rules[key].check(name, key, value)
    return spec, hp
