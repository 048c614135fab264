"""Triton backend: the stages that ``triton_kernels`` fuses into single kernels.

Square mode runs entirely in Triton kernels around torch.sort and the two GEMMs
(prep, row kernel, reduce; symmetrise with the row weights formed in-kernel,
un-prep). Reference mode uses the row kernel and the reduce kernel, with the
default PyTorch preparation and backward GEMMs of :class:`~.base.Backend`.
No stage of the dense path synchronises the host with the GPU.

The memory-efficient path (``tiled_rows`` / ``tiled_grads``) runs the fused kernels
of ``triton_tiled``. float16 / bfloat16 embeddings reach it as they are: the
preparation keeps the sorted half rows (not normalised) with their float32 norms,
the kernels multiply the half values with float32 accumulation and rescale by the
inverse norms, and ``unprepare`` normalises them in float32 for the way back. Its
forward reads the longest class segment on the host once per call (to size the
per-(row, positive) state); its backward is sync-free.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..spec import LossSpec, ReferencePrep, SquarePrep
from . import triton_kernels as tk
from . import triton_tiled as tt
from .base import Backend

__all__ = ["TritonBackend"]


class TritonBackend(Backend):
    """GEMMs through torch, everything else in fused Triton kernels; float32 compute."""

    name = "triton"
    devices = ("cuda", "cpu")  # "cpu" only under TRITON_INTERPRET=1 (check_tensor says so)
    compute_dtypes = (torch.float32,)
    sync_free = True  # the dense path; the memory-efficient forward reads the longest segment once
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
        return tk.row_losses_and_dS(S, lo, hi, own, spec, compute_grad)

    @staticmethod
    def _keeps_half(spec: LossSpec, *tensors: torch.Tensor) -> bool:
        """The memory-efficient path on float16 / bfloat16 embeddings of one dtype: rows kept in half."""
        dt = tensors[0].dtype
        return (
            bool(spec.memory_efficient)
            and dt in (torch.float16, torch.bfloat16)
            and all(t.dtype == dt for t in tensors)
        )

    def _half_rows(self, X: torch.Tensor, spec: LossSpec) -> Tuple[torch.Tensor, torch.Tensor]:
        """(X contiguous, in its half dtype, float32 norms max(||x||, eps) or empty for "dot")."""
        X = X.contiguous()
        if not spec.cosine:
            return X, X.new_empty(0, dtype=torch.float32)
        return X, 1.0 / tt.inverse_norms(X)

    def prepare(self, E: torch.Tensor, labels: torch.Tensor, spec: LossSpec) -> SquarePrep:
        if self._keeps_half(spec, E):
            # segments and permutation from the default preparation of zero-width rows
            seg = Backend.prepare(self, E[:, :0], labels, spec)
            Xs, denom = self._half_rows(E.index_select(0, seg.perm), spec)
            return SquarePrep(Xs, seg.perm, seg.lo, seg.hi, denom)
        return SquarePrep(*tk.prepare(E, labels, spec.cosine))

    def prepare_reference(
        self, Eq, yq, Er, yr, query_ref_index: Optional[torch.Tensor], spec: LossSpec
    ) -> ReferencePrep:
        if self._keeps_half(spec, Eq, Er):
            seg = Backend.prepare_reference(self, Eq[:, :0], yq, Er[:, :0], yr, query_ref_index, spec)
            Xq, denom_q = self._half_rows(Eq, spec)
            Xr, denom_r = self._half_rows(Er.index_select(0, seg.perm_r), spec)
            return ReferencePrep(Xq, denom_q, Xr, seg.perm_r, denom_r, seg.lo, seg.hi, seg.own)
        return super().prepare_reference(Eq, yq, Er, yr, query_ref_index, spec)

    def tiled_rows(
        self,
        Xq: torch.Tensor,
        Xr: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        own: torch.Tensor,
        spec: LossSpec,
        compute_grad: bool,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return tt.tiled_rows(Xq, Xr, lo, hi, own, spec, compute_grad)

    def tiled_grads(
        self,
        Xq: torch.Tensor,
        Xr: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        own: torch.Tensor,
        state: torch.Tensor,
        g: torch.Tensor,
        spec: LossSpec,
        need_q: bool,
        need_r: bool,
        r_rows: Optional[torch.Tensor] = None,
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return tt.tiled_grads(Xq, Xr, lo, hi, own, state, g, spec, need_q, need_r, r_rows)

    def reduce(self, row_loss, lo, hi, perm, spec: LossSpec):
        return tk.reduce(row_loss, lo, hi, perm, spec.mean)

    def symmetrize(self, G: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return tk.symmetrize(G, g)

    def symmetric_grad(self, G, grad_out, prep: SquarePrep, n_valid, spec: LossSpec) -> torch.Tensor:
        return tk.symmetric_grad(G, grad_out, prep.perm, n_valid, spec.mean)

    def unprepare(self, dX, X, denom, perm, cosine: bool, out_dtype: torch.dtype) -> torch.Tensor:
        if cosine and X.dtype in (torch.float16, torch.bfloat16):  # half rows kept raw: normalise in float32
            X = X.to(torch.float32) / denom[:, None]
        return tk.unprepare(dX, X, denom, perm, cosine, out_dtype)
