"""The torch backend's memory stays O(B^2): B = 2048, D = 64 on CPU, forward+backward,
raises the peak RSS by < 500 MB (a B^3 float32 tensor alone would be 34 GB).

Measured in a fresh subprocess so that the peak RSS (ru_maxrss) is that of this one
computation, not of whatever ran earlier in the pytest process.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

LIMIT_MB = 500

SCRIPT = textwrap.dedent(
    """
    import json, math, resource, sys
    import torch
    import pnp_kernels

    def peak_mb():
        # Linux: ru_maxrss is in kilobytes
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    B, D, variant, similarity = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    gen = torch.Generator().manual_seed(0)
    E = (torch.randn(B, D, generator=gen) / math.sqrt(D)).requires_grad_(True)
    labels = (torch.arange(B) // 4)[torch.randperm(B, generator=gen)] * 3 - 100
    # warm-up: a tiny call loads every code path and allocator pool we will use
    e = E[:16].detach().clone().requires_grad_(True)
    pnp_kernels.pnp_loss(e, labels[:16], variant=variant, similarity=similarity, backend="torch").backward()
    before = peak_mb()
    loss = pnp_kernels.pnp_loss(E, labels, variant=variant, similarity=similarity, backend="torch")
    loss.backward()
    after = peak_mb()
    print(json.dumps({"before_mb": before, "after_mb": after, "loss": loss.item(),
                      "grad_finite": bool(torch.isfinite(E.grad).all()),
                      "grad_nonzero": bool((E.grad != 0).any())}))
    """
)


@pytest.mark.parametrize("variant,similarity", [("Dq", "cosine"), ("Ib", "dot")])
def test_torch_backend_peak_rss_b2048(variant, similarity):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, "2048", "64", variant, similarity],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    delta = res["after_mb"] - res["before_mb"]
    print(
        f"B=2048 D=64 {variant}/{similarity}: peak RSS {res['before_mb']:.0f} MB -> "
        f"{res['after_mb']:.0f} MB, delta {delta:.1f} MB (limit {LIMIT_MB} MB)"
    )
    assert math.isfinite(res["loss"]), res
    assert res["grad_finite"] and res["grad_nonzero"]
    assert delta < LIMIT_MB
