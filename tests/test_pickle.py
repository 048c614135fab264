"""Every module pickles, deep-copies and round-trips through torch.save / torch.load.

For each module kind (PNPLoss, SmoothAPLoss, RecallAtKLoss, CrossBatchMemory): pickle,
torch.save/torch.load(weights_only=False) of a model that holds the loss, and copy.deepcopy
give a module that computes the same loss (bit for bit) and, for CrossBatchMemory, continues
the same memory. The variant table's rows unpickle as the table's own rows. One subprocess
unpickles every kind in a fresh interpreter (what torch.multiprocessing spawn, Ray and joblib do).
"""

import copy
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch

import pnp_kernels
from pnp_kernels.variants import VARIANTS

from conftest import make_generator

D = 6


def _losses():
    return {
        "pnp": pnp_kernels.PNPLoss(2, 4, 0.05, "Dq", backend="torch"),
        "pnp_ib_dot": pnp_kernels.PNPLoss(b=3.0, variant="Ib", anneal=0.1, similarity="dot", backend="torch"),
        "smooth_ap": pnp_kernels.SmoothAPLoss(0.05, reduction="none", backend="torch"),
        "recall_at_k": pnp_kernels.RecallAtKLoss((1, 2, 4), 0.05, 0.5, backend="torch"),
    }


def _batch(seed, B=12):
    gen = make_generator(seed)
    return torch.randn(B, D, generator=gen, dtype=torch.float64), torch.randint(0, 4, (B,), generator=gen)


class _Model(torch.nn.Module):
    """A model that holds its criterion, as a training script's would."""

    def __init__(self, criterion):
        super().__init__()
        self.encoder = torch.nn.Linear(D, D, dtype=torch.float64)
        self.criterion = criterion

    def forward(self, x, y):
        return self.criterion(self.encoder(x), y)


def _pickled(m):
    return pickle.loads(pickle.dumps(m))


def _torch_saved(m):
    buf = io.BytesIO()
    torch.save(_Model(m), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False).criterion


ROUND_TRIPS = {"pickle": _pickled, "torch.save": _torch_saved, "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("trip", list(ROUND_TRIPS))
@pytest.mark.parametrize("kind", list(_losses()))
def test_loss_module_round_trips(kind, trip):
    loss = _losses()[kind]
    back = ROUND_TRIPS[trip](loss)
    assert type(back) is type(loss) and back is not loss
    assert back.spec == loss.spec
    assert back.spec.variant is loss.spec.variant  # the table's own row, not a copy
    assert repr(back) == repr(loss)
    E, y = _batch(1)
    assert torch.equal(back(E, y), loss(E, y))


@pytest.mark.parametrize("trip", list(ROUND_TRIPS))
@pytest.mark.parametrize("kind", ["pnp", "recall_at_k"])
def test_cross_batch_memory_round_trips_and_continues(kind, trip):
    """After 3 steps (the ring wraps), the copy and the original take the same next 2 steps."""
    xbm = pnp_kernels.CrossBatchMemory(_losses()[kind], D, memory_size=20)
    for step in range(3):
        xbm(*_batch(10 + step))
    back = ROUND_TRIPS[trip](xbm)
    assert (back.queue_idx, back.filled, back.has_been_filled) == (xbm.queue_idx, xbm.filled, xbm.has_been_filled)
    assert back.queue_idx == 16 and back.has_been_filled
    for step in range(3, 5):
        E, y = _batch(10 + step)
        assert torch.equal(back(E, y), xbm(E, y))
        assert torch.equal(back.embedding_memory, xbm.embedding_memory)
        assert torch.equal(back.label_memory, xbm.label_memory)
        assert back.queue_idx == xbm.queue_idx


def test_variant_rows_unpickle_as_the_table_rows():
    for v in VARIANTS.values():
        assert pickle.loads(pickle.dumps(v)) is v
        assert copy.deepcopy(v) is v
        assert pickle.loads(pickle.dumps(v.f)) is v.f and pickle.loads(pickle.dumps(v.df)) is v.df


_CHILD = """
import pickle, sys, torch
modules, E, y, expected = pickle.loads(sys.stdin.buffer.read())
for name, m in modules.items():
    out = m(E, y)
    assert torch.equal(out, expected[name]), (name, out, expected[name])
print("ok", len(modules))
"""


def test_unpickles_in_a_fresh_interpreter():
    modules = _losses()
    xbm = pnp_kernels.CrossBatchMemory(pnp_kernels.SmoothAPLoss(0.05, backend="torch"), D, 20)
    xbm(*_batch(20))
    modules["memory"] = xbm
    E, y = _batch(21)
    expected = {name: copy.deepcopy(m)(E, y) for name, m in modules.items()}
    payload = pickle.dumps((modules, E, y, expected))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _CHILD], input=payload, capture_output=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode().split() == ["ok", str(len(modules))]
