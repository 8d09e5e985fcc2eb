"""What a run shows and records: a live progress line, one JSON line per epoch, TensorBoard scalars.

Only rank 0 writes. Nothing here replaces ``print`` globally: other ranks simply get a logger whose methods do
nothing, so a warning raised on rank 3 is still visible.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class RunLogger:
    """Console, ``log.jsonl`` and TensorBoard for one run directory."""

    def __init__(self, output_dir: Optional[str], enabled: bool = True, tensorboard: bool = True,
                 stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.output_dir = output_dir
        self.jsonl = None
        self.tb = None
        if enabled and output_dir:
            os.makedirs(output_dir, exist_ok=True)
            self.jsonl = open(os.path.join(output_dir, "log.jsonl"), "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        self._live_open = False

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        self._end_live()
        print(msg, file=self.stream, flush=True)

    def progress(self, msg: str, final: bool = False) -> None:
        """A progress line: rewritten in place on a terminal, a plain line otherwise."""
        if not self.enabled:
            return
        if self.live:
            print("\r" + msg + "\x1b[K", end="" if not final else "\n", file=self.stream, flush=True)
            self._live_open = not final
        else:
            print(msg, file=self.stream, flush=True)

    def _end_live(self) -> None:
        if self._live_open:
            print(file=self.stream, flush=True)
            self._live_open = False

    def log_epoch(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb:
            step = record["epoch"]
            for k, v in record.items():
                if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(k.replace("_", "/", 1), v, step)
            self.tb.flush()

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.enabled and self.tb:
            self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


class Meter:
    """Running average of a scalar, weighted by batch size."""

    def __init__(self):
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.total / max(self.count, 1)


class Throughput:
    """Images per second and ETA over an epoch, measured from the first iteration's end."""

    def __init__(self, total_iters: int):
        self.total = total_iters
        self.start = time.perf_counter()
        self.images = 0

    def step(self, images: int) -> None:
        self.images += images

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self) -> float:
        return self.images / max(self.elapsed(), 1e-9)

    def eta(self, done: int) -> float:
        return self.elapsed() / max(done, 1) * (self.total - done)
