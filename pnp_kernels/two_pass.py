"""The two-pass training step: a loss over a batch whose activations do not fit in memory at once.

A rank loss couples every row of the batch, so the batch cannot be split into
independent micro-batches. Its input, though, is only the (B, D) embedding matrix E.
With L = criterion(E, labels) and E = model(x) split in row chunks E_c = model(x_c),

    dL/dtheta = sum_c (dE_c/dtheta)^T dL/dE_c

so the step (as in GradCache, Gao et al. 2021, and the Recall@k authors' training loop)

1. embeds the chunks without autograd, keeping only E;
2. computes L on E and backpropagates it into G = dL/dE (B x D), the only coupled part;
3. re-embeds each chunk with autograd and backpropagates G[chunk] into the parameters.

Peak activation memory is one chunk's; the price is a second forward. Dropout and other
random layers draw the same masks in both forwards because each chunk's CPU and CUDA RNG
states are saved before its first forward and restored before its second.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["two_pass_step"]

Tensor = torch.Tensor


def _cuda_devices(model: nn.Module, tensors: Sequence[Tensor]) -> List[int]:
    """The CUDA devices whose RNG a chunk's forward may draw from: those of the inputs and the model's
    parameters and buffers, plus the current device once CUDA is initialised."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    devices = {t.device.index for t in tensors if t.is_cuda}
    devices |= {t.device.index for t in model.parameters() if t.is_cuda}
    devices |= {t.device.index for t in model.buffers() if t.is_cuda}
    devices.add(torch.cuda.current_device())
    return sorted(int(d if d is not None else torch.cuda.current_device()) for d in devices)


def _get_rng(cuda_devices: List[int]) -> Tuple[Tensor, List[Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda_devices]


def _set_rng(state: Tuple[Tensor, List[Tensor]], cuda_devices: List[int]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(cuda_devices, cuda):
        torch.cuda.set_rng_state(s, d)


def _split_inputs(inputs) -> Tuple[Tensor, ...]:
    if isinstance(inputs, Tensor):
        tensors: Tuple[Tensor, ...] = (inputs,)
    elif isinstance(inputs, tuple) and inputs and all(isinstance(t, Tensor) for t in inputs):
        tensors = inputs
    else:
        raise ValueError("inputs: expected a tensor or a non-empty tuple of tensors (split along dim 0)")
    if any(t.dim() == 0 for t in tensors):
        raise ValueError("inputs: every tensor needs a batch dimension (dim 0)")
    rows = {t.shape[0] for t in tensors}
    if len(rows) != 1:
        raise ValueError(f"inputs: the tensors of the tuple have different lengths along dim 0: {sorted(rows)}")
    if tensors[0].shape[0] == 0:
        raise ValueError("inputs: empty batch (0 rows)")
    return tensors


def _sync_context(model: nn.Module, sync: bool):
    """Under DistributedDataParallel, ``model.no_sync()`` unless this backward is the one that all-reduces."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def two_pass_step(
    model: nn.Module,
    inputs: Union[Tensor, Tuple[Tensor, ...]],
    labels: Tensor,
    criterion: Callable[..., Any],
    chunk_size: int = 256,
) -> Tensor:
    """One forward + backward of ``criterion(model(inputs), labels)`` holding one chunk's activations.

    1. Embeds ``inputs`` in chunks of ``chunk_size`` rows without autograd, saving the CPU
       and CUDA RNG states before each chunk.
    2. E = cat(chunks).requires_grad_(); ``loss = criterion(E, labels)``; ``loss.backward()``
       gives dL/dE (B x D). The criterion's own state changes once, as in a plain step
       (``CrossBatchMemory`` enqueues the batch once).
    3. For each chunk: restores its RNG state, re-embeds it with autograd and backpropagates
       dL/dE[chunk] into the parameters. Under ``DistributedDataParallel`` every chunk but
       the last runs in ``model.no_sync()``, so the gradients are all-reduced once.

    Parameter gradients accumulate into ``.grad`` as ``backward()`` does (zero them first as
    usual). They equal those of ``criterion(torch.cat([model(c) for c in chunks]), labels)
    .backward()`` from the same RNG state; with no batch-dependent layer (BatchNorm in
    training mode normalises each chunk with its own statistics, and updates its running
    statistics twice per step) they equal a full-batch forward's to float rounding. After
    the step the RNG is where that chunked reference would leave it.

    Args:
        model: the embedding network; ``model(*chunk)`` must return a (rows, D) tensor.
        inputs: a tensor, or a tuple of tensors of the same length, split along dim 0.
        labels: the batch's labels, passed whole to ``criterion``; ``len(labels)`` must equal
            the number of input rows.
        criterion: ``criterion(embeddings, labels)`` returning a scalar: any of this package's
            losses with ``reduction="mean"`` (``distributed=True`` too) or ``CrossBatchMemory``.
        chunk_size: rows per chunk (>= 1); the last chunk may be smaller.

    Returns:
        The loss, detached.

    Raises:
        ValueError: naming the argument, for ``chunk_size`` <= 0, inputs and labels of
            different lengths, a model output that is not (rows, D), or a criterion that does
            not return a scalar (``reduction="none"`` has no single dL/dE).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
    tensors = _split_inputs(inputs)
    B = tensors[0].shape[0]
    if not isinstance(labels, Tensor) or labels.dim() == 0:
        raise ValueError("labels: expected a tensor with one entry per input row")
    if labels.shape[0] != B:
        raise ValueError(f"labels: {labels.shape[0]} labels for {B} input rows (inputs and labels differ in length)")
    bounds = [(lo, min(lo + chunk_size, B)) for lo in range(0, B, chunk_size)]
    chunks = [tuple(t[lo:hi] for t in tensors) for lo, hi in bounds]
    cuda_devices = _cuda_devices(model, tensors)

    # pass 1: embed without autograd, remembering each chunk's RNG state
    states = []
    outputs: List[Tensor] = []
    with torch.no_grad():
        for (lo, hi), chunk in zip(bounds, chunks):
            states.append(_get_rng(cuda_devices))
            out = model(*chunk)
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != hi - lo:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"model: expected a ({hi - lo}, D) embedding tensor for a chunk of {hi - lo} rows, got {got}"
                )
            if outputs and (out.shape[1] != outputs[0].shape[1] or out.dtype != outputs[0].dtype):
                raise ValueError("model: the chunks' embeddings differ in dimension or dtype")
            outputs.append(out)

    # pass 2: the loss on the whole batch of embeddings, and its gradient dL/dE
    embeddings = torch.cat(outputs).requires_grad_(True)
    del outputs
    with torch.enable_grad():
        loss = criterion(embeddings, labels)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"criterion: must return a scalar loss (reduction='mean'), got {got}; "
                "a per-query loss has no single dL/dE"
            )
        if not loss.requires_grad:
            raise ValueError("criterion: its loss is not differentiable with respect to the embeddings")
        loss.backward()
    grad: Optional[Tensor] = embeddings.grad
    if grad is None:  # the loss does not depend on E: zero gradient, but every chunk still runs (DDP)
        grad = torch.zeros_like(embeddings)
    after = _get_rng(cuda_devices)

    # pass 3: re-embed each chunk from its RNG state, with autograd, and backpropagate dL/dE[chunk]
    last = len(chunks) - 1
    with torch.enable_grad():
        for i, ((lo, hi), chunk, state) in enumerate(zip(bounds, chunks, states)):
            with _sync_context(model, sync=i == last):
                _set_rng(state, cuda_devices)
                out = model(*chunk)
                out.backward(grad[lo:hi])
    _set_rng(after, cuda_devices)
    return loss.detach()
