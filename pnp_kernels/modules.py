"""The nn.Module wrappers: ``PNPLoss``, ``SmoothAPLoss``, ``RecallAtKLoss`` and ``CrossBatchMemory``.

They take pytorch-metric-learning's constructor arguments in its positional order (our
options follow, keyword-only) and its ``forward(embeddings, labels, indices_tuple,
ref_emb, ref_labels)``; every module pickles, deep-copies and round-trips through
``torch.save``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import distributed as dist_mode
from .functional import DEFAULT_KS, check_options, compute_loss, pnp_spec, recall_at_k_spec, smooth_ap_spec
from .spec import LossSpec

__all__ = ["PNPLoss", "SmoothAPLoss", "RecallAtKLoss", "CrossBatchMemory"]

Tensor = torch.Tensor

_NO_MINERS = (
    "rank losses use every pair: each query is ranked against every positive and negative of the reference "
    "set, so a miner's output is not used"
)


def _check_pml_arguments(labels: Optional[Tensor], indices_tuple) -> Tensor:
    """``labels``, after refusing by name the two pytorch-metric-learning arguments a rank loss
    cannot honour: missing labels and a miner's ``indices_tuple``."""
    if labels is None:
        raise ValueError("labels: required (a rank loss needs each embedding's class id)")
    if indices_tuple is not None:
        raise ValueError(f"indices_tuple: not accepted; {_NO_MINERS}")
    return labels


class _RankingLoss(nn.Module):
    """Shared forward of the losses: the checked spec is built once, at construction."""

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
        labels: Optional[Tensor] = None,
        indices_tuple=None,
        ref_emb: Optional[Tensor] = None,
        ref_labels: Optional[Tensor] = None,
        *,
        query_ref_index: Optional[Tensor] = None,
        live_ref_rows: Optional[int] = None,
    ) -> Tensor:
        """The loss of ``embeddings`` ranked against the batch itself, or against ``ref_emb``.

        pytorch-metric-learning's signature: ``labels`` is required and ``indices_tuple``
        (a miner's output) must be None. Passing the batch itself as the reference set
        (``ref_emb is embeddings and ref_labels is labels``, the same tensor objects, as
        pytorch-metric-learning's tests do) is the plain batch loss. ``query_ref_index``:
        see :func:`pnp_kernels.pnp_loss`. ``live_ref_rows``: only the first that many rows of
        ``ref_emb`` need a gradient (the rest are detached, as a memory bank behind the live
        batch), so the reference gradient is computed for those rows only.
        """
        labels = _check_pml_arguments(labels, indices_tuple)
        if ref_emb is not None and ref_emb is embeddings and ref_labels is labels and query_ref_index is None:
            ref_emb = ref_labels = None
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
            live_ref_rows,
        )[0]

    def _common_repr(self) -> str:
        return (
            f"similarity={self.similarity!r}, reduction={self.reduction!r}, backend={self.backend!r}"
            + (", distributed=True" if self.distributed else "")
            + (f", memory_efficient={self.spec.memory_efficient}" if self.spec.memory_efficient is not None else "")
        )


class PNPLoss(_RankingLoss):
    """PNP loss module (Li et al., AAAI 2022): :func:`pnp_kernels.pnp_loss` with its options
    fixed at construction, where they are checked.

    ``PNPLoss(b=2, alpha=1, anneal=0.01, variant="O")`` is pytorch-metric-learning's
    order, so ``PNPLoss(2, 4, 0.01, "Dq")`` means b=2, alpha=4, anneal=0.01, variant="Dq".
    ``variant`` is one of :attr:`VARIANTS` or the authors' "PNP-O", "PNP-D_s", "PNP-D_q",
    "PNP-I_u", "PNP-I_b". Keyword-only: ``similarity`` ("cosine" or "dot"), ``reduction``
    ("mean" or "none"), ``backend`` ("auto", "triton", "torch", "ext"), ``distributed``,
    ``process_group`` and ``memory_efficient`` (None, True or False), as in ``pnp_loss``.

    ``forward(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    query_ref_index=None)``.

    Example::

        loss = PNPLoss(variant="Dq", alpha=4)(embeddings, labels)
        loss.backward()
    """

    VARIANTS = ["Ds", "Dq", "Iu", "Ib", "O"]

    def __init__(
        self,
        b=2,
        alpha=1,
        anneal=0.01,
        variant="O",
        *,
        similarity="cosine",
        reduction="mean",
        backend="auto",
        distributed=False,
        process_group=None,
        memory_efficient=None,
    ):
        super().__init__(similarity, reduction, backend, distributed, process_group)
        self.spec = pnp_spec(variant, anneal, alpha, b, similarity, reduction, memory_efficient)
        self.variant = self.spec.variant.name
        self.anneal = self.spec.anneal
        self.alpha = self.spec.alpha
        self.b = self.spec.b
        self.memory_efficient = self.spec.memory_efficient

    def extra_repr(self) -> str:
        return f"b={self.b}, alpha={self.alpha}, anneal={self.anneal}, variant={self.variant!r}, " + self._common_repr()


class SmoothAPLoss(_RankingLoss):
    """Smooth-AP loss module (Brown et al., ECCV 2020): :func:`pnp_kernels.smooth_ap_loss`,
    exact for any labels.

    ``SmoothAPLoss(temperature=0.01)`` as pytorch-metric-learning; keyword-only:
    ``similarity``, ``reduction``, ``backend``, ``distributed``, ``process_group``,
    ``memory_efficient``. ``forward`` as :class:`PNPLoss`.
    """

    def __init__(
        self,
        temperature=0.01,
        *,
        similarity="cosine",
        reduction="mean",
        backend="auto",
        distributed=False,
        process_group=None,
        memory_efficient=None,
    ):
        super().__init__(similarity, reduction, backend, distributed, process_group)
        self.spec = smooth_ap_spec(temperature, similarity, reduction, memory_efficient)
        self.temperature = self.spec.anneal
        self.memory_efficient = self.spec.memory_efficient

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, " + self._common_repr()


class RecallAtKLoss(_RankingLoss):
    """Recall@k surrogate loss module (Patel et al., CVPR 2022): :func:`pnp_kernels.recall_at_k_loss`.

    ``RecallAtKLoss(k=(1, 2, 4, 8, 16), temperature=0.01, k_temperature=None)``: the k
    values, the rank sigmoid's temperature tau1 and the k sigmoids' tau2_k (None: tau2_k = k;
    one number; or one per k). Keyword-only: ``similarity``, ``reduction``, ``backend``,
    ``distributed``, ``process_group``, ``memory_efficient``. ``forward`` as :class:`PNPLoss`.
    """

    def __init__(
        self,
        k=DEFAULT_KS,
        temperature=0.01,
        k_temperature=None,
        *,
        similarity="cosine",
        reduction="mean",
        backend="auto",
        distributed=False,
        process_group=None,
        memory_efficient=None,
    ):
        super().__init__(similarity, reduction, backend, distributed, process_group)
        self.spec = recall_at_k_spec(k, temperature, k_temperature, similarity, reduction, memory_efficient)
        self.k = tuple(int(v) for v in self.spec.ks)
        self.temperature = self.spec.anneal
        self.k_temperature = self.spec.k_temperatures
        self.memory_efficient = self.spec.memory_efficient

    def extra_repr(self) -> str:
        return f"k={self.k}, temperature={self.temperature}, k_temperature={self.k_temperature}, " + self._common_repr()


class CrossBatchMemory(nn.Module):
    """A memory bank of past embeddings (XBM), with pytorch-metric-learning's signature and state.

    ``CrossBatchMemory(loss, embedding_size, memory_size=1024, miner=None)``: ``loss`` is a
    :class:`PNPLoss`, :class:`SmoothAPLoss` or :class:`RecallAtKLoss` (any module with
    their ``forward``, which is called by keyword); a ``miner`` is refused (rank losses use
    every pair).

    ``forward(embeddings, labels)`` ranks the batch against cat(batch, memory): the batch
    is live (gradients flow), the filled part of the memory is detached, and
    ``query_ref_index = arange(B)``. Then it enqueues ``embeddings.detach()`` and
    ``labels`` into a ring buffer of ``memory_size`` rows, overwriting the oldest. With an
    empty memory the result equals the plain loss. (pytorch-metric-learning enqueues first
    and ranks against the memory with the batch inside it, detached.)

    ``forward(embeddings, labels, enqueue_mask=mask)`` (MoCo): the rows where the bool
    ``mask`` is True are enqueued (detached) and are not queries; the other rows are the
    queries, ranked against the whole filled memory after that enqueue. With
    ``reduction="none"`` the output has one entry per query row. Not available with a
    distributed loss.

    When ``loss`` is distributed (``distributed=True`` and a process group of >= 2), the
    loss itself puts the gathered global batch first in the reference set, so only the
    memory is passed as ``ref_emb``; the gathered global batch is enqueued in rank order,
    so the memory is the same on every rank.

    State, as pytorch-metric-learning's: ``embedding_memory`` (memory_size x D),
    ``label_memory`` (memory_size), ``queue_idx`` (the next row written), ``has_been_filled``
    and ``reset_queue()``; also ``filled`` (rows that hold embeddings). The memory, its
    labels and the ring position are registered buffers: ``state_dict()`` saves them and a
    resumed run continues identically.

    Args:
        loss: the wrapped loss module.
        embedding_size: D, the embeddings' dimension.
        memory_size: rows kept (>= 1, default 1024).
        miner: must be None.
    """

    loss: nn.Module
    embedding_memory: Tensor
    label_memory: Tensor
    ring_state: Tensor

    def __init__(self, loss: nn.Module, embedding_size: int, memory_size: int = 1024, miner=None):
        super().__init__()
        if miner is not None:
            raise ValueError(f"miner: not accepted; {_NO_MINERS}")
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

    def reset_queue(self) -> None:
        """Empty the memory (pytorch-metric-learning's name)."""
        self.embedding_memory.zero_()
        self.label_memory.zero_()
        self.ring_state.zero_()
        self._next = self._filled = 0

    def reset(self) -> None:
        """Empty the memory (same as :meth:`reset_queue`)."""
        self.reset_queue()

    @property
    def queue_idx(self) -> int:
        """The memory row the next enqueued embedding is written to."""
        return self._next

    @property
    def has_been_filled(self) -> bool:
        """Whether every row of the memory holds an embedding."""
        return self._filled >= self.memory_size

    @property
    def filled(self) -> int:
        """Rows of the memory that hold embeddings."""
        return self._filled

    def _memory(self):
        n = self._filled
        return self.embedding_memory[:n], self.label_memory[:n]

    def forward(
        self,
        embeddings: Tensor,
        labels: Optional[Tensor] = None,
        indices_tuple=None,
        enqueue_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """The wrapped loss of the batch (or of its non-enqueued rows) against the memory; see the class."""
        labels = _check_pml_arguments(labels, indices_tuple)
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
        if enqueue_mask is not None:
            if distributed:
                raise ValueError("enqueue_mask: not supported with a distributed loss (distributed=True)")
            return self._forward_masked(embeddings, labels, enqueue_mask)
        mem, mem_labels = self._memory()
        if distributed:
            if mem.shape[0]:
                out = self.loss(embeddings, labels, ref_emb=mem, ref_labels=mem_labels)
            else:
                out = self.loss(embeddings, labels)
            new_emb = dist_mode.gather_no_grad(embeddings, group)
            new_labels = dist_mode.gather_no_grad(labels.to(torch.int64), group)
        else:
            ref = torch.cat([embeddings, mem])
            ref_labels = torch.cat([labels.to(torch.int64), mem_labels])
            index = torch.arange(embeddings.shape[0], device=embeddings.device)
            kw = {}
            if isinstance(self.loss, _RankingLoss):  # the memory is detached: no gradient computed for it
                kw["live_ref_rows"] = embeddings.shape[0]
            out = self.loss(embeddings, labels, ref_emb=ref, ref_labels=ref_labels, query_ref_index=index, **kw)
            new_emb, new_labels = embeddings.detach(), labels.to(torch.int64)
        self._enqueue(new_emb, new_labels)
        return out

    def _forward_masked(self, embeddings: Tensor, labels: Tensor, enqueue_mask) -> Tensor:
        B = embeddings.shape[0]
        if not isinstance(enqueue_mask, torch.Tensor) or enqueue_mask.dtype != torch.bool:
            raise TypeError(
                f"enqueue_mask: expected a bool tensor, got {getattr(enqueue_mask, 'dtype', enqueue_mask)!r}"
            )
        if enqueue_mask.shape != (B,):
            raise ValueError(f"enqueue_mask: expected shape ({B},), one entry per row, got {tuple(enqueue_mask.shape)}")
        if not isinstance(labels, torch.Tensor) or labels.shape != (B,):
            raise ValueError(f"labels: expected a ({B},) tensor of class ids")
        mask = enqueue_mask.to(embeddings.device)
        self._enqueue(embeddings[mask].detach(), labels[mask].to(torch.int64))
        queries, query_labels = embeddings[~mask], labels[~mask]
        mem, mem_labels = self._memory()
        if queries.shape[0] == 0 or mem.shape[0] == 0:
            # no query, or nothing to rank against: every query is dropped (0, in the graph)
            dtype = LossSpec.compute_dtype_of(embeddings.dtype)
            if getattr(self.loss, "reduction", "mean") == "none":
                return queries.narrow(1, 0, 0).sum(dim=1).to(dtype)
            return queries.narrow(0, 0, 0).sum().to(dtype)
        # a copy: the next enqueue overwrites the memory in place, possibly before this step's backward
        return self.loss(queries, query_labels, ref_emb=mem.clone(), ref_labels=mem_labels.clone())

    @torch.no_grad()
    def _enqueue(self, emb: Tensor, labels: Tensor) -> None:
        # rows go to (queue_idx + i) % memory_size in order; with more rows than the memory
        # holds, later rows overwrite earlier ones, so only the newest memory_size survive
        n, size = emb.shape[0], self.memory_size
        start = self._next
        if n > size:
            emb, labels = emb[n - size :], labels[n - size :]
        first = start + max(n - size, 0)
        idx = (first + torch.arange(emb.shape[0], device=self.embedding_memory.device)) % size
        self.embedding_memory.index_copy_(0, idx, emb.to(self.embedding_memory.dtype))
        self.label_memory.index_copy_(0, idx, labels.to(self.label_memory.device))
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
