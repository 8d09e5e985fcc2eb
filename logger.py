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

from files import first_line, write_text

ITERATIONS = "iterations.jsonl"     # the per-iteration log beside log.jsonl (log_every)
NOT_SCALARS = ("iteration", "epoch", "step")      # a per-iteration record's position (TensorBoard's step already)


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class LogWriteError(OSError):
    """``log.jsonl`` could not be written (disk full, directory gone); ``str(err)`` is the one line shown."""


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
        """The epoch's record, on disk (``fsync``) before the epoch's checkpoint; a failure to write it is a
        :class:`LogWriteError` (the caller saves the checkpoint first, then stops)."""
        if not self.enabled:
            return
        self.sync()
        if self.jsonl:
            try:
                self.jsonl.write(json.dumps(record) + "\n")
                self.jsonl.flush()
                os.fsync(self.jsonl.fileno())
            except OSError as e:
                raise LogWriteError(f"log.jsonl: cannot write the record of epoch {record['epoch'] + 1} in "
                                    f"{self.output_dir} ({e.strerror or e})") from None
        def scalars(tb) -> None:
            for k, v in record.items():
                if k != "epoch" and _is_number(v):
                    tb.add_scalar(k.replace("_", "/", 1), v, record["epoch"])
            tb.flush()
        self._tensorboard(scalars)

    def log_iteration(self, record: Dict[str, Any]) -> None:
        """One line of ``iterations.jsonl`` (flushed, not ``fsync``-ed: :meth:`sync` does that before a checkpoint)
        and a TensorBoard scalar ``iter/<field>`` per number, at the global iteration."""
        if not self.enabled:
            return
        if self.iterations:
            try:
                self.iterations.write(json.dumps(record) + "\n")
                self.iterations.flush()
            except OSError as e:
                self._stop_iterations(e)
        def scalars(tb) -> None:
            for k, v in record.items():
                if k not in NOT_SCALARS and _is_number(v):
                    tb.add_scalar(f"iter/{k}", v, record["iteration"])
        self._tensorboard(scalars)

    def sync(self) -> None:
        """Put the iteration records on disk, and TensorBoard's, before a checkpoint covers them."""
        if self.iterations:
            try:
                self.iterations.flush()
                os.fsync(self.iterations.fileno())
            except OSError as e:
                self._stop_iterations(e)
        self._tensorboard(lambda tb: tb.flush())

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.enabled:
            self._tensorboard(lambda tb: tb.add_scalar(name, value, step))

    # views of the run that may fail without costing it: one line, then the run goes on without them
    def _stop_iterations(self, err: OSError) -> None:
        self.info(f"warning: {ITERATIONS}: cannot write in {self.output_dir} ({err.strerror or err}); the "
                  f"per-iteration log stops here, training goes on (log.jsonl and the checkpoints are unaffected)")
        try:
            self.iterations.close()
        except OSError:
            pass
        self.iterations = None

    def _tensorboard(self, write) -> None:
        if self.tb is None:
            return
        try:
            write(self.tb)
        except Exception as e:  # noqa: BLE001 -- TensorBoard's writer raises what its file system raises
            self.info(f"warning: tensorboard: cannot write in {self.output_dir}/tensorboard ({first_line(e)}); "
                      f"TensorBoard stops here, training goes on (log.jsonl has every epoch)")
            try:
                self.tb.close()
            except Exception:  # noqa: BLE001
                pass
            self.tb = None

    def close(self) -> None:
        self._end_live()
        for name in ("jsonl", "iterations"):
            f = getattr(self, name)
            setattr(self, name, None)
            if f:
                try:
                    f.close()
                except OSError:
                    pass           # what could not be written was reported when it was written
        self._tensorboard(lambda tb: tb.close())
        self.tb = None


def _json_lines(path: str):
    """``(line, record)`` for every line of a JSON-lines file; ``record`` is ``None`` where the line cannot be read
    (cut short by a kill, garbage bytes, not JSON)."""
    with open(path, "rb") as f:
        for raw in f:
            line = raw.rstrip(b"\n")
            if not line.strip():
                continue
            try:
                yield line, json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                yield line, None


def _positioned(rec: Any, key: str) -> bool:
    return isinstance(rec, dict) and type(rec.get(key)) is int and rec[key] >= 0


def read_records(path: str, key: str) -> List[Dict[str, Any]]:
    """The records of a JSON-lines log that carry an integer position ``key`` (``epoch``, ``iteration``); lines that
    cannot be read (cut short by a kill, damaged bytes, no integer position) are skipped."""
    if not os.path.isfile(path):
        return []
    return [rec for _, rec in _json_lines(path) if _positioned(rec, key)]


def trim_records(path: str, key: str, before: int) -> int:
    """Keep one record per position ``key`` below ``before`` (where a resumed run continues), in order; drop the
    records a kill left after the checkpoint, duplicates and lines that cannot be read. Returns the lines dropped."""

    if not os.path.isfile(path):
        return 0
    kept: Dict[int, Dict[str, Any]] = {}
    lines = 0
    for _, rec in _json_lines(path):
        lines += 1
        if _positioned(rec, key) and rec[key] < before:
            kept[rec[key]] = rec                  # a later record of the same position is the one a checkpoint covers
    dropped = lines - len(kept)
    if dropped:
        write_text(path, "".join(json.dumps(kept[k]) + "\n" for k in sorted(kept)))
    return dropped


def read_log(path: str) -> List[Dict[str, Any]]:
    """The epoch records of a ``log.jsonl``."""
    return read_records(path, "epoch")


def trim_log(path: str, next_epoch: int) -> int:
    """``log.jsonl`` as the checkpoint that continues at ``next_epoch`` covers it (see :func:`trim_records`)."""
    return trim_records(path, "epoch", next_epoch)


def restore_record(path: str, record: Optional[Dict[str, Any]]) -> bool:
    """Append a checkpoint's copy of its epoch's record when the log lacks it (a write failed, the file was lost)."""

    records = read_log(path)
    if not _positioned(record, "epoch") or any(r["epoch"] == record["epoch"] for r in records):
        return False
    kept = [r for r in records if r["epoch"] < record["epoch"]]
    write_text(path, "".join(json.dumps(r) + "\n" for r in [*kept, record]))
    return True


def run_totals(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Times of a whole run from its epoch records, over every process that trained it (a resumed run's log holds
    all its epochs). ``wall_seconds`` counts from its process's start (``process_started``, a Unix time; records
    without it: a new process wherever ``wall_seconds`` goes down), so the run's wall-clock is the sum of each
    process's last value."""
    train = sum(r.get("train_epoch_seconds", 0.0) for r in records)
    images = sum(r.get("train_images_per_s", 0.0) * r.get("train_epoch_seconds", 0.0) for r in records)
    last: Dict[Any, float] = {}
    process, prev = 0, None
    for r in records:
        w = r.get("wall_seconds", 0.0)
        if "process_started" in r:
            process = ("started", r["process_started"])
        elif prev is not None and w < prev:
            process = process + 1 if isinstance(process, int) else 0
        prev = w
        last[process] = w
    return {"train_seconds": train, "train_compute_seconds": sum(r.get("train_compute_seconds", 0.0) for r in records),
            "wall_seconds": sum(last.values()), "images_per_s": images / max(train, 1e-9), "processes": len(last)}


def read_iterations(path: str) -> List[Dict[str, Any]]:
    """The records of an ``iterations.jsonl``."""
    return read_records(path, "iteration")


def trim_iterations(path: str, next_iteration: int) -> int:
    """``iterations.jsonl`` as the checkpoint that continues at ``next_iteration`` covers it."""
    return trim_records(path, "iteration", next_iteration)


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
