"""TEMPORARY placeholder until the Triton op lands (being written now): delegates to the reference."""
from mppo_kernels.reference import sequence_likelihood_reference


def fused_sequence_likelihood(hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean",
                              return_token_logps=False, sequence_mask=None, validate=True,
                              vocab_chunk_size=None, impl="auto"):
    return sequence_likelihood_reference(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                         reduction=reduction, return_token_logps=return_token_logps,
                                         sequence_mask=sequence_mask, validate=validate)
