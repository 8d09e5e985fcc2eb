"""Writing a file so that a kill or a full disk never leaves half of it, and the one-line form of an error: the
small generic helpers the config, the checkpoints, the log and the run directory all need, here so that none of
them depends on another for them."""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any, Callable


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when the message is empty)."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


def fsync_dir(directory: str) -> None:
    """Make a rename inside ``directory`` durable (a no-op where the file system cannot sync directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    """A temporary name beside ``path`` that no other process or thread can pick."""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


class _Recording:
    """A file wrapper that keeps the ``OSError`` of a failed write (torch.save reports it as an opaque RuntimeError)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def atomic_write(path: str, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write ``path`` through ``write(file)``: into a unique temporary file in the same directory, ``fsync``, rename
    over ``path``, ``fsync`` the directory. On any failure (full disk, a signal, an exception in ``write``) the
    temporary file is removed, ``path`` is left as it was and the error is raised (an ``OSError`` for I/O)."""
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            rec = _Recording(f)
            try:
                write(rec)
            except Exception:
                if rec.error is not None:
                    raise rec.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    publish(tmp, path)


def publish(tmp: str, path: str) -> None:
    """Rename the finished ``tmp`` over ``path`` and ``fsync`` the directory; on failure ``tmp`` is removed."""
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)
