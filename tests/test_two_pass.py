"""pnp_kernels.two_pass_step against a direct backward (float64, 1e-10).

Checked: the parameter gradients and the loss equal criterion(model(inputs), labels)
.backward() for every loss of the package and CrossBatchMemory over steps, with a chunk
size that does not divide B and with tuple inputs; gradients accumulate into .grad; with
dropout, the step equals the chunked forward with autograd from the same RNG state and
leaves the RNG where it does, and without the RNG restore it does not (negative control);
the bytes held for backward (saved_tensors_hooks) are one chunk's activations, not the
batch's; bad inputs raise a ValueError naming the argument; under DistributedDataParallel
(gloo, 2 processes, unequal local batches and numbers of chunks, distributed=True) the
gradients equal one process's and are all-reduced once per step.
"""

import os
import socket
import weakref

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import pnp_kernels
import pnp_kernels.two_pass as two_pass_module

import two_pass_workers as W_

TOL = 1e-10
D_IN, HIDDEN, D = 5, 12, 6
B, CHUNK = 23, 5  # 5 does not divide 23: chunks of 5, 5, 5, 5, 3


class MLP(nn.Module):
    def __init__(self, dropout=0.0, d_in=D_IN, hidden=HIDDEN, d=D):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, d))

    def forward(self, x):
        return self.net(x)


class TwoInputs(nn.Module):
    """model(x, z): the tuple-input form, each tensor split along dim 0."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D_IN, D), nn.Linear(3, D)

    def forward(self, x, z):
        return torch.tanh(self.a(x)) + self.b(z)


def make_model(cls=MLP, seed=3, **kw):
    torch.manual_seed(seed)
    return cls(**kw).double()


def make_batch(seed=0, n=B):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=gen, dtype=torch.float64), torch.randint(0, 4, (n,), generator=gen)


CRITERIA = {
    "pnp_dq": lambda: pnp_kernels.PNPLoss(variant="Dq", alpha=2.0, anneal=0.05, backend="torch"),
    "pnp_o_dot": lambda: pnp_kernels.PNPLoss(variant="O", anneal=0.1, similarity="dot", backend="torch"),
    "smooth_ap": lambda: pnp_kernels.SmoothAPLoss(temperature=0.05, backend="torch"),
    "recall_at_k": lambda: pnp_kernels.RecallAtKLoss(k=(1, 2, 4), temperature=0.05, backend="torch"),
    "recall_at_k_functional": lambda: (
        lambda e, y: pnp_kernels.recall_at_k_loss(e, y, k=2, temperature=0.05, k_temperature=0.5, backend="torch")
    ),
    "memory_pnp": lambda: pnp_kernels.CrossBatchMemory(
        pnp_kernels.PNPLoss(variant="Iu", anneal=0.05, backend="torch"), D, 30
    ),
    "memory_smooth_ap": lambda: pnp_kernels.CrossBatchMemory(
        pnp_kernels.SmoothAPLoss(temperature=0.05, backend="torch"), D, 30
    ),
}


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def zero(model):
    for p in model.parameters():
        p.grad = None


def assert_grads_equal(got, want, tol=TOL):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        err = (g - w).abs().max().item()
        assert err <= tol * max(1.0, w.abs().max().item()), err


def max_diff(got, want):
    return max((g - w).abs().max().item() for g, w in zip(got, want))


# ----------------------------------------------------------------------------- equality with a direct backward
@pytest.mark.parametrize("name", list(CRITERIA))
def test_equals_direct_backward(name):
    """Three steps (the memory fills and wraps around), chunk size 5 on B = 23."""
    model = make_model()
    direct, chunked = CRITERIA[name](), CRITERIA[name]()
    for step in range(3):
        X, y = make_batch(step)
        zero(model)
        want_loss = direct(model(X), y)
        want_loss.backward()
        want = grads(model)
        zero(model)
        loss = pnp_kernels.two_pass_step(model, X, y, chunked, chunk_size=CHUNK)
        assert not loss.requires_grad and loss.dim() == 0
        assert abs(loss.item() - want_loss.item()) <= TOL, (step, loss.item(), want_loss.item())
        assert max(g.abs().max().item() for g in want) > 1e-3  # a gradient worth comparing
        assert_grads_equal(grads(model), want)
    if isinstance(direct, pnp_kernels.CrossBatchMemory):  # enqueued once per step, as a plain step does
        assert chunked.filled == direct.filled == 30
        for k, v in direct.state_dict().items():  # the memory to float rounding (chunked matmuls)
            assert (chunked.state_dict()[k] - v).abs().max().item() <= TOL, k


@pytest.mark.parametrize("chunk_size", [1, 7, 23, 1000])
def test_chunk_sizes_and_tuple_inputs(chunk_size):
    model = make_model(TwoInputs)
    X, y = make_batch(5)
    Z = torch.randn(B, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    criterion = CRITERIA["smooth_ap"]()
    want_loss = criterion(model(X, Z), y)
    want_loss.backward()
    want = grads(model)
    zero(model)
    loss = pnp_kernels.two_pass_step(model, (X, Z), y, criterion, chunk_size=chunk_size)
    assert abs(loss.item() - want_loss.item()) <= TOL
    assert_grads_equal(grads(model), want)


def test_gradients_accumulate_into_grad():
    model = make_model()
    X, y = make_batch(1)
    criterion = CRITERIA["pnp_dq"]()
    criterion(model(X), y).backward()
    once = grads(model)
    pnp_kernels.two_pass_step(model, X, y, criterion, chunk_size=CHUNK)  # on top of the direct one
    assert_grads_equal(grads(model), [2 * g for g in once])


def test_no_valid_query_gives_zero_gradient():
    model = make_model()
    X, _ = make_batch(2)
    loss = pnp_kernels.two_pass_step(model, X, torch.arange(B), CRITERIA["pnp_dq"](), chunk_size=CHUNK)
    assert loss.item() == 0.0
    assert all(g.abs().max().item() == 0.0 for g in grads(model))


# ----------------------------------------------------------------------------- dropout and the RNG
def _chunked_reference(model, X, y, criterion, chunk_size):
    """criterion(cat([model(c) for c in chunks]), labels).backward(): the forward the step reproduces."""
    loss = criterion(torch.cat([model(c) for c in X.split(chunk_size)]), y)
    loss.backward()
    return loss.detach()


def test_dropout_equals_chunked_forward_from_the_same_rng_state():
    model = make_model(dropout=0.3)
    model.train()
    X, y = make_batch(3)
    criterion = CRITERIA["smooth_ap"]()
    torch.manual_seed(1234)
    want_loss = _chunked_reference(model, X, y, criterion, CHUNK)
    want, rng_after = grads(model), torch.get_rng_state()
    zero(model)
    torch.manual_seed(1234)
    loss = pnp_kernels.two_pass_step(model, X, y, criterion, chunk_size=CHUNK)
    assert abs(loss.item() - want_loss.item()) <= TOL
    assert_grads_equal(grads(model), want)
    # the RNG ends where the chunked reference leaves it: the next step draws the same masks
    assert torch.equal(torch.get_rng_state(), rng_after)
    # dropout is active: another RNG state gives another loss
    zero(model)
    torch.manual_seed(99)
    assert abs(pnp_kernels.two_pass_step(model, X, y, criterion, chunk_size=CHUNK).item() - want_loss.item()) > 1e-4


def test_without_the_rng_restore_dropout_gradients_differ(monkeypatch):
    """Negative control: the second forward drawing fresh dropout masks gives wrong gradients."""
    model = make_model(dropout=0.3)
    X, y = make_batch(3)
    criterion = CRITERIA["smooth_ap"]()
    torch.manual_seed(1234)
    _chunked_reference(model, X, y, criterion, CHUNK)
    want = grads(model)
    zero(model)
    monkeypatch.setattr(two_pass_module, "_set_rng", lambda state, devices: None)
    torch.manual_seed(1234)
    pnp_kernels.two_pass_step(model, X, y, criterion, chunk_size=CHUNK)
    assert max_diff(grads(model), want) > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA RNG needs a CUDA device")
def test_dropout_on_cuda_restores_the_cuda_rng(monkeypatch):
    """CUDA dropout draws from the device's generator: the step restores it per chunk; restoring only
    the CPU generator (no CUDA device found) gives other masks."""
    model = make_model(dropout=0.3).cuda()
    X, y = (t.cuda() for t in make_batch(3))
    criterion = CRITERIA["smooth_ap"]()
    torch.manual_seed(1234)  # seeds the CPU and every CUDA generator
    want_loss = _chunked_reference(model, X, y, criterion, CHUNK)
    want, cuda_after = grads(model), torch.cuda.get_rng_state()
    zero(model)
    torch.manual_seed(1234)
    loss = pnp_kernels.two_pass_step(model, X, y, criterion, chunk_size=CHUNK)
    assert abs(loss.item() - want_loss.item()) <= TOL
    assert_grads_equal(grads(model), want)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_after)
    zero(model)
    monkeypatch.setattr(two_pass_module, "_cuda_devices", lambda model, tensors: [])
    torch.manual_seed(1234)
    pnp_kernels.two_pass_step(model, X, y, criterion, chunk_size=CHUNK)
    assert max_diff(grads(model), want) > 1e-3


# ----------------------------------------------------------------------------- memory held for backward
class SavedBytes:
    """Peak bytes held for backward at once: the distinct storages saved by autograd (parameters excluded,
    they are held anyway), each counted from its pack until its graph releases it."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live, self.current, self.peak = {}, 0, 0

    def _release(self, ptr):
        n, size = self.live[ptr]
        if n == 1:
            del self.live[ptr]
            self.current -= size
        else:
            self.live[ptr] = (n - 1, size)

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.params:
            return t
        n, size = self.live.get(ptr, (0, storage.nbytes()))
        if n == 0:
            self.current += size
            self.peak = max(self.peak, self.current)
        self.live[ptr] = (n + 1, size)

        class Held:
            pass

        held = Held()
        held.t = t
        weakref.finalize(held, self._release, ptr)
        return held

    @staticmethod
    def unpack(x):
        return x if isinstance(x, torch.Tensor) else x.t

    def run(self, fn):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            fn()
        assert self.current == 0, "every saved tensor is released after backward"
        return self.peak


def test_saved_bytes_are_one_chunks_activations():
    big_b, chunk, width = 256, 32, 4096
    model = make_model(d_in=16, hidden=width, d=8)
    gen = torch.Generator().manual_seed(4)
    X, y = torch.randn(big_b, 16, generator=gen, dtype=torch.float64), torch.randint(0, 16, (big_b,), generator=gen)
    criterion = CRITERIA["pnp_dq"]()

    def direct():
        criterion(model(X), y).backward()

    def one_chunk():
        model(X[:chunk]).sum().backward()

    def loss_only():
        criterion(torch.randn(big_b, 8, dtype=torch.float64, requires_grad=True), y).backward()

    full = SavedBytes(model).run(direct)
    per_chunk = SavedBytes(model).run(one_chunk)
    of_loss = SavedBytes(model).run(loss_only)
    step = SavedBytes(model).run(lambda: pnp_kernels.two_pass_step(model, X, y, criterion, chunk_size=chunk))
    # activations dominate: a chunk's saved tensors are 1/8 of the batch's, and more than the loss's
    assert per_chunk * (big_b // chunk) <= full * 1.01
    assert of_loss < per_chunk
    # the step holds one chunk's activations (or the loss's own saved tensors), never the batch's
    assert step <= max(per_chunk, of_loss) * 1.01, (step, per_chunk, of_loss, full)
    assert step * 7 < full


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_name_the_argument():
    model = make_model()
    X, y = make_batch(0)
    crit = CRITERIA["pnp_dq"]()
    step = pnp_kernels.two_pass_step
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="chunk_size"):
            step(model, X, y, crit, chunk_size=bad)
    with pytest.raises(ValueError, match="labels"):
        step(model, X, y[:-1], crit)
    with pytest.raises(ValueError, match="labels"):
        step(model, X, torch.tensor(1), crit)
    for bad_inputs in ([X], (), (X, X[:-1]), torch.tensor(1.0), X[:0], "x"):
        with pytest.raises(ValueError, match="inputs"):
            step(model, bad_inputs, y, crit)
    for bad_model in (lambda x: x.sum(1), lambda x: x[:-1], lambda x: x[:, :, None], lambda x: (x, x)):
        with pytest.raises(ValueError, match="model"):
            step(bad_model, X, y, crit, chunk_size=CHUNK)
    with pytest.raises(ValueError, match="model"):  # the chunks' dimensions differ
        step(lambda x: x[:, : len(x)], X, y, crit, chunk_size=CHUNK)
    none = pnp_kernels.PNPLoss(reduction="none", backend="torch")
    with pytest.raises(ValueError, match="criterion.*scalar"):
        step(model, X, y, none, chunk_size=CHUNK)
    with pytest.raises(ValueError, match="criterion"):
        step(model, X, y, lambda e, lab: e.detach().sum().item(), chunk_size=CHUNK)
    with pytest.raises(ValueError, match="criterion"):
        step(model, X, y, lambda e, lab: e.sum().detach(), chunk_size=CHUNK)
    assert all(p.grad is None for p in model.parameters())  # nothing was backpropagated


# ----------------------------------------------------------------------------- DistributedDataParallel
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("two_pass_ddp"))
    world = len(W_.SIZES)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=W_.main, args=(r, world, port, out_dir)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(TIMEOUT_S)
        hung = [p.pid for p in procs if p.is_alive()]
        assert not hung, f"DDP workers {hung} still running after {TIMEOUT_S} s (hang)"
        codes = [p.exitcode for p in procs]
        assert codes == [0] * world, f"worker exit codes {codes}"
    finally:
        for p in procs:  # never leave a process behind
            if p.is_alive():
                p.kill()
                p.join(10)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.mark.parametrize("name", list(W_.criteria(False)))
def test_ddp_distributed_equals_one_process(ddp_results, name):
    make, steps = W_.criteria(False)[name]
    model, criterion = W_.make_model(), make()
    for step in range(steps):
        X, y = W_.global_batch(100 + step)
        zero(model)
        loss = criterion(model(X), y)
        loss.backward()
        for r, res in enumerate(ddp_results):
            runs, plain_calls = res[name]
            value, got, calls = runs[step]
            assert abs(value - loss.item()) <= TOL, (name, step, r)
            assert_grads_equal(got, grads(model))
            # every chunk but the last ran in no_sync: one all-reduce, as a plain backward does
            assert calls == plain_calls >= 1, (name, step, r, calls, plain_calls)
