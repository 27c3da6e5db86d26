"""Distributed training: process group, device placement, strategy wrapping and cross-rank helpers.

The loop (engine.py) never branches on "distributed": it asks a ``Dist`` (from ``setup``) to wrap the
method, to suspend gradient sync on non-final micro-steps, to clip, to average metrics, to gather
the checkpoint state, and whether it is the main process. With ``trainer.strategy=single`` every
helper is the identity.

Launch. ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under SLURM
(``srun``, one task per device) they come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, MASTER_ADDR
is the first host of SLURM_JOB_NODELIST (``scontrol show hostnames`` when available, else the bracket
ranges are expanded here) and MASTER_PORT, when not set, is derived from SLURM_JOB_ID. Without either,
``ddp`` / ``fsdp`` run as a one-process group on 127.0.0.1. Device: ``cuda:LOCAL_RANK`` (backend
nccl) or the CPU (backend gloo).

Strategies (``trainer.strategy``):

- ``single``: one process, the method itself.
- ``ddp``: ``DistributedDataParallel`` around the whole method. Parameters with ``requires_grad=False``
  (the DINOv2 EMA teacher) are not registered for gradient all-reduce. No per-forward buffer sync
  (``forward_sync_buffers=False``, formerly ``broadcast_buffers=False``; buffers are synced once at init):
  every buffer is kept equal on all ranks by construction (same init, the teacher's buffers are copied
  from the student by the EMA, the DINO centers are updated from all-reduced means), so the per-forward
  broadcast of rank 0's buffers would only cost time - and would overwrite the teacher's EMA-copied
  buffers from rank 0, which is harmless only as long as they are equal anyway.
  ``find_unused_parameters`` (``trainer.ddp_find_unused``, default on): DINOv2 detaches the head's last
  layer in the first epoch, so those parameters get no gradient on any rank; they keep ``grad=None``
  and the optimizer skips them, as in a single process.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) in place, so ``method.forward(batch)`` stays
  the entry point: every transformer block (a child of a ``blocks`` ModuleList) is a unit, the
  submodules named in ``method.fp32_reduce`` (DINOv2: the student heads) are units whose gradients
  are reduced in fp32, and the method itself is the root unit (everything else). Blocks that the
  method calls through ``forward_packed`` get it registered as an FSDP forward method. The EMA teacher
  is sharded like the student (per-parameter Shard(0) on the same mesh), so ``ema_update`` works on
  the local shards with no communication; it has no gradients, so it is never reduce-scattered (only
  all-gathered for its forward). Checkpoints gather the full state dicts on rank 0 (CPU), in the one
  checkpoint format (optimizer state keyed by parameter index, as ``Optimizer.state_dict``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from sslkit.checkpoint import unwrap
from sslkit.data.loader import derive_seed
from sslkit.errors import ConfigError

STRATEGIES = ("single", "ddp", "fsdp")


# ----------------------------------------------------------------------------------------- launch env
@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torchrun | slurm | none
    master_addr: str
    master_port: int


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM host list -> host names: ``"node[01-03,07],gpu-a"`` -> node01 node02 node03 node07 gpu-a.

    Zero padding of a range follows its start (``[08-10]`` -> 08 09 10); several bracket groups in one
    name (``r[1-2]n[1-2]``) expand as a product.
    """
    hosts: list[str] = []
    for item in _split_top(nodelist.strip()):
        hosts.extend(_expand_one(item))
    return hosts


def _split_top(s: str) -> list[str]:
    """Split at commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    if cur:
        out.append(cur)
    return [x for x in out if x]


def _expand_one(name: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if m is None:
        return [name]
    head, tail = name[: m.start()], name[m.end():]
    values: list[str] = []
    for part in m.group(1).split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            width = len(a)
            values.extend(str(i).zfill(width) for i in range(int(a), int(b) + 1))
        else:
            values.append(part)
    return [f"{head}{v}{rest}" for v in values for rest in _expand_one(tail)]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``scontrol show hostnames`` if it is installed)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_nodelist(nodelist)[0]


def slurm_port(job_id: str) -> int:
    """A port in [15000, 35000) derived from the job id (jobs sharing a node get different ports)."""
    return 15000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def detect(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Rank / world size / local rank / master address from torchrun's or SLURM's environment."""
    if "RANK" in environ and "WORLD_SIZE" in environ:  # torchrun (or a hand-made env)
        return LaunchEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)),
                         "torchrun", environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", 29500)))
    if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ:
        addr = environ.get("MASTER_ADDR") or first_host(environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST", "")))
        port = int(environ.get("MASTER_PORT") or slurm_port(environ.get("SLURM_JOB_ID", "0")))
        return LaunchEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]),
                         int(environ.get("SLURM_LOCALID", 0)), "slurm", addr, port)
    return LaunchEnv(0, 1, 0, "none", "127.0.0.1", 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------------------- context
class Dist:
    """The run's distributed context; with ``strategy="single"`` every helper is the identity."""

    def __init__(self, strategy: str, env: LaunchEnv, device: torch.device, owns_group: bool,
                 find_unused: bool = True) -> None:
        self.strategy, self.env, self.device, self.owns_group = strategy, env, device, owns_group
        self.find_unused = find_unused
        self._ddp: Optional[nn.parallel.DistributedDataParallel] = None
        self._fsdp_units: list[nn.Module] = []

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def active(self) -> bool:
        return self.strategy != "single"

    # ------------------------------------------------------------------------------------- wrapping
    def wrap(self, method: nn.Module, amp_dtype: Optional[torch.dtype]) -> nn.Module:
        """The module the loop calls (``fwd(batch)``): DDP around ``method``, or ``method`` sharded in place."""
        if self.strategy == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _ddp_args()
                              else {"broadcast_buffers": False})  # torch >= 2.12 renamed it
            self._ddp = nn.parallel.DistributedDataParallel(
                method, device_ids=ids, find_unused_parameters=self.find_unused, **no_buffer_sync)
            return self._ddp
        if self.strategy == "fsdp":
            if amp_dtype == torch.float16:  # the fp16 GradScaler path is untested with sharded (DTensor) grads
                raise ConfigError("trainer.strategy=fsdp with trainer.precision=fp16 is not supported (loss scaling "
                                  "over sharded gradients is untested): use trainer.precision=bf16, or strategy=ddp")
            self._fsdp_units = shard(method, self.device, amp_dtype)
            return method
        return method

    @contextmanager
    def grad_sync(self, enabled: bool) -> Iterator[None]:
        """Wrap forward + backward of a micro-step; ``enabled=False`` (non-final micro-steps) accumulates
        gradients locally without communication (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync``)."""
        if enabled or not self.active:
            yield
        elif self._ddp is not None:
            with self._ddp.no_sync():
                yield
        else:
            for u in self._fsdp_units:
                u.set_requires_gradient_sync(False, recurse=False)
            try:
                yield
            finally:
                for u in self._fsdp_units:
                    u.set_requires_gradient_sync(True, recurse=False)

    def clip_grad_norm(self, method: nn.Module, max_norm: float) -> float:
        """Clip the (already synchronized) gradients to ``max_norm``, each of the method's ``clip_groups()``
        on its own (DINOv2: backbone and heads separately, as the reference) or all parameters together;
        returns the global norm before clipping (the root of the groups' squared norms)."""
        groups = getattr(method, "clip_groups", lambda: None)() or [list(method.parameters())]
        total = 0.0
        for group in groups:
            params = [p for p in group if p.grad is not None]
            if not params:
                continue
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
                norm = norm.full_tensor()
            total += float(norm) ** 2
        return total ** 0.5

    # ------------------------------------------------------------------------------------- metrics
    def mean(self, terms: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over the ranks (a collective: every rank calls it at the same steps)."""
        if self.world_size == 1 or not terms:
            return terms
        keys = sorted(terms)
        t = torch.tensor([float(terms[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return dict(zip(keys, (t / self.world_size).tolist()))

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ------------------------------------------------------------------------------------- RNG
    def seed_rank(self, seed: int) -> None:
        """Give each rank its own torch RNG stream for in-model randomness (stochastic depth): rank 0 keeps
        the single-process stream, rank r > 0 is reseeded from (seed, r). Call after building the model
        (identical init on every rank)."""
        if self.rank:
            torch.manual_seed(derive_seed(int(seed), 0x5EED, self.rank))

    def gather_rng(self, local: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's RNG state (a collective), for the checkpoint."""
        if self.world_size == 1:
            return [local]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, local)
        return out

    def rank_rng(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's RNG state from a checkpoint: its own when the world size is unchanged, else rank 0's
        (the global RNG only drives in-model randomness such as stochastic depth; data has its own seeds)."""
        rngs = state.get("rng_ranks") or [state["rng"]]
        return rngs[self.rank] if len(rngs) == self.world_size else rngs[0]

    # ------------------------------------------------------------------------------------- checkpoint
    def model_state(self, method: nn.Module) -> dict[str, torch.Tensor]:
        """The method's full state dict on the main process, on the CPU (a collective under FSDP; other
        ranks get an empty dict)."""
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return unwrap(method).state_dict() if self.is_main else {}

    def optimizer_state(self, method: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's full state dict (``Optimizer.state_dict`` format, parameter indices) on the main
        process (a collective under FSDP)."""
        if self.strategy != "fsdp":
            return opt.state_dict() if self.is_main else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(method, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return {}
        names = _param_names(method, opt)
        index = {n: i for i, n in enumerate(names)}
        state = {index[n]: s for n, s in full["state"].items()}
        groups = [{**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()},  # betas: as torch has them
                   "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, method: nn.Module, opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        """Inverse of ``optimizer_state``; every rank passes the full dict (read from the checkpoint)."""
        if self.strategy != "fsdp":
            opt.load_state_dict(sd)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = _param_names(method, opt)
        full = {"state": {names[int(i)]: s for i, s in sd["state"].items()},
                "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in sd["param_groups"]]}
        # strict=False: parameters that never had a gradient yet (DINOv2's frozen last head layer) have no
        # state; DCP initializes one for them (a zero-gradient step), which is dropped again so that their
        # first real step is step 1 of Adam, as in a single process
        set_optimizer_state_dict(method, opt, full, options=StateDictOptions(full_state_dict=True, strict=False))
        params = [p for g in opt.param_groups for p in g["params"]]
        for p, n in zip(params, names):
            if n not in full["state"]:
                opt.state.pop(p, None)

    def unsharded(self, method: nn.Module, build: Any) -> nn.Module:
        """The trained method as a plain module for what follows the loop (summary, evaluation): FSDP
        gathers a full copy on the main process (a collective; ``build()`` makes the empty method), other
        ranks keep the sharded one; other strategies return ``method`` itself."""
        if self.strategy != "fsdp":
            return method
        sd = self.model_state(method)
        if not self.is_main:
            return method
        plain = build().to(self.device)
        plain.load_state_dict(sd)
        return plain.train(method.training)

    # ------------------------------------------------------------------------------------- teardown
    def teardown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _ddp_args() -> set[str]:
    import inspect

    return set(inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters)


def _param_names(method: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in ``state_dict`` index order (group by group)."""
    name_of = {id(p): n for n, p in method.named_parameters()}
    return [name_of[id(p)] for g in opt.param_groups for p in g["params"]]


def setup(strategy: str, device: torch.device, find_unused: bool = True,
          environ: Mapping[str, str] = os.environ) -> Dist:
    """Validate ``trainer.strategy``, join (or create) the process group and place the device.

    A process group that already exists (e.g. made by a test harness) is used and left alone at teardown.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={strategy!r}: use one of {', '.join(STRATEGIES)}")
    env = detect(environ)
    if strategy == "single":
        if env.world_size > 1:
            raise ConfigError(f"{env.world_size} processes were launched ({env.launcher}) but trainer.strategy=single: "
                              f"set trainer.strategy=ddp (or fsdp), or launch one process")
        return Dist("single", LaunchEnv(0, 1, 0, "none", "", 0), device, False)
    if dist.is_initialized():
        env = LaunchEnv(dist.get_rank(), dist.get_world_size(), env.local_rank, env.launcher, env.master_addr,
                        env.master_port)
        owns = False
    else:
        owns = True
    if device.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                              f"visible: launch at most one process per device (--nproc_per_node)")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        if env.launcher == "none":  # one process, no launcher: an in-memory store, no port to pick (or lose)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        else:
            os.environ.setdefault("MASTER_ADDR", env.master_addr)
            os.environ.setdefault("MASTER_PORT", str(env.master_port or _free_port()))
            dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, **kwargs)
    return Dist(strategy, env, device, owns, find_unused)


# ----------------------------------------------------------------------------------------- FSDP2
def shard(method: nn.Module, device: torch.device, amp_dtype: Optional[torch.dtype]) -> list[nn.Module]:
    """Apply FSDP2 ``fully_shard`` in place (units: blocks, ``method.fp32_reduce`` submodules, the root);
    returns the units, outermost last."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=amp_dtype)
    mp32 = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
    fp32_names = tuple(getattr(method, "fp32_reduce", ()))
    modules = dict(method.named_modules())
    missing = [n for n in fp32_names if n not in modules]
    assert not missing, f"{type(method).__name__}.fp32_reduce names {missing} are not submodules"
    units: list[nn.Module] = []
    for name, mod in modules.items():  # blocks first (children before parents)
        parent = name.rpartition(".")[0]
        if parent and parent.rpartition(".")[2] == "blocks" and isinstance(modules.get(parent), nn.ModuleList):
            fully_shard(mod, mesh=mesh, mp_policy=mp)
            if hasattr(mod, "forward_packed"):
                register_fsdp_forward_method(mod, "forward_packed")
            units.append(mod)
    for name in fp32_names:
        if name in modules:
            fully_shard(modules[name], mesh=mesh, mp_policy=mp32)
            units.append(modules[name])
    fully_shard(method, mesh=mesh, mp_policy=mp)
    if hasattr(method, "features"):  # evaluation entry point used during training (online kNN)
        register_fsdp_forward_method(method, "features")
    units.append(method)
    return units
