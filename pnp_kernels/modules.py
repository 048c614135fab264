"""``PNPLoss``: the nn.Module wrapper of :func:`pnp_kernels.pnp_loss`."""
from __future__ import annotations

import torch
from torch import nn

from .functional import _check_positive, check_options, pnp_loss
from .variants import resolve_variant

__all__ = ["PNPLoss"]


class PNPLoss(nn.Module):
    """PNP loss module; ``forward(embeddings, labels)`` calls :func:`pnp_kernels.pnp_loss`.

    The options are checked here, at construction, and are those of ``pnp_loss``:
    ``variant`` ("O", "Ds", "Dq", "Iu", "Ib" or the "PNP-*" aliases), ``anneal``,
    ``alpha``, ``b``, ``similarity`` ("cosine" or "dot"), ``reduction``
    ("mean" or "none") and ``backend`` ("auto", "triton", "torch", "ext").

    Example::

        loss = PNPLoss(variant="Dq", alpha=4)(embeddings, labels)
        loss.backward()
    """

    def __init__(self, variant="O", anneal=0.01, alpha=1.0, b=2.0, similarity="cosine",
                 reduction="mean", backend="auto"):
        super().__init__()
        self.variant = resolve_variant(variant).name
        self.anneal = _check_positive("anneal", anneal)
        self.alpha = _check_positive("alpha", alpha)
        self.b = _check_positive("b", b)
        check_options(similarity, reduction, backend)
        self.similarity = similarity
        self.reduction = reduction
        self.backend = backend

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return pnp_loss(embeddings, labels, variant=self.variant, anneal=self.anneal, alpha=self.alpha,
                        b=self.b, similarity=self.similarity, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, anneal={self.anneal}, alpha={self.alpha}, b={self.b}, "
                f"similarity={self.similarity!r}, reduction={self.reduction!r}, backend={self.backend!r}")
