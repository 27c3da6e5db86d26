"""``scripts/benchmark.py quality`` end to end on a tiny CIFAR-like tar (2 classes x 20 JPEGs, the shared
tar's member layout): curve points at two budgets are snapshots of one run, the rows and the plot are
written, a re-run resumes from the cached points, fine-tuning from the UM-MAE checkpoint and from scratch
give rows, and the lightly peer (when lightly is installed) trains in sslkit's loop."""

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from benchmarks import quality  # noqa: E402

TINY = ["data.batch_size=8", "data.num_workers=0", "trainer.log_every=1", "trainer.ckpt_every=1000",
        "trainer.knn_every=null"]


def _tar(path: Path, classes=("cat", "dog"), per_class=20) -> Path:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for c, name in enumerate(classes):
            for i in range(per_class):
                arr = (rng.random((32, 32, 3)) * 80 + 120 * c).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"cifar10/train/{name}/{i:04d}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    return path


def _args(tmp_path, data, **kw):
    ns = dict(data=str(data), runs=str(tmp_path / "runs"), models="umae", budgets="0.5,1", override=TINY,
              finetune_epochs=0, finetune_override=None, plot=None, out=str(tmp_path / "q.json"))
    ns.update(kw)
    import argparse

    return argparse.Namespace(**ns)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _tar(tmp_path_factory.mktemp("cifar") / "tiny.tar")


def test_curve_rows_plot_resume_and_finetune(tmp_path, data, monkeypatch):
    torch.set_num_threads(1)
    args = _args(tmp_path, data, finetune_epochs=0.5,
                 finetune_override=["data.batch_size=8", "data.num_workers=0", "trainer.ckpt_every=1000"])
    rows = quality.quality(args)
    get = {(r["model"], r["variant"], r["metric"]): r["value"] for r in rows}
    # 36 train images / batch 8 = 4 steps per epoch: the snapshots are steps 2 and 4 of one 4-step run
    assert get[("umae_pvt", "pretrained@0.5ep", "steps")] == 2
    assert get[("umae_pvt", "pretrained@1ep", "steps")] == 4
    assert get[("umae_pvt", "pretrained@1ep", "cpu_s")] > get[("umae_pvt", "pretrained@0.5ep", "cpu_s")] > 0
    for variant in ("pretrained@0.5ep", "pretrained@1ep", "random_init"):
        for metric in ("knn_top1", "linear_top1"):
            assert 0.0 <= get[("umae_pvt", variant, metric)] <= 100.0
    assert ("pixels", "raw_pixels", "knn_top1") in get
    for variant in ("finetune_pretrained", "finetune_scratch"):
        assert 0.0 <= get[("umae_pvt", variant, "top1")] <= 100.0
        assert get[("umae_pvt", variant, "epochs")] == 0.5
    runs = tmp_path / "runs"
    ft = json.loads((runs / "cifar10_finetune_pretrained" / "quality_point.json").read_text())
    assert ft["step"] == 2
    ckpt = torch.load(runs / "cifar10_finetune_scratch" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["config"]["method"]["checkpoint"] is None  # scratch really is from scratch
    ckpt = torch.load(runs / "cifar10_finetune_pretrained" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["config"]["method"]["checkpoint"].endswith("cifar10_umae/checkpoints/last.pt")
    snaps = sorted(p.name for p in (runs / "cifar10_umae" / "checkpoints").glob("budget_*.pt"))
    assert snaps == ["budget_0.5ep.pt", "budget_1ep.pt"]
    assert torch.load(runs / "cifar10_umae" / "checkpoints" / "budget_0.5ep.pt", weights_only=True)["step"] == 2

    png = quality.plot(rows, tmp_path / "curves.png")
    assert Image.open(png).size[0] > 400

    # a re-run trains and evaluates nothing: every point is cached
    monkeypatch.setattr(quality, "train", lambda *a, **k: pytest.fail("re-run trained again"))
    monkeypatch.setattr(quality, "evaluate_encoders", lambda *a, **k: pytest.fail("re-run evaluated again"))
    monkeypatch.setattr(quality, "run_finetune", lambda *a, **k: pytest.fail("re-run fine-tuned again"))
    again = quality.quality(args)
    assert again == rows


def test_budgets_are_checked():
    assert quality.parse_budgets("4,1,2,2") == [1.0, 2.0, 4.0]
    assert quality.model_budgets("1,2", ["umae", "dinov2"]) == {"umae": [1.0, 2.0], "dinov2": [1.0, 2.0]}
    assert quality.model_budgets("dinov2=3,1;", ["umae", "dinov2"]) == {"umae": [1.0, 2.0, 4.0, 8.0],
                                                                       "dinov2": [1.0, 3.0]}
    with pytest.raises(SystemExit, match="<model>=<epochs>"):
        quality.model_budgets("simclr=1,2", ["umae"])
    for bad in ("0,1", "a", ""):
        with pytest.raises(SystemExit, match="--budgets"):
            quality.parse_budgets(bad)


@pytest.fixture
def peer():
    """benchmarks.peer, whose method (lightly_dinov2) is unregistered afterwards: Hydra hands its ConfigStore to
    launcher jobs (submitit pickles it), and a job process cannot import scripts/benchmarks."""
    pytest.importorskip("lightly")
    from hydra.core.config_store import ConfigStore

    from benchmarks import peer
    from sslkit.methods import METHODS

    METHODS.setdefault(peer.LightlyDINOv2.name, peer.LightlyDINOv2)  # registered on first import only
    yield peer
    METHODS.pop(peer.LightlyDINOv2.name, None)
    ConfigStore.instance().repo.get("method", {}).pop(f"{peer.LightlyDINOv2.name}_schema.yaml", None)


def test_the_peer_trains_in_sslkit_loop_from_sslkit_init(tmp_path, data, peer):
    from sslkit.methods import build_method

    cfg = quality.pretrain_config("lightly", str(data), 1, TINY)
    torch.manual_seed(0)
    method = build_method(cfg)
    assert isinstance(method, peer.LightlyDINOv2)
    torch.manual_seed(0)
    reference = build_method(quality.pretrain_config("dinov2", str(data), 1, TINY))
    ours = method.student["backbone"].vit.state_dict()
    for k, v in reference.backbone.state_dict().items():  # the same initial weights as the sslkit ViT
        if k != "mask_token":
            assert torch.equal(ours[k], v), k
    images = torch.randn(4, 3, 32, 32)
    assert torch.allclose(method.features(images), reference.features(images), atol=1e-5)
    rows = quality.run_curve("lightly", str(data), tmp_path / "runs", [1], TINY)
    get = {(r["variant"], r["metric"]): r["value"] for r in rows}
    assert get[("lightly@1ep", "steps")] == 4 and 0 <= get[("lightly@1ep", "knn_top1")] <= 100
    assert not any(r["variant"] == "random_init" for r in rows)  # shared with the sslkit DINOv2 row


def test_cost_of_a_resumed_segment_counts_the_killed_steps_at_its_rate() -> None:
    # cached cost covers steps 0..100 (50 CPU-s); a killed process got to a checkpoint at step 150, and the
    # resumed segment runs 150..250 in 40 CPU-s: the 50 lost steps count at 0.4 s/step
    cost = {"steps": 100, "estimated_steps": 0, "cpu_s": 50.0, "wall_s": 30.0}
    out = quality._add_segment(cost, 150, 250, 40.0, 20.0)
    assert out == {"steps": 250, "estimated_steps": 50, "cpu_s": 50.0 + 60.0, "wall_s": 30.0 + 30.0}
    # an uninterrupted segment adds its own cost only
    assert quality._add_segment(out, 250, 300, 10.0, 5.0) == {"steps": 300, "estimated_steps": 50,
                                                               "cpu_s": 120.0, "wall_s": 65.0}
