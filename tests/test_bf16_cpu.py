"""bf16 autocast on CPU (``trainer.precision=bf16``): the mixed-precision paths that a GPU run takes, run here.

- Every registered method trains a few steps through the real loop under bf16: finite logged terms, the
  backbone's linears really produce bf16 (autocast is on) while the parameters and optimizer state stay
  fp32 (autocast, not a cast of the model), and stop + resume gives the uninterrupted run bit for bit.
- Where the code promises fp32 under autocast it delivers it: KoLeo, Sinkhorn-Knopp, the DINO / iBOT
  cross-entropies (fp32 log-softmax), the UM-MAE / SimMIM reconstruction losses; the DINO heads are the
  FSDP units whose gradients are reduced in fp32 (mocked ``fully_shard``, and a real 2-process gloo run).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslkit import checkpoint as ck
from sslkit import distributed as D
from sslkit import engine
from sslkit.engine import train
from sslkit.methods import METHODS, build_method
from sslkit.methods import dino_losses as L
from sslkit.methods.dinov2 import DINOHead
from tests.test_method_contract import TINY, built, tiny_cfg

BF16 = torch.bfloat16
# the contract tests' tiny instance, smaller still: 2 images per step (KoLeo's minimum), 4 steps = 1 epoch
SMALL = ["trainer.precision=bf16", "data.num_samples=8", "data.batch_size=2"]


def bf16_cfg(name: str, *extra: str):
    return tiny_cfg(name, *SMALL, *extra)


def _floats(d: dict) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in d.items() if torch.is_tensor(v) and v.is_floating_point()]


# ----------------------------------------------------------------------------------------- the real loop
def _spy_on_backbone_linears(monkeypatch) -> list[tuple]:
    """Every method the loop builds gets forward hooks on its backbone's ``nn.Linear``s; each call records
    (output dtype, weight dtype, autocast enabled, autocast dtype)."""
    seen: list[tuple] = []
    orig = engine.build_method

    def hook(mod: nn.Module, args, out) -> None:
        seen.append((out.dtype, mod.weight.dtype, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    def build(cfg):
        m = orig(cfg)
        linears = [x for x in m.backbone.modules() if isinstance(x, nn.Linear)]
        assert linears, f"{cfg.method.name}: no nn.Linear in the backbone to watch"
        for x in linears:
            x.register_forward_hook(hook)
        return m

    monkeypatch.setattr(engine, "build_method", build)
    return seen


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_training_runs_under_autocast_keeps_fp32_parameters_and_resumes_exactly(name, tmp_path, monkeypatch):
    seen = _spy_on_backbone_linears(monkeypatch)
    r = train(bf16_cfg(name), tmp_path / "a")
    assert r.step == 4

    # autocast was on: the backbone's linears computed in bf16 from fp32 weights, on every step
    assert len(seen) >= 4, f"{name}: the hooked backbone linears were called {len(seen)} times in 4 steps"
    assert {s[2:] for s in seen} == {(True, BF16)}, f"{name}: a backbone linear ran outside bf16 autocast"
    assert {s[0] for s in seen} == {BF16}, f"{name}: backbone linear outputs {sorted(map(str, {s[0] for s in seen}))}"
    assert {s[1] for s in seen} == {torch.float32}, f"{name}: the model was cast, not autocast"

    # the parameters (and buffers, and optimizer state) stay fp32
    bad = [n for n, p in r.method.named_parameters() if p.dtype != torch.float32]
    bad += [n for n, b in r.method.named_buffers() if b.is_floating_point() and b.dtype != torch.float32]
    assert bad == [], f"{name}: not fp32 after bf16 training: {bad[:6]}"
    a = ck.load(tmp_path / "a" / "checkpoints" / "last.pt")
    assert {v.dtype for _, v in _floats(a["model"])} == {torch.float32}
    opt_dtypes = {v.dtype for st in a["optimizer"]["state"].values() for _, v in _floats(st)}
    assert opt_dtypes <= {torch.float32}, f"{name}: optimizer state in {opt_dtypes}"

    # every logged term is finite
    rows = _rows(tmp_path / "a")
    assert [x["step"] for x in rows] == [1, 2, 3, 4]
    for row in rows:
        nonfinite = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not nonfinite, f"{name}: non-finite logged terms at step {row['step']}: {nonfinite}"

    # 2 steps, stop, resume, 2 steps == 4 uninterrupted steps, bit for bit (CPU bf16 is deterministic)
    train(bf16_cfg(name, "trainer.stop_after=2"), tmp_path / "b")
    assert ck.load(tmp_path / "b" / "checkpoints" / "last.pt")["step"] == 2
    n_seen = len(seen)
    train(bf16_cfg(name), tmp_path / "b")  # trainer.resume=auto
    assert len(seen) > n_seen and {s[0] for s in seen[n_seen:]} == {BF16}, f"{name}: the resumed run left bf16"
    b = ck.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert b["step"] == 4 and a["model"].keys() == b["model"].keys()
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert differ == [], f"{name}: resumed parameters differ from the uninterrupted run: {differ[:6]}"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optimizer"]["state"][i][k])), (i, k)
    assert [x["loss"] for x in rows] == [x["loss"] for x in _rows(tmp_path / "b")]


# ----------------------------------------------------------------------------------------- KoLeo
def _koleo_without_fp32_guard(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``koleo_loss`` minus its ``autocast(enabled=False)``: under autocast the neighbour search's matmul is bf16."""
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.T
        sim.fill_diagonal_(-2.0)
        nn_idx = sim.argmax(dim=1)
    return -torch.log(F.pairwise_distance(x, x[nn_idx], p=2, eps=eps) + eps).mean()


def test_koleo_is_fp32_under_bf16_autocast():
    x32 = torch.randn(16, 48, generator=torch.Generator().manual_seed(0))
    x = x32.to(BF16).requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        out = L.koleo_loss(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, L.koleo_loss(x.detach().float()))  # the fp32 computation on the same values
    assert torch.allclose(out, L.koleo_loss(x32), rtol=5e-3)  # and close to the unrounded input's
    out.backward()
    assert x.grad.dtype == BF16 and torch.isfinite(x.grad).all()


def test_koleo_neighbour_search_is_fp32_under_bf16_autocast():
    """Row 0's true nearest neighbour is row 2 (cos 0.99955) but both cosines round to 1.0 in bf16, so a bf16
    neighbour search takes the first, row 1 (cos 0.99875): the autocast guard is what keeps the loss right."""
    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.05, 0.0], [1.0, 0.0, 0.03]]).to(BF16)
    ref = L.koleo_loss(x.float())
    with torch.autocast("cpu", dtype=BF16):
        guarded, naive = L.koleo_loss(x), _koleo_without_fp32_guard(x)
    assert not torch.allclose(naive, ref, rtol=1e-2), "the input no longer tells a bf16 neighbour search apart"
    assert guarded.dtype == torch.float32 and torch.equal(guarded, ref)


def test_koleo_on_a_duplicated_sample_stays_finite_under_bf16():
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)).to(BF16)
    x[3] = x[0]  # distance 0: -log(eps) in fp32; in fp16 eps would underflow to 0 and give inf
    x.requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        out = L.koleo_loss(x)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert out > -math.log(1e-6) / 4  # the duplicates' terms (~ -log(eps * sqrt(C))) are there, not clipped away
    out.backward()
    assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------- Sinkhorn-Knopp
def test_sinkhorn_knopp_is_fp32_under_bf16_autocast():
    logits32 = 3 * torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    logits = logits32.to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        q = L.sinkhorn_knopp(logits, temp=0.07, iterations=3)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    assert torch.equal(q, L.sinkhorn_knopp(logits.float(), temp=0.07, iterations=3))  # same values, fp32
    assert torch.allclose(q.sum(dim=1), torch.ones(12), atol=1e-5)
    # vs the unrounded logits: only the input rounding shows (max |dq| = 0.0023 here)
    q32 = L.sinkhorn_knopp(logits32, temp=0.07, iterations=3)
    assert (q - q32).abs().max() < 0.02 and torch.equal(q.argmax(1), q32.argmax(1))


# ----------------------------------------------------------------------------------------- DINO / iBOT losses
def _spy_log_softmax(monkeypatch) -> list[tuple[torch.dtype, torch.dtype]]:
    calls: list[tuple[torch.dtype, torch.dtype]] = []
    orig = F.log_softmax

    def spy(input, *args, **kwargs):
        out = orig(input, *args, **kwargs)
        calls.append((input.dtype, out.dtype))
        return out

    monkeypatch.setattr(F, "log_softmax", spy)  # dino_losses calls F.log_softmax through the module
    return calls


def test_dino_and_ibot_losses_use_fp32_log_softmax_under_bf16(monkeypatch):
    g = torch.Generator().manual_seed(0)
    K, B = 64, 4
    students = [(2 * torch.randn(B, K, generator=g)).to(BF16).requires_grad_() for _ in range(4)]  # 2 global, 2 local
    teachers = [L.sinkhorn_knopp(torch.randn(B, K, generator=g), 0.05) for _ in range(2)]
    patches = (2 * torch.randn(10, K, generator=g)).to(BF16).requires_grad_()
    t_patch = L.sinkhorn_knopp(torch.randn(10, K, generator=g), 0.05)
    weight = torch.full((10,), 0.2)
    calls = _spy_log_softmax(monkeypatch)
    with torch.autocast("cpu", dtype=BF16):
        dino = L.dino_loss(students, teachers, 0.1)
        ibot = L.ibot_loss(patches, t_patch, weight, 2 * B, 0.1)
    assert len(calls) == len(students) + 1 and set(calls) == {(torch.float32, torch.float32)}
    assert dino.dtype == ibot.dtype == torch.float32
    # exactly the fp32 computation on the same values
    assert torch.equal(dino, L.dino_loss([s.detach().float() for s in students], teachers, 0.1))
    assert torch.equal(ibot, L.ibot_loss(patches.detach().float(), t_patch, weight, 2 * B, 0.1))
    (dino + ibot).backward()
    assert all(s.grad.dtype == BF16 and torch.isfinite(s.grad).all() for s in [*students, patches])


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax"])
def test_dinov2_forward_under_bf16_computes_every_loss_in_fp32(centering, monkeypatch):
    """The real forward under autocast: the heads' logits are bf16, every loss and teacher target is fp32."""
    _, m, batch = built("dinov2", f"method.centering={centering}")
    rec: dict[str, list] = {k: [] for k in ("sinkhorn_knopp", "dino_loss", "ibot_loss", "koleo_loss")}

    def spy(fn_name: str):
        fn = getattr(L, fn_name)

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            tensors = [a for x in args for a in (x if isinstance(x, (list, tuple)) else [x]) if torch.is_tensor(a)]
            rec[fn_name].append(([t.dtype for t in tensors], out.dtype))
            return out
        return wrapped

    for k in rec:
        monkeypatch.setattr(L, k, spy(k))
    lsm = _spy_log_softmax(monkeypatch)
    m.train()
    with torch.autocast("cpu", dtype=BF16):
        out = m(batch)
    out["loss"].backward()

    assert out["loss"].dtype == torch.float32 and all(torch.isfinite(v).all() for v in out.values())
    dino_in, dino_out = rec["dino_loss"][0]
    n_crops = m.n_global + m.n_local
    assert dino_in == [BF16] * n_crops + [torch.float32] * m.n_global and dino_out == torch.float32  # logits, targets
    (ibot_in, ibot_out), = rec["ibot_loss"]
    assert ibot_in[:3] == [BF16, torch.float32, torch.float32] and ibot_out == torch.float32
    assert rec["koleo_loss"] and all(o == torch.float32 for _, o in rec["koleo_loss"])
    assert lsm and set(lsm) == {(torch.float32, torch.float32)}
    if centering == "sinkhorn_knopp":  # teacher CLS and patch logits (bf16) -> fp32 targets
        assert rec["sinkhorn_knopp"] == [([BF16], torch.float32)] * 2
    else:
        assert rec["sinkhorn_knopp"] == []
        assert m.dino_center.center.dtype == torch.float32 and m.dino_center.center.abs().sum() > 0  # updated
    grads = [(n, p.grad) for n, p in m.named_parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for _, g in grads)


# ----------------------------------------------------------------------------------------- reconstruction losses
def test_umae_reconstruction_loss_is_accumulated_in_fp32():
    _, m, batch = built("umae")
    preds: list[torch.Tensor] = []
    m.decoder_pred.register_forward_hook(lambda mod, args, out: preds.append(out))
    m.train()
    with torch.autocast("cpu", dtype=BF16):
        out = m(batch)
    (pred,) = preds
    assert pred.dtype == BF16 and out["loss"].dtype == torch.float32
    masked = batch["masked"]
    masked_idx = masked.nonzero()[:, 1].view(masked.shape[0], -1)
    ref = m.loss(batch["images"], pred.detach().float(), masked_idx)  # outside autocast, fp32 throughout
    assert torch.equal(out["loss"].detach(), ref)


def _simmim_forward_bf16(m, images: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the method's loss, the fp32 masked-L1 mean computed from the same bf16 reconstruction)."""
    recs: list[torch.Tensor] = []
    m.decoder.register_forward_hook(lambda mod, args, out: recs.append(out))
    m.train()
    with torch.autocast("cpu", dtype=BF16):
        out = m({"images": images, "masked": masked})
    (z,) = recs
    assert z.dtype == BF16 and out["loss"].dtype == torch.float32
    s, u, (gh, gw) = m.backbone.reduction, m.unit, m.grid
    B, C, H, W = images.shape
    rec = F.pixel_shuffle(z.detach().float().permute(0, 3, 1, 2), s)
    pix = masked.view(B, 1, gh, 1, gw, 1).expand(B, 1, gh, u, gw, u).reshape(B, 1, H, W).float()
    ref = ((rec - images).abs() * pix).sum() / pix.sum() / C
    return out["loss"].detach(), ref


def test_simmim_reconstruction_loss_is_accumulated_in_fp32():
    _, m, batch = built("simmim")  # 4 images x 48 of 64 units x 64 px masked: a count that bf16 holds exactly
    loss, ref = _simmim_forward_bf16(m, batch["images"], batch["masked"])
    assert torch.allclose(loss, ref, rtol=1e-6, atol=0)


def test_simmim_reconstruction_loss_normalizer_is_fp32():
    """5 images x 63 masked units x 64 px = 20160 masked pixels; bf16 holds 20224 (315 -> 316 units): -0.3%."""
    _, m, _ = built("simmim")
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    masked = torch.ones(5, m.grid[0] * m.grid[1], dtype=torch.bool)
    masked[:, 0] = False
    loss, ref = _simmim_forward_bf16(m, images, masked)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=0), f"loss / fp32 reference = {float(loss / ref):.6f}"


# ----------------------------------------------------------------------------------------- FSDP: heads reduce in fp32
@pytest.mark.parametrize("separate", [False, True], ids=["shared_head", "separate_ibot_head"])
def test_dinov2_heads_are_the_fsdp_units_that_reduce_in_fp32(separate, monkeypatch):
    """``DINOv2.fp32_reduce`` names the student heads; ``distributed.shard`` (FSDP2 mocked: no process group
    here) makes exactly them units with ``reduce_dtype=float32``; everything else reduces in bf16; every
    unit computes in bf16 (``param_dtype``)."""
    m = build_method(tiny_cfg("dinov2", f"method.ibot_separate_head={separate}"))
    heads = ("student.dino_head", "student.ibot_head") if separate else ("student.dino_head",)
    assert m.fp32_reduce == heads
    mods = dict(m.named_modules())
    assert all(isinstance(mods[h], DINOHead) for h in heads)

    import torch.distributed.device_mesh as device_mesh
    import torch.distributed.fsdp as fsdp

    calls: list[tuple[nn.Module, object]] = []
    monkeypatch.setattr(device_mesh, "init_device_mesh", lambda *a, **k: "mesh")
    monkeypatch.setattr(fsdp, "fully_shard", lambda mod, mesh=None, mp_policy=None, **k: calls.append((mod, mp_policy)))
    monkeypatch.setattr(fsdp, "register_fsdp_forward_method", lambda *a, **k: None)
    monkeypatch.setattr(D.dist, "get_world_size", lambda *a, **k: 2)
    units = D.shard(m, torch.device("cpu"), BF16)

    name_of = {id(mod): n for n, mod in mods.items()}
    policy = {name_of[id(mod)]: p for mod, p in calls}
    assert len(policy) == len(calls) == len(units) and units[-1] is m and policy[""] is not None
    assert {n for n, p in policy.items() if p.reduce_dtype == torch.float32} == set(heads)
    assert {p.reduce_dtype for n, p in policy.items() if n not in heads} == {BF16}
    assert {p.param_dtype for p in policy.values()} == {BF16}
    assert any(n.startswith("student.backbone.blocks.") for n in policy)  # the blocks are units too


def _fsdp_worker(rank: int, world: int, store: str, overrides: list[str], run_dir: str, record: str) -> None:
    """One rank of a gloo FSDP2 run; rank 0 records the (dtype, numel) of every gradient reduce-scatter.
    The group meets through a file store: no port to pick in advance (and lose to another process)."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), WANDB_MODE="disabled")
    torch.set_num_threads(1)
    from sslkit.config import compose
    from sslkit.tasks import run_pretrain

    seen: list[tuple[str, int]] = []
    fn_name = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
    fn = getattr(dist, fn_name)  # what FSDP2's default reduce-scatter calls (older torch: reduce_scatter_tensor)

    def spy(*args, **kwargs):
        inp = kwargs["input"] if "input" in kwargs else args[1]
        seen.append((str(inp.dtype), int(inp.numel())))
        return fn(*args, **kwargs)

    setattr(dist, fn_name, spy)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        run_pretrain(compose(overrides), run_dir)  # sslkit.distributed.setup uses the existing group
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(record).write_text(json.dumps(seen))


def test_fsdp_bf16_two_processes_reduce_the_heads_in_fp32(tmp_path):
    """2 gloo processes, ``trainer.strategy=fsdp trainer.precision=bf16``, 2 steps of tiny DINOv2: it trains
    (finite terms, fp32 checkpoint); the DINO head's gradients are reduce-scattered in fp32, the rest in bf16."""
    import torch.multiprocessing as tmp_mp

    ov = [*METHODS["dinov2"].test_overrides, *TINY, *SMALL, "trainer.max_steps=2", "trainer.strategy=fsdp"]
    run, record = tmp_path / "run", tmp_path / "reduce_scatter.json"
    tmp_mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "store"), ov, str(run), str(record)), nprocs=2, join=True)

    rows = _rows(run)
    assert [x["step"] for x in rows] == [1, 2]
    assert all(math.isfinite(v) for x in rows for v in x.values() if isinstance(v, float))
    state = ck.load(run / "checkpoints" / "last.pt")
    assert state["step"] == 2 and {v.dtype for _, v in _floats(state["model"])} == {torch.float32}

    head = dict(build_method(tiny_cfg("dinov2")).named_modules())["student.dino_head"]
    padded = sum(math.ceil(p.shape[0] / 2) * 2 * p[0].numel() for p in head.parameters())  # dim 0 padded to 2
    seen = [tuple(x) for x in json.loads(record.read_text())]
    assert seen, "no reduce-scatter was recorded (FSDP2 calls another collective in this torch version?)"
    assert {n for d, n in seen if d == "torch.float32"} == {padded}  # the head unit, once per step
    assert sum(d == "torch.float32" for d, _ in seen) == 2
    assert {d for d, _ in seen} == {"torch.float32", "torch.bfloat16"}
