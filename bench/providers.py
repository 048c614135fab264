"""Benchmark providers: what can be timed, by name.

Each provider turns fixed inputs (:func:`harness.make_inputs`) into three callables
(:class:`Steps`): ``fwd`` (the forward, grad enabled), ``make_bwd()`` (one forward,
then a callable that runs only its backward, retain_graph=True) and ``fwdbwd``
(forward then ``torch.autograd.grad``: one training step of the loss).

Names (all losses: cosine similarity, mean reduction; PNP with the case's variant and
anneal, Smooth-AP with its temperature):

  gemm-floor           the GEMMs alone, in the input dtype: forward S = X X^T, backward
                       H X with H a B x B matrix (reference-set case: S = Xq Xr^T and
                       G Xr); the floor any exact implementation pays.
  reference            pnp_kernels.reference.pnp_loss_reference, eager, B x B x B.
  reference-compiled   torch.compile of it (B <= compile_max_B; the first call, which
                       compiles, is reported separately).
  reference-smooth-ap  pnp_kernels.reference.smooth_ap_loss_reference, eager, B x B x B.
  pml                  pytorch_metric_learning.losses.PNPLoss.
  pml-smooth-ap        pytorch_metric_learning.losses.SmoothAPLoss; it requires
                       class-sorted labels of equal class sizes (P must divide B), so
                       any run that includes it uses class-sorted labels for every provider.
  torch, triton, ext   pnp_kernels.pnp_loss(backend=...), square batch.
  smooth-ap-torch, smooth-ap-triton, smooth-ap-ext
                       pnp_kernels.smooth_ap_loss(backend=...), square batch.
  recall-at-k-torch, recall-at-k-triton, recall-at-k-ext
                       pnp_kernels.recall_at_k_loss(backend=...), square batch, the
                       authors' training setting (k = 1, 2, 4, 8, 16, tau2_k = k).
  recall-at-k-loop     the same loss by the authors' algorithm: one query at a time in
                       a Python loop (autograd through it), as their RecallatK does.
  refset-torch, refset-triton, refset-ext
                       pnp_kernels.pnp_loss(x, labels, ref_emb, ref_labels, backend=...):
                       B queries against M reference rows (see harness.Case); the
                       gradient flows to the queries (and to the reference set only
                       with Case.ref_grad).
  NAME-me              for every pnp_kernels provider above: the same with
                       memory_efficient=True (no Q x M buffer); e.g. torch-me, ext-me,
                       smooth-ap-ext-me, refset-torch-me.

A pnp_kernels provider is available when its backend is in
``pnp_kernels.available_backends()``; triton only on CUDA (the interpreter is never
benchmarked).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, NamedTuple, Optional

import torch

from harness import Case, Inputs, Unavailable

__all__ = ["Steps", "Provider", "PROVIDERS", "NAMES", "get", "why_unavailable", "build"]


class Steps(NamedTuple):
    fwd: Callable
    make_bwd: Callable
    fwdbwd: Callable


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    help: str
    make_loss: Optional[Callable] = None  # (inputs, case) -> loss_fn(x) for loss providers
    backend: Optional[str] = None  # pnp_kernels backend it needs
    needs: Optional[str] = None  # an importable module it needs
    reference_set: bool = False  # builds the case's reference set
    sorted_labels: bool = False  # needs class-sorted labels of equal class sizes
    derived_bwd: bool = False  # bwd = fwd+bwd - fwd (no retain_graph)


RECALL_KS = (1, 2, 4, 8, 16)  # the authors' k_vals_train, with tau2_k = k


def _ours(kind: str, backend: str, memory_efficient: Optional[bool] = None):
    def make(inp: Inputs, case: Case):
        import pnp_kernels

        y = inp.labels
        kw = dict(backend=backend, memory_efficient=memory_efficient)
        if kind == "pnp":
            return lambda t: pnp_kernels.pnp_loss(t, y, variant=case.variant, anneal=case.anneal, **kw)
        if kind == "recall_at_k":
            return lambda t: pnp_kernels.recall_at_k_loss(t, y, k=RECALL_KS, temperature=case.temperature, **kw)
        return lambda t: pnp_kernels.smooth_ap_loss(t, y, temperature=case.temperature, **kw)

    return make


def _refset(backend: str, memory_efficient: Optional[bool] = None):
    def make(inp: Inputs, case: Case):
        import pnp_kernels

        y, r, yr = inp.labels, inp.ref, inp.ref_labels
        kw = dict(variant=case.variant, anneal=case.anneal, backend=backend, memory_efficient=memory_efficient)
        return lambda t: pnp_kernels.pnp_loss(t, y, r, yr, **kw)

    return make


def _recall_loop(inp: Inputs, case: Case):
    """Recall@k by the authors' algorithm: a Python loop over the queries, each query's row
    of similarities and its positives' smoothed ranks by autograd-visible tensor ops."""
    y = inp.labels
    tau1 = case.temperature

    def loss_fn(t):
        X = torch.nn.functional.normalize(t, dim=1)
        S = X @ X.t()
        B = S.shape[0]
        total = S.new_zeros(())
        n_valid = 0
        for q in range(B):
            keep = torch.ones(B, dtype=torch.bool, device=S.device)
            keep[q] = False
            row = S[q][keep]
            pos = (y[keep] == y[q]).nonzero()[:, 0]
            if pos.numel() == 0:
                continue
            diff = (row[None, :] - row[pos][:, None]) / tau1  # [j, z]
            sig = torch.sigmoid(diff)
            r = 0.5 + sig.sum(dim=1)  # 1 + sum over z != j (sigma(0) = 0.5 removed)
            rec = S.new_zeros(())
            for k in RECALL_KS:
                soft = torch.sigmoid((k - r) / k).sum()
                rec = rec + torch.clamp(soft, max=k) / min(k, pos.numel())
            total = total + (1 - rec / len(RECALL_KS))
            n_valid += 1
        return total / max(n_valid, 1)

    return loss_fn


def _reference(inp: Inputs, case: Case):
    from pnp_kernels.reference import pnp_loss_reference

    y = inp.labels
    return lambda t: pnp_loss_reference(t, y, variant=case.variant, anneal=case.anneal)


def _reference_compiled(inp: Inputs, case: Case):
    if case.B > case.compile_max_B:
        raise Unavailable(f"B > compile_max_B {case.compile_max_B}")
    from pnp_kernels.reference import pnp_loss_reference

    torch._dynamo.reset()
    compiled = torch.compile(pnp_loss_reference, dynamic=False)
    y = inp.labels
    return lambda t: compiled(t, y, variant=case.variant, anneal=case.anneal)


def _reference_smooth_ap(inp: Inputs, case: Case):
    from pnp_kernels.reference import smooth_ap_loss_reference

    y = inp.labels
    return lambda t: smooth_ap_loss_reference(t, y, temperature=case.temperature)


def _pml(inp: Inputs, case: Case):
    from pytorch_metric_learning.losses import PNPLoss

    mod = PNPLoss(anneal=case.anneal, variant=case.variant)
    y = inp.labels
    return lambda t: mod(t, y)


def _pml_smooth_ap(inp: Inputs, case: Case):
    if not case.sorted_labels or case.B % case.P:
        raise Unavailable("pml-smooth-ap needs class-sorted labels with P dividing B")
    from pytorch_metric_learning.losses import SmoothAPLoss

    mod = SmoothAPLoss(temperature=case.temperature)
    y = inp.labels
    return lambda t: mod(t, y)


def _gemm_floor(inp: Inputs, case: Case) -> Steps:
    X = inp.x.detach()
    R = inp.ref.detach() if inp.ref is not None else X
    H = torch.randn(X.shape[0], R.shape[0], device=X.device, dtype=torch.float32).to(X.dtype)

    def fwd():
        return torch.mm(X, R.t())

    def make_bwd():
        return lambda: torch.mm(H, R)

    def fwdbwd():
        return torch.mm(X, R.t()), torch.mm(H, R)

    return Steps(fwd, make_bwd, fwdbwd)


def _list():
    out = [
        Provider("gemm-floor", "the GEMMs alone (S = X X^T, H X)"),
        Provider("reference", "B^3 PNP oracle, eager", _reference),
        Provider("reference-compiled", "B^3 PNP oracle under torch.compile", _reference_compiled, derived_bwd=True),
        Provider("reference-smooth-ap", "B^3 Smooth-AP oracle, eager", _reference_smooth_ap),
        Provider("pml", "pytorch-metric-learning PNPLoss", _pml, needs="pytorch_metric_learning"),
        Provider(
            "pml-smooth-ap",
            "pytorch-metric-learning SmoothAPLoss (class-sorted labels)",
            _pml_smooth_ap,
            needs="pytorch_metric_learning",
            sorted_labels=True,
        ),
    ]
    for b in ("torch", "triton", "ext"):
        out.append(Provider(b, f"pnp_loss, backend={b!r}", _ours("pnp", b), backend=b))
    for b in ("torch", "triton", "ext"):
        out.append(Provider(f"smooth-ap-{b}", f"smooth_ap_loss, backend={b!r}", _ours("smooth_ap", b), backend=b))
    for b in ("torch", "triton", "ext"):
        out.append(Provider(f"recall-at-k-{b}", f"recall_at_k_loss, backend={b!r}", _ours("recall_at_k", b), backend=b))
    out.append(
        Provider("recall-at-k-loop", "Recall@k by a Python loop over queries (authors' algorithm)", _recall_loop)
    )
    for b in ("torch", "triton", "ext"):
        out.append(
            Provider(
                f"refset-{b}",
                f"pnp_loss against a reference set, backend={b!r}",
                _refset(b),
                backend=b,
                reference_set=True,
            )
        )
    # the memory-efficient twin of every pnp_kernels provider
    for p in [p for p in out if p.backend]:
        kind = "pnp"
        if p.name.startswith("smooth-ap-"):
            kind = "smooth_ap"
        elif p.name.startswith("recall-at-k-"):
            kind = "recall_at_k"
        make = _refset(p.backend, True) if p.reference_set else _ours(kind, p.backend, True)
        out.append(dataclasses.replace(p, name=p.name + "-me", help=p.help + ", memory_efficient=True", make_loss=make))
    return {p.name: p for p in out}


PROVIDERS: Dict[str, Provider] = _list()
NAMES = list(PROVIDERS)


def get(name: str) -> Provider:
    if name not in PROVIDERS:
        raise Unavailable(f"unknown provider {name!r}; known: {', '.join(NAMES)}")
    return PROVIDERS[name]


def why_unavailable(name: str, device) -> str:
    """ "" when the provider can run on ``device``, else why not (runs nothing)."""
    if name not in PROVIDERS:
        return f"unknown provider {name!r}"
    p = PROVIDERS[name]
    if p.needs:
        try:
            __import__(p.needs)
        except Exception as exc:
            return f"{p.needs} not importable ({type(exc).__name__})"
    if p.backend:
        if p.backend == "triton" and torch.device(device).type != "cuda":
            return "triton needs a GPU (the interpreter is not benchmarked)"
        import pnp_kernels

        if p.backend not in pnp_kernels.available_backends():
            return str(pnp_kernels.backend_status().get(p.backend, {}).get("reason", "unavailable"))
    return ""


def build(name: str, inp: Inputs, case: Case) -> Steps:
    """The :class:`Steps` of provider ``name`` on ``inp`` (made by make_inputs for ``case``)."""
    p = get(name)
    if p.name == "gemm-floor":
        return _gemm_floor(inp, case)
    loss_fn = p.make_loss(inp, case)
    x = inp.x
    wrt = [x] + ([inp.ref] if inp.ref is not None and inp.ref.requires_grad else [])

    def fwd():
        return loss_fn(x)

    def make_bwd():
        loss = loss_fn(x)
        return lambda: torch.autograd.grad(loss, wrt, retain_graph=True)

    def fwdbwd():
        return torch.autograd.grad(loss_fn(x), wrt)

    return Steps(fwd, make_bwd, fwdbwd)


def case_for(names, case: Case) -> Case:
    """The case with class-sorted labels when one of ``names`` needs them."""
    if any(PROVIDERS[n].sorted_labels for n in names if n in PROVIDERS) and not case.sorted_labels:
        return dataclasses.replace(case, sorted_labels=True)
    return case


def uses_reference_set(name: str) -> bool:
    return name in PROVIDERS and PROVIDERS[name].reference_set
