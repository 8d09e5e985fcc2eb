"""What a run shows and records: a live progress line, one JSON line per epoch, with ``log_every`` one JSON line
every N iterations, TensorBoard scalars.

Only rank 0 writes. Nothing here replaces ``print`` globally: other ranks simply get a logger whose methods do
nothing, so a warning raised on rank 3 is still visible.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

ITERATIONS = "iterations.jsonl"     # the per-iteration log beside log.jsonl (log_every)
NOT_SCALARS = ("iteration", "epoch", "step")      # a per-iteration record's position (TensorBoard's step already)


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class RunLogger:
    """Console, ``log.jsonl``, ``iterations.jsonl`` and TensorBoard for one run directory.

    It starts on the console only; :meth:`open_files` attaches the run directory once the run holds its lock, so a
    mistake found before training writes nothing. Each epoch record is flushed and ``fsync``-ed before the epoch's
    checkpoint is written, and so are the iteration records before it (:meth:`sync`); on resume, :func:`trim_log`
    and :func:`trim_iterations` drop the records a checkpoint does not cover, and TensorBoard hides its scalars from
    the resumed iteration on (``purge_step``), so every file reads as one uninterrupted run.
    """

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.output_dir: Optional[str] = None
        self.jsonl = None
        self.iterations = None
        self.tb = None
        self._live_open = False

    def open_files(self, output_dir: str, tensorboard: bool = True, iterations: bool = False,
                   resume_step: int = 0) -> None:
        """Attach ``output_dir``; ``iterations``: also ``iterations.jsonl``; ``resume_step``: the global iteration a
        resumed run continues at (TensorBoard drops what an earlier session wrote from there on)."""
        if not self.enabled:
            return
        self.output_dir = output_dir
        self.jsonl = open(os.path.join(output_dir, "log.jsonl"), "a")
        if iterations:
            self.iterations = open(os.path.join(output_dir, ITERATIONS), "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=resume_step or None)

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
        self.sync()
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            os.fsync(self.jsonl.fileno())
        if self.tb:
            step = record["epoch"]
            for k, v in record.items():
                if k != "epoch" and _is_number(v):
                    self.tb.add_scalar(k.replace("_", "/", 1), v, step)
            self.tb.flush()

    def log_iteration(self, record: Dict[str, Any]) -> None:
        """One line of ``iterations.jsonl`` (flushed, not ``fsync``-ed: :meth:`sync` does that before a checkpoint)
        and a TensorBoard scalar ``iter/<field>`` per number, at the global iteration."""
        if not self.enabled:
            return
        if self.iterations:
            self.iterations.write(json.dumps(record) + "\n")
            self.iterations.flush()
        if self.tb:
            for k, v in record.items():
                if k not in NOT_SCALARS and _is_number(v):
                    self.tb.add_scalar(f"iter/{k}", v, record["iteration"])

    def sync(self) -> None:
        """Put the iteration records on disk, and TensorBoard's, before a checkpoint covers them."""
        if self.iterations:
            self.iterations.flush()
            os.fsync(self.iterations.fileno())
        if self.tb:
            self.tb.flush()

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.enabled and self.tb:
            self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        self._end_live()
        if self.jsonl:
            self.jsonl.close()
            self.jsonl = None
        if self.iterations:
            self.iterations.close()
            self.iterations = None
        if self.tb:
            self.tb.close()
            self.tb = None


def read_log(path: str) -> List[Dict[str, Any]]:
    """The epoch records of a ``log.jsonl`` (a line cut short by a kill is skipped)."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "epoch" in rec:
                records.append(rec)
    return records


def trim_log(path: str, next_epoch: int) -> int:
    """Keep one record per epoch before ``next_epoch`` (the first epoch a resumed run trains), in order; drop the
    records a kill left after the checkpoint, duplicates and cut-off lines. Returns how many lines were dropped."""
    from checkpoint import write_text

    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    kept: Dict[int, Dict[str, Any]] = {}
    for rec in read_log(path):
        if rec["epoch"] < next_epoch:
            kept[rec["epoch"]] = rec              # a later record of the same epoch is the one a checkpoint covers
    out = [json.dumps(kept[e]) for e in sorted(kept)]
    dropped = len([ln for ln in lines if ln.strip()]) - len(out)
    if dropped:
        write_text(path, "".join(line + "\n" for line in out))
    return dropped


def read_iterations(path: str) -> List[Dict[str, Any]]:
    """The records of an ``iterations.jsonl`` (a line cut short by a kill is skipped)."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("iteration"), int):
                records.append(rec)
    return records


def trim_iterations(path: str, next_iteration: int) -> int:
    """Keep one record per global iteration before ``next_iteration`` (the first one a resumed run trains), in
    order; drop what a kill left after the checkpoint, duplicates and cut-off lines. Returns the lines dropped."""
    from checkpoint import write_text

    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    kept: Dict[int, Dict[str, Any]] = {}
    for rec in read_iterations(path):
        if rec["iteration"] < next_iteration:
            kept[rec["iteration"]] = rec
    dropped = len(lines) - len(kept)
    if dropped:
        write_text(path, "".join(json.dumps(kept[i]) + "\n" for i in sorted(kept)))
    return dropped


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Throughput:
    """Images per second and ETA over an epoch. A resumed epoch passes what its first part did (iterations, images,
    seconds), so the epoch's figures cover all of it."""

    def __init__(self, total_iters: int, done_iters: int = 0, images: int = 0, seconds: float = 0.0):
        self.total = total_iters
        self.done_before = done_iters
        self.images = images
        self.seconds_before = seconds
        self.start = time.perf_counter()

    def step(self, images: int) -> None:
        self.images += images

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.start

    def rate(self) -> float:
        return self.images / max(self.elapsed(), 1e-9)

    def eta(self, done: int) -> float:
        """Seconds left after ``done`` of the epoch's iterations, at this session's pace."""
        ran = done - self.done_before
        return (time.perf_counter() - self.start) / max(ran, 1) * (self.total - done)
