"""Checkpoints and the run directory: written atomically, loadable with ``torch.load(weights_only=True)``, never lost.

A checkpoint is ``{model, model_ema, optimizer, lr_scheduler, scaler, epoch, global_step, clock, mid_epoch, methods,
best, config, version}``. ``model`` and ``model_ema`` are plain timm state dicts, so ``timm.create_model(name)
.load_state_dict(ckpt["model"])`` works without this repository; ``config`` is the resolved config as a dict, never a
pickled object. ``epoch`` is the last finished epoch (DeiT's and timm's convention); ``clock`` is where training
continues (``epoch``, ``step`` inside it, ``global_step``). A checkpoint written on SIGTERM/SIGINT stops inside an
epoch and adds ``mid_epoch``: the sampler position, and per rank the epoch's subset, RNG states and running
figures, so that a resumed run trains exactly the batches an uninterrupted one would.

Every file goes through :func:`files.atomic_write` (a unique temporary name in the same directory, ``fsync`` of the file,
rename, ``fsync`` of the directory): a kill or a full disk leaves the previous file as it was. ``best.pth`` is a hard
link to the ``checkpoint.pth`` of its epoch, made after it, so it can never be newer than ``checkpoint.pth``'s record
of the best epoch; :func:`reconcile_best` repairs the one window a kill can leave (between the two renames).

The run directory is guarded by :class:`RunLock` (one run at a time; the refusal names the holder's pid and host) and
:func:`check_output_dir` (a fresh run never overwrites an existing one without ``--overwrite``).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from files import atomic_write, first_line, publish, temp_name, write_text  # noqa: F401  (ckpt_io.write_text)

VERSION = 2
HEAD_PREFIXES = ("head.", "head_dist.", "aux_head.")
RUN_FILES = ("config.yaml", "log.jsonl", "iterations.jsonl", "checkpoint.pth", "best.pth", "summary.json")
RUN_DIRS = ("tensorboard",)
LOCK_NAME = ".lock"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, written or used; ``str(err)`` is the one line shown to the user."""


class RunDirError(RuntimeError):
    """The output directory cannot take this run; ``str(err)`` is the one line shown to the user."""


# ------------------------------------------------------------------------------------------------ writing
def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write a checkpoint atomically; a failure raises one :class:`CheckpointError` line and leaves the old file."""
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or first_line(e)}; the previous "
                              f"{os.path.basename(path)} is intact and the temporary file was removed "
                              f"(free space under {os.path.dirname(os.path.abspath(path))} and resume with "
                              f"--resume auto)") from None


def link_best(checkpoint: str, best: str) -> None:
    """Make ``best`` the same file as ``checkpoint`` (a hard link renamed into place; a copy where links fail)."""
    tmp = temp_name(best)
    try:
        os.link(checkpoint, tmp)
    except OSError:
        try:
            with open(checkpoint, "rb") as src:
                atomic_write(best, lambda f: shutil.copyfileobj(src, f))
        except OSError as e:
            raise CheckpointError(f"cannot write {best}: {e.strerror or first_line(e)}; the previous best.pth is "
                                  f"intact") from None
        return
    publish(tmp, best)


def reconcile_best(checkpoint: str, best: str, state: Dict[str, Any]) -> bool:
    """After a kill between writing ``checkpoint`` and linking ``best``: when the checkpoint records itself as the
    best epoch but ``best`` is another file, link it. Returns whether ``best`` was repaired."""
    record = state.get("best") or {}
    if state.get("mid_epoch") or record.get("epoch") != state.get("epoch") or record.get("epoch", -1) < 0:
        return False
    if os.path.isfile(best) and os.path.samefile(checkpoint, best):
        return False
    link_best(checkpoint, best)
    return True


# ------------------------------------------------------------------------------------------------ reading
# classes of other code bases whose pickled objects a checkpoint may carry beside its tensors (the published SimMIM's
# yacs CfgNode config, an attribute dict): read as plain data, never by running their code
_MAX_OPAQUE_CLASSES = 16
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+) was not an allowed global")


def _load_weights_only(path: str) -> Tuple[Any, List[str]]:
    """``torch.load(weights_only=True)`` that reads a class it does not know as plain data instead of refusing.

    The published codes' checkpoints pickle their ``argparse.Namespace`` (DeiT, ToE, PSS, timm's saver): exactly that
    class is let through, for this load only. Any other unknown class (found in the refusal) is read as an
    ``OrderedDict`` of its items and attributes (``copyreg``'s protocol-2 form: a new empty object, its items, its
    ``__dict__``); nothing of that class runs. A file whose unknown global is a function, or whose object does not
    fit that form (it is rebuilt from constructor arguments), is still refused, with the first refusal. Returns the
    checkpoint and the classes read as plain data."""
    allowed: list = [argparse.Namespace]
    opaque: List[str] = []
    refusal: Optional[Exception] = None          # the first refusal: what is raised if standing in does not work
    while True:
        try:
            with torch.serialization.safe_globals(allowed):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
            break
        except Exception as e:  # noqa: BLE001
            m = _UNSUPPORTED.search(str(e))
            name = m.group(1) if m else None
            if name is None or name in opaque or len(opaque) >= _MAX_OPAQUE_CLASSES or _is_callable_global(name):
                raise (refusal or e) from None
            refusal = refusal or e
            opaque.append(name)
            allowed.append((OrderedDict, name))
    if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])          # plain data from here on
    return ckpt, opaque


def _is_callable_global(name: str) -> bool:
    """A global that names a function rather than a class (by convention, a lower-case last part): never stood in
    for."""
    return not name.rpartition(".")[2][:1].isupper()


def load_checkpoint(path: str, what: str = "checkpoint") -> Dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; every failure is one :class:`CheckpointError` line that names
    ``what`` (the config key that pointed here) and the file."""
    if not os.path.exists(path):
        raise CheckpointError(f"{what}: checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: {path} is not a file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{what}: {path} is empty (0 bytes): it was never completely written; point {what} at "
                              f"another checkpoint (e.g. best.pth) or start a new run")
    try:
        ckpt, opaque = _load_weights_only(path)
    except Exception as e:  # noqa: BLE001 -- a truncated, foreign or unsafe file
        refused = ("unsupported global", "trying to load", "trying to call", "can only")
        unsafe = [line.strip() for line in str(e).splitlines() if any(w in line.lower() for w in refused)]
        if unsafe:
            reason = unsafe[0].split(". ")[0].replace("WeightsUnpickler error: ", "")
            raise CheckpointError(f"{what}: {path} was refused because loading it would run pickled code ({reason}); "
                                  f"re-save it with plain data (e.g. vars(args) instead of args) or only its "
                                  f"state_dict") from None
        raise CheckpointError(f"{what}: cannot read {path} ({size} bytes): {type(e).__name__}: {first_line(e)[:160]}; "
                              f"the file is truncated or not a checkpoint: point {what} at another one") from None
    if opaque:
        print(f"{what}: {path}: read {', '.join(opaque)} as plain data (their code is not run)", flush=True)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{what}: {path} is not a checkpoint dictionary")
    return ckpt


def model_state(ckpt: Dict[str, Any], key: str = "model") -> Dict[str, torch.Tensor]:
    """The weights inside a checkpoint: ours (``model``), DeiT's (``model``), timm's (``state_dict``) or a bare dict,
    with DDP / torch.compile prefixes removed (timm's ``clean_state_dict``)."""
    from timm.models import clean_state_dict

    for k in (key, "state_dict", "model"):
        if isinstance(ckpt.get(k), dict):
            return clean_state_dict(ckpt[k])
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return clean_state_dict(ckpt)
    raise CheckpointError(f"no '{key}' weights in checkpoint (keys: {', '.join(list(ckpt)[:8])})")


def ema_state(ckpt: Dict[str, Any]) -> Optional[Dict[str, torch.Tensor]]:
    """The EMA weights (ours: ``model_ema``; timm: ``state_dict_ema``), or ``None``."""
    from timm.models import clean_state_dict

    for k in ("model_ema", "state_dict_ema"):
        if isinstance(ckpt.get(k), dict):
            return clean_state_dict(ckpt[k])
    return None


@dataclass
class ResumeState:
    """What a checkpoint says about where training stands (ours, or timm's ``train.py`` format)."""
    path: str
    ckpt: Dict[str, Any]
    epoch: int                       # last finished epoch
    next_epoch: int                  # the epoch training continues in
    step: int                        # iterations of next_epoch already trained (mid-epoch checkpoints)
    global_step: Optional[int]
    mid_epoch: Optional[Dict[str, Any]]
    timm_format: bool
    stamp: Optional[Tuple[int, int, int]] = None   # the file as it was read (see check_unchanged)


def file_stamp(path: str) -> Optional[Tuple[int, int, int]]:
    """What changes when a file is replaced or rewritten: inode, size, modification time (``None``: no file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def check_unchanged(output_dir: str, rs: Optional["ResumeState"]) -> None:
    """Under the run-directory lock: the checkpoint this run was built from is still the one on disk, and a run
    that found none still finds none (another run may have written in ``output_dir`` while this one started)."""
    own = os.path.join(output_dir, "checkpoint.pth")
    if rs is None and os.path.exists(own):
        raise RunDirError(f"output_dir: {own} was written by another run while this one was starting; nothing was "
                          f"changed: start again (with --resume auto to continue that run)")
    if rs is not None and file_stamp(rs.path) != rs.stamp:
        raise RunDirError(f"resume: {rs.path} was replaced by another run while this one was starting; nothing was "
                          f"changed: start again to continue from the new checkpoint")


def resume_state(ckpt: Dict[str, Any], path: str, stamp: Optional[Tuple[int, int, int]] = None) -> ResumeState:
    """Where a checkpoint continues; a weights-only file is a one-line error that points at ``--finetune``."""
    if "epoch" not in ckpt or "optimizer" not in ckpt:
        raise CheckpointError(f"resume: {path} holds weights only (no optimizer state or epoch), so there is no run to "
                              f"continue; start from these weights with --finetune {path}")
    epoch = int(ckpt["epoch"])
    clock = ckpt.get("clock") or {}
    mid = ckpt.get("mid_epoch")
    next_epoch = int(clock.get("epoch", epoch + 1))
    step = int(clock.get("step", 0)) if mid else 0
    gs = ckpt.get("global_step")
    return ResumeState(path, ckpt, epoch, next_epoch, step, None if gs is None else int(gs), mid,
                       timm_format="lr_scheduler" not in ckpt, stamp=stamp or file_stamp(path))


def in_model_layout(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> Dict[str, torch.Tensor]:
    """``state`` in ``model``'s keys: a model variant that reads the checkpoints of a published code base (another
    key layout) says how through its ``adapt_state_dict`` method (timm's ``checkpoint_filter_fn``, on the model);
    other models take ``state`` as it is."""
    adapt = getattr(model, "adapt_state_dict", None)
    if adapt is None:
        return state
    try:
        return adapt(state)
    except ValueError as e:
        raise CheckpointError(f"{source}: {first_line(e)}") from None


def load_weights_strict(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load all weights or fail with a message that says which model the checkpoint does not fit."""
    state = in_model_layout(model, state, source)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(f"{source} is from another model: {'; '.join(parts)}")
    model.load_state_dict(state)


def adapt_for_finetune(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> Dict[str, Any]:
    """Prepare pretrained weights for fine-tuning, as DeiT does.

    Classifier heads whose shape differs (another class count) are dropped and stay freshly initialised;
    the absolute position embedding is resampled (bicubic) when the patch grid differs (another resolution).
    Anything else that does not fit is an error. Returns what was adapted, for the log.
    """
    from timm.layers import resample_abs_pos_embed

    own = model.state_dict()
    state = dict(in_model_layout(model, state, source))
    report = {"dropped": [], "resampled": []}
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=prefix)
        report["resampled"].append(f"pos_embed {tuple(pos.shape)} -> {tuple(state['pos_embed'].shape)}")
    for k in list(state):
        if k.startswith(HEAD_PREFIXES) and k in own and state[k].shape != own[k].shape:
            del state[k]
            report["dropped"].append(k)
    missing = [k for k in own if k not in state and not k.startswith(HEAD_PREFIXES)]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        bad = (missing or unexpected or shape)[0]
        raise CheckpointError(f"{source} does not fit model for fine-tuning: {len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(shape)} mis-shaped weights (e.g. {bad})")
    model.load_state_dict(state, strict=False)
    return report


def resume_path(resume: str, output_dir: str) -> Optional[str]:
    """``auto`` resumes ``output_dir/checkpoint.pth`` when it exists (a restarted job), else starts fresh."""
    if resume == "auto":
        p = os.path.join(output_dir, "checkpoint.pth")
        return p if os.path.isfile(p) else None
    return resume or None


# ------------------------------------------------------------------------------------------------ the run directory
def check_output_dir(path: str) -> None:
    """Read-only: ``path`` is, or can be created as, a directory (not a file, not under a file)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"output_dir: {path} is a file, not a directory; pick another --output_dir")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunDirError(f"output_dir: cannot create {path}: {parent} is a file; pick another --output_dir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"output_dir: {parent} is not writable; pick another --output_dir")


def run_files(path: str) -> List[str]:
    """The outputs of a previous run found in ``path``."""
    if not os.path.isdir(path):
        return []
    return [n for n in RUN_FILES + RUN_DIRS if os.path.exists(os.path.join(path, n))]


def refuse_existing_run(path: str, resuming: bool, overwrite: bool) -> None:
    """A fresh run (no resume) into a directory that holds a run stops, unless ``--overwrite`` was given."""
    found = run_files(path)
    if found and not resuming and not overwrite:
        raise RunDirError(f"output_dir: {path} already holds a run ({', '.join(found)}); continue it with "
                          f"--resume auto, pick a new --output_dir, or pass --overwrite to replace it")


def clear_run(path: str) -> None:
    """Remove a previous run's outputs (``--overwrite``); other files in the directory are left alone."""
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))
    for name in RUN_DIRS:
        shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def lock_holder(path: str) -> Optional[str]:
    """Read-only: who holds the run directory's lock (``"pid 12 on host h since ..."``), or ``None``."""
    lock = os.path.join(path, LOCK_NAME)
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _describe_holder(fd)
    finally:
        os.close(fd)
    return None


def _describe_holder(fd: int) -> str:
    try:
        info = dict(kv.split("=", 1) for kv in os.pread(fd, 4096, 0).decode().split())
        return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('since', '?')}"
    except (OSError, ValueError, UnicodeDecodeError):
        return "another process"


class RunLock:
    """An exclusive ``flock`` on ``output_dir/.lock`` for the life of a run, holding ``pid=... host=... since=...``.

    The kernel drops it when the process dies (even on ``kill -9``), so a stale lock never blocks a restart; a second
    run on the same directory stops with one line naming the holder.
    """

    def __init__(self, path: str):
        self.path = path
        self.lock = os.path.join(path, LOCK_NAME)
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            os.makedirs(self.path, exist_ok=True)
            while True:
                fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        os.close(fd)
                        raise
                    holder = _describe_holder(fd)
                    os.close(fd)
                    raise RunDirError(f"output_dir: {self.path} is in use by another run ({holder}); wait for it to "
                                      f"end, stop it, or pick another --output_dir") from None
                try:                                # the holder before us may have removed the file: lock the new one
                    same = os.path.samestat(os.fstat(fd), os.stat(self.lock))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            since = time.strftime("%Y-%m-%dT%H:%M:%S")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} since={since}\n".encode(), 0)
        except OSError as e:
            raise RunDirError(f"output_dir: cannot write to {self.path} ({e.strerror or first_line(e)}); pick another "
                              f"--output_dir") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.lock)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
