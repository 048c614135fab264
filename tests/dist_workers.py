"""Worker side of tests/test_distributed.py: one process per rank, gloo on 127.0.0.1.

Every rank runs the same list of scenarios on its slice of a global batch that all
processes rebuild from one seed, and saves (loss values, local gradients) to a file;
the test process compares them with one process on the whole batch. Workers destroy
the process group and leave with os._exit, so that no gloo thread outlives them.
"""

import os
import sys
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
}


def loss_fn(kind, **kw):
    import pnp_kernels

    if kind == "pnp":
        return lambda *a, **k: pnp_kernels.pnp_loss(*a, **kw, **k)
    return lambda *a, **k: pnp_kernels.smooth_ap_loss(*a, **kw, **k)


def label_rule(name):
    if name == "rank_without_valid":  # the last rank's queries are singletons of the global batch
        return lambda B: torch.tensor([0, 0, 1, 1, 2] + list(range(100, 100 + B - 5)))
    if name == "none_valid":
        return lambda B: torch.arange(B) * 3 - 7
    return None


def sizes_for(world):
    return {2: [5, 7], 3: [4, 6, 3]}[world]


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
    return out


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
    return float(loss.detach()), x.grad.detach().clone()


def run_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    import pnp_kernels

    sizes = sizes_for(world)
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


def main(rank, world, port, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        import pnp_kernels.distributed as dist_mode

        res = {"scenarios": {}, "rank": rank}
        for sc in scenarios(world):
            res["scenarios"][sc[0]] = run_scenario(rank, world, sc)
        # negative control: a gallery gathered without autograd
        res["no_grad_gather"] = run_scenario(
            rank,
            world,
            scenarios(world)[0],
            gather_patch=lambda x, group=None, sizes=None: dist_mode.gather_no_grad(x, group, sizes),
        )
        res["ddp"] = run_ddp(rank, world)
        res["memory"] = run_memory(rank, world)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
