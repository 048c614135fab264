"""torch.autograd.gradcheck of pnp_loss(backend="torch") in float64.

anneal 0.1 keeps the sigmoids away from saturation, so finite differences are
informative; labels include an unequal split and a singleton (a dropped query that
is still a negative of the others).
"""

import pytest
import torch

import pnp_kernels

from conftest import GRADCHECK_TOLS, SIMILARITIES, VARIANTS, make_embeddings, make_generator


def _inputs(similarity, seed):
    gen = make_generator(seed)
    E = make_embeddings(10, 4, similarity, gen, dtype=torch.float64)
    labels = torch.tensor([5, -2, 5, 7, -2, 5, 7, 30, -2, 7])[torch.randperm(10, generator=gen)]
    return E.requires_grad_(True), labels


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_torch_backend(variant, similarity, reduction):
    E, labels = _inputs(similarity, 40 + VARIANTS.index(variant))
    kw = dict(
        variant=variant,
        similarity=similarity,
        reduction=reduction,
        anneal=0.1,
        alpha=2.0 if variant == "Dq" else 1.0,
        b=3.0,
        backend="torch",
    )

    def fn(x):
        return pnp_kernels.pnp_loss(x, labels, **kw)

    out = fn(E)
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert torch.autograd.gradcheck(fn, (E,), **GRADCHECK_TOLS)


@pytest.mark.parametrize("variant", ["O", "Dq"])
def test_gradcheck_module(variant):
    E, labels = _inputs("cosine", 60)
    mod = pnp_kernels.PNPLoss(variant=variant, anneal=0.1, backend="torch")
    assert torch.autograd.gradcheck(lambda x: mod(x, labels), (E,), **GRADCHECK_TOLS)
