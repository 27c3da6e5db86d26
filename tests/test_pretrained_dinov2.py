"""DINOv2 and timm DINOv2 checkpoints into ``sslkit_vit_*`` (sslkit.pretrained.dinov2), no downloads.

DINOv2's own layouts: ``tests/fixtures/dinov2_ckpt_*`` were written by the reference code
(``scripts/parity/dinov2_checkpoints.py``, facebookresearch/dinov2 at the commit recorded in
``dinov2_ckpt_outputs.safetensors``): a hub backbone (``dinov2_vits14_pretrain.pth`` layout), a reg4 hub backbone,
a training checkpoint (``teacher.backbone.*`` chunked + ``student.backbone.*`` + heads), and the reference's
``forward_features`` on a recorded input. Their size: ``sslkit_vit_test`` with ``embed_dim=8, num_heads=2``
(``ARCH``), patch 14, 42 px. timm's layouts: timm's own ``VisionTransformer`` built here with the
``vit_small_patch14[_reg4]_dinov2`` settings at ``sslkit_vit_test``'s size."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer as TimmViT

from sslkit.errors import CheckpointError
from sslkit.pretrained import load_backbone, load_pretrained

torch.set_num_threads(2)
FIX = Path(__file__).parent / "fixtures"
HUB, REG4, TRAIN = (FIX / f"dinov2_ckpt_{n}.pth" for n in ("hub", "reg4_hub", "train"))
ARCH = {"embed_dim": 8, "num_heads": 2}  # the fixtures' sslkit_vit_test kwargs (depth 2, mlp_ratio 2 as the model)
TOL = dict(atol=1e-5, rtol=1e-5)
# the reference's interpolation settings of each recorded model (also in the fixture's metadata)
RULES = {"hub": (0.1, False), "reg4_hub": (0.0, True), "train_teacher": (0.1, False)}  # (offset, antialias)
FILE_OF = {"hub": HUB, "reg4_hub": REG4, "train_teacher": TRAIN}


@pytest.fixture(scope="module")
def recorded():
    out = load_file(str(FIX / "dinov2_ckpt_outputs.safetensors"))
    x = out["x"]  # (2, 3, 28, 28); the inputs as scripts/parity/dinov2_checkpoints.py makes them
    big = torch.cat([x, x[..., :14]], dim=-1)
    return out, {"native": torch.cat([big, big[..., :14, :]], dim=-2), "small": x, "wide": big}


def features(net, x) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        f = net.eval().forward_features(x)
    r = net.num_reg_tokens
    return {"cls": f[:, 0], "patch": f[:, 1 + r:], **({"reg": f[:, 1:1 + r]} if r else {})}


def max_diff(net, x, out, key) -> float:
    got = features(net, x)
    assert set(got) == {k.rsplit(".", 1)[1] for k in out if k.startswith(key + ".")}
    return max((got[k] - out[f"{key}.{k}"]).abs().max().item() for k in got)


def reference_rule(pe: torch.Tensor, new: tuple[int, int], offset: float, antialias: bool) -> torch.Tensor:
    """What DinoVisionTransformer.interpolate_pos_encoding computes (stated with plain torch ops): bicubic on the
    patch grid, by ``scale_factor=(g + offset) / M`` when ``offset`` else by size, antialiased or not."""
    m, c = math.isqrt(pe.shape[1] - 1), pe.shape[-1]
    grid = pe[:, 1:].reshape(1, m, m, c).permute(0, 3, 1, 2)
    kw = {"scale_factor": ((new[0] + offset) / m, (new[1] + offset) / m)} if offset else {"size": new}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kw)
    assert tuple(grid.shape[-2:]) == new
    return torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, c)], dim=1)


# ------------------------------------------------------------------------------ DINOv2 layouts
@pytest.mark.parametrize("key", ["hub", "reg4_hub", "train_teacher"])
def test_forward_equals_reference(recorded, key):
    """At the checkpoint's own grid (no interpolation anywhere) our forward is the reference's (measured: 0.0,
    bit-identical, on this machine)."""
    out, inputs = recorded
    net, pre = load_backbone(FILE_OF[key], model="sslkit_vit_test", kwargs=ARCH)
    reg = 0 if key == "hub" else 4
    assert pre.source == ("dinov2_train" if key == "train_teacher" else "dinov2_backbone")
    assert {k: pre.kwargs.get(k, 0) for k in ("patch_size", "reg_tokens", "img_size")} == \
        {"patch_size": 14, "reg_tokens": reg, "img_size": 42}
    assert pre.kwargs["init_values"] and "qkv_bias" not in pre.kwargs  # LayerScale exists; qkv bias (default)
    assert net.pos_embed.shape == (1, 1 + 9, 8) and net.num_reg_tokens == reg
    assert max_diff(net, inputs["native"], out, f"{key}.native") <= 1e-5
    if key == "train_teacher":
        assert pre.meta == {"iteration": 1249}


@pytest.mark.parametrize("key", ["hub", "reg4_hub", "train_teacher"])
@pytest.mark.parametrize("size", ["small", "wide"])
def test_interpolation_differs_only_by_the_rule(recorded, key, size):
    """At other sizes the reference resamples its position embeddings by its own rule (offset 0.1 by scale
    factor; or antialiased for the reg4 hub models); ours, at forward time, is bicubic by size without
    antialias: the outputs differ (measured up to ~0.04 on these LayerNormed tokens). Loaded at that size
    (``img_size``: resampled once at load by the source's rule, as fine-tuning and evaluation do) they agree
    to 1e-5: the rule is the only difference."""
    out, inputs = recorded
    x = inputs[size]
    new = (x.shape[-2] // 14, x.shape[-1] // 14)
    native, pre = load_backbone(FILE_OF[key], model="sslkit_vit_test", kwargs=ARCH)
    assert max_diff(native, x, out, f"{key}.{size}") > 1e-3  # our rule is not the reference's

    hw = list(x.shape[-2:])
    at_size, pre2 = load_backbone(FILE_OF[key], model="sslkit_vit_test", kwargs={**ARCH, "img_size": hw})
    assert at_size.pos_embed.shape[1] == 1 + new[0] * new[1] and pre2.kwargs["img_size"] == hw
    # loaded at that size, the positions are resampled by the reference's own rule: the reference's outputs
    assert max_diff(at_size, x, out, f"{key}.{size}") <= 1e-5  # measured <= 1.2e-7
    torch.testing.assert_close(at_size.pos_embed, reference_rule(pre.state_dict["pos_embed"], new, *RULES[key]),
                               atol=1e-7, rtol=1e-6)


def test_chunked_equals_unchunked_and_the_reference_numbering():
    """The training teacher is the reg4 hub backbone, chunked by the reference (block_chunks=2: Identity
    placeholders keep the global index, so chunk 1 holds ``blocks.1.1``, not ``blocks.1.0``)."""
    ckpt = torch.load(TRAIN, weights_only=True)
    keys = set(ckpt["model"])
    assert "teacher.backbone.blocks.0.0.attn.qkv.weight" in keys and "teacher.backbone.blocks.1.1.ls2.gamma" in keys
    assert not any(k.startswith("teacher.backbone.blocks.1.0.") for k in keys)
    chunked = load_pretrained(TRAIN, model="sslkit_vit_test", kwargs=ARCH)
    plain = load_pretrained(REG4, model="sslkit_vit_test", kwargs=ARCH)
    assert set(chunked.state_dict) == set(plain.state_dict)
    for k, v in plain.state_dict.items():
        assert torch.equal(chunked.state_dict[k], v), k


def _save(tmp_path, name, obj) -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_bare_chunked_backbone_and_wrong_chunk_numbering(tmp_path):
    ckpt = torch.load(TRAIN, weights_only=True)
    p = "teacher.backbone."
    bare = {k[len(p):]: v for k, v in ckpt["model"].items() if k.startswith(p)}
    got = load_pretrained(_save(tmp_path, "chunked.pth", bare), model="sslkit_vit_test", kwargs=ARCH)
    ref = load_pretrained(REG4, model="sslkit_vit_test", kwargs=ARCH)
    assert got.source == "dinov2_backbone"
    assert all(torch.equal(got.state_dict[k], v) for k, v in ref.state_dict.items())
    # chunk-local numbering (blocks.1.0: not what the reference writes) is refused, not silently merged
    local = {k.replace("blocks.1.1.", "blocks.1.0."): v for k, v in bare.items()}
    with pytest.raises(CheckpointError, match=r"block 0 appears in chunks 0 and 1"):
        load_pretrained(_save(tmp_path, "local.pth", local), model="sslkit_vit_test", kwargs=ARCH)


def test_teacher_is_picked_not_the_student(tmp_path):
    ckpt = torch.load(TRAIN, weights_only=True)
    sd = ckpt["model"]
    got = load_pretrained(TRAIN, model="sslkit_vit_test", kwargs=ARCH).state_dict
    teacher = sd["teacher.backbone.blocks.1.1.attn.qkv.weight"]
    student = sd["student.backbone.blocks.1.1.attn.qkv.weight"]
    assert torch.equal(got["blocks.1.attn.qkv.weight"], teacher) and not torch.equal(teacher, student)
    assert torch.equal(got["reg_token"], sd["teacher.backbone.register_tokens"])
    assert any(k.startswith("student.dino_head.") for k in sd) and any(k.startswith("teacher.ibot_head.") for k in sd)
    # eval/<it>/teacher_checkpoint.pth: {"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}
    t = {k[len("teacher."):]: v for k, v in sd.items() if k.startswith("teacher.")}
    path = _save(tmp_path, "teacher_checkpoint.pth", {"teacher": t})
    pre = load_pretrained(path, model="sslkit_vit_test", kwargs=ARCH)
    assert pre.source == "dinov2_train" and all(torch.equal(pre.state_dict[k], v) for k, v in got.items())
    # a file with the student only: its backbone
    s = {k: v for k, v in sd.items() if k.startswith("student.")}
    pre = load_pretrained(_save(tmp_path, "student.pth", {"model": s}), model="sslkit_vit_test", kwargs=ARCH)
    assert torch.equal(pre.state_dict["blocks.1.attn.qkv.weight"], student)


def test_unknown_keys_are_named(tmp_path):
    sd = torch.load(TRAIN, weights_only=True)["model"]
    bad = {**sd, "teacher.projector.weight": torch.zeros(2), "queue": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"\['queue', 'teacher.projector.weight'\]"):
        load_pretrained(_save(tmp_path, "t.pth", {"model": bad}), model="sslkit_vit_test", kwargs=ARCH)
    bad = {**sd, "teacher.backbone.blocks.1.1.attn.rope.freqs": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.rope\.freqs"):
        load_pretrained(_save(tmp_path, "t2.pth", {"model": bad}), model="sslkit_vit_test", kwargs=ARCH)
    hub = torch.load(HUB, weights_only=True)
    bad = {**hub, "head.weight": torch.zeros(3, 8), "blocks.0.attn.q_norm.weight": torch.zeros(4)}
    with pytest.raises(CheckpointError, match=r"\['blocks.0.attn.q_norm.weight', 'head.weight'\]"):
        load_pretrained(_save(tmp_path, "h.pth", bad), model="sslkit_vit_test", kwargs=ARCH)


def test_swiglu_vit_g_is_refused(tmp_path):
    """DINOv2 ViT-g/14 (ffn_layer=swiglufused: mlp.w12 / mlp.w3) cannot be represented by our GELU MLP."""
    hub = torch.load(HUB, weights_only=True)
    g = {k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3."): v for k, v in hub.items()}
    for sd in (g, {f"teacher.backbone.{k}": v for k, v in g.items()}):
        with pytest.raises(CheckpointError, match=r"SwiGLU FFN.*only the GELU MLP.*not converted"):
            load_pretrained(_save(tmp_path, "g.pth", sd), model="sslkit_vit_test", kwargs=ARCH)
    # timm's vit_giant_patch14_dinov2 packs it into fc1 (2x the outputs) / fc2 with SiLU
    timm_g = TimmViT(img_size=42, patch_size=14, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.66667 * 2,
                     init_values=1e-5, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, num_classes=0)
    path = tmp_path / "model.safetensors"
    save_file(timm_g.state_dict(), str(path))
    with pytest.raises(CheckpointError, match=r"packed SwiGLU FFN.*only the GELU MLP"):
        load_pretrained(path, model="sslkit_vit_test")


def test_missing_model_and_wrong_size_model():
    with pytest.raises(CheckpointError, match=r"dinov2_backbone checkpoint .* say which sslkit model to build with "
                                              r"model=<name>"):
        load_backbone(HUB)
    with pytest.raises(CheckpointError, match=r"dinov2_train checkpoint .* model=<name>"):
        load_backbone(TRAIN)
    with pytest.raises(CheckpointError, match=r"shape mismatches .*cls_token: \(1, 1, 8\) vs \(1, 1, 48\)"):
        load_backbone(HUB, model="sslkit_vit_test")  # without the fixture's embed_dim
    with pytest.raises(CheckpointError, match=r"cls_token: \(1, 1, 8\) vs \(1, 1, 384\)"):
        load_backbone(REG4, model="sslkit_vit_small")
    with pytest.raises(CheckpointError, match=r"converts to \['sslkit_vit_\*'\], not to model=sslkit_pvt_test"):
        load_backbone(HUB, model="sslkit_pvt_test")
    # the caller's architecture kwargs are not silently overridden
    with pytest.raises(CheckpointError, match=r"needs patch_size=14 .* configured with patch_size=16"):
        load_backbone(HUB, model="sslkit_vit_test", kwargs={**ARCH, "patch_size": 16})
    with pytest.raises(CheckpointError, match=r"img_size=32 is not a multiple of the checkpoint's patch size 14"):
        load_backbone(HUB, model="sslkit_vit_test", kwargs={**ARCH, "img_size": 32})


# ---------------------------------------------------------------------------------- timm layouts
def timm_dinov2(reg_tokens: int) -> TimmViT:
    """timm's vit_small_patch14[_reg4]_dinov2 settings (patch 14, init_values 1e-5; reg4: 4 registers,
    no_embed_class=True), dynamic_img_size, at sslkit_vit_test's size; perturbed."""
    torch.manual_seed(3)
    m = TimmViT(img_size=42, patch_size=14, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2, init_values=1e-5,
                reg_tokens=reg_tokens, no_embed_class=bool(reg_tokens), dynamic_img_size=True, num_classes=0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_timm_dinov2_forward_equals_timm(tmp_path, reg_tokens):
    """Native grid: equal to timm (measured ~1e-7). At 28 px timm's dynamic resampling is antialiased, ours
    not: they differ (> 1e-3), which the interpolation note in sslkit.pretrained.dinov2 describes."""
    ref = timm_dinov2(reg_tokens)
    assert ref.pos_embed.shape[1] == (9 if reg_tokens else 1 + 9)  # no_embed_class: patch positions only
    path = tmp_path / "model.safetensors"  # as on the hub (timm/vit_small_patch14_reg4_dinov2.lvd142m)
    save_file(ref.state_dict(), str(path))
    net, pre = load_backbone(path, model="sslkit_vit_test")  # no architecture kwargs needed
    assert pre.source == "timm_vit" and pre.kwargs.get("reg_tokens", 0) == reg_tokens and pre.kwargs["img_size"] == 42
    assert torch.equal(net.mask_token, torch.zeros(1, 48))  # timm has none
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(x), ref.forward_features(x), **TOL)
        small = x[..., :28, :28]
        assert (net.forward_features(small) - ref.forward_features(small)).abs().max() > 1e-3
    # a classifier head is expected and ignored; an unknown key is named
    sd = {**ref.state_dict(), "head.weight": torch.zeros(5, 48), "head.bias": torch.zeros(5)}
    save_file(sd, str(path))
    assert "head.weight" not in load_pretrained(path, model="sslkit_vit_test").state_dict
    save_file({**sd, "fc_norm.weight": torch.ones(48)}, str(path))
    with pytest.raises(CheckpointError, match=r"\['fc_norm.weight'\]"):
        load_pretrained(path, model="sslkit_vit_test")


# ------------------------------------------------------------------------ fine-tuning, evaluation
FAST = ["logger.wandb.mode=disabled", "trainer.progress=false", "data.num_workers=0", "data.num_samples=64",
        "data.batch_size=8", "trainer.log_every=1"]


def test_finetune_from_the_hub_file(tmp_path):
    from sslkit.config import compose
    from sslkit.methods import build_method
    from sslkit.tasks import run_finetune

    over = FAST + [f"checkpoint={HUB}", "model=sslkit_vit_test", "method.num_classes=8", "method.view.size=28",
                   "++model.kwargs.embed_dim=8", "++model.kwargs.num_heads=2", "trainer.max_steps=2"]
    cfg = compose(over, config_name="finetune")
    m = build_method(cfg)  # the crop size (28 px): positions resampled once at load, our rule
    ref = load_pretrained(HUB, model="sslkit_vit_test", kwargs={**ARCH, "img_size": 28}).state_dict
    got = m.backbone.state_dict()
    assert set(got) - set(ref) == {"head.weight", "head.bias"}
    assert all(torch.equal(got[k], v) for k, v in ref.items())
    assert m.model_config["kwargs"]["patch_size"] == 14 and m.model_config["kwargs"]["img_size"] == 28
    res = run_finetune(cfg, tmp_path)
    assert res["step"] == 2 and 0.0 <= res["top1"] <= 100.0


def test_eval_knn_on_a_hub_layout_file(tmp_path):
    """eval_knn has no architecture kwargs: the file must have the named model's width (as the released
    ViT-S/B/L have sslkit_vit_small/base/large's). A hub-layout file at sslkit_vit_test's size: the keys
    of the reference's file (checked), the test model's tensors. img_size: sslkit_vit_test's default input
    (32 px) is not a multiple of patch 14, so it is given."""
    from sslkit.evaluation import eval_knn
    import timm

    torch.manual_seed(0)
    src = timm.create_model("sslkit_vit_test", patch_size=14, img_size=42, init_values=1e-5)
    sd = src.state_dict()
    assert set(sd) == set(torch.load(HUB, weights_only=True))  # the reference's hub keys, our names
    path = _save(tmp_path, "dinov2_vitt14_pretrain.pth", sd)
    data = ["data=synthetic", "data.num_samples=32", "data.num_workers=0", "data.batch_size=16", "data.num_classes=4"]
    res = eval_knn(path, data=data, model="sslkit_vit_test", img_size=28, k=3)
    assert 0.0 <= res["top1"] <= 100.0
