"""torch.compile: pnp_loss traces without a graph break and matches eager.

fullgraph=True turns any graph break into an error, so a passing test proves that
dynamo traces the whole call (pnp_loss dispatches to the torch.library custom ops
``pnp_kernels::pnp_loss_fwd`` / ``pnp_loss_bwd`` while compiling). Most tests use the
cheap "eager" / "aot_eager" compiler backends (dynamo tracing, and for aot_eager also
AOTAutograd's joint forward/backward graph); one function and one training step go
through the real "inductor". Results must equal eager (rtol 1e-6).
Each test starts with torch._dynamo.reset() so no cached graph hides a break.
"""

import pytest
import torch

from pnp_kernels import pnp_loss
from pnp_kernels.reference import pnp_loss_reference

from conftest import (
    ALL_BACKENDS,
    VARIANTS,
    cyclic_labels,
    loss_and_grad,
    make_generator,
    make_linear,
    rel_err,
    require_backend,
)

RTOL, ATOL = 1e-6, 1e-9


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _data(seed, B=24, D=8, n_classes=5):
    gen = make_generator(seed)
    E = torch.randn(B, D, generator=gen)
    labels = cyclic_labels(B, n_classes, gen, step=3, offset=-4)
    labels[0] = 1000  # a singleton query (dropped from the mean)
    w = torch.rand(B, generator=gen) + 0.5
    return E, labels, w


def _loss_and_grad(fn, E, labels, weights=None):
    """conftest.loss_and_grad of fn(x, labels): fn is a two-argument (compiled) function."""
    return loss_and_grad(lambda x: fn(x, labels), E, weights)


def _assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def _assert_compiled_equals_eager(compiled, f, E, labels, weights=None):
    """Loss and gradient of compiled(x, labels) equal those of f(x, labels); returns (out_c, grad_c, grad_e)."""
    out_c, grad_c = _loss_and_grad(compiled, E, labels, weights)
    out_e, grad_e = _loss_and_grad(f, E, labels, weights)
    _assert_same(out_c, out_e)
    _assert_same(grad_c, grad_e)
    return out_c, grad_c, grad_e


@pytest.mark.parametrize("backend", ("auto",) + ALL_BACKENDS)
def test_fullgraph_no_graph_break_matches_eager(backend):
    """torch.compile(fullgraph=True, backend="eager") of a function calling pnp_loss with each
    backend argument: no graph break (it would raise), loss and gradient equal to eager.
    backend="auto" resolves to the torch backend on CPU; "triton" runs under the interpreter."""
    if backend != "auto":
        require_backend(backend)
    E, labels, _ = _data(1, B=16 if backend == "triton" else 24)

    def f(x, y):
        return pnp_loss(x, y, variant="Dq", anneal=0.05, backend=backend)

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    _, _, grad_e = _assert_compiled_equals_eager(compiled, f, E, labels)
    assert torch.linalg.vector_norm(grad_e) > 0


def test_inductor_fullgraph_matches_eager_and_reference():
    """The real inductor compiler, fullgraph, on a function with ops around pnp_loss (scaling, a
    second term): loss and gradient equal eager and match the float64 reference."""
    E, labels, _ = _data(2)

    def f(x, y):
        return pnp_loss(2.0 * x, y, variant="Ds", anneal=0.05) + 0.5 * pnp_loss(x, y, variant="O", anneal=0.1)

    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    out_c, grad_c, _ = _assert_compiled_equals_eager(compiled, f, E, labels)

    def ref(x, y):
        return pnp_loss_reference(2.0 * x, y, variant="Ds", anneal=0.05) + 0.5 * pnp_loss_reference(
            x, y, variant="O", anneal=0.1
        )

    out_r, grad_r = _loss_and_grad(ref, E.double(), labels)
    torch.testing.assert_close(out_c.double(), out_r, rtol=1e-5, atol=0)
    assert rel_err(grad_c, grad_r) <= 1e-5


def test_compiled_training_step_matches_eager():
    """Linear -> pnp_loss -> backward -> SGD step, three steps; the forward compiled with
    inductor and fullgraph=True. Losses and parameters after every step equal the eager run."""
    gen = make_generator(3)
    B, D_in = 24, 12
    batches = [(torch.randn(B, D_in, generator=gen), torch.randperm(B, generator=gen) % 6) for _ in range(3)]

    def run(compile_forward):
        model = make_linear(12, 8, make_generator(4))
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)

        def forward(x, y):
            return pnp_loss(model(x), y, variant="Dq", anneal=0.05)

        fwd = torch.compile(forward, backend="inductor", fullgraph=True) if compile_forward else forward
        losses, params = [], []
        for x, y in batches:
            opt.zero_grad()
            loss = fwd(x, y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            params.append([p.detach().clone() for p in model.parameters()])
        return losses, params

    losses_c, params_c = run(True)
    losses_e, params_e = run(False)
    for lc, le in zip(losses_c, losses_e):
        _assert_same(lc, le)
    for pc, pe in zip(params_c, params_e):
        for a, b in zip(pc, pe):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the step did something: the parameters moved
    assert not torch.equal(params_e[0][0], params_e[-1][0])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_and_reductions_through_aot_eager(variant, reduction):
    """Every variant and both reductions through torch.compile(backend="aot_eager",
    fullgraph=True): AOTAutograd traces the custom forward and backward ops; loss (or per-query
    vector, backpropagated with random weights) and gradient equal eager."""
    E, labels, w = _data(10 + VARIANTS.index(variant), B=20)
    kw = dict(variant=variant, anneal=0.05, alpha=2.0, b=3.0, reduction=reduction)
    weights = w if reduction == "none" else None

    def f(x, y):
        return pnp_loss(x, y, **kw)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out_c, _, _ = _assert_compiled_equals_eager(compiled, f, E, labels, weights)
    if reduction == "none":
        assert out_c.shape == (E.shape[0],)
        assert out_c[0].item() == 0.0  # the singleton query


def test_compiled_inference_without_grad_and_new_batch_size():
    """Compiled (aot_eager, fullgraph) on embeddings that do not require grad and under
    torch.no_grad, at two batch sizes (the second recompiles with automatic dynamic shapes):
    equal to eager, the result does not require grad."""

    def f(x, y):
        return pnp_loss(x, y, variant="Iu", anneal=0.05, similarity="dot")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for B in (16, 24):
        E, labels, _ = _data(20 + B, B=B)
        out_c = compiled(E, labels)
        assert not out_c.requires_grad
        _assert_same(out_c, f(E, labels))
        with torch.no_grad():
            x = E.clone().requires_grad_(True)
            out_ng = compiled(x, labels)
        assert not out_ng.requires_grad
        _assert_same(out_ng, out_c)


def test_dynamic_true_fullgraph_matches_eager():
    """torch.compile(dynamic=True, fullgraph=True): dynamo then treats Python floats (anneal,
    alpha, b) as symbolic, so argument validation must not need concrete floats; two batch sizes
    share one graph and equal eager, gradient included."""

    def f(x, y):
        return pnp_loss(x, y, variant="Ib", anneal=0.05, b=3.0)

    compiled = torch.compile(f, backend="eager", fullgraph=True, dynamic=True)
    for B in (16, 24):
        E, labels, _ = _data(40 + B, B=B)
        _assert_compiled_equals_eager(compiled, f, E, labels)
