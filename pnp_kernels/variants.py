"""The five PNP variants: names, aliases, and each variant's f(R) and df/dR.

This is the single source of truth for the variant table. Every backend looks a
variant up here; the Triton and C++/CUDA kernels receive ``Variant.code`` as a
compile-time constant and implement the same formulas (their tests pin them to
the torch formulas below through the float64 reference).

R >= 0 is the soft count of negatives ranked above a positive. Per DESIGN.md:

    O   f = R                                  f' = 1
    Ds  f = log(1+R)                           f' = 1/(1+R)
    Dq  f = 1 - (1+R)^-alpha                   f' = alpha (1+R)^-(alpha+1)
    Iu  f = (1+R) log(1+R)                     f' = log(1+R) + 1
    Ib  f = (bR - log(1+bR)) / b^2             f' = R / (1+bR)

The papers write Dq as f = (1+R)^-alpha with loss = 1 - mean(f); the mean of
1 - (1+R)^-alpha is the same number, and computing 1 - (1+R)^-alpha per pair as
-expm1(-alpha log1p(R)) keeps full relative precision when R is tiny (a loss near
0 is not the difference of two numbers near 1). Likewise bR - log(1+bR) is
summed as a series for small bR. The kernels implement the same accurate forms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

__all__ = ["Variant", "VARIANTS", "resolve_variant", "variant_names", "variant_by_code"]


IB_SERIES_MAX = 0.5  # below this x = bR, x - log1p(x) is summed as its series
IB_SERIES_TERMS = 24  # |error| <= 0.5^26 / 26 relative to x^2 / 2


def x_minus_log1p(x: torch.Tensor) -> torch.Tensor:
    """x - log(1+x) without cancellation: sum_{n>=2} (-1)^n x^n / n below IB_SERIES_MAX."""
    xs = torch.clamp(x, max=IB_SERIES_MAX)
    acc = torch.zeros_like(xs)
    for n in range(IB_SERIES_TERMS + 1, 1, -1):  # Horner on x^2 (1/2 - x (1/3 - x (1/4 - ...)))
        acc = (1.0 / n) - xs * acc
    series = xs * xs * acc
    return torch.where(x < IB_SERIES_MAX, series, x - torch.log1p(x))


def _ib_f(R: torch.Tensor, alpha: float, b: float) -> torch.Tensor:
    return x_minus_log1p(b * R) / (b * b)


@dataclass(frozen=True)
class Variant:
    """One row of the variant table."""

    name: str
    code: int  # compile-time constant handed to the kernels
    aliases: Tuple[str, ...]
    f: Callable[[torch.Tensor, float, float], torch.Tensor]
    df: Callable[[torch.Tensor, float, float], torch.Tensor]
    formula: str


VARIANTS: Dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("O", 0, ("PNP-O",),
                lambda R, a, b: R,
                lambda R, a, b: torch.ones_like(R),
                "R"),
        Variant("Ds", 1, ("PNP-D_s",),
                lambda R, a, b: torch.log1p(R),
                lambda R, a, b: 1.0 / (1.0 + R),
                "log(1+R)"),
        Variant("Dq", 2, ("PNP-D_q",),
                lambda R, a, b: -torch.expm1(-a * torch.log1p(R)),
                lambda R, a, b: a * torch.exp((-a - 1.0) * torch.log1p(R)),
                "1 - (1+R)^-alpha (the papers' loss = 1 - mean (1+R)^-alpha)"),
        Variant("Iu", 3, ("PNP-I_u",),
                lambda R, a, b: (1.0 + R) * torch.log1p(R),
                lambda R, a, b: torch.log1p(R) + 1.0,
                "(1+R) log(1+R)"),
        Variant("Ib", 4, ("PNP-I_b",),
                _ib_f,
                lambda R, a, b: R / (1.0 + b * R),
                "(bR - log(1+bR)) / b^2"),
    )
}

_LOOKUP: Dict[str, Variant] = {}
for _v in VARIANTS.values():
    _LOOKUP[_v.name] = _v
    for _alias in _v.aliases:
        _LOOKUP[_alias] = _v


def variant_names() -> Tuple[str, ...]:
    """Every accepted spelling: the short names, then the authors' aliases."""
    names = tuple(VARIANTS)
    aliases = tuple(a for v in VARIANTS.values() for a in v.aliases)
    return names + aliases


def resolve_variant(variant) -> Variant:
    """Map a name or alias ("Dq", "PNP-D_q", ...) or a ``Variant`` to its table row."""
    if isinstance(variant, Variant):
        return variant
    if isinstance(variant, str) and variant in _LOOKUP:
        return _LOOKUP[variant]
    raise ValueError(
        f"variant: unknown value {variant!r}; valid values are {', '.join(variant_names())}"
    )


_BY_CODE: Dict[int, Variant] = {v.code: v for v in VARIANTS.values()}


def variant_by_code(code: int) -> Variant:
    """The table row whose kernel constant is ``code``."""
    return _BY_CODE[int(code)]
