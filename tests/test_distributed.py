"""distributed=True against one process on the concatenated global batch (float64, 1e-10).

Each world size (2 and 3 processes, gloo on 127.0.0.1) is started once per session
by torch.multiprocessing (spawn); every rank runs all scenarios of tests/dist_workers.py
and saves its results. The launch has a timeout that turns a hang into a failure and
kills every process it started. Checked: the value (every rank returns the global loss)
and the gradient (rank r's embeddings get W * dL/dx_r), for PNP and Smooth-AP, cosine
and dot, unequal local sizes, a reference set appended after the gathered batch, a rank
with no valid query, no valid query anywhere, a DistributedDataParallel step (parameter
gradients equal one process's), a distributed CrossBatchMemory over steps with
wraparound, and a negative control (a gallery gathered without autograd must fail).
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import pnp_kernels

import dist_workers as W_

TIMEOUT_S = 240
TOL = 1e-10


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, out_dir: str):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=W_.main, args=(r, world, port, out_dir)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(TIMEOUT_S)
        hung = [p.pid for p in procs if p.is_alive()]
        assert not hung, f"distributed workers {hung} still running after {TIMEOUT_S} s (hang)"
        codes = [p.exitcode for p in procs]
        assert codes == [0] * world, f"worker exit codes {codes}"
    finally:
        for p in procs:  # never leave a process behind
            if p.is_alive():
                p.kill()
                p.join(10)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


_RESULTS = {}


@pytest.fixture(scope="module", params=[2, 3], ids=["2proc", "3proc"])
def world(request, tmp_path_factory):
    w = request.param
    if w not in _RESULTS:
        _RESULTS[w] = _launch(w, str(tmp_path_factory.mktemp(f"dist{w}")))
    return w, _RESULTS[w]


def _single(sc):
    """(loss, gradient of the global batch) of one process, and the global batch's slices."""
    name, sizes, seed, rule, loss_name, mem_rows, backend = sc
    E, y = W_.global_batch(sizes, seed, W_.label_rule(rule) if rule else None)
    kw = dict(W_.LOSSES[loss_name])
    fn = W_.loss_fn(**kw)
    x = E.clone().requires_grad_(True)
    if mem_rows:
        gen = torch.Generator().manual_seed(seed + 1000)
        mem = torch.randn(mem_rows, W_.D, generator=gen, dtype=torch.float64)
        ym = torch.randint(0, 4, (mem_rows,), generator=gen)
        loss = fn(x, y, torch.cat([x, mem]), torch.cat([y, ym]), query_ref_index=torch.arange(len(y)), backend=backend)
    else:
        loss = fn(x, y, backend=backend)
    loss.backward()
    return float(loss.detach()), x.grad


def _check(world_size, results, key, sc):
    L, G = _single(sc)
    sizes = sc[1]
    for r, res in enumerate(results):
        value, grad = res["scenarios"][key] if key in res["scenarios"] else res[key]
        assert abs(value - L) <= TOL * max(1.0, abs(L)), (key, r, value, L)
        want = world_size * G[W_.slice_of(sizes, r)]
        err = (grad - want).abs().max().item()
        assert err <= TOL * max(1.0, want.abs().max().item()), (key, r, err)
    return L, G


@pytest.mark.parametrize("index", range(len(W_.scenarios(2))), ids=[s[0] for s in W_.scenarios(2)])
def test_value_and_gradient_equal_one_process(world, index):
    w, results = world
    sc = W_.scenarios(w)[index]
    L, G = _check(w, results, sc[0], sc)
    if sc[0] == "none_valid":
        assert L == 0.0 and G.abs().max().item() == 0.0
    if sc[0] == "rank_without_valid":
        # the last rank has no valid query, yet its rows are negatives of the others: nonzero gradient
        last = results[-1]["scenarios"][sc[0]][1]
        assert last.abs().max().item() > 0


def test_gallery_gathered_without_autograd_fails_the_gradient_check(world):
    """Negative control: the same loss with a gallery gathered outside autograd has the right
    value but misses the gradient that flows through the other ranks' queries."""
    w, results = world
    sc = W_.scenarios(w)[0]
    L, G = _single(sc)
    worst = 0.0
    for r, res in enumerate(results):
        value, grad = res["no_grad_gather"]
        assert abs(value - L) <= TOL
        worst = max(worst, (grad - w * G[W_.slice_of(sc[1], r)]).abs().max().item())
    assert worst > 1e-3, "a gallery without gradient must not pass the gradient check"


def test_ddp_step_parameter_gradients_equal_one_process(world):
    w, results = world
    sizes = W_.sizes_for(w)
    gen = torch.Generator().manual_seed(77)
    X = torch.randn(sum(sizes), 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(sizes),), generator=gen)
    torch.manual_seed(5)
    model = torch.nn.Linear(5, W_.D).double()
    loss = pnp_kernels.PNPLoss(variant="Dq", alpha=2.0, anneal=0.05, backend="torch")(model(X), y)
    loss.backward()
    for res in results:
        value, grads = res["ddp"]
        assert abs(value - loss.item()) <= TOL
        for g, p in zip(grads, model.parameters()):
            assert (g - p.grad).abs().max().item() <= TOL * max(1.0, p.grad.abs().max().item())


def test_distributed_cross_batch_memory(world):
    """Every rank's memory holds the gathered global batches in rank order; each step's loss and
    gradient equal one process's CrossBatchMemory fed the global batches."""
    w, results = world
    sizes = W_.sizes_for(w)
    xbm = pnp_kernels.CrossBatchMemory(pnp_kernels.PNPLoss(variant="Ds", anneal=0.05, backend="torch"), W_.D, 10)
    for step in range(3):
        E, y = W_.global_batch(sizes, 40 + step)
        x = E.clone().requires_grad_(True)
        loss = xbm(x, y)
        loss.backward()
        for r, res in enumerate(results):
            value, grad = res["memory"][0][step]
            assert abs(value - loss.item()) <= TOL, (step, r)
            want = w * x.grad[W_.slice_of(sizes, r)]
            assert (grad - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item()), (step, r)
    for res in results:
        state = res["memory"][1]
        for k, v in xbm.state_dict().items():
            assert torch.equal(state[k], v), k
