"""The distributed mode: exact ranking against the global batch of every process.

With world size W, rank r and local batch x_r (B_r rows), each rank

1. gathers every rank's embeddings in rank order with :func:`gather_with_grad`
   (an autograd Function over ``torch.distributed.all_gather``; its backward sums
   the gathered gradient over ranks with ``all_reduce`` and keeps the local rows),
   padding to the largest local batch so that unequal sizes work;
2. ranks its local queries against ref = cat(gathered batch, ref_emb), with
   query_ref_index = offset_r + arange(B_r), by the reference-set kernels: per-rank
   memory B_r x (B_global + M) similarities, never B_global^2;
3. sums its per-query losses s_r over its valid queries, and all-reduces
   (s_r, n_r) so that every rank knows the global sum s and the global count
   n of valid queries. With L = s / n the single-process loss:

       graph_r = W * s_r / n          (differentiable)
       returned = graph_r + (L - graph_r).detach()      (value L on every rank)

   d graph_s / d x_r summed over s (the gather's backward) is W dL/dx_r, so after
   DDP averages the parameter gradients over the W ranks they equal the
   single-process gradient of L. The derivation is in docs/distributed.md.

A rank whose local queries are all invalid still returns a loss in the graph
(s_r = 0), so every rank calls the backward collective and none hangs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .autograd import apply_reference
from .spec import LossSpec

__all__ = ["world_size", "gather_with_grad", "gather_no_grad", "distributed_loss"]

Tensor = torch.Tensor


def world_size(process_group=None) -> int:
    """The group's size when torch.distributed is initialised, else 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _local_sizes(n: int, device: torch.device, group) -> List[int]:
    """Every rank's local batch size (one small all_gather; the host needs them to pad)."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in torch.cat(sizes).tolist()]


def _all_gather_padded(x: Tensor, sizes: List[int], group) -> Tensor:
    """cat over ranks of every rank's x (rows sizes[r]), through padded buffers."""
    n_max = max(sizes)
    padded = x.new_zeros((n_max,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):  # type: ignore[override]
        ctx.sizes, ctx.group = sizes, group
        return _all_gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # Rank s's loss reaches x_r through the gather of every rank: the gradient of x_r is
        # the sum over ranks of the gathered gradient's rows of r.
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        offset = sum(ctx.sizes[:rank])
        return total[offset : offset + ctx.sizes[rank]], None, None


def gather_with_grad(x: Tensor, group=None, sizes: Optional[List[int]] = None) -> Tensor:
    """All ranks' ``x`` concatenated in rank order, differentiable: the backward sums the
    gradient over ranks (so each rank's ``x`` gets the gradient of every rank's loss)."""
    sizes = sizes if sizes is not None else _local_sizes(x.shape[0], x.device, group)
    return _GatherWithGrad.apply(x, sizes, group)


def gather_no_grad(x: Tensor, group=None, sizes: Optional[List[int]] = None) -> Tensor:
    """All ranks' ``x`` concatenated in rank order, outside autograd."""
    sizes = sizes if sizes is not None else _local_sizes(x.shape[0], x.device, group)
    with torch.no_grad():
        return _all_gather_padded(x.detach(), sizes, group)


def distributed_loss(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Optional[Tensor],
    ref_labels: Optional[Tensor],
    spec: LossSpec,
    backend: str,
    group=None,
) -> Tuple[Tensor, Tensor]:
    """(output, global n_valid) of the local queries ranked against the global batch (+ ref_emb).

    "mean": the global loss on every rank, with the gradient rule above. "none": the
    (B_r,) vector of the local queries' losses; the gather's backward sums what every
    rank backpropagates into each rank's embeddings.
    """
    W = dist.get_world_size(group)
    rank = dist.get_rank(group)
    sizes = _local_sizes(embeddings.shape[0], embeddings.device, group)
    grad = torch.is_grad_enabled()
    need_q = grad and embeddings.requires_grad
    gathered = gather_with_grad(embeddings, group, sizes) if need_q else gather_no_grad(embeddings, group, sizes)
    gathered_labels = gather_no_grad(labels, group, sizes)
    ref, ref_y = gathered, gathered_labels
    if ref_emb is not None and ref_labels is not None:
        ref = torch.cat([gathered, ref_emb.to(gathered.dtype)])
        ref_y = torch.cat([gathered_labels, ref_labels])
    offset = sum(sizes[:rank])
    query_ref_index = torch.arange(offset, offset + embeddings.shape[0], device=embeddings.device)
    rows, n_local = apply_reference(
        embeddings,
        labels,
        ref,
        ref_y,
        query_ref_index,
        replace(spec, mean=False),
        backend,
        need_q,
        grad and ref.requires_grad,
    )
    local_sum = rows.sum()
    stats = torch.stack([local_sum.detach(), n_local.detach().to(local_sum.dtype)])
    dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
    n_valid = stats[1]
    if not spec.mean:
        return rows, n_valid
    graph = local_sum * (W / n_valid.clamp(min=1))
    value = stats[0] / n_valid.clamp(min=1)
    return graph + (value - graph).detach(), n_valid
