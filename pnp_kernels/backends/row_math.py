"""The per-row math of every loss kind, in PyTorch, shared by the dense and the tiled paths.

A row p of a (queries x sorted reference) similarity block has the positives
[lo_p, hi_p); lane t of the row is the positive column j_t = lo_p + t. Recall@k
excludes the row's own column from the positives and from the ranked set, so its
lane there is inactive. For each active lane and z_tk = (S_pk - S_pj_t) / tau the
sweeps over the columns k give four sums:

    neg_t  = sum_{k negative} sigma(z_tk)         dneg_t = sum_{k negative} sigma'(z_tk)
    pos_t  = sum_{k positive, k != j_t} sigma(z)  dpos_t = the same sum of sigma'

(k "positive" excludes the own column for Recall@k). :func:`row_terms` turns them into
the row loss and two weights per lane, a_t on the negative columns and b_t on the other
positive columns, such that with W_tk = w_tk sigma'(z_tk) / tau (w = a_t or b_t):

    d loss_p / d S_pk = sum_t W_tk - [k = j_t] T_t,    T_t = (a_t dneg_t + b_t dpos_t) / tau

    PNP:       loss = (1/n) sum_t f(neg_t),               a_t = f'(neg_t) / n,  b_t = 0
    Smooth-AP: loss = (1/n) sum_t neg_t / all_t,          a_t = pos'_t / (n all_t^2),
               pos'_t = 1 + pos_t, all_t = pos'_t + neg_t  b_t = -neg_t / (n all_t^2)
    Recall@k:  r_t = 1 + neg_t + pos_t,  s_k = sum_t sigma((k - r_t)/tau2_k),
               loss = 1 - (1/|K|) sum_k min(s_k, k) / min(k, n),
               a_t = b_t = c_t = (1/|K|) sum_k [s_k < k] sigma'((k - r_t)/tau2_k) / (tau2_k min(k, n))

n is the number of active lanes; a row with none is dropped (loss 0, weights 0).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..spec import LossSpec
from ..variants import LOSS_PNP, LOSS_RECALL_AT_K, LOSS_SMOOTH_AP

__all__ = ["row_terms", "lane_mask", "sigmoid_prime"]

Tensor = torch.Tensor


def sigmoid_prime(z: Tensor, sig: Tensor) -> Tensor:
    """sigma'(z) = sigma(z) sigma(-z): exact in both tails, unlike s (1 - s)."""
    return torch.sigmoid(-z) * sig


def lane_mask(lo: Tensor, hi: Tensor, own: Tensor, n_lanes: int, spec: LossSpec) -> Tensor:
    """(rows, n_lanes) bool: lane t of row p is an active positive (Recall@k: not the own column)."""
    t = torch.arange(n_lanes, device=lo.device)
    lane = t[None, :] < (hi - lo)[:, None]
    if spec.kind == LOSS_RECALL_AT_K:
        lane = lane & ((lo[:, None] + t[None, :]) != own[:, None])
    return lane


def row_terms(
    neg: Tensor, pos: Optional[Tensor], lane: Tensor, spec: LossSpec, compute_grad: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    """(row loss, a, b) of rows from their lane sums (module docstring); ``pos`` may be None
    for PNP, which does not use it. Inactive lanes and dropped rows get weight 0."""
    lanef = lane.to(neg.dtype)
    n = lanef.sum(dim=1)
    valid = n >= 1
    inv_n = torch.where(valid, 1.0 / n.clamp(min=1), torch.zeros_like(n))
    zero = torch.zeros((), dtype=neg.dtype, device=neg.device)
    if spec.kind == LOSS_PNP:
        v = spec.variant
        loss = (torch.where(lane, v.f(neg, spec.alpha, spec.b), zero)).sum(dim=1) * inv_n
        if not compute_grad:
            return loss, neg, neg
        a = torch.where(lane, v.df(neg, spec.alpha, spec.b), zero) * inv_n[:, None]
        return loss, a, torch.zeros_like(a)
    assert pos is not None, "Smooth-AP and Recall@k need the positive sums"
    if spec.kind == LOSS_SMOOTH_AP:
        pos1 = 1.0 + pos
        all_ = pos1 + neg
        loss = torch.where(lane, neg / all_, zero).sum(dim=1) * inv_n
        if not compute_grad:
            return loss, neg, neg
        scale = lanef * inv_n[:, None] / (all_ * all_)
        return loss, pos1 * scale, -neg * scale
    if spec.kind == LOSS_RECALL_AT_K:
        r = 1.0 + neg + pos
        total = torch.zeros_like(n)
        c = torch.zeros_like(r)
        for k, t2 in zip(spec.ks, spec.k_temperatures):
            u = (k - r) / t2
            sg = torch.where(lane, torch.sigmoid(u), zero)
            s = sg.sum(dim=1)
            norm = n.clamp(max=k).clamp(min=1)
            total = total + torch.clamp(s, max=k) / norm
            if compute_grad:
                unclipped = (s < k).to(r.dtype)
                c = c + sigmoid_prime(u, sg) * (unclipped / (t2 * norm))[:, None]
        n_k = len(spec.ks)
        loss = torch.where(valid, 1.0 - total / n_k, torch.zeros_like(total))
        if not compute_grad:
            return loss, neg, neg
        c = torch.where(lane & valid[:, None], c / n_k, zero)
        return loss, c, c
    raise ValueError(f"kind: unknown loss kind {spec.kind}")
