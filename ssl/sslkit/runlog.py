"""Run logging: progress bar, ``metrics.jsonl`` and wandb (offline by default).

The loop calls ``log(step, metrics)`` on logging steps (a row in ``metrics.jsonl``, wandb, the bar's
numbers) and ``progress(step)`` every step; ``log_images(step, pictures)`` sends pictures to wandb (the PNG
files in ``<run_dir>/pictures/`` are the record without it).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from sslkit.errors import ConfigError


class RunLogger:
    def __init__(self, run_dir: Path, wandb_cfg: Any, config: dict[str, Any], total_steps: int, start_step: int,
                 wandb_id: Optional[str], progress: bool, is_main: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.wandb_id = wandb_id
        mode = str(wandb_cfg.mode)
        if mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logger.wandb.mode={mode!r}: use offline, online or disabled")
        if is_main and mode != "disabled":
            import wandb

            self.wandb_id = wandb_id or uuid.uuid4().hex[:12]
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name,
                                        tags=list(wandb_cfg.tags), config=config, dir=str(self.run_dir), mode=mode,
                                        id=self.wandb_id, resume="allow")
        self.bar = None
        if is_main and progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, file=sys.stderr,
                            desc="pretrain")
        self._last_bar_step = start_step

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        row = {"step": step, "time": time.time(), **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.bar is not None:
            shown = {"loss": metrics.get("loss"), "lr": metrics.get("lr"), "img/s": metrics.get("images_per_s")}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if v is not None}, refresh=False)

    def log_images(self, step: int, images: dict[str, Any]) -> None:
        """Log pictures (``{name: PNG path or (H, W, 3) uint8 array}``) to wandb as ``pictures/<name>`` at ``step``."""
        if not self.is_main or self.wandb_run is None or not images:
            return
        import wandb

        self.wandb_run.log({f"pictures/{k}": wandb.Image(str(v) if isinstance(v, (str, Path)) else v)
                            for k, v in images.items()}, step=step)

    def progress(self, step: int) -> None:
        """Advance the progress bar to ``step``."""
        if self.bar is not None:
            self.bar.update(step - self._last_bar_step)
            self._last_bar_step = step

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = v

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
