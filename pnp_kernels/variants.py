"""The variant table: loss kinds, PNP variants, their codes and series constants.

This module is the single source of truth for every language:

* Python looks variants up here (``resolve_variant``) and uses ``f``/``df`` below;
* the Triton kernels import the codes and constants as ``tl.constexpr`` values
  (``pnp_kernels/backends/triton_kernels.py``);
* the C++/CUDA extension includes ``csrc/pnp_variants.h``, generated from this
  table by ``python -m pnp_kernels.variants --write-header`` (a test fails when the
  header and this table drift apart).

R >= 0 is the soft count of negatives ranked above a positive:

    O   f = R                                  f' = 1
    Ds  f = log(1+R)                           f' = 1/(1+R)
    Dq  f = 1 - (1+R)^-alpha                   f' = alpha (1+R)^-(alpha+1)
    Iu  f = (1+R) log(1+R)                     f' = log(1+R) + 1
    Ib  f = (bR - log(1+bR)) / b^2             f' = R / (1+bR)

The paper writes Dq as f = (1+R)^-alpha with loss = 1 - mean(f); the mean of
1 - (1+R)^-alpha is the same number, and computing 1 - (1+R)^-alpha per pair as
-expm1(-alpha log1p(R)) keeps full relative precision when R is tiny (a loss near
0 is not the difference of two numbers near 1). Likewise bR - log(1+bR) is
summed as a series for small bR. The kernels implement the same accurate forms.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Tuple, Union

import torch

__all__ = [
    "LOSS_PNP",
    "LOSS_SMOOTH_AP",
    "LOSS_RECALL_AT_K",
    "LOSS_KINDS",
    "Variant",
    "VARIANTS",
    "VARIANT_COUNT",
    "SERIES_MAX",
    "LOG1P_SERIES_TERMS",
    "XLOG_SERIES_TERMS",
    "EXPM1_SERIES_TERMS",
    "resolve_variant",
    "variant_names",
    "variant_by_code",
    "c_header",
]

# Loss kinds: the row function a kernel runs (a compile-time constant of every kernel).
LOSS_PNP = 0  # PNP: (1/|P|) sum_j f(R_j), R_j over the negatives
LOSS_SMOOTH_AP = 1  # Smooth-AP: (1/|P|) sum_j neg_j / (pos_j + neg_j)  (= 1 - AP)
LOSS_RECALL_AT_K = 2  # Recall@k surrogate: 1 - mean_k min(sum_j sigma((k - r_j)/tau2_k), k) / min(k, |P|)
LOSS_KINDS: Dict[str, int] = {"pnp": LOSS_PNP, "smooth_ap": LOSS_SMOOTH_AP, "recall_at_k": LOSS_RECALL_AT_K}

# Series used by the accurate forms, below SERIES_MAX of their argument:
SERIES_MAX = 0.5
LOG1P_SERIES_TERMS = 24  # log(1+x)     = x (1 - x (1/2 - x (1/3 - ...))), n = 24 .. 1
XLOG_SERIES_TERMS = 24  # x - log(1+x) = x^2 (1/2 - x (1/3 - ...)),      n = 25 .. 2
EXPM1_SERIES_TERMS = 14  # 1 - e^-y     = y (1 - y/2 (1 - y/3 (1 - ... y/15))), n = 15 .. 2


def x_minus_log1p(x: torch.Tensor) -> torch.Tensor:
    """x - log(1+x) without cancellation: sum_{n>=2} (-1)^n x^n / n below SERIES_MAX."""
    xs = torch.clamp(x, max=SERIES_MAX)
    acc = torch.zeros_like(xs)
    for n in range(XLOG_SERIES_TERMS + 1, 1, -1):  # Horner on x^2 (1/2 - x (1/3 - x (1/4 - ...)))
        acc = (1.0 / n) - xs * acc
    series = xs * xs * acc
    return torch.where(x < SERIES_MAX, series, x - torch.log1p(x))


# f and df of each variant (R, alpha, b) -> tensor: module-level functions, so that a Variant,
# and every spec and module that holds one, pickles.
def _o_f(R: torch.Tensor, alpha: float, b: float) -> torch.Tensor:
    return R


def _o_df(R: torch.Tensor, alpha: float, b: float) -> torch.Tensor:
    return torch.ones_like(R)


def _ds_f(R: torch.Tensor, alpha: float, b: float) -> torch.Tensor:
    return torch.log1p(R)


def _ds_df(R: torch.Tensor, alpha: float, b: float) -> torch.Tensor:
    return 1.0 / (1.0 + R)


def _dq_f(R: torch.Tensor, alpha: float, b: float) -> torch.Tensor:
    return -torch.expm1(-alpha * torch.log1p(R))


def _dq_df(R: torch.Tensor, alpha: float, b: float) -> torch.Tensor:
    return alpha * torch.exp((-alpha - 1.0) * torch.log1p(R))


def _iu_f(R: torch.Tensor, alpha: float, b: float) -> torch.Tensor:
    return (1.0 + R) * torch.log1p(R)


def _iu_df(R: torch.Tensor, alpha: float, b: float) -> torch.Tensor:
    return torch.log1p(R) + 1.0


def _ib_f(R: torch.Tensor, alpha: float, b: float) -> torch.Tensor:
    return x_minus_log1p(b * R) / (b * b)


def _ib_df(R: torch.Tensor, alpha: float, b: float) -> torch.Tensor:
    return R / (1.0 + b * R)


Formula = Callable[[torch.Tensor, float, float], torch.Tensor]


@dataclass(frozen=True)
class Variant:
    """One row of the variant table."""

    name: str
    code: int  # compile-time constant handed to the kernels
    aliases: Tuple[str, ...]
    f: Formula
    df: Formula
    formula: str

    def __reduce__(self):
        # a table row pickles (and deep-copies) as its code, and unpickles as the table's own row
        if _BY_CODE.get(self.code) is self:
            return (variant_by_code, (self.code,))
        return (Variant, (self.name, self.code, self.aliases, self.f, self.df, self.formula))


VARIANTS: Dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("O", 0, ("PNP-O",), _o_f, _o_df, "R"),
        Variant("Ds", 1, ("PNP-D_s",), _ds_f, _ds_df, "log(1+R)"),
        Variant("Dq", 2, ("PNP-D_q",), _dq_f, _dq_df, "1 - (1+R)^-alpha (the paper's loss = 1 - mean (1+R)^-alpha)"),
        Variant("Iu", 3, ("PNP-I_u",), _iu_f, _iu_df, "(1+R) log(1+R)"),
        Variant("Ib", 4, ("PNP-I_b",), _ib_f, _ib_df, "(bR - log(1+bR)) / b^2"),
    )
}
VARIANT_COUNT = len(VARIANTS)

_LOOKUP: Dict[str, Variant] = {}
for _v in VARIANTS.values():
    _LOOKUP[_v.name] = _v
    for _alias in _v.aliases:
        _LOOKUP[_alias] = _v
_BY_CODE: Dict[int, Variant] = {v.code: v for v in VARIANTS.values()}
assert sorted(_BY_CODE) == list(range(VARIANT_COUNT)), "variant codes must be 0 .. VARIANT_COUNT - 1"


def variant_names() -> Tuple[str, ...]:
    """Every accepted spelling: the short names, then the authors' aliases."""
    names = tuple(VARIANTS)
    aliases = tuple(a for v in VARIANTS.values() for a in v.aliases)
    return names + aliases


def resolve_variant(variant: Union[str, Variant]) -> Variant:
    """Map a name or alias ("Dq", "PNP-D_q", ...) or a ``Variant`` to its table row."""
    if isinstance(variant, Variant):
        return variant
    if isinstance(variant, str) and variant in _LOOKUP:
        return _LOOKUP[variant]
    raise ValueError(f"variant: unknown value {variant!r}; valid values are {', '.join(variant_names())}")


def variant_by_code(code: int) -> Variant:
    """The table row whose kernel constant is ``code``."""
    return _BY_CODE[int(code)]


HEADER_PATH = Path(__file__).resolve().parent.parent / "csrc" / "pnp_variants.h"


def c_header() -> str:
    """The text of ``csrc/pnp_variants.h``: this table's codes and constants for C++/CUDA."""
    lines = [
        "// Generated by `python -m pnp_kernels.variants --write-header` from pnp_kernels/variants.py.",
        "// Do not edit: tests/test_variants.py fails when this file and the table drift apart.",
        "#pragma once",
        "",
        "namespace pnp_ext {",
        "",
    ]
    for name, code in LOSS_KINDS.items():
        lines.append(f"constexpr int kLoss_{name} = {code};")
    lines.append(f"constexpr int kLossKindCount = {len(LOSS_KINDS)};")
    lines.append("")
    for v in VARIANTS.values():
        lines.append(f"constexpr int kVariant_{v.name} = {v.code};  // f = {v.formula}")
    lines.append(f"constexpr int kVariantCount = {VARIANT_COUNT};")
    lines.append("")
    lines.append(f"constexpr double kSeriesMax = {SERIES_MAX!r};")
    lines.append(f"constexpr int kLog1pSeriesTerms = {LOG1P_SERIES_TERMS};")
    lines.append(f"constexpr int kXlogSeriesTerms = {XLOG_SERIES_TERMS};")
    lines.append(f"constexpr int kExpm1SeriesTerms = {EXPM1_SERIES_TERMS};")
    lines.append("")
    lines.append("}  // namespace pnp_ext")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pnp_kernels.variants", description=c_header.__doc__)
    ap.add_argument("--write-header", action="store_true", help=f"write {HEADER_PATH}")
    args = ap.parse_args(argv)
    if args.write_header:
        HEADER_PATH.write_text(c_header())
        print(f"wrote {HEADER_PATH}")
    else:
        sys.stdout.write(c_header())
    return 0


if __name__ == "__main__":
    sys.exit(main())
