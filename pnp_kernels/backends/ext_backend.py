"""ext backend: the optional C++/CUDA extension (``csrc/``, built by ``ext_build``).

Square mode is one C++ op each way (``loss_forward``/``loss_backward``: sort,
segments, normalise, GEMM, row kernel, reduction; symmetrise, GEMM, un-normalise),
so an eager step is two calls from Python, on CPU and CUDA tensors alike. Reference
mode runs the C++ row kernel inside the default PyTorch stages of
:class:`~.base.Backend`. Deterministic; no host-device synchronisation.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..spec import LossSpec, SquarePrep
from . import ext_build
from .base import Backend, ForwardResult

__all__ = ["ExtBackend"]


class ExtBackend(Backend):
    """C++ (CPU) and CUDA kernels, float32 and float64; built on first use."""

    name = "ext"
    devices = ("cpu", "cuda")
    compute_dtypes = (torch.float32, torch.float64)
    sync_free = True
    auto_devices = ()  # never picked by "auto": its first use runs a compiler

    def why_unavailable(self) -> str:
        return ext_build.why_unavailable()

    def check_tensor(self, t: torch.Tensor, arg: str) -> None:
        super().check_tensor(t, arg)
        ext_build.ops()  # raises RuntimeError naming backend='ext' and why, when unavailable
        if t.device.type == "cuda" and ext_build.cuda_status():
            raise RuntimeError(
                f"backend='ext' has no CUDA kernels in this process ({ext_build.cuda_status()}); "
                "use backend='triton' or 'torch' for CUDA tensors"
            )

    def row_losses_and_dS(
        self,
        S: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        own: torch.Tensor,
        spec: LossSpec,
        compute_grad: bool,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if S.shape[1] > 0 and S.stride(1) != 1:
            S = S.contiguous()
        loss, G = ext_build.ops().row_losses_and_dS(
            S,
            lo.contiguous(),
            hi.contiguous(),
            own.to(device=S.device, dtype=torch.int32).contiguous(),
            spec.kind,
            spec.variant.code,
            spec.anneal,
            spec.alpha,
            spec.b,
            list(spec.ks),
            list(spec.k_temperatures),
            compute_grad,
        )
        return loss, (G if compute_grad else None)

    def symmetrize(self, G: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if G.shape[1] > 0 and G.stride(1) != 1:
            G = G.contiguous()
        return ext_build.ops().symmetrize(G, g.to(device=G.device, dtype=G.dtype).contiguous())

    # ---- the memory-efficient stage: csrc/pnp_tiled.cpp (strips of rows, the dense row kernel) ----

    @staticmethod
    def _tiled_args(Xq, Xr, lo, hi, own, spec: LossSpec) -> tuple:
        idx = lambda t: t.to(device=Xq.device, dtype=torch.int32).contiguous()  # noqa: E731
        return (
            Xq.contiguous(),
            Xr.contiguous(),
            idx(lo),
            idx(hi),
            idx(own),
            spec.kind,
            spec.variant.code,
            spec.anneal,
            spec.alpha,
            spec.b,
            list(spec.ks),
            list(spec.k_temperatures),
        )

    def tiled_rows(
        self,
        Xq: torch.Tensor,
        Xr: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        own: torch.Tensor,
        spec: LossSpec,
        compute_grad: bool,
        r_rows: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Row losses in strips of rows, no Q x M buffer. The state: with ``reduction="mean"``
        (equal row weights) the gradient with unit weights, [G Xr; G^T Xq] ((Q + M, D); with
        ``r_rows``, the reference rows that need a gradient, only those rows of G^T Xq:
        (Q + r, D)), finished in this one pass; otherwise a (0,) tensor, and
        :meth:`tiled_grads` recomputes the strips with the row weights."""
        finish = compute_grad and spec.mean
        args = self._tiled_args(Xq, Xr, lo, hi, own, spec)
        loss, grad = ext_build.ops().tiled_rows(*args[:5], r_rows if finish else None, *args[5:], finish, 0)
        if not compute_grad:
            return loss, None
        return loss, (grad if finish else loss.new_empty(0))

    def tiled_grads(
        self,
        Xq: torch.Tensor,
        Xr: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        own: torch.Tensor,
        state: torch.Tensor,
        g: torch.Tensor,
        spec: LossSpec,
        need_q: bool,
        need_r: bool,
        r_rows: Optional[torch.Tensor] = None,
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(dXq, dXr) from the state of :meth:`tiled_rows`: scaled from the finished unit-weight
        gradient when the row weights are provably equal (an expanded scalar, as
        ``Backend.row_weights`` makes for "mean"; checked from the strides, without reading
        a device value), else recomputed strip by strip with the weights g. ``r_rows`` must be
        what the forward had."""
        finished = self.finished_grads(state, g, Xq.shape[0], Xr.shape[0], need_q, need_r, r_rows)
        if finished is not None:
            return finished
        g = g.to(Xq.dtype)
        args = self._tiled_args(Xq, Xr, lo, hi, own, spec)
        dXq, dXr = ext_build.ops().tiled_grads(
            *args[:5], g.to(Xq.device).contiguous(), r_rows, *args[5:], need_q, need_r, 0
        )
        return (dXq if need_q else None), (dXr if need_r else None)

    def loss_forward(self, E: torch.Tensor, labels: torch.Tensor, spec: LossSpec, compute_grad: bool) -> ForwardResult:
        if spec.memory_efficient:
            return super().loss_forward(E, labels, spec, compute_grad)
        out, n_valid, Xs, perm, lo, hi, denom, G = ext_build.ops().loss_forward(
            E,
            labels,
            spec.kind,
            spec.variant.code,
            spec.anneal,
            spec.alpha,
            spec.b,
            list(spec.ks),
            list(spec.k_temperatures),
            spec.cosine,
            spec.mean,
            compute_grad,
        )
        return out, n_valid, SquarePrep(Xs, perm, lo, hi, denom), (G if compute_grad else None)

    def loss_backward(self, grad_out, prep: SquarePrep, n_valid, G, spec: LossSpec, out_dtype) -> torch.Tensor:
        if spec.memory_efficient:
            return super().loss_backward(grad_out, prep, n_valid, G, spec, out_dtype)
        return ext_build.ops().loss_backward(grad_out, n_valid, *prep, G, spec.cosine, spec.mean, out_dtype)
