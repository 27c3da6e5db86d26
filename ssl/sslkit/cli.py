"""Console entry points; every command is a Hydra app with the same override style.

    sslkit-pretrain [key=value ...]              configs/pretrain.yaml     -> tasks.run_pretrain
    sslkit-finetune checkpoint=<ckpt> [...]      configs/finetune.yaml     -> tasks.run_finetune
    sslkit-eval knn|linear checkpoint=<ckpt> [...]  configs/eval_{knn,linear}.yaml -> evaluation.eval_*
    sslkit-export checkpoint=<ckpt> [out=<dir>]  configs/export.yaml       -> export.export
    sslkit-visualize checkpoint=<ckpt> [out=<dir>]  configs/visualize.yaml -> tasks.visualize_checkpoint
    sslkit-data shard data=<group> out=<dir>     configs/shard.yaml        -> data.shards.write_shards

``--help`` on any of them lists every key with its default. Errors a user can cause (config, data,
checkpoint) print ``[sslkit] error: ...`` with the fix and exit 2; a preempted run exits 128 + signum
after its checkpoint (or is requeued by submitit). ``scripts/*.py`` are thin wrappers.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from sslkit.config import check_overrides, config_dir, register_configs, validate
from sslkit.errors import ConfigError, ErrorExit, SSLKitError
from sslkit.evaluation import eval_knn, eval_linear
from sslkit.export import export
from sslkit.preemption import Preempted
from sslkit.schemas import EvalKNNConfig, EvalLinearConfig, ExportConfig, ShardConfig, VisualizeConfig
from sslkit.tasks import pretrain_objective, run_finetune, run_pretrain, visualize_checkpoint, write_shard_splits

EVAL_USAGE = (
    "usage: sslkit-eval knn checkpoint=<ckpt> [model=<sslkit model>] [data=<group> data.path=...] [k=20] [t=0.07] "
    "[out=r.json]\n"
    "       sslkit-eval linear checkpoint=<ckpt> [data=<group> data.path=...] [epochs=100] "
    "[lrs=[0.001,0.01,0.1]] [batch_size=256] [wd=0] [seed=0] [out=r.json]\n"
    "       sslkit-eval knn|linear --help   (every key and its default)"
)
EXPORT_USAGE = ("usage: sslkit-export checkpoint=<run>/checkpoints/last.pt [out=<dir>] [model=<sslkit model>, for a "
                "foreign checkpoint]   (--help: every key)")
VISUALIZE_USAGE = ("usage: sslkit-visualize checkpoint=<run>/checkpoints/last.pt [out=<dir>] [n=4] [data=<group> "
                   "data.path=...] [threshold=0.5]   (--help: every key)")


def _fail(e: SSLKitError) -> None:
    print(f"\n[sslkit] error: {e}", file=sys.stderr)
    raise ErrorExit(e)  # exit 2 (a SystemExit a sweeper can tell from a preemption's)


def _guarded(body: Callable[[], Any]) -> Any:
    """Run a command's body, return its value: user errors exit 2 with the message, a preemption its code / requeue."""
    try:
        return body()
    except Preempted as e:  # checkpoint written: submitit requeues, else exit 128 + signum
        e.exit()
    except SSLKitError as e:
        _fail(e)


def _run_dir(cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig

    return cfg.get("run_dir") or HydraConfig.get().runtime.output_dir


# Hydra task functions (module-level: launchers such as submitit pickle them by reference)
def _hydra_pretrain(cfg: DictConfig) -> Optional[float]:  # trainer.objective's value: a sweeper's (optuna_sweep)
    return _guarded(lambda: pretrain_objective(cfg, run_pretrain(validate(cfg), _run_dir(cfg))))


def _hydra_finetune(cfg: DictConfig) -> None:
    _guarded(lambda: run_finetune(validate(cfg), _run_dir(cfg)))


def _hydra_eval_knn(cfg: DictConfig) -> None:
    _guarded(lambda: _eval_knn(validate(cfg)))


def _hydra_eval_linear(cfg: DictConfig) -> None:
    _guarded(lambda: _eval_linear(validate(cfg)))


def _hydra_export(cfg: DictConfig) -> None:
    _guarded(lambda: _export(validate(cfg)))


def _hydra_visualize(cfg: DictConfig) -> None:
    _guarded(lambda: _visualize(validate(cfg)))


def _hydra_app(config_name: str, task: Callable[[DictConfig], None], argv: Optional[list[str]], prog: str) -> None:
    """Run ``task`` as the Hydra app of ``configs/<config_name>.yaml`` on ``argv`` (default: sys.argv)."""
    import hydra

    register_configs()
    saved = sys.argv
    sys.argv = [prog, *(saved[1:] if argv is None else argv)]
    try:
        check_overrides(sys.argv[1:])
        hydra.main(version_base=None, config_path=config_dir(), config_name=config_name)(task)()
    except SSLKitError as e:
        _fail(e)
    finally:
        sys.argv = saved


def pretrain_main(argv: Optional[list[str]] = None) -> None:
    _hydra_app("pretrain", _hydra_pretrain, argv, "sslkit-pretrain")


def finetune_main(argv: Optional[list[str]] = None) -> None:
    _hydra_app("finetune", _hydra_finetune, argv, "sslkit-finetune")


# ----------------------------------------------------------------------------------------- eval / export
def check_keys(argv: list[str], schema: type, command: str, usage: str) -> list[str]:
    """Refuse override keys that ``schema`` does not have (naming the key and the accepted ones) before
    Hydra composes; ``data.*`` without ``data=<group>`` means the built-in ``data=synthetic`` defaults."""
    keys = list(schema.__dataclass_fields__)
    out, has_data_group = [], any(a.lstrip("+~").startswith("data=") for a in argv)
    for i, a in enumerate(argv):
        if a.startswith("-") or (i and argv[i - 1].startswith("-") and "=" not in a):  # Hydra flags: --cfg job, -m
            out.append(a)
            continue
        key = a.split("=", 1)[0].lstrip("+~")
        if "=" not in a and not a.startswith("~"):
            raise ConfigError(f"{command}: arguments are key=value, got {a!r}; accepted keys: {', '.join(keys)}\n{usage}")
        top = key.split(".")[0].split("/")[0]
        if top not in keys and top != "hydra":
            raise ConfigError(f"{command} does not take [{key!r}]; accepted keys: {', '.join(keys)} (and hydra.*)\n{usage}")
        out.append(a)
    if "data" in keys and not has_data_group and any(a.startswith("data.") for a in argv):
        out.insert(0, "data=synthetic")
    return out


def _checked_app(config: str, task: Any, argv: list[str], schema: type, command: str, usage: str) -> None:
    """``check_keys`` (a bad key exits 2 with the message), then the Hydra app ``config`` running ``task``."""
    try:
        rest = check_keys(argv, schema, command, usage)
    except SSLKitError as e:
        _fail(e)
    _hydra_app(config, task, rest, command)


def _need_checkpoint(cfg: DictConfig, command: str, usage: str) -> str:
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError(f"{command} needs checkpoint=<path>\n{usage}")
    return str(cfg.checkpoint)


def _eval_knn(cfg: DictConfig) -> None:
    eval_knn(_need_checkpoint(cfg, "sslkit-eval knn", EVAL_USAGE), cfg.data, k=int(cfg.k), temperature=float(cfg.t),
             out=cfg.out, model=cfg.model, img_size=cfg.img_size)


def _eval_linear(cfg: DictConfig) -> None:
    eval_linear(_need_checkpoint(cfg, "sslkit-eval linear", EVAL_USAGE), cfg.data,
                lrs=[float(v) for v in cfg.lrs] if cfg.lrs is not None else None, epochs=int(cfg.epochs),
                out=cfg.out, batch_size=int(cfg.batch_size), weight_decay=float(cfg.wd), seed=int(cfg.seed),
                model=cfg.model, img_size=cfg.img_size)


EVALS = {"knn": (EvalKNNConfig, _hydra_eval_knn), "linear": (EvalLinearConfig, _hydra_eval_linear)}


def eval_main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv or argv[0] not in EVALS:
            if argv and argv[0] in ("-h", "--help"):
                print(EVAL_USAGE)
                return
            raise ConfigError(f"{f'unknown subcommand {argv[0]!r}; ' if argv else ''}{EVAL_USAGE}")
    except SSLKitError as e:
        _fail(e)
    schema, task = EVALS[argv[0]]
    _checked_app(f"eval_{argv[0]}", task, argv[1:], schema, f"sslkit-eval {argv[0]}", EVAL_USAGE)


def _export(cfg: DictConfig) -> None:
    ckpt = Path(_need_checkpoint(cfg, "sslkit-export", EXPORT_USAGE))
    export(ckpt, cfg.out or ckpt.parent.parent / "export", model=cfg.model)


def export_main(argv: Optional[list[str]] = None) -> None:
    _checked_app("export", _hydra_export, sys.argv[1:] if argv is None else list(argv), ExportConfig,
                 "sslkit-export", EXPORT_USAGE)


def _visualize(cfg: DictConfig) -> None:
    visualize_checkpoint(_need_checkpoint(cfg, "sslkit-visualize", VISUALIZE_USAGE), cfg.out, int(cfg.n), cfg.data,
                         cfg.threshold, int(cfg.seed))


def visualize_main(argv: Optional[list[str]] = None) -> None:
    _checked_app("visualize", _hydra_visualize, sys.argv[1:] if argv is None else list(argv), VisualizeConfig,
                 "sslkit-visualize", VISUALIZE_USAGE)


# ----------------------------------------------------------------------------------------- data
DATA_USAGE = ("usage: sslkit-data shard data=<group> data.path=... out=<dir> [shard_size=10000] [split=train] "
              "[val=true] [shuffle=true] [seed=0]   (sslkit-data shard --help: every key)")


def _hydra_shard(cfg: DictConfig) -> None:
    _guarded(lambda: write_shard_splits(validate(cfg), DATA_USAGE))


def data_main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] != "shard":
        if argv and argv[0] in ("-h", "--help"):
            print(DATA_USAGE)
            return
        _fail(ConfigError(f"{f'unknown subcommand {argv[0]!r}; ' if argv else ''}{DATA_USAGE}"))
    rest = argv[1:]
    if not any(a.lstrip("+~").startswith("data=") for a in rest):  # data.path=... alone: an image folder / tar
        rest = ["data=image_folder", *rest]
    _checked_app("shard", _hydra_shard, rest, ShardConfig, "sslkit-data shard", DATA_USAGE)
