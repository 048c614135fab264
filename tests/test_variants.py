"""One variant table for every language: Python, the Triton kernels and the C++ header.

Fails when csrc/pnp_variants.h or the Triton constexprs drift from
pnp_kernels/variants.py (regenerate the header with
``python -m pnp_kernels.variants --write-header``), and checks the table's own
consistency and its formulas against the references' forms.
"""

import re

import pytest
import torch

from pnp_kernels import variants
from pnp_kernels.reference import _REFERENCE_F
from pnp_kernels.variants import VARIANT_COUNT, VARIANTS


def test_header_is_generated_from_the_table():
    on_disk = variants.HEADER_PATH.read_text()
    assert on_disk == variants.c_header(), (
        "csrc/pnp_variants.h differs from the table: run python -m pnp_kernels.variants --write-header"
    )


def test_header_constants_parse_back_to_the_table():
    text = variants.HEADER_PATH.read_text()
    codes = dict(re.findall(r"constexpr int kVariant_(\w+) = (\d+);", text))
    assert {k: int(v) for k, v in codes.items()} == {v.name: v.code for v in VARIANTS.values()}
    assert f"kVariantCount = {VARIANT_COUNT};" in text
    kinds = dict(re.findall(r"constexpr int kLoss_(\w+) = (\d+);", text))
    assert {k: int(v) for k, v in kinds.items()} == variants.LOSS_KINDS


def test_codes_are_dense_and_names_unique():
    assert sorted(v.code for v in VARIANTS.values()) == list(range(VARIANT_COUNT))
    names = variants.variant_names()
    assert len(names) == len(set(names))


def test_no_source_restates_the_codes():
    """The C++ sources take the codes from the generated header, not from literals."""
    src = variants.HEADER_PATH.parent
    for f in ("pnp_common.h", "pnp_cpu.cpp", "pnp_cuda.cu", "pnp_pipeline.cpp"):
        text = (src / f).read_text()
        assert "pnp_variants.h" in text or f != "pnp_common.h", f
        assert not re.search(r"variant\s*<=\s*4|variant\s*<\s*5", text), f


def test_triton_constants_follow_the_table():
    tk = pytest.importorskip("pnp_kernels.backends.triton_kernels")
    if tk.triton is None:
        pytest.skip("triton does not import here")
    found = {name: getattr(tk, name) for name in dir(tk) if name.startswith("_V_") or name.startswith("_LOSS_")}
    assert found, "triton_kernels defines no table constants"
    table = {f"_V_{v.name.upper()}": v.code for v in VARIANTS.values()}
    table.update({f"_LOSS_{k.upper()}": c for k, c in variants.LOSS_KINDS.items()})
    assert set(table) <= set(found), f"missing Triton constants: {set(table) - set(found)}"
    for name, want in table.items():
        value = getattr(found[name], "value", found[name])
        assert value == want, name
    for name, want in (
        ("_SERIES_MAX", variants.SERIES_MAX),
        ("_LOG1P_TERMS", variants.LOG1P_SERIES_TERMS),
        ("_XLOG_TERMS", variants.XLOG_SERIES_TERMS),
        ("_EXPM1_TERMS", variants.EXPM1_SERIES_TERMS),
    ):
        assert getattr(getattr(tk, name), "value", getattr(tk, name)) == want, name


@pytest.mark.parametrize("name", list(VARIANTS))
def test_formulas_match_the_reference_forms(name):
    v = VARIANTS[name]
    R = torch.tensor([0.0, 1e-9, 1e-3, 0.3, 0.7, 2.0, 50.0], dtype=torch.float64)
    alpha, b = 1.7, 2.5
    f = v.f(R, alpha, b)
    ref = _REFERENCE_F[name](R, alpha, b)
    if name == "Dq":
        ref = 1.0 - ref
    torch.testing.assert_close(f, ref, rtol=1e-9, atol=1e-15)
    Rg = R.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(v.f(Rg, alpha, b).sum(), Rg)
    torch.testing.assert_close(v.df(R, alpha, b), g, rtol=1e-9, atol=1e-12)
