"""CrossBatchMemory: a ring buffer of past embeddings as the reference set.

Over several steps with wraparound, each step's loss and gradient equal the float64
oracle on (batch, cat(batch, memory)) with query_ref_index = arange(B); an empty
memory gives the plain loss; state_dict round trip resumes identically; reset()
empties it. Both loss kinds, every backend.
"""

import pytest
import torch

import pnp_kernels
from pnp_kernels.reference import pnp_loss_reference, smooth_ap_loss_reference

from conftest import rel_err

D = 6


def _losses(kind, backend):
    if kind == "pnp":
        return (
            pnp_kernels.PNPLoss(variant="Dq", alpha=2.0, anneal=0.05, backend=backend),
            lambda *a, **k: pnp_loss_reference(*a, variant="Dq", alpha=2.0, anneal=0.05, **k),
        )
    return (
        pnp_kernels.SmoothAPLoss(temperature=0.05, backend=backend),
        lambda *a, **k: smooth_ap_loss_reference(*a, temperature=0.05, **k),
    )


def _batches(n, B, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype), torch.randint(0, 4, (B,), generator=gen))
        for _ in range(n)
    ]


@pytest.mark.parametrize("kind", ["pnp", "smooth_ap"])
def test_steps_with_wraparound_match_oracle(backend, kind):
    dtype = torch.float32
    B, size = (6, 14) if backend == "triton" else (8, 20)
    loss, ref = _losses(kind, backend)
    xbm = pnp_kernels.CrossBatchMemory(loss, D, size)
    memory_e, memory_y = torch.zeros(0, D, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    for step, (E, y) in enumerate(_batches(5, B, 11, dtype)):  # 5 * B > size: the ring wraps
        x = E.clone().requires_grad_(True)
        out = xbm(x, y)
        out.backward()
        xr = E.double().requires_grad_(True)
        r = ref(xr, y, torch.cat([xr, memory_e]), torch.cat([y, memory_y]), query_ref_index=torch.arange(B))
        r.backward()
        assert rel_err(out, r) <= 1e-5, step
        assert rel_err(x.grad, xr.grad) <= 1e-5, step
        # the oracle's memory: the newest `size` rows; the ring keeps the same rows (in ring order)
        memory_e = torch.cat([memory_e, E.double()])[-size:]
        memory_y = torch.cat([memory_y, y])[-size:]
        assert xbm.filled == min((step + 1) * B, size)
        kept = {tuple(row.tolist()) for row in xbm.embedding_memory[: xbm.filled].double()}
        assert kept == {tuple(row.tolist()) for row in memory_e}


def test_empty_memory_equals_plain_loss(backend):
    loss, _ = _losses("pnp", backend)
    E, y = _batches(1, 8, 12, torch.float32)[0]
    xbm = pnp_kernels.CrossBatchMemory(loss, D, 16)
    a = E.clone().requires_grad_(True)
    out = xbm(a, y)
    out.backward()
    b = E.clone().requires_grad_(True)
    plain = loss(b, y)
    plain.backward()
    assert rel_err(out, plain) <= 1e-6 and rel_err(a.grad, b.grad) <= 1e-6


def test_state_dict_round_trip_resumes_identically():
    batches = _batches(6, 8, 13, torch.float64)
    loss, _ = _losses("pnp", "torch")
    straight = pnp_kernels.CrossBatchMemory(loss, D, 20)
    expected = [straight(E, y).item() for E, y in batches]
    first = pnp_kernels.CrossBatchMemory(loss, D, 20)
    for E, y in batches[:3]:
        first(E, y)
    state = first.state_dict()
    assert {"embedding_memory", "label_memory", "ring_state"} <= set(state)
    resumed = pnp_kernels.CrossBatchMemory(loss, D, 20)
    resumed.load_state_dict(state)
    assert resumed.embedding_memory.dtype == torch.float64
    assert [resumed(E, y).item() for E, y in batches[3:]] == expected[3:]


def test_reset_empties_memory():
    loss, _ = _losses("pnp", "torch")
    xbm = pnp_kernels.CrossBatchMemory(loss, D, 20)
    E, y = _batches(1, 8, 14, torch.float32)[0]
    first = xbm(E, y).item()
    assert xbm.filled == 8
    xbm.reset()
    assert xbm.filled == 0
    assert xbm(E, y).item() == first


def test_batch_larger_than_memory_keeps_the_newest_rows():
    loss, _ = _losses("pnp", "torch")
    xbm = pnp_kernels.CrossBatchMemory(loss, D, 5)
    E, y = _batches(1, 8, 15, torch.float32)[0]
    xbm(E, y)
    assert xbm.filled == 5
    assert {tuple(r.tolist()) for r in xbm.embedding_memory} == {tuple(r.tolist()) for r in E[3:]}
