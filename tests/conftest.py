"""Shared helpers of the test suite.

TRITON_INTERPRET must be set before triton is first imported (the Triton backend
decides at import time whether its kernels can run on the CPU), so it is set here,
at the very top, before anything imports torch, triton or pnp_kernels.

PNP_KERNELS_REQUIRE_BACKENDS (comma-separated names, CI sets "torch,ext,triton"):
a listed backend that is unavailable FAILS the tests that need it instead of
skipping them, so a backend that does not build cannot hide behind a skip.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import pnp_kernels  # noqa: E402
from pnp_kernels.reference import pnp_loss_reference  # noqa: E402

from pnp_kernels.backends import BACKEND_NAMES  # noqa: E402
from pnp_kernels.spec import SIMILARITIES  # noqa: E402, F401
from pnp_kernels.variants import VARIANTS as VARIANT_TABLE  # noqa: E402

VARIANTS = tuple(VARIANT_TABLE)
ALL_BACKENDS = ("torch", "triton", "ext")
assert set(ALL_BACKENDS) == set(BACKEND_NAMES)
REQUIRED_BACKENDS = tuple(
    b.strip() for b in os.environ.get("PNP_KERNELS_REQUIRE_BACKENDS", "").split(",") if b.strip()
)

# Label patterns, each given as class sizes (a size-1 class is a singleton) plus
# whether the batch is class-sorted. Labels of unsorted patterns are arbitrary
# integers (negative values, gaps) in random order.
PATTERNS = ("grouped", "unsorted", "unequal", "singletons", "one_class", "all_distinct")


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def class_sizes(pattern: str, B: int):
    """Class sizes of a pattern at batch size B (sum(sizes) == B)."""
    if pattern == "grouped":
        assert B % 4 == 0
        return [4] * (B // 4)
    if pattern == "unsorted":
        # mostly 3-4 per class, as a sampler would give, plus a larger class
        sizes = [6] + [3, 4] * ((B - 6) // 7)
        sizes += [2] * ((B - sum(sizes)) // 2)
        sizes += [1] * (B - sum(sizes))
        return sizes
    if pattern == "unequal":
        # includes a class of more than 16 (several positive chunks in the Triton kernel)
        sizes = [17, 2, 5, 3, 9, 2, 8, 4, 12, 6, 2, 7]
        out, tot = [], 0
        for s in sizes:
            s = min(s, B - tot)
            if s <= 0:
                break
            out.append(s)
            tot += s
        if tot < B:
            out.append(B - tot)
        if out[-1] == 1:  # no singletons in this pattern
            out[-2] += 1
            out.pop()
        return out
    if pattern == "singletons":
        n_single = max(3, B // 6)
        rest = B - n_single
        sizes = [3] * (rest // 3)
        sizes[0] += rest - sum(sizes)
        return sizes + [1] * n_single
    if pattern == "one_class":
        return [B]
    if pattern == "all_distinct":
        return [1] * B
    raise ValueError(pattern)


def make_labels(pattern: str, B: int, gen: torch.Generator) -> torch.Tensor:
    """int64 labels of a pattern. "grouped" is class-sorted with labels 0..C-1; every
    other pattern uses arbitrary ids (negative values, gaps) and a random order."""
    sizes = class_sizes(pattern, B)
    assert sum(sizes) == B, (pattern, sizes)
    if pattern == "grouped":
        ids = torch.arange(len(sizes))
        return torch.repeat_interleave(ids, torch.tensor(sizes))
    # distinct arbitrary ids: negative values and gaps, not in size order
    pool = torch.randperm(1000, generator=gen)[: len(sizes)] * 7 - 3000
    labels = torch.repeat_interleave(pool, torch.tensor(sizes))
    return labels[torch.randperm(B, generator=gen)]


def make_embeddings(B: int, D: int, similarity: str, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Random (never zero) embeddings; for "dot", scaled so similarities are O(1)."""
    E = torch.randn(B, D, generator=gen, dtype=torch.float64)
    if similarity == "dot":
        E = E / math.sqrt(D)
    return E.to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ||a - b|| / ||b||, computed in float64."""
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def max_abs(a: torch.Tensor) -> float:
    return a.detach().abs().max().item()


def segments(labels: torch.Tensor):
    """(sorted labels, perm, lo, hi) of a label vector, computed independently of the package."""
    sorted_labels, perm = torch.sort(labels, stable=True)
    lo = torch.searchsorted(sorted_labels, sorted_labels, side="left").to(torch.int32)
    hi = torch.searchsorted(sorted_labels, sorted_labels, side="right").to(torch.int32)
    return sorted_labels, perm, lo, hi


def loss_and_grad(fn, E: torch.Tensor, weights: torch.Tensor = None):
    """Run fn(leaf) on a fresh leaf copy of E; backward the output (or (w * out).sum())."""
    x = E.detach().clone().requires_grad_(True)
    out = fn(x)
    target = out if weights is None else (out * weights.to(out.dtype)).sum()
    target.backward()
    return out.detach(), x.grad.detach()


def reference_loss_and_grad(E32: torch.Tensor, labels: torch.Tensor, weights=None, **kw):
    """The float64 oracle on the (float32) inputs upcast to float64."""
    return loss_and_grad(lambda x: pnp_loss_reference(x, labels, **kw), E32.to(torch.float64), weights)


def assert_close_to_reference(out, grad, ref_out, ref_grad, tol):
    """Norm-wise relative error <= tol for loss and gradient; exact zeros where the reference is 0."""
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert out.shape == ref_out.shape
    assert grad.shape == ref_grad.shape
    if torch.linalg.vector_norm(ref_out.double()) == 0:
        assert max_abs(out) <= 1e-12, f"loss should be 0, got {out}"
    else:
        e = rel_err(out, ref_out)
        assert e <= tol, f"loss rel err {e:.3g} > {tol:g} (got {out}, ref {ref_out})"
    if torch.linalg.vector_norm(ref_grad.double()) == 0:
        assert max_abs(grad) <= 1e-12, f"gradient should be 0, max |g| = {max_abs(grad):.3g}"
    else:
        e = rel_err(grad, ref_grad)
        assert e <= tol, f"gradient rel err {e:.3g} > {tol:g}"


def require_backend(name: str):
    """Skip when backend ``name`` is unavailable here, or fail when PNP_KERNELS_REQUIRE_BACKENDS lists it."""
    if name not in pnp_kernels.available_backends():
        reason = pnp_kernels.backend_status()[name]["reason"]
        msg = f"backend {name!r} unavailable here: {reason}"
        if name in REQUIRED_BACKENDS:
            pytest.fail(msg + " (required by PNP_KERNELS_REQUIRE_BACKENDS)")
        pytest.skip(msg)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    require_backend(request.param)
    return request.param
