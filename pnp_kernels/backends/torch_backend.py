"""Pure-PyTorch backend: the row stage in chunks of query rows, on any device.

For a chunk of m query rows with at most P positives each, the working set is an
(m, P, n_cols) tile, never Q x M x M: the chunk size is chosen so that the tile
stays under ``max_tile_elems`` elements. Rows of one class are usually
consecutive and share P, so padding is rare.

PNP: x[p, j, k] = (S_pk - S_pj) / tau, R_pj = sum_k neg sigmoid(x),
row_loss = mean_j f(R_pj), and with c_j = f'(R_pj) / n:
    dS_pk = (1/tau) sum_j c_j sigma'(x_pjk)   (k negative),
    dS_pj = -(1/tau) c_j sum_k sigma'(x_pjk)  (j positive).
Smooth-AP: neg_j as R above, pos_j = 1 + sum_{k pos, k != j} sigmoid(x),
row_loss = mean_j neg_j / (pos_j + neg_j); with a_j = pos_j / (n all_j^2),
b_j = neg_j / (n all_j^2), W_jk = (a_j for k negative, -b_j for k positive != j)
sigma'(x_pjk) / tau:  dS_pm = sum_j W_jm - [m positive] sum_k W_mk.

This backend reads the class sizes on the host to plan its chunks, so on a GPU it
synchronises once per call; the Triton backend is the sync-free GPU path.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..spec import LossSpec
from ..variants import LOSS_PNP
from .base import Backend

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
        self, S: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: LossSpec, compute_grad: bool
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        n_rows, n_cols = S.shape
        lo = lo.to(torch.int64)
        hi = hi.to(torch.int64)
        cnt = hi - lo
        out = torch.zeros(n_rows, dtype=S.dtype, device=S.device)
        G = torch.zeros_like(S) if compute_grad else None
        cols = torch.arange(n_cols, device=S.device)
        tile = _pnp_tile if spec.kind == LOSS_PNP else _smooth_ap_tile
        for r0, r1, p_max in _plan_chunks(cnt.tolist(), n_cols, self.max_tile_elems):
            lo_c, hi_c, cnt_c = lo[r0:r1], hi[r0:r1], cnt[r0:r1]
            valid = cnt_c >= 1
            if not bool(valid.any()):
                continue  # dropped queries: loss 0, gradient 0 (G already zero)
            t = torch.arange(p_max, device=S.device)
            pmask = t[None, :] < cnt_c[:, None]  # (m, P): lane j is a positive of the row
            pcols = (lo_c[:, None] + t[None, :]).clamp(max=n_cols - 1)
            w = torch.where(valid, 1.0 / cnt_c.clamp(min=1).to(S.dtype), torch.zeros_like(cnt_c, dtype=S.dtype))
            in_seg = (cols[None, :] >= lo_c[:, None]) & (cols[None, :] < hi_c[:, None])  # (m, n)
            loss_c, W, W_pp = tile(S[r0:r1] / spec.anneal, pcols, pmask, in_seg, w, spec, compute_grad)
            out[r0:r1] = loss_c
            if G is not None and W is not None:
                # W[p, j, k] = d loss_p / d x_pjk over the negatives k, W_pp[p, j, t] over the positive
                # lanes t (Smooth-AP); x_pjk = (S_pk - S_pj) / tau, so column k gets sum_j W_pjk / tau
                # and positive column j gets -sum_k W_pjk / tau.
                G_ext = torch.zeros(r1 - r0, n_cols + p_max, dtype=S.dtype, device=S.device)
                G_ext[:, :n_cols] = W.sum(dim=1) / spec.anneal
                at_pos = -W.sum(dim=2)
                if W_pp is not None:
                    at_pos = at_pos + W_pp.sum(dim=1) - W_pp.sum(dim=2)
                # Padded lanes go to spare columns n + t, so every index is unique (deterministic).
                dst = torch.where(pmask, lo_c[:, None] + t[None, :], n_cols + t[None, :])
                G_ext.scatter_(1, dst, G_ext.gather(1, dst) + at_pos / spec.anneal)
                G[r0:r1] = G_ext[:, :n_cols]
        return out, G


def _negatives(S_c, pcols, in_seg):
    """(x, sigmoid(x)) over the negatives: x[p, j, k] = (S_pk - S_pj) / tau, -inf at the
    positive columns, where sigmoid and sigma' are then exactly 0 (no mask on the tile)."""
    s_pos = S_c.gather(1, pcols)  # S_pj / tau, (m, P)
    x = S_c.masked_fill(in_seg, float("-inf"))[:, None, :] - s_pos[:, :, None]  # (m, P, n)
    return s_pos, x, torch.sigmoid(x)


def _pnp_tile(S_c, pcols, pmask, in_seg, w, spec: LossSpec, compute_grad: bool):
    """PNP on one chunk of rows: (row losses, W = d loss / d x over the negatives or None, None)."""
    v = spec.variant
    _, x, sig = _negatives(S_c, pcols, in_seg)
    R = sig.sum(dim=-1)  # (m, P)
    pm = pmask.to(S_c.dtype)
    loss = (v.f(R, spec.alpha, spec.b) * pm).sum(dim=1) * w
    if not compute_grad:
        return loss, None, None
    coef = v.df(R, spec.alpha, spec.b) * pm * w[:, None]  # d loss_p / d R_pj
    # sigma'(x) = sigma(x) sigma(-x): exact in both tails, unlike s (1 - s).
    sp = torch.sigmoid(x.neg_()).mul_(sig)
    return loss, sp.mul_(coef[:, :, None]), None


def _smooth_ap_tile(S_c, pcols, pmask, in_seg, w, spec: LossSpec, compute_grad: bool):
    """Smooth-AP on one chunk of rows: (row losses, W over the negatives, W_pp over the
    positive lanes), or (row losses, None, None) without gradient."""
    s_pos, x, sig = _negatives(S_c, pcols, in_seg)
    neg = sig.sum(dim=-1)  # (m, P), summed directly: exactly 0 without negatives
    # the P x P block of the positives: x_pp[p, j, t] = (S_pt - S_pj) / tau over lanes t != j
    P = pmask.shape[1]
    pair = pmask[:, None, :] & ~torch.eye(P, dtype=torch.bool, device=S_c.device)[None]
    x_pp = s_pos[:, None, :] - s_pos[:, :, None]
    sig_pp = torch.sigmoid(x_pp).masked_fill_(~pair, 0.0)
    pos = 1.0 + sig_pp.sum(dim=-1)
    all_ = pos + neg
    pm = pmask.to(S_c.dtype)
    loss = (neg / all_ * pm).sum(dim=1) * w
    if not compute_grad:
        return loss, None, None
    scale = pm * w[:, None] / (all_ * all_)
    a = (pos * scale)[:, :, None]  # d loss / d neg_j
    b = (neg * scale)[:, :, None]  # -d loss / d pos_j
    sp = torch.sigmoid(x.neg_()).mul_(sig).mul_(a)
    sp_pp = torch.sigmoid(x_pp.neg_()).mul_(sig_pp).mul_(-b)
    return loss, sp, sp_pp
