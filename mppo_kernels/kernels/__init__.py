"""Implementations of the token log-likelihood op, one module per backend, all with the same two host
functions on the compacted problem (``n`` scored rows)::

    forward(hidden2d [N, D], weight [V, D], bias [V] | None, rows [n], targets [n], settings)
        -> (lse [n], target_logit [n])                                  # fp32 (fp64 for fp64 inputs)
    backward(hidden2d, weight, bias, rows, targets, lse [n], grad [n], need, settings)
        -> (d_rows [n, D] fp32 | None, d_weight [V, D] | None, d_bias [V] fp32 | None)

``rows[i]`` is the hidden row target i is predicted from (rows may repeat: a prompt's last row predicts the
first token of each of its responses); ``need`` says which of (hidden, weight, bias) gradients to compute.

* ``triton_likelihood``: Triton kernels (CUDA; CPU under ``TRITON_INTERPRET=1`` for testing).
* ``native``: the C++ CPU kernels of ``csrc/`` (``torch.ops.mppo_kernels_cpu``), when built.
* ``torch_likelihood``: chunked plain torch, any device (the fallback).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_VOCAB_CHUNK = 4096


@dataclass(frozen=True)
class OpSettings:
    """The op's non-tensor settings.

    Attributes:
        logit_scale: logits are multiplied by it (Cohere's ``logit_scale``, 1 / Granite's ``logits_scaling``).
        softcap: ``c`` of ``c * tanh(z / c)``, applied after the scale (Gemma-2: 30); 0 for none.
        vocab_chunk: vocabulary columns whose logit gradient the backward holds at once; 0 lets the backend
            choose (``DEFAULT_VOCAB_CHUNK``, or more for few scored rows: ``triton_likelihood.backward_chunk``).
    """

    logit_scale: float = 1.0
    softcap: float = 0.0
    vocab_chunk: int = 0

    @property
    def pre(self) -> float:
        """What multiplies ``h . W^T + b`` before tanh (or instead of it): s / c with soft-capping, else s."""
        return self.logit_scale / self.softcap if self.softcap else self.logit_scale
