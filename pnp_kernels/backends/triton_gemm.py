"""The two GEMMs of the Triton backend's dense path on float16 / bfloat16 rows, as Triton kernels.

The dense path stores S and G (two Q x M float32 buffers); this module owns the products
around them when the embeddings are half precision, so that the half values go into the
tensor cores as they are instead of being upcast to a float32 GEMM:

``similarity``     S = diag(iq) Xq Xr^T diag(ir), (Q, M) float32: half tiles into ``tl.dot``
                   with float32 accumulation, then the float32 inverse row norms (cosine;
                   none for "dot"). Normalised vectors are never rounded to half precision.
``grad_product``   diag(row_scale) G diag(col_scale) X, (Q, D) float32, G a float32 (Q, K)
                   matrix of any strides (a transposed view of a Q x M buffer is read in
                   place). Each row of dS sums to about zero, so this product cancels
                   heavily and G is never rounded to a single half or TF32 term: the tile of
                   G, already scaled by ``col_scale`` (row weights, inverse norms), is split
                   into three bfloat16 terms against bfloat16 X (three ``tl.dot`` with float32
                   accumulation), and multiplied as float32 at input precision tf32x3 against
                   float16 X (exact in float32) or float32 X. ``row_scale`` multiplies the
                   float32 result.

Both reuse the tile helpers of ``triton_tiled`` (``_s_tile``, ``_g_dot``) and its precision
choice per dtype (``_precisions``), so the dense and the memory-efficient paths multiply
alike. One program per output block, a fixed summation order: deterministic, no atomics,
and nothing is read on the host (sync-free, CUDA-graph capturable). The GPU tile shapes
(``_GPU_CONFIG``) are a first choice for sm_90, not tuned by timing.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from . import triton_kernels as tk
from . import triton_tiled as tt

__all__ = ["GemmConfig", "config", "grad_product", "similarity"]

_HALF = (torch.float16, torch.bfloat16)
_ROW_DTYPES = (torch.float32,) + _HALF

try:  # optional at import time, as in triton_kernels
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  # pragma: no cover - depends on the environment
    triton = None
    tl = None

if triton is not None and tk.triton is not None:
    _s_tile = tt._s_tile
    _g_dot = tt._g_dot

    @triton.jit
    def _similarity_kernel(
        xq_ptr,
        xr_ptr,
        iq_ptr,
        ir_ptr,
        s_ptr,
        Q,
        M,
        D,
        stride_q,
        stride_r,
        stride_s,
        HAS_NORM: tl.constexpr,
        S_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # S[rows, cols] = sum_d Xq[rows, d] Xr[cols, d] (float32 accumulation) * iq[rows] * ir[cols]
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < Q
        cmask = cols < M
        if HAS_NORM:
            iq = tl.load(iq_ptr + rows, mask=rmask, other=0.0)
            ir = tl.load(ir_ptr + cols, mask=cmask, other=0.0)
        else:  # not read
            iq = tl.zeros([BLOCK_M], dtype=tl.float32)
            ir = tl.zeros([BLOCK_N], dtype=tl.float32)
        s = _s_tile(
            xq_ptr, xr_ptr, rows, rmask, cols, cmask, iq, ir, D, stride_q, stride_r, 1.0,
            HAS_NORM, S_PREC, BLOCK_M, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        out = s_ptr + rows.to(tl.int64)[:, None] * stride_s + cols[None, :]
        tl.store(out, s, mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _grad_product_kernel(
        g_ptr,
        x_ptr,
        rs_ptr,
        cs_ptr,
        out_ptr,
        Q,
        K,
        D,
        stride_gq,
        stride_gk,
        stride_x,
        stride_o,
        HAS_ROW: tl.constexpr,
        HAS_COL: tl.constexpr,
        G_SPLIT: tl.constexpr,
        G_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_DO: tl.constexpr,
    ):
        # out[rows, d-slice] = rs[rows] * sum over the K tiles, in order, of (G_tile * cs[ks]) X[ks, d-slice].
        # Axis 0 runs over the slices of D, so the programs that read the same rows of G run together.
        pid_d = tl.program_id(0)
        pid_m = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < Q
        offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        om = offs_o < D
        offs_k0 = tl.arange(0, BLOCK_K)
        g_rows = g_ptr + rows.to(tl.int64)[:, None] * stride_gq
        acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k0
            kmask = ks < K
            Gs = tl.load(g_rows + ks.to(tl.int64)[None, :] * stride_gk, mask=rmask[:, None] & kmask[None, :], other=0.0)
            if HAS_COL:
                Gs = Gs * tl.load(cs_ptr + ks, mask=kmask, other=0.0)[None, :]
            X = tl.load(
                x_ptr + ks.to(tl.int64)[:, None] * stride_x + offs_o[None, :],
                mask=kmask[:, None] & om[None, :],
                other=0.0,
            )
            acc = _g_dot(Gs, X, acc, G_SPLIT, G_PREC)
        if HAS_ROW:
            acc = acc * tl.load(rs_ptr + rows, mask=rmask, other=0.0)[:, None]
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_o + offs_o[None, :]
        tl.store(out, acc, mask=rmask[:, None] & om[None, :])


# ---- launchers ---------------------------------------------------------------------------


class GemmConfig(NamedTuple):
    """Tile shapes and warps: ``s_mn`` (rows, columns) of an S tile and ``s_block_d`` its step
    over D; ``g_block_m`` output rows, ``g_block_k`` the step over K and ``g_block_do`` the
    widest slice of D of one grad_product program."""

    s_mn: Tuple[int, int]
    s_block_d: int
    g_block_m: int
    g_block_k: int
    g_block_do: int
    num_warps: int
    stages: int


# sm_90: 128 x 128 float32 accumulators over 8 warps (64 registers a thread), 32-wide half steps
_GPU_CONFIG = GemmConfig((128, 128), 32, 128, 32, 128, 8, 3)
# the interpreter: 16-wide tiles (tl.dot's smallest), so tiny tests cover several tiles and steps
_INTERPRETER_CONFIG = GemmConfig((16, 16), 16, 16, 16, 16, 4, 1)


def config() -> GemmConfig:
    """The tile shapes in use: small under the interpreter, GPU-sized otherwise."""
    return _INTERPRETER_CONFIG if tk.interpreter_active() else _GPU_CONFIG


def _rows(X: torch.Tensor) -> torch.Tensor:
    """X with contiguous rows (stride 1 along D); a copy only when they are not. The interpreter
    has no bfloat16 arithmetic: there bfloat16 rows are widened to float32 (exactly)."""
    if X.dtype == torch.bfloat16 and tk.interpreter_active():
        return X.to(torch.float32)
    return X if X.stride(1) == 1 or X.shape[1] <= 1 else X.contiguous()


def _vector(v: torch.Tensor, n: int, arg: str) -> torch.Tensor:
    if v.dim() != 1 or v.shape[0] != n:
        raise ValueError(f"{arg}: expected a vector of {n} values, got shape {tuple(v.shape)}")
    return v.to(torch.float32).contiguous()


def similarity(
    Xq: torch.Tensor, Xr: torch.Tensor, iq: Optional[torch.Tensor] = None, ir: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """S = diag(iq) Xq Xr^T diag(ir), (Q, M) float32.

    Xq (Q, D), Xr (M, D): rows of one dtype, float16 / bfloat16 (taken as they are, float32
    accumulation) or float32 (TF32 only when ``torch.backends.cuda.matmul.allow_tf32``, else
    tf32x3). ``iq`` (Q,), ``ir`` (M,): float32 inverse row norms for cosine similarity, both
    or neither (None: the plain product, "dot"). Pass the same tensor twice for X X^T."""
    tk.check_device(Xq)
    if Xq.dim() != 2 or Xr.dim() != 2 or Xq.shape[1] != Xr.shape[1]:
        raise ValueError(f"Xq, Xr: expected (Q, D) and (M, D) rows, got {tuple(Xq.shape)} and {tuple(Xr.shape)}")
    if Xq.dtype != Xr.dtype or Xq.dtype not in _ROW_DTYPES:
        raise TypeError(f"Xq, Xr: expected float32, float16 or bfloat16 rows of one dtype, got {Xq.dtype}, {Xr.dtype}")
    if (iq is None) != (ir is None):
        raise ValueError("iq, ir: pass both inverse norms (cosine) or neither (dot)")
    Q, D = Xq.shape
    M = Xr.shape[0]
    S = torch.empty((Q, M), dtype=torch.float32, device=Xq.device)
    if Q == 0 or M == 0:
        return S
    if D == 0:
        return S.zero_()
    same = Xq is Xr
    Xq = _rows(Xq)
    Xr = Xq if same else _rows(Xr)
    has_norm = iq is not None
    if iq is not None and ir is not None:
        iq = _vector(iq, Q, "iq")
        ir = _vector(ir, M, "ir")
    else:
        iq = ir = S  # not read
    cfg = config()
    bm, bn = cfg.s_mn
    s_prec, _, _ = tt._precisions(Xq.dtype)
    with tk._on_device(Xq):
        _similarity_kernel[(triton.cdiv(Q, bm), triton.cdiv(M, bn))](
            Xq, Xr, iq, ir, S, Q, M, D, Xq.stride(0), Xr.stride(0), S.stride(0),
            HAS_NORM=has_norm, S_PREC=s_prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg.s_block_d,
            num_warps=cfg.num_warps, num_stages=cfg.stages,
        )  # fmt: skip
    return S


def grad_product(
    G: torch.Tensor,
    X: torch.Tensor,
    col_scale: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """diag(row_scale) G diag(col_scale) X, (Q, D) float32.

    G (Q, K) float32, any strides (``G.t()`` of a stored (K, Q) buffer is read in place);
    X (K, D) rows, float16 / bfloat16 / float32; ``col_scale`` (K,) and ``row_scale`` (Q,)
    optional float32 vectors. G is never rounded to one half or TF32 term: its scaled tiles
    are split into three bfloat16 terms against bfloat16 X, and multiplied at input precision
    tf32x3 against float16 (exact in float32) or float32 X."""
    tk.check_device(G)
    if G.dim() != 2 or X.dim() != 2 or G.shape[1] != X.shape[0]:
        raise ValueError(f"G, X: expected (Q, K) and (K, D), got {tuple(G.shape)} and {tuple(X.shape)}")
    if G.dtype != torch.float32:
        raise TypeError(f"G: expected float32, got {G.dtype}")
    if X.dtype not in _ROW_DTYPES:
        raise TypeError(f"X: expected float32, float16 or bfloat16 rows, got {X.dtype}")
    Q, K = G.shape
    D = X.shape[1]
    out = torch.empty((Q, D), dtype=torch.float32, device=G.device)
    if Q == 0 or D == 0:
        return out
    if K == 0:
        return out.zero_()
    X = _rows(X)
    cs = _vector(col_scale, K, "col_scale") if col_scale is not None else out
    rs = _vector(row_scale, Q, "row_scale") if row_scale is not None else out
    cfg = config()
    _, g_split, g_prec = tt._precisions(X.dtype)
    block_do = min(cfg.g_block_do, max(16, tk._next_pow2(D)))
    with tk._on_device(G):
        _grad_product_kernel[(triton.cdiv(D, block_do), triton.cdiv(Q, cfg.g_block_m))](
            G, X, rs, cs, out, Q, K, D, G.stride(0), G.stride(1), X.stride(0), out.stride(0),
            HAS_ROW=row_scale is not None, HAS_COL=col_scale is not None, G_SPLIT=g_split, G_PREC=g_prec,
            BLOCK_M=cfg.g_block_m, BLOCK_K=cfg.g_block_k, BLOCK_DO=block_do,
            num_warps=cfg.num_warps, num_stages=cfg.stages,
        )  # fmt: skip
    return out
