"""pytorch-metric-learning's PNPLoss as an independent oracle (optional test dependency).

PML computes the same B^3 formulation with cosine similarity. Compared in float64
(loss and gradient), on batches of every label shape we support.
"""

import pytest
import torch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

import pnp_kernels  # noqa: E402

from conftest import (  # noqa: E402
    VARIANTS,
    loss_and_grad,
    make_embeddings,
    make_generator,
    make_labels,
    rel_err,
    require_backend,
    valid_queries,
)

TOL = 1e-6
PML_PATTERNS = ("grouped", "unsorted", "unequal")


def _pml(variant, anneal, alpha, b):
    return pml_losses.PNPLoss(b=b, alpha=alpha, anneal=anneal, variant=variant)


def _compare(variant, labels, E, anneal=0.01, alpha=1.0, b=2.0, backend="torch"):
    pml = _pml(variant, anneal, alpha, b)
    p_out, p_grad = loss_and_grad(lambda x: pml(x, labels), E)
    o_out, o_grad = loss_and_grad(
        lambda x: pnp_kernels.pnp_loss(
            x, labels, variant=variant, anneal=anneal, alpha=alpha, b=b, similarity="cosine", backend=backend
        ),
        E,
    )
    assert torch.isfinite(p_out) and torch.isfinite(o_out)
    assert p_out.item() != 0.0
    assert rel_err(o_out, p_out) <= TOL, (o_out.item(), p_out.item())
    assert rel_err(o_grad, p_grad) <= TOL
    return o_out, p_out


@pytest.mark.parametrize("pattern", PML_PATTERNS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_pml(variant, pattern):
    gen = make_generator(2000 + 10 * VARIANTS.index(variant) + PML_PATTERNS.index(pattern))
    B = 32
    labels = make_labels(pattern, B, gen)
    E = make_embeddings(B, 8, "cosine", gen, dtype=torch.float64)
    _compare(variant, labels, E)


@pytest.mark.parametrize(
    "variant,kw",
    [
        ("Dq", dict(alpha=4.0)),
        ("Ib", dict(b=3.0)),
        ("O", dict(anneal=0.05)),
        ("Ds", dict(anneal=0.1)),
        ("Iu", dict(anneal=0.03)),
    ],
)
def test_matches_pml_options(variant, kw):
    gen = make_generator(2100)
    labels = make_labels("unsorted", 24, gen)
    E = make_embeddings(24, 8, "cosine", gen, dtype=torch.float64)
    _compare(variant, labels, E, **kw)


@pytest.mark.parametrize("variant", VARIANTS)
def test_singletons_against_pml(variant):
    """A singleton query has no positive but itself. docs/semantics.md drops it from the mean
    (it is still a negative of every other query). PML 2.x builds its positive mask from the
    anchor-positive pairs, so such a query has N_pos = 0 and is excluded by its `safe_N`
    mask: the two agree and neither is NaN."""
    gen = make_generator(2200 + VARIANTS.index(variant))
    labels = make_labels("singletons", 24, gen)
    assert (torch.unique(labels, return_counts=True)[1] == 1).any()
    E = make_embeddings(24, 8, "cosine", gen, dtype=torch.float64)
    o_out, p_out = _compare(variant, labels, E)
    # removing the singletons changes the loss (they do act as negatives)
    keep = valid_queries(labels)
    r_out = pnp_kernels.pnp_loss(E[keep], labels[keep], variant=variant, backend="torch")
    assert abs(r_out.item() - o_out.item()) > 1e-9


def test_triton_matches_pml_float32():
    """The Triton backend (float32) against PML run in float64 on the same inputs."""
    require_backend("triton")
    gen = make_generator(2300)
    labels = make_labels("unsorted", 24, gen)
    E = make_embeddings(24, 8, "cosine", gen)
    pml = _pml("Dq", 0.05, 1.0, 2.0)
    p_out, p_grad = loss_and_grad(lambda x: pml(x, labels), E.double())
    o_out, o_grad = loss_and_grad(
        lambda x: pnp_kernels.pnp_loss(x, labels, variant="Dq", anneal=0.05, backend="triton"), E
    )
    assert rel_err(o_out, p_out) <= 1e-5
    assert rel_err(o_grad, p_grad) <= 1e-5
