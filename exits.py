"""How a run ends: its exit codes, the errors reported in one line (config mistakes, run-time failures), the
signals that stop it, and the rank-0 step whose error stops every process.
"""
from __future__ import annotations

import re
import signal
import threading
from typing import Any, Dict, Optional

import torch

from checkpoint import CheckpointError, RunDirError
from config import ConfigError
from datasets import DatasetError
from devices import AmpError, DeviceError
from distributed import DistInfo, any_rank
from engine import NonFiniteLossError
from extensions import ExtensionError
from files import first_line
from methods import MethodError
from models.resize import ResizeError

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_STOPPED = 0, 1, 2, 3
CONFIG_ERRORS = (ConfigError, MethodError, ExtensionError, DeviceError, AmpError, ResizeError)
RUN_ERRORS = (DatasetError, CheckpointError, RunDirError, NonFiniteLossError)   # an extension's data errors among them


class Stopped(Exception):
    """Training stopped on a signal after saving the current iteration (exit 3)."""


class Abort(BaseException):
    """A signal before training began, or a second one while stopping: leave at once (exit 128 + signal)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class PeerStopped(Exception):
    """Another rank found a mistake and reports it; this rank leaves quietly (exit 1)."""


class StopSignals:
    """SIGTERM / SIGINT handlers for the life of :func:`main`.

    Once training runs (``armed``), the first signal only records a request: the trainer saves a checkpoint of the
    current iteration and exits 3. Before that, and on a second signal, :class:`Abort` is raised at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self.armed = False
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:       # e.g. SIGINT of a `cmd &` in a script
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.armed and self.signum is None:
            self.signum = signum
            return
        raise Abort(signum)

    def requested(self, device: torch.device) -> bool:
        """Whether any rank got a signal (a collective: every rank asks at the same iteration)."""
        return any_rank(self.signum is not None, device)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal on another process"


def on_main(dist: DistInfo, fn) -> None:
    """Run ``fn`` on rank 0 only; a one-line error there stops every rank (the others quietly)."""
    err = None
    if dist.is_main:
        try:
            fn()
        except (*CONFIG_ERRORS, *RUN_ERRORS) as e:
            err = e
    if any_rank(err is not None, dist.device):
        raise err if err is not None else PeerStopped()


def one_line(err: BaseException) -> str:
    """The message of an error, also one re-raised from a DataLoader worker (whose message carries the worker's
    traceback): its last line, without the exception's class path."""
    text = str(err)
    if "Original Traceback" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        m = re.match(r"^[\w.]+: (.*)$", lines[-1])
        return m.group(1) if m else lines[-1]
    return first_line(err)


def peer_failure(err: BaseException) -> bool:
    return isinstance(err, torch.distributed.DistError) or any(
        s in str(err) for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL"))
