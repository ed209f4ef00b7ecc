"""Several train.py runs in one Python process (the loss study, the two rounds), each from a fresh accelerate
state as a new process would start. One process only: a multi-process launch keeps one state per process."""

from __future__ import annotations


def run_train(argv: list[str]) -> dict:
    """``train.main(argv)`` after clearing accelerate's process-wide state (kept in class attributes, it would
    otherwise carry the previous run's gradient accumulation and mixed precision into this one); the summary."""
    from accelerate.state import AcceleratorState, GradientState

    from training import train

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return train.main(argv)
