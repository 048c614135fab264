"""Triton backend: the fused PNP kernels and their launchers.

``_pnp_fwd_kernel`` runs one program per query row p of a (queries x gallery)
similarity block whose gallery is label-sorted, so that the positives of row p
are the columns [lo_p, hi_p) and every other column is a negative. For each
chunk of BLOCK_P positives it makes

  pass 1: R_pj = sum_{k neg} sigmoid((S_pk - S_pj)/tau)  -> f(R_pj), f'(R_pj)
  pass 2 (only when a gradient is needed): sigma'_pjk = sigma (1 - sigma) and
          G_pk = (1/tau) sum_j c_pj sigma'_pjk        for negatives k
          G_pj = -(1/tau) c_pj sum_k sigma'_pjk       for positives j
          with c_pj = f'(R_pj) / |P_p|

so the gradient is ready when the forward returns. BLOCK_P (4, 8 or 16) is picked
per row from its class size; rows with more than 16 positives accumulate G over
chunks with a read-modify-write of their own row (no atomics: deterministic).

Sigmoids are evaluated as 1 / (1 + 2^z) with z = (S_pj - S_pk) log2(e)/tau
(clamped at 100 in pass 2): no NaN, and sigma' = 2^z sigma^2 stays exact in both
tails.

Around it: ``_prep_kernel`` (after torch.sort) or the opt-in ``_prep_count_kernel``
find the class segments and gather + normalise the embeddings, ``_finalize_kernel``
reduces the per-row losses, and in backward ``_symmetric_grad_kernel`` forms
H = diag(g) G + (diag(g) G)^T for the GEMM dX = H X, then ``_unprep_kernel`` goes
back through the normalisation and the sort.
"""
from __future__ import annotations

import os

import torch

from ..pipeline import HALF_MAX, NORM_EPS, Prep
from ..variants import Variant

try:  # triton is optional at import time (e.g. macOS, or a broken install)
    import triton
    import triton.language as tl

    _IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _IMPORT_ERROR = f"triton failed to import: {exc!r}"

__all__ = ["prepare", "rows_forward", "finalize", "symmetric_grad", "symmetric_grad_from", "unprepare",
           "is_available", "why_unavailable", "interpreter_active"]

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


if triton is not None:

    @triton.jit
    def _log1p(x):
        """log(1+x) for x >= 0, full relative precision: its series below 0.5."""
        xs = tl.minimum(x, 0.5)
        acc = tl.zeros_like(xs)
        for i in tl.static_range(0, 24):  # n = 24 .. 1: x (1 - x (1/2 - x (1/3 - ...)))
            acc = (1.0 / (24 - i)) - xs * acc
        return tl.where(x < 0.5, xs * acc, tl.log(1.0 + x))

    @triton.jit
    def _x_minus_log1p(x):
        """x - log(1+x) for x >= 0 without cancellation: its series below 0.5."""
        xs = tl.minimum(x, 0.5)
        acc = tl.zeros_like(xs)
        for i in tl.static_range(0, 24):  # n = 25 .. 2: x^2 (1/2 - x (1/3 - x (1/4 - ...)))
            acc = (1.0 / (25 - i)) - xs * acc
        return tl.where(x < 0.5, xs * xs * acc, x - tl.log(1.0 + x))

    @triton.jit
    def _one_minus_exp(y):
        """1 - e^-y = -expm1(-y) for y >= 0, full relative precision: its series below 0.5."""
        ys = tl.minimum(y, 0.5)
        acc = tl.zeros_like(ys)
        for i in tl.static_range(0, 14):  # n = 14 .. 1: y (1 - y/2 (1 - y/3 (1 - ...)))
            acc = 1.0 - ys * acc * (1.0 / (15 - i))
        return tl.where(y < 0.5, ys * acc, 1.0 - tl.exp(-y))

    @triton.jit
    def _variant_f_df(R, alpha, b, VARIANT: tl.constexpr):
        """f(R) and df/dR of the variant table in pnp_kernels/variants.py (same codes, same forms)."""
        if VARIANT == 0:  # O
            f = R
            df = R * 0.0 + 1.0
        elif VARIANT == 1:  # Ds: log(1+R)
            f = _log1p(R)
            df = 1.0 / (1.0 + R)
        elif VARIANT == 2:  # Dq: 1 - (1+R)^-alpha
            lg = _log1p(R)
            f = _one_minus_exp(alpha * lg)
            df = alpha * tl.exp(-(alpha + 1.0) * lg)
        elif VARIANT == 3:  # Iu: (1+R) log(1+R)
            lg = _log1p(R)
            f = (1.0 + R) * lg
            df = lg + 1.0
        else:  # Ib: (bR - log(1+bR)) / b^2
            x = b * R
            f = _x_minus_log1p(x) / (b * b)
            df = R / (1.0 + x)
        return f, df

    @triton.jit
    def _pnp_chunk(
        s_row, g_row, lo, hi, p0, n_cols, scale, inv_tau, inv_cnt, alpha, b,
        VARIANT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ACCUMULATE: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Positives [p0, p0 + BLOCK_P) of one row: returns sum_j f(R_pj); writes/accumulates G."""
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < hi
        offs_k0 = tl.arange(0, BLOCK_K)
        s_j = tl.load(s_row + offs_p, mask=pmask, other=0.0)
        # pass 1: R_pj = sum over negatives k of sigmoid((S_pk - S_pj) / tau) = 1 / (1 + 2^z)
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
        f, df = _variant_f_df(R, alpha, b, VARIANT)
        loss = tl.sum(tl.where(pmask, f, 0.0), axis=0)
        if COMPUTE_GRAD:
            # pass 2: sigma' = 2^z sigma^2 (exact in both tails), c_j = f'(R_pj) / |P_p|
            coef = tl.where(pmask, df * inv_cnt, 0.0)
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
                g_k = tl.sum(coef[:, None] * sp, axis=0) * inv_tau  # G_pk, negatives k; 0 elsewhere
                if ACCUMULATE:
                    g_k += tl.load(g_row + offs_k, mask=kmask, other=0.0)
                tl.store(g_row + offs_k, g_k, mask=kmask)
            T = tl.sum(T2, axis=1)
            tl.debug_barrier()  # the zeros just stored at these positive columns land first
            tl.store(g_row + offs_p, -coef * T * inv_tau, mask=pmask)  # G_pj, positives j
        return loss

    @triton.jit
    def _pnp_fwd_kernel(
        S_ptr, stride_s,
        lo_ptr, hi_ptr,
        loss_ptr,
        G_ptr, stride_g,
        n_cols,
        scale, inv_tau, alpha, b,
        VARIANT: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        TILE: tl.constexpr,
    ):
        # One program per query row. The positive-tile width is picked per row from its class
        # size (2-4, 5-8, more: chunks of 16), so no host sync is needed to size the launch
        # and small classes are not padded to the largest one. Each tier keeps the
        # (BLOCK_P x BLOCK_K) tile at TILE elements.
        row = tl.program_id(0).to(tl.int64)
        lo = tl.load(lo_ptr + row)
        hi = tl.load(hi_ptr + row)
        cnt = hi - lo
        s_row = S_ptr + row * stride_s
        g_row = G_ptr + row * stride_g
        inv_cnt = 1.0 / tl.maximum(cnt, 1).to(tl.float32)
        loss = 0.0
        if cnt < 2:
            # A query whose only positive is itself is dropped: loss 0, its row of G zero.
            if COMPUTE_GRAD:
                for k0 in range(0, n_cols, TILE):
                    offs = k0 + tl.arange(0, TILE)
                    tl.store(g_row + offs, tl.zeros([TILE], dtype=tl.float32), mask=offs < n_cols)
        elif cnt <= 4:
            loss = _pnp_chunk(s_row, g_row, lo, hi, lo, n_cols, scale, inv_tau, inv_cnt, alpha, b,
                              VARIANT, COMPUTE_GRAD, False, 4, TILE // 4)
        elif cnt <= 8:
            loss = _pnp_chunk(s_row, g_row, lo, hi, lo, n_cols, scale, inv_tau, inv_cnt, alpha, b,
                              VARIANT, COMPUTE_GRAD, False, 8, TILE // 8)
        else:
            loss = _pnp_chunk(s_row, g_row, lo, hi, lo, n_cols, scale, inv_tau, inv_cnt, alpha, b,
                              VARIANT, COMPUTE_GRAD, False, 16, TILE // 16)
            for p0 in range(lo + 16, hi, 16):
                loss += _pnp_chunk(s_row, g_row, lo, hi, p0, n_cols, scale, inv_tau, inv_cnt, alpha, b,
                                   VARIANT, COMPUTE_GRAD, True, 16, TILE // 16)
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
        G_ptr, stride_g, H_ptr, stride_h, n,
        g_ptr, g_stride, perm_ptr, n_valid_ptr,
        MODE: tl.constexpr, BLOCK: tl.constexpr,
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
    def _gather_normalize(E_ptr, stride_er, stride_ec, Xs_ptr, denom_ptr, src, dst, rmask, D, eps,
                          COSINE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
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
        labels_ptr, perm_ptr, E_ptr, stride_er, stride_ec, Xs_ptr, lo_ptr, hi_ptr, denom_ptr,
        n, D, eps,
        COSINE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
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
        tl.store(hi_ptr + pos, less + same, mask=rmask)
        _gather_normalize(E_ptr, stride_er, stride_ec, Xs_ptr, denom_ptr, rows, pos, rmask, D, eps,
                          COSINE, BLOCK_R, BLOCK_D)

    @triton.jit
    def _prep_kernel(
        sorted_ptr, perm_ptr, E_ptr, stride_er, stride_ec, Xs_ptr, lo_ptr, hi_ptr, denom_ptr,
        n, D, n_bits, eps,
        COSINE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Rows [r0, r0 + BLOCK_R) of the label-sorted batch: class segment by binary search
        # (lo = #labels < key, hi = #labels <= key), then gather + normalise the embeddings.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n
        key = tl.load(sorted_ptr + rows, mask=rmask, other=0)
        lo = tl.zeros([BLOCK_R], dtype=tl.int32)
        hi = tl.zeros([BLOCK_R], dtype=tl.int32)
        step = tl.full([BLOCK_R], 1, tl.int32) << n_bits  # a power of two > n
        for _ in range(0, n_bits):
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
        tl.store(hi_ptr + rows, hi, mask=rmask)
        src = tl.load(perm_ptr + rows, mask=rmask, other=0)
        _gather_normalize(E_ptr, stride_er, stride_ec, Xs_ptr, denom_ptr, src, rows, rmask, D, eps,
                          COSINE, BLOCK_R, BLOCK_D)

    @triton.jit
    def _finalize_kernel(
        per_row_ptr, lo_ptr, hi_ptr, perm_ptr, out_ptr, n_valid_ptr, n,
        MEAN: tl.constexpr, BLOCK: tl.constexpr,
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
            valid = rmask & ((hi - lo) >= 2)
            v = tl.where(valid, v, 0.0)
            cnt += valid.to(tl.int32)
            if MEAN:
                acc += v
            else:
                dst = tl.load(perm_ptr + rows, mask=rmask, other=0)
                tl.store(out_ptr + dst, v, mask=rmask)
        n_valid = tl.sum(cnt, axis=0).to(tl.float32)
        tl.store(n_valid_ptr, n_valid)
        if MEAN:
            tl.store(out_ptr, tl.sum(acc, axis=0) / tl.maximum(n_valid, 1.0))

    @triton.jit
    def _unprep_kernel(
        dXs_ptr, Xs_ptr, denom_ptr, perm_ptr, dE_ptr, stride_er, stride_ec, n, D, eps, out_max,
        COSINE: tl.constexpr, SATURATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # dE[perm[p]] = (g - y (y . g)) / ||e||  (g / eps when ||e|| <= eps), cast to E's dtype;
        # SATURATE (float16 E): clipped to +-out_max first, so the cast never makes inf (NaN stays NaN).
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n
        x_rows = rows.to(tl.int64)[:, None] * D
        dst = tl.load(perm_ptr + rows, mask=rmask, other=0).to(tl.int64)
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


def rows_forward(
    S: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    variant: Variant,
    anneal: float,
    alpha: float,
    b: float,
    compute_grad: bool,
    tile: int = 0,
):
    """Per-row PNP loss of a float32 (queries x gallery) block, and its dS if asked."""
    check_device(S)
    if S.dtype != torch.float32:
        raise TypeError(f"triton backend computes in float32, got similarities of dtype {S.dtype}")
    S = S if S.stride(1) == 1 else S.contiguous()
    n_rows, n_cols = S.shape
    out = torch.empty(n_rows, dtype=torch.float32, device=S.device)
    G = torch.empty_like(S) if compute_grad else out  # dummy pointer when unused
    if n_rows == 0:
        return out, (G if compute_grad else None)
    TILE = tile or _tile()
    _pnp_fwd_kernel[(n_rows,)](
        S, S.stride(0),
        lo, hi,
        out,
        G, G.stride(0) if compute_grad else 0,
        n_cols,
        _LOG2E / anneal, 1.0 / anneal, float(alpha), float(b),
        VARIANT=variant.code,
        COMPUTE_GRAD=compute_grad,
        TILE=TILE,
    )
    return out, (G if compute_grad else None)


# 8 warps for the 64 x 64 tiles: with 4, sm_90 needs 150-255 registers a thread and spills
# in one mode (bench/compile_check.py reports it).
SYMMETRIC_NUM_WARPS = 8


def _launch_symmetric(G, g, g_stride, perm, n_valid, mode):
    n = G.shape[0]
    H = torch.empty_like(G)
    block = 32 if interpreter_active() else 64
    grid = (triton.cdiv(n, block), triton.cdiv(n, block))
    _symmetric_grad_kernel[grid](G, G.stride(0), H, H.stride(0), n, g, g_stride, perm, n_valid,
                                 MODE=mode, BLOCK=block, num_warps=SYMMETRIC_NUM_WARPS)
    return H


def symmetric_grad(G: torch.Tensor, row_grad: torch.Tensor) -> torch.Tensor:
    """diag(g) G + (diag(g) G)^T for a square float32 G, in one pass."""
    check_device(G)
    g = row_grad.to(torch.float32)
    return _launch_symmetric(G, g, g.stride(0), g, g, 0)


def symmetric_grad_from(impl, G, grad_out, prep: Prep, n_valid, mean: bool):
    """H from the upstream gradient directly: the row weights are formed inside the kernel."""
    g = grad_out.to(torch.float32).contiguous()
    return _launch_symmetric(G, g, 0, prep.perm, n_valid, 2 if mean else 1)


# Batches up to this size may use the fused counting-sort prep kernel (one launch instead of
# torch.sort's several; O(B^2) compares). 0 = off: it passes the interpreter suite and compiles
# for sm_90 but has not been measured on a GPU yet (bench/gpu_check.py's profile section
# compares both paths); the default is the torch.sort path that was checked on an H200.
COUNT_SORT_MAX_B = int(os.environ.get("PNP_KERNELS_COUNT_SORT_MAX_B", "0"))


def _row_block(D: int):
    block_d = min(128, max(16, _next_pow2(D)))
    return (8 if interpreter_active() else 16), block_d


def prepare(E: torch.Tensor, labels: torch.Tensor, cosine: bool, compute_dtype: torch.dtype) -> Prep:
    """Stable sort by label, class segments, gather and normalise: one kernel for small
    batches (sort by counting), torch.sort plus one kernel (binary search) for large ones."""
    check_device(E)
    n, D = E.shape
    Xs = torch.empty((n, D), dtype=torch.float32, device=E.device)
    lo = torch.empty(n, dtype=torch.int32, device=E.device)
    hi = torch.empty(n, dtype=torch.int32, device=E.device)
    denom = torch.empty(n if cosine else 0, dtype=torch.float32, device=E.device)
    BLOCK_R, BLOCK_D = _row_block(D)
    if n <= COUNT_SORT_MAX_B:
        perm = torch.empty(n, dtype=torch.int64, device=E.device)
        _prep_count_kernel[(triton.cdiv(n, BLOCK_R),)](
            labels, perm, E, E.stride(0), E.stride(1), Xs, lo, hi, denom if cosine else Xs,
            n, D, NORM_EPS,
            COSINE=cosine, BLOCK_R=BLOCK_R, BLOCK_J=32 if interpreter_active() else 128, BLOCK_D=BLOCK_D,
        )
        return Prep(Xs, perm, lo, hi, denom)
    sorted_labels, perm = torch.sort(labels, stable=True)
    _prep_kernel[(triton.cdiv(n, BLOCK_R),)](
        sorted_labels, perm, E, E.stride(0), E.stride(1), Xs, lo, hi, denom if cosine else Xs,
        n, D, (n + 1).bit_length(), NORM_EPS,
        COSINE=cosine, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
    )
    return Prep(Xs, perm, lo, hi, denom)


def finalize(per_row: torch.Tensor, prep: Prep, mean: bool):
    """Mean over valid rows (or the scattered "none" vector) and the valid count, one program."""
    n = per_row.shape[0]
    out = torch.empty(() if mean else (n,), dtype=torch.float32, device=per_row.device)
    n_valid = torch.empty((), dtype=torch.float32, device=per_row.device)
    _finalize_kernel[(1,)](per_row, prep.lo, prep.hi, prep.perm, out, n_valid, n,
                           MEAN=mean, BLOCK=min(1024, max(16, _next_pow2(n))))
    return out, n_valid


def unprepare(dXs: torch.Tensor, prep: Prep, cosine: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """dL/dE: back through the normalisation and the sort, written in E's dtype, one kernel."""
    n, D = dXs.shape
    dE = torch.empty((n, D), dtype=out_dtype, device=dXs.device)
    BLOCK_R, BLOCK_D = _row_block(D)
    _unprep_kernel[(triton.cdiv(n, BLOCK_R),)](
        dXs, prep.Xs, prep.denom if cosine else dXs, prep.perm, dE, dE.stride(0), dE.stride(1), n, D, NORM_EPS,
        HALF_MAX, COSINE=cosine, SATURATE=out_dtype == torch.float16, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
    )
    return dE
