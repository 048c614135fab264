"""The distributed mode: exact ranking against the global batch of every process.

With world size W, rank r and local batch x_r (B_r rows, possibly 0), each rank

0. checks its own inputs without raising, then takes part in one small all_gather of a
   fixed-size metadata row (:func:`agree`): local batch size and width, dtype, device
   type, a fingerprint of the loss options, whether a reference set is passed and its
   width, whether the embeddings need a gradient, and the local error if any. When a
   rank failed or the ranks disagree, every rank raises the same exception, naming the
   rank and the argument, before any data is exchanged;
1. gathers every rank's embeddings in rank order with :func:`gather_with_grad`
   (an autograd Function over ``all_gather``, padded to the largest local batch so that
   unequal sizes work). Its backward sums the gathered gradient over ranks and keeps
   the local rows: a ``reduce_scatter`` of the padded buffer on NCCL, an ``all_reduce``
   of the unpadded one elsewhere (gloo);
2. ranks its local queries against ref = cat(gathered batch, ref_emb), with
   query_ref_index = offset_r + arange(B_r), by the reference-set kernels: per-rank
   memory B_r x (B_global + M) similarities, never B_global^2. A rank with no rows calls
   no kernel: its contribution is an empty row vector that still depends on the
   gathered batch, so that its backward joins the gather's collective;
3. sums its per-query losses s_r over its valid queries, and all-reduces
   (s_r, n_r) so that every rank knows the global sum s and the global count
   n of valid queries. With L = s / n the single-process loss:

       graph_r = W * s_r / n          (differentiable)
       returned = graph_r + (L - graph_r).detach()      (value L on every rank)

   d graph_s / d x_r summed over s (the gather's backward) is W dL/dx_r, so after
   DDP averages the parameter gradients over the W ranks they equal the
   single-process gradient of L. The derivation is in docs/distributed.md.

A rank whose local queries are all invalid (or that has none) still returns a loss in
the graph (s_r = 0), so every rank calls the backward collective and none hangs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .autograd import apply_reference
from .spec import LossSpec
from .variants import LOSS_PNP, Variant

__all__ = ["world_size", "agree", "uses_reduce_scatter", "gather_with_grad", "gather_no_grad", "distributed_loss"]

Tensor = torch.Tensor


def world_size(process_group=None) -> int:
    """The group's size when torch.distributed is initialised, else 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


# --------------------------------------------------------------------------- metadata

# One int64 row per rank, of the same length on every rank: a collective whose ranks
# pass buffers of different sizes is exactly what aborts gloo, so nothing here depends
# on the inputs' shapes.
_ERROR, _ROWS, _WIDTH, _DTYPE, _DEVICE, _HAS_REF, _REF_WIDTH, _NEEDS_GRAD, _OPTIONS = range(9)
_META_LEN = 9
# The details row (error path only): JSON of the local error and the rendered options.
_DETAILS_BYTES = 4096
_MESSAGE_CHARS = 1200

# Exception types a rank's error is raised as everywhere (code = position + 1); any
# other Exception travels as a RuntimeError whose message names its type.
_ERROR_TYPES = (TypeError, ValueError, RuntimeError)
_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.complex128,
)
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "meta", "privateuseone")


def _stable_hash(text: str) -> int:
    """A signed 64-bit hash that is the same in every process (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _code(table: Sequence, value, name: str) -> int:
    try:
        return table.index(value)
    except ValueError:  # outside the table (only on error paths): a code from its name, still comparable
        return 1000 + (_stable_hash(name) & 0xFFFFFF)


def _num(v) -> str:
    return repr(int(v)) if isinstance(v, float) and v.is_integer() and abs(v) < 2**53 else repr(v)


def _option_item(name: str, value, spec: LossSpec) -> Tuple[str, str]:
    """(label, exact text) of one LossSpec field as a user would name it. Every field is
    included (new fields too, by their name and repr); the text is exact (repr of floats
    round-trips), so equal texts mean equal options."""
    if name == "kind":
        return "loss", spec.kind_name
    if name == "anneal":
        return ("anneal" if spec.kind == LOSS_PNP else "temperature"), repr(value)
    if name == "cosine":
        return "similarity", "cosine" if value else "dot"
    if name == "mean":
        return "reduction", "mean" if value else "none"
    if name == "memory_efficient":
        return name, "auto" if value is None else str(value)
    if name == "ks":
        return "k", "(" + ", ".join(_num(v) for v in value) + ")"
    if name == "k_temperatures":
        return "k_temperature", "(" + ", ".join(repr(v) for v in value) + ")"
    if isinstance(value, Variant):
        return name, value.name
    return name, repr(value)


_FINGERPRINTS: Dict[LossSpec, Tuple[int, List[Tuple[str, str]]]] = {}


def _fingerprint(spec: LossSpec) -> Tuple[int, List[Tuple[str, str]]]:
    """(hash of every option, [(label, text)] per LossSpec field), cached per spec."""
    out = _FINGERPRINTS.get(spec)
    if out is None:
        if len(_FINGERPRINTS) >= 256:  # e.g. a temperature schedule: a new spec every step
            _FINGERPRINTS.clear()
        items = [_option_item(f.name, getattr(spec, f.name), spec) for f in dataclasses.fields(spec)]
        digest = _stable_hash("\x1f".join(f"{f.name}={text}" for f, (_, text) in zip(dataclasses.fields(spec), items)))
        out = _FINGERPRINTS[spec] = (digest, items)
    return out


def _error_code(error: BaseException) -> int:
    for i, t in enumerate(_ERROR_TYPES):
        if type(error) is t:
            return i + 1
    for i, t in enumerate(_ERROR_TYPES):
        if isinstance(error, t):
            return i + 1
    return len(_ERROR_TYPES)  # RuntimeError


def _error_text(error: BaseException) -> str:
    text = str(error) if isinstance(error, _ERROR_TYPES) else f"{type(error).__name__}: {error}"
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 3] + "..."


def _meta_row(embeddings, ref_emb, spec: Optional[LossSpec], needs_grad: bool, error) -> List[int]:
    row = [-1] * _META_LEN
    row[_ERROR] = 0 if error is None else _error_code(error)
    if isinstance(embeddings, Tensor):
        if embeddings.dim() == 2:
            row[_ROWS], row[_WIDTH] = int(embeddings.shape[0]), int(embeddings.shape[1])
        row[_DTYPE] = _code(_DTYPES, embeddings.dtype, str(embeddings.dtype))
        row[_DEVICE] = _code(_DEVICE_TYPES, embeddings.device.type, embeddings.device.type)
    row[_HAS_REF] = int(ref_emb is not None)
    if isinstance(ref_emb, Tensor) and ref_emb.dim() == 2:
        row[_REF_WIDTH] = int(ref_emb.shape[1])
    row[_NEEDS_GRAD] = int(bool(needs_grad))
    row[_OPTIONS] = _fingerprint(spec)[0] if spec is not None else 0
    return row


def _meta_device(embeddings, group) -> torch.device:
    """Where the metadata travels: host memory for gloo (no GPU sync at all), the
    embeddings' GPU (else the current one) for NCCL."""
    name = str(dist.get_backend(group)).lower()
    if "gloo" in name or "mpi" in name:
        return torch.device("cpu")
    if isinstance(embeddings, Tensor) and embeddings.device.type != "cpu":
        return embeddings.device
    if "nccl" in name and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_rows(row: Tensor, group) -> Tensor:
    """(W, len(row)): every rank's fixed-size row, in rank order."""
    parts = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, row, group=group)
    return torch.stack(parts)


def _details_payload(error, spec: Optional[LossSpec]) -> bytes:
    """The local error and the rendered options as JSON in at most _DETAILS_BYTES bytes
    (long option texts are shortened for display; each keeps the hash of its full text)."""
    err = None if error is None else [type(error).__name__, _error_text(error)]
    items = [] if spec is None else _fingerprint(spec)[1]
    for limit in (120, 40, 12, 0):
        opts = [
            [label[:40], text if len(text) <= limit else text[: max(limit - 3, 0)] + "...", _stable_hash(text)]
            for label, text in items
        ]
        data = json.dumps({"error": err, "options": opts}).encode("ascii")
        if len(data) <= _DETAILS_BYTES:
            return data
    return json.dumps({"error": err, "options": []}).encode("ascii")[:_DETAILS_BYTES]


def _gather_details(error, spec: Optional[LossSpec], device: torch.device, group) -> List[dict]:
    """Every rank's details (a second fixed-size all_gather, run only when a rank failed or
    the options differ: every rank knows that from the first one, so all of them join)."""
    data = _details_payload(error, spec)
    buf = torch.zeros(_DETAILS_BYTES, dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    rows = _gather_rows(buf.to(device), group).cpu()
    out = []
    for r in range(rows.shape[0]):
        raw = bytes(rows[r].tolist()).rstrip(b"\0").decode("ascii", errors="replace")
        try:
            out.append(json.loads(raw))
        except ValueError:
            out.append({"error": None, "options": []})
    return out


def _ranks(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(str(r) for r in ranks)


def _groups(values: Sequence, show=str) -> str:
    """The ranks of each distinct value, in first-seen order: "16 on ranks 0, 2; 32 on rank 1"."""
    order: Dict = {}
    for r, v in enumerate(values):
        order.setdefault(v, []).append(r)
    return "; ".join(f"{show(v)} on {_ranks(rs)}" for v, rs in order.items())


_ARG_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*): ")


def _with_ranks(message: str, ranks: Sequence[int]) -> str:
    """The message with the ranks after its argument ("labels (rank 1): ..."), or before it."""
    m = _ARG_PREFIX.match(message)
    if m:
        return f"{m.group(1)} ({_ranks(ranks)}): {message[m.end() :]}"
    return f"{_ranks(ranks)}: {message}"


def _rank_error(rows: List[List[int]], details: List[dict]) -> Exception:
    """The exception every rank raises when some rank's own check failed: the first failing
    rank's type and message (with every rank that failed the same way), then the others."""
    failed = [r for r, row in enumerate(rows) if row[_ERROR]]
    first = failed[0]
    code = rows[first][_ERROR]

    def text_of(r: int) -> str:
        err = details[r].get("error") if r < len(details) else None
        return err[1] if err else "(no message received)"

    same = [r for r in failed if rows[r][_ERROR] == code and text_of(r) == text_of(first)]
    message = _with_ranks(text_of(first), same)
    others = [r for r in failed if r not in same]
    if others:
        shown = "; ".join(f"rank {r}: {_ERROR_TYPES[rows[r][_ERROR] - 1].__name__}: {text_of(r)}" for r in others[:3])
        more = f"; and {len(others) - 3} more ranks" if len(others) > 3 else ""
        message += f" (also failed: {shown}{more})"
    return _ERROR_TYPES[code - 1](message)


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]) if 0 <= code < len(_DTYPES) else f"dtype #{code}"


def _device_name(code: int) -> str:
    return _DEVICE_TYPES[code] if 0 <= code < len(_DEVICE_TYPES) else f"device type #{code}"


def _options_message(details: List[dict]) -> str:
    opts = [d.get("options", []) for d in details]
    if len({len(o) for o in opts}) != 1:
        return "loss options differ between ranks (a different pnp_kernels version on some rank?)"
    parts = []
    for i in range(len(opts[0])):
        hashes = [o[i][2] for o in opts]
        if len(set(hashes)) == 1:
            continue
        labels = list(dict.fromkeys(o[i][0] for o in opts))
        texts = {o[i][2]: o[i][1] for o in reversed(opts)}  # hash -> a text to show
        parts.append(f"{'/'.join(labels)} {_groups(hashes, lambda h: texts[h])}")
    return "loss options differ between ranks: " + ". ".join(parts)


def _disagreement(rows: List[List[int]], details: Optional[List[dict]]) -> Optional[str]:
    """What the ranks disagree on (every rank's own check passed), or None."""

    def column(i):
        return [row[i] for row in rows]

    for label, i, show in (
        ("device type", _DEVICE, _device_name),
        ("dtype", _DTYPE, _dtype_name),
        ("width", _WIDTH, str),
    ):
        if len(set(column(i))) > 1:
            return f"embeddings: {label} differs between ranks: {_groups(column(i), show)}"
    has_ref = column(_HAS_REF)
    if len(set(has_ref)) > 1:
        given = [r for r, h in enumerate(has_ref) if h]
        absent = [r for r, h in enumerate(has_ref) if not h]
        return (
            f"ref_emb: given on {_ranks(given)} but not on {_ranks(absent)}; every rank passes a reference "
            "set or none does"
        )
    if has_ref[0] and len(set(column(_REF_WIDTH))) > 1:
        return f"ref_emb: width differs between ranks: {_groups(column(_REF_WIDTH))}"
    if len(set(column(_OPTIONS))) > 1:
        return _options_message(details or [])
    grads = column(_NEEDS_GRAD)
    if len(set(grads)) > 1:
        return (
            f"embeddings: need a gradient on {_ranks([r for r, g in enumerate(grads) if g])} but not on "
            f"{_ranks([r for r, g in enumerate(grads) if not g])} (requires_grad and grad mode); the gather's "
            "backward is a collective that every rank must run, so either every rank's embeddings need a "
            "gradient or none do"
        )
    if sum(column(_ROWS)) == 0:
        return "embeddings: empty batch on every rank (global batch size 0)"
    return None


def agree(embeddings, ref_emb, spec: Optional[LossSpec], needs_grad: bool, error: Optional[BaseException], group=None):
    """Every rank's local batch size, once the ranks have checked that they can run the loss together.

    Called by every rank of ``group`` after checking its own inputs without raising:
    ``error`` is the exception its single-process call would raise (None if none), and
    ``spec`` its options (None when they could not be built). One all_gather of a
    fixed-size int64 row per rank carries the batch size and width, dtype, device
    type, options fingerprint, reference set presence and width, whether the embeddings
    need a gradient, and the error's type. If any rank failed, every rank raises that
    rank's exception type with the rank named in the message; if the ranks disagree,
    every rank raises the same ValueError (a second fixed-size all_gather, only on these
    paths, carries the messages and the options' texts). On CUDA the one host sync is
    reading the sizes back, which padding the gathers needs anyway.
    """
    device = _meta_device(embeddings, group)
    mine = torch.tensor(_meta_row(embeddings, ref_emb, spec, needs_grad, error), dtype=torch.int64)
    rows = _gather_rows(mine.to(device), group).tolist()
    failed = any(row[_ERROR] for row in rows)
    details = None
    if failed or len({row[_OPTIONS] for row in rows}) > 1:
        details = _gather_details(error, spec if error is None else None, device, group)
    if failed:
        raise _rank_error(rows, details or []) from error
    problem = _disagreement(rows, details)
    if problem is not None:
        raise ValueError(problem)
    return [row[_ROWS] for row in rows]


# --------------------------------------------------------------------------- gathers


def _local_sizes(n: int, device: torch.device, group) -> List[int]:
    """Every rank's local batch size (one small all_gather; the host needs them to pad)."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    return [int(s) for s in _gather_rows(mine, group).reshape(-1).tolist()]


def uses_reduce_scatter(device: torch.device, group=None) -> bool:
    """Whether the gather's backward reduce-scatters (NCCL, CUDA tensors) rather than all-reduces.

    NCCL implements the flat collectives (``all_gather_into_tensor``,
    ``reduce_scatter_tensor``) natively; other backends (gloo) take the list all_gather
    and the all_reduce, which every backend has."""
    return device.type == "cuda" and "nccl" in str(dist.get_backend(group)).lower()


def _reduce_scatter(out: Tensor, inp: Tensor, group) -> None:
    """out = rank r's chunk of the sum over ranks of inp (``reduce_scatter_single`` where torch has it)."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, op=dist.ReduceOp.SUM, group=group)


def _all_gather_flat(out: Tensor, inp: Tensor, group) -> None:
    """out = cat over ranks of inp (``all_gather_single`` where torch has it)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _all_gather_padded(x: Tensor, sizes: List[int], group) -> Tensor:
    """cat over ranks of every rank's x (rows sizes[r]), through buffers padded to max(sizes) rows."""
    n_max = max(sizes)
    equal = all(n == n_max for n in sizes)
    padded = x.contiguous() if x.shape[0] == n_max else torch.cat([x, x.new_zeros((n_max - x.shape[0],) + x.shape[1:])])
    if uses_reduce_scatter(x.device, group):
        flat = x.new_empty((len(sizes) * n_max,) + tuple(x.shape[1:]))
        _all_gather_flat(flat, padded, group)
        if equal:
            return flat
        parts = list(flat.split(n_max))
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        if equal:
            return torch.cat(parts)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _sum_to_local(grad: Tensor, sizes: List[int], group) -> Tensor:
    """Rows of this rank of the sum over ranks of ``grad`` (the gathered batch's gradient)."""
    rank = dist.get_rank(group)
    if uses_reduce_scatter(grad.device, group):
        # Rank r's rows go to chunk r of a buffer padded to max(sizes) rows per rank; one
        # reduce-scatter then hands each rank the sum of its own chunk: (W - 1) / W of the
        # buffer per rank on a ring, half of what an all-reduce moves.
        n_max = max(sizes)
        if all(n == n_max for n in sizes):
            padded = grad
        else:
            padded = grad.new_zeros((len(sizes) * n_max,) + tuple(grad.shape[1:]))
            offset = 0
            for r, n in enumerate(sizes):
                padded[r * n_max : r * n_max + n] = grad[offset : offset + n]
                offset += n
        out = grad.new_empty((n_max,) + tuple(grad.shape[1:]))
        _reduce_scatter(out, padded, group)
        return out[: sizes[rank]]
    total = grad.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    offset = sum(sizes[:rank])
    return total[offset : offset + sizes[rank]]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):  # type: ignore[override]
        ctx.sizes, ctx.group = sizes, group
        return _all_gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # Rank s's loss reaches x_r through the gather of every rank: the gradient of x_r is
        # the sum over ranks of the gathered gradient's rows of r.
        return _sum_to_local(grad.contiguous(), ctx.sizes, ctx.group), None, None


def gather_with_grad(x: Tensor, group=None, sizes: Optional[List[int]] = None) -> Tensor:
    """All ranks' ``x`` concatenated in rank order, differentiable: the backward sums the
    gradient over ranks (so each rank's ``x`` gets the gradient of every rank's loss).
    ``sizes``: every rank's number of rows, when known (else one small all_gather finds them)."""
    sizes = sizes if sizes is not None else _local_sizes(x.shape[0], x.device, group)
    return _GatherWithGrad.apply(x, sizes, group)


def gather_no_grad(x: Tensor, group=None, sizes: Optional[List[int]] = None) -> Tensor:
    """All ranks' ``x`` concatenated in rank order, outside autograd (``sizes`` as in
    :func:`gather_with_grad`)."""
    sizes = sizes if sizes is not None else _local_sizes(x.shape[0], x.device, group)
    with torch.no_grad():
        return _all_gather_padded(x.detach(), sizes, group)


# --------------------------------------------------------------------------- the loss


def distributed_loss(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Optional[Tensor],
    ref_labels: Optional[Tensor],
    spec: LossSpec,
    backend: str,
    group=None,
    sizes: Optional[List[int]] = None,
) -> Tuple[Tensor, Tensor]:
    """(output, global n_valid) of the local queries ranked against the global batch (+ ref_emb).

    Inputs are checked already (``sizes``: every rank's batch size, from :func:`agree`).
    "mean": the global loss on every rank, with the gradient rule above. "none": the
    (B_r,) vector of the local queries' losses; the gather's backward sums what every
    rank backpropagates into each rank's embeddings.
    """
    W = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if sizes is None:
        sizes = _local_sizes(embeddings.shape[0], embeddings.device, group)
    grad = torch.is_grad_enabled()
    need_q = grad and embeddings.requires_grad
    gathered = gather_with_grad(embeddings, group, sizes) if need_q else gather_no_grad(embeddings, group, sizes)
    gathered_labels = gather_no_grad(labels, group, sizes)
    ref, ref_y = gathered, gathered_labels
    r_live = -1
    if ref_emb is not None and ref_labels is not None:
        ref = torch.cat([gathered, ref_emb.to(gathered.dtype)])
        ref_y = torch.cat([gathered_labels, ref_labels])
        if not ref_emb.requires_grad:  # a detached memory: only the gathered rows need dEr
            r_live = gathered.shape[0]
    if embeddings.shape[0] == 0:
        # No query here, so no kernel runs. An empty row vector sliced from the reference set
        # keeps this rank's loss on the gathered batch (and ref_emb): its backward reaches the
        # gather's collective, which every rank must join, with a zero gradient.
        rows = ref[:0, 0].to(LossSpec.compute_dtype_of(embeddings.dtype))
        n_local = rows.new_zeros(())
    else:
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
            r_live,
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
