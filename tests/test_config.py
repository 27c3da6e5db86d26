"""Every config composes; typos and wrong types fail at compose time naming the key; derived values."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from sslkit.config import ComposeError, compose, config_dir, derive
from sslkit.errors import ConfigError
from sslkit.methods import METHODS

_ALL = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))
EXPERIMENTS = [e for e in _ALL if not e.startswith("finetune_")]  # pretraining (sslkit-pretrain)
FINETUNE_EXPERIMENTS = [e for e in _ALL if e.startswith("finetune_")]  # sslkit-finetune experiment=...


def test_expected_experiments_exist():
    assert {"umae_demo", "umae_pvt_small", "umae_swin_tiny", "simmim_pvt_small", "simmim_swin_tiny",
            "dinov2_demo", "dinov2_vits16"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS + FINETUNE_EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment):
    if experiment.startswith("finetune_"):  # fine-tuning recipes extend the finetune primary config
        cfg = compose([f"experiment={experiment}"], config_name="finetune")
    else:
        cfg = compose([f"experiment={experiment}"])
    OmegaConf.resolve(cfg)
    assert cfg.method.name in METHODS
    assert cfg.model.img_size == cfg.method.view.size


def test_resnet50_dropblock_recipe_builds_the_paper_placement():
    from sslkit.methods import build_method

    cfg = compose(["experiment=finetune_resnet50_dropblock"], config_name="finetune")
    assert cfg.model.name == "sslkit_resnet50" and cfg.method.dropblock.preset == "resnet_paper"
    m = build_method(cfg)
    # groups 3 (6 blocks) and 4 (3 blocks) x (3 convs + 1 skip), block size 7, group 3 at a quarter of 0.1
    assert len(m.dropblocks) == 36 and {b.block_size for b in m.dropblocks} == {7}
    assert sorted(b.rate_factor for b in m.dropblocks) == [0.25] * 24 + [1.0] * 12


@pytest.mark.parametrize("group", ["method", "model", "data", "optim", "trainer", "logger"])
def test_every_group_option_composes(group):
    for p in sorted((Path(config_dir()) / group).glob("*.yaml")):
        overrides = [f"{group}={p.stem}"]
        if group == "data" and p.stem != "synthetic":
            overrides.append("data.path=/nonexistent")
        OmegaConf.resolve(compose(overrides))  # any option on its own: no experiment ties the groups together


def test_dinov2_recipe_values():
    cfg = compose(["experiment=dinov2_vits16"])
    v = cfg.method.view
    assert (v.size, v.local_size, v.n_global, v.n_local) == (224, 96, 2, 8)
    assert cfg.method.prototypes == 65536 and cfg.method.koleo_loss_weight == 0.1
    assert cfg.optim.lr_scaling == "sqrt" and cfg.optim.lr_mult == {"patch_embed": 0.2}
    d = derive(cfg, dataset_size=1_281_167, world_size=8)  # ImageNet-1k on 8 GPUs x 128 = 1024
    assert d.global_batch == 1024 and d.lr == pytest.approx(0.004)
    d4 = derive(cfg, dataset_size=1_281_167, world_size=2)  # 256: lr 0.004 * sqrt(1/4)
    assert d4.lr == pytest.approx(0.002) and d4.micro_batch == 128


def test_finetune_config_composes_and_checks_types():
    cfg = compose(["method.num_classes=10", "method.checkpoint=/x.pt"], config_name="finetune")
    assert cfg.method.name == "classify" and cfg.optim.layer_decay == 0.85 and cfg.data.split == "train"
    with pytest.raises(ConfigCompositionException):
        compose(["method.num_classes=ten"], config_name="finetune")


def test_default_is_the_umae_demo():
    cfg = compose([])
    assert cfg.method.name == "umae" and cfg.model.name == "sslkit_pvt_test" and cfg.data.name == "synthetic"
    assert cfg.method.view.size == 64 and cfg.method.unit == 8
    assert OmegaConf.to_container(cfg, resolve=True) == OmegaConf.to_container(compose(["experiment=umae_demo"]),
                                                                               resolve=True)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_has_its_yaml_and_schema(name):
    cfg = compose([f"method={name}"])  # configs/method/<name>.yaml extends the registered <name>_schema
    assert cfg.method.name == name and OmegaConf.get_type(cfg.method) is METHODS[name].config_class


def test_compose_with_the_hydra_node_validates_the_rest():
    """compose(return_hydra_config=True) (launcher / sweeper tests, notebooks) leaves Hydra's node alone: its
    sweep subdir names ${hydra.job.num}, known in a run only; sslkit's keys are still checked."""
    cfg = compose(["trainer.max_steps=3"], return_hydra_config=True)
    assert cfg.trainer.max_steps == 3 and "sweep" in cfg.hydra
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        compose(["trainer.max_steps=0"], return_hydra_config=True)


def test_a_method_and_model_compose_without_an_experiment():
    cfg = compose(["method=dinov2_tiny", "model=sslkit_vit_test", "optim=dinov2"])
    assert (cfg.method.name, cfg.model.name, cfg.optim.lr_scaling) == ("dinov2", "sslkit_vit_test", "sqrt")


@pytest.mark.parametrize("override,key,allowed", [
    ("trainer.precision=fp64", "trainer.precision", "auto, fp32, bf16, fp16"),
    ("trainer.strategy=deepspeed", "trainer.strategy", "single, ddp, fsdp"),
    ("data.on_error=ignore", "data.on_error", "skip, raise"),
    ("optim.lr_scaling=log", "optim.lr_scaling", "linear, sqrt"),
    ("method=dinov2_tiny method.centering=center", "method.centering", "sinkhorn_knopp, softmax"),
    ("data.name=mnist", "data.name", "synthetic, image_folder"),
])
def test_string_choices_fail_at_compose_naming_key_and_choices(override, key, allowed):
    with pytest.raises(ComposeError) as e:
        compose(override.split())
    assert key in str(e.value) and allowed in str(e.value)
    assert isinstance(e.value, ConfigCompositionException) and isinstance(e.value, ConfigError)


@pytest.mark.parametrize("override,expected", [
    ("optim.blr=-1", "optim.blr=-1.0: must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be >= 0"),
    ("optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0]: must be 2 numbers, each in [0.0, 1.0)"),
    ("optim.layer_decay=0", "optim.layer_decay=0.0: must be in (0.0, 1.0]"),
    ("method.secondary_mask_ratio=1.0", "method.secondary_mask_ratio=1.0: must be in [0.0, 1.0)"),
    ("method.view.scale=[0.9,0.2]", "method.view.scale=[0.9, 0.2]: must be [min, max] with min <= max"),
    ("data.batch_size=0", "data.batch_size=0: must be > 0"),
    ("trainer.accum_steps=0", "trainer.accum_steps=0: must be > 0"),
    ("model.drop_path_rate=1.5", "model.drop_path_rate=1.5: must be in [0.0, 1.0]"),
    ("optim=dinov2 optim.lr_mult.patch_embed=-1", "optim.lr_mult={'patch_embed': -1.0}: every factor must be > 0"),
    ("method=dinov2_tiny method.ema_momentum=0.999 method.ema_momentum_end=0.99",
     "method.ema_momentum=0.999: must be <= ema_momentum_end=0.99"),
    ("method=dinov2_tiny method.view.n_global=1", "method.view.n_global=1: must be >= 2"),
])
def test_ranges_fail_at_compose_naming_key_value_and_rule(override, expected):
    with pytest.raises(ConfigError) as e:
        compose(override.split())
    assert expected in str(e.value)


def test_every_range_violation_is_listed_at_once():
    with pytest.raises(ConfigError) as e:
        compose(["optim.blr=-1", "data.batch_size=0"])
    assert "optim.blr=-1.0" in str(e.value) and "data.batch_size=0" in str(e.value)


@pytest.mark.parametrize("override,key", [("method.secondary_mask_ratoi=0.3", "secondary_mask_ratoi"),
                                          ("trainer.max_steps=ten", "max_steps"),
                                          ("data.batch_size=1.5", "batch_size"),
                                          ("optim.lr_typo=1", "lr_typo")])
def test_typos_and_types_fail_at_compose_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    assert key in str(e.value) + str(e.value.__cause__)


def test_derived_values():
    cfg = compose(["data.batch_size=32", "trainer.accum_steps=2", "optim.blr=1e-4", "trainer.epochs=3",
                   "optim.warmup_epochs=1"])
    d = derive(cfg, dataset_size=1000)
    assert d.global_batch == 64
    assert d.lr == pytest.approx(1e-4 * 64 / 256)
    assert d.steps_per_epoch == 1000 // 64
    assert d.total_steps == 3 * (1000 // 64)
    assert d.warmup_steps == 1000 // 64
    cfg2 = compose(["trainer.max_steps=7", "optim.lr=0.01"])
    d2 = derive(cfg2, dataset_size=1000)
    assert d2.total_steps == 7 and d2.lr == 0.01


def test_dataset_smaller_than_a_batch_fails_clearly():
    cfg = compose(["data.batch_size=64"])
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        derive(cfg, dataset_size=10)
