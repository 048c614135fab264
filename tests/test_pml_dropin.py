"""Drop-in for pytorch-metric-learning (PML), as its own tests and documentation use it.

Ours is constructed exactly as PML's tests and docs construct PML's (positional and
keyword) and compared with PML's objects on the same inputs where PML is right:

* PNPLoss(b, alpha, anneal, variant): every variant of PNPLoss.VARIANTS, float32 and
  float64, loss and gradient; an unknown variant raises ValueError.
* SmoothAPLoss with PML's call ``loss.forward(x, labels, None, x, labels)``: equal where
  PML is right (square class-sorted batches) and exact where PML is not (its class/sample
  axis swap on non-square batches: a test shows the difference).
* CrossBatchMemory(loss, embedding_size, memory_size): queue_idx, has_been_filled,
  embedding_memory and label_memory equal PML's after every step of a run that wraps the
  ring, with and without enqueue_mask, and after reset_queue(). With enqueue_mask the loss
  equals the float64 oracle of the queries against PML's own memory after the enqueue.
* The forward signature (labels, indices_tuple, ref_emb, ref_labels), miners refused,
  PNP with ref_emb and in a memory (PML refuses both), the float32 loss of half input, and
  a checkpoint in the format saved before (the same three buffers) loads and continues.
"""

import pytest
import torch

import pnp_kernels
from pnp_kernels.reference import pnp_loss_reference, recall_at_k_loss_reference, smooth_ap_loss_reference

from conftest import loss_and_grad, make_generator, rel_err

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """rel_err, and 0.0 when both are exactly zero (no valid query)."""
    if not torch.any(a != 0) and not torch.any(b != 0):
        return 0.0
    return rel_err(a, b)


def _sorted_classes(n_classes: int, per_class: int) -> torch.Tensor:
    return torch.arange(n_classes).repeat_interleave(per_class)


# ---------------------------------------------------------------------------
# PNPLoss
# ---------------------------------------------------------------------------


def test_pnp_variants_and_defaults_are_pml_s():
    assert pnp_kernels.PNPLoss.VARIANTS == pml_losses.PNPLoss.VARIANTS == ["Ds", "Dq", "Iu", "Ib", "O"]
    ours, theirs = pnp_kernels.PNPLoss(), pml_losses.PNPLoss()
    assert (ours.b, ours.alpha, ours.anneal, ours.variant) == (theirs.b, theirs.alpha, theirs.anneal, theirs.variant)
    positional = pnp_kernels.PNPLoss(2, 4, 0.01, "Dq")
    keyword = pnp_kernels.PNPLoss(b=2, alpha=4, anneal=0.01, variant="Dq")
    assert positional.spec == keyword.spec
    assert (positional.b, positional.alpha, positional.anneal, positional.variant) == (2, 4, 0.01, "Dq")
    for cls in (pnp_kernels.PNPLoss, pml_losses.PNPLoss):
        with pytest.raises(ValueError):
            cls(2, 4, 0.01, "PNP")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", pml_losses.PNPLoss.VARIANTS)
def test_pnp_positional_matches_pml(variant, dtype):
    """PML's test_pnp_loss construction, PNPLoss(b, alpha, anneal, variant), on a smaller batch of
    its layout (classes of 6, class-sorted): ours and PML's give the same loss and gradient."""
    gen = make_generator(9100 + pml_losses.PNPLoss.VARIANTS.index(variant))
    b, alpha, anneal = 2, 4, 0.01
    labels = _sorted_classes(8, 6)
    E = torch.randn(48, 16, generator=gen, dtype=torch.float64).to(dtype)
    ours, g_ours = loss_and_grad(lambda x: pnp_kernels.PNPLoss(b, alpha, anneal, variant)(x, labels), E)
    theirs, g_theirs = loss_and_grad(lambda x: pml_losses.PNPLoss(b, alpha, anneal, variant)(x, labels), E)
    assert ours.dtype == theirs.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    assert rel_err(ours, theirs) <= tol, (ours.item(), theirs.item())
    assert rel_err(g_ours, g_theirs) <= 10 * tol


# ---------------------------------------------------------------------------
# SmoothAPLoss
# ---------------------------------------------------------------------------


def test_smooth_ap_constructed_as_pml():
    assert pnp_kernels.SmoothAPLoss().temperature == pml_losses.SmoothAPLoss().temperature == 0.01
    assert pnp_kernels.SmoothAPLoss(0.05).spec == pnp_kernels.SmoothAPLoss(temperature=0.05).spec


@pytest.mark.parametrize("n_classes,per_class", [(4, 4), (5, 3), (3, 5)])
def test_smooth_ap_with_pml_s_call(n_classes, per_class):
    """PML's test calls loss.forward(x, labels, None, x, labels), the batch as its own reference
    set: ours is then the plain batch loss, equal to the float64 oracle. PML agrees on square
    batches (classes of n for n classes) and deviates on the others (it groups C classes of m
    as m classes of C)."""
    gen = make_generator(9200 + 10 * n_classes + per_class)
    labels = _sorted_classes(n_classes, per_class)
    worst = 0.0
    for _ in range(3):
        E = torch.randn(n_classes * per_class, 16, generator=gen, dtype=torch.float64)
        ours = pnp_kernels.SmoothAPLoss(0.1)
        value = ours.forward(E, labels, None, E, labels)
        assert torch.equal(value, ours(E, labels))
        exact = smooth_ap_loss_reference(E, labels, temperature=0.1)
        assert abs(value.item() - exact.item()) <= 1e-12
        theirs = pml_losses.SmoothAPLoss(temperature=0.1).forward(E, labels, None, E, labels)
        worst = max(worst, abs(theirs.item() - exact.item()))
    if n_classes == per_class:
        assert worst <= 1e-6
    else:
        assert worst > 1e-2, f"PML agreed with the exact loss on a non-square batch (deviation {worst:.2e})"


# ---------------------------------------------------------------------------
# forward signature
# ---------------------------------------------------------------------------

MODULES = {
    "pnp": (lambda: pnp_kernels.PNPLoss(2, 4, 0.05, "Dq", backend="torch"), pnp_kernels.pnp_loss),
    "smooth_ap": (lambda: pnp_kernels.SmoothAPLoss(0.05, backend="torch"), pnp_kernels.smooth_ap_loss),
    "recall_at_k": (lambda: pnp_kernels.RecallAtKLoss((1, 2), 0.05, backend="torch"), pnp_kernels.recall_at_k_loss),
}
FUNCTIONAL_KW = {
    "pnp": dict(b=2, alpha=4, anneal=0.05, variant="Dq"),
    "smooth_ap": dict(temperature=0.05),
    "recall_at_k": dict(k=(1, 2), temperature=0.05),
}


@pytest.mark.parametrize("kind", list(MODULES))
def test_forward_takes_pml_s_arguments(kind):
    make, functional = MODULES[kind]
    gen = make_generator(9300)
    E, y = torch.randn(10, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (10,), generator=gen)
    R, ry = torch.randn(7, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (7,), generator=gen)
    loss = make()
    want = functional(E, y, R, ry, backend="torch", **FUNCTIONAL_KW[kind])
    assert torch.equal(loss(E, y, None, R, ry), want)
    assert torch.equal(loss(E, y, ref_emb=R, ref_labels=ry), want)
    index = torch.full((10,), -1)
    assert torch.equal(
        loss(E, y, None, R, ry, query_ref_index=index),
        functional(E, y, R, ry, query_ref_index=index, backend="torch", **FUNCTIONAL_KW[kind]),
    )
    with pytest.raises(ValueError, match="labels"):
        loss(E)
    with pytest.raises(ValueError, match="indices_tuple.*every pair"):
        loss(E, y, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))


def test_pnp_with_ref_emb_and_in_a_memory_where_pml_refuses():
    gen = make_generator(9400)
    E, y = torch.randn(10, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (10,), generator=gen)
    R, ry = torch.randn(7, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (7,), generator=gen)
    with pytest.raises(ValueError):
        pml_losses.PNPLoss()(E, y, None, R, ry)
    with pytest.raises(Exception, match="not supported for PNPLoss"):
        pml_losses.CrossBatchMemory(pml_losses.PNPLoss(), 6, memory_size=20)
    ours = pnp_kernels.PNPLoss(backend="torch")(E, y, None, R, ry)
    assert rel_err(ours, pnp_loss_reference(E, y, R, ry)) <= 1e-12
    xbm = pnp_kernels.CrossBatchMemory(pnp_kernels.PNPLoss(backend="torch"), 6, memory_size=20)
    assert torch.isfinite(xbm(E, y))


def test_half_input_gives_a_float32_loss():
    gen = make_generator(9500)
    E, y = torch.randn(8, 6, generator=gen).half(), torch.arange(4).repeat(2)
    assert pnp_kernels.PNPLoss(backend="torch")(E, y).dtype == torch.float32


# ---------------------------------------------------------------------------
# CrossBatchMemory
# ---------------------------------------------------------------------------

D, SIZE, B = 8, 21, 6


def test_cross_batch_memory_constructed_as_pml():
    loss = pnp_kernels.PNPLoss(backend="torch")
    assert (
        pnp_kernels.CrossBatchMemory(loss, D).memory_size
        == 1024
        == pml_losses.CrossBatchMemory(pml_losses.ContrastiveLoss(), D).memory_size
    )
    xbm = pnp_kernels.CrossBatchMemory(loss=loss, embedding_size=D, memory_size=SIZE, miner=None)
    assert (xbm.queue_idx, xbm.has_been_filled, tuple(xbm.embedding_memory.shape)) == (0, False, (SIZE, D))
    with pytest.raises(ValueError, match="miner.*every pair"):
        pnp_kernels.CrossBatchMemory(loss, D, SIZE, miner=lambda *a: None)
    with pytest.raises(ValueError, match="indices_tuple"):
        xbm(torch.randn(B, D), torch.arange(B), (torch.tensor([0]),) * 3)
    with pytest.raises(ValueError, match="labels"):
        xbm(torch.randn(B, D))
    with pytest.raises(TypeError, match="enqueue_mask"):
        xbm(torch.randn(B, D), torch.arange(B), enqueue_mask=torch.ones(B, dtype=torch.int64))
    with pytest.raises(ValueError, match="enqueue_mask"):
        xbm(torch.randn(B, D), torch.arange(B), enqueue_mask=torch.ones(B + 1, dtype=torch.bool))


def _assert_same_state(ours, theirs):
    assert isinstance(ours.queue_idx, int) and ours.queue_idx == theirs.queue_idx
    assert ours.has_been_filled == theirs.has_been_filled
    assert torch.equal(ours.embedding_memory, theirs.embedding_memory)
    assert torch.equal(ours.label_memory, theirs.label_memory.to(torch.int64))


def _pml_memory(theirs):
    """PML's reference set after its enqueue: the filled rows of its memory."""
    if theirs.has_been_filled:
        return theirs.embedding_memory, theirs.label_memory
    return theirs.embedding_memory[: theirs.queue_idx], theirs.label_memory[: theirs.queue_idx]


def _mask(step):
    """1 to 4 enqueued rows (keys) per step, at varying positions; the rest are queries."""
    mask = torch.zeros(B, dtype=torch.bool)
    mask[torch.randperm(B, generator=make_generator(step))[: step % 4 + 1]] = True
    return mask


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "enqueue_mask"])
def test_queue_matches_pml_over_steps_with_wraparound(masked):
    """12 steps of 6 rows through a 21-row ring (it wraps several times): the same queue state
    as PML after every step. With enqueue_mask, the loss and its gradient equal the float64
    oracle of the queries ranked against PML's memory after the enqueue (MoCo), and the
    enqueued rows get no gradient."""
    gen = make_generator(9600 + masked)
    theirs = pml_losses.CrossBatchMemory(pml_losses.ContrastiveLoss(), D, memory_size=SIZE)
    ours = pnp_kernels.CrossBatchMemory(pnp_kernels.PNPLoss(variant="Ds", anneal=0.05, backend="torch"), D, SIZE)
    nonzero = 0
    for step in range(12):
        E = torch.randn(B, D, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (B,), generator=gen)
        mask = _mask(step) if masked else None
        assert ours.queue_idx == theirs.queue_idx == (step * B) % SIZE or masked
        x = E.clone().requires_grad_(True)
        out = ours(x, y, enqueue_mask=mask)
        theirs(E, y, enqueue_mask=mask)
        _assert_same_state(ours, theirs)
        if masked:
            out.backward()
            mem, mem_y = _pml_memory(theirs)
            q = E[~mask].clone().requires_grad_(True)
            ref = pnp_loss_reference(q, y[~mask], mem, mem_y, variant="Ds", anneal=0.05)
            ref.backward()
            assert _err(out, ref) <= 1e-12
            assert _err(x.grad[~mask], q.grad) <= 1e-10
            assert torch.count_nonzero(x.grad[mask]) == 0
            nonzero += bool(ref != 0)
    assert ours.has_been_filled
    assert not masked or nonzero >= 8


def test_reset_queue_matches_pml():
    gen = make_generator(9700)
    theirs = pml_losses.CrossBatchMemory(pml_losses.ContrastiveLoss(), D, memory_size=SIZE)
    ours = pnp_kernels.CrossBatchMemory(pnp_kernels.PNPLoss(backend="torch"), D, SIZE)
    batches = [(torch.randn(B, D, generator=gen), torch.randint(0, 3, (B,), generator=gen)) for _ in range(5)]
    for E, y in batches[:4]:
        ours(E, y)
        theirs(E, y)
    assert ours.has_been_filled and ours.queue_idx == 3
    ours.reset_queue()
    theirs.reset_queue()
    _assert_same_state(ours, theirs)
    assert ours.filled == 0 and not ours.has_been_filled
    E, y = batches[4]
    assert torch.equal(ours(E, y), pnp_kernels.PNPLoss(backend="torch")(E, y))  # an empty memory: the plain loss
    theirs(E, y)
    _assert_same_state(ours, theirs)


def test_recall_at_k_in_a_memory_with_enqueue_mask():
    gen = make_generator(9800)
    xbm = pnp_kernels.CrossBatchMemory(pnp_kernels.RecallAtKLoss((1, 2, 4), 0.05, backend="torch"), D, SIZE)
    keys = torch.zeros(2 * B, dtype=torch.bool)
    keys[B:] = True  # MoCo layout: queries, then their keys
    mem_e, mem_y = torch.zeros(0, D, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    for _ in range(4):
        y = torch.randint(0, 3, (B,), generator=gen).repeat(2)
        E = torch.randn(2 * B, D, generator=gen, dtype=torch.float64)
        out, grad = loss_and_grad(lambda x: xbm(x, y, enqueue_mask=keys), E)
        mem_e, mem_y = torch.cat([mem_e, E[B:]])[-SIZE:], torch.cat([mem_y, y[B:]])[-SIZE:]
        ref, ref_grad = loss_and_grad(
            lambda q: recall_at_k_loss_reference(q, y[:B], mem_e, mem_y, k=(1, 2, 4), temperature=0.05), E[:B]
        )
        assert _err(out, ref) <= 1e-12 and _err(grad[:B], ref_grad) <= 1e-10
        assert torch.count_nonzero(grad[B:]) == 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_enqueue_mask_without_queries_or_memory_gives_zero(reduction):
    xbm = pnp_kernels.CrossBatchMemory(pnp_kernels.PNPLoss(reduction=reduction, backend="torch"), D, SIZE)
    E, y = torch.randn(B, D, requires_grad=True), torch.arange(B) % 2
    out = xbm(E, y, enqueue_mask=torch.zeros(B, dtype=torch.bool))  # queries, but an empty memory
    assert out.shape == ((B,) if reduction == "none" else ()) and torch.count_nonzero(out) == 0
    out.sum().backward()
    assert xbm.filled == 0 and torch.count_nonzero(E.grad) == 0
    out = xbm(E, y, enqueue_mask=torch.ones(B, dtype=torch.bool))  # keys only, no query
    assert out.shape == ((0,) if reduction == "none" else ()) and out.dtype == torch.float32
    assert xbm.filled == B and xbm.queue_idx == B


def test_checkpoint_in_the_earlier_format_loads_and_continues():
    """The state_dict holds the same three buffers as before (embedding_memory, label_memory,
    ring_state = [next row, rows filled]); one written with plain tensors loads, shows PML's
    state, and the next step equals that of the run that produced it."""
    gen = make_generator(9900)
    batches = [(torch.randn(8, D, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))]
    batches += [(torch.randn(8, D, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))]
    batches += [(torch.randn(8, D, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))]
    run = pnp_kernels.CrossBatchMemory(pnp_kernels.PNPLoss(backend="torch"), D, 20)
    for E, y in batches[:2]:
        run(E, y)
    assert set(run.state_dict()) == {"embedding_memory", "label_memory", "ring_state"}
    memory = torch.zeros(20, D, dtype=torch.float64)
    memory[:16] = torch.cat([batches[0][0], batches[1][0]])
    labels = torch.zeros(20, dtype=torch.int64)
    labels[:16] = torch.cat([batches[0][1], batches[1][1]])
    old = {"embedding_memory": memory, "label_memory": labels, "ring_state": torch.tensor([16, 16])}
    resumed = pnp_kernels.CrossBatchMemory(pnp_kernels.PNPLoss(backend="torch"), D, 20)
    resumed.load_state_dict(old)
    assert (resumed.queue_idx, resumed.filled, resumed.has_been_filled) == (16, 16, False)
    E, y = batches[2]
    assert torch.equal(resumed(E, y), run(E, y))
    assert (resumed.queue_idx, resumed.filled, resumed.has_been_filled) == (4, 20, True)
    assert torch.equal(resumed.embedding_memory, run.embedding_memory)
