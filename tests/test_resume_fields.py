"""A run stopped inside an epoch and resumed logs what an uninterrupted run logs, for every method; a resume that
cannot continue refuses with one line before anything is written.

Every run is the real entrypoint in a subprocess: ``python main.py`` for the uninterrupted runs, the refusals and the
resumes; the stopped runs go through ``main.main`` in a subprocess whose training loader sends SIGTERM to its own
process as a chosen batch is handed out (:class:`tests.runs.SignalLoader`), so that the stop lands inside the epoch
that matters (a Tri-Level swap epoch, an EfficientTrain phase other than the first) on any machine. Tiny runs: the
embedded digits at 16 px, a 3-block ViT of width 32, two or three epochs of 9 iterations.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.runs import ROOT, TOE_TWO_STAGES, load, main_argv, one_line, read_log, snapshot

TINY = ["--model_kwargs", "{patch_size: 4, embed_dim: 32, depth: 3, num_heads: 2}", "--input_size", "16",
        "--num_workers", "0", "--batch_size", "128", "--warmup_epochs", "1", "--print_freq", "50",
        "--tensorboard", "false", "--model_ema_eval", "false"]
METHODS = {   # the methods' flags, and the epoch and batch at which the stopped run gets SIGTERM
    # PSS and Tri-Level in one run (PSS samples at block 0, Tri-Level prunes in block 1): stopped inside epoch 1,
    # after the swap at its start
    "pss+trilevel": (["--methods", "[pss, trilevel]", "--pss.cooldown_epochs", "0", "--trilevel",
                      "{pruning_loc: [1], warmup_epochs: 0, decay_epochs: 2, swap_interval: 1, npresentations: 2, "
                      "remove_n: 100, eval_dense: false}"], 1, 4),
    # EfficientTrain with ToE: two phases, 12 px at twice the batch (one update per batch), then 16 px at the
    # config's batch (two per update), the resumed process starting in phase 2; ToE's second stage in epoch 1
    "efficienttrain+toe": (["--methods", "[efficienttrain, toe]", "--batch_size", "64", "--grad_accum_steps", "2",
                            "--efficienttrain", "{input_sizes: [12, 16], rand_magnitudes: [1, 9], rand_augment: null, "
                            "batch_scale: [2, 1]}", *TOE_TWO_STAGES], 1, 5),
}
TIMINGS = {"wall_seconds", "process_started", "train_images_per_s", "train_epoch_seconds", "train_data_seconds",
           "train_compute_seconds"}
STOPPER = textwrap.dedent("""
    import signal, sys
    sys.path.insert(0, {root!r})
    import main as entry
    from tests.runs import SignalLoader
    real = entry.build_loaders

    def build(*args, **kwargs):                 # SIGTERM to this process as batch {step} of epoch {epoch} is handed out
        train, val, n = real(*args, **kwargs)
        return SignalLoader(train, {epoch}, {step}, signal.SIGTERM), val, n
    entry.build_loaders = build
    sys.exit(entry.main(sys.argv[1:]))
""")


def main_py(digits, out, *extra, script=None):
    """``python main.py`` (or ``script``) on the tiny digits run; returns the finished process."""
    cmd = [sys.executable, script or os.path.join(ROOT, "main.py"), *main_argv(digits, out, *TINY, *extra)]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)


def stopper(tmp_path, epoch, step):
    path = tmp_path / f"stop_{epoch}_{step}.py"
    path.write_text(STOPPER.format(root=ROOT, epoch=epoch, step=step))
    return str(path)


def without_timings(log):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in log]


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    """Per method: an uninterrupted run and the same run stopped by SIGTERM inside epoch 1 (kept pristine)."""
    cache = {}

    def get(name):
        if name not in cache:
            flags, epoch, step = METHODS[name]
            base = tmp_path_factory.mktemp(name)
            straight, stopped = base / "straight", base / "stopped"
            res = main_py(digits, straight, "--epochs", "2", *flags)
            assert res.returncode == 0, res.stderr[-3000:]
            res = main_py(digits, stopped, "--epochs", "2", *flags, script=stopper(base, epoch, step))
            assert res.returncode == 3 and "stopped by SIGTERM at epoch 2/2" in res.stderr, res.stderr[-3000:]
            cache[name] = (str(straight), str(stopped), flags)
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(METHODS))
def test_a_resumed_epoch_logs_what_the_uninterrupted_run_logs(runs, name, digits, tmp_path):
    straight, stopped, flags = runs(name)
    ckpt = load(os.path.join(stopped, "checkpoint.pth"))
    assert ckpt["mid_epoch"] and ckpt["clock"]["epoch"] == 1 and ckpt["clock"]["step"] > 0
    out = tmp_path / "resumed"
    shutil.copytree(stopped, out)
    res = main_py(digits, out, "--epochs", "2", *flags, "--resume", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load(os.path.join(straight, "checkpoint.pth")), load(out / "checkpoint.pth")
    for name_, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name_]), name_
    ref, log = without_timings(read_log(straight)), without_timings(read_log(out))
    assert [r["epoch"] for r in log] == [0, 1]
    for key in ref[1]:          # every figure of the resumed epoch: the method's fields, the trainer's, evaluation
        assert log[1][key] == ref[1][key], (key, log[1][key], ref[1][key])
    assert log == ref
    if "trilevel" in name:
        assert ref[1]["trilevel_swapped"] == ref[1]["trilevel_restored"] == 100


# ---------------------------------------------------------------------------------------------- refusals
def with_fewer_images(digits, tmp_path):
    """A copy of the digits with one training image less."""
    tree = str(tmp_path / "fewer")
    shutil.copytree(digits, tree)
    first = sorted(os.listdir(os.path.join(tree, "train")))[0]
    folder = os.path.join(tree, "train", first)
    os.unlink(os.path.join(folder, sorted(os.listdir(folder))[0]))
    return tree


REFUSALS = [  # (which run, extra flags, exit code, what the one line says)
    ("stopped", ["--trilevel.sync", "per_rank"], 2,
     "trilevel.sync: the checkpoint was written with sync global, this run uses per_rank"),
    ("stopped", ["--trilevel.pool_fraction", "0.3"], 2,
     "trilevel.pool_fraction: the checkpoint's subset and pool were drawn with pool_fraction 0.2"),
    ("straight", ["FEWER", "--epochs", "3"], 2,
     "the checkpoint's example level covers 1442 examples but the training set has 1441"),
    ("stopped", ["FEWER"], 1, "needs the same training set size 1442 -> 1441"),
]


@pytest.mark.parametrize("which,extra,code,needle", REFUSALS, ids=[f"{c[0]} {' '.join(c[1])}" for c in REFUSALS])
def test_a_resume_that_cannot_continue_refuses_before_writing(runs, which, extra, code, needle, digits, tmp_path):
    """Another sync or pool_fraction inside a Tri-Level run, a training set of another size (at an epoch boundary:
    the example level's capacity; inside an epoch: the saved subset's indices): one line, exit 2 (1 for the data),
    and the run directory is left byte for byte as it was (config.yaml is not rewritten)."""
    straight, stopped, flags = runs("pss+trilevel")
    out = str(tmp_path / "run")
    shutil.copytree(straight if which == "straight" else stopped, out)
    before = snapshot(out)
    data = digits
    if "FEWER" in extra:
        data, extra = with_fewer_images(digits, tmp_path), [e for e in extra if e != "FEWER"]
    res = main_py(data, out, "--epochs", "2", *flags, "--resume", "auto", *extra)
    assert res.returncode == code, res.stderr[-3000:]
    assert needle in one_line(res.stderr)
    assert snapshot(out) == before
