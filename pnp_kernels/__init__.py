"""pnp_kernels: exact, fast, O(B^2)-memory rank losses for metric learning.

The PNP loss (Li et al., AAAI 2022), Smooth-AP (Brown et al., ECCV 2020) and the
Recall@k surrogate (Patel et al., CVPR 2022), for
one batch, against a reference set or memory bank, or across GPUs.

Public API: :func:`pnp_loss`, :class:`PNPLoss`, :func:`smooth_ap_loss`,
:class:`SmoothAPLoss`, :func:`recall_at_k_loss`, :class:`RecallAtKLoss`, :class:`CrossBatchMemory`,
:func:`available_backends`, :func:`backend_status`, :func:`two_pass_step`; the brute-force oracles
live in :mod:`pnp_kernels.reference`.
"""

from ._version import __version__
from .backends import available_backends, backend_status
from .functional import pnp_loss, recall_at_k_loss, smooth_ap_loss
from .modules import CrossBatchMemory, PNPLoss, RecallAtKLoss, SmoothAPLoss
from .two_pass import two_pass_step

__all__ = [
    "pnp_loss",
    "PNPLoss",
    "smooth_ap_loss",
    "SmoothAPLoss",
    "recall_at_k_loss",
    "RecallAtKLoss",
    "CrossBatchMemory",
    "two_pass_step",
    "available_backends",
    "backend_status",
    "__version__",
]
