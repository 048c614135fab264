"""The Triton backend's memory-efficient stage for wide rows: strips of query rows.

The fused tile kernels of ``triton_tiled`` keep a backward program's gradient slice in
registers, at most ``TiledConfig.block_do`` columns of D; a wider D is split over programs
that each recompute their S tiles and the exponentials behind G. At D = 512 on a GPU that
is four times the tile work in each backward sweep. For such rows this stage takes the
query rows in strips of m instead, as the ext backend does on the CPU:

    S_blk  = similarity(Xq_blk, Xr)              (m, M) float32: half rows as they are into
                                                 tensor cores, float32 accumulation, inverse norms
                                                 (float32 rows: torch.mm, as on the dense path)
    loss_blk, G_blk = row_losses_and_dS(S_blk)   the dense path's row kernel, unchanged
    dXq_blk = diag(g) G_blk diag(ir) Xr          grad_product: G never rounded to one half term
    dXr    += G_blk^T diag(g iq) Xq_blk          (only the columns of r_rows, if given)

so every S element is formed once per pass and every exponential once, and the two
products run over the whole of D. The strip buffers (S_blk and G_blk) hold at most
``STRIP_ELEMS`` elements each and at most a sixteenth of Q x M: never a Q x M buffer.
With ``reduction="mean"`` (equal row weights) the gradient is finished in the forward with
unit weights and the backward only scales it; otherwise the backward recomputes the strips
with the row weights. The strips run in order (dXr summed in a fixed order, no atomics:
deterministic) and their bounds are shapes: no host synchronisation.

Which stage runs is a function of the shapes (``use_strips``), so that a forward and its
backward always agree; ``PNP_KERNELS_TRITON_TILED`` = ``fused`` / ``strips`` overrides it
(for benchmarks).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from ..spec import LossSpec
from . import triton_gemm as tgemm
from . import triton_kernels as tk
from . import triton_tiled as tt
from .base import Backend

__all__ = ["STRIP_ELEMS", "strip_rows", "tiled_grads", "tiled_rows", "use_strips"]

STRIP_ELEMS = 1 << 26  # elements of one strip buffer on a GPU (256 MiB in float32)
_INTERPRETER_STRIP_ELEMS = 1 << 8  # tiny strips under the interpreter, so tests see several
_MIN_ROWS = 16  # the smallest tile of the S and G X products


def use_strips(D: int) -> bool:
    """Strips when the fused backward would split D over programs (D > block_do), unless
    ``PNP_KERNELS_TRITON_TILED`` names the stage (``fused`` or ``strips``)."""
    forced = os.environ.get("PNP_KERNELS_TRITON_TILED", "").strip().lower()
    if forced in ("fused", "strips"):
        return forced == "strips"
    if forced:
        raise ValueError(f"PNP_KERNELS_TRITON_TILED: expected 'fused' or 'strips', got {forced!r}")
    return D > tt.config().block_do


def strip_rows(Q: int, M: int) -> int:
    """Rows per strip: as many as STRIP_ELEMS allows against M columns, at least 16, and at most
    ceil(Q / 16), so that no strip buffer is more than a sixteenth of Q x M (for Q >= 256)."""
    budget = _INTERPRETER_STRIP_ELEMS if tk.interpreter_active() else STRIP_ELEMS
    m = max(_MIN_ROWS, budget // max(M, 1))
    return max(1, min(m, -(-Q // 16), Q))


def _inverse_norms(Xq: torch.Tensor, Xr: torch.Tensor, spec: LossSpec):
    """(iq, ir): float32 inverse norms of half rows under cosine (kept unnormalised by the
    preparation), else (None, None): float32 rows arrive normalised."""
    if not (spec.cosine and Xq.dtype in (torch.float16, torch.bfloat16)):
        return None, None
    iq = tt.inverse_norms(Xq)
    return iq, (iq if Xr is Xq else tt.inverse_norms(Xr))


def _similarity(xq: torch.Tensor, Xr: torch.Tensor, iq: Optional[torch.Tensor], ir: Optional[torch.Tensor]):
    """S of a strip: the Triton GEMM on half rows, torch.mm (as on the dense path) on float32 rows."""
    if xq.dtype == torch.float32:
        return torch.mm(xq, Xr.t())
    return tgemm.similarity(xq, Xr, iq, ir)


def _grad_product(G: torch.Tensor, X: torch.Tensor, col: Optional[torch.Tensor], row: Optional[torch.Tensor]):
    """diag(row) G diag(col) X: the Triton GEMM on half rows (G never rounded to one half term),
    torch.mm on float32 rows (the scales applied to X and to the product, never to G)."""
    if X.dtype != torch.float32:
        return tgemm.grad_product(G, X, col, row)
    out = torch.mm(G, X if col is None else X * col[:, None])
    return out if row is None else out.mul_(row[:, None])


def _sweep(
    Xq: torch.Tensor,
    Xr: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    own: Optional[torch.Tensor],
    spec: LossSpec,
    g: Optional[torch.Tensor],
    loss: Optional[torch.Tensor],
    dXq: Optional[torch.Tensor],
    dXr: Optional[torch.Tensor],
    r_rows: Optional[torch.Tensor],
) -> None:
    """One pass over the strips: ``loss`` (Q,) and the gradients dXq (Q, D) / dXr ((M, D), or
    (r, D) for the rows r_rows) with row weights g (None: 1), each written when given."""
    Q, M = Xq.shape[0], Xr.shape[0]
    iq, ir = _inverse_norms(Xq, Xr, spec)
    grad = dXq is not None or dXr is not None
    m = strip_rows(Q, M)
    for r0 in range(0, Q, m):
        r1 = min(Q, r0 + m)
        xq = Xq[r0:r1]
        iq_b = iq[r0:r1] if iq is not None else None
        S = _similarity(xq, Xr, iq_b, ir)
        own_b = own[r0:r1] if own is not None else None
        row_loss, G = tk.row_losses_and_dS(S, lo[r0:r1], hi[r0:r1], own_b, spec, grad)
        del S
        if loss is not None:
            loss[r0:r1] = row_loss
        if G is None:
            continue
        g_b = g[r0:r1] if g is not None else None
        if dXq is not None:
            dXq[r0:r1] = _grad_product(G, Xr, ir, g_b)
        if dXr is not None:
            Gt = (G if r_rows is None else G.index_select(1, r_rows)).t()
            col = g_b if iq_b is None else (iq_b if g_b is None else g_b * iq_b)
            dXr += _grad_product(Gt, xq, col, None)


def tiled_rows(
    Xq: torch.Tensor,
    Xr: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    own: Optional[torch.Tensor],
    spec: LossSpec,
    compute_grad: bool,
    r_rows: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(row_loss (Q,) float32, state or None) of S = Xq Xr^T in strips. The state: with
    ``reduction="mean"`` the gradient with unit row weights, (Q + M, D) float32 = [G Xr; G^T Xq]
    with respect to the normalised rows (with ``r_rows``, only those rows of G^T Xq: (Q + r, D));
    otherwise a (0,) tensor and :func:`tiled_grads` recomputes the strips. Rows as for
    ``triton_tiled.tiled_rows``."""
    tt._check_rows(Xq, Xr)
    Q, D = Xq.shape
    M = Xr.shape[0]
    loss = torch.zeros(Q, dtype=torch.float32, device=Xq.device)
    finish = compute_grad and spec.mean
    n_r = M if r_rows is None else r_rows.shape[0]
    state = torch.zeros(Q + n_r if finish else 0, D, dtype=torch.float32, device=Xq.device)
    if Q and M:
        dXq = state[:Q] if finish else None
        dXr = state[Q:] if finish else None
        _sweep(Xq, Xr, lo, hi, own, spec, None, loss, dXq, dXr, r_rows if finish else None)
    return loss, (state if compute_grad else None)


def tiled_grads(
    Xq: torch.Tensor,
    Xr: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    own: Optional[torch.Tensor],
    state: torch.Tensor,
    g: torch.Tensor,
    spec: LossSpec,
    need_q: bool,
    need_r: bool,
    r_rows: Optional[torch.Tensor] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dXq, dXr) float32 = (diag(g) G Xr, (diag(g) G)^T Xq) with respect to the normalised rows:
    scaled from the state of :func:`tiled_rows` when it holds the finished gradient and the row
    weights are provably equal (an expanded scalar, checked from the strides), else recomputed
    in strips. ``r_rows`` (int64 (r,), distinct, as the forward had it): dXr only for those rows
    (0 elsewhere)."""
    tt._check_rows(Xq, Xr)
    Q, D = Xq.shape
    M = Xr.shape[0]
    dev = Xq.device
    finished = Backend.finished_grads(state, g, Q, M, need_q, need_r, r_rows)
    if finished is not None:
        return finished
    g = g.to(torch.float32).expand(Q)
    dXq = torch.empty(Q, D, dtype=torch.float32, device=dev) if need_q else None
    n_r = M if r_rows is None else r_rows.shape[0]
    acc = torch.zeros(n_r, D, dtype=torch.float32, device=dev) if need_r else None
    if Q and M and (need_q or need_r):
        _sweep(Xq, Xr, lo, hi, own, spec, g.contiguous(), None, dXq, acc, r_rows if need_r else None)
    elif dXq is not None:
        dXq.zero_()
    dXr = acc
    if acc is not None and r_rows is not None:
        dXr = acc.new_zeros(M, D).index_copy_(0, r_rows, acc)
    return dXq, dXr
