"""mppo-kernels: fused Triton kernels for preference optimization with many responses per prompt."""

__version__ = "0.1.0"

from mppo_kernels import reference
from mppo_kernels.fused_loss import FusedPreferenceLoss, fused_preference_loss
from mppo_kernels.losses import LOSSES, preference_loss
from mppo_kernels.reference import sequence_likelihood_reference
from mppo_kernels.sequence_likelihood import fused_sequence_likelihood

__all__ = [
    "__version__",
    "LOSSES",
    "FusedPreferenceLoss",
    "fused_preference_loss",
    "fused_sequence_likelihood",
    "preference_loss",
    "reference",
    "sequence_likelihood_reference",
]
