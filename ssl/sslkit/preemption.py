"""Graceful preemption: a signal asks the loop to stop after the current step with a checkpoint.

``PreemptionGuard`` installs handlers for SIGTERM, SIGUSR1 and SIGUSR2 that only record the signal
(nothing is interrupted mid-step). The loop polls ``should_stop()`` once per optimizer step; when it is
true it writes ``checkpoints/last.pt`` (atomically) and raises ``Preempted``. The CLI then calls
``Preempted.exit()``:

1. if a Python handler was installed for that signal before sslkit's, it is called now, after the
   checkpoint. Under submitit (``hydra/launcher=slurm``) that is submitit's own handler: for its
   preemption/timeout signal (``SUBMITIT_PREEMPT_SIGNAL``, USR2 since submitit 1.5, the sbatch
   ``--signal=USR2@<signal_delay_s>``) it re-pickles the job and runs ``scontrol requeue`` itself, so
   submitit's requeue rules (``max_num_timeout``) stay in charge; for SIGTERM it only logs.
2. otherwise the process exits with status ``128 + signum`` (143 for SIGTERM, 138 for SIGUSR1, 140 for
   SIGUSR2): what a shell reports for a process killed by that signal, never 0 (the run did not
   finish) and never 2 (sslkit's config/data/checkpoint errors).

On restart the same command resumes from the newest complete checkpoint in the run directory
(``trainer.resume=auto``). With several ranks the flag is agreed (all-reduce MAX) so that every rank
stops after the same step: ``ranks_agree(device)`` does this when ``torch.distributed`` is initialized.

A scheduler may signal every process of the job, DataLoader workers included: sslkit's loaders use
``ignore_in_worker`` as ``worker_init_fn`` so a worker neither dies (which would crash the main process
before its checkpoint) nor acts; the main process stops them when it exits.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any, Callable, Optional

import torch

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

Handler = Any  # a callable, signal.SIG_DFL, signal.SIG_IGN or None (installed from C)


class Preempted(Exception):
    """Training stopped early on a preemption signal, after writing ``checkpoint``. Not an SSLKitError:
    nothing is wrong with the run; the same command resumes it."""

    def __init__(self, step: int, signum: int, checkpoint: str, previous_handler: Handler = None) -> None:
        self.step, self.signum, self.checkpoint = step, int(signum), checkpoint
        self.previous_handler = previous_handler
        super().__init__(f"preempted by {signal.Signals(self.signum).name} after step {step}; saved {checkpoint}. "
                         f"Run the same command again to resume (trainer.resume=auto)")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def exit(self) -> None:
        """Hand over to the handler that was there before sslkit's (submitit's: requeue), then exit
        with ``128 + signum``."""
        print(f"[sslkit] {self}", file=sys.stderr, flush=True)
        prev = self.previous_handler
        if callable(prev) and prev is not signal.default_int_handler:
            prev(self.signum, None)  # submitit's requeue handler exits itself (SystemExit)
        sys.exit(self.exit_code)


class PreemptionGuard:
    """Record SIGTERM / SIGUSR1 / SIGUSR2 instead of dying; restore the previous handlers on exit.

    ``agree(flag) -> bool`` combines the flag across ranks (``ranks_agree``); default: this process only.
    Usable as a context manager or with ``install()`` / ``restore()``.
    """

    def __init__(self, signals: tuple[int, ...] = SIGNALS, agree: Optional[Callable[[bool], bool]] = None) -> None:
        self.signals = tuple(signals)
        self.agree = agree
        self.signum: Optional[int] = None  # the first signal received
        self._previous: dict[int, Handler] = {}

    @property
    def requested(self) -> bool:
        """A signal arrived in this process."""
        return self.signum is not None

    def should_stop(self) -> bool:
        """True on every rank if any rank received a signal. A collective when ``agree`` is one: call it
        at the same point (once per step) on every rank."""
        return self.agree(self.requested) if self.agree is not None else self.requested

    def previous_handler(self, signum: Optional[int] = None) -> Handler:
        return self._previous.get(self.signum if signum is None else signum)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"[sslkit] received {signal.Signals(signum).name}: stopping after this step with a checkpoint",
                  file=sys.stderr, flush=True)

    def install(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread; stay a no-op guard
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)

    def __enter__(self) -> "PreemptionGuard":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def preempted(self, step: int, checkpoint: str) -> Preempted:
        signum = self.signum if self.signum is not None else int(signal.SIGTERM)  # only another rank got one
        return Preempted(step, signum, checkpoint, self.previous_handler(signum))


def ranks_agree(device: torch.device | str) -> Optional[Callable[[bool], bool]]:
    """``flag -> any rank's flag`` (all-reduce MAX) when ``torch.distributed`` is initialized with more
    than one rank, else None (a single process decides alone)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    dev = torch.device(device)

    def agree(flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    return agree


def ignore_in_worker(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: workers ignore the preemption signals (the main process handles
    them and shuts the workers down)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
