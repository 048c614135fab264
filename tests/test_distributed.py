"""distributed=True against one process on the concatenated global batch (float64, 1e-10),
and what every rank sees when one rank passes something different.

Each world size (2 and 3 processes, gloo on 127.0.0.1) is started once per session
by torch.multiprocessing (spawn); every rank runs all scenarios of tests/dist_workers.py
and saves its results. The launch has a timeout that turns a hang into a failure and
kills every process it started. Checked: the value (every rank returns the global loss)
and the gradient (rank r's embeddings get W * dL/dx_r), for PNP, Smooth-AP and Recall@k, cosine
and dot, unequal local sizes, empty local batches (one rank, and two of three), a
reference set appended after the gathered batch, a rank with no valid query, no valid
query anywhere, DistributedDataParallel steps (parameter gradients equal one process's,
also with an empty rank), a distributed CrossBatchMemory over steps with wraparound,
the gather's reduce-scatter backward (forced on gloo) next to its all-reduce fallback,
and a negative control (a gallery gathered without autograd must fail).

Bad input: in each case one rank passes something different (width, dtype, float
labels, labels of another length, an unknown variant, another anneal / temperature /
reduction / loss / memory_efficient, a reference set on one rank only, ...). Every rank
must raise the same exception, of the single-process check's type, naming the rank,
within 10 s; the workers then go on (the group still works), exit with 0, and no
output holds an abort's "terminate called".
"""

import math
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


def _logs(world: int, out_dir: str) -> str:
    out = []
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.log")
        text = open(path).read() if os.path.exists(path) else "(no log)"
        out.append(f"--- rank {r}\n{text[-4000:]}")
    return "\n".join(out)


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
        assert not hung, f"distributed workers {hung} still running after {TIMEOUT_S} s (hang)\n{_logs(world, out_dir)}"
        codes = [p.exitcode for p in procs]
        assert codes == [0] * world, f"worker exit codes {codes}\n{_logs(world, out_dir)}"
    finally:
        for p in procs:  # never leave a process behind
            if p.is_alive():
                p.kill()
                p.join(10)
    logs = _logs(world, out_dir)
    assert "terminate called" not in logs, logs
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


def _check(world_size, results, key, sc, part="scenarios"):
    L, G = _single(sc)
    sizes = sc[1]
    for r, res in enumerate(results):
        value, grad = res[part][key]
        assert abs(value - L) <= TOL * max(1.0, abs(L)), (key, r, value, L)
        want = world_size * G[W_.slice_of(sizes, r)]
        assert grad.shape == want.shape, (key, r, grad.shape)  # (0, D) on an empty rank
        if want.numel():
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


@pytest.mark.parametrize("part", ["ddp", "ddp_empty"])
def test_ddp_step_parameter_gradients_equal_one_process(world, part):
    """A DDP step; "ddp_empty": one rank's local batch is empty (an uneven last batch)."""
    w, results = world
    sizes = W_.sizes_for(w) if part == "ddp" else W_.empty_sizes(w, "one")
    gen = torch.Generator().manual_seed(77)
    X = torch.randn(sum(sizes), 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(sizes),), generator=gen)
    torch.manual_seed(5)
    model = torch.nn.Linear(5, W_.D).double()
    loss = pnp_kernels.PNPLoss(variant="Dq", alpha=2.0, anneal=0.05, backend="torch")(model(X), y)
    loss.backward()
    for res in results:
        value, grads = res[part]
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


@pytest.mark.parametrize("name", W_.REDUCE_SCATTER_SCENARIOS)
def test_reduce_scatter_backward_equals_one_process(world, name):
    """The gather's reduce-scatter backward (NCCL's path), forced on gloo: same value and gradients."""
    w, results = world
    sc = {s[0]: s for s in W_.scenarios(w)}[name]
    _check(w, results, name, sc, part="reduce_scatter")


def test_gloo_takes_the_all_reduce_fallback(world):
    """On gloo the backward all-reduces (no reduce-scatter); the forced runs did reduce-scatter."""
    _, results = world
    for res in results:
        assert res["plain_reduce_scatters"] == 0
        assert res["forced_reduce_scatters"] >= len(W_.REDUCE_SCATTER_SCENARIOS)


def _single_process_message(case, w):
    """(type name, message) of rank ODD's call in one process (not distributed)."""
    with pytest.raises((TypeError, ValueError)) as info:
        W_.bad_call(case, W_.ODD, w)()
    return info.type.__name__, str(info.value)


def _with_rank(message, rank_text):
    arg, rest = message.split(": ", 1)
    return f"{arg} ({rank_text}): {rest}"


LOCAL_ERRORS = (
    "float_labels",
    "labels_length",
    "unknown_variant",
    "unknown_reduction",
    "embeddings_not_a_tensor",
    "query_ref_index",
)


def _expected(case, w):
    """(exception type name, exact message) every rank must raise in ``case``."""
    others = "rank 0" if w == 2 else "ranks 0, 2"
    if case in LOCAL_ERRORS:
        kind, message = _single_process_message(case, w)
        return kind, _with_rank(message, "rank 1")
    options = "loss options differ between ranks: "
    if case == "float_labels_on_all_but_rank_0":
        kind, message = _single_process_message("float_labels", w)
        return kind, _with_rank(message, "rank 1" if w == 2 else "ranks 1, 2")
    if case == "different_errors":
        kind, message = _single_process_message("float_labels", w)
        expected = _with_rank(message, "rank 1")
        if w == 3:
            expected += (
                " (also failed: rank 2: ValueError: labels: length 5 does not match the batch size of embeddings (6))"
            )
        return kind, expected
    return {
        "width": ("ValueError", f"embeddings: width differs between ranks: 6 on {others}; 12 on rank 1"),
        "dtype": (
            "ValueError",
            f"embeddings: dtype differs between ranks: torch.float64 on {others}; torch.float32 on rank 1",
        ),
        "anneal": ("ValueError", options + f"anneal 0.01 on {others}; 0.02 on rank 1"),
        "temperature": ("ValueError", options + f"temperature 0.05 on {others}; 0.1 on rank 1"),
        "reduction": ("ValueError", options + f"reduction mean on {others}; none on rank 1"),
        "loss_kind": ("ValueError", options + f"loss pnp on {others}; smooth_ap on rank 1"),
        "memory_efficient": ("ValueError", options + f"memory_efficient auto on {others}; True on rank 1"),
        "ref_emb_one_rank": (
            "ValueError",
            f"ref_emb: given on rank 1 but not on {others}; every rank passes a reference set or none does",
        ),
        "requires_grad": (
            "ValueError",
            f"embeddings: need a gradient on {others} but not on rank 1 (requires_grad and grad mode); the "
            "gather's backward is a collective that every rank must run, so either every rank's embeddings "
            "need a gradient or none do",
        ),
        "empty_on_every_rank": ("ValueError", "embeddings: empty batch on every rank (global batch size 0)"),
    }[case]


@pytest.mark.parametrize("case", [c for c in W_.BAD_CASES if c != "nan"])
def test_bad_input_raises_the_same_error_on_every_rank(world, case):
    w, results = world
    kind, message = _expected(case, w)
    for r, res in enumerate(results):
        got_kind, got_message, seconds, _ = res["bad"][case]
        assert (got_kind, got_message) == (kind, message), (r, got_kind, got_message)
        assert seconds < 10.0, (case, r, seconds)


def test_nan_in_one_rank_is_not_an_error(world):
    """NaN in one rank's embeddings: a NaN loss and NaN gradients on every rank, as in one process."""
    _, results = world
    for res in results:
        kind, value, seconds, grad_nan = res["bad"]["nan"]
        assert kind is None and math.isnan(value) and grad_nan and seconds < 10.0


def test_the_group_still_works_after_the_errors(world):
    """After every bad-input case, a valid call (and its backward) still equals one process."""
    w, results = world
    sc = W_.scenarios(w)[0]
    for res in results:
        res["scenarios"]["after_bad"] = res["after_bad"]
    _check(w, results, "after_bad", sc)


def test_empty_batch_outside_distributed_mode_is_an_error():
    """Without a process group of >= 2, distributed=True is the plain loss: an empty batch is refused."""
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="embeddings: empty batch"):
        pnp_kernels.pnp_loss(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), distributed=True)
