"""The memory-efficient path in PyTorch: the default tiled stage of every backend.

S = Xq Xr^T is never stored. Rows are taken in blocks of m queries (P positive lanes
each, padded to the block's largest segment) and columns in blocks of n, so that the
working tile is (m, P, n) elements, under ``MAX_TILE_ELEMS``; each S tile is
recomputed by a GEMM whenever it is needed.

The positives of a row are its lanes' columns, so their sums (pos, dpos of
``row_math``) come from the block's P x P similarities of the lanes, computed once per
row block; the column tiles only carry the negatives: the tile's segment columns (and
Recall@k's own column) are set to -inf, where sigma and sigma' are exactly 0.

forward  (one sweep): neg and dneg per (row, lane) over every column tile; then the
         row loss and, per lane, the weights a, b and T = (a dneg + b dpos) / tau. The
         state kept for the backward is (Q, P_max, 3) = [a, b, T]: O(Q * P_max).
backward (one sweep): per tile, G_tile = sum_t a_t sigma'(z_tk) / tau over the
         negatives, plus, at each lane column u inside the tile, the positive part
         sum_t b_t sigma'(z_tu) / tau - T_u; all scaled by the row weights g; then
         dXq_blk += G_tile Xr_tile and dXr_tile += G_tile^T Xq_blk, in a fixed order
         (deterministic: no atomics, scatters with distinct indices only).

The planning reads the segment lengths on the host (one synchronisation per call on
a GPU). Backends with fused kernels override ``Backend.tiled_rows`` / ``tiled_grads``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..spec import LossSpec
from ..variants import LOSS_PNP, LOSS_RECALL_AT_K
from .row_math import lane_mask, row_terms, sigmoid_prime

__all__ = ["tiled_rows", "tiled_grads", "MAX_TILE_ELEMS", "plan_row_blocks"]

Tensor = torch.Tensor

MAX_TILE_ELEMS = 1 << 20  # elements of one (m, P, n) working tile
MAX_BLOCK_ROWS = 128


def plan_row_blocks(cnt: List[int], max_tile_elems: int = MAX_TILE_ELEMS) -> List[Tuple[int, int, int]]:
    """Consecutive row blocks (r0, r1, P) with at most MAX_BLOCK_ROWS rows and P * rows
    bounded, so that a tile of at least 64 columns fits the budget; rows without a
    positive are skipped (a block never starts on one)."""
    blocks = []
    r0, q = 0, len(cnt)
    lane_budget = max(1, max_tile_elems // 64)
    while r0 < q:
        if cnt[r0] <= 0:
            r0 += 1
            continue
        p_max = cnt[r0]
        r1 = r0 + 1
        while r1 < q and r1 - r0 < MAX_BLOCK_ROWS:
            p_next = max(p_max, cnt[r1])
            if (r1 + 1 - r0) * p_next > lane_budget:
                break
            p_max = p_next
            r1 += 1
        blocks.append((r0, r1, p_max))
        r0 = r1
    return blocks


class _Block:
    """The per-row-block quantities that every tile of the block needs."""

    def __init__(self, Xq: Tensor, Xr: Tensor, lo: Tensor, hi: Tensor, own: Tensor, r0: int, r1: int, P: int, spec):
        M = Xr.shape[0]
        m = r1 - r0
        self.P = P
        self.tau = spec.anneal
        self.x = Xq[r0:r1]
        self.lo = lo[r0:r1].to(torch.int64)
        self.hi = hi[r0:r1].to(torch.int64)
        self.own = own[r0:r1].to(torch.int64) if spec.kind == LOSS_RECALL_AT_K else None
        self.lane = lane_mask(self.lo, self.hi, own[r0:r1].to(torch.int64), P, spec)  # (m, P)
        t = torch.arange(P, device=Xq.device)
        self.t = t
        self.jcol = self.lo[:, None] + t[None, :]  # lane columns (m, P)
        pcols = self.jcol.clamp(0, max(M - 1, 0))
        # S_pj / tau of every lane, by dot products (the tiles' own values at those columns are never used)
        self.s_pos = torch.bmm(Xr[pcols.reshape(-1)].view(m, P, -1), self.x[:, :, None])[:, :, 0] / self.tau
        # the P x P block of the positives: x_pp[p, t, u] = (S_pu - S_pt) / tau over active lanes u != t
        self.pair = self.lane[:, None, :] & ~torch.eye(P, dtype=torch.bool, device=Xq.device)[None]
        self.x_pp = self.s_pos[:, None, :] - self.s_pos[:, :, None]
        self.n_cols = max(1, min(M, MAX_TILE_ELEMS // max(1, m * P)))

    def positives(self, compute_grad: bool):
        """(pos, dpos, sig_pp): the lanes' sums over the other active positives."""
        sig_pp = torch.sigmoid(self.x_pp).masked_fill_(~self.pair, 0.0)
        pos = sig_pp.sum(dim=-1)
        dpos = sigmoid_prime(self.x_pp, sig_pp).sum(dim=-1) if compute_grad else None
        return pos, dpos, sig_pp

    def tile(self, Xr: Tensor, c0: int, c1: int) -> Tensor:
        """z[p, t, k] = (S_pk - S_pj_t) / tau over the negatives of columns [c0, c1), -inf elsewhere."""
        St = torch.mm(self.x, Xr[c0:c1].t()).div_(self.tau)  # (m, n)
        cols = torch.arange(c0, c1, device=St.device)
        excluded = (cols[None, :] >= self.lo[:, None]) & (cols[None, :] < self.hi[:, None])
        if self.own is not None:  # Recall@k: the own column is not ranked, wherever it lies
            excluded |= cols[None, :] == self.own[:, None]
        St.masked_fill_(excluded, float("-inf"))
        return St[:, None, :] - self.s_pos[:, :, None]


def tiled_rows(
    Xq: Tensor, Xr: Tensor, lo: Tensor, hi: Tensor, own: Tensor, spec: LossSpec, compute_grad: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """(row_loss (Q,), state (Q, P_max, 3) = [a, b, T] or None): see the module docstring."""
    Q, M = Xq.shape[0], Xr.shape[0]
    dt = Xq.dtype
    cnt = (hi - lo).tolist() if Q else []
    blocks = plan_row_blocks(cnt)
    p_max = max((p for _, _, p in blocks), default=0)
    row_loss = torch.zeros(Q, dtype=dt, device=Xq.device)
    state = torch.zeros(Q, p_max, 3, dtype=dt, device=Xq.device) if compute_grad else None
    for r0, r1, P in blocks:
        blk = _Block(Xq, Xr, lo, hi, own, r0, r1, P, spec)
        neg = torch.zeros(r1 - r0, P, dtype=dt, device=Xq.device)
        dneg = torch.zeros_like(neg)
        for c0 in range(0, M, blk.n_cols):
            z = blk.tile(Xr, c0, min(M, c0 + blk.n_cols))
            sig = torch.sigmoid(z)
            neg += sig.sum(dim=-1)
            if compute_grad:
                dneg += sigmoid_prime(z, sig).sum(dim=-1)
        pos = dpos = None
        if spec.kind != LOSS_PNP:
            pos, dpos, _ = blk.positives(compute_grad)
        loss, a, b = row_terms(neg, pos, blk.lane, spec, compute_grad)
        row_loss[r0:r1] = loss
        if state is not None:
            state[r0:r1, :P, 0] = a
            state[r0:r1, :P, 1] = b
            T = a * dneg if dpos is None else a * dneg + b * dpos
            state[r0:r1, :P, 2] = T / spec.anneal
    return row_loss, state


def tiled_grads(
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
    """(dXq, dXr) of the rows weighted by g, from the state of :func:`tiled_rows`; with
    ``r_rows`` (int64 (r,), distinct reference rows) dXr only for those rows (0 elsewhere)."""
    Q, M = Xq.shape[0], Xr.shape[0]
    if r_rows is not None:  # as a mask over the columns
        r_rows = torch.zeros(M, dtype=torch.bool, device=Xr.device).index_fill_(0, r_rows, True)
    dXq = torch.zeros_like(Xq) if need_q else None
    dXr = torch.zeros_like(Xr) if need_r else None
    if not (need_q or need_r) or Q == 0:
        return dXq, dXr
    tau = spec.anneal
    g = g.to(Xq.dtype)
    for r0, r1, P in plan_row_blocks((hi - lo).tolist()):
        blk = _Block(Xq, Xr, lo, hi, own, r0, r1, P, spec)
        m = r1 - r0
        gw = g[r0:r1, None]
        a = (state[r0:r1, :P, 0] * gw)[:, None, :]  # (m, 1, P): the bmm below sums over the lanes
        # the lane columns' own value: sum_t b_t sigma'(x_tu) / tau - T_u (inactive lanes: 0)
        g_lane = -state[r0:r1, :P, 2] * gw
        if spec.kind != LOSS_PNP:
            _, _, sig_pp = blk.positives(False)
            b = state[r0:r1, :P, 1] * gw
            g_lane = g_lane + (sigmoid_prime(blk.x_pp, sig_pp) * b[:, :, None]).sum(dim=1) / tau
        for c0 in range(0, M, blk.n_cols):
            c1 = min(M, c0 + blk.n_cols)
            n = c1 - c0
            z = blk.tile(Xr, c0, c1)
            sp = sigmoid_prime(z, torch.sigmoid(z))
            G = torch.zeros(m, n + P, dtype=Xq.dtype, device=Xq.device)
            G[:, :n] = torch.bmm(a, sp)[:, 0, :] / tau
            # lanes whose column lies in this tile add their value there; the others go to spare
            # columns n + t, so every index of a row is distinct (deterministic)
            inside = (blk.jcol >= c0) & (blk.jcol < c1)
            dst = torch.where(inside, blk.jcol - c0, n + blk.t[None, :])
            G.scatter_add_(1, dst, g_lane)
            G = G[:, :n]
            if dXq is not None:
                dXq[r0:r1] += torch.mm(G, Xr[c0:c1])
            if dXr is not None:
                if r_rows is None:
                    dXr[c0:c1] += torch.mm(G.t(), blk.x)
                else:  # only the columns that need a gradient (distinct indices: deterministic)
                    idx = torch.nonzero(r_rows[c0:c1])[:, 0]
                    if idx.numel():
                        dXr.index_add_(0, idx + c0, torch.mm(G.index_select(1, idx).t(), blk.x))
    return dXq, dXr
