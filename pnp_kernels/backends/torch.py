"""Pure-PyTorch backend: the fused algorithm in chunks of query rows, any device.

For a chunk of m query rows with at most P positives each, the working set is an
(m, P, n_cols) tile, never B^3: the chunk size is chosen so that the tile stays
under ``max_tile_elems`` elements. Rows are in label-sorted order, so rows of
one class are consecutive and share P, and padding is rare.

Interface shared by every backend (see ``pnp_kernels.autograd``):

    rows_forward(S, lo, hi, variant, anneal, alpha, b, compute_grad)
        -> (per_row_loss[Q], G[Q, n] or None)
    symmetric_grad(G, row_grad) -> diag(g) G + (diag(g) G)^T

where ``per_row_loss[p] = mean_{j in [lo_p, hi_p)} f(R_pj)`` (0 for rows with
fewer than two positives) and ``G[p, :] = d per_row_loss[p] / d S[p, :]``.
This backend synchronises with the device to plan its chunks (it reads the
class sizes); the Triton backend is the sync-free GPU path.
"""
from __future__ import annotations

import torch

from ..variants import Variant

__all__ = ["rows_forward", "symmetric_grad", "is_available", "why_unavailable"]

DEFAULT_MAX_TILE_ELEMS = 1 << 20


def is_available() -> bool:
    return True


def why_unavailable() -> str:
    return ""


def _plan_chunks(cnt: torch.Tensor, n_cols: int, max_tile_elems: int):
    """Split rows into consecutive chunks whose (rows x max P x n_cols) tile fits the budget."""
    counts = cnt.tolist()
    chunks = []
    r0, q = 0, len(counts)
    while r0 < q:
        p_max = max(counts[r0], 1)
        r1 = r0 + 1
        while r1 < q:
            p_next = max(p_max, counts[r1])
            if (r1 + 1 - r0) * p_next * n_cols > max_tile_elems:
                break
            p_max = p_next
            r1 += 1
        chunks.append((r0, r1, p_max))
        r0 = r1
    return chunks


def rows_forward(
    S: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    variant: Variant,
    anneal: float,
    alpha: float,
    b: float,
    compute_grad: bool,
    max_tile_elems: int = DEFAULT_MAX_TILE_ELEMS,
):
    """Per-row PNP loss of a (queries x gallery) similarity block, and its dS if asked."""
    n_rows, n_cols = S.shape
    lo = lo.to(torch.int64)
    hi = hi.to(torch.int64)
    cnt = hi - lo
    out = torch.zeros(n_rows, dtype=S.dtype, device=S.device)
    G = torch.zeros_like(S) if compute_grad else None
    cols = torch.arange(n_cols, device=S.device)
    for r0, r1, p_max in _plan_chunks(cnt.cpu(), n_cols, max_tile_elems):
        lo_c, hi_c, cnt_c = lo[r0:r1], hi[r0:r1], cnt[r0:r1]
        valid = cnt_c >= 2
        if not bool(valid.any()):
            continue  # dropped queries: loss 0, gradient 0 (G already zero)
        m = r1 - r0
        t = torch.arange(p_max, device=S.device)
        pmask = t[None, :] < cnt_c[:, None]                       # (m, P)
        pcols = (lo_c[:, None] + t[None, :]).clamp(max=n_cols - 1)
        S_c = S[r0:r1] / anneal                                   # S / tau, (m, n)
        s_pos = S_c.gather(1, pcols)                              # S_pj / tau, (m, P)
        # Non-negatives at -inf: their sigmoid is exactly 0 (and sigma' too), no mask on the tile.
        neg = (cols[None, :] < lo_c[:, None]) | (cols[None, :] >= hi_c[:, None])
        S_neg = S_c.masked_fill(~neg, float("-inf"))
        # x[p, j, k] = (S_pk - S_pj) / tau: negative k ranked above positive j when x > 0.
        x = S_neg[:, None, :] - s_pos[:, :, None]                 # (m, P, n)
        sig = torch.sigmoid(x)
        R = sig.sum(dim=-1)                                       # (m, P)
        w = torch.where(valid, 1.0 / cnt_c.clamp(min=1).to(S.dtype), torch.zeros_like(s_pos[:, 0]))
        pm = pmask.to(S.dtype)
        out[r0:r1] = (variant.f(R, alpha, b) * pm).sum(dim=1) * w
        if compute_grad:
            coef = variant.df(R, alpha, b) * pm * w[:, None]       # d loss_p / d R_pj
            # sigma'(x) = sigma(x) sigma(-x): exact in both tails, unlike s (1 - s).
            sp = torch.sigmoid(x.neg_()).mul_(sig)
            # negatives: G_pk = (1/tau) sum_j c_j sigma'_pjk
            G_ext = torch.zeros(m, n_cols + p_max, dtype=S.dtype, device=S.device)
            G_ext[:, :n_cols] = torch.bmm(coef.unsqueeze(1), sp).squeeze(1) / anneal
            # positives: G_pj = -(1/tau) c_j sum_k sigma'_pjk; padded lanes go to spare columns
            # n + t, so every scattered index is unique (deterministic on every device).
            g_pos = -(coef * sp.sum(dim=-1)) / anneal
            dst = torch.where(pmask, lo_c[:, None] + t[None, :], n_cols + t[None, :])
            G_ext.scatter_(1, dst, g_pos)
            G[r0:r1] = G_ext[:, :n_cols]
    return out, G


def symmetric_grad(G: torch.Tensor, row_grad: torch.Tensor) -> torch.Tensor:
    """dL/dS of S = X X^T folded onto one factor: diag(g) G + (diag(g) G)^T."""
    Gs = G * row_grad[:, None].to(G.dtype)
    return Gs + Gs.t()
