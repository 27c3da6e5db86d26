"""Distributed training on CPU / gloo with 2 processes: DDP equals one process at the same global batch,
2-rank save -> resume is exact; the loader's rank-independent batches and cross-world-size resume;
launch-environment parsing (torchrun, SLURM node lists)."""

from __future__ import annotations

import json
import os
import tempfile
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp_mp

from sslkit import checkpoint as ck
from sslkit import distributed as D
from sslkit.config import DataConfig, MultiCropViewConfig, ViewConfig
from sslkit.data import build_pretrain_loader, build_source
from sslkit.errors import ConfigError
from sslkit.masking import BlockMasking, UniformMasking

FAST = ["logger.wandb.mode=disabled", "trainer.progress=false", "trainer.summary=false", "data.num_workers=0",
        "trainer.log_every=1", "trainer.ckpt_every=100", "data.num_samples=32", "optim.warmup_steps=1"]
UMAE = ["experiment=umae_demo", "trainer.max_steps=4", *FAST]
# KoLeo is per device (as in DINOv2), so it is left out of the loss for the comparison with one process;
# the last head layer is frozen for the first 2 of 4 steps (DDP: unused parameters, then used)
DINO = ["experiment=dinov2_demo", "trainer.max_steps=4", "method.koleo_loss_weight=0",
        "method.freeze_last_layer_epochs=0.5", "model.drop_path_rate=0", *FAST]


# ----------------------------------------------------------------------------------------- launch env
def test_expand_nodelist() -> None:
    assert D.expand_nodelist("node[01-04,07]") == ["node01", "node02", "node03", "node04", "node07"]
    assert D.expand_nodelist("a1,gpu[8-10],b") == ["a1", "gpu8", "gpu9", "gpu10", "b"]
    assert D.expand_nodelist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    assert D.expand_nodelist("single") == ["single"]


def test_detect_torchrun_slurm_and_none() -> None:
    e = D.detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.launcher, e.master_addr, e.master_port) == (3, 8, 1, "torchrun", "h", 1234)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "PATH": ""}
    e = D.detect(slurm)
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (5, 8, 1, "slurm")
    assert e.master_port == 15000 + 123456 % 20000
    if not __import__("shutil").which("scontrol"):
        assert e.master_addr == "gpu07"
    e = D.detect({**slurm, "MASTER_PORT": "999", "MASTER_ADDR": "x"})
    assert (e.master_addr, e.master_port) == ("x", 999)
    assert D.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "none"  # one task: no group
    assert D.detect({}).world_size == 1


def test_single_strategy_refuses_several_processes() -> None:
    with pytest.raises(ConfigError, match="trainer.strategy=ddp"):
        D.setup("single", torch.device("cpu"), environ={"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="single, ddp, fsdp"):
        D.setup("dp", torch.device("cpu"))


def test_fsdp_with_fp16_is_refused_before_sharding() -> None:
    env = D.LaunchEnv(rank=0, world_size=2, local_rank=0, launcher="torchrun", master_addr="h", master_port=1)
    dd = D.Dist("fsdp", env, torch.device("cpu"), owns_group=False)
    with pytest.raises(ConfigError, match="precision=bf16"):
        dd.wrap(torch.nn.Linear(2, 2), torch.float16)


# ----------------------------------------------------------------------------------------- loader
def _take(ld, n):
    return list(islice(iter(ld), n))


@pytest.mark.parametrize("kind", ["mae", "multicrop"])
def test_two_ranks_see_the_single_process_batch(kind: str) -> None:
    """Rank r's batch g = rows r, r+2, ... of the batch g of one process with twice the batch: the same
    samples, crops and masks (nothing depends on the rank)."""
    if kind == "mae":
        view, mask = ViewConfig(size=32), UniformMasking(grid=(4, 4))
    else:
        view, mask = MultiCropViewConfig(size=16, local_size=8, n_local=2), BlockMasking(grid=(4, 4), min_patches=1)
    cfg = DataConfig(num_samples=24, image_size=32, batch_size=6, num_workers=0)
    src = build_source(cfg)
    with build_pretrain_loader(src, cfg, view, mask, seed=3) as ld:
        ref = _take(ld, 5)  # 4 batches per epoch: crosses an epoch
    half = DataConfig(num_samples=24, image_size=32, batch_size=3, num_workers=0)
    for r in range(2):
        with build_pretrain_loader(src, half, view, mask, seed=3, rank=r, world_size=2) as ld:
            got = _take(ld, 5)
        for a, b in zip(ref, got):
            assert a.keys() == b.keys()
            for k in a:
                n_rows = a[k].shape[0] // 6  # views / global crops per sample (view-major rows)
                rows = a[k].view(n_rows, 6, *a[k].shape[1:])[:, r::2].reshape(-1, *a[k].shape[1:])
                assert torch.equal(rows, b[k]), k


def test_resume_at_another_world_size_continues_the_epoch() -> None:
    cfg2 = DataConfig(num_samples=40, image_size=32, batch_size=4, num_workers=0)  # global batch 8: 5 per epoch
    src = build_source(cfg2)
    view = ViewConfig(size=32)
    seen = []
    states = []
    for r in range(2):
        with build_pretrain_loader(src, cfg2, view, None, seed=1, rank=r, world_size=2) as ld:
            seen += torch.cat([b["index"] for b in _take(ld, 2)]).tolist()
            states.append(ld.state_dict())
    assert states[0] == {**states[1], "world_size": 2}
    st = states[0]
    assert (st["epoch"], st["sample_in_epoch"], st["samples_consumed"], st["batches_consumed"]) == (0, 16, 16, 2)
    # one process with batch 12 continues: the rest of epoch 0 is 24 samples = 2 batches, no repeats
    cfg1 = DataConfig(num_samples=40, image_size=32, batch_size=12, num_workers=0)
    with build_pretrain_loader(src, cfg1, view, None, seed=1, start_state=st) as ld:
        rest = _take(ld, 3)
        st1 = ld.state_dict()
    epoch0 = seen + torch.cat([b["index"] for b in rest[:2]]).tolist()
    assert sorted(epoch0) == list(range(40))  # the whole epoch exactly once
    assert (st1["epoch"], st1["sample_in_epoch"], st1["samples_consumed"], st1["batches_consumed"]) == (1, 12, 52, 5)
    perm1 = ld.epoch_indices(1)
    assert torch.equal(rest[2]["index"], perm1[:12])  # then epoch 1 from its start
    # a resume with 3 ranks x 4 after 16 samples: 24 left = 2 batches of 12, then epoch 1
    with build_pretrain_loader(src, cfg2, view, None, seed=1, rank=2, world_size=3, start_state=st) as ld:
        assert ld.state_dict()["sample_in_epoch"] == 16
        _take(ld, 2)
        assert (ld.state_dict()["epoch"], ld.state_dict()["sample_in_epoch"]) == (1, 0)


# ----------------------------------------------------------------------------------------- 2 processes
def _worker(rank: int, world: int, store: str, jobs: list[tuple[list[str], str]]) -> None:
    """One rank; the group meets through a file store (no port picked in advance that another process
    could take before the group binds it)."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), WANDB_MODE="disabled")
    torch.set_num_threads(1)
    from sslkit.config import compose
    from sslkit.tasks import run_pretrain

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for overrides, run_dir in jobs:
            run_pretrain(compose(overrides), run_dir)
    finally:
        dist.destroy_process_group()


def _spawn(jobs: list[tuple[list[str], str]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp_mp.spawn(_worker, args=(2, str(Path(d) / "store"), jobs), nprocs=2, join=True)


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _model(run: Path) -> dict[str, torch.Tensor]:
    return ck.load(run / "checkpoints" / "last.pt")["model"]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=1e-4), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One spawn of 2 gloo processes runs every distributed job; the single-process references run here."""
    from sslkit.config import compose
    from sslkit.tasks import run_pretrain

    root = tmp_path_factory.mktemp("dist")
    ddp = ["trainer.strategy=ddp", "data.batch_size=4"]
    fsdp = ["trainer.strategy=fsdp", "data.batch_size=4"]
    accum = ["trainer.accum_steps=2", "data.batch_size=2"]
    _spawn([
        (UMAE + ddp + accum + ["trainer.stop_after=2"], str(root / "umae_ddp")),
        (UMAE + ddp + accum, str(root / "umae_ddp")),  # resume=auto from step 2 on 2 ranks
        (DINO + ddp, str(root / "dino_ddp")),
        (DINO + fsdp + ["trainer.stop_after=2"], str(root / "dino_fsdp")),
        (DINO + fsdp + ["trainer.summary=true", "trainer.knn_every=4", "trainer.knn_train_samples=32",
                        "trainer.knn_val_samples=16"], str(root / "dino_fsdp")),  # resume; online kNN on shards
    ])
    run_pretrain(compose(UMAE + ["trainer.accum_steps=2", "data.batch_size=4"]), root / "umae_single")
    run_pretrain(compose(DINO + ["data.batch_size=8"]), root / "dino_single")
    return root


def test_ddp_umae_with_accumulation_and_resume_equals_one_process(runs: Path) -> None:
    """2 ranks x 2 images x 2 accumulated micro-steps (no_sync on the first), stopped at step 2 and resumed
    to 4 (resume=auto) == 1 uninterrupted process x 4 images x 2 micro-steps: each micro-step's global
    batch (samples, views, masks) is the same."""
    _assert_close(_model(runs / "umae_ddp"), _model(runs / "umae_single"), atol=1e-5)
    assert _losses(runs / "umae_ddp") == pytest.approx(_losses(runs / "umae_single"), rel=1e-5)
    state = ck.load(runs / "umae_ddp" / "checkpoints" / "last.pt")
    assert state["step"] == 4 and len(state["rng_ranks"]) == 2
    ds = state["data_state"]
    assert (ds["samples_consumed"], ds["batches_consumed"], ds["world_size"]) == (4 * 8, 8, 2)
    assert [json.loads(x)["step"] for x in (runs / "umae_ddp" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    cfg = (runs / "umae_ddp" / "config.yaml").read_text()
    assert "global_batch: 8" in cfg and "world_size: 2" in cfg


def test_ddp_dinov2_equals_one_process(runs: Path) -> None:
    """Sinkhorn-Knopp sums are all-reduced, so the teacher targets are the global ones; the EMA teacher
    and its buffers stay equal to the single process's (no gradient sync, no buffer broadcast)."""
    a, b = _model(runs / "dino_ddp"), _model(runs / "dino_single")
    _assert_close(a, b, atol=1e-5)
    assert not torch.equal(a["student.dino_head.weight_v"], a["teacher.dino_head.weight_v"])
    assert _losses(runs / "dino_ddp") == pytest.approx(_losses(runs / "dino_single"), rel=1e-5)


def test_fsdp2_dinov2_save_resume_equals_one_process(runs: Path) -> None:
    """FSDP2 (fully_shard) on gloo: stop at 2, resume to 4 (full state dicts gathered on rank 0 and
    re-sharded) == one process; the checkpoint has the single-process format (same model keys, optimizer
    state by parameter index); the online kNN hook runs on the sharded method; rank 0 summarizes from a
    gathered plain copy."""
    a, b = ck.load(runs / "dino_fsdp" / "checkpoints" / "last.pt"), ck.load(runs / "dino_single" / "checkpoints" / "last.pt")
    _assert_close(a["model"], b["model"], atol=1e-5)
    assert all(not hasattr(v, "placements") for v in a["model"].values())  # plain tensors, not DTensors
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for i, st in b["optimizer"]["state"].items():
        _assert_close(a["optimizer"]["state"][i], st, atol=1e-6)
    assert _losses(runs / "dino_fsdp") == pytest.approx(_losses(runs / "dino_single"), rel=1e-5)
    assert "knn_top1_pretrained" in json.loads((runs / "dino_fsdp" / "summary.json").read_text())
    last = json.loads((runs / "dino_fsdp" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and 0.0 <= last["knn_top1"] <= 100.0  # method.features through FSDP


def test_ddp_without_a_launcher_is_a_one_process_group_equal_to_single(tmp_path, monkeypatch):
    """No torchrun / SLURM environment: strategy=ddp makes its own one-process group (an in-memory store,
    no port) and trains exactly like strategy=single."""
    from sslkit.config import compose
    from sslkit.tasks import run_pretrain

    for k in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    ov = ["logger.wandb.mode=disabled", "trainer.progress=false", "trainer.summary=false", "data.num_workers=0",
          "data.num_samples=16", "data.batch_size=4", "trainer.max_steps=2"]
    run_pretrain(compose(ov), tmp_path / "single")
    run_pretrain(compose(ov + ["trainer.strategy=ddp"]), tmp_path / "ddp")
    assert not torch.distributed.is_initialized()  # the group it made is gone
    a, b = [ck.load(tmp_path / r / "checkpoints" / "last.pt")["model"] for r in ("single", "ddp")]
    for k in a:
        assert torch.equal(a[k], b[k]), k
