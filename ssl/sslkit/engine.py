"""The training loop: method-agnostic, one screen long (``train``), and its assembly (``build_run``).

``build_run(cfg, run_dir)`` puts a run together: runtime and process group, method, data source and
loader, derived lengths, optimizer, scaler, schedule, logger, online kNN, pictures, and the state of the
newest checkpoint when resuming. ``train`` is the loop: schedules(step) -> forward under autocast ->
backward (accumulate) -> clip -> optimizer step -> method.after_step -> log -> pictures -> checkpoint.
Everything method-specific is behind ``Method``, everything multi-process behind ``Dist``.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf

import sslkit
from sslkit import checkpoint as ckpt_io
from sslkit import distributed
from sslkit.config import Derived, derive, to_plain, validate
from sslkit.data import PretrainLoader, build_pretrain_loader, build_source
from sslkit.distributed import Dist
from sslkit.errors import CheckpointError, ConfigError, DataError, TrainingError
from sslkit.evaluation import OnlineKNN, eval_sources
from sslkit.methods import Method, build_method
from sslkit.optim import apply_schedule, build_optimizer
from sslkit.preemption import PreemptionGuard, ranks_agree
from sslkit.runlog import RunLogger
from sslkit.schedules import OptimSchedule
from sslkit.visualize import Pictures, first_images


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # None = fp32
    use_scaler: bool


def setup_runtime(tcfg: Any) -> Runtime:
    dev = str(tcfg.device)
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible: use trainer.device=cpu")
    device = torch.device(dev)
    prec = str(tcfg.precision)
    if prec == "auto":  # bf16 where the hardware has it; fp32 on CPU (bf16 autocast is slow on most CPUs)
        prec = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if prec not in ("fp32", "bf16", "fp16"):  # (composed configs: checked at compose time)
        raise ConfigError(f"trainer.precision={prec!r}: use auto, fp32, bf16 or fp16")
    if prec == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.precision=fp16 needs CUDA (GradScaler); on CPU use bf16 or fp32")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    return Runtime(device, dtype, prec == "fp16")


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def check_finite(out: dict[str, torch.Tensor], step: int, agree: Optional[Callable[[bool], bool]] = None) -> None:
    """Raise TrainingError on a non-finite loss. With several ranks ``agree`` (any rank's flag) makes
    every rank raise at the same micro-step, instead of the others hanging in the next collective."""
    local_bad = not bool(torch.isfinite(out["loss"]).all())
    if not (agree(local_bad) if agree is not None else local_bad):
        return
    if not local_bad:
        raise TrainingError(f"non-finite loss on another rank at step {step} (see its error); the last checkpoint "
                            f"was left untouched")
    bad = [k for k, v in out.items() if torch.is_tensor(v) and not torch.isfinite(v).all()]
    terms = ", ".join(f"{k}={out[k].float().mean().item():.4g}" for k in bad)
    raise TrainingError(f"non-finite loss at step {step} ({terms}); the last checkpoint was left untouched. "
                        f"Lower optim.blr, set optim.clip_grad, or use trainer.precision=fp32/bf16")


def picture_images(data_cfg: Any, size: int, n: int = 4) -> torch.Tensor:
    """The fixed images of the pictures: ``n`` held-out images of the evaluation split's val part
    (``eval_sources`` thinned to ``n``: evenly over the classes), in the eval view at ``size``: (n, 3, size, size)."""
    return first_images(eval_sources(data_cfg, n, n)[1], data_cfg, size, n)


def build_pictures(cfg: DictConfig, run_dir: Path, log: Optional[RunLogger] = None) -> Pictures:
    """The pictures of a run (``trainer.visualize_every``; the end-of-run ones of ``tasks.run_pretrain``):
    ``<run_dir>/pictures/step_<N>_<name>.png`` + ``curves.png``, logged through ``log`` when given."""
    return Pictures(picture_images(cfg.data, int(cfg.method.view.size)), run_dir / "pictures",
                    cfg.trainer.visualize_every, mean=cfg.data.mean, std=cfg.data.std, seed=int(cfg.trainer.seed),
                    metrics_path=run_dir / "metrics.jsonl", log_images=log.log_images if log is not None else None)


def data_wait_warning(fraction: float, log_every: int, num_workers: int, limit: float = 0.1) -> Optional[str]:
    """The warning when the step waited on the loader for more than ``limit`` of a logging window's wall time
    (``fraction``, logged as ``data_wait``), else None."""
    if not fraction > limit:
        return None
    return (f"[sslkit] warning: the step waited on data for {100 * fraction:.0f}% of the wall time of the last "
            f"{log_every} steps (data_wait in metrics.jsonl): the loader does not keep up; raise data.num_workers "
            f"(now {num_workers}) or give the job more CPU cores")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    derived: Derived
    metrics: dict[str, float]
    method: Method
    is_main: bool = True  # rank 0 (the process that logs, writes checkpoints and summarizes)


@dataclass
class Run:
    """A run put together by ``build_run``: what the loop reads and steps, and how it saves."""

    cfg: DictConfig
    run_dir: Path
    runtime: Runtime
    dist: Dist
    method: Method  # the unwrapped method (state dicts, hooks)
    fwd: torch.nn.Module  # what the loop calls: DDP / compiled / FSDP-sharded method
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: OptimSchedule
    derived: Derived
    loader: PretrainLoader
    log: RunLogger
    online_knn: Optional[OnlineKNN]
    pictures: Optional[Pictures]  # rank 0 only
    preempt: PreemptionGuard
    agree: Optional[Callable[[bool], bool]]  # flag -> any rank's flag (None in one process)
    config: dict[str, Any]  # the resolved plain config (saved in checkpoints and config.yaml)
    step: int  # optimizer steps done
    start: int = 0  # the step this invocation started (resumed) from
    waited: float = 0.0  # seconds the loop waited on the loader since the last logging step
    data_wait_warned: bool = False

    @property
    def stop(self) -> int:
        """The step this invocation ends at (``trainer.stop_after`` ends it early; the schedule still spans the run)."""
        t = self.cfg.trainer.stop_after
        return min(self.derived.total_steps, int(t)) if t is not None else self.derived.total_steps

    def next_batch(self, it: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The next batch on the device; the time spent waiting for it adds to ``waited`` (not for the first
        batch of an invocation: the workers' start-up)."""
        t = time.perf_counter()
        batch = to_device(next(it), self.runtime.device)
        self.waited += time.perf_counter() - t if self.step > self.start else 0.0
        return batch

    def take_wait(self) -> float:
        waited, self.waited = self.waited, 0.0
        return waited

    def warn_data_wait(self, fraction: float) -> None:
        """Once per run, on rank 0: ``data_wait_warning``. Not for a CPU run without workers: there the loading
        runs in the training process on the cores the step uses, so its share is loading, not idle waiting."""
        workers = int(self.cfg.data.num_workers)
        if workers == 0 and self.runtime.device.type == "cpu":
            return
        msg = data_wait_warning(fraction, int(self.cfg.trainer.log_every), workers)
        if msg and not self.data_wait_warned and self.dist.is_main:
            self.data_wait_warned = True
            print(msg)

    def autocast(self) -> AbstractContextManager:
        rt = self.runtime
        return torch.autocast(rt.device.type, dtype=rt.amp_dtype) if rt.amp_dtype else nullcontext()

    def save(self, name: str, metrics: dict[str, float]) -> Path:
        """Write ``checkpoints/<name>`` (every rank calls it: FSDP gathers; rank 0 writes)."""
        path, dd = self.run_dir / "checkpoints" / name, self.dist
        model_sd, opt_sd, rngs = dd.model_state(self.method), dd.optimizer_state(self.method, self.opt), \
            dd.gather_rng(ckpt_io.rng_state())
        if dd.is_main:
            ckpt_io.save_training_state(path, ckpt_io.Checkpoint(
                format_version=ckpt_io.FORMAT_VERSION, sslkit_version=sslkit.__version__, method=self.method.name,
                model_config=self.method.model_config, backbone_prefix=self.method.backbone_prefix, model=model_sd,
                optimizer=opt_sd, scaler=self.scaler.state_dict(), step=self.step,
                data_state=self.loader.state_dict(), rng=rngs[0], rng_ranks=rngs, config=self.config,
                derived=asdict(self.derived), wandb_id=self.log.wandb_id, tracker_ids=self.log.ids(), metrics=metrics))
            if name.startswith("step_"):
                ckpt_io.prune(path.parent, int(self.cfg.trainer.keep_last), self.cfg.trainer.keep_permanent_every)
        dd.barrier()  # nobody reads the checkpoint before it is complete
        return path

    def end(self, method: Method, finish: Optional[Callable[[Method, int, RunLogger], None]]) -> None:
        """Close training down (workers stopped, process group gone), then rank 0's ``finish(method, step,
        log)`` (the summary and pictures) with the run logger still open for the trackers."""
        self.close(keep_log=True)
        try:
            if finish is not None and self.dist.is_main:
                finish(method, self.step, self.log)
        finally:
            self.log.close()

    def close(self, keep_log: bool = False) -> None:
        self.preempt.restore()
        if not keep_log:
            self.log.close()
        self.loader.close()  # stop persistent workers
        self.dist.teardown()  # destroys the process group if setup() made it


def build_run(cfg: DictConfig, run_dir: str | Path) -> Run:
    """Assemble a run from a composed config, resuming from ``trainer.resume`` (``auto``: the newest
    readable checkpoint in ``run_dir``); the method's ``begin`` gets the step and the run's lengths."""
    validate(cfg)
    run_dir, tc = Path(run_dir), cfg.trainer
    rt = setup_runtime(tc)
    dd = distributed.setup(str(tc.strategy), rt.device, bool(tc.ddp_find_unused))  # process group, cuda:LOCAL_RANK
    rt.device = dd.device
    seed_everything(int(tc.seed), bool(tc.deterministic) and rt.device.type == "cpu")
    method = build_method(cfg).to(rt.device)  # the same init on every rank
    dd.seed_rank(int(tc.seed))
    source = build_source(cfg.data)
    d = derive(cfg, len(source), dd.world_size)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.use_scaler)
    state = ckpt_io.find_resume(run_dir, str(tc.resume))
    if state is not None:
        if state["method"] != method.name or state["model_config"]["name"] != method.model_config["name"]:
            raise CheckpointError(f"cannot resume a {state['method']}/{state['model_config']['name']} checkpoint "
                                  f"into {method.name}/{method.model_config['name']}: use a new hydra.run.dir or "
                                  f"trainer.resume=never")
        saved_size = (state.get("derived") or {}).get("dataset_size")
        if saved_size is not None and int(saved_size) != len(source):
            raise DataError(f"the data changed since the checkpoint in {run_dir}: {saved_size} samples then, "
                            f"{len(source)} now (data.name={cfg.data.name}, data.path={cfg.data.path}). A resume "
                            f"continues the epoch's sample order, which depends on the data. Fix: point data.* at "
                            f"the same data, or start a new run (a new hydra.run.dir, or trainer.resume=never)")
        method.load_state_dict(state["model"])
    fwd = dd.wrap(method, rt.amp_dtype)  # DDP / FSDP2 (in place) / the method itself
    opt = build_optimizer(method, cfg.optim, d.lr)  # after wrapping: FSDP2 replaces the parameters
    step, tracker_ids = 0, {}
    if state is not None:
        dd.load_optimizer_state(method, opt, state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        ckpt_io.set_rng_state(dd.rank_rng(state))
        step, tracker_ids = int(state["step"]), {"wandb": state["wandb_id"], **state.get("tracker_ids", {})}
        if dd.is_main:
            print(f"[sslkit] resumed from step {step} in {run_dir}")
    method.begin(step, d)
    plain = to_plain(cfg)
    if dd.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml({**plain, "derived": asdict(d)}))
        print("[sslkit] derived: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in asdict(d).items()))
    loader = build_pretrain_loader(source, cfg.data, cfg.method.view, method.masking(), seed=int(tc.seed),
                                   start_state=state["data_state"] if state else None, device=rt.device.type,
                                   rank=dd.rank, world_size=dd.world_size)
    log = RunLogger(run_dir, cfg.logger, {**plain, "derived": asdict(d)}, d.total_steps, step,
                    {k: v for k, v in tracker_ids.items() if v},
                    bool(tc.progress), is_main=dd.is_main)
    online_knn = (OnlineKNN(cfg.data, int(cfg.method.view.size), int(tc.knn_every), int(tc.knn_train_samples),
                            int(tc.knn_val_samples)) if tc.knn_every else None)
    fsdp = str(tc.strategy) == "fsdp"  # FSDP gathers the shards in forward / features only (distributed.shard)
    pictures = build_pictures(cfg, run_dir, log) if tc.visualize_every and dd.is_main and not fsdp else None
    if tc.visualize_every and dd.is_main and fsdp:
        print("[sslkit] trainer.visualize_every: no pictures during an FSDP run (only the end-of-run ones)")
    agree = ranks_agree(rt.device)
    preempt = PreemptionGuard(agree=agree).install()  # SIGTERM/USR1/USR2: stop after the step (before the workers fork)
    schedule = OptimSchedule(d.total_steps, d.lr, float(cfg.optim.min_lr), d.warmup_steps,
                             float(cfg.optim.weight_decay), cfg.optim.weight_decay_end)
    return Run(cfg, run_dir, rt, dd, method, torch.compile(fwd) if tc.compile else fwd, opt, scaler, schedule, d,
               loader, log, online_knn, pictures, preempt, agree, plain, step, step)


def train(cfg: DictConfig, run_dir: str | Path,
          finish: Optional[Callable[[Method, int, RunLogger], None]] = None) -> TrainResult:
    """Train ``cfg`` in ``run_dir`` to the end of its schedule (or ``trainer.stop_after``), checkpointing;
    then ``finish(method, step, log)`` on rank 0 (``Run.end``)."""
    run = build_run(cfg, run_dir)
    tc, method, opt, scaler, dd = cfg.trainer, run.method, run.opt, run.scaler, run.dist
    it: Iterator[dict[str, torch.Tensor]] = iter(run.loader)
    metrics: dict[str, float] = {}
    t0, imgs = time.perf_counter(), 0
    method.train()
    try:
        while run.step < run.stop:
            lr, wd = run.schedule.lr_at(run.step), run.schedule.wd_at(run.step)
            apply_schedule(opt, lr, wd)
            terms: dict[str, float] = {}
            for micro in range(int(tc.accum_steps)):
                batch = run.next_batch(it)  # on the device; the wait is timed (data_wait)
                with dd.grad_sync(micro == tc.accum_steps - 1):  # no gradient all-reduce on non-final micro-steps
                    with run.autocast():
                        out = run.fwd(batch)
                    check_finite(out, run.step, run.agree)
                    scaler.scale(out["loss"] / tc.accum_steps).backward()
                for k, v in out.items():
                    terms[k] = terms.get(k, 0.0) + float(v.detach()) / tc.accum_steps
                imgs += batch["index"].shape[0]  # source images (a multi-crop batch has several views each)
            if cfg.optim.clip_grad:
                scaler.unscale_(opt)
                terms["grad_norm"] = dd.clip_grad_norm(method, cfg.optim.clip_grad)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            run.step = step = run.step + 1
            terms.update(method.after_step(step))
            evals = run.online_knn(step, method) if run.online_knn else {}
            if step % tc.log_every == 0 or step == run.stop or evals:
                dt = time.perf_counter() - t0
                metrics = {**dd.mean({**terms, **evals, "data_wait": run.take_wait() / max(dt, 1e-9)}), "lr": lr, "wd": wd,
                           "images_per_s": imgs * dd.world_size / max(dt, 1e-9),  # rank mean; all ranks' images
                           "epoch": step / run.derived.steps_per_epoch}
                run.log.log(step, metrics)  # metrics.jsonl, trackers, the progress bar's numbers
                run.warn_data_wait(metrics["data_wait"])
                t0, imgs = time.perf_counter(), 0
            if run.pictures:  # every trainer.visualize_every steps and at the end (forked RNG, eval mode restored)
                run.pictures(step, method, final=step == run.stop)
            run.log.progress(step)
            if step % tc.ckpt_every == 0 or step == run.stop:
                run.save("last.pt", metrics)
            if tc.keep_every and step % tc.keep_every == 0:
                run.save(f"step_{step}.pt", metrics)
            if step < run.stop and run.preempt.should_stop():  # agreed by all ranks: checkpoint, then cli exits/requeues
                last = run.save("last.pt", metrics) if step % tc.ckpt_every else run.run_dir / "checkpoints" / "last.pt"
                raise run.preempt.preempted(step, str(last))
        method = dd.unsharded(method, lambda: build_method(cfg))  # FSDP: a plain copy on rank 0
    except BaseException:
        run.close()
        raise
    run.end(method, finish)
    return TrainResult(run.run_dir, run.step, run.derived, metrics, method, dd.is_main)
