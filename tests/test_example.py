"""examples/train_digits.py: its metrics against pytorch-metric-learning's, its sampler,
a short in-process run and a 2-process torchrun run (same curves as one process)."""

import csv
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import train_digits as td

TINY = ["--epochs", "1", "--max-batches", "3", "--backend", "torch", "--no-progress"]


def _need_example_extras():
    for module in ("sklearn", "tqdm", "matplotlib"):
        pytest.importorskip(module)


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_outputs(out, losses, epochs):
    rows = _read(out / "metrics.csv")
    assert (out / "curves.png").stat().st_size > 0
    assert [(r["loss_name"], int(r["epoch"])) for r in rows] == [(n, e) for n in losses for e in range(epochs + 1)]
    for r in rows:
        for key in ("map_at_r", "recall_at_1", "seen_map_at_r", "seen_recall_at_1"):
            assert 0.0 <= float(r[key]) <= 1.0, (key, r)
        if int(r["epoch"]) > 0:
            assert float(r["epoch_seconds"]) >= float(r["loss_seconds"]) > 0.0
            assert math.isfinite(float(r["train_loss"]))
    return rows


# ----------------------------------------------------------------------------- metrics
def _on_circle(degrees):
    t = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([t.cos(), t.sin()], dim=1)


# class 0 at 0, 12, 40 degrees, class 1 at 21, 63, 95, and a lone class-2 sample at 180.
# Nearest others (angular distance) and AP over the R = 2 nearest:
#   a0: a1 b0 -> 1/2      a1: b0 a0 -> (1/2)/2     a2: b0 b1 -> 0
#   b0: a1 a2 -> 0        b1: a2 b2 -> (1/2)/2     b2: b1 a2 -> 1/2
# MAP@R = (0.5 + 0.25 + 0 + 0 + 0.25 + 0.5) / 6 = 0.25; R@1 = 2/6 (a0 and b2);
# the lone query is skipped by both.
HAND_EMB = _on_circle([0, 12, 40, 21, 63, 95, 180])
HAND_LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2])


def test_metrics_by_hand():
    assert td.map_at_r(HAND_EMB, HAND_LABELS) == pytest.approx(0.25, abs=1e-12)
    assert td.recall_at_1(HAND_EMB, HAND_LABELS) == pytest.approx(1 / 3, abs=1e-12)
    # scale does not matter (cosine), and a perfect embedding scores 1
    assert td.map_at_r(5 * HAND_EMB, HAND_LABELS) == pytest.approx(0.25, abs=1e-12)
    perfect = _on_circle([0, 1, 2, 120, 121, 122, 240])
    assert td.map_at_r(perfect, HAND_LABELS) == 1.0 and td.recall_at_1(perfect, HAND_LABELS) == 1.0


def _pml_metrics(emb, labels):
    acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = acc.AccuracyCalculator(
        include=("mean_average_precision_at_r", "precision_at_1"),
        device=torch.device("cpu"),
        knn_func=CustomKNN(CosineSimilarity()),
        kmeans_func=lambda *a: None,
    )
    got = calc.get_accuracy(emb.float(), labels, emb.float(), labels, ref_includes_query=True)
    return got["mean_average_precision_at_r"], got["precision_at_1"]


def test_metrics_match_pytorch_metric_learning():
    assert _pml_metrics(HAND_EMB, HAND_LABELS) == pytest.approx((0.25, 1 / 3), abs=1e-6)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 5, (80,), generator=g)
        emb = torch.randn(80, 6, generator=g) + 0.8 * torch.nn.functional.one_hot(labels, 6).float()
        ours = (td.map_at_r(emb, labels), td.recall_at_1(emb, labels))
        assert ours == pytest.approx(_pml_metrics(emb, labels), abs=1e-12)


# ----------------------------------------------------------------------------- sampler
def test_sampler_batches_are_m_per_class_and_reproducible():
    labels = torch.arange(5).repeat_interleave(torch.tensor([30, 31, 30, 33, 30]))
    a = list(td.MPerClassBatches(labels, 20, 5, num_batches=7, seed=3))
    b = list(td.MPerClassBatches(labels, 20, 5, num_batches=7, seed=3))
    c = list(td.MPerClassBatches(labels, 20, 5, num_batches=7, seed=4))
    assert len(a) == 7 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    for batch in a:
        assert len(batch) == 20 and len(batch.unique()) == 20
        assert sorted(torch.bincount(labels[batch], minlength=5).tolist()) == [0, 5, 5, 5, 5]
    # one pass of 154 // 25 = 6 batches of 5 x 5 draws every class without repeats
    full = torch.cat(list(td.MPerClassBatches(labels, 25, 5, num_batches=6, seed=0)))
    assert len(full.unique()) == 150


# ----------------------------------------------------------------------------- data
def test_seen_class_test_split_is_fixed_disjoint_and_a_quarter():
    pytest.importorskip("sklearn")
    (x_tr, y_tr), (x_te, y_te), (x_se, y_se) = td.load_digits_split()
    again = td.load_digits_split()
    assert torch.equal(x_se, again[2][0]) and torch.equal(x_tr, again[0][0])
    assert set(y_te.tolist()) == {5, 6, 7, 8, 9} and set(y_se.tolist()) == set(y_tr.tolist()) == {0, 1, 2, 3, 4}
    for c in td.TRAIN_CLASSES:
        n_seen, n_train = int((y_se == c).sum()), int((y_tr == c).sum())
        assert n_seen == round(0.25 * (n_seen + n_train))
    # no held-out image is a training image (the digits data has no exact duplicates across these rows)
    assert not (torch.cdist(x_se, x_tr).min(dim=1).values == 0).any()
    assert len(y_tr) + len(y_te) + len(y_se) == 1797


def test_augmentation_is_seeded_and_identity_at_zero():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(td.random_affine(6, 0.5, g1), td.random_affine(6, 0.5, g2))
    img = td.as_images(torch.rand(4, 64), "conv")
    assert img.shape == (4, 1, 16, 16)
    same = td.warp(img, td.random_affine(4, 0.0, g1))
    assert torch.allclose(same, img, atol=1e-5)


# ----------------------------------------------------------------------------- runs
def test_smoke_run(tmp_path):
    _need_example_extras()
    pytest.importorskip("pytorch_metric_learning")
    losses = ["pnp", "pml-pnp", "smooth-ap"]
    assert td.main(["--loss", *losses, "--out", str(tmp_path), *TINY]) == 0
    rows = _check_outputs(tmp_path, losses, 1)
    by = {(r["loss_name"], r["epoch"]): r for r in rows}
    # same seed: same initial weights, same batches -> same untrained metrics; pml-pnp = pnp up to rounding
    assert by["pnp", "0"]["map_at_r"] == by["pml-pnp", "0"]["map_at_r"]
    assert float(by["pnp", "1"]["map_at_r"]) == pytest.approx(float(by["pml-pnp", "1"]["map_at_r"]), abs=1e-4)
    assert float(by["pnp", "1"]["train_loss"]) == pytest.approx(float(by["pml-pnp", "1"]["train_loss"]), rel=1e-4)


def test_smooth_ap_square_batches_and_memory(tmp_path):
    _need_example_extras()
    pytest.importorskip("pytorch_metric_learning")
    square = ["--batch-size", "25", "--m-per-class", "5"]
    assert td.main(["--loss", "smooth-ap", "pml-smooth-ap", *square, "--out", str(tmp_path / "s"), *TINY]) == 0
    rows = _check_outputs(tmp_path / "s", ["smooth-ap", "pml-smooth-ap"], 1)
    assert float(rows[1]["train_loss"]) == pytest.approx(float(rows[3]["train_loss"]), rel=1e-4)
    assert td.main(["--loss", "pnp", "--memory-size", "60", "--out", str(tmp_path / "m"), *TINY]) == 0
    assert _check_outputs(tmp_path / "m", ["pnp"], 1)[1]["memory_size"] == "60"


def test_chunk_size_gives_the_plain_steps_metrics_and_recall_at_k_runs(tmp_path):
    """--chunk-size 7 (two_pass_step, chunks of 7, 7, ..., 5 on a batch of 40) follows the plain step to
    float rounding; --loss recall-at-k reports its metrics beside PNP's."""
    _need_example_extras()
    losses = ["pnp", "recall-at-k"]
    assert td.main(["--loss", *losses, "--out", str(tmp_path / "plain"), *TINY]) == 0
    assert td.main(["--loss", *losses, "--chunk-size", "7", "--out", str(tmp_path / "chunked"), *TINY]) == 0
    plain = _check_outputs(tmp_path / "plain", losses, 1)
    chunked = _check_outputs(tmp_path / "chunked", losses, 1)
    assert {r["chunk_size"] for r in plain} == {"0"} and {r["chunk_size"] for r in chunked} == {"7"}
    assert plain[2]["options"].startswith("k=1,2,4,8,16 temperature=0.01")
    for a, b in zip(plain, chunked):
        for key in ("map_at_r", "recall_at_1", "seen_map_at_r", "seen_recall_at_1"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4), (key, a, b)
        if a["train_loss"]:
            assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-5)
    # the two losses train different nets from the same start
    assert plain[0]["map_at_r"] == plain[2]["map_at_r"] and plain[1]["train_loss"] != plain[3]["train_loss"]


def test_bad_options_exit_with_a_message(monkeypatch):
    pytest.importorskip("sklearn")
    for argv, words in (
        (["--loss", "pml-smooth-ap"], "--batch-size 25 --m-per-class 5"),
        (["--batch-size", "60", "--m-per-class", "10"], "6 classes"),
        (["--batch-size", "42", "--m-per-class", "8"], "multiple"),
        (["--chunk-size", "-1"], "--chunk-size"),
    ):
        with pytest.raises(SystemExit, match=words):
            td.main(argv + ["--out", "unused"])
    # refused before torch.distributed is initialised (as under torchrun: RANK and WORLD_SIZE set)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="pml-pnp not supported"):
        td.main(["--distributed", "--loss", "pnp", "pml-pnp", "--out", "unused"])
    assert not torch.distributed.is_initialized()


def test_torchrun_two_processes_match_one(tmp_path):
    _need_example_extras()
    options = ["--loss", "pnp", "smooth-ap", "--memory-size", "80", *TINY]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "examples" / "train_digits.py"),
        "--distributed",
        *options,
        "--out",
        str(tmp_path / "ddp"),
    ]
    # own session, so that a hang kills torchrun and both workers, never leaves them behind
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun run hung (killed after 120 s):\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    ddp = _check_outputs(tmp_path / "ddp", ["pnp", "smooth-ap"], 1)
    assert {r["world_size"] for r in ddp} == {"2"}
    assert td.main([*options, "--out", str(tmp_path / "one")]) == 0
    one = _read(tmp_path / "one" / "metrics.csv")
    for a, b in zip(ddp, one):
        assert (a["loss_name"], a["epoch"]) == (b["loss_name"], b["epoch"])
        for key in ("map_at_r", "recall_at_1"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4), (a, b)
        if a["train_loss"]:
            assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4)
