"""Run logging: progress bar, ``metrics.jsonl`` and the trackers (wandb, TensorBoard, MLflow).

The loop talks to one ``RunLogger``: ``log(step, metrics)`` on logging steps (a row in ``metrics.jsonl``,
every tracker, the bar's numbers), ``progress(step)`` every step, ``log_images(step, pictures)`` for the
pictures (the PNG files in ``<run_dir>/pictures/`` are the record without a tracker) and ``summary(values)``
for the end-of-run numbers. The logger fans these out to the enabled ``Tracker``s (``logger.<name>`` in the
config); a tracker with a run id (wandb, MLflow) hands it back through ``ids()`` so the checkpoint keeps it
and a resumed run continues the same tracker run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sslkit.errors import ConfigError

Image = Any  # a PNG path or an (H, W, 3) uint8 array


def _array(image: Image) -> np.ndarray:
    if isinstance(image, (str, Path)):
        from PIL import Image as PILImage

        with PILImage.open(image) as im:
            return np.asarray(im.convert("RGB"))
    return np.asarray(image)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values; tracker params, sweep search spaces)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _need(module: str, extra: str, option: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{option}=true needs {module}: pip install \"sslkit[{extra}]\" (or set {option}=false)") from e


class Tracker:
    """One experiment tracker. ``ids()`` returns what a resumed run needs to continue the same tracker run."""

    name = "tracker"

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_images(self, step: int, images: dict[str, Image]) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def ids(self) -> dict[str, str]:
        return {}

    def close(self) -> None: ...


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, cfg: Any, config: dict[str, Any], run_id: Optional[str]) -> None:
        import wandb

        self.id = run_id or uuid.uuid4().hex[:12]
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, tags=list(cfg.tags),
                              config=config, dir=str(run_dir), mode=str(cfg.mode), id=self.id, resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_images(self, step: int, images: dict[str, Image]) -> None:
        import wandb

        self.run.log({f"pictures/{k}": wandb.Image(str(v) if isinstance(v, (str, Path)) else v)
                      for k, v in images.items()}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def ids(self) -> dict[str, str]:
        return {"wandb": self.id}

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker(Tracker):
    """Event files in ``<run_dir>/tensorboard``. On resume from step S the reader drops the events at steps > S
    that a killed run wrote after its last checkpoint (``purge_step``), so the curves show the run that went on."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int) -> None:
        _need("tensorboard", "tensorboard", "logger.tensorboard.enabled")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.step = start_step
        if start_step == 0:
            import yaml

            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "\n```", 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()
        self.step = step

    def log_images(self, step: int, images: dict[str, Image]) -> None:
        for k, v in images.items():
            self.writer.add_image(f"pictures/{k}", _array(v), step, dataformats="HWC")
        self.writer.flush()

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f"summary/{k}", v, self.step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    """An MLflow run: by default in a SQLite store in the run dir (``sqlite:///<run_dir>/mlflow.db``, the
    artifacts in ``<run_dir>/mlflow_artifacts``), or on ``logger.mlflow.tracking_uri``. The config goes in
    as flattened params plus ``config.yaml`` as an artifact; a resumed run logs into the same MLflow run."""

    name = "mlflow"

    def __init__(self, run_dir: Path, cfg: Any, config: dict[str, Any], run_id: Optional[str]) -> None:
        mlflow = _need("mlflow", "mlflow", "logger.mlflow.enabled")
        from mlflow.entities import Param

        self.entities = mlflow.entities
        uri = cfg.tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.run_id = None
        if run_id is not None:
            try:
                self.run_id = self.client.get_run(run_id).info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            except mlflow.exceptions.MlflowException:
                print(f"[sslkit] MLflow run {run_id} is not in {uri}: logging to a new run")
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(str(cfg.experiment))
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
                str(cfg.experiment), artifact_location=(run_dir / "mlflow_artifacts").resolve().as_uri())
            self.run_id = self.client.create_run(exp_id, run_name=cfg.run_name or run_dir.name).info.run_id
            flat = flatten(config)
            params = [Param(k, str(v)[:500]) for k, v in flat.items()]  # older servers' limit
            for i in range(0, len(params), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=params[i: i + 100])
            self.client.log_text(self.run_id, json.dumps(config, indent=1, default=str), "config.json")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.entities.Metric(k, float(v), now, step)
                                                    for k, v in metrics.items()])

    def log_images(self, step: int, images: dict[str, Image]) -> None:
        for k, v in images.items():
            self.client.log_image(self.run_id, _array(v), key=f"pictures/{k}", step=step)

    def summary(self, values: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.entities.Metric(f"summary/{k}", float(v), now, 0)
                                                    for k, v in values.items() if isinstance(v, (int, float))])

    def ids(self) -> dict[str, str]:
        return {"mlflow": self.run_id}

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def build_trackers(run_dir: Path, logger_cfg: Any, config: dict[str, Any], start_step: int,
                   ids: dict[str, str]) -> list[Tracker]:
    """The trackers ``logger_cfg`` enables, continuing the runs in ``ids`` (from the checkpoint)."""
    mode = str(logger_cfg.wandb.mode)
    if mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"logger.wandb.mode={mode!r}: use offline, online or disabled")
    trackers: list[Tracker] = []
    if mode != "disabled":
        trackers.append(WandbTracker(run_dir, logger_cfg.wandb, config, ids.get("wandb")))
    tb, mlf = logger_cfg.get("tensorboard"), logger_cfg.get("mlflow")
    if tb is not None and tb.enabled:
        trackers.append(TensorBoardTracker(run_dir, config, start_step))
    if mlf is not None and mlf.enabled:
        trackers.append(MLflowTracker(run_dir, mlf, config, ids.get("mlflow")))
    return trackers


class RunLogger:
    def __init__(self, run_dir: Path, logger_cfg: Any, config: dict[str, Any], total_steps: int, start_step: int,
                 ids: Optional[dict[str, str]], progress: bool, is_main: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.trackers = build_trackers(self.run_dir, logger_cfg, config, start_step, dict(ids or {})) if is_main else []
        self.bar = None
        if is_main and progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, file=sys.stderr,
                            desc="pretrain")
        self._last_bar_step = start_step

    def ids(self) -> dict[str, str]:
        """The trackers' run ids, for the checkpoint (``tracker_ids``; wandb's also as ``wandb_id``)."""
        return {k: v for t in self.trackers for k, v in t.ids().items()}

    @property
    def wandb_id(self) -> Optional[str]:
        return self.ids().get("wandb")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        row = {"step": step, "time": time.time(), **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for t in self.trackers:
            t.log(step, metrics)
        if self.bar is not None:
            shown = {"loss": metrics.get("loss"), "lr": metrics.get("lr"), "img/s": metrics.get("images_per_s")}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if v is not None}, refresh=False)

    def log_images(self, step: int, images: dict[str, Image]) -> None:
        """Send pictures (``{name: PNG path or (H, W, 3) uint8 array}``) to the trackers as ``pictures/<name>``."""
        if images:
            for t in self.trackers:
                t.log_images(step, images)

    def progress(self, step: int) -> None:
        """Advance the progress bar to ``step``."""
        if self.bar is not None:
            self.bar.update(step - self._last_bar_step)
            self._last_bar_step = step

    def summary(self, values: dict[str, Any]) -> None:
        """The end-of-run numbers (the summary's kNN / linear / held-out loss) to every tracker."""
        for t in self.trackers:
            t.summary(values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for t in self.trackers:
            t.close()
