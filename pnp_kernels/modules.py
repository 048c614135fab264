"""The nn.Module wrappers: ``PNPLoss``, ``SmoothAPLoss`` and ``CrossBatchMemory``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import distributed as dist_mode
from .functional import check_options, compute_loss, pnp_spec, smooth_ap_spec
from .spec import LossSpec

__all__ = ["PNPLoss", "SmoothAPLoss", "CrossBatchMemory"]

Tensor = torch.Tensor


class _RankingLoss(nn.Module):
    """Shared forward of the two losses: the checked spec is built once, at construction."""

    spec: LossSpec

    def __init__(self, similarity: str, reduction: str, backend: str, distributed: bool, process_group):
        super().__init__()
        check_options(similarity, reduction, backend)
        self.similarity = similarity
        self.reduction = reduction
        self.backend = backend
        self.distributed = bool(distributed)
        self.process_group = process_group

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Optional[Tensor] = None,
        ref_labels: Optional[Tensor] = None,
        query_ref_index: Optional[Tensor] = None,
    ) -> Tensor:
        return compute_loss(
            embeddings,
            labels,
            ref_emb,
            ref_labels,
            query_ref_index,
            self.spec,
            self.backend,
            self.distributed,
            self.process_group,
        )[0]

    def _common_repr(self) -> str:
        return f"similarity={self.similarity!r}, reduction={self.reduction!r}, backend={self.backend!r}" + (
            ", distributed=True" if self.distributed else ""
        )


class PNPLoss(_RankingLoss):
    """PNP loss module; ``forward(embeddings, labels, ref_emb=None, ref_labels=None,
    query_ref_index=None)`` computes :func:`pnp_kernels.pnp_loss`.

    The options are checked here, at construction, and are those of ``pnp_loss``:
    ``variant`` ("O", "Ds", "Dq", "Iu", "Ib" or the "PNP-*" aliases), ``anneal``,
    ``alpha``, ``b``, ``similarity`` ("cosine" or "dot"), ``reduction`` ("mean" or
    "none"), ``backend`` ("auto", "triton", "torch", "ext"), ``distributed`` and
    ``process_group``.

    Example::

        loss = PNPLoss(variant="Dq", alpha=4)(embeddings, labels)
        loss.backward()
    """

    def __init__(
        self,
        variant="O",
        anneal=0.01,
        alpha=1.0,
        b=2.0,
        similarity="cosine",
        reduction="mean",
        backend="auto",
        distributed=False,
        process_group=None,
    ):
        super().__init__(similarity, reduction, backend, distributed, process_group)
        self.spec = pnp_spec(variant, anneal, alpha, b, similarity, reduction)
        self.variant = self.spec.variant.name
        self.anneal = self.spec.anneal
        self.alpha = self.spec.alpha
        self.b = self.spec.b

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, anneal={self.anneal}, alpha={self.alpha}, b={self.b}, " + self._common_repr()


class SmoothAPLoss(_RankingLoss):
    """Smooth-AP loss module; ``forward(embeddings, labels, ref_emb=None, ref_labels=None,
    query_ref_index=None)`` computes :func:`pnp_kernels.smooth_ap_loss`.

    Options: ``temperature`` (> 0, default 0.01, pytorch-metric-learning's name),
    ``similarity``, ``reduction``, ``backend``, ``distributed``, ``process_group``.
    """

    def __init__(
        self,
        temperature=0.01,
        similarity="cosine",
        reduction="mean",
        backend="auto",
        distributed=False,
        process_group=None,
    ):
        super().__init__(similarity, reduction, backend, distributed, process_group)
        self.spec = smooth_ap_spec(temperature, similarity, reduction)
        self.temperature = self.spec.anneal

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, " + self._common_repr()


class CrossBatchMemory(nn.Module):
    """A memory bank of past embeddings (XBM), shaped like pytorch-metric-learning's wrapper.

    ``forward(embeddings, labels)`` ranks the batch against cat(batch, memory): the
    batch is live (gradients flow), the filled part of the memory is detached, and
    ``query_ref_index = arange(B)``. Then it enqueues ``embeddings.detach()`` and
    ``labels`` into a ring buffer of ``memory_size`` rows, overwriting the oldest.
    With an empty memory the result equals the plain loss.

    When ``loss`` is distributed (``distributed=True`` and a process group of >= 2),
    the loss itself puts the gathered global batch first in the reference set, so
    only the memory is passed as ``ref_emb``; the gathered global batch is enqueued
    in rank order, so the memory is the same on every rank.

    The memory, its labels and the ring position are registered buffers: ``state_dict()``
    saves them and a resumed run continues identically. ``reset()`` empties it.

    Args:
        loss: a :class:`PNPLoss` or :class:`SmoothAPLoss` (any module with their forward).
        embedding_size: D, the embeddings' dimension.
        memory_size: rows kept (>= 1).
    """

    loss: nn.Module
    embedding_memory: Tensor
    label_memory: Tensor
    ring_state: Tensor

    def __init__(self, loss: nn.Module, embedding_size: int, memory_size: int):
        super().__init__()
        for name, v in (("embedding_size", embedding_size), ("memory_size", memory_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        self.loss = loss
        self.embedding_size = embedding_size
        self.memory_size = memory_size
        self.register_buffer("embedding_memory", torch.zeros(memory_size, embedding_size))
        self.register_buffer("label_memory", torch.zeros(memory_size, dtype=torch.int64))
        # [next write position, rows filled], saved with the memory; mirrored in Python ints
        # so that a step never reads a device value on the host
        self.register_buffer("ring_state", torch.zeros(2, dtype=torch.int64))
        self._next = 0
        self._filled = 0

    def reset(self) -> None:
        """Empty the memory."""
        self.embedding_memory.zero_()
        self.label_memory.zero_()
        self.ring_state.zero_()
        self._next = self._filled = 0

    @property
    def filled(self) -> int:
        """Rows of the memory that hold embeddings."""
        return self._filled

    def _memory(self):
        n = self.filled
        return self.embedding_memory[:n], self.label_memory[:n]

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ValueError("embeddings: expected a 2-D (batch, dim) tensor")
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings: dimension {embeddings.shape[1]} does not match embedding_size {self.embedding_size}"
            )
        if self.embedding_memory.device != embeddings.device or self.embedding_memory.dtype != embeddings.dtype:
            self.embedding_memory = self.embedding_memory.to(device=embeddings.device, dtype=embeddings.dtype)
            self.label_memory = self.label_memory.to(embeddings.device)
        if isinstance(labels, torch.Tensor) and labels.device != embeddings.device:
            labels = labels.to(embeddings.device)
        group = getattr(self.loss, "process_group", None)
        distributed = getattr(self.loss, "distributed", False) and dist_mode.world_size(group) > 1
        mem, mem_labels = self._memory()
        if distributed:
            if mem.shape[0]:
                out = self.loss(embeddings, labels, mem, mem_labels)
            else:
                out = self.loss(embeddings, labels)
            new_emb = dist_mode.gather_no_grad(embeddings, group)
            new_labels = dist_mode.gather_no_grad(labels.to(torch.int64), group)
        else:
            ref = torch.cat([embeddings, mem])
            ref_labels = torch.cat([labels.to(torch.int64), mem_labels])
            index = torch.arange(embeddings.shape[0], device=embeddings.device)
            out = self.loss(embeddings, labels, ref, ref_labels, index)
            new_emb, new_labels = embeddings.detach(), labels.to(torch.int64)
        self._enqueue(new_emb, new_labels)
        return out

    @torch.no_grad()
    def _enqueue(self, emb: Tensor, labels: Tensor) -> None:
        n, size = emb.shape[0], self.memory_size
        if n >= size:  # only the newest memory_size rows survive
            emb, labels = emb[n - size :], labels[n - size :]
            n = size
        start = self._next
        idx = (start + torch.arange(n, device=self.embedding_memory.device)) % size
        self.embedding_memory.index_copy_(0, idx, emb.to(self.embedding_memory.dtype))
        self.label_memory.index_copy_(0, idx, labels)
        self._next = (start + n) % size
        self._filled = min(self._filled + n, size)
        self.ring_state[0].fill_(self._next)  # a fill kernel, no copy from the host to wait for
        self.ring_state[1].fill_(self._filled)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # adopt the saved memory's dtype (a float64 run resumes in float64, not through float32)
        saved = state_dict.get(prefix + "embedding_memory")
        if isinstance(saved, torch.Tensor) and saved.dtype != self.embedding_memory.dtype:
            self.embedding_memory = self.embedding_memory.to(saved.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        saved_ring = state_dict.get(prefix + "ring_state")
        if isinstance(saved_ring, torch.Tensor) and saved_ring.numel() == 2:
            self._next, self._filled = (int(v) for v in saved_ring.tolist())

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, filled={self.filled}"
