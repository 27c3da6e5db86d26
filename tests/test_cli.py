"""The commands share one override style (Hydra): the same keys work on all of them (hydra.run.dir=...),
--help lists every key with its default, an unknown key fails naming it and the accepted ones, and a bad
value exits 2 with the fix."""

import dataclasses
import json

import pytest

from sslkit.cli import eval_main, export_main, pretrain_main
from sslkit.config import compose
from sslkit.schemas import EvalKNNConfig, EvalLinearConfig, ExportConfig
from sslkit.tasks import run_pretrain

FAST = ["logger.wandb.mode=disabled", "trainer.progress=false", "trainer.summary=false", "data.num_workers=0",
        "data.num_samples=32", "data.batch_size=8", "trainer.max_steps=1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    run_pretrain(compose(FAST), d)
    return d / "checkpoints" / "last.pt"


def _exit_code(fn, argv) -> int:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    return e.value.code


@pytest.mark.parametrize("argv,schema", [(["knn"], EvalKNNConfig), (["linear"], EvalLinearConfig), ([], ExportConfig)])
def test_help_lists_every_key_with_its_default(argv, schema, capsys):
    main = export_main if schema is ExportConfig else eval_main
    assert _exit_code(main, [*argv, "--help"]) in (0, None)
    out = capsys.readouterr().out
    for f in dataclasses.fields(schema):
        assert f"\n{f.name}:" in out, f.name


def test_eval_and_export_take_hydra_keys_like_pretrain(ckpt, tmp_path, capsys):
    out = tmp_path / "knn.json"
    eval_main(["knn", f"checkpoint={ckpt}", "k=3", f"out={out}", f"hydra.run.dir={tmp_path / 'evalrun'}"])
    assert json.loads(out.read_text())["k"] == 3 and "kNN (k=3" in capsys.readouterr().out
    export_main([f"checkpoint={ckpt}", f"out={tmp_path / 'exp'}", f"hydra.run.dir={tmp_path / 'exprun'}"])
    assert (tmp_path / "exp" / "backbone.safetensors").exists()


def test_eval_data_keys_alone_mean_the_builtin_data(ckpt, tmp_path):
    out = tmp_path / "knn.json"
    eval_main(["knn", f"checkpoint={ckpt}", "data.num_samples=40", "data.num_workers=0", f"out={out}"])
    assert json.loads(out.read_text())["top1"] >= 0.0


@pytest.mark.parametrize("main,argv,named", [
    (eval_main, ["knn", "checkpoint=x.pt", "epochs=3"], "['epochs']"),  # a linear-probe key on kNN
    (eval_main, ["linear", "checkpoint=x.pt", "temperature=0.1"], "['temperature']"),
    (export_main, ["checkpoint=x.pt", "output=d"], "['output']"),
])
def test_unknown_keys_fail_naming_the_key_and_the_accepted_ones(main, argv, named, capsys):
    assert _exit_code(main, argv) == 2
    err = capsys.readouterr().err
    assert f"does not take {named}" in err and "accepted keys: checkpoint" in err


def test_bad_values_exit_2_with_the_rule(tmp_path, capsys):
    assert _exit_code(pretrain_main, ["optim.blr=-1", f"hydra.run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "[sslkit] error" in err and "optim.blr=-1.0: must be > 0" in err
    assert _exit_code(eval_main, ["knn", "checkpoint=x.pt", "k=0"]) == 2
    assert "k=0: must be > 0" in capsys.readouterr().err
