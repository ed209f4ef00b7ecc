"""mppo-kernels: fused Triton kernels for preference optimization with many responses per prompt."""

__version__ = "0.1.0"

from mppo_kernels import reference
from mppo_kernels.reference import sequence_likelihood_reference
from mppo_kernels.sequence_likelihood import fused_sequence_likelihood

__all__ = [
    "__version__",
    "fused_sequence_likelihood",
    "reference",
    "sequence_likelihood_reference",
]
