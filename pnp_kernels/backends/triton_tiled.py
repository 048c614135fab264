"""Fused Triton kernels of the memory-efficient stage: no Q x M buffer, FlashAttention-style.

S = Xq Xr^T is never stored: every kernel recomputes the tiles it needs with ``tl.dot``
and keeps only per-row and per-(row, lane) statistics between the passes. Lane t of
row p is the positive column j_t = lo_p + t (t < hi_p - lo_p); z_tk = (S_pk - S_pj_t) / tau.
The per-row math is the dense row kernel's (``triton_kernels``: ``_variant_f_df``,
``_smooth_ap_terms`` and the Recall@k helpers), called here, not copied.

forward (``_tiled_fwd_kernel``, one program per block of BLOCK_M rows). Lanes are taken
    in chunks of BLOCK_P (as many chunks as the block's longest segment needs; a row with
    more positives than BLOCK_P costs one more sweep per chunk). Per chunk: the lanes' own
    similarities S_pj_t (the anchors, by dot products), then one sweep over the column
    tiles, each S tile recomputed once and, lane by lane (a loop, so that one lane's
    temporaries are live at a time), accumulated:
        PNP:       neg_t, dneg_t = sums of sigma, sigma' over the negatives (outside the segment)
        Smooth-AP: the same, plus pos_t, dpos_t over the other columns of the segment
        Recall@k:  r_t - 1, dr_t over every ranked column (not the own column, not j_t)
    then the lane terms of the loss and the weights a_t, b_t, T_t = (a dneg + b dpos) / tau
    (``row_math``). Recall@k's weights need the sums s_k over all lanes of a row: the chunks
    accumulate them in registers and park r_t and dr_t in the state; a per-row epilogue
    finishes the lanes from s_k.
    The state kept for the backward is (Q, n_cap + k_slots, 4) float32: [a, b, T, anchor] of
    the lanes t < n_cap, then Recall@k's s_k. n_cap is chosen from the shapes alone
    (``lane_capacity``: at least 64 lanes, more while the state stays within 64 MiB and
    Q * M / 8 numbers).
row sweep (``_tiled_bwd_rows_kernel``, one program per row block and slice of D; D wider
    than ``TiledConfig.block_do`` is split over programs that each recompute their tiles, so
    the backend takes ``triton_strips`` for such rows):
    per column tile, S recomputed and the G tile formed in registers,
        G_pk = (1/tau) sum_t w_tk sigma'(z_tk) - [k = j_t] T_t,
    w = a_t on the negatives, b_t on the segment's other columns (Recall@k: c_t on every
    ranked column); dXq_blk += (g * G) Xr_tile.
column sweep (``_tiled_bwd_cols_kernel``, one program per column block and slice of D):
    the same G tiles over every row block, dXr_blk += (g * G)^T Xq_blk. Each output
    row has one owner and a fixed summation order: deterministic, no atomics.

Precision. float32 rows (normalised by the preparation): S tiles in tf32 when
``torch.backends.cuda.matmul.allow_tf32`` is set, else ``FLOAT32_DOT`` (tf32x3: three
TF32 products, about float32 accuracy). float16 / bfloat16 rows are kept as they are
(unnormalised): S tiles take the half values with float32 accumulation, and cosine is
the raw product rescaled by float32 inverse row norms. The backward product G X never
rounds G to one half or TF32 term: G (already scaled by g and the inverse norms) is
split into three bfloat16 terms for bfloat16 rows, and multiplied as tf32x3 for float16
rows (exact in TF32: G split in two) and float32 rows (both operands split). Results are
float32 gradients with respect to the normalised rows. The GPU tile shapes
(``_GPU_CONFIG``) are chosen for no register spills on sm_90, not tuned by timing.

Lanes beyond the state (a row with more than n_cap positives): the backward takes them in
windows of lanes [lane0, lane0 + n_cap'), recomputing each window's state (the forward
kernel without the loss) into one scratch buffer and running both sweeps on it, adding to
the gradients. The number of windows follows from the shapes (every lane a row could
have); a window that no row reaches costs three launches whose programs return at once.

Synchronisation: none. Nothing reads a device value on the host, forward or backward.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..spec import NORM_EPS, LossSpec
from ..variants import LOSS_PNP, LOSS_RECALL_AT_K, LOSS_SMOOTH_AP
from . import triton_kernels as tk

__all__ = [
    "FLOAT32_DOT",
    "STATE_SLOTS",
    "TiledConfig",
    "config",
    "inverse_norms",
    "lane_capacity",
    "tiled_grads",
    "tiled_rows",
]

_LOG2E = 1.4426950408889634
STATE_SLOTS = 4  # per (row, lane): a, b, T, anchor S_pj * log2(e) / tau
# input_precision of float32 tile products when TF32 is not allowed (tf32x3 ~ float32;
# "ieee" is exact float32 on the CUDA cores, several times slower)
FLOAT32_DOT = "tf32x3"
_HALF = (torch.float16, torch.bfloat16)

try:  # optional at import time, as in triton_kernels (whose helpers the kernels call)
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  # pragma: no cover - depends on the environment
    triton = None
    tl = None

if triton is not None and tk.triton is not None:
    _LOSS_PNP = tk._LOSS_PNP
    _LOSS_SMOOTH_AP = tk._LOSS_SMOOTH_AP
    _LOSS_RECALL_AT_K = tk._LOSS_RECALL_AT_K
    _variant_f_df = tk._variant_f_df
    _smooth_ap_terms = tk._smooth_ap_terms
    _recall_k_params = tk._recall_k_params
    _recall_k_sums_rows = tk._recall_k_sums_rows
    _recall_k_weights = tk._recall_k_weights
    _recall_lane_coefs = tk._recall_lane_coefs

    @triton.jit
    def _s_tile(
        xq_ptr,
        xr_ptr,
        rows,
        rmask,
        cols,
        cmask,
        iq,
        ir,
        D,
        stride_q,
        stride_r,
        zscale,
        HAS_NORM: tl.constexpr,
        S_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """(BLOCK_M, BLOCK_N) float32 tile S_pk * log2(e) / tau (zscale), recomputed: the
        rows' dtype as it is into tl.dot, float32 accumulation, then the inverse norms."""
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        offs_d0 = tl.arange(0, BLOCK_D)
        q_rows = xq_ptr + rows.to(tl.int64)[:, None] * stride_q
        r_cols = xr_ptr + cols.to(tl.int64)[None, :] * stride_r
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            dm = offs_d < D
            a = tl.load(q_rows + offs_d[None, :], mask=rmask[:, None] & dm[None, :], other=0.0)
            b = tl.load(r_cols + offs_d[:, None], mask=dm[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=S_PREC)
        if HAS_NORM:
            acc = acc * iq[:, None] * ir[None, :]
        return acc * zscale

    @triton.jit
    def _lane_anchors(
        xq_ptr,
        xr_ptr,
        ir_ptr,
        rows,
        rmask,
        lo,
        cnt,
        c0,
        iq,
        D,
        stride_q,
        stride_r,
        zscale,
        HAS_NORM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """(BLOCK_M, BLOCK_P) anchors S_pj_t * zscale of the lanes c0 + t (0 on missing lanes),
        by float32 dot products (products of half values are exact in float32)."""
        offs_p0 = tl.arange(0, BLOCK_P)
        offs_d0 = tl.arange(0, BLOCK_D)
        anc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
        q_rows = xq_ptr + rows.to(tl.int64)[:, None] * stride_q
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            dm = offs_d < D
            xq = tl.load(q_rows + offs_d[None, :], mask=rmask[:, None] & dm[None, :], other=0.0).to(tl.float32)
            for t in range(0, BLOCK_P):  # a loop, not unrolled: one lane's operands live at a time
                ok = rmask & (c0 + t < cnt)
                j = (lo + c0 + t).to(tl.int64)
                xr = tl.load(
                    xr_ptr + j[:, None] * stride_r + offs_d[None, :], mask=ok[:, None] & dm[None, :], other=0.0
                )
                v = tl.sum(xq * xr.to(tl.float32), axis=1)
                anc += tl.where(offs_p0[None, :] == t, v[:, None], 0.0)
        if HAS_NORM:
            lanes = c0 + offs_p0
            lm = rmask[:, None] & (lanes[None, :] < cnt[:, None])
            ir = tl.load(ir_ptr + lo[:, None] + lanes[None, :], mask=lm, other=0.0)
            anc = anc * iq[:, None] * ir
        return anc * zscale

    @triton.jit
    def _lane(v, sel):
        """Column ``sel`` of a (BLOCK_M, BLOCK_P) tensor, as a (BLOCK_M,) vector."""
        return tl.sum(tl.where(sel, v, 0.0), axis=1)

    @triton.jit
    def _recall_epilogue(
        st_ptr,
        lo_ptr,
        hi_ptr,
        own_ptr,
        kp_ptr,
        loss_ptr,
        r0,
        Q,
        n_lanes,
        n_cap,
        lane0,
        inv_tau,
        WITH_LOSS: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        NUM_K: tl.constexpr,
        K_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """Recall@k, row by row: from the row sums s_k (the slots after the n_cap lanes of a
        state row) the loss and per-k weights, then c_t of the parked lanes lane0 + l (l < n_cap);
        the state becomes (c, c, c dr / tau, anchor); a row with no active lane gets loss 0 and
        zero weights."""
        k, t2, kmask = _recall_k_params(kp_ptr, NUM_K, K_BLOCK)
        offs_p0 = tl.arange(0, BLOCK_P)
        offs_k = tl.arange(0, K_BLOCK)
        for i in range(0, BLOCK_M):
            row = r0 + i
            if row < Q:
                lo = tl.load(lo_ptr + row)
                hi = tl.load(hi_ptr + row)
                own = tl.load(own_ptr + row)
                cnt = hi - lo
                n = cnt - ((own >= lo) & (own < hi)).to(tl.int32)
                st_row = st_ptr + row.to(tl.int64) * (n_lanes * 4)
                n_here = tl.minimum(cnt - lane0, n_cap)  # parked lanes of this row (<= 0: none)
                loss = 0.0
                if n >= 1:
                    s = tl.load(st_row + n_cap * 4 + offs_k, mask=kmask, other=0.0)
                    loss, w = _recall_k_weights(s, n.to(tl.float32), k, t2, kmask, NUM_K)
                    if COMPUTE_GRAD:
                        for c0 in range(0, n_here, BLOCK_P):
                            lanes = c0 + offs_p0
                            lm = lanes < n_here
                            r = tl.load(st_row + lanes * 4, mask=lm, other=1.0)
                            dr = tl.load(st_row + lanes * 4 + 2, mask=lm, other=0.0)
                            c = _recall_lane_coefs(r, lm & (lo + lane0 + lanes != own), w, k, t2)
                            tl.store(st_row + lanes * 4, c, mask=lm)
                            tl.store(st_row + lanes * 4 + 1, c, mask=lm)
                            tl.store(st_row + lanes * 4 + 2, c * dr * inv_tau, mask=lm)
                elif COMPUTE_GRAD:
                    for c0 in range(0, n_here, BLOCK_P):
                        lanes = c0 + offs_p0
                        lm = lanes < n_here
                        zero = tl.zeros([BLOCK_P], dtype=tl.float32)
                        tl.store(st_row + lanes * 4, zero, mask=lm)
                        tl.store(st_row + lanes * 4 + 1, zero, mask=lm)
                        tl.store(st_row + lanes * 4 + 2, zero, mask=lm)
                if WITH_LOSS:
                    tl.store(loss_ptr + row, loss)

    @triton.jit
    def _tiled_fwd_kernel(
        xq_ptr,
        xr_ptr,
        iq_ptr,
        ir_ptr,
        lo_ptr,
        hi_ptr,
        own_ptr,
        kp_ptr,
        loss_ptr,
        st_ptr,
        Q,
        M,
        D,
        stride_q,
        stride_r,
        n_lanes,
        n_cap,
        lane0,
        zscale,
        inv_tau,
        alpha,
        beta,
        LOSS: tl.constexpr,
        VARIANT: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        WITH_LOSS: tl.constexpr,
        HAS_NORM: tl.constexpr,
        S_PREC: tl.constexpr,
        NUM_K: tl.constexpr,
        K_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        # Rows [pid * BLOCK_M, +BLOCK_M). WITH_LOSS (the forward): every lane of the rows for
        # their losses (Recall@k: the row sums s_k, kept in the slots after the lanes), and
        # (COMPUTE_GRAD) the state of the window's lanes t < n_cap: st[p, t] = (a, b, T, anchor),
        # row stride n_lanes * 4. Without WITH_LOSS: the state of the window [lane0, lane0 +
        # n_cap) only, stored at t - lane0 (Recall@k: s_k already in the slots). Recall@k parks
        # (r, -, dr, anchor) first, for the per-row epilogue.
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < Q
        lo = tl.load(lo_ptr + rows, mask=rmask, other=0)
        hi = tl.load(hi_ptr + rows, mask=rmask, other=0)
        cnt = hi - lo
        cnt_max = tl.max(cnt, axis=0)
        if LOSS == _LOSS_RECALL_AT_K:
            own = tl.load(own_ptr + rows, mask=rmask, other=-1)
            k, t2, kmask = _recall_k_params(kp_ptr, NUM_K, K_BLOCK)
        else:
            own = lo  # not read
        if HAS_NORM:
            iq = tl.load(iq_ptr + rows, mask=rmask, other=0.0)
        else:
            iq = tl.zeros([BLOCK_M], dtype=tl.float32)  # not read
        inv_cnt = 1.0 / tl.maximum(cnt, 1).to(tl.float32)
        seg_lo = tl.min(tl.where(rmask & (cnt > 0), lo, M), axis=0)
        seg_hi = tl.max(hi, axis=0)
        offs_p0 = tl.arange(0, BLOCK_P)
        offs_n0 = tl.arange(0, BLOCK_N)
        st_rows = st_ptr + rows.to(tl.int64)[:, None] * (n_lanes * 4)
        loss_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        s_acc = tl.zeros([BLOCK_M, K_BLOCK], dtype=tl.float32)
        if WITH_LOSS:
            c_end = cnt_max
        else:
            c_end = tl.minimum(cnt_max, lane0 + n_cap)
        for c0 in range(lane0, c_end, BLOCK_P):
            lanes = c0 + offs_p0
            lane_ok = rmask[:, None] & (lanes[None, :] < cnt[:, None])
            keep = lane_ok & (lanes[None, :] - lane0 < n_cap)  # the lanes whose state is stored
            anc = _lane_anchors(
                xq_ptr, xr_ptr, ir_ptr, rows, rmask, lo, cnt, c0, iq, D, stride_q, stride_r, zscale,
                HAS_NORM, BLOCK_M, BLOCK_P, BLOCK_D,
            )  # fmt: skip
            # sums over the columns, per lane: acc1/acc2 of sigma/sigma' over the negatives
            # (Recall@k: every ranked column), acc3/acc4 over the segment (Smooth-AP)
            acc1 = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
            acc3 = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
            acc4 = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
            for n0 in range(0, M, BLOCK_N):
                cols = n0 + offs_n0
                cmask = cols < M
                if HAS_NORM:
                    ir = tl.load(ir_ptr + cols, mask=cmask, other=0.0)
                else:
                    ir = tl.zeros([BLOCK_N], dtype=tl.float32)  # not read
                zk = _s_tile(
                    xq_ptr, xr_ptr, rows, rmask, cols, cmask, iq, ir, D, stride_q, stride_r, zscale,
                    HAS_NORM, S_PREC, BLOCK_M, BLOCK_N, BLOCK_D,
                )  # fmt: skip
                colsb = cols[None, :]
                if LOSS == _LOSS_RECALL_AT_K:
                    m1 = cmask[None, :] & (colsb != own[:, None])
                else:
                    m1 = cmask[None, :] & ((colsb < lo[:, None]) | (colsb >= hi[:, None]))
                in_seg = (n0 < seg_hi) & (n0 + BLOCK_N > seg_lo)
                for t in range(0, tl.minimum(cnt_max - c0, BLOCK_P)):  # the chunk's lanes, one at a time
                    sel = offs_p0[None, :] == t
                    # x = (S_pj - S_pk) log2(e) / tau: sigma(z) = 1 / (1 + 2^x), sigma' = 2^x sigma^2
                    # (2^x clamped at 2^100, keeping NaN: NaN in, NaN out)
                    x = _lane(anc, sel)[:, None] - zk
                    if COMPUTE_GRAD:
                        e = tl.exp2(tl.minimum(x, 100.0, propagate_nan=tl.PropagateNan.ALL))
                        sig = 1.0 / (1.0 + e)
                        sp = e * sig * sig
                    else:
                        sig = 1.0 / (1.0 + tl.exp2(x))
                        sp = sig  # not used
                    if LOSS == _LOSS_RECALL_AT_K:
                        m = m1 & (colsb != (lo + c0 + t)[:, None])
                    else:
                        m = m1
                    acc1 += tl.where(sel, tl.sum(tl.where(m, sig, 0.0), axis=1)[:, None], 0.0)
                    if COMPUTE_GRAD:
                        acc2 += tl.where(sel, tl.sum(tl.where(m, sp, 0.0), axis=1)[:, None], 0.0)
                    if LOSS == _LOSS_SMOOTH_AP:
                        if in_seg:
                            m2 = (
                                cmask[None, :]
                                & (colsb >= lo[:, None])
                                & (colsb < hi[:, None])
                                & (colsb != (lo + c0 + t)[:, None])
                            )
                            acc3 += tl.where(sel, tl.sum(tl.where(m2, sig, 0.0), axis=1)[:, None], 0.0)
                            if COMPUTE_GRAD:
                                acc4 += tl.where(sel, tl.sum(tl.where(m2, sp, 0.0), axis=1)[:, None], 0.0)
            st = st_rows + (lanes - lane0)[None, :] * 4
            if LOSS == _LOSS_RECALL_AT_K:
                r = 1.0 + acc1
                if WITH_LOSS:  # s_k += sigma((k - r_t) / tau2_k) over the chunk's active lanes
                    act = lane_ok & ((lo[:, None] + lanes[None, :]) != own[:, None])
                    s_acc += _recall_k_sums_rows(r, act, k, t2)
                tl.store(st, r, mask=keep)
                tl.store(st + 2, acc2, mask=keep)
                tl.store(st + 3, anc, mask=keep)
            else:
                if LOSS == _LOSS_SMOOTH_AP:
                    ratio, a, b_pos = _smooth_ap_terms(acc1, 1.0 + acc3, lane_ok, inv_cnt[:, None])
                    loss_acc += tl.sum(ratio, axis=1)
                    bw = -b_pos
                    T = (a * acc2 + bw * acc4) * inv_tau
                else:
                    tl.static_assert(LOSS == _LOSS_PNP)
                    f, df = _variant_f_df(acc1, alpha, beta, VARIANT)
                    loss_acc += tl.sum(tl.where(lane_ok, f, 0.0), axis=1)
                    a = tl.where(lane_ok, df * inv_cnt[:, None], 0.0)
                    bw = tl.zeros_like(a)
                    T = a * acc2 * inv_tau
                if COMPUTE_GRAD:
                    tl.store(st, a, mask=keep)
                    tl.store(st + 1, bw, mask=keep)
                    tl.store(st + 2, T, mask=keep)
                    tl.store(st + 3, anc, mask=keep)
        if LOSS == _LOSS_RECALL_AT_K:
            if WITH_LOSS:
                offs_k = tl.arange(0, K_BLOCK)
                s_ptrs = st_rows + n_cap * 4 + offs_k[None, :]
                tl.store(s_ptrs, s_acc, mask=rmask[:, None] & kmask[None, :])
            if cnt_max > lane0:
                tl.debug_barrier()  # the parked lanes and the sums land before the epilogue reads them
                _recall_epilogue(
                    st_ptr, lo_ptr, hi_ptr, own_ptr, kp_ptr, loss_ptr, pid * BLOCK_M, Q, n_lanes, n_cap,
                    lane0, inv_tau, WITH_LOSS, COMPUTE_GRAD, NUM_K, K_BLOCK, BLOCK_M, BLOCK_P,
                )  # fmt: skip
            elif WITH_LOSS:
                tl.store(loss_ptr + rows, tl.zeros([BLOCK_M], dtype=tl.float32), mask=rmask)
        elif WITH_LOSS:
            tl.store(loss_ptr + rows, loss_acc * inv_cnt, mask=rmask)

    @triton.jit
    def _grad_tile(
        zk,
        st_ptr,
        rows,
        rmask,
        lo,
        hi,
        cw,
        cw_max,
        lane0,
        own,
        cols,
        cmask,
        n_lanes,
        inv_tau,
        LOSS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """(BLOCK_M, BLOCK_N) tile of G = d row_loss / dS from the state of the lanes lane0 + l,
        l < cw (per row, at most n_cap; slot l of the state): the part of
        G_pk = (1/tau) sum_t w_tk sigma'(z_tk) - [k = j_t] T_t that these lanes contribute."""
        offs_p0 = tl.arange(0, BLOCK_P)
        colsb = cols[None, :]
        if LOSS == _LOSS_RECALL_AT_K:
            m1 = cmask[None, :] & (colsb != own[:, None])
        else:
            m1 = cmask[None, :] & ((colsb < lo[:, None]) | (colsb >= hi[:, None]))
        G = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        st_rows = st_ptr + rows.to(tl.int64)[:, None] * (n_lanes * 4)
        for c0 in range(0, cw_max, BLOCK_P):
            lanes = c0 + offs_p0
            lm = rmask[:, None] & (lanes[None, :] < cw[:, None])
            st = st_rows + lanes[None, :] * 4
            a = tl.load(st, mask=lm, other=0.0) * inv_tau
            T = tl.load(st + 2, mask=lm, other=0.0)
            anc = tl.load(st + 3, mask=lm, other=0.0)
            if LOSS == _LOSS_SMOOTH_AP:
                bw = tl.load(st + 1, mask=lm, other=0.0) * inv_tau
            else:
                bw = a  # not read
            for t in range(0, tl.minimum(cw_max - c0, BLOCK_P)):  # the chunk's lanes, one at a time
                sel = offs_p0[None, :] == t
                j = lo + lane0 + c0 + t
                x = tl.minimum(_lane(anc, sel)[:, None] - zk, 100.0, propagate_nan=tl.PropagateNan.ALL)
                e = tl.exp2(x)
                sig = 1.0 / (1.0 + e)
                sp = e * sig * sig
                a_t = _lane(a, sel)[:, None]
                if LOSS == _LOSS_SMOOTH_AP:
                    m2 = cmask[None, :] & (colsb >= lo[:, None]) & (colsb < hi[:, None]) & (colsb != j[:, None])
                    w = tl.where(m1, a_t, tl.where(m2, _lane(bw, sel)[:, None], 0.0))
                elif LOSS == _LOSS_RECALL_AT_K:
                    w = tl.where(m1 & (colsb != j[:, None]), a_t, 0.0)
                else:
                    w = tl.where(m1, a_t, 0.0)
                G += w * sp - tl.where(colsb == j[:, None], _lane(T, sel)[:, None], 0.0)
        return G

    @triton.jit
    def _g_dot(Gs, X, acc, G_SPLIT: tl.constexpr, G_PREC: tl.constexpr):
        """acc + Gs X with Gs float32, never rounded to one half or TF32 term: G_SPLIT 3 =
        three bfloat16 terms against bfloat16 X; else float32 products (X exact in float32)
        at input precision G_PREC (tf32x3 on tensor cores)."""
        if G_SPLIT == 3:
            h1 = Gs.to(tl.bfloat16)
            r1 = Gs - h1.to(tl.float32)
            h2 = r1.to(tl.bfloat16)
            h3 = (r1 - h2.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(h3, X, acc)
            acc = tl.dot(h2, X, acc)
            acc = tl.dot(h1, X, acc)
        else:
            acc = tl.dot(Gs, X.to(tl.float32), acc, input_precision=G_PREC)
        return acc

    @triton.jit
    def _tiled_bwd_rows_kernel(
        xq_ptr,
        xr_ptr,
        iq_ptr,
        ir_ptr,
        lo_ptr,
        hi_ptr,
        own_ptr,
        st_ptr,
        g_ptr,
        dxq_ptr,
        Q,
        M,
        D,
        stride_q,
        stride_r,
        stride_o,
        n_lanes,
        n_cap,
        lane0,
        zscale,
        inv_tau,
        LOSS: tl.constexpr,
        HAS_NORM: tl.constexpr,
        S_PREC: tl.constexpr,
        G_SPLIT: tl.constexpr,
        G_PREC: tl.constexpr,
        ACCUM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_DO: tl.constexpr,
    ):
        # dXq[rows, d-slice] (ACCUM: +=) sum over the column tiles of (g G_tile * ir) Xr_tile[:, d-slice],
        # G_tile from the lanes [lane0, lane0 + n_cap) of the state
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < Q
        lo = tl.load(lo_ptr + rows, mask=rmask, other=0)
        hi = tl.load(hi_ptr + rows, mask=rmask, other=0)
        cw = tl.minimum(tl.maximum(hi - lo - lane0, 0), n_cap)
        cw_max = tl.max(cw, axis=0)
        if LOSS == _LOSS_RECALL_AT_K:
            own = tl.load(own_ptr + rows, mask=rmask, other=-1)
        else:
            own = lo  # not read
        g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
        if HAS_NORM:
            iq = tl.load(iq_ptr + rows, mask=rmask, other=0.0)
        else:
            iq = g  # not read
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        om = offs_o < D
        acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
        if cw_max > 0:
            for n0 in range(0, M, BLOCK_N):
                cols = n0 + offs_n0
                cmask = cols < M
                if HAS_NORM:
                    ir = tl.load(ir_ptr + cols, mask=cmask, other=0.0)
                else:
                    ir = tl.zeros([BLOCK_N], dtype=tl.float32)  # not read
                zk = _s_tile(
                    xq_ptr, xr_ptr, rows, rmask, cols, cmask, iq, ir, D, stride_q, stride_r, zscale,
                    HAS_NORM, S_PREC, BLOCK_M, BLOCK_N, BLOCK_D,
                )  # fmt: skip
                G = _grad_tile(
                    zk, st_ptr, rows, rmask, lo, hi, cw, cw_max, lane0, own, cols, cmask, n_lanes, inv_tau,
                    LOSS, BLOCK_M, BLOCK_N, BLOCK_P,
                )  # fmt: skip
                Gs = G * g[:, None]
                if HAS_NORM:
                    Gs = Gs * ir[None, :]
                X = tl.load(
                    xr_ptr + cols.to(tl.int64)[:, None] * stride_r + offs_o[None, :],
                    mask=cmask[:, None] & om[None, :],
                    other=0.0,
                )
                acc = _g_dot(Gs, X, acc, G_SPLIT, G_PREC)
        out = dxq_ptr + rows.to(tl.int64)[:, None] * stride_o + offs_o[None, :]
        omask = rmask[:, None] & om[None, :]
        if ACCUM:  # a later window of lanes: add to what the earlier windows wrote
            if cw_max > 0:
                tl.store(out, acc + tl.load(out, mask=omask, other=0.0), mask=omask)
        else:
            tl.store(out, acc, mask=omask)

    @triton.jit
    def _tiled_bwd_cols_kernel(
        xq_ptr,
        xr_ptr,
        iq_ptr,
        ir_ptr,
        lo_ptr,
        hi_ptr,
        own_ptr,
        st_ptr,
        g_ptr,
        live_ptr,
        pmax_ptr,
        dxr_ptr,
        Q,
        M,
        D,
        stride_q,
        stride_r,
        stride_o,
        n_lanes,
        n_cap,
        lane0,
        zscale,
        inv_tau,
        LOSS: tl.constexpr,
        HAS_NORM: tl.constexpr,
        HAS_LIVE: tl.constexpr,
        S_PREC: tl.constexpr,
        G_SPLIT: tl.constexpr,
        G_PREC: tl.constexpr,
        ACCUM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_DO: tl.constexpr,
    ):
        # dXr[cols, d-slice] (ACCUM: +=) sum over the row blocks, in order, of (g iq G_tile)^T
        # Xq_blk[:, d-slice], G_tile from the lanes [lane0, lane0 + n_cap) of the state; nothing
        # to do when no row has a lane there (pmax, the longest segment, read on the device).
        # HAS_LIVE: a column block with no live column (a detached memory) is left 0.
        pid_n = tl.program_id(0)
        pid_d = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < M
        if HAS_NORM:
            ir = tl.load(ir_ptr + cols, mask=cmask, other=0.0)
        else:
            ir = tl.zeros([BLOCK_N], dtype=tl.float32)  # not read
        todo = (Q > 0) & (tl.load(pmax_ptr) > lane0)
        if HAS_LIVE:
            live = tl.load(live_ptr + cols, mask=cmask, other=0)
            todo = todo & (tl.max(live.to(tl.int32), axis=0) > 0)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        om = offs_o < D
        acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
        if todo:
            for r0 in range(0, Q, BLOCK_M):
                rows = r0 + offs_m0
                rmask = rows < Q
                lo = tl.load(lo_ptr + rows, mask=rmask, other=0)
                hi = tl.load(hi_ptr + rows, mask=rmask, other=0)
                cw = tl.minimum(tl.maximum(hi - lo - lane0, 0), n_cap)
                cw_max = tl.max(cw, axis=0)
                if cw_max > 0:
                    if LOSS == _LOSS_RECALL_AT_K:
                        own = tl.load(own_ptr + rows, mask=rmask, other=-1)
                    else:
                        own = lo  # not read
                    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
                    if HAS_NORM:
                        iq = tl.load(iq_ptr + rows, mask=rmask, other=0.0)
                    else:
                        iq = g  # not read
                    zk = _s_tile(
                        xq_ptr, xr_ptr, rows, rmask, cols, cmask, iq, ir, D, stride_q, stride_r, zscale,
                        HAS_NORM, S_PREC, BLOCK_M, BLOCK_N, BLOCK_D,
                    )  # fmt: skip
                    G = _grad_tile(
                        zk, st_ptr, rows, rmask, lo, hi, cw, cw_max, lane0, own, cols, cmask, n_lanes, inv_tau,
                        LOSS, BLOCK_M, BLOCK_N, BLOCK_P,
                    )  # fmt: skip
                    if HAS_NORM:
                        gw = g * iq
                    else:
                        gw = g
                    Gs = G * gw[:, None]
                    X = tl.load(
                        xq_ptr + rows.to(tl.int64)[:, None] * stride_q + offs_o[None, :],
                        mask=rmask[:, None] & om[None, :],
                        other=0.0,
                    )
                    acc = _g_dot(tl.trans(Gs), X, acc, G_SPLIT, G_PREC)
        out = dxr_ptr + cols.to(tl.int64)[:, None] * stride_o + offs_o[None, :]
        omask = cmask[:, None] & om[None, :]
        if ACCUM:  # a later window of lanes: add to what the earlier windows wrote
            if todo:
                tl.store(out, acc + tl.load(out, mask=omask, other=0.0), mask=omask)
        else:
            tl.store(out, acc, mask=omask)


# ---- launchers ---------------------------------------------------------------------------


class TiledConfig:
    """Tile shapes and warps of the three kernels: (rows, columns) per tile for the forward, the
    row sweep and the column sweep; BLOCK_D of the S products, BLOCK_P lanes per chunk, and
    ``block_do``, the widest slice of D whose gradient one backward program accumulates in
    registers (a wider D is split over programs, each recomputing its tiles)."""

    def __init__(self, fwd_mn, rows_mn, cols_mn, block_d, block_p, block_do, num_warps, stages):
        self.fwd_mn = fwd_mn
        self.rows_mn = rows_mn
        self.cols_mn = cols_mn
        self.block_d = block_d
        self.block_p = block_p
        self.block_do = block_do
        self.num_warps = num_warps
        self.stages = stages


# sm_90, triton 3.6 and 3.8: no register spills in any specialization (bench/compile_check.py); the column sweep
# takes 64 output rows and 32-row steps, the other kernels 64 rows x 32 columns
_GPU_CONFIG = TiledConfig((64, 32), (64, 32), (32, 64), 16, 4, 128, 8, 2)
_INTERPRETER_CONFIG = TiledConfig((16, 16), (16, 16), (16, 16), 16, 4, 64, 4, 1)


def config() -> TiledConfig:
    """The block sizes in use: small tiles under the interpreter (so the tests cover several
    row blocks, column tiles and lane chunks), GPU-sized ones otherwise."""
    return _INTERPRETER_CONFIG if tk.interpreter_active() else _GPU_CONFIG


def inverse_norms(X: torch.Tensor) -> torch.Tensor:
    """1 / max(||x||, eps) per row, in float32 (accumulated in float32 for half rows)."""
    return 1.0 / torch.linalg.vector_norm(X, dim=1, dtype=torch.float32).clamp_min(NORM_EPS)


def _precisions(dtype: torch.dtype) -> Tuple[str, int, str]:
    """(S_PREC, G_SPLIT, G_PREC) for rows of ``dtype``."""
    if dtype == torch.bfloat16:
        return "tf32", 3, "tf32x3"  # S_PREC is not read for half operands
    if dtype == torch.float16:
        return "tf32", 0, "tf32x3"
    s_prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else FLOAT32_DOT
    return s_prec, 0, "tf32x3"


def _check_rows(Xq: torch.Tensor, Xr: torch.Tensor) -> None:
    tk.check_device(Xq)
    if Xq.dtype != Xr.dtype or Xq.dtype not in (torch.float32,) + _HALF:
        raise TypeError(f"Xq, Xr: expected float32, float16 or bfloat16 rows of one dtype, got {Xq.dtype}, {Xr.dtype}")
    if Xq.shape[1] != Xr.shape[1]:
        raise ValueError(f"Xq, Xr: different widths {Xq.shape[1]} and {Xr.shape[1]}")


def _common(Xq, Xr, lo, hi, own, spec: LossSpec):
    """Contiguous rows, int32 segments, inverse norms (half rows under cosine) and the
    Recall@k parameters shared by the launchers."""
    _check_rows(Xq, Xr)
    if spec.kind not in (LOSS_PNP, LOSS_SMOOTH_AP, LOSS_RECALL_AT_K):
        raise ValueError(f"kind: unknown loss kind {spec.kind}")
    same = Xq is Xr
    Xq = Xq.contiguous()
    Xr = Xq if same else Xr.contiguous()
    lo = lo.to(torch.int32).contiguous()
    hi = hi.to(torch.int32).contiguous()
    own = own.to(torch.int32).contiguous() if own is not None else lo
    has_norm = spec.cosine and Xq.dtype in _HALF
    if has_norm:
        iq = inverse_norms(Xq)
        ir = iq if same else inverse_norms(Xr)
    else:
        iq = ir = lo  # not read
    return Xq, Xr, lo, hi, own, has_norm, iq, ir


# The state is sized from the shapes alone (reading the longest segment on the host would
# synchronise): the forward keeps the lanes t < n_cap of every row and the backward takes the
# lanes beyond, if any row has them, in windows of lanes whose state it recomputes into one
# scratch buffer. Both hold MIN_LANES lanes a row (or all a row can have, if fewer), more when
# the budget and M / 32 allow, so that neither is more than Q * M / 8 numbers past that floor:
# 64 lanes at Q = M = 65536 (64 MiB) and windows of 256 lanes (256 MiB). Windows that no row
# reaches cost three launches whose programs return at once (the longest segment is read on
# the device).
STATE_BUDGET_BYTES = 64 << 20
WINDOW_BUDGET_BYTES = 256 << 20
MIN_LANES = 64


def lane_capacity(Q: int, M: int, lanes: int, budget_bytes: int, block_p: int) -> int:
    """Lanes per row of a state buffer (16 bytes a lane): a multiple of ``block_p``, at least
    MIN_LANES, else as many as ``budget_bytes`` and M / 32 allow, never more than ``lanes``
    (rounded up) need."""
    need = -(-max(lanes, 1) // block_p) * block_p
    fit = min(budget_bytes // (4 * STATE_SLOTS * max(Q, 1)), M // 32) // block_p * block_p
    floor = -(-MIN_LANES // block_p) * block_p
    return min(need, max(floor, fit))


def _k_slots(spec: LossSpec) -> int:
    """Lanes reserved after the window for Recall@k's row sums s_k (4 floats a lane)."""
    return -(-len(spec.ks) // STATE_SLOTS) if spec.kind == LOSS_RECALL_AT_K else 0


def _fwd_params(spec: LossSpec, dev: torch.device, dummy: torch.Tensor):
    """(kp, NUM_K, K_BLOCK, VARIANT) of the forward kernel."""
    if spec.kind == LOSS_RECALL_AT_K:
        kp, num_k, k_block = tk.recall_k_params(spec, dev)
        return kp, num_k, k_block, 0
    return dummy, 1, 1, (spec.variant.code if spec.kind == LOSS_PNP else 0)


def _launch_fwd(Xq, Xr, iq, ir, lo, hi, own, loss, state, n_cap, lane0, spec, compute_grad, with_loss, has_norm):
    """One launch of ``_tiled_fwd_kernel`` (see there); ``state`` None: no lane state."""
    Q, D = Xq.shape
    cfg = config()
    kp, num_k, k_block, variant = _fwd_params(spec, Xq.device, loss)
    s_prec, _, _ = _precisions(Xq.dtype)
    _tiled_fwd_kernel[(triton.cdiv(Q, cfg.fwd_mn[0]),)](
        Xq, Xr, iq, ir, lo, hi, own, kp, loss, state if state is not None else loss,
        Q, Xr.shape[0], D, Xq.stride(0), Xr.stride(0),
        state.shape[1] if state is not None else 0, n_cap, lane0,
        _LOG2E / spec.anneal, 1.0 / spec.anneal, float(spec.alpha), float(spec.b),
        LOSS=int(spec.kind), VARIANT=int(variant), COMPUTE_GRAD=bool(compute_grad), WITH_LOSS=bool(with_loss),
        HAS_NORM=has_norm, S_PREC=s_prec, NUM_K=num_k, K_BLOCK=k_block,
        BLOCK_M=cfg.fwd_mn[0], BLOCK_N=cfg.fwd_mn[1], BLOCK_D=cfg.block_d, BLOCK_P=cfg.block_p,
        num_warps=cfg.num_warps, num_stages=cfg.stages,
    )  # fmt: skip


def tiled_rows(
    Xq: torch.Tensor,
    Xr: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    own: Optional[torch.Tensor],
    spec: LossSpec,
    compute_grad: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(row_loss (Q,) float32, state (Q, n_cap + k_slots, 4) float32 or None) of S = Xq Xr^T,
    never stored.

    Xq (Q, D), Xr (M, D): float32 rows (normalised already for cosine) or float16 / bfloat16
    rows as they are (cosine: rescaled by their float32 inverse norms in the kernels); the
    reference rows sorted so that row p's positives are [lo_p, hi_p); ``own`` (int, -1: none)
    is read by Recall@k only. The state holds the lanes t < n_cap (:func:`lane_capacity`) of
    each row, then (Recall@k) the row sums s_k. No host synchronisation."""
    Xq, Xr, lo, hi, own, has_norm, iq, ir = _common(Xq, Xr, lo, hi, own, spec)
    Q = Xq.shape[0]
    M = Xr.shape[0]
    dev = Xq.device
    row_loss = torch.zeros(Q, dtype=torch.float32, device=dev)
    n_cap = lane_capacity(Q, M, M, STATE_BUDGET_BYTES, config().block_p) if compute_grad else 0
    k_slots = _k_slots(spec)
    state = None
    if compute_grad or k_slots:
        state = torch.zeros(Q, n_cap + k_slots, STATE_SLOTS, dtype=torch.float32, device=dev)
    if Q == 0:
        return row_loss, state if compute_grad else None
    with tk._on_device(Xq):
        _launch_fwd(Xq, Xr, iq, ir, lo, hi, own, row_loss, state, n_cap, 0, spec, compute_grad, True, has_norm)
    return row_loss, state if compute_grad else None


def _block_do(D: int, cfg: TiledConfig) -> int:
    return min(cfg.block_do, max(16, tk._next_pow2(D)))


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
    """(dXq, dXr) float32 = (diag(g) G Xr, (diag(g) G)^T Xq) with respect to the normalised
    rows, G = dS from the state of :func:`tiled_rows` (recomputed tile by tile, never stored);
    each None when not asked for. Lanes beyond the state's are taken in windows, their state
    recomputed. ``r_rows`` (int64 (r,), distinct): only these reference rows need dXr; column
    blocks without one are left 0. No host synchronisation."""
    Xq, Xr, lo, hi, own, has_norm, iq, ir = _common(Xq, Xr, lo, hi, own, spec)
    Q, D = Xq.shape
    M = Xr.shape[0]
    dev = Xq.device
    dXq = torch.zeros(Q, D, dtype=torch.float32, device=dev) if need_q else None
    dXr = torch.zeros(M, D, dtype=torch.float32, device=dev) if need_r else None
    if Q == 0 or M == 0 or D == 0 or not (need_q or need_r):
        return dXq, dXr
    k_slots = _k_slots(spec)
    if (
        state.dtype != torch.float32
        or state.dim() != 3
        or state.shape[0] != Q
        or state.shape[1] <= k_slots
        or state.shape[2] != STATE_SLOTS
    ):
        raise ValueError(
            f"state: expected a ({Q}, lanes + {k_slots}, {STATE_SLOTS}) float32 tensor from tiled_rows, "
            f"got {tuple(state.shape)}"
        )
    state = state.contiguous()
    g = g.to(torch.float32).expand(Q).contiguous()
    cfg = config()
    s_prec, g_split, g_prec = _precisions(Xq.dtype)
    block_do = _block_do(D, cfg)
    common = dict(
        LOSS=int(spec.kind),
        HAS_NORM=has_norm,
        S_PREC=s_prec,
        G_SPLIT=g_split,
        G_PREC=g_prec,
        BLOCK_D=cfg.block_d,
        BLOCK_P=cfg.block_p,
        BLOCK_DO=block_do,
        num_warps=cfg.num_warps,
        num_stages=cfg.stages,
    )
    n_do = triton.cdiv(D, block_do)
    live = lo  # not read
    if r_rows is not None:  # the columns that need dXr, as a mask
        live = torch.zeros(M, dtype=torch.int8, device=dev).index_fill_(0, r_rows.to(dev), 1)
    pmax = (hi - lo).amax()  # on the device: lets the column sweep skip a window no row reaches
    n_cap0 = state.shape[1] - k_slots

    def sweep(st: torch.Tensor, n_cap: int, lane0: int, accum: bool) -> None:
        scal = (st.shape[1], n_cap, lane0, _LOG2E / spec.anneal, 1.0 / spec.anneal)
        if dXq is not None:
            bm, bn = cfg.rows_mn
            _tiled_bwd_rows_kernel[(triton.cdiv(Q, bm), n_do)](
                Xq, Xr, iq, ir, lo, hi, own, st, g, dXq, Q, M, D, Xq.stride(0), Xr.stride(0), dXq.stride(0),
                *scal, ACCUM=accum, BLOCK_M=bm, BLOCK_N=bn, **common,
            )  # fmt: skip
        if dXr is not None:
            bm, bn = cfg.cols_mn
            _tiled_bwd_cols_kernel[(triton.cdiv(M, bn), n_do)](
                Xq, Xr, iq, ir, lo, hi, own, st, g, live, pmax, dXr, Q, M, D, Xq.stride(0), Xr.stride(0),
                dXr.stride(0), *scal, HAS_LIVE=r_rows is not None, ACCUM=accum, BLOCK_M=bm, BLOCK_N=bn, **common,
            )  # fmt: skip

    with tk._on_device(Xq):
        sweep(state, n_cap0, 0, False)
        if M > n_cap0:  # a row may have lanes beyond the state's: windows of recomputed state
            n_cap = lane_capacity(Q, M, M - n_cap0, WINDOW_BUDGET_BYTES, cfg.block_p)
            window = torch.empty(Q, n_cap + k_slots, STATE_SLOTS, dtype=torch.float32, device=dev)
            if k_slots:  # Recall@k's row sums, from the forward
                window[:, n_cap:] = state[:, n_cap0:]
            for lane0 in range(n_cap0, M, n_cap):
                _launch_fwd(Xq, Xr, iq, ir, lo, hi, own, g, window, n_cap, lane0, spec, True, False, has_norm)
                sweep(window, n_cap, lane0, True)
    return dXq, dXr
