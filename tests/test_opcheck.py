"""torch.library.opcheck on the package's custom ops (schema, fake tensors, autograd
registration, AOT dispatch), on the CPU with the torch and ext backends (and on CUDA
with triton and ext where a GPU is present)."""

import pytest
import torch

import pnp_kernels  # noqa: F401  (registers the ops)
from pnp_kernels.spec import LossSpec
from pnp_kernels.variants import LOSS_PNP, LOSS_RECALL_AT_K, LOSS_SMOOTH_AP, VARIANTS

from conftest import require_backend

CASES = [
    (kind, cosine, mean)
    for kind in (LOSS_PNP, LOSS_SMOOTH_AP, LOSS_RECALL_AT_K)
    for cosine in (True, False)
    for mean in (True, False)
]


def _devices_and_backends():
    out = [("cpu", "torch"), ("cpu", "ext")]
    if torch.cuda.is_available():
        out += [("cuda", "triton"), ("cuda", "ext")]
    return out


def _flat(kind, cosine, mean):
    ks = (2.0, 1.0) if kind == LOSS_RECALL_AT_K else ()
    return LossSpec(kind, VARIANTS["Dq"], 0.05, 2.0, 3.0, cosine, mean, ks=ks, k_temperatures=ks).flat()


@pytest.mark.parametrize("device,backend", _devices_and_backends())
@pytest.mark.parametrize("kind,cosine,mean", CASES)
def test_square_ops(device, backend, kind, cosine, mean):
    require_backend(backend)
    gen = torch.Generator().manual_seed(0)
    E = torch.randn(10, 4, generator=gen).to(device).requires_grad_(True)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 4], device=device)
    args = (E, y, *_flat(kind, cosine, mean), backend, True)
    torch.library.opcheck(torch.ops.pnp_kernels.square_loss_fwd.default, args)
    out = torch.ops.pnp_kernels.square_loss_fwd(*args)
    grad_out = torch.ones_like(out[0])
    bwd_args = (grad_out, *[t.detach() for t in out[1:]], *_flat(kind, cosine, mean), E.dtype, backend)
    torch.library.opcheck(torch.ops.pnp_kernels.square_loss_bwd.default, bwd_args)


@pytest.mark.parametrize("r_live", [-1, 4])
@pytest.mark.parametrize("device,backend", _devices_and_backends())
@pytest.mark.parametrize("kind,cosine,mean", CASES)
def test_reference_ops(device, backend, kind, cosine, mean, r_live):
    require_backend(backend)
    gen = torch.Generator().manual_seed(1)
    Eq = torch.randn(6, 4, generator=gen).to(device).requires_grad_(True)
    yq = torch.tensor([0, 0, 1, 2, 3, 9], device=device)
    Er = torch.randn(9, 4, generator=gen).to(device).requires_grad_(True)
    yr = torch.tensor([0, 1, 1, 2, 2, 3, 3, 5, 0], device=device)
    qri = torch.tensor([0, -1, 2, 3, 5, -1], device=device)
    args = (Eq, yq, Er, yr, qri, *_flat(kind, cosine, mean), backend, True, r_live)
    torch.library.opcheck(torch.ops.pnp_kernels.reference_loss_fwd.default, args)
    out = torch.ops.pnp_kernels.reference_loss_fwd(*args)
    bwd_args = (
        torch.ones_like(out[0]),
        *[t.detach() for t in out[1:]],
        *_flat(kind, cosine, mean),
        Eq.dtype,
        Er.dtype,
        backend,
        True,
        True,
        r_live,
    )
    torch.library.opcheck(torch.ops.pnp_kernels.reference_loss_bwd.default, bwd_args)
