"""Parity with the UM-MAE reference code (implus/UM-MAE), from fixtures of numbers (no reference code here).

``scripts/parity/make_fixtures.py --umae <checkout>`` built tiny reference models (PVT and Swin, UM-MAE,
its SimMIM baseline, its fine-tuning models) with seeded, perturbed weights and recorded their checkpoints
(the reference's own layout) and outputs. Here those checkpoints go through sslkit's converters
(``sslkit.pretrained.umae``) into sslkit's models, and sslkit's outputs must equal the recorded ones (fp32,
<= 1e-5 relative). See docs/parity.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sslkit.config import compose
from sslkit.errors import CheckpointError
from sslkit.methods import backbone_kwargs, build_method
from sslkit.pretrained import load_backbone, load_pretrained
from sslkit.pretrained.umae import convert_method

FIXTURES = Path(__file__).parent / "fixtures"
RTOL = 1e-5
FAMILIES = ["pvt", "swin"]


def fixture(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(FIXTURES / name), "pt") as f:
        meta = json.loads((f.metadata() or {})["meta"])
    t = load_file(str(FIXTURES / name))
    return {k: (v.float() if v.dtype == torch.float16 else v) for k, v in t.items()}, meta


def reference_checkpoint(name: str) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(FIXTURES / name, weights_only=True)


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max relative error |a - b| / max|b| (elementwise differences against the scale of the reference)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def ours(meta: dict, *extra: str):
    torch.manual_seed(0)
    return build_method(compose([*meta["ours"], "data.num_samples=8", *extra])).eval()


@pytest.mark.parametrize("fam", FAMILIES)
def test_parity_umae_encoder_and_loss(fam):
    t, meta = fixture(f"umae_{fam}_parity.safetensors")
    m = ours(meta)
    sd = convert_method(reference_checkpoint(f"umae_{fam}_pretrain.pth")["model"], fam, "umae", unit=meta["stride"])
    m.load_state_dict(sd, strict=True)
    batch = {k: t[k] for k in ("images", "masked", "keep_offset", "sm_masked")}
    with torch.no_grad():
        z = m.forward_encoder(batch["images"], batch["keep_offset"], batch["sm_masked"])  # (B, h, w, C)
        loss = m(batch)["loss"]
    assert close(z.flatten(1, 2), t["encoder"]) <= RTOL
    assert close(loss, t["loss"]) <= RTOL  # the reference with each visible token at its own unit's position
    # the reference as published gives visible tokens other units' positions: a different loss, on file
    assert abs(float(t["loss_official"]) - float(t["loss"])) > 1e-4 * float(t["loss"])


@pytest.mark.parametrize("fam", FAMILIES)
def test_parity_simmim_encoder_and_loss(fam):
    t, meta = fixture(f"umae_simmim_{fam}_parity.safetensors")
    m = ours(meta)
    ref = {k: v for k, v in reference_checkpoint(meta["backbone"])["model"].items()
           if not k.startswith(("decoder_", "mask_token", "vis_mask_token"))}
    ref.update({k[len("extra."):]: v for k, v in t.items() if k.startswith("extra.")})
    m.load_state_dict(convert_method(ref, fam, "simmim", unit=meta["stride"]), strict=True)
    with torch.no_grad():
        z = m.forward_encoder(t["images"], t["masked"])
        loss = m({"images": t["images"], "masked": t["masked"]})["loss"]
    assert close(z.flatten(1, 2), t["encoder"]) <= RTOL
    assert close(loss, t["loss"]) <= RTOL


def _arch(meta: dict) -> dict:
    kw = backbone_kwargs(compose([o for o in meta["ours"] if "model" in o.split("=")[0]]).model)
    return {k: v for k, v in kw.items() if k not in ("num_classes", "drop_path_rate")}


@pytest.mark.parametrize("fam", FAMILIES)
def test_parity_reference_finetuned_checkpoint_loads_and_predicts_the_same(fam):
    """The reference fine-tuning model's checkpoint (learned pos_embed for PVT, fc_norm after pooling, a head)
    loads with weights_only + the Namespace allow-list, and sslkit's backbone gives its pre-logits and, with
    its head, its logits."""
    t, meta = fixture(f"umae_{fam}_finetune_out.safetensors")
    path = FIXTURES / f"umae_{fam}_finetune.pth"
    net, pre = load_backbone(path, model=f"sslkit_{fam}_test", kwargs=_arch(meta))
    assert pre.source == f"umae_{fam}_finetune" and pre.kwargs["fc_norm"] is True
    net.eval()
    with torch.no_grad():
        assert close(net(t["input"]), t["pre_logits"]) <= RTOL  # num_classes=0: forward = pooled, fc_norm'ed
        net.reset_classifier(meta["num_classes"])
        head = reference_checkpoint(path.name)["model"]
        net.head.load_state_dict({"weight": head["head.weight"], "bias": head["head.bias"]})
        assert close(net(t["input"]), t["logits"]) <= RTOL


@pytest.mark.parametrize("fam", FAMILIES)
def test_reference_pretraining_checkpoint_loads_for_finetuning_and_pretraining(fam):
    _, meta = fixture(f"umae_{fam}_parity.safetensors")
    path = FIXTURES / f"umae_{fam}_pretrain.pth"
    pre = load_pretrained(path, f"sslkit_{fam}_test", _arch(meta), for_finetune=False)
    assert pre.source == f"umae_{fam}_pretrain" and pre.kwargs["um_pretrain"] is True
    net, ft = load_backbone(path, model=f"sslkit_{fam}_test", kwargs=_arch(meta))  # converted to fine-tuning shapes
    assert ft.kwargs["um_pretrain"] is False and not net.um_pretrain
    with pytest.raises(CheckpointError, match="model=<name>"):
        load_pretrained(path)  # a foreign layout does not say which sslkit model to build
    with pytest.raises(CheckpointError, match=r"converts to \['sslkit_pvt_\*'\]" if fam == "pvt" else "sslkit_swin_"):
        load_pretrained(path, "sslkit_vit_test")


def test_unknown_keys_are_named_and_arbitrary_pickles_refused(tmp_path):
    ckpt = reference_checkpoint("umae_pvt_pretrain.pth")
    ckpt["model"]["blocks.0.attn.extra.weight"] = torch.zeros(1)
    ckpt["model"]["rogue"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"neither mapped nor expected: \['blocks.0.attn.extra.weight', 'rogue'\]"):
        load_pretrained(tmp_path / "bad.pth", "sslkit_pvt_test")

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"model": ckpt["model"], "args": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="will not execute arbitrary pickles"):
        load_pretrained(tmp_path / "evil.pth", "sslkit_pvt_test")


def test_the_sincos_tables_match_the_reference():
    """sslkit computes the fixed sin-cos tables the reference stores: the encoder's (at stem resolution, PVT)
    and the decoder's (unit grid)."""
    from sslkit.models.pos_embed import grid_coords, sincos_2d

    sd = reference_checkpoint("umae_pvt_pretrain.pth")["model"]
    n, c = sd["pos_embed"].shape[1:]
    g = int(n ** 0.5)
    assert close(sincos_2d(grid_coords(g, g).view(-1, 2), c), sd["pos_embed"][0]) <= 1e-6
    n, d = sd["decoder_pos_embed"].shape[1:]
    g = int(n ** 0.5)
    assert close(sincos_2d(grid_coords(g, g).view(-1, 2), d), sd["decoder_pos_embed"][0]) <= 1e-6
