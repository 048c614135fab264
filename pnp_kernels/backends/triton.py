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

so the gradient is ready when the forward returns and backward is only GEMMs.
Rows with more positives than BLOCK_P accumulate G over chunks with a
read-modify-write of their own row (no atomics: deterministic).

Sigmoids are evaluated as 1 / (1 + 2^z) with z = (S_pj - S_pk) log2(e)/tau
clamped at 100: no overflow, no NaN, and sigma' = 2^z sigma^2 stays exact in
both tails.

``_symmetric_grad_kernel`` forms H = diag(g) G + (diag(g) G)^T tile by tile for
the backward GEMM dX = H X.
"""
from __future__ import annotations

import math
import os

import torch

from ..variants import Variant

try:  # triton is optional at import time (e.g. macOS, or a broken install)
    import triton
    import triton.language as tl

    _IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _IMPORT_ERROR = f"triton failed to import: {exc!r}"

__all__ = ["rows_forward", "symmetric_grad", "is_available", "why_unavailable", "interpreter_active"]

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
    def _variant_f_df(R, alpha, b, VARIANT: tl.constexpr):
        """f(R) and df/dR of the variant table in pnp_kernels/variants.py (same codes)."""
        one_p_r = 1.0 + R
        if VARIANT == 0:  # O
            f = R
            df = R * 0.0 + 1.0
        elif VARIANT == 1:  # Ds
            f = tl.log(one_p_r)
            df = 1.0 / one_p_r
        elif VARIANT == 2:  # Dq: (1+R)^-alpha
            f = tl.exp2(-alpha * tl.log2(one_p_r))
            df = -alpha * f / one_p_r
        elif VARIANT == 3:  # Iu
            lg = tl.log(one_p_r)
            f = one_p_r * lg
            df = lg + 1.0
        else:  # Ib: x - log(1+x) cancels for small x = bR, so use its series there
            x = b * R
            series = x * x * (0.5 - x * (1.0 / 3.0 - x * (0.25 - x * (0.2 - x * (1.0 / 6.0)))))
            f = tl.where(x < 0.01, series, x - tl.log(1.0 + x)) / (b * b)
            df = R / (1.0 + x)
        return f, df

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
        BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        lo = tl.load(lo_ptr + row)
        hi = tl.load(hi_ptr + row)
        cnt = hi - lo
        s_row = S_ptr + row * stride_s
        g_row = G_ptr + row * stride_g
        offs_p0 = tl.arange(0, BLOCK_P)
        offs_k0 = tl.arange(0, BLOCK_K)
        inv_cnt = 1.0 / tl.maximum(cnt, 1).to(tl.float32)
        # A query whose only positive is itself is dropped: no chunks, loss 0.
        n_chunks = tl.where(cnt >= 2, tl.cdiv(cnt, BLOCK_P), 0)
        loss_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        for c in range(0, n_chunks):
            offs_p = lo + c * BLOCK_P + offs_p0
            pmask = offs_p < hi
            s_j = tl.load(s_row + offs_p, mask=pmask, other=0.0)
            R = tl.zeros([BLOCK_P], dtype=tl.float32)
            for k0 in range(0, n_cols, BLOCK_K):
                offs_k = k0 + offs_k0
                kmask = offs_k < n_cols
                neg = kmask & ((offs_k < lo) | (offs_k >= hi))
                s_k = tl.load(s_row + offs_k, mask=kmask, other=0.0)
                z = tl.minimum((s_j[:, None] - s_k[None, :]) * scale, 100.0)
                sig = 1.0 / (1.0 + tl.exp2(z))
                R += tl.sum(tl.where(neg[None, :], sig, 0.0), axis=1)
            f, df = _variant_f_df(R, alpha, b, VARIANT)
            loss_acc += tl.where(pmask, f, 0.0)
            if COMPUTE_GRAD:
                coef = tl.where(pmask, df * inv_cnt, 0.0)
                T = tl.zeros([BLOCK_P], dtype=tl.float32)
                # Earlier chunks' stores to this row must land before we read them back.
                tl.debug_barrier()
                for k0 in range(0, n_cols, BLOCK_K):
                    offs_k = k0 + offs_k0
                    kmask = offs_k < n_cols
                    neg = kmask & ((offs_k < lo) | (offs_k >= hi))
                    s_k = tl.load(s_row + offs_k, mask=kmask, other=0.0)
                    z = tl.minimum((s_j[:, None] - s_k[None, :]) * scale, 100.0)
                    e = tl.exp2(z)
                    sig = 1.0 / (1.0 + e)
                    sp = tl.where(neg[None, :], e * sig * sig, 0.0)
                    T += tl.sum(sp, axis=1)
                    g_k = tl.sum(coef[:, None] * sp, axis=0) * inv_tau
                    g_k += tl.load(g_row + offs_k, mask=kmask & (c > 0), other=0.0)
                    tl.store(g_row + offs_k, g_k, mask=kmask)
                # The zeros just stored at this chunk's positive columns must land first.
                tl.debug_barrier()
                tl.store(g_row + offs_p, -coef * T * inv_tau, mask=pmask)
        tl.store(loss_ptr + row, tl.sum(loss_acc, axis=0) * inv_cnt)
        if COMPUTE_GRAD:
            # Dropped rows still own their row of G: zero it.
            n_zero = tl.where(cnt >= 2, 0, n_cols)
            for k0 in range(0, n_zero, BLOCK_K):
                offs_k = k0 + offs_k0
                tl.store(g_row + offs_k, tl.zeros([BLOCK_K], dtype=tl.float32), mask=offs_k < n_cols)

    @triton.jit
    def _symmetric_grad_kernel(
        G_ptr, stride_g, g_ptr, H_ptr, stride_h, n,
        BLOCK: tl.constexpr,
    ):
        # H[a, b] = g_a G[a, b] + g_b G[b, a]
        pid_a = tl.program_id(0)
        pid_b = tl.program_id(1)
        offs_a = (pid_a * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        offs_b = (pid_b * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        ma = offs_a < n
        mb = offs_b < n
        m2 = ma[:, None] & mb[None, :]
        g_a = tl.load(g_ptr + offs_a, mask=ma, other=0.0)
        g_b = tl.load(g_ptr + offs_b, mask=mb, other=0.0)
        G_ab = tl.load(G_ptr + offs_a[:, None] * stride_g + offs_b[None, :], mask=m2, other=0.0)
        G_ba = tl.load(G_ptr + offs_b[None, :] * stride_g + offs_a[:, None], mask=m2, other=0.0)
        H = g_a[:, None] * G_ab + g_b[None, :] * G_ba
        tl.store(H_ptr + offs_a[:, None] * stride_h + offs_b[None, :], H, mask=m2)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _blocks(n_cols: int, block_p: int):
    """Tile sizes: BLOCK_P positives x BLOCK_K gallery columns per step."""
    if interpreter_active():
        return block_p, min(64, max(16, _next_pow2(n_cols)))
    block_k = min(512, max(32, _next_pow2(n_cols)))
    return block_p, block_k


def rows_forward(
    S: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    variant: Variant,
    anneal: float,
    alpha: float,
    b: float,
    compute_grad: bool,
    block_p: int = 4,
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
    BLOCK_P, BLOCK_K = _blocks(n_cols, block_p)
    _pnp_fwd_kernel[(n_rows,)](
        S, S.stride(0),
        lo, hi,
        out,
        G, G.stride(0) if compute_grad else 0,
        n_cols,
        _LOG2E / anneal, 1.0 / anneal, float(alpha), float(b),
        VARIANT=variant.code,
        COMPUTE_GRAD=compute_grad,
        BLOCK_P=BLOCK_P,
        BLOCK_K=BLOCK_K,
    )
    return out, (G if compute_grad else None)


def symmetric_grad(G: torch.Tensor, row_grad: torch.Tensor) -> torch.Tensor:
    """diag(g) G + (diag(g) G)^T for a square float32 G, in one pass."""
    check_device(G)
    n = G.shape[0]
    g = row_grad.to(torch.float32).contiguous()
    H = torch.empty_like(G)
    block = 32 if interpreter_active() else 64
    grid = (triton.cdiv(n, block), triton.cdiv(n, block))
    _symmetric_grad_kernel[grid](G, G.stride(0), g, H, H.stride(0), n, BLOCK=block)
    return H
