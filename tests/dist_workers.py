"""Worker side of tests/test_distributed.py: one process per rank, gloo on 127.0.0.1.

Every rank runs the same list of scenarios on its slice of a global batch that all
processes rebuild from one seed, and saves (loss values, local gradients) to a file;
the test process compares them with one process on the whole batch. Some slices are
empty (a rank with 0 rows). The same scenarios run again with the gather's
reduce-scatter backward forced on (gloo's own reduce_scatter where this torch has it,
else one emulated by all_reduce), then the bad-input cases: rank ODD passes something
different, and every rank records the exception it raised and how long it took.

Each worker writes its stdout and stderr (C++ included, through the file descriptors)
to rankR.log, so that the test can look for an abort's "terminate called". The process
group has a short timeout, so that a hang becomes an error. Workers destroy the process
group and leave with os._exit, so that no gloo thread outlives them.
"""

import datetime
import math
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

D = 6


def global_batch(sizes, seed, label_fn=None):
    gen = torch.Generator().manual_seed(seed)
    B = sum(sizes)
    E = torch.randn(B, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (B,), generator=gen) if label_fn is None else label_fn(B)
    return E, y


def slice_of(sizes, rank):
    lo = sum(sizes[:rank])
    return slice(lo, lo + sizes[rank])


# Scenarios: name -> (sizes by world size, seed, label rule, loss kwargs, memory rows)
LOSSES = {
    "pnp_dq": dict(kind="pnp", variant="Dq", alpha=2.0, anneal=0.05),
    "pnp_o_dot": dict(kind="pnp", variant="O", anneal=0.1, similarity="dot"),
    "smooth_ap": dict(kind="smooth_ap", temperature=0.05),
    "recall_at_k": dict(kind="recall_at_k", k=(1, 2, 4), temperature=0.05),
    # the memory-efficient path (no Q x M buffer) on every rank
    "pnp_dq_me": dict(kind="pnp", variant="Dq", alpha=2.0, anneal=0.05, memory_efficient=True),
    "recall_at_k_me": dict(kind="recall_at_k", k=(1, 2, 4), temperature=0.05, memory_efficient=True),
}


def loss_fn(kind, **kw):
    import pnp_kernels

    fn = {"pnp": pnp_kernels.pnp_loss, "smooth_ap": pnp_kernels.smooth_ap_loss}.get(kind, pnp_kernels.recall_at_k_loss)
    return lambda *a, **k: fn(*a, **kw, **k)


def label_rule(name):
    if name == "rank_without_valid":  # the last rank's queries are singletons of the global batch
        return lambda B: torch.tensor([0, 0, 1, 1, 2] + list(range(100, 100 + B - 5)))
    if name == "none_valid":
        return lambda B: torch.arange(B) * 3 - 7
    return None


def sizes_for(world):
    return {2: [5, 7], 3: [4, 6, 3]}[world]


def empty_sizes(world, which):
    """Local sizes with empty ranks: "one" rank empty, or "all_but_one" (two of three)."""
    return {("one", 2): [0, 7], ("one", 3): [4, 0, 6], ("all_but_one", 2): [6, 0], ("all_but_one", 3): [0, 5, 0]}[
        (which, world)
    ]


def scenarios(world):
    """(name, sizes, seed, label rule name, loss name, memory rows, backend)."""
    sizes = sizes_for(world)
    out = []
    for i, loss in enumerate(LOSSES):
        out.append((f"{loss}", sizes, 10 + i, None, loss, 0, "torch"))
        out.append((f"{loss}_memory", sizes, 20 + i, None, loss, 6, "torch"))
    out.append(("equal_sizes", [6] * world, 31, None, "pnp_dq", 0, "torch"))
    out.append(("rank_without_valid", sizes, 32, "rank_without_valid", "pnp_dq", 0, "torch"))
    out.append(("none_valid", sizes, 33, "none_valid", "smooth_ap", 0, "torch"))
    for i, loss in enumerate(("pnp_dq", "smooth_ap")):
        for j, which in enumerate(("one", "all_but_one")):
            out.append((f"{loss}_empty_{which}", empty_sizes(world, which), 50 + 2 * i + j, None, loss, 0, "torch"))
    out.append(("smooth_ap_empty_memory", empty_sizes(world, "one"), 55, None, "smooth_ap", 6, "torch"))
    out.append(("recall_at_k_empty", empty_sizes(world, "all_but_one"), 56, None, "recall_at_k", 0, "torch"))
    return out


# scenarios that run a second time with the reduce-scatter backward forced on
REDUCE_SCATTER_SCENARIOS = (
    "pnp_dq",
    "smooth_ap_memory",
    "equal_sizes",
    "pnp_dq_empty_one",
    "smooth_ap_empty_all_but_one",
)


def run_scenario(rank, world, sc, gather_patch=None):
    import pnp_kernels
    import pnp_kernels.distributed as dist_mode

    name, sizes, seed, rule, loss_name, mem_rows, backend = sc
    E, y = global_batch(sizes, seed, label_rule(rule) if rule else None)
    kw = dict(LOSSES[loss_name])
    fn = loss_fn(**kw)
    x = E[slice_of(sizes, rank)].clone().requires_grad_(True)
    args = [x, y[slice_of(sizes, rank)]]
    if mem_rows:
        gen = torch.Generator().manual_seed(seed + 1000)
        args += [
            torch.randn(mem_rows, D, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (mem_rows,), generator=gen),
        ]
    saved = dist_mode.gather_with_grad
    if gather_patch is not None:
        dist_mode.gather_with_grad = gather_patch
    try:
        loss = fn(*args, distributed=True, backend=backend)
        loss.backward()
    finally:
        dist_mode.gather_with_grad = saved
    del pnp_kernels
    return float(loss.detach()), x.grad.detach().clone()  # an empty rank too gets a (0, D) gradient


class CountingCollectives:
    """Counts the reduce-scatters of the gather's backward; with ``force``, takes that path on
    gloo (its own reduce_scatter / all_gather_into_tensor where this torch has them, else
    emulated with all_reduce / all_gather)."""

    def __init__(self, dist_mode, force):
        self.dist_mode, self.force, self.calls = dist_mode, force, 0
        self.saved = (dist_mode.uses_reduce_scatter, dist_mode._reduce_scatter, dist_mode._all_gather_flat)
        self.native = force and self._probe()

    def _probe(self):
        """Whether gloo runs the flat collectives (an unsupported one raises on every rank, before any traffic)."""
        w = dist.get_world_size()
        try:
            self.saved[1](torch.empty(1), torch.ones(w), None)
            self.saved[2](torch.empty(w), torch.ones(1), None)
            return True
        except RuntimeError:
            return False

    def __enter__(self):
        dm, rs, ag = self.dist_mode, self.saved[1], self.saved[2]

        def reduce_scatter(out, inp, group):
            self.calls += 1
            if self.native:
                return rs(out, inp, group)
            total = inp.clone()
            dist.all_reduce(total, group=group)
            out.copy_(total.chunk(dist.get_world_size(group))[dist.get_rank(group)])

        def all_gather_flat(out, inp, group):
            if self.native:
                return ag(out, inp, group)
            parts = [torch.empty_like(inp) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, inp, group=group)
            out.copy_(torch.cat(parts))

        dm._reduce_scatter, dm._all_gather_flat = reduce_scatter, all_gather_flat
        if self.force:
            dm.uses_reduce_scatter = lambda device, group=None: True
        return self

    def __exit__(self, *exc):
        dm = self.dist_mode
        dm.uses_reduce_scatter, dm._reduce_scatter, dm._all_gather_flat = self.saved


def run_ddp(rank, world, sizes=None):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import pnp_kernels

    sizes = sizes or sizes_for(world)
    gen = torch.Generator().manual_seed(77)
    X = torch.randn(sum(sizes), 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(sizes),), generator=gen)
    torch.manual_seed(5)
    model = torch.nn.Linear(5, D).double()
    ddp = DDP(model)
    loss = pnp_kernels.PNPLoss(variant="Dq", alpha=2.0, anneal=0.05, distributed=True, backend="torch")
    out = loss(ddp(X[slice_of(sizes, rank)]), y[slice_of(sizes, rank)])
    out.backward()
    return float(out.detach()), [p.grad.detach().clone() for p in model.parameters()]


def run_memory(rank, world):
    import pnp_kernels

    sizes = sizes_for(world)
    xbm = pnp_kernels.CrossBatchMemory(
        pnp_kernels.PNPLoss(variant="Ds", anneal=0.05, distributed=True, backend="torch"), D, 10
    )
    results = []
    for step in range(3):
        E, y = global_batch(sizes, 40 + step)
        x = E[slice_of(sizes, rank)].clone().requires_grad_(True)
        loss = xbm(x, y[slice_of(sizes, rank)])
        loss.backward()
        results.append((float(loss.detach()), x.grad.detach().clone()))
    return results, xbm.state_dict()


# --------------------------------------------------------------------------- bad input

ODD = 1  # the rank that passes something different
BAD_CASES = (
    "width",
    "dtype",
    "float_labels",
    "labels_length",
    "unknown_variant",
    "anneal",
    "temperature",
    "reduction",
    "ref_emb_one_rank",
    "loss_kind",
    "memory_efficient",
    "unknown_reduction",
    "embeddings_not_a_tensor",
    "query_ref_index",
    "requires_grad",
    "float_labels_on_all_but_rank_0",
    "different_errors",
    "empty_on_every_rank",
    "nan",
)


def bad_call(case, rank, world):
    """The zero-argument call rank ``rank`` makes in ``case``; it returns (loss, embeddings)."""
    import pnp_kernels

    odd = rank == ODD
    gen = torch.Generator().manual_seed(60 + rank)
    B = 0 if case == "empty_on_every_rank" else 4 + rank
    width = 2 * D if case == "width" and odd else D
    dtype = torch.float32 if case == "dtype" and odd else torch.float64
    x = torch.randn(B, width, generator=gen, dtype=dtype)
    if case == "nan" and odd:
        x[1, 2] = math.nan
    y = torch.randint(0, 3, (B,), generator=gen)
    x.requires_grad_(not (case == "requires_grad" and odd))
    fn = pnp_kernels.pnp_loss
    args = [x, y]
    kw = dict(anneal=0.01, backend="torch", distributed=True)
    if case in ("temperature", "loss_kind") and (odd or case == "temperature"):
        fn = pnp_kernels.smooth_ap_loss
        kw = dict(temperature=0.05 if not odd else 0.1, backend="torch", distributed=True)
        if case == "loss_kind":
            kw["temperature"] = 0.01
    if odd:
        if case == "float_labels":
            args[1] = y.float()
        elif case == "labels_length":
            args[1] = y[:-1]
        elif case == "unknown_variant":
            kw["variant"] = "bogus"
        elif case == "anneal":
            kw["anneal"] = 0.02
        elif case == "reduction":
            kw["reduction"] = "none"
        elif case == "memory_efficient":
            kw["memory_efficient"] = True
        elif case == "unknown_reduction":
            kw["reduction"] = "sum"
        elif case == "embeddings_not_a_tensor":
            args[0] = x.tolist()
        elif case in ("ref_emb_one_rank", "query_ref_index"):
            args += [torch.randn(3, D, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2])]
            if case == "query_ref_index":
                kw["query_ref_index"] = torch.full((B,), -1)
    if case == "float_labels_on_all_but_rank_0" and rank > 0:
        args[1] = y.float()
    if case == "different_errors" and rank >= ODD:
        if rank == ODD:
            args[1] = y.float()
        else:
            args[1] = y[:-1]
    return lambda: (fn(*args, **kw), x)


def run_bad_cases(rank, world):
    """case -> (exception type name or None, message or loss value, seconds, gradient has NaN)."""
    out = {}
    for case in BAD_CASES:
        call = bad_call(case, rank, world)
        t0 = time.monotonic()
        try:
            loss, x = call()
            loss.sum().backward()
            out[case] = (None, float(loss.detach().sum()), time.monotonic() - t0, bool(x.grad.isnan().any()))
        except (TypeError, ValueError, RuntimeError) as exc:
            out[case] = (type(exc).__name__, str(exc), time.monotonic() - t0, None)
    return out


def main(rank, world, port, out_dir):
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w")
    os.dup2(log.fileno(), 1)  # the C++ side (an abort's "terminate called") writes to the descriptors
    os.dup2(log.fileno(), 2)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    code = 0
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=90),
        )
        import pnp_kernels.distributed as dist_mode

        res = {"scenarios": {}, "rank": rank}
        with CountingCollectives(dist_mode, force=False) as plain:
            for sc in scenarios(world):
                res["scenarios"][sc[0]] = run_scenario(rank, world, sc)
        res["plain_reduce_scatters"] = plain.calls
        by_name = {sc[0]: sc for sc in scenarios(world)}
        with CountingCollectives(dist_mode, force=True) as forced:
            res["reduce_scatter"] = {n: run_scenario(rank, world, by_name[n]) for n in REDUCE_SCATTER_SCENARIOS}
        res["forced_reduce_scatters"], res["native_reduce_scatter"] = forced.calls, forced.native
        # negative control: a gallery gathered without autograd
        res["no_grad_gather"] = run_scenario(
            rank,
            world,
            scenarios(world)[0],
            gather_patch=lambda x, group=None, sizes=None: dist_mode.gather_no_grad(x, group, sizes),
        )
        res["ddp"] = run_ddp(rank, world)
        res["ddp_empty"] = run_ddp(rank, world, empty_sizes(world, "one"))
        res["memory"] = run_memory(rank, world)
        res["bad"] = run_bad_cases(rank, world)
        res["after_bad"] = run_scenario(rank, world, scenarios(world)[0])  # the group still works
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
