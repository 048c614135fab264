"""pnp_kernels: the PNP loss (Li et al., AAAI 2022) exact, fast and in O(B^2) memory.

Public API: :func:`pnp_loss`, :class:`PNPLoss`, :func:`available_backends`,
:func:`backend_status`; the B^3 oracle lives in :mod:`pnp_kernels.reference`.
"""
from .backends import available_backends, backend_status
from .functional import pnp_loss
from .modules import PNPLoss

__version__ = "0.1.0"

__all__ = ["pnp_loss", "PNPLoss", "available_backends", "backend_status", "__version__"]
