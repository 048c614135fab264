"""Triton kernels of the row losses and the stages around them, with their launchers.

Row kernel. ``_rows_kernel`` runs one program per query row p of a (queries x
reference) float32 similarity block S whose reference columns are label-sorted, so
that the positives of row p are the columns [lo_p, hi_p) and every other column is a
negative; n = hi_p - lo_p, tau the temperature, z_jk = (S_pk - S_pj) / tau. A row
with an empty segment (n = 0) is dropped: loss 0, its dS row all zeros. The loss
kind is a compile-time constant (codes from ``pnp_kernels/variants.py``). For each
chunk of BLOCK_P positives j it makes

  pass 1: neg_j = sum_{k neg} sigma(z_jk)                     (all columns)
          pos_j = 1 + sum_{k pos, k != j} sigma(z_jk)         (Smooth-AP only: the segment)
          PNP:       loss += f(neg_j),            a_j = f'(neg_j) / n,  b_j = 0
          Smooth-AP: loss += neg_j / all_j,       a_j = pos_j / (n all_j^2),
                     all_j = pos_j + neg_j         b_j = neg_j / (n all_j^2)
  pass 2 (only when a gradient is needed): with sigma'_jk = sigma (1 - sigma),
          W_jk = (a_j [k neg] - b_j [k pos, k != j]) sigma'_jk / tau and
          dS_k = sum_j W_jk - [k pos] sum_m W_km

The negative part of pass 2 sweeps every column and stores the column sums; for
Smooth-AP a second sweep over the segment adds the positive part of the column sums
(read-modify-write of the program's own row); last the chunk's positive columns get
their "minus row sum". So the gradient is ready when the forward returns. BLOCK_P
(4, 8 or 16) is picked per row from its segment length; rows with more than 16
positives accumulate dS over chunks, again by read-modify-write of their own row (no
atomics: deterministic). ``tl.debug_barrier`` separates each store of a row from the
next load of it, as threads of one program own different elements in each layout.

Recall@k (``_recall_row``) ranks every column but the row's own one (``own_ptr``, -1:
none), negatives and positives alike, and its lane at the own column is inactive:
pass 1 gives r_t = 1 + sum_{k ranked, k != j_t} sigma(z_tk) in one sweep; the per-row
math (``_recall_row_terms`` and its three steps ``_recall_k_sums``,
``_recall_k_weights``, ``_recall_lane_coefs``, shared with the memory-efficient kernels)
turns the r_t into the loss and c_t = d loss / d r_t; pass 2 puts W_tk = c_t sigma'_tk /
tau on every ranked column k != j_t and subtracts the row sums at the lanes. The k values
and tau2_k come as a small cached device tensor (``recall_k_params``) with their count as
a compile-time constant. The c_t need the sums s_k over ALL lanes, so a row of more than
16 positives is swept twice (the chunks' s_k, then per chunk r_t again, c_t and dS): no
scratch buffer and no host sync.

Sigmoids are evaluated as 1 / (1 + 2^z) with z = (S_pj - S_pk) log2(e)/tau (clamped
at 100 in pass 2): no NaN, and sigma' = 2^z sigma^2 stays exact in both tails. The
PNP variants' f use series below SERIES_MAX where log1p / expm1 would cancel.

Around it: ``_prep_kernel`` (after torch.sort) or the opt-in ``_prep_count_kernel``
(a counting sort, for small batches) find the class segments of a batch ranked
against itself (a row whose class has fewer than 2 members gets hi = lo) and gather +
normalise the embeddings; ``_reduce_kernel`` reduces the per-row losses (mean over
the rows with hi > lo, or the scattered "none" vector) in one program with a fixed
summation order; in backward ``_symmetric_grad_kernel`` forms
H = diag(g) G + (diag(g) G)^T for the GEMM dX = H X, and ``_unprep_kernel`` goes back
through the normalisation and the permutation.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Optional, Tuple

import torch

from ..spec import HALF_MAX, NORM_EPS, LossSpec
from ..variants import (
    EXPM1_SERIES_TERMS,
    LOG1P_SERIES_TERMS,
    LOSS_PNP,
    LOSS_RECALL_AT_K,
    LOSS_SMOOTH_AP,
    SERIES_MAX,
    VARIANTS,
    XLOG_SERIES_TERMS,
)

try:  # triton is optional at import time (e.g. macOS, or a broken install)
    import triton
    import triton.language as tl

    _IMPORT_ERROR = ""
except Exception as exc:  # noqa: BLE001  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _IMPORT_ERROR = f"triton failed to import: {exc!r}"

__all__ = [
    "COUNT_SORT_MAX_B",
    "check_device",
    "interpreter_active",
    "is_available",
    "prepare",
    "recall_k_params",
    "reduce",
    "row_losses_and_dS",
    "symmetric_grad",
    "symmetrize",
    "unprepare",
    "why_unavailable",
]

_LOG2E = 1.4426950408889634


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_available() -> bool:
    """Usable in this process: triton imports and there is a GPU or the interpreter is on."""
    return not why_unavailable()


def why_unavailable() -> str:
    if triton is None:
        return _IMPORT_ERROR
    if not (torch.cuda.is_available() or interpreter_active()):
        return "no CUDA device (set TRITON_INTERPRET=1 before importing to run the kernels on the CPU)"
    return ""


def check_device(t: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError(f"backend='triton' is unavailable: {_IMPORT_ERROR}")
    if t.device.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (embeddings are on "
            f"{t.device}); run with TRITON_INTERPRET=1 to use the Triton interpreter on the CPU, "
            "or use backend='torch'"
        )


def _on_device(t: torch.Tensor):
    """Launch on t's GPU: a device guard when t is on a CUDA device other than the current one."""
    if t.device.type == "cuda" and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


if triton is not None:
    # The table's codes and series constants, as compile-time globals of the kernels.
    _LOSS_PNP = tl.constexpr(LOSS_PNP)
    _LOSS_SMOOTH_AP = tl.constexpr(LOSS_SMOOTH_AP)
    _LOSS_RECALL_AT_K = tl.constexpr(LOSS_RECALL_AT_K)
    _LOG2E_C = tl.constexpr(_LOG2E)
    _V_O = tl.constexpr(VARIANTS["O"].code)
    _V_DS = tl.constexpr(VARIANTS["Ds"].code)
    _V_DQ = tl.constexpr(VARIANTS["Dq"].code)
    _V_IU = tl.constexpr(VARIANTS["Iu"].code)
    _V_IB = tl.constexpr(VARIANTS["Ib"].code)
    _SERIES_MAX = tl.constexpr(SERIES_MAX)
    _LOG1P_TERMS = tl.constexpr(LOG1P_SERIES_TERMS)
    _XLOG_TERMS = tl.constexpr(XLOG_SERIES_TERMS)
    _EXPM1_TERMS = tl.constexpr(EXPM1_SERIES_TERMS)

    @triton.jit
    def _log1p(x):
        """log(1+x) for x >= 0, full relative precision: its series below SERIES_MAX."""
        xs = tl.minimum(x, _SERIES_MAX)
        acc = tl.zeros_like(xs)
        for i in tl.static_range(0, _LOG1P_TERMS):  # n = N .. 1: x (1 - x (1/2 - x (1/3 - ...)))
            acc = -xs * acc + (1.0 / (_LOG1P_TERMS - i))
        return tl.where(x < _SERIES_MAX, xs * acc, tl.log(1.0 + x))

    @triton.jit
    def _x_minus_log1p(x):
        """x - log(1+x) for x >= 0 without cancellation: its series below SERIES_MAX."""
        xs = tl.minimum(x, _SERIES_MAX)
        acc = tl.zeros_like(xs)
        for i in tl.static_range(0, _XLOG_TERMS):  # n = N+1 .. 2: x^2 (1/2 - x (1/3 - x (1/4 - ...)))
            acc = -xs * acc + (1.0 / (_XLOG_TERMS + 1 - i))
        return tl.where(x < _SERIES_MAX, xs * xs * acc, x - tl.log(1.0 + x))

    @triton.jit
    def _one_minus_exp(y):
        """1 - e^-y = -expm1(-y) for y >= 0, full relative precision: its series below SERIES_MAX."""
        ys = tl.minimum(y, _SERIES_MAX)
        acc = tl.zeros_like(ys)
        for i in tl.static_range(0, _EXPM1_TERMS):  # divisors N+1 .. 2: y (1 - y/2 (1 - y/3 (1 - ...)))
            acc = 1.0 - ys * acc * (1.0 / (_EXPM1_TERMS + 1 - i))
        return tl.where(y < _SERIES_MAX, ys * acc, 1.0 - tl.exp(-y))

    @triton.jit
    def _variant_f_df(R, alpha, b, VARIANT: tl.constexpr):
        """f(R) and df/dR of the variant table in pnp_kernels/variants.py (same codes, same forms)."""
        if VARIANT == _V_O:  # R
            f = R
            df = R * 0.0 + 1.0
        elif VARIANT == _V_DS:  # log(1+R)
            f = _log1p(R)
            df = 1.0 / (1.0 + R)
        elif VARIANT == _V_DQ:  # 1 - (1+R)^-alpha
            lg = _log1p(R)
            f = _one_minus_exp(alpha * lg)
            df = alpha * tl.exp(-(alpha + 1.0) * lg)
        elif VARIANT == _V_IU:  # (1+R) log(1+R)
            lg = _log1p(R)
            f = (1.0 + R) * lg
            df = lg + 1.0
        else:  # _V_IB: (bR - log(1+bR)) / b^2
            tl.static_assert(VARIANT == _V_IB)
            x = b * R
            f = _x_minus_log1p(x) / (b * b)
            df = R / (1.0 + x)
        return f, df

    @triton.jit
    def _smooth_ap_terms(R, pos, lane, inv_cnt):
        """Smooth-AP's lane terms from neg_j = R and pos_j = 1 + sum over the other positives, with
        all_j = pos_j + R: (R / all_j, a_j = pos_j / (n all_j^2), b_j = R / (n all_j^2)), 0 off the
        active lanes; the loss is the sum of the first over the lanes times inv_cnt = 1/n, b_j the
        (subtracted) weight of the other positives. Elementwise: any shape (a row's lanes, or rows x lanes)."""
        all_ = pos + R
        w = inv_cnt / (all_ * all_)
        return tl.where(lane, R / all_, 0.0), tl.where(lane, pos * w, 0.0), tl.where(lane, R * w, 0.0)

    # ---- Recall@k's per-row math, shared by the dense row kernel and the memory-efficient kernels ----
    # A row's k values and temperatures tau2_k come as the (2, NUM_K) float32 tensor of
    # ``recall_k_params`` (row 0: k, row 1: tau2_k), loaded into K_BLOCK (>= NUM_K, a power of
    # two) lanes; kmask marks the real ones. r (BLOCK_P,) are the lanes' soft ranks
    # r_t = 1 + sum_{ranked k != j_t} sigma((S_pk - S_pj_t) / tau1), lane (BLOCK_P,) the active lanes.

    @triton.jit
    def _recall_k_params(kp_ptr, NUM_K: tl.constexpr, K_BLOCK: tl.constexpr):
        """(k, tau2, kmask), each (K_BLOCK,): Recall@k's k values and temperatures, padded lanes masked."""
        offs = tl.arange(0, K_BLOCK)
        kmask = offs < NUM_K
        k = tl.load(kp_ptr + offs, mask=kmask, other=1.0)
        t2 = tl.load(kp_ptr + NUM_K + offs, mask=kmask, other=1.0)
        return k, t2, kmask

    @triton.jit
    def _recall_k_sums(r, lane, k, t2):
        """(K_BLOCK,) partial s_k = sum over the active lanes t of sigma((k - r_t) / tau2_k).

        Additive over lanes: a row split into chunks of lanes sums the chunks' results."""
        sig = 1.0 / (1.0 + tl.exp2((r[:, None] - k[None, :]) * (_LOG2E_C / t2[None, :])))
        return tl.sum(tl.where(lane[:, None], sig, 0.0), axis=0)

    @triton.jit
    def _recall_k_sums_rows(r, lane, k, t2):
        """(BLOCK_M, K_BLOCK) partial s_k of several rows at once: ``_recall_k_sums`` with r and
        lane (BLOCK_M, BLOCK_P), one row per line."""
        sig = 1.0 / (1.0 + tl.exp2((r[:, :, None] - k[None, None, :]) * (_LOG2E_C / t2[None, None, :])))
        return tl.sum(tl.where(lane[:, :, None], sig, 0.0), axis=1)

    @triton.jit
    def _recall_k_weights(s, n, k, t2, kmask, NUM_K: tl.constexpr):
        """Row loss and per-k weights from the complete sums s_k of a row with n >= 1 active lanes:

        loss = 1 - (1/|K|) sum_k min(s_k, k) / min(k, n),  w_k = [s_k < k] / (|K| tau2_k min(k, n))
        so that d loss / d r_t = sum_k w_k sigma'((k - r_t) / tau2_k) (d s_k / d r_t = -sigma' / tau2_k)."""
        norm = tl.maximum(tl.minimum(k, n), 1.0)
        # min keeping NaN (NaN in, NaN out; the default min returns the other operand)
        total = tl.sum(tl.where(kmask, tl.minimum(s, k, propagate_nan=tl.PropagateNan.ALL) / norm, 0.0), axis=0)
        loss = 1.0 - total * (1.0 / NUM_K)
        w = tl.where(kmask & (s < k), (1.0 / NUM_K) / (t2 * norm), 0.0)
        return loss, w

    @triton.jit
    def _recall_lane_coefs(r, lane, w, k, t2):
        """(BLOCK_P,) c_t = sum_k w_k sigma'((k - r_t) / tau2_k) on the active lanes, 0 elsewhere.

        sigma'(u) = e sigma(u)^2 with e = e^-u (exponent clamped at 2^100): exact in both tails."""
        z = tl.minimum((r[:, None] - k[None, :]) * (_LOG2E_C / t2[None, :]), 100.0)
        e = tl.exp2(z)
        sig = 1.0 / (1.0 + e)
        c = tl.sum(w[None, :] * (e * sig * sig), axis=1)
        return tl.where(lane, c, 0.0)

    @triton.jit
    def _recall_row_terms(r, lane, n, k, t2, kmask, NUM_K: tl.constexpr, COMPUTE_GRAD: tl.constexpr):
        """(row loss, c (BLOCK_P,)) of a row whose active lanes all lie in this one block of lanes;
        c = d loss / d r_t (0 without gradient). A row split into chunks uses the three steps
        apart: sum ``_recall_k_sums`` over the chunks, then ``_recall_k_weights``, then per chunk
        ``_recall_lane_coefs``."""
        s = _recall_k_sums(r, lane, k, t2)
        loss, w = _recall_k_weights(s, n, k, t2, kmask, NUM_K)
        if COMPUTE_GRAD:
            c = _recall_lane_coefs(r, lane, w, k, t2)
        else:
            c = tl.zeros_like(r)
        return loss, c

    @triton.jit
    def _row_chunk(
        s_row,
        g_row,
        lo,
        hi,
        p0,
        n_cols,
        scale,
        inv_tau,
        inv_cnt,
        alpha,
        b,
        LOSS: tl.constexpr,
        VARIANT: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        """Positives [p0, p0 + BLOCK_P) of one row: returns their summed loss; writes/accumulates dS."""
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < hi
        offs_k0 = tl.arange(0, BLOCK_K)
        offs_s0 = tl.arange(0, BLOCK_S)
        s_j = tl.load(s_row + offs_p, mask=pmask, other=0.0)
        # pass 1: neg_j = sum over negatives k of sigmoid((S_pk - S_pj) / tau) = 1 / (1 + 2^z)
        # Accumulate elementwise and reduce once after the loop (no per-block shuffles).
        # No clamp needed here: 2^z = inf gives sigmoid 0, never NaN.
        R2 = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, n_cols, BLOCK_K):
            offs_k = k0 + offs_k0
            kmask = offs_k < n_cols
            neg = kmask & ((offs_k < lo) | (offs_k >= hi))
            s_k = tl.load(s_row + offs_k, mask=kmask, other=0.0)
            sig = 1.0 / (1.0 + tl.exp2((s_j[:, None] - s_k[None, :]) * scale))
            R2 += tl.where(neg[None, :], sig, 0.0)
        R = tl.sum(R2, axis=1)
        if LOSS == _LOSS_SMOOTH_AP:
            # pos_j - 1 = sum over the other positives k of the same sigmoid: only the segment
            P2 = tl.zeros([BLOCK_P, BLOCK_S], dtype=tl.float32)
            for k0 in range(lo, hi, BLOCK_S):
                offs_k = k0 + offs_s0
                kmask = offs_k < hi
                other = kmask[None, :] & (offs_k[None, :] != offs_p[:, None])
                s_k = tl.load(s_row + offs_k, mask=kmask, other=0.0)
                sig = 1.0 / (1.0 + tl.exp2((s_j[:, None] - s_k[None, :]) * scale))
                P2 += tl.where(other, sig, 0.0)
            pos = 1.0 + tl.sum(P2, axis=1)
            # a_j (coef): weight of the negatives; b_j (coef_pos): of the other positives (subtracted)
            ratio, coef, coef_pos = _smooth_ap_terms(R, pos, pmask, inv_cnt)
            loss = tl.sum(ratio, axis=0)
        else:
            tl.static_assert(LOSS == _LOSS_PNP)
            f, df = _variant_f_df(R, alpha, b, VARIANT)
            loss = tl.sum(tl.where(pmask, f, 0.0), axis=0)
            coef = tl.where(pmask, df * inv_cnt, 0.0)  # a_j = f'(R_j) / n
        if COMPUTE_GRAD:
            # pass 2: sigma' = 2^z sigma^2 (exact in both tails)
            T2 = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
            if ACCUMULATE:
                tl.debug_barrier()  # earlier chunks' stores to this row land before we read them
            for k0 in range(0, n_cols, BLOCK_K):
                offs_k = k0 + offs_k0
                kmask = offs_k < n_cols
                neg = kmask & ((offs_k < lo) | (offs_k >= hi))
                s_k = tl.load(s_row + offs_k, mask=kmask, other=0.0)
                z = tl.minimum((s_j[:, None] - s_k[None, :]) * scale, 100.0)
                e = tl.exp2(z)
                sig = 1.0 / (1.0 + e)
                sp = tl.where(neg[None, :], e * sig * sig, 0.0)
                T2 += sp
                g_k = tl.sum(coef[:, None] * sp, axis=0) * inv_tau  # negatives k; 0 at positives
                if ACCUMULATE:
                    g_k += tl.load(g_row + offs_k, mask=kmask, other=0.0)
                tl.store(g_row + offs_k, g_k, mask=kmask)
            row_sum = coef * tl.sum(T2, axis=1) * inv_tau  # sum_k W_jk over the negatives
            tl.debug_barrier()  # the column sums just stored land before the row is read or rewritten
            if LOSS == _LOSS_SMOOTH_AP:
                # W_jk = -b_j sigma'_jk / tau at the other positives k: column sums onto the segment
                U2 = tl.zeros([BLOCK_P, BLOCK_S], dtype=tl.float32)
                for k0 in range(lo, hi, BLOCK_S):
                    offs_k = k0 + offs_s0
                    kmask = offs_k < hi
                    other = kmask[None, :] & (offs_k[None, :] != offs_p[:, None])
                    s_k = tl.load(s_row + offs_k, mask=kmask, other=0.0)
                    z = tl.minimum((s_j[:, None] - s_k[None, :]) * scale, 100.0)
                    e = tl.exp2(z)
                    sig = 1.0 / (1.0 + e)
                    W = tl.where(other, e * sig * sig, 0.0) * (-coef_pos[:, None] * inv_tau)
                    U2 += W
                    g_k = tl.sum(W, axis=0) + tl.load(g_row + offs_k, mask=kmask, other=0.0)
                    tl.store(g_row + offs_k, g_k, mask=kmask)
                row_sum += tl.sum(U2, axis=1)
                tl.debug_barrier()  # the segment's column sums land before the positives are read
                g_j = tl.load(g_row + offs_p, mask=pmask, other=0.0)
                tl.store(g_row + offs_p, g_j - row_sum, mask=pmask)
            else:
                # PNP puts no column sum on a positive column: "minus row sum" overwrites the 0
                tl.store(g_row + offs_p, -row_sum, mask=pmask)
        return loss

    @triton.jit
    def _recall_ranks(s_row, s_j, offs_p, own, n_cols, scale, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
        """Recall@k pass 1 of lanes offs_p: r_t = 1 + sum over the ranked columns k != j_t (every
        column but the own one, negatives and positives alike) of sigmoid((S_pk - S_pj) / tau)."""
        offs_k0 = tl.arange(0, BLOCK_K)
        R2 = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, n_cols, BLOCK_K):
            offs_k = k0 + offs_k0
            kmask = offs_k < n_cols
            ranked = (kmask & (offs_k != own))[None, :] & (offs_k[None, :] != offs_p[:, None])
            s_k = tl.load(s_row + offs_k, mask=kmask, other=0.0)
            sig = 1.0 / (1.0 + tl.exp2((s_j[:, None] - s_k[None, :]) * scale))
            R2 += tl.where(ranked, sig, 0.0)
        return 1.0 + tl.sum(R2, axis=1)

    @triton.jit
    def _recall_grad(
        s_row,
        g_row,
        s_j,
        offs_p,
        pmask,
        c,
        own,
        n_cols,
        scale,
        inv_tau,
        ACCUMULATE: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Recall@k pass 2 of lanes offs_p with coefficients c (0 on inactive lanes): W_tk =
        c_t sigma'_tk / tau on every ranked column k != j_t; dS_k += sum_t W_tk, then
        dS_j_t -= sum_k W_tk. Written (or, ACCUMULATE, added) into the program's own row."""
        offs_k0 = tl.arange(0, BLOCK_K)
        T2 = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
        if ACCUMULATE:
            tl.debug_barrier()  # earlier chunks' stores to this row land before we read them
        for k0 in range(0, n_cols, BLOCK_K):
            offs_k = k0 + offs_k0
            kmask = offs_k < n_cols
            ranked = (kmask & (offs_k != own))[None, :] & (offs_k[None, :] != offs_p[:, None])
            s_k = tl.load(s_row + offs_k, mask=kmask, other=0.0)
            z = tl.minimum((s_j[:, None] - s_k[None, :]) * scale, 100.0)
            e = tl.exp2(z)
            sig = 1.0 / (1.0 + e)
            sp = tl.where(ranked, e * sig * sig, 0.0)
            T2 += sp
            g_k = tl.sum(c[:, None] * sp, axis=0) * inv_tau  # 0 at the own column
            if ACCUMULATE:
                g_k += tl.load(g_row + offs_k, mask=kmask, other=0.0)
            tl.store(g_row + offs_k, g_k, mask=kmask)
        row_sum = c * tl.sum(T2, axis=1) * inv_tau
        tl.debug_barrier()  # the column sums just stored land before the lanes' columns are read
        g_j = tl.load(g_row + offs_p, mask=pmask, other=0.0)
        tl.store(g_row + offs_p, g_j - row_sum, mask=pmask)

    @triton.jit
    def _recall_row_single(
        s_row,
        g_row,
        lo,
        hi,
        own,
        kp_ptr,
        n_cols,
        scale,
        inv_tau,
        NUM_K: tl.constexpr,
        K_BLOCK: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """A Recall@k row whose lanes fit one block of BLOCK_P: both passes, r_t kept in registers."""
        offs_p = lo + tl.arange(0, BLOCK_P)
        pmask = offs_p < hi
        lane = pmask & (offs_p != own)
        s_j = tl.load(s_row + offs_p, mask=pmask, other=0.0)
        r = _recall_ranks(s_row, s_j, offs_p, own, n_cols, scale, BLOCK_P, BLOCK_K)
        # n and the k values are made where they are used: short live ranges (no spill)
        n = tl.sum(lane.to(tl.float32), axis=0)
        k, t2, kmask = _recall_k_params(kp_ptr, NUM_K, K_BLOCK)
        loss, c = _recall_row_terms(r, lane, n, k, t2, kmask, NUM_K, COMPUTE_GRAD)
        if COMPUTE_GRAD:
            _recall_grad(s_row, g_row, s_j, offs_p, pmask, c, own, n_cols, scale, inv_tau, False, BLOCK_P, BLOCK_K)
        return loss

    @triton.jit
    def _recall_chunk_sums(
        s_row,
        p0,
        hi,
        own,
        kp_ptr,
        n_cols,
        scale,
        NUM_K: tl.constexpr,
        K_BLOCK: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """First sweep of a chunked Recall@k row: the lanes [p0, p0 + BLOCK_P)'s part of the s_k."""
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < hi
        lane = pmask & (offs_p != own)
        s_j = tl.load(s_row + offs_p, mask=pmask, other=0.0)
        r = _recall_ranks(s_row, s_j, offs_p, own, n_cols, scale, BLOCK_P, BLOCK_K)
        k, t2, kmask = _recall_k_params(kp_ptr, NUM_K, K_BLOCK)
        return _recall_k_sums(r, lane, k, t2)

    @triton.jit
    def _recall_chunk_grad(
        s_row,
        g_row,
        p0,
        hi,
        own,
        w,
        kp_ptr,
        n_cols,
        scale,
        inv_tau,
        NUM_K: tl.constexpr,
        K_BLOCK: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Second sweep of a chunked Recall@k row: the lanes [p0, p0 + BLOCK_P) recompute r_t, take
        c_t from the row's per-k weights w and write (ACCUMULATE: add) their part of dS."""
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < hi
        lane = pmask & (offs_p != own)
        s_j = tl.load(s_row + offs_p, mask=pmask, other=0.0)
        r = _recall_ranks(s_row, s_j, offs_p, own, n_cols, scale, BLOCK_P, BLOCK_K)
        k, t2, kmask = _recall_k_params(kp_ptr, NUM_K, K_BLOCK)
        c = _recall_lane_coefs(r, lane, w, k, t2)
        _recall_grad(s_row, g_row, s_j, offs_p, pmask, c, own, n_cols, scale, inv_tau, ACCUMULATE, BLOCK_P, BLOCK_K)

    @triton.jit
    def _recall_row(
        s_row,
        g_row,
        lo,
        hi,
        own_ptr,
        kp_ptr,
        loss_ptr,
        row,
        n_cols,
        scale,
        inv_tau,
        COMPUTE_GRAD: tl.constexpr,
        TILE: tl.constexpr,
        NUM_K: tl.constexpr,
        K_BLOCK: tl.constexpr,
    ):
        """Stores the row loss of one Recall@k row (and its dS row when COMPUTE_GRAD). The own column is neither a
        lane nor ranked; n = active lanes. Up to 16 lanes: one block (width 4, 8 or 16). More: the
        s_k need every lane first, so the chunks of 16 are swept twice (sums, then gradient with r_t
        recomputed): no scratch buffer, at the price of a second pass 1 for long rows with gradient.
        Each branch stores its own loss (a loss merged across the branches costs ptxas a spill)."""
        cnt = hi - lo
        own = tl.load(own_ptr + row)
        if cnt - ((own >= lo) & (own < hi)).to(tl.int32) < 1:
            # no active lane (empty segment, or only the own column): dropped, loss 0, zero dS row
            if COMPUTE_GRAD:
                for k0 in range(0, n_cols, TILE):
                    offs = k0 + tl.arange(0, TILE)
                    tl.store(g_row + offs, tl.zeros([TILE], dtype=tl.float32), mask=offs < n_cols)
            tl.store(loss_ptr + row, 0.0)
        elif cnt <= 4:
            loss = _recall_row_single(
                s_row,
                g_row,
                lo,
                hi,
                own,
                kp_ptr,
                n_cols,
                scale,
                inv_tau,
                NUM_K,
                K_BLOCK,
                COMPUTE_GRAD,
                4,
                TILE // 4,
            )
            tl.store(loss_ptr + row, loss)
        elif cnt <= 8:
            loss = _recall_row_single(
                s_row,
                g_row,
                lo,
                hi,
                own,
                kp_ptr,
                n_cols,
                scale,
                inv_tau,
                NUM_K,
                K_BLOCK,
                COMPUTE_GRAD,
                8,
                TILE // 8,
            )
            tl.store(loss_ptr + row, loss)
        elif cnt <= 16:
            loss = _recall_row_single(
                s_row,
                g_row,
                lo,
                hi,
                own,
                kp_ptr,
                n_cols,
                scale,
                inv_tau,
                NUM_K,
                K_BLOCK,
                COMPUTE_GRAD,
                16,
                TILE // 16,
            )
            tl.store(loss_ptr + row, loss)
        else:
            s = tl.zeros([K_BLOCK], dtype=tl.float32)
            for p0 in range(lo, hi, 16):
                s += _recall_chunk_sums(s_row, p0, hi, own, kp_ptr, n_cols, scale, NUM_K, K_BLOCK, 16, TILE // 16)
            nf = (cnt - ((own >= lo) & (own < hi)).to(tl.int32)).to(tl.float32)
            k, t2, kmask = _recall_k_params(kp_ptr, NUM_K, K_BLOCK)
            loss, w = _recall_k_weights(s, nf, k, t2, kmask, NUM_K)
            tl.store(loss_ptr + row, loss)
            if COMPUTE_GRAD:
                _recall_chunk_grad(
                    s_row, g_row, lo, hi, own, w, kp_ptr, n_cols, scale, inv_tau, NUM_K, K_BLOCK, False, 16, TILE // 16
                )
                for p0 in range(lo + 16, hi, 16):
                    _recall_chunk_grad(
                        s_row,
                        g_row,
                        p0,
                        hi,
                        own,
                        w,
                        kp_ptr,
                        n_cols,
                        scale,
                        inv_tau,
                        NUM_K,
                        K_BLOCK,
                        True,
                        16,
                        TILE // 16,
                    )

    @triton.jit
    def _rows_kernel(
        S_ptr,
        stride_s,
        lo_ptr,
        hi_ptr,
        own_ptr,
        kp_ptr,
        loss_ptr,
        G_ptr,
        stride_g,
        n_cols,
        scale,
        inv_tau,
        alpha,
        b,
        LOSS: tl.constexpr,
        VARIANT: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        TILE: tl.constexpr,
        BLOCK_S: tl.constexpr,
        NUM_K: tl.constexpr,
        K_BLOCK: tl.constexpr,
    ):
        # One program per query row. The positive-tile width is picked per row from its segment
        # length (1-4, 5-8, more: chunks of 16), so no host sync is needed to size the launch and
        # small classes are not padded to the largest one. Each tier keeps the
        # (BLOCK_P x BLOCK_K) tile at TILE elements. own_ptr / kp_ptr (the own columns, the k
        # values and temperatures) are read by Recall@k only.
        row = tl.program_id(0).to(tl.int64)
        lo = tl.load(lo_ptr + row)
        hi = tl.load(hi_ptr + row)
        cnt = hi - lo
        s_row = S_ptr + row * stride_s
        g_row = G_ptr + row * stride_g
        if LOSS == _LOSS_RECALL_AT_K:
            _recall_row(
                s_row,
                g_row,
                lo,
                hi,
                own_ptr,
                kp_ptr,
                loss_ptr,
                row,
                n_cols,
                scale,
                inv_tau,
                COMPUTE_GRAD,
                TILE,
                NUM_K,
                K_BLOCK,
            )
        else:
            inv_cnt = 1.0 / tl.maximum(cnt, 1).to(tl.float32)
            loss = 0.0
            if cnt < 1:
                # An empty segment drops the row: loss 0, its row of dS zero.
                if COMPUTE_GRAD:
                    for k0 in range(0, n_cols, TILE):
                        offs = k0 + tl.arange(0, TILE)
                        tl.store(g_row + offs, tl.zeros([TILE], dtype=tl.float32), mask=offs < n_cols)
            elif cnt <= 4:
                loss = _row_chunk(
                    s_row,
                    g_row,
                    lo,
                    hi,
                    lo,
                    n_cols,
                    scale,
                    inv_tau,
                    inv_cnt,
                    alpha,
                    b,
                    LOSS,
                    VARIANT,
                    COMPUTE_GRAD,
                    False,
                    4,
                    TILE // 4,
                    BLOCK_S,
                )
            elif cnt <= 8:
                loss = _row_chunk(
                    s_row,
                    g_row,
                    lo,
                    hi,
                    lo,
                    n_cols,
                    scale,
                    inv_tau,
                    inv_cnt,
                    alpha,
                    b,
                    LOSS,
                    VARIANT,
                    COMPUTE_GRAD,
                    False,
                    8,
                    TILE // 8,
                    BLOCK_S,
                )
            else:
                loss = _row_chunk(
                    s_row,
                    g_row,
                    lo,
                    hi,
                    lo,
                    n_cols,
                    scale,
                    inv_tau,
                    inv_cnt,
                    alpha,
                    b,
                    LOSS,
                    VARIANT,
                    COMPUTE_GRAD,
                    False,
                    16,
                    TILE // 16,
                    BLOCK_S,
                )
                for p0 in range(lo + 16, hi, 16):
                    loss += _row_chunk(
                        s_row,
                        g_row,
                        lo,
                        hi,
                        p0,
                        n_cols,
                        scale,
                        inv_tau,
                        inv_cnt,
                        alpha,
                        b,
                        LOSS,
                        VARIANT,
                        COMPUTE_GRAD,
                        True,
                        16,
                        TILE // 16,
                        BLOCK_S,
                    )
            tl.store(loss_ptr + row, loss * inv_cnt)

    @triton.jit
    def _row_weights(g_ptr, g_stride, perm_ptr, n_valid_ptr, offs, mask, MODE: tl.constexpr):
        # MODE 0: g[p * stride]; 1: g[perm[p]] ("none"); 2: g[0] / max(n_valid, 1) ("mean")
        if MODE == 0:
            g = tl.load(g_ptr + offs * g_stride, mask=mask, other=0.0)
        elif MODE == 1:
            src = tl.load(perm_ptr + offs, mask=mask, other=0)
            g = tl.load(g_ptr + src, mask=mask, other=0.0)
        else:
            scale = tl.load(g_ptr) / tl.maximum(tl.load(n_valid_ptr), 1.0)
            g = tl.where(mask, scale, 0.0)
        return g

    @triton.jit
    def _symmetric_grad_kernel(
        G_ptr,
        stride_g,
        H_ptr,
        stride_h,
        n,
        g_ptr,
        g_stride,
        perm_ptr,
        n_valid_ptr,
        MODE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # H[a, b] = g_a G[a, b] + g_b G[b, a]: the gradient of S = X X^T folded onto one factor.
        pid_a = tl.program_id(0)
        pid_b = tl.program_id(1)
        offs_a = pid_a * BLOCK + tl.arange(0, BLOCK)
        offs_b = pid_b * BLOCK + tl.arange(0, BLOCK)
        ma = offs_a < n
        mb = offs_b < n
        m2 = ma[:, None] & mb[None, :]
        g_a = _row_weights(g_ptr, g_stride, perm_ptr, n_valid_ptr, offs_a, ma, MODE)
        g_b = _row_weights(g_ptr, g_stride, perm_ptr, n_valid_ptr, offs_b, mb, MODE)
        a64 = offs_a.to(tl.int64)
        b64 = offs_b.to(tl.int64)
        G_ab = tl.load(G_ptr + a64[:, None] * stride_g + b64[None, :], mask=m2, other=0.0)
        G_ba = tl.load(G_ptr + b64[None, :] * stride_g + a64[:, None], mask=m2, other=0.0)
        H = g_a[:, None] * G_ab + g_b[None, :] * G_ba
        tl.store(H_ptr + a64[:, None] * stride_h + b64[None, :], H, mask=m2)

    @triton.jit
    def _gather_normalize(
        E_ptr,
        stride_er,
        stride_ec,
        Xs_ptr,
        denom_ptr,
        src,
        dst,
        rmask,
        D,
        eps,
        COSINE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Xs[dst] = E[src] / max(||E[src]||, eps) (or E[src] for "dot"), in float32."""
        e_rows = E_ptr + src.to(tl.int64)[:, None] * stride_er
        x_rows = Xs_ptr + dst.to(tl.int64)[:, None] * D
        offs_d0 = tl.arange(0, BLOCK_D)
        if COSINE:
            sq = tl.zeros([BLOCK_R], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_d0
                m = rmask[:, None] & (offs_d < D)[None, :]
                x = tl.load(e_rows + offs_d[None, :] * stride_ec, mask=m, other=0.0).to(tl.float32)
                sq += tl.sum(x * x, axis=1)
            denom = tl.maximum(tl.sqrt(sq), eps)
            tl.store(denom_ptr + dst, denom, mask=rmask)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            m = rmask[:, None] & (offs_d < D)[None, :]
            x = tl.load(e_rows + offs_d[None, :] * stride_ec, mask=m, other=0.0).to(tl.float32)
            if COSINE:
                x = x / denom[:, None]
            tl.store(x_rows + offs_d[None, :], x, mask=m)

    @triton.jit
    def _prep_count_kernel(
        labels_ptr,
        perm_ptr,
        E_ptr,
        stride_er,
        stride_ec,
        Xs_ptr,
        lo_ptr,
        hi_ptr,
        denom_ptr,
        n,
        D,
        eps,
        COSINE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # Small batches: a stable sort by counting, fused with the gather. For original row i,
        # its sorted position is #{y_j < y_i} + #{j < i: y_j = y_i}, its class segment starts
        # at #{y_j < y_i} and holds #{y_j = y_i} rows. O(B^2) compares, one launch, no sort.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n
        key = tl.load(labels_ptr + rows, mask=rmask, other=0)
        less = tl.zeros([BLOCK_R], dtype=tl.int32)
        same = tl.zeros([BLOCK_R], dtype=tl.int32)
        before = tl.zeros([BLOCK_R], dtype=tl.int32)
        for j0 in range(0, n, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            cmask = cols < n
            y = tl.load(labels_ptr + cols, mask=cmask, other=0)
            lt = cmask[None, :] & (y[None, :] < key[:, None])
            eq = cmask[None, :] & (y[None, :] == key[:, None])
            less += tl.sum(lt.to(tl.int32), axis=1)
            same += tl.sum(eq.to(tl.int32), axis=1)
            before += tl.sum((eq & (cols[None, :] < rows[:, None])).to(tl.int32), axis=1)
        pos = less + before
        tl.store(perm_ptr + pos, rows.to(tl.int64), mask=rmask)
        tl.store(lo_ptr + pos, less, mask=rmask)
        # a query whose only positive is itself is invalid: empty segment
        tl.store(hi_ptr + pos, tl.where(same >= 2, less + same, less), mask=rmask)
        _gather_normalize(
            E_ptr, stride_er, stride_ec, Xs_ptr, denom_ptr, rows, pos, rmask, D, eps, COSINE, BLOCK_R, BLOCK_D
        )

    @triton.jit
    def _prep_kernel(
        sorted_ptr,
        perm_ptr,
        E_ptr,
        stride_er,
        stride_ec,
        Xs_ptr,
        lo_ptr,
        hi_ptr,
        denom_ptr,
        n,
        D,
        n_bits,
        eps,
        COSINE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # Rows [r0, r0 + BLOCK_R) of the label-sorted batch: class segment by binary search
        # (lo = #labels < key, hi = #labels <= key), then gather + normalise the embeddings.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n
        key = tl.load(sorted_ptr + rows, mask=rmask, other=0)
        lo = tl.zeros([BLOCK_R], dtype=tl.int32)
        hi = tl.zeros([BLOCK_R], dtype=tl.int32)
        step = tl.full([BLOCK_R], 1, tl.int32) << n_bits  # a power of two > n
        for _ in range(n_bits):
            step = step // 2
            c_lo = lo + step
            ok_lo = rmask & (c_lo <= n)
            v = tl.load(sorted_ptr + c_lo - 1, mask=ok_lo, other=0)
            lo = tl.where(ok_lo & (v < key), c_lo, lo)
            c_hi = hi + step
            ok_hi = rmask & (c_hi <= n)
            w = tl.load(sorted_ptr + c_hi - 1, mask=ok_hi, other=0)
            hi = tl.where(ok_hi & (w <= key), c_hi, hi)
        tl.store(lo_ptr + rows, lo, mask=rmask)
        # a query whose only positive is itself is invalid: empty segment
        tl.store(hi_ptr + rows, tl.where(hi - lo >= 2, hi, lo), mask=rmask)
        src = tl.load(perm_ptr + rows, mask=rmask, other=0)
        _gather_normalize(
            E_ptr, stride_er, stride_ec, Xs_ptr, denom_ptr, src, rows, rmask, D, eps, COSINE, BLOCK_R, BLOCK_D
        )

    @triton.jit
    def _reduce_kernel(
        per_row_ptr,
        lo_ptr,
        hi_ptr,
        perm_ptr,
        out_ptr,
        n_valid_ptr,
        n,
        MEAN: tl.constexpr,
        HAS_PERM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program, fixed summation order: the reduction is deterministic.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        cnt = tl.zeros([BLOCK], dtype=tl.int32)
        for r0 in range(0, n, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)
            rmask = rows < n
            v = tl.load(per_row_ptr + rows, mask=rmask, other=0.0)
            lo = tl.load(lo_ptr + rows, mask=rmask, other=0)
            hi = tl.load(hi_ptr + rows, mask=rmask, other=0)
            valid = rmask & (hi > lo)
            v = tl.where(valid, v, 0.0)
            cnt += valid.to(tl.int32)
            if MEAN:
                acc += v
            else:
                if HAS_PERM:
                    dst = tl.load(perm_ptr + rows, mask=rmask, other=0)
                else:
                    dst = rows
                tl.store(out_ptr + dst, v, mask=rmask)
        n_valid = tl.sum(cnt, axis=0).to(tl.float32)
        tl.store(n_valid_ptr, n_valid)
        if MEAN:
            tl.store(out_ptr, tl.sum(acc, axis=0) / tl.maximum(n_valid, 1.0))

    @triton.jit
    def _unprep_kernel(
        dXs_ptr,
        Xs_ptr,
        denom_ptr,
        perm_ptr,
        dE_ptr,
        stride_er,
        stride_ec,
        n,
        D,
        eps,
        out_max,
        COSINE: tl.constexpr,
        SATURATE: tl.constexpr,
        HAS_PERM: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # dE[perm[p]] = (g - y (y . g)) / ||e||  (g / eps when ||e|| <= eps), cast to E's dtype;
        # SATURATE (float16 E): clipped to +-out_max first, so the cast never makes inf (NaN stays NaN).
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n
        x_rows = rows.to(tl.int64)[:, None] * D
        if HAS_PERM:
            dst = tl.load(perm_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            dst = rows.to(tl.int64)
        e_rows = dE_ptr + dst[:, None] * stride_er
        offs_d0 = tl.arange(0, BLOCK_D)
        if COSINE:
            denom = tl.load(denom_ptr + rows, mask=rmask, other=1.0)
            radial = tl.zeros([BLOCK_R], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_d0
                m = rmask[:, None] & (offs_d < D)[None, :]
                g = tl.load(dXs_ptr + x_rows + offs_d[None, :], mask=m, other=0.0)
                y = tl.load(Xs_ptr + x_rows + offs_d[None, :], mask=m, other=0.0)
                radial += tl.sum(g * y, axis=1)
            radial = tl.where(denom > eps, radial, 0.0)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            m = rmask[:, None] & (offs_d < D)[None, :]
            g = tl.load(dXs_ptr + x_rows + offs_d[None, :], mask=m, other=0.0)
            if COSINE:
                y = tl.load(Xs_ptr + x_rows + offs_d[None, :], mask=m, other=0.0)
                g = (g - y * radial[:, None]) / denom[:, None]
            if SATURATE:
                g = tl.where(g > out_max, out_max, tl.where(g < -out_max, -out_max, g))
            tl.store(e_rows + offs_d[None, :] * stride_ec, g.to(dE_ptr.dtype.element_ty), mask=m)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _tile() -> int:
    """Elements per (positives x columns) tile: 2048 keeps 4 warps at 16 per thread."""
    if interpreter_active():
        return 256
    return 2048


# Width of the Smooth-AP sweeps over the segment (a BLOCK_P x SEGMENT_BLOCK tile).
SEGMENT_BLOCK = 16


# (device, ks, k_temperatures) -> (device tensor, its host source: a pinned source must outlive
# the non-blocking copy from it)
_K_PARAMS_CACHE: Dict[Tuple[str, Tuple[float, ...], Tuple[float, ...]], Tuple[torch.Tensor, torch.Tensor]] = {}


def recall_k_params(spec: LossSpec, device: torch.device) -> Tuple[torch.Tensor, int, int]:
    """Recall@k's k values and temperatures for the kernels: ((2, NUM_K) float32 tensor on
    ``device``, row 0 the k values, row 1 tau2_k; NUM_K; K_BLOCK, the power of two >= NUM_K
    that ``_recall_k_params`` loads them into). Made once per device and k set and kept: later
    calls copy nothing, and no call synchronises (on a GPU the one copy is a non-blocking one
    from pinned memory)."""
    ks = tuple(float(k) for k in spec.ks)
    temps = tuple(float(t) for t in spec.k_temperatures)
    if not ks:
        raise ValueError("ks: Recall@k needs at least one k")
    if len(temps) != len(ks):
        raise ValueError(f"k_temperatures: expected one per k ({len(ks)}), got {len(temps)}")
    device = torch.device(device)
    key = (str(device), ks, temps)
    hit = _K_PARAMS_CACHE.get(key)
    if hit is None:
        host = torch.tensor([ks, temps], dtype=torch.float32)
        if device.type == "cuda":
            host = host.pin_memory()
            hit = (host.to(device, non_blocking=True), host)
        else:
            hit = (host.to(device), host)
        _K_PARAMS_CACHE[key] = hit
    kp = hit[0]
    return kp, len(ks), _next_pow2(len(ks))


def row_losses_and_dS(
    S: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    own: Optional[torch.Tensor],
    spec: LossSpec,
    compute_grad: bool,
    tile: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-row loss of a float32 (Q x M) block (positives of row p: columns [lo_p, hi_p)) and,
    if asked, its gradient dS (Q, M) float32 (else None), for the loss kind of ``spec``.

    ``own`` (Q,) int: row p's own column, -1 if none; Recall@k excludes it from the lanes and
    from the ranked columns, PNP and Smooth-AP ignore it (None is accepted for them). ``tile``:
    elements of a (positives x columns) tile, a power of two >= 64 (default: 2048 on a GPU,
    256 under the interpreter)."""
    check_device(S)
    if S.dtype != torch.float32:
        raise TypeError(f"triton backend computes in float32, got similarities of dtype {S.dtype}")
    kind = spec.kind
    if kind not in (LOSS_PNP, LOSS_SMOOTH_AP, LOSS_RECALL_AT_K):
        raise ValueError(f"kind: unknown loss kind {kind}")
    tile = _tile() if tile is None else int(tile)
    if tile < 64 or tile & (tile - 1):
        raise ValueError(f"tile: expected a power of two >= 64, got {tile}")
    S = S if S.stride(1) == 1 else S.contiguous()
    lo = (lo if lo.dtype == torch.int32 else lo.to(torch.int32)).contiguous()
    hi = (hi if hi.dtype == torch.int32 else hi.to(torch.int32)).contiguous()
    n_rows, n_cols = S.shape
    out = torch.empty(n_rows, dtype=torch.float32, device=S.device)
    G = torch.empty((n_rows, n_cols), dtype=torch.float32, device=S.device) if compute_grad else None
    variant = spec.variant.code
    if kind == LOSS_RECALL_AT_K:
        if own is None:
            raise ValueError("own: Recall@k needs each row's own column (-1 if none)")
        own = (own if own.dtype == torch.int32 else own.to(torch.int32)).contiguous()
        kp, num_k, k_block = recall_k_params(spec, S.device)
        variant = 0  # one specialization per k count: the variant is not used
    else:
        own = lo  # not read
        kp, num_k, k_block = out, 1, 1  # not read
        if kind == LOSS_SMOOTH_AP:
            variant = 0  # one specialization: the variant is not used
    if n_rows == 0:
        return out, G
    with _on_device(S):
        _rows_kernel[(n_rows,)](
            S,
            S.stride(0),
            lo,
            hi,
            own,
            kp,
            out,
            G if G is not None else out,
            G.stride(0) if G is not None else 0,  # dummy pointer when unused
            n_cols,
            _LOG2E / spec.anneal,
            1.0 / spec.anneal,
            float(spec.alpha),
            float(spec.b),
            LOSS=int(kind),
            VARIANT=int(variant),
            COMPUTE_GRAD=bool(compute_grad),
            TILE=tile,
            BLOCK_S=SEGMENT_BLOCK,
            NUM_K=num_k,
            K_BLOCK=k_block,
        )
    return out, G


# 8 warps for the 64 x 64 tiles: with 4, sm_90 needs 150-255 registers a thread and spills
# in one mode (bench/compile_check.py reports it).
SYMMETRIC_NUM_WARPS = 8


def _launch_symmetric(G, g, g_stride, perm, n_valid, mode):
    check_device(G)
    n = G.shape[0]
    G = G if G.stride(1) == 1 else G.contiguous()
    H = torch.empty((n, n), dtype=torch.float32, device=G.device)
    if n == 0:
        return H
    block = 32 if interpreter_active() else 64
    grid = (triton.cdiv(n, block), triton.cdiv(n, block))
    with _on_device(G):
        _symmetric_grad_kernel[grid](
            G,
            G.stride(0),
            H,
            H.stride(0),
            n,
            g,
            g_stride,
            perm,
            n_valid,
            MODE=mode,
            BLOCK=block,
            num_warps=SYMMETRIC_NUM_WARPS,
        )
    return H


def symmetrize(G: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """H = diag(g) G + (diag(g) G)^T for a square float32 G and row weights g (B,), in one pass."""
    g = g.to(torch.float32)
    return _launch_symmetric(G, g, g.stride(0), g, g, 0)


def symmetric_grad(G: torch.Tensor, grad_out: torch.Tensor, perm, n_valid: torch.Tensor, mean: bool) -> torch.Tensor:
    """H from the upstream gradient directly, the row weights formed in-kernel: "mean":
    g_p = grad_out / max(n_valid, 1); "none": g_p = grad_out[perm[p]] (perm None: grad_out[p])."""
    g = grad_out.to(torch.float32).contiguous()
    if mean:
        return _launch_symmetric(G, g, 0, g, n_valid, 2)
    if perm is None:
        return _launch_symmetric(G, g, 1, g, g, 0)
    return _launch_symmetric(G, g, 0, perm, g, 1)


# Batches up to this size may use the fused counting-sort prep kernel (one launch instead of
# torch.sort's several; O(B^2) compares). 0 = off: it passes the interpreter suite and compiles
# for sm_90 but has not been measured on a GPU yet (bench/gpu_check.py's profile section
# compares both paths); the default is the torch.sort path.
COUNT_SORT_MAX_B = int(os.environ.get("PNP_KERNELS_COUNT_SORT_MAX_B", "0"))


def _row_block(D: int):
    block_d = min(128, max(16, _next_pow2(D)))
    return (8 if interpreter_active() else 16), block_d


def prepare(E: torch.Tensor, labels: torch.Tensor, cosine: bool):
    """Stable sort by label, class segments, gather and normalise: one kernel for small
    batches (sort by counting), torch.sort plus one kernel (binary search) for large ones.

    Returns (Xs (B, D) float32, perm (B,) int64, lo, hi (B,) int32, denom (B,) float32 or
    empty for "dot"); a row whose class has fewer than 2 members gets hi = lo."""
    check_device(E)
    n, D = E.shape
    dev = E.device
    Xs = torch.empty((n, D), dtype=torch.float32, device=dev)
    lo = torch.empty(n, dtype=torch.int32, device=dev)
    hi = torch.empty(n, dtype=torch.int32, device=dev)
    denom = torch.empty(n if cosine else 0, dtype=torch.float32, device=dev)
    if n == 0:
        return Xs, torch.empty(0, dtype=torch.int64, device=dev), lo, hi, denom
    BLOCK_R, BLOCK_D = _row_block(D)
    labels = labels.contiguous()
    with _on_device(E):
        if n <= COUNT_SORT_MAX_B:
            perm = torch.empty(n, dtype=torch.int64, device=dev)
            _prep_count_kernel[(triton.cdiv(n, BLOCK_R),)](
                labels,
                perm,
                E,
                E.stride(0),
                E.stride(1),
                Xs,
                lo,
                hi,
                denom if cosine else Xs,
                n,
                D,
                NORM_EPS,
                COSINE=cosine,
                BLOCK_R=BLOCK_R,
                BLOCK_J=32 if interpreter_active() else 128,
                BLOCK_D=BLOCK_D,
            )
            return Xs, perm, lo, hi, denom
        sorted_labels, perm = torch.sort(labels, stable=True)
        _prep_kernel[(triton.cdiv(n, BLOCK_R),)](
            sorted_labels,
            perm,
            E,
            E.stride(0),
            E.stride(1),
            Xs,
            lo,
            hi,
            denom if cosine else Xs,
            n,
            D,
            (n + 1).bit_length(),
            NORM_EPS,
            COSINE=cosine,
            BLOCK_R=BLOCK_R,
            BLOCK_D=BLOCK_D,
        )
    return Xs, perm, lo, hi, denom


def reduce(row_loss: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, perm, mean: bool):
    """(out, n_valid): the mean over the valid rows (hi > lo; 0 when none) as a 0-d float32, or
    for mean=False the (Q,) vector out[perm[p]] = row_loss[p] (0 for an invalid row; perm None:
    identity); n_valid is the 0-d float32 count of valid rows. One program, fixed order."""
    check_device(row_loss)
    n = row_loss.shape[0]
    dev = row_loss.device
    out = torch.empty(() if mean else (n,), dtype=torch.float32, device=dev)
    n_valid = torch.empty((), dtype=torch.float32, device=dev)
    has_perm = perm is not None
    with _on_device(row_loss):
        _reduce_kernel[(1,)](
            row_loss,
            lo,
            hi,
            perm if has_perm else lo,
            out,
            n_valid,
            n,
            MEAN=bool(mean),
            HAS_PERM=has_perm,
            BLOCK=min(1024, max(16, _next_pow2(n))),
        )
    return out, n_valid


def unprepare(
    dX: torch.Tensor, X: torch.Tensor, denom: torch.Tensor, perm, cosine: bool, out_dtype: torch.dtype
) -> torch.Tensor:
    """dL/dE: back through the normalisation (F.normalize's gradient; g / eps for a zero-norm
    row) and the permutation (dE[perm[p]] = row p; perm None: identity), written in out_dtype
    (float16 saturated to +-HALF_MAX), one kernel."""
    check_device(dX)
    n, D = dX.shape
    dE = torch.empty((n, D), dtype=out_dtype, device=dX.device)
    if n == 0:
        return dE
    dX = dX.contiguous()
    BLOCK_R, BLOCK_D = _row_block(D)
    has_perm = perm is not None
    with _on_device(dX):
        _unprep_kernel[(triton.cdiv(n, BLOCK_R),)](
            dX,
            X.contiguous() if cosine else dX,
            denom if cosine else dX,
            perm if has_perm else dX,
            dE,
            dE.stride(0),
            dE.stride(1),
            n,
            D,
            NORM_EPS,
            HALF_MAX,
            COSINE=cosine,
            SATURATE=out_dtype == torch.float16,
            HAS_PERM=has_perm,
            BLOCK_R=BLOCK_R,
            BLOCK_D=BLOCK_D,
        )
    return dE
