#!/usr/bin/env python
"""Zero-shot retrieval on scikit-learn's digits with the PNP loss.

Trains a small embedding net on the 8x8 digits of classes 0-4 (scikit-learn's
bundled copy, no download) and measures retrieval on the unseen classes 5-9:
MAP@R and Recall@1 as pytorch-metric-learning's AccuracyCalculator defines them,
before training (epoch 0) and after every epoch. The same metrics on a fixed,
seeded 25% of the images of classes 0-4 that is never trained on ("seen-class
test") show learning on the training classes. The default net is a small convnet
with global average pooling on the digits upsampled to 16x16, trained with random
affine augmentation; ``--arch mlp --augment 0`` is the plain MLP. Several losses
in one call are trained from the same initial weights on the same batches:

    python examples/train_digits.py --loss pnp pml-pnp --out runs/digits
    python examples/train_digits.py --loss pnp --memory-size 200      # cross-batch memory
    python examples/train_digits.py --loss smooth-ap pml-smooth-ap --batch-size 25 --m-per-class 5
    python examples/train_digits.py --loss pnp recall-at-k                 # Recall@k surrogate next to PNP
    python examples/train_digits.py --loss pnp --chunk-size 8              # two-pass step, 8 images at a time
    torchrun --standalone --nproc_per_node 2 examples/train_digits.py --distributed --loss pnp

Losses: ``pnp``, ``smooth-ap`` and ``recall-at-k`` are this package's; ``pml-pnp`` and
``pml-smooth-ap`` are pytorch-metric-learning's, with the same options. ``--chunk-size N``
trains with ``pnp_kernels.two_pass_step``: the net's activations are held for N images at
a time, and the metrics are those of the plain step to float rounding. Writes
OUT/metrics.csv (one row per loss and epoch) and OUT/curves.png.

Needs the ``examples`` extra: pip install -e ".[examples]"
(scikit-learn, tqdm, matplotlib, pytorch-metric-learning).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import pnp_kernels

TRAIN_CLASSES = (0, 1, 2, 3, 4)  # the zero-shot test split is the other five digits
SEEN_TEST_FRACTION = 0.25  # of each training class, held out as the seen-class test split
SPLIT_SEED = 0  # fixed: the seen-class test split does not change with --seed
EMBEDDING_SIZE = 64
LOSSES = ("pnp", "pml-pnp", "smooth-ap", "pml-smooth-ap", "recall-at-k")
# our variant names (and the authors' aliases) -> pytorch-metric-learning's PNPLoss.VARIANTS
PML_VARIANTS = {
    "O": "O",
    "Ds": "Ds",
    "Dq": "Dq",
    "Iu": "Iu",
    "Ib": "Ib",
    "PNP-O": "O",
    "PNP-D_s": "Ds",
    "PNP-D_q": "Dq",
    "PNP-I_u": "Iu",
    "PNP-I_b": "Ib",
}
CSV_COLUMNS = (
    "loss_name",
    "epoch",
    "map_at_r",
    "recall_at_1",
    "seen_map_at_r",
    "seen_recall_at_1",
    "epoch_seconds",
    "loss_seconds",
    "train_loss",
    "batch_size",
    "m_per_class",
    "memory_size",
    "chunk_size",
    "world_size",
    "backend",
    "options",
    "seed",
    "arch",
    "augment",
    "lr",
)


def require(module: str):
    """Import an ``examples``-extra dependency, or exit with how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SystemExit(
            f"train_digits.py needs {module.split('.')[0]!r} ({exc}); install the examples extra: "
            "pip install -e '.[examples]' (scikit-learn, tqdm, matplotlib, pytorch-metric-learning)"
        ) from exc


# ----------------------------------------------------------------------------- metrics
def _neighbour_matches(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, N-1) bool: does the i-th nearest other sample (cosine similarity) share the query's label?"""
    x = F.normalize(embeddings.detach().float(), dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))  # the query itself ranks last and is dropped
    order = sim.argsort(dim=1, descending=True, stable=True)[:, :-1]
    return labels[order] == labels[:, None]


def map_at_r(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """MAP@R: mean over queries of (1/R) sum_{i<=R} P@i rel_i, R = number of other samples of the
    query's class, the query excluded; queries alone in their class are skipped (as PML does)."""
    match = _neighbour_matches(embeddings, labels)
    r = match.sum(dim=1)
    k = torch.arange(1, match.shape[1] + 1, device=match.device, dtype=torch.float64)
    rel = match & (k <= r[:, None])
    ap = (rel.cumsum(dim=1) / k * rel).sum(dim=1) / r.clamp(min=1)
    return ap[r > 0].mean().item()


def recall_at_1(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Recall@1 (PML's precision_at_1): the nearest other sample has the query's label."""
    match = _neighbour_matches(embeddings, labels)
    return match[match.any(dim=1), 0].double().mean().item()


# ----------------------------------------------------------------------------- data
def load_digits_split():
    """(x_train, y_train), (x_test, y_test), (x_seen, y_seen): the 1797 8x8 digits as (N, 64) rows scaled
    to [0, 1]. Test: the unseen classes 5-9. Seen: a fixed, seeded SEEN_TEST_FRACTION of every training
    class (never trained on); train: the rest of classes 0-4."""
    x, y = require("sklearn.datasets").load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    g = torch.Generator().manual_seed(SPLIT_SEED)
    seen, train = [], []
    for c in TRAIN_CLASSES:
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n_seen = round(SEEN_TEST_FRACTION * len(members))
        seen.append(members[:n_seen])
        train.append(members[n_seen:])
    seen, train = torch.cat(seen).sort().values, torch.cat(train).sort().values
    test = ~torch.isin(y, torch.tensor(TRAIN_CLASSES))
    return (x[train], y[train]), (x[test], y[test]), (x[seen], y[seen])


def as_images(x: torch.Tensor, arch: str) -> torch.Tensor:
    """(N, 64) rows -> (N, 1, H, W) images: 8x8 for the MLP, bilinearly upsampled to 16x16 for the convnet."""
    x = x.reshape(-1, 1, 8, 8)
    return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False) if arch == "conv" else x


def random_affine(n: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) affine_grid matrices: rotation up to 15 degrees, scale 1 +- 0.15 and shift up to 1/8 of
    the image (1 pixel of the 8x8 digit) per side, all times ``strength``; drawn on the CPU from ``generator``."""
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(15) * strength
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.15 * strength
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.25 * strength
    cos, sin = angle.cos() / scale, angle.sin() / scale
    return torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)


def warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample (N, 1, H, W) images through the (N, 2, 3) affine maps (zero outside)."""
    theta = theta.to(images)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class MPerClassBatches:
    """``num_batches`` batches per pass, each ``batch_size // m_per_class`` classes x ``m_per_class`` samples.

    Every class keeps a shuffled queue of its samples and deals ``m_per_class`` from it
    (reshuffling the whole class when fewer are left), so an epoch sees nearly every
    sample once; each batch takes a random subset of the classes and is shuffled. All
    draws come from one generator seeded with ``seed``: the same seed gives the same
    batches in every run and on every rank. Yields index tensors into ``labels``.
    """

    def __init__(self, labels: torch.Tensor, batch_size: int, m_per_class: int, num_batches: int, seed: int):
        self.members = [torch.nonzero(labels == c).flatten() for c in labels.unique()]
        self.classes_per_batch, self.m, self.num_batches = batch_size // m_per_class, m_per_class, num_batches
        self.generator = torch.Generator().manual_seed(seed)
        self.queues = [torch.empty(0, dtype=torch.int64) for _ in self.members]

    def _deal(self, c: int) -> torch.Tensor:
        if len(self.queues[c]) < self.m:
            self.queues[c] = self.members[c][torch.randperm(len(self.members[c]), generator=self.generator)]
        out, self.queues[c] = self.queues[c][: self.m], self.queues[c][self.m :]
        return out

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for _ in range(self.num_batches):
            classes = torch.randperm(len(self.members), generator=self.generator)[: self.classes_per_batch]
            batch = torch.cat([self._deal(int(c)) for c in classes])
            yield batch[torch.randperm(len(batch), generator=self.generator)]


# ----------------------------------------------------------------------------- model and losses
class EmbeddingNet(nn.Module):
    """MLP 64 -> 128 -> EMBEDDING_SIZE on the flattened 8x8 image, L2-normalised output."""

    def __init__(self, dim: int = EMBEDDING_SIZE):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


class ConvEmbeddingNet(nn.Module):
    """3x3 convs 1 -> w -> 2w, max-pool, -> 4w (GroupNorm + ReLU each), global average pooling, linear to
    EMBEDDING_SIZE, L2-normalised. GroupNorm, not BatchNorm: a sample's embedding does not depend on the
    rest of its batch, so data-parallel training computes what one process does."""

    def __init__(self, dim: int = EMBEDDING_SIZE, width: int = 16):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, width), *block(width, 2 * width), nn.MaxPool2d(2), *block(2 * width, 4 * width)
        )
        self.head = nn.Linear(4 * width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(x).mean(dim=(2, 3))), dim=1)


ARCHS = {"conv": ConvEmbeddingNet, "mlp": EmbeddingNet}


class SortedByLabel(nn.Module):
    """Feeds a loss the batch sorted by label (PML's SmoothAPLoss reads classes as consecutive blocks)."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(labels, stable=True)
        return self.loss(embeddings[order], labels[order])


def build_loss(name: str, args) -> nn.Module:
    """The loss module of one run; ours are wrapped in CrossBatchMemory when --memory-size > 0."""
    ours = {"backend": args.backend}
    if args.distributed:
        ours["distributed"] = True
    if name == "pnp":
        loss = pnp_kernels.PNPLoss(variant=args.variant, anneal=args.anneal, alpha=args.alpha, b=args.b, **ours)
    elif name == "smooth-ap":
        loss = pnp_kernels.SmoothAPLoss(temperature=args.temperature, **ours)
    elif name == "recall-at-k":
        loss = pnp_kernels.RecallAtKLoss(k=tuple(args.recall_k), temperature=args.temperature, **ours)
    elif name == "pml-pnp":
        loss = require("pytorch_metric_learning.losses").PNPLoss(
            b=args.b, alpha=args.alpha, anneal=args.anneal, variant=PML_VARIANTS[args.variant]
        )
    else:  # pml-smooth-ap
        loss = SortedByLabel(require("pytorch_metric_learning.losses").SmoothAPLoss(temperature=args.temperature))
    if args.memory_size and not name.startswith("pml-"):
        loss = pnp_kernels.CrossBatchMemory(loss, EMBEDDING_SIZE, args.memory_size)
    return loss


def describe(name: str, args) -> str:
    if name.endswith("smooth-ap"):
        return f"temperature={args.temperature}"
    if name == "recall-at-k":
        return f"k={','.join(map(str, args.recall_k))} temperature={args.temperature} k_temperature=k"
    return f"variant={args.variant} anneal={args.anneal} alpha={args.alpha} b={args.b}"


# ----------------------------------------------------------------------------- training
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedLoss:
    """Wraps a loss for the two-pass step and adds its forward + backward time to ``seconds``: from the
    call to the moment the backward reaches the embeddings (a hook on them)."""

    def __init__(self, loss: nn.Module, device: torch.device):
        self.loss, self.device, self.seconds = loss, device, 0.0

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        start = time.perf_counter()

        def done(grad):
            _sync(self.device)
            self.seconds += time.perf_counter() - start

        embeddings.register_hook(done)
        return self.loss(embeddings, labels)


def evaluate(model: nn.Module, data) -> dict:
    """Unseen-class (zero-shot) and seen-class test metrics of the current weights."""
    _, (x_test, y_test), (x_seen, y_seen) = data
    model.eval()
    with torch.no_grad():
        emb, seen = model(x_test), model(x_seen)
    return {
        "map_at_r": map_at_r(emb, y_test),
        "recall_at_1": recall_at_1(emb, y_test),
        "seen_map_at_r": map_at_r(seen, y_seen),
        "seen_recall_at_1": recall_at_1(seen, y_seen),
    }


def train_run(name: str, args, data, env) -> list:
    """Train one loss from the seeded initial weights; one metrics row per epoch (0 = untrained)."""
    tqdm = require("tqdm").tqdm
    (x_train, y_train), _, _ = data
    torch.manual_seed(args.seed)
    model = ARCHS[args.arch]().to(env["device"])
    net = model
    if env["world_size"] > 1 or args.distributed:
        device_ids = [env["device"].index] if env["device"].type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = build_loss(name, args).to(env["device"])
    batches = MPerClassBatches(y_train, args.batch_size, args.m_per_class, args.num_batches, args.seed)
    # augmentation draws for the whole global batch, from one seeded generator: same on every rank, same per loss
    augment_generator = torch.Generator().manual_seed(args.seed + 1)
    local = args.batch_size // env["world_size"]
    memory = 0 if name.startswith("pml-") else args.memory_size
    base = {
        "loss_name": name,
        "batch_size": args.batch_size,
        "m_per_class": args.m_per_class,
        "memory_size": memory,
        "chunk_size": args.chunk_size,
        "world_size": env["world_size"],
        "backend": "pml" if name.startswith("pml-") else args.backend,
        "options": describe(name, args),
        "seed": args.seed,
        "arch": args.arch,
        "augment": args.augment,
        "lr": args.lr,
        "epoch_seconds": "",
        "loss_seconds": "",
        "train_loss": "",
    }
    rows = [dict(base, epoch=0, **evaluate(model, data))]
    show = env["rank"] == 0 and not args.no_progress and sys.stderr.isatty()
    for epoch in range(1, args.epochs + 1):
        model.train()
        _sync(env["device"])
        start, loss_seconds, total = time.perf_counter(), 0.0, 0.0
        for batch in tqdm(batches, desc=f"{name} epoch {epoch}/{args.epochs}", disable=not show, leave=False):
            mine = slice(env["rank"] * local, (env["rank"] + 1) * local)  # this rank's slice of the global batch
            x = x_train[batch[mine]]
            if args.augment:
                x = warp(x, random_affine(len(batch), args.augment, augment_generator)[mine])
            batch = batch[mine]
            if args.chunk_size:
                # embed without autograd, dL/dE on the whole batch, then re-embed chunk by chunk with autograd
                optimizer.zero_grad(set_to_none=True)
                timed = TimedLoss(loss_fn, env["device"])
                loss = pnp_kernels.two_pass_step(net, x, y_train[batch], timed, chunk_size=args.chunk_size)
                loss_seconds += timed.seconds
                optimizer.step()
                total += loss.item()
                continue
            out = net(x)
            # the loss sees a detached leaf, so its forward + backward is timed alone
            emb = out.detach().requires_grad_()
            _sync(env["device"])
            t = time.perf_counter()
            loss = loss_fn(emb, y_train[batch])
            loss.backward()
            _sync(env["device"])
            loss_seconds += time.perf_counter() - t
            optimizer.zero_grad(set_to_none=True)
            out.backward(emb.grad if emb.grad is not None else torch.zeros_like(emb))
            optimizer.step()
            total += loss.item()
        _sync(env["device"])
        epoch_seconds = time.perf_counter() - start
        rows.append(
            dict(
                base,
                epoch=epoch,
                **evaluate(model, data),
                epoch_seconds=epoch_seconds,
                loss_seconds=loss_seconds,
                train_loss=total / max(len(batches), 1),
            )
        )
    return rows


def write_csv(rows: list, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(rows: list, path: Path) -> None:
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, name in enumerate(dict.fromkeys(r["loss_name"] for r in rows)):
        run = [r for r in rows if r["loss_name"] == name]
        label = name + (f" + memory {run[0]['memory_size']}" if run[0]["memory_size"] else "")
        epochs = [r["epoch"] for r in run]
        for ax, key in zip(axes, ("map_at_r", "recall_at_1")):
            ax.plot(epochs, [r[key] for r in run], marker="o", color=f"C{i}", label=f"{label}, unseen 5-9")
            ax.plot(
                epochs,
                [r["seen_" + key] for r in run],
                marker="x",
                linestyle="--",
                color=f"C{i}",
                label=f"{label}, seen 0-4 (held out)",
            )
    for ax, title in zip(axes, ("MAP@R", "Recall@1")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(title)
        ax.set_title(f"{title}: unseen digits 5-9 (solid), held-out 0-4 (dashed)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(name: str, run: list) -> str:
    """The final line of a run: last and untrained metrics, median epoch and loss time."""

    def median(key):
        values = sorted(r[key] for r in run[1:]) or [0.0]
        return (values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2

    def metrics(r):
        return (
            f"unseen MAP@R {r['map_at_r']:.3f} R@1 {r['recall_at_1']:.3f} | "
            f"seen MAP@R {r['seen_map_at_r']:.3f} R@1 {r['seen_recall_at_1']:.3f}"
        )

    return (
        f"{name}: {metrics(run[-1])} (epoch 0: {metrics(run[0])}; "
        f"median {median('epoch_seconds'):.3f} s/epoch, loss {median('loss_seconds'):.3f} s/epoch)"
    )


# ----------------------------------------------------------------------------- entry point
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--loss", nargs="+", choices=LOSSES, default=["pnp"], help="one run per loss, same seed")
    p.add_argument("--variant", default="Dq", choices=list(PML_VARIANTS), help="PNP variant")
    p.add_argument("--anneal", type=float, default=0.01, help="PNP sigmoid temperature")
    p.add_argument("--alpha", type=float, default=1.0, help="exponent of the Dq variant")
    p.add_argument("--b", type=float, default=2.0, help="slope of the Ib variant")
    p.add_argument("--temperature", type=float, default=0.01, help="Smooth-AP and Recall@k rank sigmoid temperature")
    p.add_argument(
        "--recall-k", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="the k of the Recall@k surrogate loss"
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=40, help="global batch size")
    p.add_argument("--m-per-class", type=int, default=8, help="samples per class in a batch")
    p.add_argument("--max-batches", type=int, default=None, help="cap on batches per epoch (quick runs)")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=0,
        help="train with pnp_kernels.two_pass_step, embedding this many images at a time (0: one plain step)",
    )
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument(
        "--arch",
        default="conv",
        choices=tuple(ARCHS),
        help="conv: GroupNorm convnet with global average pooling on 16x16; mlp: 64 -> 128 -> 64",
    )
    p.add_argument(
        "--augment",
        type=float,
        default=0.5,
        help="random affine strength (1: rotate <= 15 deg, scale 1 +- 0.15, shift <= 1 px); 0: off",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--memory-size",
        type=int,
        default=0,
        help="wrap our losses in pnp_kernels.CrossBatchMemory of this many embeddings (0: off)",
    )
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "ext", "triton"), help="our losses' backend")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="digits_out", help="output directory")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="data parallel over the processes of torchrun (gloo on CPU, NCCL on CUDA)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def check_args(args, n_train_classes: int, class_sizes: list, world_size: int) -> None:
    """Exit with a clear message on options that cannot work, before anything runs."""

    def fail(msg):
        raise SystemExit(f"train_digits.py: {msg}")

    k, m, batch = args.batch_size // max(args.m_per_class, 1), args.m_per_class, args.batch_size
    if m < 2 or batch % m:
        fail(f"--batch-size {batch} must be a multiple of --m-per-class {m} >= 2")
    if not 2 <= k <= n_train_classes:
        fail(
            f"a batch has {k} classes (--batch-size / --m-per-class); the training split has "
            f"{n_train_classes}: use 2 to {n_train_classes} classes per batch"
        )
    if m > min(class_sizes):
        fail(f"--m-per-class {m} exceeds the smallest training class ({min(class_sizes)} samples)")
    if batch % world_size:
        fail(f"--batch-size {batch} must be divisible by the number of processes ({world_size})")
    if "pml-smooth-ap" in args.loss and k != m:
        fail(
            f"pml-smooth-ap: pytorch-metric-learning's SmoothAPLoss groups a (sorted) batch in blocks of "
            f"(number of classes) rows, so it is only correct for as many classes as samples per class; "
            f"this batch has {k} classes x {m}: use e.g. --batch-size 25 --m-per-class 5"
        )
    if args.epochs < 0 or args.memory_size < 0 or (args.max_batches is not None and args.max_batches < 1):
        fail("--epochs and --memory-size must be >= 0, --max-batches >= 1")
    if args.chunk_size < 0:
        fail(f"--chunk-size {args.chunk_size} must be >= 1 (or 0: no two-pass step)")
    if not 0 <= args.augment <= 2:
        fail(f"--augment {args.augment} must lie in [0, 2]")
    if args.memory_size and any(name.startswith("pml-") for name in args.loss):
        print("note: --memory-size applies to this package's losses only; pml-* runs use none", file=sys.stderr)


def setup_distributed(args) -> dict:
    """Rank, world size and device; initialises torch.distributed under --distributed."""
    if not args.distributed:
        return {"rank": 0, "world_size": 1, "device": torch.device(args.device)}
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit(
            "--distributed: launch with torchrun, e.g. "
            "torchrun --standalone --nproc_per_node 2 examples/train_digits.py --distributed"
        )
    if "distributed" not in inspect.signature(pnp_kernels.pnp_loss).parameters:
        raise SystemExit("--distributed: this pnp_kernels has no distributed mode (pnp_loss(distributed=...))")
    pml = [name for name in args.loss if name.startswith("pml-")]
    if pml:
        raise SystemExit(
            f"--distributed: {', '.join(pml)} not supported: pytorch-metric-learning's losses only "
            "see the local batch; use pnp / smooth-ap"
        )
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return {"rank": torch.distributed.get_rank(), "world_size": torch.distributed.get_world_size(), "device": device}


def main(argv=None) -> int:
    args = parse_args(argv)
    (x_train, y_train), (x_test, y_test), (x_seen, y_seen) = load_digits_split()
    class_sizes = torch.bincount(y_train)[list(TRAIN_CLASSES)].tolist()
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if args.distributed else 1
    check_args(args, len(TRAIN_CLASSES), class_sizes, world_size)
    if "smooth-ap" in args.loss and not hasattr(pnp_kernels, "SmoothAPLoss"):
        raise SystemExit("smooth-ap: this pnp_kernels has no SmoothAPLoss")
    if "recall-at-k" in args.loss and not hasattr(pnp_kernels, "RecallAtKLoss"):
        raise SystemExit("recall-at-k: this pnp_kernels has no RecallAtKLoss")
    if args.chunk_size and not hasattr(pnp_kernels, "two_pass_step"):
        raise SystemExit("--chunk-size: this pnp_kernels has no two_pass_step")
    if args.memory_size and not hasattr(pnp_kernels, "CrossBatchMemory"):
        raise SystemExit("--memory-size: this pnp_kernels has no CrossBatchMemory")
    env = setup_distributed(args)
    try:
        args.num_batches = max(1, len(y_train) // args.batch_size)
        if args.max_batches is not None:
            args.num_batches = min(args.num_batches, args.max_batches)
        device = env["device"]
        data = tuple(
            (as_images(x, args.arch).to(device), y.to(device))
            for x, y in ((x_train, y_train), (x_test, y_test), (x_seen, y_seen))
        )
        out = Path(args.out)
        if env["rank"] == 0:
            out.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in args.loss:
            run = train_run(name, args, data, env)
            rows += run
            if env["rank"] == 0:
                write_csv(rows, out / "metrics.csv")
                print(summary(name, run), flush=True)
        if env["rank"] == 0:
            plot_curves(rows, out / "curves.png")
            print(f"wrote {out / 'metrics.csv'} and {out / 'curves.png'}")
    finally:
        if args.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
