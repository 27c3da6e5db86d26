"""The training loop: method-agnostic, one screen long.

schedules(step) -> forward under autocast -> backward (accumulate) -> clip -> optimizer step ->
method.after_step -> log -> checkpoint. Everything method-specific is behind ``Method``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf

import sslkit
from sslkit import checkpoint as ckpt_io
from sslkit import distributed
from sslkit.config import Derived, derive, to_plain
from sslkit.data import build_pretrain_loader, build_source
from sslkit.errors import CheckpointError, ConfigError, TrainingError
from sslkit.evaluation import OnlineKNN
from sslkit.methods import Method, build_method
from sslkit.optim import apply_schedule, build_optimizer
from sslkit.preemption import PreemptionGuard, ranks_agree
from sslkit.runlog import RunLogger
from sslkit.schedules import OptimSchedule


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
    if prec not in ("fp32", "bf16", "fp16"):
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


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    derived: Derived
    metrics: dict[str, float]
    method: Method
    is_main: bool = True  # rank 0 (the process that logs, writes checkpoints and summarizes)


def train(cfg: DictConfig, run_dir: str | Path) -> TrainResult:
    run_dir = Path(run_dir)
    tc = cfg.trainer
    rt = setup_runtime(tc)
    dd = distributed.setup(str(tc.strategy), rt.device, bool(tc.ddp_find_unused))  # process group, cuda:LOCAL_RANK
    rt.device = dd.device
    seed_everything(int(tc.seed), bool(tc.deterministic) and rt.device.type == "cpu")

    method = build_method(cfg).to(rt.device)  # the same init on every rank
    dd.seed_rank(int(tc.seed))
    source = build_source(cfg.data)
    d = derive(cfg, len(source), dd.world_size)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.use_scaler)
    sched = OptimSchedule(d.total_steps, d.lr, float(cfg.optim.min_lr), d.warmup_steps,
                          float(cfg.optim.weight_decay), cfg.optim.weight_decay_end)

    step, wandb_id = 0, None
    state = ckpt_io.find_resume(run_dir, str(tc.resume))
    if state is not None:
        if state["method"] != method.name or state["model_config"]["name"] != method.model_config["name"]:
            raise CheckpointError(f"cannot resume a {state['method']}/{state['model_config']['name']} checkpoint "
                                  f"into {method.name}/{method.model_config['name']}: use a new hydra.run.dir or "
                                  f"trainer.resume=never")
        method.load_state_dict(state["model"])
    fwd = dd.wrap(method, rt.amp_dtype)  # DDP / FSDP2 (in place) / the method itself
    opt = build_optimizer(method, cfg.optim, d.lr)  # after wrapping: FSDP2 replaces the parameters
    if state is not None:
        dd.load_optimizer_state(method, opt, state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        ckpt_io.set_rng_state(dd.rank_rng(state))
        step, wandb_id = int(state["step"]), state["wandb_id"]
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
    log = RunLogger(run_dir, cfg.logger.wandb, {**plain, "derived": asdict(d)}, d.total_steps, step, wandb_id,
                    bool(tc.progress), is_main=dd.is_main)
    online_knn = (OnlineKNN(cfg.data, int(cfg.method.view.size), int(tc.knn_every), int(tc.knn_train_samples),
                            int(tc.knn_val_samples)) if tc.knn_every else None)
    fwd = torch.compile(fwd) if tc.compile else fwd
    autocast = (lambda: torch.autocast(rt.device.type, dtype=rt.amp_dtype)) if rt.amp_dtype else nullcontext

    def save(path: Path, metrics: dict[str, float]) -> None:  # every rank calls it (FSDP gathers); rank 0 writes
        model_sd, opt_sd, rngs = dd.model_state(method), dd.optimizer_state(method, opt), dd.gather_rng(ckpt_io.rng_state())
        if dd.is_main:
            ckpt_io.save_training_state(
                path, sslkit_version=sslkit.__version__, method=method.name, model_config=method.model_config,
                backbone_prefix=method.backbone_prefix, model=model_sd, optimizer=opt_sd, scaler=scaler.state_dict(),
                step=step, data_state=loader.state_dict(), rng=rngs[0], rng_ranks=rngs, config=plain,
                derived=asdict(d), wandb_id=log.wandb_id, metrics=metrics)
        dd.barrier()  # nobody reads the checkpoint before it is complete

    agree = ranks_agree(rt.device)  # flag -> any rank's flag (None in one process)
    preempt = PreemptionGuard(agree=agree).install()  # SIGTERM/USR1/USR2: stop after the step
    it: Iterator[dict[str, torch.Tensor]] = iter(loader)  # (workers fork after install: they inherit the handlers)
    method.train()
    metrics: dict[str, float] = {}
    t0, imgs = time.perf_counter(), 0
    stop = min(d.total_steps, int(tc.stop_after)) if tc.stop_after is not None else d.total_steps
    try:
        while step < stop:
            lr, wd = sched.lr_at(step), sched.wd_at(step)
            apply_schedule(opt, lr, wd)
            terms: dict[str, float] = {}
            for micro in range(int(tc.accum_steps)):
                batch = to_device(next(it), rt.device)
                with dd.grad_sync(micro == tc.accum_steps - 1):  # no gradient all-reduce on non-final micro-steps
                    with autocast():
                        out = fwd(batch)
                    check_finite(out, step, agree)
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
            step += 1
            terms.update(method.after_step(step, d.total_steps))
            evals = online_knn(step, method) if online_knn else {}
            terms.update(evals)
            if step % tc.log_every == 0 or step == stop or evals:
                dt = time.perf_counter() - t0
                metrics = {**dd.mean(terms), "lr": lr, "wd": wd, "images_per_s": imgs * dd.world_size / max(dt, 1e-9),
                           "epoch": step / d.steps_per_epoch}  # metrics averaged over ranks, images of all ranks
                log.log(step, metrics)
                log.progress(step, {"loss": metrics["loss"], "lr": lr, "img/s": metrics["images_per_s"]})
                t0, imgs = time.perf_counter(), 0
            else:
                log.progress(step)
            if step % tc.ckpt_every == 0 or step == stop:
                save(run_dir / "checkpoints" / "last.pt", metrics)
            if tc.keep_every and step % tc.keep_every == 0:
                save(run_dir / "checkpoints" / f"step_{step}.pt", metrics)
                if dd.is_main:
                    ckpt_io.prune(run_dir / "checkpoints", int(tc.keep_last), tc.keep_permanent_every)
            if step < stop and preempt.should_stop():  # agreed by all ranks: checkpoint, then cli exits/requeues
                if step % tc.ckpt_every:  # (else last.pt holds this step already)
                    save(run_dir / "checkpoints" / "last.pt", metrics)
                raise preempt.preempted(step, str(run_dir / "checkpoints" / "last.pt"))
        method = dd.unsharded(method, lambda: build_method(cfg))  # FSDP: a plain copy on rank 0
    finally:
        preempt.restore()
        log.close()
        loader.close()  # stop persistent workers
        dd.teardown()  # destroys the process group if setup() made it
    return TrainResult(run_dir, step, d, metrics, method, dd.is_main)
