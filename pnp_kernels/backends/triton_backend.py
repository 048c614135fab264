"""Triton backend: the stages that ``triton_kernels`` fuses into single kernels.

Square mode runs entirely in Triton kernels around torch.sort and the two GEMMs
(prep, row kernel, reduce; symmetrise with the row weights formed in-kernel,
un-prep). Reference mode uses the row kernel and the reduce kernel, with the
default PyTorch preparation of :class:`~.base.Backend`.
No stage of the dense path synchronises the host with the GPU.

float32 embeddings: the GEMMs are torch.mm in float32 (TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` says so). float16 / bfloat16 embeddings of one
dtype are never upcast to a float32 GEMM, on either path: the preparation keeps the
sorted half rows (not normalised) with their float32 norms, the kernels multiply the
half values with float32 accumulation and rescale by the inverse norms, and
``unprepare`` normalises the rows in float32 for the way back. On the dense path the two
products are the kernels of ``triton_gemm`` (S = Xq Xr^T; G X, G never rounded to one
half or TF32 term). The memory-efficient path (``tiled_rows`` /
``tiled_grads``) runs the fused kernels of ``triton_tiled``, sync-free too (its state is
sized from the shapes; lanes beyond it are recomputed in the backward), or, for rows wider
than a fused backward program takes (D > 128 on a GPU), strips of query rows through the
dense row kernel and the GEMMs of ``triton_gemm`` (``triton_strips``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..spec import LossSpec, ReferencePrep, SquarePrep
from . import triton_gemm as tgemm
from . import triton_kernels as tk
from . import triton_strips as ts
from . import triton_tiled as tt
from .base import Backend

__all__ = ["TritonBackend"]

_HALF = (torch.float16, torch.bfloat16)


class TritonBackend(Backend):
    """Fused Triton kernels around the GEMMs (torch.mm for float32 rows, Triton for half rows); float32 compute."""

    name = "triton"
    devices = ("cuda", "cpu")  # "cpu" only under TRITON_INTERPRET=1 (check_tensor says so)
    compute_dtypes = (torch.float32,)
    sync_free = True  # both paths
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

    def rows_dtype(self, *dtypes: torch.dtype) -> torch.dtype:
        """float16 / bfloat16 embeddings of one dtype keep their dtype (rows kept in half on
        both paths); anything else is prepared in float32."""
        if dtypes[0] in _HALF and all(dt == dtypes[0] for dt in dtypes):
            return dtypes[0]
        return super().rows_dtype(*dtypes)

    def _keeps_half(self, *tensors: torch.Tensor) -> bool:
        return self.rows_dtype(*(t.dtype for t in tensors)) in _HALF

    def _half_rows(self, X: torch.Tensor, spec: LossSpec) -> Tuple[torch.Tensor, torch.Tensor]:
        """(X contiguous, in its half dtype, float32 norms max(||x||, eps) or empty for "dot")."""
        X = X.contiguous()
        if not spec.cosine:
            return X, X.new_empty(0, dtype=torch.float32)
        return X, 1.0 / tt.inverse_norms(X)

    def prepare(self, E: torch.Tensor, labels: torch.Tensor, spec: LossSpec) -> SquarePrep:
        if self._keeps_half(E):
            # segments and permutation from the default preparation of zero-width rows
            seg = Backend.prepare(self, E[:, :0], labels, spec)
            Xs, denom = self._half_rows(E.index_select(0, seg.perm), spec)
            return SquarePrep(Xs, seg.perm, seg.lo, seg.hi, denom)
        return SquarePrep(*tk.prepare(E, labels, spec.cosine))

    def prepare_reference(
        self, Eq, yq, Er, yr, query_ref_index: Optional[torch.Tensor], spec: LossSpec
    ) -> ReferencePrep:
        if self._keeps_half(Eq, Er):
            seg = Backend.prepare_reference(self, Eq[:, :0], yq, Er[:, :0], yr, query_ref_index, spec)
            Xq, denom_q = self._half_rows(Eq, spec)
            Xr, denom_r = self._half_rows(Er.index_select(0, seg.perm_r), spec)
            return ReferencePrep(Xq, denom_q, Xr, seg.perm_r, denom_r, seg.lo, seg.hi, seg.own)
        return super().prepare_reference(Eq, yq, Er, yr, query_ref_index, spec)

    @staticmethod
    def _inverse(denom: torch.Tensor, spec: LossSpec) -> Optional[torch.Tensor]:
        """1 / max(||x||, eps) of half rows under cosine (their prepared norms), None for "dot"."""
        return 1.0 / denom if spec.cosine else None

    def similarity(self, Xq, denom_q, Xr, denom_r, spec: LossSpec) -> torch.Tensor:
        if Xq.dtype not in _HALF:
            return super().similarity(Xq, denom_q, Xr, denom_r, spec)
        iq = self._inverse(denom_q, spec)
        ir = iq if denom_r is denom_q else self._inverse(denom_r, spec)
        return tgemm.similarity(Xq, Xr, iq, ir)

    def grad_product(self, G, X, denom, spec: LossSpec, row_scale=None, col_scale=None) -> torch.Tensor:
        if X.dtype not in _HALF:
            return super().grad_product(G, X, denom, spec, row_scale, col_scale)
        # the rows S was formed from are X / denom: the inverse norms join the column scale
        inv = self._inverse(denom, spec)
        if inv is not None:
            col_scale = inv if col_scale is None else col_scale.to(torch.float32) * inv
        return tgemm.grad_product(G, X, col_scale, row_scale)

    def tiled_rows(
        self,
        Xq: torch.Tensor,
        Xr: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        own: torch.Tensor,
        spec: LossSpec,
        compute_grad: bool,
        r_rows: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Fused tiles (``triton_tiled``), or strips of rows for rows wider than a fused backward
        program takes (``triton_strips.use_strips``)."""
        if ts.use_strips(Xq.shape[1]):
            return ts.tiled_rows(Xq, Xr, lo, hi, own, spec, compute_grad, r_rows)
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
        """From the state of :meth:`tiled_rows`: (Q, lanes, 4) of the fused kernels, 2-D of the strips."""
        if state.dim() == 2:
            return ts.tiled_grads(Xq, Xr, lo, hi, own, state, g, spec, need_q, need_r, r_rows)
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
