"""The memory-efficient path in PyTorch: the default tiled stage of every backend.

S = Xq Xr^T is never stored. Rows are taken in blocks of m queries (P positive lanes
each, padded to the block's largest segment) and columns in blocks of n, so that the
working tile is (m, P, n) elements, under ``MAX_TILE_ELEMS``; each S tile is
recomputed by a GEMM whenever it is needed.

forward  (one sweep): per (row, lane) the sums neg, pos, dneg, dpos of
         ``row_math`` over every column tile; then the row loss and, per lane, the
         weights a, b and the row sum T = (a dneg + b dpos) / tau. The state kept for
         the backward is (Q, P_max, 3) = [a, b, T]: O(Q * P_max), never Q x M.
backward (one sweep): per tile, G_tile = sum_t W_t (W_tk = w_tk sigma'(z_tk) / tau)
         minus T at each lane's own column, scaled by the row weights g; then
         dXq_blk += G_tile Xr_tile and dXr_tile += G_tile^T Xq_blk, in a fixed order
         (deterministic, no atomics).

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
        self.r0, self.r1, self.P = r0, r1, P
        self.x = Xq[r0:r1]
        self.lo = lo[r0:r1].to(torch.int64)
        self.hi = hi[r0:r1].to(torch.int64)
        self.own = own[r0:r1].to(torch.int64)
        self.lane = lane_mask(self.lo, self.hi, self.own, P, spec)  # (m, P)
        t = torch.arange(P, device=Xq.device)
        self.jcol = self.lo[:, None] + t[None, :]  # lane columns (m, P)
        pcols = self.jcol.clamp(0, max(M - 1, 0))
        # S_pj / tau of every lane, by the same dot products as the tiles
        self.s_pos = torch.bmm(Xr[pcols.reshape(-1)].view(r1 - r0, P, -1), self.x[:, :, None])[:, :, 0] / spec.anneal
        self.recall = spec.kind == LOSS_RECALL_AT_K
        self.n_cols = max(1, min(M, MAX_TILE_ELEMS // max(1, (r1 - r0) * P)))

    def tile(self, Xr: Tensor, c0: int, c1: int, tau: float):
        """(z, negative mask, other-positive mask) of the columns [c0, c1)."""
        St = torch.mm(self.x, Xr[c0:c1].t()) / tau  # (m, n)
        cols = torch.arange(c0, c1, device=St.device)
        in_seg = (cols[None, :] >= self.lo[:, None]) & (cols[None, :] < self.hi[:, None])  # (m, n)
        ranked = torch.ones_like(in_seg) if not self.recall else cols[None, :] != self.own[:, None]
        neg = ~in_seg & ranked
        pos = (in_seg & ranked)[:, None, :] & (cols[None, None, :] != self.jcol[:, :, None])  # (m, P, n)
        z = St[:, None, :] - self.s_pos[:, :, None]
        return z, neg, pos, cols


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
    tau = spec.anneal
    need_pos = spec.kind != LOSS_PNP
    zero = torch.zeros((), dtype=dt, device=Xq.device)
    for r0, r1, P in blocks:
        blk = _Block(Xq, Xr, lo, hi, own, r0, r1, P, spec)
        m = r1 - r0
        neg = torch.zeros(m, P, dtype=dt, device=Xq.device)
        pos = torch.zeros_like(neg)
        dneg = torch.zeros_like(neg)
        dpos = torch.zeros_like(neg)
        for c0 in range(0, M, blk.n_cols):
            c1 = min(M, c0 + blk.n_cols)
            z, negm, posm, _ = blk.tile(Xr, c0, c1, tau)
            sig = torch.sigmoid(z)
            neg += torch.where(negm[:, None, :], sig, zero).sum(dim=-1)
            if need_pos:
                pos += torch.where(posm, sig, zero).sum(dim=-1)
            if compute_grad:
                sp = sigmoid_prime(z, sig)
                dneg += torch.where(negm[:, None, :], sp, zero).sum(dim=-1)
                if need_pos:
                    dpos += torch.where(posm, sp, zero).sum(dim=-1)
        loss, a, b = row_terms(neg, pos, blk.lane, spec, compute_grad)
        row_loss[r0:r1] = loss
        if state is not None:
            state[r0:r1, :P, 0] = a
            state[r0:r1, :P, 1] = b
            state[r0:r1, :P, 2] = (a * dneg + b * dpos) / tau
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
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(dXq, dXr) of the rows weighted by g, from the state of :func:`tiled_rows`."""
    Q, M = Xq.shape[0], Xr.shape[0]
    dXq = torch.zeros_like(Xq) if need_q else None
    dXr = torch.zeros_like(Xr) if need_r else None
    if not (need_q or need_r) or Q == 0:
        return dXq, dXr
    cnt = (hi - lo).tolist()
    tau = spec.anneal
    zero = torch.zeros((), dtype=Xq.dtype, device=Xq.device)
    g = g.to(Xq.dtype)
    for r0, r1, P in plan_row_blocks(cnt):
        blk = _Block(Xq, Xr, lo, hi, own, r0, r1, P, spec)
        gw = g[r0:r1, None]
        a = (state[r0:r1, :P, 0] * gw)[:, :, None]
        b = (state[r0:r1, :P, 1] * gw)[:, :, None]
        T = state[r0:r1, :P, 2] * gw
        for c0 in range(0, M, blk.n_cols):
            c1 = min(M, c0 + blk.n_cols)
            z, negm, posm, cols = blk.tile(Xr, c0, c1, tau)
            sp = sigmoid_prime(z, torch.sigmoid(z))
            w = torch.where(negm[:, None, :], a, torch.where(posm, b, zero))
            G = (w * sp).sum(dim=1) / tau  # (m, n): sum_t W_tk
            # minus T_t at lane t's own column, when it lies in this tile
            at_lane = cols[None, None, :] == blk.jcol[:, :, None]
            G = G - torch.where(at_lane, T[:, :, None], zero).sum(dim=1)
            if dXq is not None:
                dXq[r0:r1] += torch.mm(G, Xr[c0:c1])
            if dXr is not None:
                dXr[c0:c1] += torch.mm(G.t(), blk.x)
    return dXq, dXr
