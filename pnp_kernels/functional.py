"""``pnp_loss``, ``smooth_ap_loss`` and ``recall_at_k_loss``: input validation, the spec,
and dispatch to the square, reference-set or distributed path.

Validation only looks at shapes, dtypes, devices and Python scalars (and, for CPU
tensors only, the values of ``query_ref_index``), so it never synchronises with a
GPU, and every error is raised before any kernel runs, naming the argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from .autograd import apply_reference, apply_square
from .backends import BACKEND_NAMES, resolve_backend
from .backends.base import Backend
from .spec import REDUCTIONS, SIMILARITIES, LossSpec
from .variants import LOSS_PNP, LOSS_RECALL_AT_K, LOSS_SMOOTH_AP, VARIANTS, resolve_variant

__all__ = ["pnp_loss", "smooth_ap_loss", "recall_at_k_loss", "SIMILARITIES", "REDUCTIONS"]

Tensor = torch.Tensor
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_positive(name: str, value) -> float:
    """``value`` as a float, or a TypeError/ValueError naming ``name`` unless it is finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name}: expected a positive real number, got {type(value).__name__}")
    # Comparisons only (no math.isfinite), so symbolic floats under torch.compile(dynamic=True) pass.
    if not (value > 0) or value == math.inf:  # type: ignore[operator]  # `not (x > 0)` also rejects NaN
        raise ValueError(f"{name}: must be a finite number > 0, got {value}")
    return float(value)


def check_options(similarity, reduction, backend) -> None:
    """Raise ValueError naming the option when similarity/reduction/backend is unknown."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity: unknown value {similarity!r}; valid values are {', '.join(SIMILARITIES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: unknown value {reduction!r}; valid values are {', '.join(REDUCTIONS)}")
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"backend: unknown value {backend!r}; valid values are auto, {', '.join(BACKEND_NAMES)}")


def check_memory_efficient(value) -> Optional[bool]:
    """``memory_efficient`` as given, or a TypeError naming it unless it is True, False or None."""
    if value is None or value is True or value is False:
        return value
    raise TypeError(f"memory_efficient: expected True, False or None (auto), got {value!r}")


def pnp_spec(
    variant="O", anneal=0.01, alpha=1.0, b=2.0, similarity="cosine", reduction="mean", memory_efficient=None
) -> LossSpec:
    """The checked spec of a PNP call."""
    v = resolve_variant(variant)
    return LossSpec(
        LOSS_PNP,
        v,
        check_positive("anneal", anneal),
        check_positive("alpha", alpha),
        check_positive("b", b),
        similarity == "cosine",
        reduction == "mean",
        memory_efficient=check_memory_efficient(memory_efficient),
    )


def smooth_ap_spec(temperature=0.01, similarity="cosine", reduction="mean", memory_efficient=None) -> LossSpec:
    """The checked spec of a Smooth-AP call."""
    return LossSpec(
        LOSS_SMOOTH_AP,
        VARIANTS["O"],
        check_positive("temperature", temperature),
        1.0,
        2.0,
        similarity == "cosine",
        reduction == "mean",
        memory_efficient=check_memory_efficient(memory_efficient),
    )


DEFAULT_KS = (1, 2, 4, 8, 16)


def _check_ks(k) -> Tuple[int, ...]:
    """k as a tuple of distinct positive ints (ValueError naming ``k`` otherwise)."""
    values = (k,) if isinstance(k, (numbers.Integral, torch.SymInt)) and not isinstance(k, bool) else k
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"k: expected a positive int or a sequence of them, got {k!r}") from None
    if not values:
        raise ValueError("k: expected at least one value, got an empty sequence")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"k: every value must be a positive int, got {v!r} in {k!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"k: values must be distinct, got {k!r}")
    return tuple(int(v) for v in values)


def recall_at_k_spec(
    k=DEFAULT_KS, temperature=0.01, k_temperature=None, similarity="cosine", reduction="mean", memory_efficient=None
) -> LossSpec:
    """The checked spec of a Recall@k surrogate call (tau2_k = k when ``k_temperature`` is None)."""
    ks = _check_ks(k)
    tau1 = check_positive("temperature", temperature)
    if k_temperature is None:
        temps = tuple(float(v) for v in ks)
    elif isinstance(k_temperature, (numbers.Real, torch.SymFloat)) and not isinstance(k_temperature, bool):
        try:
            temps = (check_positive("k_temperature", k_temperature),) * len(ks)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
    else:
        try:
            seq = tuple(k_temperature)
        except TypeError:
            raise ValueError(
                f"k_temperature: expected None, a number > 0 or one per k, got {k_temperature!r}"
            ) from None
        if len(seq) != len(ks):
            raise ValueError(f"k_temperature: expected one value per k ({len(ks)}), got {len(seq)}")
        try:
            temps = tuple(check_positive("k_temperature", t) for t in seq)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
    return LossSpec(
        LOSS_RECALL_AT_K,
        VARIANTS["O"],
        tau1,
        1.0,
        2.0,
        similarity == "cosine",
        reduction == "mean",
        ks=tuple(float(v) for v in ks),
        k_temperatures=temps,
        memory_efficient=check_memory_efficient(memory_efficient),
    )


def _check_embeddings(t, name: str, allow_empty: bool = False) -> None:
    """A 2-D floating point tensor of width > 0 (and, unless ``allow_empty``, at least one row)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (batch, dim) tensor, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating point dtype (float16, bfloat16, float32, float64), got {t.dtype}")
    if t.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name}: empty batch (batch size 0)")
    if t.shape[1] == 0:
        raise ValueError(f"{name}: embedding dimension is 0")


def _check_labels(t, name: str, n: int, of: str, device: torch.device) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor of class ids, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name}: expected an integer dtype (int8..int64, uint8), got {t.dtype}")
    if t.shape[0] != n:
        raise ValueError(f"{name}: length {t.shape[0]} does not match the batch size of {of} ({n})")
    if t.device != device:
        t = t.to(device)
    return t if t.dtype == torch.int64 else t.to(torch.int64)


def _check_reference(embeddings: Tensor, ref_emb, ref_labels, query_ref_index) -> Tuple[Tensor, Optional[Tensor]]:
    """Validated (ref_labels, query_ref_index) on the embeddings' device, int64."""
    _check_embeddings(ref_emb, "ref_emb")
    if ref_emb.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"ref_emb: embedding dimension {ref_emb.shape[1]} does not match embeddings' ({embeddings.shape[1]})"
        )
    if ref_emb.device != embeddings.device:
        raise ValueError(f"ref_emb: on {ref_emb.device}, but embeddings are on {embeddings.device}")
    if LossSpec.compute_dtype_of(ref_emb.dtype) != LossSpec.compute_dtype_of(embeddings.dtype):
        raise TypeError(
            f"ref_emb: dtype {ref_emb.dtype} and embeddings' {embeddings.dtype} compute in different precisions; "
            "make both float64 or neither"
        )
    if ref_labels is None:
        raise ValueError("ref_labels: required when ref_emb is given")
    M = ref_emb.shape[0]
    ref_labels = _check_labels(ref_labels, "ref_labels", M, "ref_emb", embeddings.device)
    if query_ref_index is None:
        return ref_labels, None
    if not isinstance(query_ref_index, torch.Tensor):
        raise TypeError(f"query_ref_index: expected a torch.Tensor, got {type(query_ref_index).__name__}")
    if query_ref_index.dtype == torch.bool or query_ref_index.is_floating_point() or query_ref_index.is_complex():
        raise TypeError(f"query_ref_index: expected an integer dtype, got {query_ref_index.dtype}")
    if query_ref_index.shape != (embeddings.shape[0],):
        raise ValueError(
            f"query_ref_index: expected shape ({embeddings.shape[0]},), one entry per query, "
            f"got {tuple(query_ref_index.shape)}"
        )
    if query_ref_index.device != embeddings.device:
        query_ref_index = query_ref_index.to(embeddings.device)
    query_ref_index = query_ref_index.to(torch.int64)
    if query_ref_index.device.type == "cpu":  # free here; on a GPU the check would synchronise
        bad = (query_ref_index < -1) | (query_ref_index >= M)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"query_ref_index: entry {i} is {int(query_ref_index[i])}, outside -1 .. {M - 1} "
                f"(the reference set has {M} rows)"
            )
    return ref_labels, query_ref_index


def _validate(
    embeddings,
    labels,
    ref_emb,
    ref_labels,
    query_ref_index,
    spec: Union[LossSpec, Callable[[], LossSpec]],
    backend: str,
    distributed: bool,
    allow_empty: bool,
) -> Tuple[LossSpec, Backend, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Every check of one call, in the order the single-process call raises them: the checked
    (spec, backend implementation, labels, ref_labels, query_ref_index)."""
    if not isinstance(spec, LossSpec):
        spec = spec()
    _check_embeddings(embeddings, "embeddings", allow_empty)
    labels = _check_labels(labels, "labels", embeddings.shape[0], "embeddings", embeddings.device)
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError("ref_labels: given without ref_emb")
        if query_ref_index is not None:
            raise ValueError("query_ref_index: given without ref_emb")
    else:
        ref_labels, query_ref_index = _check_reference(embeddings, ref_emb, ref_labels, query_ref_index)
    impl = resolve_backend(backend, embeddings.device, embeddings.dtype)
    impl.check_tensor(embeddings, "embeddings")
    if ref_emb is not None:
        impl.check_tensor(ref_emb, "ref_emb")
    if distributed and query_ref_index is not None:
        raise ValueError(
            "query_ref_index: not accepted with distributed=True (the gathered global batch heads the "
            "reference set and each query's own copy is found there); pass only ref_emb/ref_labels"
        )
    return spec, impl, labels, ref_labels, query_ref_index


def compute_loss(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Optional[Tensor],
    ref_labels: Optional[Tensor],
    query_ref_index: Optional[Tensor],
    spec: Union[LossSpec, Callable[[], LossSpec]],
    backend: str,
    distributed: bool = False,
    process_group=None,
    live_ref_rows: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Validate, then (output, n_valid) of the square, reference-set or distributed loss.

    ``live_ref_rows``: only the first that many rows of ``ref_emb`` need a gradient (the rest
    are detached, as a memory bank behind the live batch): the backward computes the
    reference gradient for those rows only. None: every row, as autograd asks.

    ``spec``: the checked options, or a function that checks and returns them (so that in
    distributed mode a bad option is one more local error). Distributed mode
    (``distributed`` and a process group of >= 2) checks without raising, then
    :func:`pnp_kernels.distributed.agree` compares every rank's inputs and raises the same
    exception on every rank, naming the rank, when one failed or they disagree; there a
    local batch may be empty. Otherwise each check raises where it fails.
    """
    dist_mode = None
    if distributed:
        from . import distributed as _dist

        if _dist.world_size(process_group) > 1:
            dist_mode = _dist
    if dist_mode is not None:
        error: Optional[Exception] = None
        try:
            checked = _validate(
                embeddings, labels, ref_emb, ref_labels, query_ref_index, spec, backend, True, allow_empty=True
            )
        except Exception as exc:  # raised by agree() on every rank, so that no rank is left waiting
            error = exc
        needs_grad = torch.is_grad_enabled() and isinstance(embeddings, Tensor) and embeddings.requires_grad
        sizes = dist_mode.agree(
            embeddings, ref_emb, None if error is not None else checked[0], needs_grad, error, process_group
        )
        spec, impl, labels, ref_labels, _ = checked
        return dist_mode.distributed_loss(
            embeddings, labels, ref_emb, ref_labels, spec, impl.name, process_group, sizes
        )
    spec, impl, labels, ref_labels, query_ref_index = _validate(
        embeddings, labels, ref_emb, ref_labels, query_ref_index, spec, backend, distributed, allow_empty=False
    )
    grad = torch.is_grad_enabled()
    if ref_emb is None or ref_labels is None:
        return apply_square(embeddings, labels, spec, impl.name, grad and embeddings.requires_grad)
    r_live = -1
    if live_ref_rows is not None:
        if isinstance(live_ref_rows, bool) or not isinstance(live_ref_rows, int) or not 0 <= live_ref_rows:
            raise ValueError(f"live_ref_rows: expected an int >= 0, got {live_ref_rows!r}")
        r_live = min(live_ref_rows, ref_emb.shape[0])
    return apply_reference(
        embeddings,
        labels,
        ref_emb,
        ref_labels,
        query_ref_index,
        spec,
        impl.name,
        grad and embeddings.requires_grad,
        grad and ref_emb.requires_grad and r_live != 0,
        r_live,
    )


def pnp_loss(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    query_ref_index: Optional[Tensor] = None,
    variant: str = "O",
    anneal: float = 0.01,
    alpha: float = 1.0,
    b: float = 2.0,
    similarity: str = "cosine",
    reduction: str = "mean",
    backend: str = "auto",
    distributed: bool = False,
    process_group=None,
    memory_efficient: Optional[bool] = None,
) -> Tensor:
    """PNP loss (Li et al., AAAI 2022), exact and in O(B^2) memory (O(Q M) against a reference set).

    Args:
        embeddings: (B, D) float16/bfloat16/float32/float64 queries, any device.
        labels: (B,) integer class ids (any integer dtype, any values, any order).
            Moved to the embeddings' device if needed.
        ref_emb: optional (M, D) reference set to rank the queries against, as in
            pytorch-metric-learning (same device; float64 only with float64 queries).
            Without it each query is ranked against the batch itself.
        ref_labels: (M,) integer labels of ``ref_emb``; required with it.
        query_ref_index: optional (B,) integer tensor: the position of each query's own
            copy in ``ref_emb``, or -1 when it has none (``None``: no copies). A query is
            valid iff it has a positive in the reference set other than its own copy.
        variant: "O", "Ds", "Dq", "Iu", "Ib" or the authors' "PNP-O", "PNP-D_s",
            "PNP-D_q", "PNP-I_u", "PNP-I_b".
        anneal: sigmoid temperature tau > 0.
        alpha: exponent of "Dq" (> 0).
        b: slope of "Ib" (> 0).
        similarity: "cosine" (rows L2-normalised, as pytorch-metric-learning) or
            "dot" (raw inner products, as the authors' code).
        reduction: "mean" over the valid queries (0, still in the graph, when there are
            none), or "none": a (B,) vector with each query's loss and 0 for dropped ones.
        backend: "auto" (Triton on CUDA, else torch), "triton", "torch" or "ext".
        distributed: rank against the global batch of every process of
            ``process_group`` (torch.distributed; docs/distributed.md). Each rank passes its
            local batch; every rank returns the loss of the whole global batch, and its
            embeddings receive W times the gradient of it, so that DDP's averaging gives
            the single-process gradient. No effect without an initialised group of >= 2.
        process_group: the torch.distributed group (default: the world).
        memory_efficient: True: never store a Q x M buffer (similarity tiles are
            recomputed; O((Q + M) D + Q P_max) memory); False: the dense path (S and its
            gradient, two Q x M buffers); None (auto): dense unless those two buffers
            (8 Q M bytes) exceed ``PNP_KERNELS_DENSE_MAX_BYTES`` (default 4 GiB, read at
            each call). Same values and gradients either way.

    Returns:
        A float32 scalar (float64 for float64 embeddings), or a (B,) vector for
        ``reduction="none"``. Gradients flow back to ``embeddings`` (and to ``ref_emb``
        when it requires grad) in their dtypes.

    Each query i counts every reference row of its class as a positive (in the square
    case: itself included). With R_ij = sum_{k: y_k != y_i} sigmoid((S_ik - S_ij) / anneal),
    the query's loss is mean_{j in P_i} f(R_ij) (1 - mean (1+R)^-alpha for "Dq").
    """

    def spec() -> LossSpec:  # called by compute_loss, so that distributed mode raises it on every rank
        check_options(similarity, reduction, backend)
        return pnp_spec(variant, anneal, alpha, b, similarity, reduction, memory_efficient)

    return compute_loss(
        embeddings, labels, ref_emb, ref_labels, query_ref_index, spec, backend, distributed, process_group
    )[0]


def smooth_ap_loss(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    query_ref_index: Optional[Tensor] = None,
    temperature: float = 0.01,
    similarity: str = "cosine",
    reduction: str = "mean",
    backend: str = "auto",
    distributed: bool = False,
    process_group=None,
    memory_efficient: Optional[bool] = None,
) -> Tensor:
    """Smooth-AP loss (Brown et al., ECCV 2020), exact for any labels, in O(B^2) memory.

    For query q, each positive j and T = ``temperature``:
    all_qj = 1 + sum_{k != j} sigmoid((S_qk - S_qj)/T) over every reference row k and
    pos_qj = 1 + the same sum over the positives k; AP_q = mean_j pos_qj / all_qj, and
    the loss is 1 - the mean of AP_q over the valid queries (0 when there are none).
    A query whose class has no member besides itself is dropped, as in :func:`pnp_loss`.

    The arguments are those of :func:`pnp_loss` (without the PNP options); the
    reference-set, distributed, memory-efficient and backend rules are the same.
    ``reduction="none"`` gives 1 - AP_q per query, 0 for dropped ones.
    """

    def spec() -> LossSpec:  # called by compute_loss, so that distributed mode raises it on every rank
        check_options(similarity, reduction, backend)
        return smooth_ap_spec(temperature, similarity, reduction, memory_efficient)

    return compute_loss(
        embeddings, labels, ref_emb, ref_labels, query_ref_index, spec, backend, distributed, process_group
    )[0]


def recall_at_k_loss(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
    *,
    query_ref_index: Optional[Tensor] = None,
    k: Union[int, Sequence[int]] = DEFAULT_KS,
    temperature: float = 0.01,
    k_temperature: Union[None, float, Sequence[float]] = None,
    similarity: str = "cosine",
    reduction: str = "mean",
    backend: str = "auto",
    distributed: bool = False,
    process_group=None,
    memory_efficient: Optional[bool] = None,
) -> Tensor:
    """Recall@k surrogate loss (Patel, Tolias, Matas, CVPR 2022), for any labels, in O(B^2) memory.

    Omega_q is the reference set without q's own copy (q itself in the square case,
    ``query_ref_index[q]`` with a reference set); P_q its rows of q's class, and q is
    valid iff |P_q| >= 1. For each positive j, the smoothed rank
    r_qj = 1 + sum_{z in Omega_q, z != j} sigmoid((S_qz - S_qj) / temperature), and per k
    R_k(q) = min(sum_{j in P_q} sigmoid((k - r_qj) / tau2_k), k) / min(k, |P_q|);
    the query's loss is 1 - mean_k R_k(q), and the loss their mean over valid queries.

    Args:
        k: an int or a sequence of distinct positive ints (any order), taken literally.
        temperature: tau1 > 0 of the rank sigmoid.
        k_temperature: tau2_k: None (tau2_k = k, the authors' training setting), one
            number > 0 for every k, or a sequence with one value per k.

    The other arguments are those of :func:`pnp_loss`. Unlike the authors' code the
    query is not ranked in its own gallery, any labels work, and no Python loop over
    queries runs.
    """

    def spec() -> LossSpec:  # called by compute_loss, so that distributed mode raises it on every rank
        check_options(similarity, reduction, backend)
        return recall_at_k_spec(k, temperature, k_temperature, similarity, reduction, memory_efficient)

    return compute_loss(
        embeddings, labels, ref_emb, ref_labels, query_ref_index, spec, backend, distributed, process_group
    )[0]
