"""Triton backend: the stages that ``triton_kernels`` fuses into single kernels.

Square mode runs entirely in Triton kernels around torch.sort and the two GEMMs
(prep, row kernel, reduce; symmetrise with the row weights formed in-kernel,
un-prep). Reference mode uses the row kernel and the reduce kernel, with the
default PyTorch preparation and backward GEMMs of :class:`~.base.Backend`.
No stage synchronises the host with the GPU.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..spec import LossSpec, SquarePrep
from . import triton_kernels as tk
from .base import Backend

__all__ = ["TritonBackend"]


class TritonBackend(Backend):
    """GEMMs through torch, everything else in fused Triton kernels; float32 compute."""

    name = "triton"
    devices = ("cuda", "cpu")  # "cpu" only under TRITON_INTERPRET=1 (check_tensor says so)
    compute_dtypes = (torch.float32,)
    sync_free = True
    auto_devices = ("cuda",)

    def why_unavailable(self) -> str:
        return tk.why_unavailable()

    def check_tensor(self, t: torch.Tensor, arg: str) -> None:
        tk.check_device(t)
        super().check_tensor(t, arg)

    def row_losses_and_dS(
        self,
        S: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        own: torch.Tensor,
        spec: LossSpec,
        compute_grad: bool,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return tk.row_losses_and_dS(
            S, lo, hi, spec.kind, spec.variant.code, spec.anneal, spec.alpha, spec.b, compute_grad
        )

    def prepare(self, E: torch.Tensor, labels: torch.Tensor, spec: LossSpec) -> SquarePrep:
        return SquarePrep(*tk.prepare(E, labels, spec.cosine))

    def reduce(self, row_loss, lo, hi, perm, spec: LossSpec):
        return tk.reduce(row_loss, lo, hi, perm, spec.mean)

    def symmetrize(self, G: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return tk.symmetrize(G, g)

    def symmetric_grad(self, G, grad_out, prep: SquarePrep, n_valid, spec: LossSpec) -> torch.Tensor:
        return tk.symmetric_grad(G, grad_out, prep.perm, n_valid, spec.mean)

    def unprepare(self, dX, X, denom, perm, cosine: bool, out_dtype: torch.dtype) -> torch.Tensor:
        return tk.unprepare(dX, X, denom, perm, cosine, out_dtype)
