"""What the end-to-end tests share: the tiny run on the demo config, and small readers of a run directory."""
import hashlib
import json
import os
import signal
import subprocess
import sys

import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
DEMO = os.path.join(CONFIGS, "demo.yaml")
# the tiny ViT of the end-to-end runs: 2 blocks of width 32 on 16 px images, a 4 x 4 patch grid
TINY_VIT = "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}"
TINY_MODEL = ["--model_kwargs", TINY_VIT, "--input_size", "16"]
# ToE in two one-epoch stages: a quarter of the patches as seeds, half of them kept, then all
TOE_TWO_STAGES = ["--toe.expansion_steps", "[0, 1]", "--toe.keep_rates", "[0.5, 1.0]", "--toe.init_keep_rate", "0.25"]
# four epochs of the tiny ViT with ToE's second stage from epoch 2 (the hand-made run directories)
TOE_FOUR_EPOCHS = [*TINY_MODEL, "--epochs", "4", "--toe.expansion_steps", "[0, 2]", "--toe.keep_rates", "[0.5, 1.0]"]
# two epochs of the tiny ViT with ToE on the digits at batch 128 (11 iterations per epoch)
TINY = [*TINY_MODEL, "--epochs", "2", *TOE_TWO_STAGES, "--num_workers", "0", "--batch_size", "128",
        "--warmup_epochs", "1", "--print_freq", "5"]


def main_argv(data, out, *flags):
    """main.py's command line for a run of the demo config on ``data`` into ``out``, ``flags`` on top."""
    return ["--config", DEMO, "--data_path", data, "--output_dir", str(out), *flags]


def runner(*flags):
    """``run(data, out, *extra)``: ``main.main`` on :func:`main_argv` with ``flags`` then ``extra``; its exit code."""
    def run(data, out, *extra):
        import main as entry
        return entry.main(main_argv(data, out, *flags, *extra))
    return run


def assert_same_weights(a, b):
    """The same model and EMA weights, tensor for tensor, in two checkpoints (dicts, or run directories holding
    ``checkpoint.pth``): what an exact resume must give."""
    a, b = (x if isinstance(x, dict) else load(os.path.join(x, "checkpoint.pth")) for x in (a, b))
    for key in ("model", "model_ema"):
        assert a[key].keys() == b[key].keys()
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"


def one_line(text):
    """The one non-blank line of ``text`` (a one-line error), failing when there are more."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


def snapshot(out):
    """Every file under ``out`` (hidden ones too) with its size, mtime and hash: equal snapshots, nothing written."""
    found = {}
    for base, _, files in os.walk(out):
        for name in files:
            p = os.path.join(base, name)
            with open(p, "rb") as f:
                found[os.path.relpath(p, out)] = (os.path.getsize(p), os.stat(p).st_mtime_ns,
                                                  hashlib.sha1(f.read()).hexdigest())
    return found


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


def torchrun(*argv, script=None, timeout=300):
    """``script`` (default: main.py) on two processes under torchrun (gloo on CPU, a free port), one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           script or os.path.join(ROOT, "main.py"), *map(str, argv)]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout)


def image_tree(root, classes, per_split, image):
    """An ImageFolder tree ``root/{train,val}/<class>/``: ``per_split`` images per class and split (a dict), image
    ``i`` written as ``image(rng, i)`` gives it: ``(uint8 array, file name)``; one seeded generator for all. Returns
    ``root``."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        for c in classes:
            folder = os.path.join(str(root), split, c)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels, name = image(rng, i)
                Image.fromarray(pixels).save(os.path.join(folder, name))
    return root

