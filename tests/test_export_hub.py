"""sslkit-export writes timm's Hugging Face Hub layout: the load line it prints works as printed (run in a fresh
interpreter), ``num_classes=N`` gives a new head, timm's ``push_to_hf_hub`` publishes the same files, and ViT /
ResNet exports load into timm's own classes by timm name in an interpreter where sslkit cannot be imported.

Checkpoints: real 1-step runs for the demo (UM-MAE, ``sslkit_pvt_test`` patch 2) and DINOv2 (``sslkit_vit_test``
with LayerScale, the EMA teacher exported); built directly (``checkpoint.save_training_state``) for a Swin with
``fc_norm``, a ViT with registers and average pooling, a ResNet; plus the reference UM-MAE fine-tuned PVT (a
foreign checkpoint: learned ``pos_embed``, ``fc_norm``)."""

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import sslkit
from sslkit import checkpoint as ck
from sslkit.config import compose
from sslkit.export import TIMM_WEIGHTS, export
from sslkit.pretrained import load_backbone, load_pretrained
from sslkit.tasks import run_pretrain

FIXTURES = Path(__file__).parent / "fixtures"
FAST = ["logger.wandb.mode=disabled", "trainer.progress=false", "trainer.summary=false", "data.num_workers=0",
        "data.num_samples=16", "data.batch_size=8", "trainer.max_steps=1"]
DINOV2 = ["method=dinov2_tiny", "model=sslkit_vit_test", "optim=dinov2", "method.freeze_last_layer_epochs=0",
          "+model.kwargs.init_values=1e-5"]
REF_PVT = {"patch_size": 1, "embed_dims": [4, 8, 12, 16], "num_heads": [1, 1, 2, 2], "mlp_ratios": [2, 2, 2, 2]}
SIZE = {"demo": 64, "swin": 64, "vit_reg": 32, "dinov2": 32, "resnet": 64, "ref_pvt": 32}


def _direct(path: Path, name: str, kwargs: dict, method: str = "simmim") -> Path:
    """An sslkit checkpoint of a freshly built (and perturbed) backbone, written as the engine would."""
    torch.manual_seed(0)
    net = timm.create_model(name, **kwargs)
    with torch.no_grad():  # loaded-vs-fresh unmistakable, BN statistics included
        for k, t in list(net.named_parameters()) + list(net.named_buffers()):
            if k.endswith("running_var"):
                t.copy_(0.5 + torch.rand_like(t))
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn_like(t))
    ck.save_training_state(path, {
        "sslkit_version": sslkit.__version__, "method": method, "model_config": {"name": name, "kwargs": kwargs},
        "model": {f"backbone.{k}": v for k, v in net.state_dict().items()}, "optimizer": {}, "scaler": {},
        "step": 3, "data_state": {}, "rng": {}, "config": {}, "derived": {}, "wandb_id": None, "metrics": {},
        "backbone_prefix": "backbone."})
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{case: (export dir, source backbone in eval mode, input, printed stdout)}."""
    d = tmp_path_factory.mktemp("hub")
    base = {"num_classes": 0, "drop_path_rate": 0.1, "um_pretrain": False}
    run_pretrain(compose(FAST), d / "demo")
    run_pretrain(compose(FAST + DINOV2), d / "dinov2")
    sources = {
        "demo": (d / "demo" / "checkpoints" / "last.pt", {}),
        "dinov2": (d / "dinov2" / "checkpoints" / "last.pt", {}),
        "swin": (_direct(d / "swin.pt", "sslkit_swin_test", {**base, "img_size": 64, "fc_norm": True}), {}),
        "vit_reg": (_direct(d / "vit.pt", "sslkit_vit_test", {**base, "img_size": 32, "patch_size": 8, "reg_tokens": 2,
                                                               "global_pool": "avg"}), {}),
        "resnet": (_direct(d / "resnet.pt", "sslkit_resnet_test", {**base, "img_size": 64}, method="classify"), {}),
        "ref_pvt": (FIXTURES / "umae_pvt_finetune.pth", {"model": "sslkit_pvt_test", "kwargs": REF_PVT}),
    }
    out = {}
    for case, (ckpt, kw) in sources.items():
        buf = io.StringIO()
        with redirect_stdout(buf):
            exp = export(ckpt, d / f"{case}_export", **kw)
        src, _ = load_backbone(ckpt, **kw)
        torch.manual_seed(1)
        out[case] = (exp, src.eval(), torch.randn(2, 3, SIZE[case], SIZE[case]), buf.getvalue())
    return out


def _config(exp: Path) -> dict:
    return json.loads((exp / "config.json").read_text())


def test_export_writes_timms_hub_layout_with_the_create_kwargs(exports):
    demo = _config(exports["demo"][0])
    assert demo["architecture"] == "sslkit_pvt_test" and demo["num_classes"] == 0 and demo["num_features"] == 64
    assert demo["model_args"]["patch_size"] == 2 and demo["model_args"]["um_pretrain"] is False
    assert demo["model_args"]["img_size"] == [64, 64] and "drop_path_rate" not in demo["model_args"]
    assert demo["pretrained_cfg"]["num_classes"] == 0 and demo["pretrained_cfg"]["input_size"] == [3, 64, 64]
    ref = _config(exports["ref_pvt"][0])["model_args"]  # converted reference fine-tuned model
    assert ref["pos_embed"] == "learned" and ref["fc_norm"] is True and ref["embed_dims"] == [4, 8, 12, 16]
    assert _config(exports["swin"][0])["model_args"]["fc_norm"] is True
    assert _config(exports["dinov2"][0])["model_args"]["init_values"] == 1e-5
    for case, (exp, src, _, printed) in exports.items():
        files = {p.name for p in exp.iterdir()}
        assert files == {"config.json", "model.safetensors", "backbone.json", "backbone.safetensors"} | (
            {TIMM_WEIGHTS} if case == "vit_reg" else set()), case
        meta = json.loads((exp / "backbone.json").read_text())
        assert _config(exp)["sslkit"] == meta  # the provenance, in both files
        assert meta["notes"] and meta["source"] == ("umae_pvt_finetune" if case == "ref_pvt" else "sslkit")
        line = f'import sslkit.models, timm; m = timm.create_model("local-dir:{exp}", pretrained=True)'
        assert meta["load_with"] == line
        assert meta["load_with"] in printed, case  # printed as recorded
        sd, legacy = load_file(str(exp / "model.safetensors")), load_file(str(exp / "backbone.safetensors"))
        own = src.state_dict()
        assert sd.keys() == legacy.keys() == own.keys(), case  # the whole backbone, no head
        assert all(torch.equal(sd[k], own[k]) and torch.equal(legacy[k], own[k]) for k in own), case
    dino = json.loads((exports["dinov2"][0] / "backbone.json").read_text())
    assert dino["method"] == "dinov2" and dino["step"] == 1 and dino["backbone_prefix"] == "teacher.backbone."
    assert dino["sslkit_version"] == sslkit.__version__ and "teacher" in dino["notes"]


def test_load_pretrained_reads_the_export_with_its_provenance(exports):
    exp, src, _, _ = exports["demo"]
    pre = load_pretrained(exp)
    assert pre.source == "sslkit_export" and pre.model_name == "sslkit_pvt_test" and pre.kwargs["patch_size"] == 2
    assert pre.meta["method"] == "umae" and pre.meta["step"] == 1  # from config.json's "sslkit"
    net, _ = load_backbone(exp)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in net.state_dict().items())


def _run(code: str, *args: str) -> str:
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _references(exports, tmp_path, cases) -> dict:
    """Per case: the input and the source backbone's eval outputs, in a file the subprocess reads."""
    refs = {}
    for case in cases:
        _, src, x, _ = exports[case]
        with torch.no_grad():
            save_file({"x": x, "features": src.forward_features(x).contiguous(), "out": src(x).contiguous()},
                      str(tmp_path / f"{case}.safetensors"))
        refs[case] = str(tmp_path / f"{case}.safetensors")
    return refs


CHECK = """
import json, sys, torch
from safetensors.torch import load_file
for line, ref, block in json.loads(sys.argv[1]):
    if block:
        sys.modules["sslkit"] = None  # sslkit cannot be imported from here on
    ns = {}
    exec(line, ns)  # the load line, exactly as recorded and printed
    m, t = ns["m"].eval(), load_file(ref)
    with torch.no_grad():
        assert torch.equal(m.forward_features(t["x"]), t["features"]), line
        assert torch.equal(m(t["x"]), t["out"]), line
    if block:
        assert type(m).__module__.startswith("timm.models."), type(m)
        assert not [k for k, v in sys.modules.items() if k.startswith("sslkit") and v is not None]
    print(type(m).__module__, type(m).__name__, m.num_classes)
"""


def test_the_printed_load_line_works_in_a_fresh_interpreter(exports, tmp_path):
    refs = _references(exports, tmp_path, exports)
    cases = [(json.loads((exports[c][0] / "backbone.json").read_text())["load_with"], refs[c], False) for c in exports]
    printed = _run(CHECK, json.dumps(cases)).splitlines()
    assert [p.split()[0] for p in printed] == ["sslkit.models.pvt", "sslkit.models.vit", "sslkit.models.swin",
                                               "sslkit.models.vit", "timm.models.resnet", "sslkit.models.pvt"]
    assert all(p.endswith(" 0") for p in printed)  # backbone-only: no head


def test_local_dir_with_num_classes_gets_a_new_head(exports):
    import sslkit.models  # noqa: F401

    for case in ("demo", "dinov2", "resnet"):
        exp, src, x, _ = exports[case]
        m = timm.create_model(f"local-dir:{exp}", pretrained=True, num_classes=10).eval()
        with torch.no_grad():
            assert torch.equal(m.forward_features(x), src.forward_features(x)), case
            assert m(x).shape == (2, 10)


def test_vit_and_resnet_exports_load_into_timms_own_classes_by_name_without_sslkit(exports, tmp_path):
    equiv = {c: json.loads((exports[c][0] / "backbone.json").read_text())["timm_equivalent"] for c in exports}
    assert equiv["demo"] is None and equiv["swin"] is None and equiv["ref_pvt"] is None  # sslkit's own architectures
    for c in ("demo", "swin", "ref_pvt"):
        assert json.loads((exports[c][0] / "backbone.json").read_text())["needs_sslkit"] is True
        assert "no timm equivalent" in exports[c][3]
    dino, reg, res = equiv["dinov2"], equiv["vit_reg"], equiv["resnet"]
    assert dino["architecture"] == "vit_tiny_patch16_224" and dino["weights"] == "model.safetensors"  # mask_token:
    assert dino["model_args"] == {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 2,  # timm's filter
                                  "num_heads": 3, "mlp_ratio": 2.0, "init_values": 1e-5}
    assert reg["weights"] == TIMM_WEIGHTS and reg["model_args"]["reg_tokens"] == 2
    assert reg["model_args"]["no_embed_class"] is True and reg["model_args"]["global_pool"] == "avg"
    assert "mask_token" not in load_file(str(exports["vit_reg"][0] / TIMM_WEIGHTS))
    assert res["architecture"] == "resnet50" and res["model_args"]["layers"] == [1, 1, 2, 2]
    for c in ("dinov2", "vit_reg", "resnet"):
        assert equiv[c]["load_with"] in exports[c][3] and equiv[c]["load_with"].startswith("import timm;")
    refs = _references(exports, tmp_path, ("dinov2", "vit_reg", "resnet"))
    cases = [(equiv[c]["load_with"], refs[c], True) for c in ("dinov2", "vit_reg", "resnet")]
    printed = _run(CHECK, json.dumps(cases)).splitlines()
    assert printed == ["timm.models.vision_transformer VisionTransformer 0"] * 2 + ["timm.models.resnet ResNet 0"]


def test_a_named_timm_vit_with_the_mapped_kwargs_is_the_sslkit_vit_small():
    """The mapping at full size, built in-process (no checkpoint): sslkit_vit_small with LayerScale ->
    vit_small_patch16_224 + init_values; outputs equal."""
    from sslkit.export import timm_equivalent

    torch.manual_seed(0)
    src = timm.create_model("sslkit_vit_small", init_values=1e-5, img_size=64).eval()
    info, sd, _ = timm_equivalent(src, "sslkit_vit_small", {"init_values": 1e-5}, Path("/nowhere"))
    assert info["architecture"] == "vit_small_patch16_224" and sd is None
    assert info["model_args"] == {"img_size": 64, "patch_size": 16, "init_values": 1e-5}
    m = timm.create_model(info["architecture"], **info["model_args"], num_classes=0).eval()
    m.load_state_dict({k: v for k, v in src.state_dict().items() if k != "mask_token"})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), src(x))


def test_push_to_hf_hub_publishes_exactly_the_export(exports, tmp_path, monkeypatch):
    """timm's push_to_hf_hub, offline (its HfApi replaced by a recorder): the model loaded from the folder,
    with the provenance as ``model_config``, uploads the same config.json and model.safetensors."""
    import shutil

    import sslkit.models  # noqa: F401
    from timm.models import _hub, push_to_hf_hub

    uploaded = tmp_path / "uploaded"

    class Recorder:
        def __init__(self, **_):
            pass

        def create_repo(self, repo_id, **_):
            return type("Url", (), {"repo_id": repo_id})()

        def file_exists(self, **_):
            return False

        def upload_folder(self, folder_path, **_):
            shutil.copytree(folder_path, uploaded)

    monkeypatch.setattr(_hub, "HfApi", Recorder)
    for case in ("demo", "dinov2"):
        exp = exports[case][0]
        cfg = _config(exp)
        m = timm.create_model(f"local-dir:{exp}", pretrained=True)
        push_to_hf_hub(m, "me/model", model_config={"sslkit": cfg["sslkit"]}, safe_serialization=True)
        assert {p.name for p in uploaded.iterdir()} == {"config.json", "model.safetensors", "README.md"}
        assert json.loads((uploaded / "config.json").read_text()) == cfg, case
        a, b = load_file(str(exp / "model.safetensors")), load_file(str(uploaded / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), case
        shutil.rmtree(uploaded)
