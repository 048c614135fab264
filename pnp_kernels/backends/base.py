"""The backend interface: every stage of a loss call, with PyTorch defaults.

A backend is a subclass of :class:`Backend`. It declares its capabilities
(devices, compute dtypes, whether it is free of host-device synchronisation,
where ``backend="auto"`` may pick it) and implements one stage,
:meth:`Backend.row_losses_and_dS` (the row kernel). Every other stage has a
PyTorch default here; a backend overrides the stages it fuses.

Square mode (one batch ranked against itself), in label-sorted order:

    prep = prepare(E, labels)                sort, segments [lo, hi), Xs = normalise(E[perm])
    S = similarity(Xs, Xs)                   GEMM (torch.mm), S float32 (float64 for float64 input)
    row_loss, G = row_losses_and_dS(S, lo, hi)      G[p, :] = d row_loss[p] / d S[p, :]
    out, n_valid = reduce(row_loss, ...)     "mean" scalar or "none" vector, valid count
  backward, with g_p = d out / d row_loss[p] times the upstream gradient:
    H = symmetric_grad(G, grad_out, ...)     diag(g) G + (diag(g) G)^T   (S = Xs Xs^T)
    dE = unprepare(grad_product(H, Xs))      back through the normalisation and the sort

Reference mode (Q queries against M reference rows): only the reference is sorted;
S = Xq Xr^T is Q x M, the same row stage runs on it, and backward is
dXq = (diag(g) G) Xr, dXr = (diag(g) G)^T Xq, each back through its normalisation
(and the reference's sort). Memory is O(Q M): at most two Q x M buffers at once.
A backend may keep float16 / bfloat16 rows as they are (:meth:`Backend.rows_dtype`) and
multiply them in its own :meth:`Backend.similarity` and :meth:`Backend.grad_product`.

Every default stage is built from fixed-shape device ops (sort, searchsorted,
index_copy), so nothing here synchronises the host with a GPU. The normalisation
matches ``F.normalize(x, dim=1, eps=1e-12)``: x / max(||x||, eps), whose gradient
is (g - y (y . g)) / ||x|| when ||x|| > eps and g / eps otherwise.
"""

from __future__ import annotations

from typing import ClassVar, Optional, Tuple

import torch

from ..spec import HALF_MAX, NORM_EPS, LossSpec, ReferencePrep, SquarePrep
from . import tiled

__all__ = ["Backend", "ForwardResult"]

Tensor = torch.Tensor
# (output, n_valid, prep, G or None): what a forward hands to its backward
ForwardResult = Tuple[Tensor, Tensor, tuple, Optional[Tensor]]


class Backend:
    """Base class of the backends; the stages default to plain PyTorch."""

    name: ClassVar[str] = ""
    devices: ClassVar[Tuple[str, ...]] = ("cpu", "cuda")  # device types the kernels run on
    compute_dtypes: ClassVar[Tuple[torch.dtype, ...]] = (torch.float32, torch.float64)
    sync_free: ClassVar[bool] = True  # no host-device synchronisation inside a step
    auto_devices: ClassVar[Tuple[str, ...]] = ()  # device types where backend="auto" picks it

    # ---- availability and input checks ----------------------------------------------

    def why_unavailable(self) -> str:
        """ "" when usable in this process, else a one-line reason."""
        return ""

    def is_available(self) -> bool:
        return not self.why_unavailable()

    def check_tensor(self, t: Tensor, arg: str) -> None:
        """Raise a clear error when this backend cannot take ``t`` (device or dtype)."""
        if t.device.type not in self.devices:
            raise RuntimeError(
                f"backend={self.name!r} runs on {', '.join(self.devices)} tensors, {arg} is on {t.device}"
            )
        if self.compute_dtype(t.dtype) not in self.compute_dtypes:
            raise TypeError(
                f"{arg}: backend={self.name!r} computes in "
                f"{', '.join(str(d).replace('torch.', '') for d in self.compute_dtypes)}, "
                f"not {t.dtype}; use backend='torch' for float64"
            )

    compute_dtype = staticmethod(LossSpec.compute_dtype_of)

    # ---- the row stage: every backend implements it ----------------------------------

    def row_losses_and_dS(
        self, S: Tensor, lo: Tensor, hi: Tensor, own: Tensor, spec: LossSpec, compute_grad: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Per-row loss of a (queries x reference) similarity block and, if asked, its dS.

        Row p's positives are the columns [lo_p, hi_p); an empty segment drops the row
        (loss 0, zero gradient row). ``own`` (int32, -1: none) is each row's own column:
        Recall@k excludes it from the positives and the ranked set, PNP and Smooth-AP
        count it as a positive. PNP: mean_j f(R_pj); Smooth-AP: mean_j neg_j/all_j;
        Recall@k: 1 - mean_k R_k (docs/semantics.md). ``dS[p, :] = d row_loss[p] / d S[p, :]``.
        """
        raise NotImplementedError

    # ---- the memory-efficient (tiled) stage: PyTorch default, backends may fuse it -------

    def tiled_rows(
        self,
        Xq: Tensor,
        Xr: Tensor,
        lo: Tensor,
        hi: Tensor,
        own: Tensor,
        spec: LossSpec,
        compute_grad: bool,
        r_rows: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The row losses of S = Xq Xr^T without storing S: (row_loss, state or None).

        ``state`` is what :meth:`tiled_grads` needs, O(Q * P_max): per (row, positive
        lane) the weights a, b and the row sum T of docs/semantics.md. ``r_rows``: the
        reference rows whose dXr the backward will ask for (as in :meth:`tiled_grads`), for
        a backend that finishes gradients in the forward; the default ignores it.
        """
        return tiled.tiled_rows(Xq, Xr, lo, hi, own, spec, compute_grad)

    def tiled_grads(
        self,
        Xq: Tensor,
        Xr: Tensor,
        lo: Tensor,
        hi: Tensor,
        own: Tensor,
        state: Tensor,
        g: Tensor,
        spec: LossSpec,
        need_q: bool,
        need_r: bool,
        r_rows: Optional[Tensor] = None,
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(dXq, dXr) = (diag(g) G Xr, (diag(g) G)^T Xq) with the tiles of G recomputed, never stored.

        ``r_rows`` (int64 (r,), optional): the distinct reference rows whose dXr is needed
        (their number is a shape, so selecting them needs no sync); the other rows of dXr may
        be left 0 (a memory bank's rows are detached)."""
        return tiled.tiled_grads(Xq, Xr, lo, hi, own, state, g, spec, need_q, need_r, r_rows)

    @staticmethod
    def finished_grads(
        state: Tensor, g: Tensor, Q: int, M: int, need_q: bool, need_r: bool, r_rows: Optional[Tensor] = None
    ) -> Optional[Tuple[Optional[Tensor], Optional[Tensor]]]:
        """(dXq, dXr) from a state that holds the gradient finished in the forward with unit row
        weights, [G Xr; G^T Xq] ((Q + M, D), or (Q + r, D) with only the rows ``r_rows`` of G^T Xq),
        when the row weights g are provably equal (an expanded scalar, as :meth:`row_weights` makes
        for "mean": read from the strides, never from the values). None otherwise: the caller
        recomputes. dXr is (M, D), 0 outside ``r_rows``."""
        n_r = M if r_rows is None else r_rows.shape[0]
        if state.dim() != 2 or state.shape[0] != Q + n_r or not (Q <= 1 or g.stride(0) == 0):
            return None
        w = g.to(state.dtype).expand(Q)[:1, None]
        dXq = state[:Q] * w if need_q else None
        dXr = None
        if need_r:
            part = state[Q:] * w if Q else torch.zeros_like(state[Q:])
            dXr = part if r_rows is None else part.new_zeros(M, part.shape[1]).index_copy_(0, r_rows, part)
        return dXq, dXr

    # ---- shared stages ----------------------------------------------------------------

    @staticmethod
    def normalize(X: Tensor, cosine: bool) -> Tuple[Tensor, Tensor]:
        """(X / max(||X||, eps), denom) for "cosine", (X, empty) for "dot"."""
        if not cosine:
            return X, X.new_empty(0)
        denom = torch.linalg.vector_norm(X, dim=1).clamp_min(NORM_EPS)
        return X / denom[:, None], denom

    def reduce(self, row_loss: Tensor, lo: Tensor, hi: Tensor, perm: Optional[Tensor], spec: LossSpec):
        """(output, n_valid): the mean over valid rows, or the "none" vector in the
        queries' original order (``perm`` maps row -> query; None when rows are queries)."""
        valid = hi > lo
        val = torch.where(valid, row_loss, torch.zeros_like(row_loss))
        n_valid = valid.sum().to(row_loss.dtype)
        if spec.mean:
            return val.sum() / n_valid.clamp(min=1), n_valid
        if perm is None:
            return val, n_valid
        return torch.empty_like(val).index_copy_(0, perm, val), n_valid

    @staticmethod
    def row_weights(grad_out: Tensor, perm: Optional[Tensor], n_valid: Tensor, n: int, spec: LossSpec) -> Tensor:
        """g_p = d output / d row_loss[p] times the upstream gradient, per row."""
        if spec.mean:
            return (grad_out / n_valid.clamp(min=1)).expand(n)
        return grad_out if perm is None else grad_out.index_select(0, perm)

    def symmetrize(self, G: Tensor, g: Tensor) -> Tensor:
        """H = diag(g) G + (diag(g) G)^T: dL/dS of S = X X^T folded onto one factor."""
        Gs = G * g[:, None].to(G.dtype)
        return Gs + Gs.t()

    def symmetric_grad(self, G: Tensor, grad_out: Tensor, prep: SquarePrep, n_valid: Tensor, spec: LossSpec) -> Tensor:
        """H from the upstream gradient of the output: row weights, then :meth:`symmetrize`."""
        g = self.row_weights(grad_out.to(G.dtype), prep.perm, n_valid, G.shape[0], spec)
        return self.symmetrize(G, g)

    # ---- the dense path's two GEMMs: torch.mm on the compute dtype, backends may replace them ----

    def rows_dtype(self, *dtypes: torch.dtype) -> torch.dtype:
        """The dtype of the prepared rows (``SquarePrep.Xs``, ``ReferencePrep.Xq`` / ``Xr``) for
        embeddings of these dtypes: the compute dtype, unless a backend keeps half rows."""
        return self.compute_dtype(dtypes[0])

    def similarity(self, Xq: Tensor, denom_q: Tensor, Xr: Tensor, denom_r: Tensor, spec: LossSpec) -> Tensor:
        """S = Xq Xr^T of the dense path, from prepared rows and their norms (``denom``, as
        :meth:`prepare` returns them; read by a backend that keeps the rows unnormalised)."""
        return torch.mm(Xq, Xr.t())

    def grad_product(
        self,
        G: Tensor,
        X: Tensor,
        denom: Tensor,
        spec: LossSpec,
        row_scale: Optional[Tensor] = None,
        col_scale: Optional[Tensor] = None,
    ) -> Tensor:
        """diag(row_scale) G diag(col_scale) X of the dense backward, X prepared rows with their
        norms ``denom`` (as for :meth:`similarity`): the gradient with respect to the rows that
        S was formed from, G (Q, K) any strides, either scale optional."""
        if col_scale is not None:
            X = X * col_scale[:, None]
        out = torch.mm(G, X)
        return out if row_scale is None else out.mul_(row_scale[:, None])

    def unprepare(
        self, dX: Tensor, X: Tensor, denom: Tensor, perm: Optional[Tensor], cosine: bool, out_dtype: torch.dtype
    ) -> Tensor:
        """dL/dE from dL/dX: through the normalisation, back to the original row order
        (``perm`` None: already in order), in E's dtype (float16 saturated to +-HALF_MAX)."""
        if cosine:
            d = denom[:, None]
            radial = (X * dX).sum(dim=1, keepdim=True)
            dX = torch.where(d > NORM_EPS, (dX - X * radial) / d, dX / d)
        dE = dX if perm is None else torch.empty_like(dX).index_copy_(0, perm, dX)
        if out_dtype == torch.float16:  # saturate: the cast must not make inf (clamp keeps NaN)
            dE = dE.clamp(-HALF_MAX, HALF_MAX)
        return dE.to(out_dtype)

    # ---- square mode --------------------------------------------------------------------

    def prepare(self, E: Tensor, labels: Tensor, spec: LossSpec) -> SquarePrep:
        """Sort by label, give each row its class segment (empty for a class of one: such a
        query has no positive besides itself), gather and normalise the embeddings."""
        sorted_labels, perm = torch.sort(labels, stable=True)
        lo = torch.searchsorted(sorted_labels, sorted_labels, side="left", out_int32=True)
        hi = torch.searchsorted(sorted_labels, sorted_labels, side="right", out_int32=True)
        hi = torch.where(hi - lo >= 2, hi, lo)
        Xs, denom = self.normalize(E.index_select(0, perm).to(self.compute_dtype(E.dtype)), spec.cosine)
        return SquarePrep(Xs, perm, lo, hi, denom)

    def loss_forward(self, E: Tensor, labels: Tensor, spec: LossSpec, compute_grad: bool) -> ForwardResult:
        """The whole square forward: (output, n_valid, SquarePrep, G or None); on the
        memory-efficient path the last item is the tiled state instead of G."""
        prep = self.prepare(E, labels, spec)
        own = torch.arange(prep.Xs.shape[0], device=prep.lo.device, dtype=torch.int32)
        if spec.memory_efficient:
            row_loss, G = self.tiled_rows(prep.Xs, prep.Xs, prep.lo, prep.hi, own, spec, compute_grad)
        else:
            S = self.similarity(prep.Xs, prep.denom, prep.Xs, prep.denom, spec)
            row_loss, G = self.row_losses_and_dS(S, prep.lo, prep.hi, own, spec, compute_grad)
            del S  # at most two B x B buffers alive at once
        out, n_valid = self.reduce(row_loss, prep.lo, prep.hi, prep.perm, spec)
        return out, n_valid, prep, G

    def loss_backward(
        self, grad_out: Tensor, prep: SquarePrep, n_valid: Tensor, G: Tensor, spec: LossSpec, out_dtype: torch.dtype
    ) -> Tensor:
        """dL/dE of the square forward."""
        if spec.memory_efficient:
            cdt = self.compute_dtype(prep.Xs.dtype)  # float32 also for half rows kept by a backend
            g = self.row_weights(grad_out.to(cdt), prep.perm, n_valid, prep.Xs.shape[0], spec)
            own = torch.arange(prep.Xs.shape[0], device=prep.lo.device, dtype=torch.int32)
            dXq, dXr = self.tiled_grads(prep.Xs, prep.Xs, prep.lo, prep.hi, own, G, g, spec, True, True)
            assert dXq is not None and dXr is not None
            return self.unprepare(dXq + dXr, prep.Xs, prep.denom, prep.perm, spec.cosine, out_dtype)
        H = self.symmetric_grad(G, grad_out, prep, n_valid, spec)
        dXs = self.grad_product(H, prep.Xs, prep.denom, spec)
        del H
        return self.unprepare(dXs, prep.Xs, prep.denom, prep.perm, spec.cosine, out_dtype)

    # ---- reference mode -----------------------------------------------------------------

    def prepare_reference(
        self, Eq: Tensor, yq: Tensor, Er: Tensor, yr: Tensor, query_ref_index: Optional[Tensor], spec: LossSpec
    ) -> ReferencePrep:
        """Sort the reference set by label; query i's positives are the sorted reference rows
        [lo_i, hi_i), emptied when none is other than its own copy query_ref_index[i]."""
        sorted_labels, perm_r = torch.sort(yr, stable=True)
        lo = torch.searchsorted(sorted_labels, yq, side="left", out_int32=True)
        hi = torch.searchsorted(sorted_labels, yq, side="right", out_int32=True)
        count = hi - lo
        if query_ref_index is not None:
            M = yr.shape[0]
            # sorted position of each original reference row
            rank = torch.empty_like(perm_r).index_copy_(0, perm_r, torch.arange(M, device=perm_r.device))
            has_own = (query_ref_index >= 0) & (query_ref_index < M)
            pos = rank.index_select(0, query_ref_index.clamp(0, M - 1))
            count = count - (has_own & (pos >= lo) & (pos < hi)).to(count.dtype)
            own = torch.where(has_own, pos, torch.full_like(pos, -1)).to(torch.int32)
        else:
            own = torch.full_like(lo, -1)
        hi = torch.where(count >= 1, hi, lo)
        cdt = self.compute_dtype(Eq.dtype)
        Xq, denom_q = self.normalize(Eq.to(cdt), spec.cosine)
        Xr, denom_r = self.normalize(Er.index_select(0, perm_r).to(cdt), spec.cosine)
        return ReferencePrep(Xq, denom_q, Xr, perm_r, denom_r, lo, hi, own)

    @staticmethod
    def live_positions(prep: ReferencePrep, r_live: int) -> Optional[Tensor]:
        """The sorted positions of the reference rows 0 .. r_live - 1 (the ones that need a
        gradient), or None when every row does (r_live < 0 or >= M). Fixed size, sync-free: a
        stable sort puts the r_live positions whose original row is < r_live first."""
        if not 0 <= r_live < prep.Xr.shape[0]:
            return None
        return torch.argsort((prep.perm_r >= r_live).to(torch.int8), stable=True)[:r_live]

    def reference_forward(
        self,
        Eq: Tensor,
        yq: Tensor,
        Er: Tensor,
        yr: Tensor,
        query_ref_index: Optional[Tensor],
        spec: LossSpec,
        compute_grad: bool,
        r_live: int = -1,
    ) -> ForwardResult:
        """The whole reference-mode forward: (output, n_valid, ReferencePrep, G or None); on
        the memory-efficient path the last item is the tiled state instead of G. ``r_live``
        as in :meth:`reference_backward`, which must get the same value."""
        prep = self.prepare_reference(Eq, yq, Er, yr, query_ref_index, spec)
        if spec.memory_efficient:
            r_rows = self.live_positions(prep, r_live) if compute_grad else None
            row_loss, G = self.tiled_rows(prep.Xq, prep.Xr, prep.lo, prep.hi, prep.own, spec, compute_grad, r_rows)
        else:
            S = self.similarity(prep.Xq, prep.denom_q, prep.Xr, prep.denom_r, spec)
            row_loss, G = self.row_losses_and_dS(S, prep.lo, prep.hi, prep.own, spec, compute_grad)
            del S
        out, n_valid = self.reduce(row_loss, prep.lo, prep.hi, None, spec)
        return out, n_valid, prep, G

    def reference_backward(
        self,
        grad_out: Tensor,
        prep: ReferencePrep,
        n_valid: Tensor,
        G: Tensor,
        spec: LossSpec,
        q_dtype: torch.dtype,
        r_dtype: torch.dtype,
        need_q: bool,
        need_r: bool,
        r_live: int = -1,
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(dL/dEq, dL/dEr), each None when not needed. With g the row weights, dXq =
        g * (G Xr) and dXr = G^T (g * Xq): the products are scaled, never G itself (no
        second Q x M buffer).

        ``r_live`` >= 0: only the first ``r_live`` reference rows (in the caller's order)
        need a gradient, the rest being detached (a memory bank behind the live batch):
        dXr is computed for those rows only and the others get 0."""
        g = self.row_weights(grad_out.to(self.compute_dtype(prep.Xq.dtype)), None, n_valid, prep.Xq.shape[0], spec)
        M = prep.Xr.shape[0]
        sel = self.live_positions(prep, r_live) if need_r else None
        if spec.memory_efficient:
            dXq, dXr = self.tiled_grads(prep.Xq, prep.Xr, prep.lo, prep.hi, prep.own, G, g, spec, need_q, need_r, sel)
            if dXr is not None and sel is not None:
                dXr = dXr.index_select(0, sel)
        else:
            dXq = self.grad_product(G, prep.Xr, prep.denom_r, spec, row_scale=g) if need_q else None
            dXr = None
            if need_r:
                Gr = G if sel is None else G.index_select(1, sel)
                dXr = self.grad_product(Gr.t(), prep.Xq, prep.denom_q, spec, col_scale=g)
        dEq = dEr = None
        if dXq is not None:
            dEq = self.unprepare(dXq, prep.Xq, prep.denom_q, None, spec.cosine, q_dtype)
        if dXr is not None:
            if sel is None:
                dEr = self.unprepare(dXr, prep.Xr, prep.denom_r, prep.perm_r, spec.cosine, r_dtype)
            else:  # the live rows are the original rows 0 .. r_live - 1: perm_r[sel] permutes them
                denom = prep.denom_r.index_select(0, sel) if spec.cosine else prep.denom_r
                d_live = self.unprepare(
                    dXr, prep.Xr.index_select(0, sel), denom, prep.perm_r.index_select(0, sel), spec.cosine, r_dtype
                )
                dEr = torch.cat([d_live, d_live.new_zeros((M - r_live,) + tuple(d_live.shape[1:]))])
        return dEq, dEr
