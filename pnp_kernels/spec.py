"""What one loss call computes and what its forward hands to its backward.

* ``LossSpec``: the frozen options of a call (loss kind, variant, temperature,
  alpha, b, similarity, reduction). It travels through every backend stage and is
  flattened only at the torch.library custom-op and C++ boundaries (``flat()``).
* ``SquarePrep`` / ``ReferencePrep``: the named tensors that the preparation stage
  makes (sorted, normalised rows and each query's positive segment) and that the
  backward stage needs again.

Segments: the reference rows are sorted by label, so the positives of query p are
the columns [lo_p, hi_p) of its similarity row and every other column is a
negative. A query that is not valid (no positive besides its own copy) gets an
empty segment (hi_p = lo_p); every row kernel drops a row with an empty segment
(loss 0, zero gradient row), and the number of valid queries is #{p : hi_p > lo_p}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Tuple

import torch

from .variants import LOSS_KINDS, LOSS_PNP, VARIANTS, Variant, variant_by_code

__all__ = ["LossSpec", "SquarePrep", "ReferencePrep", "NORM_EPS", "HALF_MAX", "SIMILARITIES", "REDUCTIONS"]

SIMILARITIES = ("cosine", "dot")
REDUCTIONS = ("mean", "none")

NORM_EPS = 1e-12  # F.normalize's eps: x / max(||x||, eps)
# Largest float16. A gradient is written in float16 saturated to +-HALF_MAX: the one
# finite-input case that overflows is a zero-norm row under "cosine", whose gradient
# is dX / eps (~1e12, as F.normalize's), far outside float16's range.
HALF_MAX = 65504.0

_KIND_NAMES = {code: name for name, code in LOSS_KINDS.items()}


@dataclass(frozen=True)
class LossSpec:
    """The options of one loss call; ``anneal`` is PNP's tau or Smooth-AP's temperature."""

    kind: int = LOSS_PNP
    variant: Variant = VARIANTS["O"]
    anneal: float = 0.01
    alpha: float = 1.0
    b: float = 2.0
    cosine: bool = True
    mean: bool = True

    @staticmethod
    def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
        """Similarities are computed and kept in float32, float64 for float64 input."""
        return torch.float64 if dtype == torch.float64 else torch.float32

    @property
    def kind_name(self) -> str:
        return _KIND_NAMES[self.kind]

    def flat(self) -> Tuple[int, int, float, float, float, bool, bool]:
        """The spec as plain scalars, for a custom-op or C++ signature."""
        return (self.kind, self.variant.code, self.anneal, self.alpha, self.b, self.cosine, self.mean)

    @staticmethod
    def from_flat(
        kind: int, variant_code: int, anneal: float, alpha: float, b: float, cosine: bool, mean: bool
    ) -> LossSpec:
        return LossSpec(
            int(kind), variant_by_code(variant_code), float(anneal), float(alpha), float(b), bool(cosine), bool(mean)
        )


class SquarePrep(NamedTuple):
    """One batch ranked against itself, in label-sorted order."""

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
