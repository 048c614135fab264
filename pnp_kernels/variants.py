"""The five PNP variants: names, aliases, and each variant's f(R) and df/dR.

This is the single source of truth for the variant table. Every backend looks a
variant up here; the Triton and C++/CUDA kernels receive ``Variant.code`` as a
compile-time constant and implement the same formulas (their tests pin them to
the torch formulas below through the float64 reference).

R >= 0 is the soft count of negatives ranked above a positive. Per DESIGN.md:

    O   f = R                                  f' = 1
    Ds  f = log(1+R)                           f' = 1/(1+R)
    Dq  f = (1+R)^-alpha   (loss = 1 - mean)   f' = -alpha (1+R)^-(alpha+1)
    Iu  f = (1+R) log(1+R)                     f' = log(1+R) + 1
    Ib  f = (bR - log(1+bR)) / b^2             f' = R / (1+bR)

``f'`` here is the true derivative of ``f``; the ``1 - mean`` of Dq is applied by
the reduction, so the sign of the table in DESIGN.md (dloss/dR) follows from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

__all__ = ["Variant", "VARIANTS", "resolve_variant", "variant_names", "variant_by_code"]


def _ib_f(R: torch.Tensor, alpha: float, b: float) -> torch.Tensor:
    # x - log(1+x) cancels for small x = bR; log1p keeps it accurate.
    x = b * R
    return (x - torch.log1p(x)) / (b * b)


@dataclass(frozen=True)
class Variant:
    """One row of the variant table."""

    name: str
    code: int  # compile-time constant handed to the kernels
    aliases: Tuple[str, ...]
    one_minus: bool  # the reported loss is 1 - mean(f) (Dq)
    f: Callable[[torch.Tensor, float, float], torch.Tensor]
    df: Callable[[torch.Tensor, float, float], torch.Tensor]
    formula: str


VARIANTS: Dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("O", 0, ("PNP-O",), False,
                lambda R, a, b: R,
                lambda R, a, b: torch.ones_like(R),
                "R"),
        Variant("Ds", 1, ("PNP-D_s",), False,
                lambda R, a, b: torch.log1p(R),
                lambda R, a, b: 1.0 / (1.0 + R),
                "log(1+R)"),
        Variant("Dq", 2, ("PNP-D_q",), True,
                lambda R, a, b: (1.0 + R) ** (-a),
                lambda R, a, b: -a * (1.0 + R) ** (-a - 1.0),
                "(1+R)^-alpha, loss = 1 - mean"),
        Variant("Iu", 3, ("PNP-I_u",), False,
                lambda R, a, b: (1.0 + R) * torch.log1p(R),
                lambda R, a, b: torch.log1p(R) + 1.0,
                "(1+R) log(1+R)"),
        Variant("Ib", 4, ("PNP-I_b",), False,
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
