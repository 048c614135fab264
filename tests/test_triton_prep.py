"""The Triton backend's two prep paths: torch.sort + binary search (default) and the
fused counting sort (opt-in through COUNT_SORT_MAX_B) must produce the same thing."""

import pytest
import torch

from pnp_kernels import pnp_loss
from pnp_kernels.reference import pnp_loss_reference
from pnp_kernels.spec import SquarePrep

from conftest import make_generator

pytestmark = pytest.mark.needs_backend("triton")


def _labels(pattern, n, gen):
    if pattern == "unsorted":
        return torch.randint(-5, 6, (n,), generator=gen) * 7
    if pattern == "distinct":
        return torch.randperm(n, generator=gen) - 3
    if pattern == "one_class":
        return torch.full((n,), -2)
    sizes = [1, 2, 5, 9, 17]
    y = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])[:n]
    return y[torch.randperm(y.numel(), generator=gen)]


@pytest.mark.parametrize("pattern", ["unsorted", "distinct", "one_class", "unequal"])
@pytest.mark.parametrize("cosine", [True, False])
def test_count_sort_prep_equals_sort_prep(monkeypatch, pattern, cosine):
    from pnp_kernels.backends import triton_kernels as tb

    gen = make_generator(11)
    y = _labels(pattern, 34, gen)
    E = torch.randn(y.numel(), 5, generator=gen).half()  # also exercises the dtype conversion
    monkeypatch.setattr(tb, "COUNT_SORT_MAX_B", 0)
    a = SquarePrep(*tb.prepare(E, y, cosine))
    monkeypatch.setattr(tb, "COUNT_SORT_MAX_B", 4096)
    b = SquarePrep(*tb.prepare(E, y, cosine))
    assert torch.equal(a.perm, b.perm)  # both are the stable sort
    assert torch.equal(a.perm, torch.sort(y, stable=True).indices)
    assert torch.equal(a.lo, b.lo) and torch.equal(a.hi, b.hi)
    assert torch.equal(a.Xs, b.Xs) and torch.equal(a.denom, b.denom)


@pytest.mark.parametrize("variant", ["O", "Dq", "Ib"])
def test_count_sort_path_loss_and_grad_match_reference(monkeypatch, variant):
    from pnp_kernels.backends import triton_kernels as tb

    monkeypatch.setattr(tb, "COUNT_SORT_MAX_B", 4096)
    gen = make_generator(12)
    y = _labels("unequal", 30, gen)
    E = torch.randn(30, 6, generator=gen, requires_grad=True)
    loss = pnp_loss(E, y, variant=variant, backend="triton")
    (g,) = torch.autograd.grad(loss, E)
    E64 = E.detach().double().requires_grad_()
    ref = pnp_loss_reference(E64, y, variant=variant)
    (g_ref,) = torch.autograd.grad(ref, E64)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert (g.double() - g_ref).norm() <= 1e-5 * g_ref.norm()
