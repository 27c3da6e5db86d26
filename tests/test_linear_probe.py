"""Linear probe: the one-pass lr sweep equals separate runs (and torch.optim.SGD), lr selection never
looks at val, accuracy on separable / random data, label checks, and ``sslkit-eval linear`` end to end."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sslkit.cli import eval_main
from sslkit.config import compose
from sslkit.evaluation import eval_knn, eval_linear
from sslkit.tasks import run_pretrain
from sslkit.errors import DataError
from sslkit.evaluation import (DEFAULT_LRS, holdout_split, linear_batches, linear_probe, score_heads,
                               train_linear_heads)

FAST = ["logger.wandb.mode=disabled", "trainer.progress=false", "trainer.summary=false", "data.num_workers=0",
        "data.num_samples=64", "data.batch_size=8", "trainer.max_steps=2"]


def gaussians(n, dim, k, sep, seed, centres_seed=123):
    """L2-normalized class-conditional Gaussians; labels ``i % k`` shuffled."""
    centres = torch.randn(k, dim, generator=torch.Generator().manual_seed(centres_seed)) * sep
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n)[torch.randperm(n, generator=g)] % k
    return F.normalize(centres[y] + torch.randn(n, dim, generator=g), dim=1), y


# ----------------------------------------------------------------------------------------- accuracy
def test_separable_gaussians_reach_100():
    trf, try_ = gaussians(600, 32, 5, sep=3.0, seed=1)
    vf, vy = gaussians(300, 32, 5, sep=3.0, seed=2)
    res = linear_probe(trf, try_, vf, vy, 5, epochs=20)
    assert res["top1"] >= 99.0 and res["top5"] == 100.0
    assert res["holdout_top1"] >= 99.0
    assert len(res["per_lr"]) == len(DEFAULT_LRS) and res["lr"] in DEFAULT_LRS
    p = res["protocol"]
    assert p["fit_samples"] + p["holdout_samples"] == 600 and p["holdout_samples"] == 60 and p["val_samples"] == 300


def test_random_labels_stay_near_chance():
    trf, _ = gaussians(800, 32, 4, sep=3.0, seed=1)
    vf, _ = gaussians(1000, 32, 4, sep=3.0, seed=2)
    g = torch.Generator().manual_seed(5)
    try_, vy = torch.randint(0, 4, (800,), generator=g), torch.randint(0, 4, (1000,), generator=g)
    res = linear_probe(trf, try_, vf, vy, 4, epochs=20)
    assert 15.0 <= res["top1"] <= 35.0  # chance 25%
    assert all(15.0 <= d["val_top1"] <= 35.0 for d in res["per_lr"])


# ----------------------------------------------------------------------------------------- the sweep
def test_sweep_equals_each_lr_alone():
    """The key property of the one-pass sweep: head l of a many-lr run is the run with lrs[l] alone."""
    x, y = gaussians(300, 24, 6, sep=0.5, seed=3)
    lrs = (1e-3, 0.03, 0.3, 3.0)
    W, b = train_linear_heads(x, y, 6, lrs, epochs=4, batch_size=64, weight_decay=1e-3, seed=7)
    assert W.shape == (4, 24, 6) and b.shape == (4, 6)
    for i, lr in enumerate(lrs):
        W1, b1 = train_linear_heads(x, y, 6, (lr,), epochs=4, batch_size=64, weight_decay=1e-3, seed=7)
        torch.testing.assert_close(W[i], W1[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b[i], b1[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(W[0], W[-1])  # the heads did train differently
    # the same through linear_probe: every per-lr result equals the single-lr probe's
    vf, vy = gaussians(200, 24, 6, sep=0.5, seed=4)
    sweep = linear_probe(x, y, vf, vy, 6, lrs=lrs, epochs=4, batch_size=64, seed=7)
    for d in sweep["per_lr"]:
        alone = linear_probe(x, y, vf, vy, 6, lrs=(d["lr"],), epochs=4, batch_size=64, seed=7)["per_lr"][0]
        for key in ("holdout_top1", "val_top1", "val_top5"):
            assert d[key] == alone[key], (d["lr"], key)
        assert d["holdout_loss"] == pytest.approx(alone["holdout_loss"], rel=1e-5)


def test_heads_equal_torch_sgd_with_cosine_schedule():
    """Each head is exactly nn.Linear + torch.optim.SGD(momentum 0.9) + CosineAnnealingLR per iteration
    on F.cross_entropy, over the same batches from the same init."""
    x, y = gaussians(200, 16, 5, sep=1.0, seed=3)
    lrs, epochs, bs, wd = (0.01, 0.5), 3, 48, 1e-2
    W, b = train_linear_heads(x, y, 5, lrs, epochs=epochs, batch_size=bs, weight_decay=wd, seed=2)
    W0, b0 = train_linear_heads(x, y, 5, lrs, epochs=0, batch_size=bs, seed=2)  # the init
    assert torch.equal(W0[0], W0[1]) and float(W0.std()) == pytest.approx(0.01, rel=0.3) and not b0.any()
    total = epochs * math.ceil(200 / bs)
    for i, lr in enumerate(lrs):
        lin = torch.nn.Linear(16, 5)
        with torch.no_grad():
            lin.weight.copy_(W0[i].T)
            lin.bias.copy_(b0[i])
        opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.0)
        steps = 0
        for idx in linear_batches(200, bs, epochs, seed=2):
            opt.zero_grad()
            F.cross_entropy(lin(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
            steps += 1
        assert steps == total
        torch.testing.assert_close(W[i], lin.weight.detach().T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[i], lin.bias.detach(), rtol=1e-4, atol=1e-5)


def test_diverged_head_is_isolated_and_never_selected():
    x, y = gaussians(200, 16, 4, sep=2.0, seed=1)
    vf, vy = gaussians(100, 16, 4, sep=2.0, seed=2)
    res = linear_probe(x, y, vf, vy, 4, lrs=(0.1, 1e38), epochs=3)
    assert res["per_lr"][1]["diverged"] and res["per_lr"][1]["val_top1"] is None
    assert not res["per_lr"][0]["diverged"] and res["lr"] == 0.1
    assert res["per_lr"][0] == linear_probe(x, y, vf, vy, 4, lrs=(0.1,), epochs=3)["per_lr"][0]
    json.dumps(res, allow_nan=False)  # diverged metrics are null, not NaN


# ----------------------------------------------------------------------------------------- selection
def test_lr_selection_never_uses_val():
    """Permuting the val labels (or replacing the val features) changes val accuracy, never the choice."""
    trf, try_ = gaussians(400, 32, 4, sep=0.4, seed=1)
    vf, vy = gaussians(300, 32, 4, sep=0.4, seed=2)
    lrs = (1e-4, 1e-3, 1e-2, 0.1, 1.0)
    base = linear_probe(trf, try_, vf, vy, 4, lrs=lrs, epochs=10)
    perm = vy[torch.randperm(len(vy), generator=torch.Generator().manual_seed(0))]
    other_f, _ = gaussians(300, 32, 4, sep=0.4, seed=9)
    for vf2, vy2 in ((vf, perm), (other_f, vy), (vf[:50], vy[:50])):
        res = linear_probe(trf, try_, vf2, vy2, 4, lrs=lrs, epochs=10)
        assert res["lr"] == base["lr"] and res["holdout_top1"] == base["holdout_top1"]
        assert [d["holdout_top1"] for d in res["per_lr"]] == [d["holdout_top1"] for d in base["per_lr"]]
        assert [d["holdout_loss"] for d in res["per_lr"]] == [d["holdout_loss"] for d in base["per_lr"]]
    assert linear_probe(trf, try_, vf, perm, 4, lrs=lrs, epochs=10)["top1"] < base["top1"] - 10
    # the held-out part is train only, stratified, and the fitted heads never saw it
    fit, hold = holdout_split(try_, 0.1, seed=0)
    assert len(hold) == 40 and set(fit.tolist()).isdisjoint(hold.tolist()) and len(fit) + len(hold) == 400
    assert torch.bincount(try_[hold], minlength=4).tolist() == [10, 10, 10, 10]


def test_deterministic_given_seed():
    trf, try_ = gaussians(300, 16, 3, sep=0.5, seed=1)
    vf, vy = gaussians(100, 16, 3, sep=0.5, seed=2)
    a = linear_probe(trf, try_, vf, vy, 3, epochs=5, seed=3)
    assert a == linear_probe(trf, try_, vf, vy, 3, epochs=5, seed=3)
    assert not torch.equal(holdout_split(try_, 0.1, 3)[1], holdout_split(try_, 0.1, 4)[1])


def test_score_heads_top5_counts_any_of_five():
    W = torch.zeros(1, 2, 6)
    W[0, 0] = torch.tensor([6.0, 5, 4, 3, 2, 1])  # class order 0 > 1 > ... > 5 for x = (1, 0)
    x = torch.tensor([[1.0, 0.0]] * 3)
    s = score_heads(x, torch.tensor([0, 4, 5]), W, torch.zeros(1, 6))
    assert s["top1"].tolist() == pytest.approx([100 / 3]) and s["top5"].tolist() == pytest.approx([200 / 3])


# ----------------------------------------------------------------------------------------- label checks
def test_val_classes_missing_from_train_are_named():
    trf, try_ = gaussians(100, 8, 2, sep=1.0, seed=1)
    vf, vy = gaussians(30, 8, 3, sep=1.0, seed=2)
    with pytest.raises(DataError, match=r"never occur in the train split: 2 \(zebra\)"):
        linear_probe(trf, try_, vf, vy, 3, epochs=1, class_names=["cat", "dog", "zebra"])


def test_empty_and_unlabelled_splits_fail_loudly():
    trf, try_ = gaussians(100, 8, 2, sep=1.0, seed=1)
    with pytest.raises(DataError, match="val split is empty"):
        linear_probe(trf, try_, trf[:0], try_[:0], 2, epochs=1)
    with pytest.raises(DataError, match="train split is empty"):
        linear_probe(trf[:0], try_[:0], trf, try_, 2, epochs=1)
    with pytest.raises(DataError, match="unlabelled"):
        linear_probe(trf, try_ - 1, trf, try_, 2, epochs=1)


# ----------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("pvt")
    run_pretrain(compose(FAST + ["model=sslkit_pvt_test"]), d)
    return d / "checkpoints" / "last.pt"


def test_eval_main_linear_writes_json(ckpt, tmp_path, capsys):
    out = tmp_path / "r.json"
    eval_main(["linear", f"checkpoint={ckpt}", "epochs=5", f"out={out}"])
    r = json.loads(out.read_text())
    assert r["checkpoint"] == str(ckpt) and r["eval"] == "linear" and r["method"] == "umae"
    assert r["protocol"]["epochs"] == 5 and r["protocol"]["lrs"] == list(DEFAULT_LRS)
    assert r["protocol"]["fit_samples"] + r["protocol"]["holdout_samples"] == 64  # data.num_samples
    assert r["protocol"]["val_samples"] == 1000  # synthetic val: 1000 images of seed + 1000
    assert r["lr"] in DEFAULT_LRS and 0.0 <= r["top1"] <= r["top5"] <= 100.0
    assert [d["lr"] for d in r["per_lr"]] == list(DEFAULT_LRS)
    assert "linear probe" in capsys.readouterr().out


def test_eval_linear_custom_lrs(ckpt):
    r = eval_linear(ckpt, [], lrs=[0.01, 0.1], epochs=2)
    assert [d["lr"] for d in r["per_lr"]] == [0.01, 0.1] and r["lr"] in (0.01, 0.1)


@pytest.mark.parametrize("argv, msg", [
    (["linear"], "needs checkpoint="),
    (["linear", "checkpoint=/nonexistent/last.pt"], "does not exist"),
    (["lin", "checkpoint=x.pt"], "unknown subcommand 'lin'"),
    ([], "sslkit-eval linear checkpoint="),
    (["linear", "checkpoint=x.pt", "epoch=5"], "does not take ['epoch']"),
])
def test_eval_main_errors_exit_2(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        eval_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err
    if not argv or argv[0] == "lin":
        assert "sslkit-eval knn" in err and "sslkit-eval linear" in err


def _image_folder(root, counts):
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_eval_linear_val_class_missing_from_train(ckpt, tmp_path):
    """Class ``rare`` has one image: val_fraction=0.5 puts it in val only -> DataError naming it."""
    d = _image_folder(tmp_path / "imgs", {"common": 4, "rare": 1})
    data = ["data=image_folder", f"data.path={d}", "data.val_fraction=0.5", "data.num_workers=0", "data.batch_size=4"]
    with pytest.raises(DataError, match=r"1 \(rare\)"):
        eval_linear(ckpt, data, epochs=1)
    with pytest.raises(DataError, match=r"never occur in the train split: 1 \(rare\). kNN cannot predict"):
        eval_knn(ckpt, data)
    with pytest.raises(DataError, match="data.split=val .* is empty"):  # no val images at all
        eval_linear(ckpt, data[:2] + ["data.val_fraction=0.0", "data.num_workers=0"], epochs=1)
