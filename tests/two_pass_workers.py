"""Worker side of the DistributedDataParallel test of tests/test_two_pass.py: one process per rank, gloo on 127.0.0.1.

Every rank rebuilds the same global batch and model from fixed seeds, wraps the model in
DistributedDataParallel, takes its slice of the batch and runs pnp_kernels.two_pass_step
with a distributed criterion; it saves the loss, the parameter gradients and how many
times DDP's communication hook ran, and the test process compares them with one process
on the whole batch. The local batches differ in size and in number of chunks (without
no_sync the ranks would all-reduce a different number of times and hang), and the model
has a buffer (DDP broadcasts it at the first forward of each step). Workers
destroy the process group and leave with os._exit, so that no gloo thread outlives them.
"""

import os
import sys
import traceback

import torch
import torch.distributed as dist

D_IN, HIDDEN, D = 5, 12, 6
SIZES = [7, 12]  # rank 0: 2 chunks of CHUNK, rank 1: 3 chunks
CHUNK = 5
MEMORY_ROWS = 9


def global_batch(seed):
    gen = torch.Generator().manual_seed(seed)
    B = sum(SIZES)
    return torch.randn(B, D_IN, generator=gen, dtype=torch.float64), torch.randint(0, 4, (B,), generator=gen)


def slice_of(rank):
    lo = sum(SIZES[:rank])
    return slice(lo, lo + SIZES[rank])


class Scale(torch.nn.Module):
    """A layer with a buffer, so that DDP broadcasts buffers at the first forward of each step."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, HIDDEN, dtype=torch.float64))

    def forward(self, x):
        return x * self.scale


def make_model():
    torch.manual_seed(11)
    layers = [torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(), Scale(), torch.nn.Linear(HIDDEN, D)]
    return torch.nn.Sequential(*layers).double()


def criteria(distributed):
    """name -> (criterion factory, steps): a fresh criterion per run, the memory over several steps."""
    import pnp_kernels

    return {
        "pnp": (lambda: pnp_kernels.PNPLoss(variant="Dq", alpha=2.0, anneal=0.05, distributed=distributed), 1),
        "smooth_ap_memory": (
            lambda: pnp_kernels.CrossBatchMemory(
                pnp_kernels.SmoothAPLoss(temperature=0.05, distributed=distributed), D, MEMORY_ROWS
            ),
            3,
        ),
    }


def main(rank, world, port, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    code = 0
    try:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel as DDP

        import pnp_kernels

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        assert world == len(SIZES)
        calls = [0]

        def counting_hook(state, bucket):
            calls[0] += 1
            return allreduce_hook(state, bucket)

        res = {}
        for name, (make, steps) in criteria(True).items():
            model = make_model()
            ddp = DDP(model)
            ddp.register_comm_hook(None, counting_hook)
            criterion = make()
            runs = []
            for step in range(steps):
                X, y = global_batch(100 + step)
                for p in model.parameters():
                    p.grad = None
                before = calls[0]
                loss = pnp_kernels.two_pass_step(ddp, X[slice_of(rank)], y[slice_of(rank)], criterion, chunk_size=CHUNK)
                runs.append((float(loss), [p.grad.detach().clone() for p in model.parameters()], calls[0] - before))
            # one plain DDP backward: how many hook calls one all-reduce of the gradients takes
            X, y = global_batch(100)
            before = calls[0]
            ddp(X[slice_of(rank)]).sum().backward()
            res[name] = (runs, calls[0] - before)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
