"""Sweep summary: one row per point of a ``-m`` sweep with its varying overrides and final metrics.

A sweep directory (``hydra.sweep.dir``) holds one subdirectory per point (``hydra.sweep.subdir``), each
a normal run directory: ``.hydra/overrides.yaml`` (written by Hydra), ``config.yaml`` (resolved config +
derived values), ``metrics.jsonl``, ``checkpoints/`` and, when the run printed its summary,
``summary.json`` (pretraining) or ``finetune.json`` (fine-tuning). ``scripts/sweep_summary.py DIR``.

An Optuna sweep (``hydra/sweeper=optuna``: the study's ``optuna.journal`` or ``optimization_results.yaml`` in
the dir) is summarized from its study instead: one row per trial with its state, parameters and objective
value, the best one marked (``summarize_study``, ``format_study``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from sslkit.errors import ConfigError
from sslkit.optuna_sweep import JOURNAL, _optuna, open_storage, read_record

_RESULT_FILES = ("summary.json", "finetune.json")


def _last_row(path: Path) -> dict[str, Any]:
    """Last complete JSON line of metrics.jsonl (a preempted run may have a partial last line)."""
    if not path.is_file():
        return {}
    for line in reversed(path.read_text().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}


def _job_sort_key(p: Path) -> tuple[int, str]:
    m = re.match(r"^(\d+)", p.name)
    return (int(m.group(1)) if m else 1 << 30, p.name)


def _is_run_dir(p: Path) -> bool:
    return (p / ".hydra" / "overrides.yaml").is_file() or (p / "metrics.jsonl").is_file() or (p / "config.yaml").is_file()


def summarize_sweep(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per point, in job order: ``job`` (subdir name), ``overrides`` ({key: value} from the
    command line), ``varying`` (the overrides whose values differ between points), ``step``,
    ``total_steps``, ``status`` (done / incomplete / no metrics), ``final`` (last metrics.jsonl row
    without step/time) and ``results`` (summary.json / finetune.json merged)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep directory {sweep_dir} does not exist: pass hydra.sweep.dir of the sweep "
                          f"(printed by sslkit-pretrain -m as 'sweep output dir')")
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and _is_run_dir(p)), key=_job_sort_key)
    if not jobs:
        raise ConfigError(f"{sweep_dir} has no run directories (subdirectories with .hydra/overrides.yaml or "
                          f"metrics.jsonl): is it a sweep dir, and have its jobs started?")
    rows: list[dict[str, Any]] = []
    for job in jobs:
        ov_file = job / ".hydra" / "overrides.yaml"
        overrides: dict[str, str] = {}
        if ov_file.is_file():
            for item in yaml.safe_load(ov_file.read_text()) or []:
                key, _, value = str(item).partition("=")
                overrides[key.lstrip("+~")] = value
        total: Optional[int] = None
        cfg_file = job / "config.yaml"
        if cfg_file.is_file():
            cfg = yaml.safe_load(cfg_file.read_text()) or {}
            total = (cfg.get("derived") or {}).get("total_steps")
        last = _last_row(job / "metrics.jsonl")
        step = last.get("step")
        results: dict[str, Any] = {}
        for name in _RESULT_FILES:
            if (job / name).is_file():
                results.update(json.loads((job / name).read_text()))
        status = "no metrics" if step is None else ("done" if total is not None and step >= total else "incomplete")
        rows.append({"job": job.name, "dir": str(job), "overrides": overrides, "step": step, "total_steps": total,
                     "status": status, "final": {k: v for k, v in last.items() if k not in ("step", "time")},
                     "results": results})
    keys = sorted({k for r in rows for k in r["overrides"]})
    varying = [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]
    for r in rows:
        r["varying"] = {k: r["overrides"].get(k, "") for k in varying}
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _table(header: list[str], body: list[list[Any]]) -> list[str]:
    """Fixed-width lines: the header, a rule, the rows."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_table(rows: list[dict[str, Any]], metrics: Optional[list[str]] = None) -> str:
    """A fixed-width text table: job, the varying overrides, step/total, status, then ``metrics``
    (default: ``loss`` and every key of the summary / fine-tune results)."""
    if metrics is None:
        metrics = ["loss"] + sorted({k for r in rows for k in r["results"]} - {"loss"})
    varying = list(rows[0]["varying"]) if rows else []
    header = ["job", *varying, "step", "status", *metrics]
    body = []
    for r in rows:
        values = {**r["final"], **r["results"]}
        steps = f"{_fmt(r['step'])}/{_fmt(r['total_steps'])}"
        body.append([r["job"], *[r["varying"][k] for k in varying], steps, r["status"],
                     *[_fmt(values.get(m)) for m in metrics]])
    return "\n".join(_table(header, body))


def study_storage(sweep_dir: str | Path) -> Optional[str]:
    """The Optuna storage of an Optuna sweep dir (``optimization_results.yaml``'s, else ``optuna.journal``), or None."""
    sweep_dir = Path(sweep_dir)
    results = sweep_dir / "optimization_results.yaml"
    if results.is_file():
        storage = (yaml.safe_load(results.read_text()) or {}).get("storage")
        if storage and ("://" in storage or Path(storage).is_file()):
            return str(storage)
    return str(sweep_dir / JOURNAL) if (sweep_dir / JOURNAL).is_file() else None


def _trial_dir(sweep_dir: Path, number: int, record: Optional[dict[str, Any]]) -> Optional[Path]:
    if record and record.get("run_dir") and Path(record["run_dir"]).is_dir():
        return Path(record["run_dir"])
    found = sorted(p for p in sweep_dir.glob(f"{number}_*") if p.is_dir())  # the default subdir: <number>_<name>
    return found[0] if found else None


def summarize_study(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per study in the Optuna sweep dir: ``study``, ``objective`` (trainer.objective), ``direction``,
    ``best`` (the best trial's number, None before one completed) and ``trials``, one dict per trial: ``trial``,
    ``state``, ``params``, ``value``, ``best`` (bool), ``error`` (a failed trial's), ``dir``, ``step``,
    ``total_steps`` (from its run dir)."""
    sweep_dir = Path(sweep_dir)
    spec = study_storage(sweep_dir)
    if spec is None:
        raise ConfigError(f"{sweep_dir} holds no Optuna study ({JOURNAL} or optimization_results.yaml)")
    optuna = _optuna()
    storage = open_storage(spec, sweep_dir)
    studies = []
    for name in optuna.study.get_all_study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        best = study.best_trial.number if complete else None
        trials = []
        for t in study.trials:
            record = read_record(sweep_dir, t.number)
            run_dir = _trial_dir(sweep_dir, t.number, record)
            last = _last_row(run_dir / "metrics.jsonl") if run_dir else {}
            total = None
            if run_dir and (run_dir / "config.yaml").is_file():
                total = ((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("derived") or {}).get(
                    "total_steps")
            trials.append({"trial": t.number, "state": t.state.name, "params": dict(t.params), "value": t.value,
                           "best": t.number == best, "error": (record or {}).get("error") if t.state.name == "FAIL"
                           else None, "dir": str(run_dir) if run_dir else None, "step": last.get("step"),
                           "total_steps": total})
        studies.append({"study": name, "objective": study.user_attrs.get("objective", "value"),
                        "direction": study.direction.name.lower(), "best": best, "trials": trials})
    return studies


def format_study(study: dict[str, Any]) -> str:
    """A study as a fixed-width table (trial, state, each parameter, the objective, step/total, ``*`` = best), each
    failed trial's error, and the line ``best: trial N value V params k=v ...``."""
    trials, objective = study["trials"], study["objective"]
    names = sorted({k for t in trials for k in t["params"]})
    header = ["trial", "state", *names, objective, "step", "best"]
    body = [[str(t["trial"]), t["state"], *[_fmt(t["params"].get(k)) for k in names], _fmt(t["value"]),
             f"{_fmt(t['step'])}/{_fmt(t['total_steps'])}", "*" if t["best"] else ""] for t in trials]
    lines = [f"study {study['study']!r}: {study['direction']} {objective}, {len(trials)} trials", *_table(header, body)]
    lines += [f"trial {t['trial']} failed: {(t['error'] or 'no record').strip().splitlines()[0]}"
              for t in trials if t["state"] == "FAIL"]
    best = next((t for t in trials if t["best"]), None)
    if best is None:
        lines.append("best: none yet (no trial completed)")
    else:
        params = " ".join(f"{k}={v}" for k, v in best["params"].items())
        lines.append(f"best: trial {best['trial']} value {best['value']:.6g} params {params}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Final metrics of every point of an sslkit sweep (hydra -m); the trials "
                                             "of an Optuna sweep (hydra/sweeper=optuna) with the best one marked")
    ap.add_argument("sweep_dir", help="the sweep's hydra.sweep.dir, e.g. runs/multirun/2026-01-31_12-00-00")
    ap.add_argument("--metrics", default=None, help="comma-separated columns (default: loss + summary results)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    a = ap.parse_args(argv)
    try:
        if study_storage(a.sweep_dir) is not None:
            studies = summarize_study(a.sweep_dir)
            print(json.dumps(studies, indent=2) if a.json else "\n\n".join(format_study(s) for s in studies))
            return
        rows = summarize_sweep(a.sweep_dir)
    except ConfigError as e:
        print(f"[sslkit] error: {e}", file=sys.stderr)
        sys.exit(2)
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, a.metrics.split(",") if a.metrics else None))
