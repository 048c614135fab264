"""What one loss call computes and what its forward hands to its backward.

* ``LossSpec``: the frozen options of a call (loss kind, variant, temperature,
  alpha, b, similarity, reduction, Recall@k's k values and their temperatures, and
  the memory-efficient choice). It travels through every backend stage and is
  flattened only at the torch.library custom-op and C++ boundaries (``flat()``).
* ``SquarePrep`` / ``ReferencePrep``: the named tensors that the preparation stage
  makes (sorted, normalised rows and each query's positive segment) and that the
  backward stage needs again.

Own column: row p's own copy in the (sorted) reference columns, -1 if none; in the
square mode it is p itself. Every row stage receives it. PNP and Smooth-AP count the
own copy as a positive (it lies in the segment); Recall@k excludes that column from
both the positives and the ranked set.

Segments: the reference rows are sorted by label, so the positives of query p are
the columns [lo_p, hi_p) of its similarity row and every other column is a
negative. A query that is not valid (no positive besides its own copy) gets an
empty segment (hi_p = lo_p); every row kernel drops a row with an empty segment
(loss 0, zero gradient row), and the number of valid queries is #{p : hi_p > lo_p}.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import List, NamedTuple, Optional, Tuple

import torch

from .variants import LOSS_KINDS, LOSS_PNP, VARIANTS, Variant, variant_by_code

__all__ = [
    "LossSpec",
    "SquarePrep",
    "ReferencePrep",
    "NORM_EPS",
    "HALF_MAX",
    "SIMILARITIES",
    "REDUCTIONS",
    "DENSE_MAX_BYTES_ENV",
    "DEFAULT_DENSE_MAX_BYTES",
    "dense_max_bytes",
]

SIMILARITIES = ("cosine", "dot")
REDUCTIONS = ("mean", "none")

NORM_EPS = 1e-12  # F.normalize's eps: x / max(||x||, eps)
# Largest float16. A gradient is written in float16 saturated to +-HALF_MAX: the one
# finite-input case that overflows is a zero-norm row under "cosine", whose gradient
# is dX / eps (~1e12, as F.normalize's), far outside float16's range.
HALF_MAX = 65504.0

_KIND_NAMES = {code: name for name, code in LOSS_KINDS.items()}

# memory_efficient=None (auto) takes the dense path unless its two Q x M float32
# buffers (S and G: 8 Q M bytes) would exceed this many bytes.
DENSE_MAX_BYTES_ENV = "PNP_KERNELS_DENSE_MAX_BYTES"
DEFAULT_DENSE_MAX_BYTES = 4 << 30


def dense_max_bytes() -> int:
    """The auto threshold, read from ``PNP_KERNELS_DENSE_MAX_BYTES`` at every call (default 4 GiB)."""
    raw = os.environ.get(DENSE_MAX_BYTES_ENV, "")
    if not raw.strip():
        return DEFAULT_DENSE_MAX_BYTES
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{DENSE_MAX_BYTES_ENV}: expected a number of bytes, got {raw!r}") from None
    return value


@dataclass(frozen=True)
class LossSpec:
    """The options of one loss call.

    ``anneal`` is PNP's tau, Smooth-AP's temperature or Recall@k's tau1; ``ks`` and
    ``k_temperatures`` are Recall@k's k values and their tau2_k (empty otherwise);
    ``memory_efficient`` is the user's choice (None: auto), resolved to a bool by
    :meth:`resolved` once the problem size is known.
    """

    kind: int = LOSS_PNP
    variant: Variant = VARIANTS["O"]
    anneal: float = 0.01
    alpha: float = 1.0
    b: float = 2.0
    cosine: bool = True
    mean: bool = True
    ks: Tuple[float, ...] = ()
    k_temperatures: Tuple[float, ...] = ()
    memory_efficient: Optional[bool] = None

    def resolved(self, n_queries: int, n_ref: int) -> LossSpec:
        """This spec with ``memory_efficient`` decided for a Q x M problem: auto picks the
        memory-efficient path when the dense path's S and G (8 Q M bytes) exceed the
        ``PNP_KERNELS_DENSE_MAX_BYTES`` threshold."""
        if self.memory_efficient is not None:
            return self
        return replace(self, memory_efficient=8 * n_queries * n_ref > dense_max_bytes())

    @staticmethod
    def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
        """Similarities are computed and kept in float32, float64 for float64 input."""
        return torch.float64 if dtype == torch.float64 else torch.float32

    @property
    def kind_name(self) -> str:
        return _KIND_NAMES[self.kind]

    def flat(self) -> Tuple[int, int, float, float, float, bool, bool, List[float], List[float], bool]:
        """The (resolved) spec as plain scalars and lists, for a custom-op signature."""
        return (
            self.kind,
            self.variant.code,
            self.anneal,
            self.alpha,
            self.b,
            self.cosine,
            self.mean,
            list(self.ks),
            list(self.k_temperatures),
            bool(self.memory_efficient),
        )

    @staticmethod
    def from_flat(
        kind: int,
        variant_code: int,
        anneal: float,
        alpha: float,
        b: float,
        cosine: bool,
        mean: bool,
        ks: List[float],
        k_temperatures: List[float],
        memory_efficient: bool,
    ) -> LossSpec:
        return LossSpec(
            int(kind),
            variant_by_code(variant_code),
            float(anneal),
            float(alpha),
            float(b),
            bool(cosine),
            bool(mean),
            tuple(float(k) for k in ks),
            tuple(float(t) for t in k_temperatures),
            bool(memory_efficient),
        )


class SquarePrep(NamedTuple):
    """One batch ranked against itself, in label-sorted order. A backend that keeps half rows
    (``Backend.rows_dtype``) stores them as they are, not normalised, with their norms."""

    Xs: torch.Tensor  # (B, D) rows in label-sorted order, normalised for "cosine", compute dtype
    perm: torch.Tensor  # (B,) int64: sorted position -> original row
    lo: torch.Tensor  # (B,) int32: first sorted position of the row's class (empty segment: invalid)
    hi: torch.Tensor  # (B,) int32: one past its last
    denom: torch.Tensor  # (B,) max(||e||, eps) for "cosine"; empty for "dot"


class ReferencePrep(NamedTuple):
    """Queries (original order) ranked against a label-sorted reference set."""

    Xq: torch.Tensor  # (Q, D) queries, normalised for "cosine", compute dtype
    denom_q: torch.Tensor  # (Q,) or empty for "dot"
    Xr: torch.Tensor  # (M, D) reference rows in label-sorted order, normalised
    perm_r: torch.Tensor  # (M,) int64: sorted position -> original reference row
    denom_r: torch.Tensor  # (M,) or empty for "dot"
    lo: torch.Tensor  # (Q,) int32: the query's positives are the sorted reference rows [lo, hi)
    hi: torch.Tensor  # (Q,) int32 (hi = lo for an invalid query)
    own: torch.Tensor  # (Q,) int32: sorted position of the query's own copy, -1 if none
