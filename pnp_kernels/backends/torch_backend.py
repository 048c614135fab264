"""Pure-PyTorch backend: the dense row stage in chunks of query rows, on any device.

For a chunk of m query rows with at most P positives each, the working set is an
(m, P, n_cols) tile, never Q x M x M: the chunk size is chosen so that the tile
stays under ``max_tile_elems`` elements. Rows of one class are usually
consecutive and share P, so padding is rare.

With x[p, t, k] = (S_pk - S_pj_t) / tau for lane t (positive column j_t), the
negatives give neg_t = sum_k sigma(x) (the segment's columns are set to -inf, where
sigma and sigma' are exactly 0) and the P x P block of the positives gives pos_t
(Smooth-AP and Recall@k only). ``row_math.row_terms`` (shared with the tiled path)
turns them into the row loss and the lane weights a_t, b_t; then
    dS_pk = (1/tau) sum_t w_tk sigma'(x_ptk) - [k = j_t] (1/tau) sum_m w_tm sigma'(x_ptm)
with w = a_t on the negatives and b_t on the other positives.

This backend reads the class sizes on the host to plan its chunks, so on a GPU it
synchronises once per call; the Triton backend is the sync-free GPU path.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..spec import LossSpec
from ..variants import LOSS_PNP, LOSS_RECALL_AT_K
from .base import Backend
from .row_math import lane_mask, row_terms, sigmoid_prime

__all__ = ["TorchBackend", "DEFAULT_MAX_TILE_ELEMS"]

DEFAULT_MAX_TILE_ELEMS = 1 << 20


def _plan_chunks(cnt: List[int], n_cols: int, max_tile_elems: int) -> List[Tuple[int, int, int]]:
    """Split rows into consecutive chunks whose (rows x max P x n_cols) tile fits the budget."""
    chunks = []
    r0, q = 0, len(cnt)
    while r0 < q:
        p_max = max(cnt[r0], 1)
        r1 = r0 + 1
        while r1 < q:
            p_next = max(p_max, cnt[r1])
            if (r1 + 1 - r0) * p_next * n_cols > max_tile_elems:
                break
            p_max = p_next
            r1 += 1
        chunks.append((r0, r1, p_max))
        r0 = r1
    return chunks


class TorchBackend(Backend):
    """The chunked PyTorch implementation: any device, float32 and float64."""

    name = "torch"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    compute_dtypes = (torch.float32, torch.float64)
    sync_free = False  # plans its chunks on the host
    auto_devices = ("cpu", "cuda", "mps", "xpu")

    def __init__(self, max_tile_elems: int = DEFAULT_MAX_TILE_ELEMS):
        self.max_tile_elems = max_tile_elems

    def row_losses_and_dS(
        self,
        S: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        own: torch.Tensor,
        spec: LossSpec,
        compute_grad: bool,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        n_rows, n_cols = S.shape
        lo = lo.to(torch.int64)
        hi = hi.to(torch.int64)
        own = own.to(torch.int64)
        cnt = hi - lo
        out = torch.zeros(n_rows, dtype=S.dtype, device=S.device)
        G = torch.zeros_like(S) if compute_grad else None
        cols = torch.arange(n_cols, device=S.device)
        for r0, r1, p_max in _plan_chunks(cnt.tolist(), n_cols, self.max_tile_elems):
            lo_c, hi_c, own_c = lo[r0:r1], hi[r0:r1], own[r0:r1]
            if not bool((cnt[r0:r1] >= 1).any()):
                continue  # dropped queries: loss 0, gradient 0 (G already zero)
            t = torch.arange(p_max, device=S.device)
            lane = lane_mask(lo_c, hi_c, own_c, p_max, spec)  # (m, P): lane t is an active positive
            pcols = (lo_c[:, None] + t[None, :]).clamp(max=n_cols - 1)
            excluded = (cols[None, :] >= lo_c[:, None]) & (cols[None, :] < hi_c[:, None])  # (m, n)
            if spec.kind == LOSS_RECALL_AT_K:  # the own column is not ranked, wherever it lies
                excluded = excluded | (cols[None, :] == own_c[:, None])
            loss_c, W, W_pp = _dense_tile(S[r0:r1] / spec.anneal, pcols, lane, excluded, spec, compute_grad)
            out[r0:r1] = loss_c
            if G is not None and W is not None:
                # W[p, t, k] = d loss_p / d x_ptk over the negatives k, W_pp[p, t, u] over the other
                # positive lanes u; x_ptk = (S_pk - S_pj_t) / tau, so column k gets sum_t W_ptk / tau
                # and lane column j_t gets -sum_k W_ptk / tau.
                G_ext = torch.zeros(r1 - r0, n_cols + p_max, dtype=S.dtype, device=S.device)
                G_ext[:, :n_cols] = W.sum(dim=1) / spec.anneal
                at_pos = -W.sum(dim=2)
                if W_pp is not None:
                    at_pos = at_pos + W_pp.sum(dim=1) - W_pp.sum(dim=2)
                # Padded lanes go to spare columns n + t, so every index is unique (deterministic).
                in_row = t[None, :] < (hi_c - lo_c)[:, None]
                dst = torch.where(in_row, lo_c[:, None] + t[None, :], n_cols + t[None, :])
                G_ext.scatter_(1, dst, G_ext.gather(1, dst) + at_pos / spec.anneal)
                G[r0:r1] = G_ext[:, :n_cols]
        return out, G


def _dense_tile(S_c, pcols, lane, excluded, spec: LossSpec, compute_grad: bool):
    """One chunk of rows: (row losses, W over the negatives, W_pp over the positive lanes or
    None), the last two None without gradient."""
    s_pos = S_c.gather(1, pcols)  # S_pj / tau, (m, P)
    # negatives: the excluded columns at -inf, where sigmoid and sigma' are exactly 0 (no mask on the tile)
    x = S_c.masked_fill(excluded, float("-inf"))[:, None, :] - s_pos[:, :, None]  # (m, P, n)
    sig = torch.sigmoid(x)
    neg = sig.sum(dim=-1)  # (m, P), summed directly: exactly 0 without negatives
    sig_pp = x_pp = None
    pos = None
    if spec.kind != LOSS_PNP:
        # the P x P block of the positives: x_pp[p, t, u] = (S_pu - S_pt) / tau over active lanes u != t
        P = lane.shape[1]
        pair = lane[:, None, :] & ~torch.eye(P, dtype=torch.bool, device=S_c.device)[None]
        x_pp = s_pos[:, None, :] - s_pos[:, :, None]
        sig_pp = torch.sigmoid(x_pp).masked_fill_(~pair, 0.0)
        pos = sig_pp.sum(dim=-1)
    loss, a, b = row_terms(neg, pos, lane, spec, compute_grad)
    if not compute_grad:
        return loss, None, None
    W = sigmoid_prime(x, sig).mul_(a[:, :, None])
    if sig_pp is None or x_pp is None:
        return loss, W, None
    W_pp = sigmoid_prime(x_pp, sig_pp).mul_(b[:, :, None])
    return loss, W, W_pp
