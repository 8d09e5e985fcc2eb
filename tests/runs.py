"""Small readers of a run directory, shared by the end-to-end tests."""
import json
import os
import signal
import subprocess
import sys

import torch


def read_log(out):
    """The epoch records of ``out/log.jsonl``."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load(path):
    """A checkpoint, loaded as the trainer does (weights only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class SignalLoader:
    """The training loader, sending ``sig`` to this process as batch ``step`` of ``epoch`` is handed out."""

    def __init__(self, loader, epoch, step, sig):
        self.loader, self.epoch, self.step, self.sig = loader, epoch, step, sig

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        return self._batches(iter(self.loader))

    def _batches(self, it):
        for i, batch in enumerate(it):
            if self.loader.sampler.epoch == self.epoch and i == self.step:
                os.kill(os.getpid(), self.sig)
            yield batch


def signal_at(monkeypatch, epoch, step, sig=signal.SIGTERM):
    """Make every training loader main.py builds (also one rebuilt for a new recipe) a :class:`SignalLoader`."""
    import main as entry
    real = entry.build_loaders

    def build(*a, **k):
        train, val, n = real(*a, **k)
        return SignalLoader(train, epoch, step, sig), val, n
    monkeypatch.setattr(entry, "build_loaders", build)


def interrupt_epoch(monkeypatch, n):
    """A KeyboardInterrupt (a kill: nothing saved) as main.py starts training the ``n``-th epoch of a run."""
    import main as entry
    real, calls = entry.train_one_epoch, {"n": 0}

    def train_one_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(entry, "train_one_epoch", train_one_epoch)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*argv, script=None, timeout=300):
    """``script`` (default: main.py) on two processes under torchrun (gloo on CPU, a free port), one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           script or os.path.join(ROOT, "main.py"), *map(str, argv)]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout)
