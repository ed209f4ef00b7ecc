"""mppo-kernels: fused Triton kernels for preference optimization with many responses per prompt."""

__version__ = "0.1.0"

from mppo_kernels import reference
from mppo_kernels.fused_loss import FusedPreferenceLoss, fused_packed_preference_loss, fused_preference_loss
from mppo_kernels.losses import LOSSES, preference_loss
from mppo_kernels.reference import packed_likelihood_reference, sequence_likelihood_reference
from mppo_kernels.sequence_likelihood import fused_packed_likelihood, fused_sequence_likelihood

__all__ = [
    "__version__",
    "LOSSES",
    "FusedPreferenceLoss",
    "fused_packed_preference_loss",
    "fused_preference_loss",
    "fused_packed_likelihood",
    "fused_sequence_likelihood",
    "packed_likelihood_reference",
    "preference_loss",
    "reference",
    "sequence_likelihood_reference",
]
