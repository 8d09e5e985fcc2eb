"""Faults: signals, kills, locks, full disks, bad inputs. Every case checks that nothing was lost.

Bad inputs run in-process through ``main.main(argv)`` against a real stopped run whose files must stay byte for byte
the same; subprocesses are used only for signals from outside, the run lock, the file-size limit and two-process
torchrun (gloo). All runs are tiny: 120 training images of 8x8 px at 16 px, two 2-block epochs of 7 iterations.
"""
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint as ckpt_io
import main as entry
from tests.runs import (ROOT, TINY_MODEL, TOE_TWO_STAGES, assert_same_weights, load, main_argv, one_line, read_log,
                       runner, signal_at, snapshot)

TINY = [*TINY_MODEL, "--epochs", "2", *TOE_TWO_STAGES, "--num_workers", "0", "--batch_size", "16",
        "--warmup_epochs", "1", "--print_freq", "100", "--tensorboard", "false", "--model_ema_decay", "0.9"]
ITERS = 7                                       # 120 images // 16


def make_tree(root, n_train=12, n_val=4):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(10):
            d = os.path.join(root, split, f"c{c}")
            os.makedirs(d)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(os.path.join(d, f"{i}.png"))
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(str(tmp_path_factory.mktemp("data") / "tree"))


def args(tree, out, *extra):
    return main_argv(tree, out, "--data_set", "folder", *TINY, *extra)


run = runner("--data_set", "folder", *TINY)


def assert_consistent(out, epochs):
    """Nothing lost: checkpoint.pth loads, best.pth is the best epoch it records, one log record per epoch."""
    ckpt = load(os.path.join(out, "checkpoint.pth"))
    best = load(os.path.join(out, "best.pth"))
    assert best["epoch"] == ckpt["best"]["epoch"] and best["best"] == ckpt["best"]
    assert [r["epoch"] for r in read_log(out)] == list(range(epochs))
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run(tree, out) == 0
    return str(out)


@pytest.fixture(scope="module")
def stopped(tree, tmp_path_factory):
    """The same run, stopped by SIGTERM at the 3rd iteration of epoch 2 (kept pristine: tests copy it)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    mp = pytest.MonkeyPatch()
    signal_at(mp, epoch=1, step=2)
    try:
        code = run(tree, out)
    finally:
        mp.undo()
    assert code == entry.EXIT_STOPPED
    return str(out)


def copy(src, tmp_path, name="run"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------ signals
def test_sigterm_saves_the_current_iteration_and_resume_matches_an_uninterrupted_run(tree, stopped, reference,
                                                                                     tmp_path, capsys):
    ckpt = load(os.path.join(stopped, "checkpoint.pth"))
    assert ckpt["clock"] == {"epoch": 1, "step": 3, "global_step": ITERS + 3, "iters_per_epoch": ITERS, "world_size": 1}
    assert ckpt["epoch"] == 0 and ckpt["mid_epoch"]["position"] == 3 * 16 and len(ckpt["mid_epoch"]["ranks"]) == 1
    assert set(ckpt["mid_epoch"]["ranks"][0]["rng"]) >= {"torch", "numpy", "random"} and "methods" in ckpt
    assert [r["epoch"] for r in read_log(stopped)] == [0]
    out = copy(stopped, tmp_path)
    assert run(tree, out, "--resume", "auto") == 0
    assert "continuing at epoch 2, iteration 4" in capsys.readouterr().out
    assert_same_weights(reference, out)
    assert_consistent(out, 2)
    ref_log, log = read_log(reference), read_log(out)
    assert log[1]["train_loss"] == ref_log[1]["train_loss"] and log[1]["global_step"] == 2 * ITERS


def _default_signals():
    """A shell that starts the suite in the background hands its children SIGINT ignored; Ctrl-C must reach this one."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_sigint_from_outside_and_a_second_run_on_the_locked_directory(tree, reference, tmp_path, capsys):
    """Ctrl-C reaches the process group (the loader worker too); meanwhile a second run finds the lock."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")           # the threads of this process: the same float sums
    for attempt in range(3):     # on a busy machine the tiny run can finish before it is frozen: try again then
        out = str(tmp_path / f"run{attempt}")
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"),
                                 *args(tree, out, "--num_workers", "1", "--print_freq", "1")],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=_default_signals)
        try:
            for line in proc.stdout:
                if "Epoch [1/2] [2/" in line:
                    break
            os.killpg(proc.pid, signal.SIGSTOP)                 # frozen in epoch 1, whatever the machine's speed
            finished_first = proc.poll() is not None
            if not finished_first:
                code = run(tree, out, "--resume", "auto")
                err = one_line(capsys.readouterr().err)
                assert code == entry.EXIT_ERROR
                assert f"in use by another run (pid {proc.pid} on host {socket.gethostname()}" in err
            os.killpg(proc.pid, signal.SIGINT)                  # Ctrl-C: the whole process group
            os.killpg(proc.pid, signal.SIGCONT)
            _, stderr = proc.communicate(timeout=120)
        except ProcessLookupError:                              # it had already exited
            _, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        if proc.returncode != 0:
            break
    assert proc.returncode == entry.EXIT_STOPPED, stderr
    assert "Traceback" not in stderr and "stopped by SIGINT" in one_line(stderr)
    assert not os.path.exists(os.path.join(out, ".lock"))
    assert run(tree, out, "--resume", "auto") == 0                # one loader worker before, none now: same run
    assert_same_weights(reference, out)
    assert_consistent(out, 2)


def test_a_signal_before_training_stops_at_once_and_writes_nothing(tree, tmp_path, monkeypatch, capsys):
    real = entry.build_loaders

    def interrupted(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(entry, "build_loaders", interrupted)
    assert run(tree, tmp_path / "run") == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM: stopped without saving" in one_line(capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, reference):
    d = tmp_path_factory.mktemp("bad")
    good = open(os.path.join(reference, "checkpoint.pth"), "rb").read()
    (d / "empty.pth").write_bytes(b"")
    (d / "truncated.pth").write_bytes(good[: len(good) // 2])
    import argparse
    import fractions       # argparse.Namespace itself is let through (published checkpoints); what it holds is not
    torch.save({"args": argparse.Namespace(lr=fractions.Fraction(1, 2)), "model": {}}, d / "unsafe.pth")
    torch.save({"state_dict": load(os.path.join(reference, "checkpoint.pth"))["model"]}, d / "weights.pth")
    (d / "broken.yaml").write_text("model: deit_tiny_patch16_224\nlr: [1e-3\nepochs: 3\n")
    (d / "a_file").write_text("not a directory")
    return d


BAD_INPUTS = [  # (arguments, exit code, what the one line must say)
    (["--lr", "nan"], 2, "lr: 'nan' is not a finite number"),
    (["--lr", "inf"], 2, "lr: 'inf' is not a finite number"),
    (["--toe.insert_block", "99"], 2, "toe.insert_block: 99 is outside 0..1"),
    (["--model", "deit_smal_patch16_224"], 2, "did you mean deit_small_patch16_224"),
    (["--model", "resnet50"], 2, "model: resnet50 is not a ViT"),
    (["--model_kwargs", "{patch_size:4,embed_dim:96}"], 2, "'patch_size:4' has no value; YAML needs a space"),
    (["--model_kwargs", "{patch_sise: 4}"], 2, "'patch_sise' is not an argument of vit_tiny_patch16_224"),
    (["--model_kwargs", "{embed_dim: 30, num_heads: 4}"], 2, "model_kwargs: vit_tiny_patch16_224 cannot be built"),
    (["--aa", "bogus"], 2, "aa: 'bogus' is not a timm auto-augment policy"),
    (["--opt_betas", "[0.9]"], 2, "opt_betas: [0.9] must be two values"),
    (["--momentum", "-1"], 2, "momentum: -1.0 must be in [0, 1)"),
    (["--smoothing", "1.5"], 2, "smoothing: 1.5 must be in [0, 1)"),
    (["--drop_path", "2"], 2, "drop_path: 2.0 must be in [0, 1)"),
    (["--toe.keep_rates", "[0.05, 1.0]", "--toe.init_keep_rate", "0.05"], 2, "stage 1 keeps 0 of 16 patch tokens"),
    (["--overwrite"], 2, "--overwrite replaces the run in output_dir, --resume continues it"),
    (["CONFIG=broken.yaml"], 2, "broken.yaml:3:7 (line 3, column 7): YAML syntax error: expected ',' or ']'"),
    (["RESUME=empty.pth"], 1, "empty.pth is empty (0 bytes)"),
    (["RESUME=truncated.pth"], 1, "the file is truncated or not a checkpoint"),
    (["RESUME=unsafe.pth"], 1, "Unsupported global: GLOBAL fractions.Fraction"),
    (["RESUME=weights.pth"], 1, "holds weights only"),
    (["RESUME=missing.pth"], 1, "resume: checkpoint not found"),
    (["OUT=a_file"], 1, "a_file is a file, not a directory"),
    (["OUT=a_file/run"], 1, "a_file is a file; pick another --output_dir"),
    (["FRESH"], 1, "already holds a run (config.yaml, log.jsonl, checkpoint.pth, best.pth); continue it with "
                   "--resume auto"),
    (["--device", "cuda"], 2, "device: 'cuda' was asked for but no GPU is visible"),
]


@pytest.mark.parametrize("extra,code,needle", BAD_INPUTS, ids=[" ".join(c[0]) for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_the_run_is_untouched(tree, stopped, bad_files, extra, code, needle, capsys):
    if "--device" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    before = snapshot(stopped)
    argv = args(tree, stopped, "--resume", "auto")
    for e in extra:
        key, _, value = e.partition("=")
        if key == "CONFIG":
            argv[1] = str(bad_files / value)
        elif key == "RESUME":
            argv[argv.index("--resume") + 1] = str(bad_files / value)
        elif key == "OUT":
            argv[argv.index("--output_dir") + 1] = str(bad_files / value)
        elif key == "FRESH":
            argv = argv[:-2]
        else:
            argv.append(e)
    assert entry.main(argv) == code
    captured = capsys.readouterr()
    assert needle in one_line(captured.err)
    assert snapshot(stopped) == before                        # nothing written, not even a lock file


def test_eval_needs_weights_and_leaves_the_run_config_alone(tree, reference, tmp_path, capsys):
    assert run(tree, tmp_path / "empty", "--eval", "--resume", "auto") == entry.EXIT_CONFIG
    assert "found no checkpoint" in one_line(capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "empty")
    out = copy(reference, tmp_path)
    config = open(os.path.join(out, "config.yaml")).read()
    assert run(tree, out, "--eval", "--resume", "auto", "--seed", "5") == 0
    assert open(os.path.join(out, "config.yaml")).read() == config
    result = json.load(open(os.path.join(out, "eval.json")))
    assert result["model"]["count"] == 40 and "ema" in result and result["config"]["seed"] == 5
    assert "eval ema: top-1" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ run directory
def test_overwrite_replaces_a_run_and_is_never_saved(tree, reference, tmp_path, capsys):
    out = copy(reference, tmp_path)
    assert run(tree, out, "--overwrite", "--epochs", "1", "--toe.expansion_steps", "[0]", "--toe.keep_rates", "[0.5]") == 0
    assert "removed the previous run's outputs" in capsys.readouterr().out
    assert [r["epoch"] for r in read_log(out)] == [0]
    import yaml
    assert "overwrite" not in yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert load(os.path.join(out, "best.pth"))["config"]["epochs"] == 1
    assert_consistent(out, 1)


def test_full_disk_keeps_the_old_checkpoint_and_resume_trims_the_log(tree, stopped, reference, tmp_path, monkeypatch,
                                                                       capsys):
    out = copy(stopped, tmp_path)
    old = open(os.path.join(out, "checkpoint.pth"), "rb").read()

    def no_space(obj, f):
        f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ckpt_io.torch, "save", no_space)
    assert run(tree, out, "--resume", "auto") == entry.EXIT_ERROR
    err = one_line(capsys.readouterr().err)
    assert "No space left on device" in err and "checkpoint.pth is intact" in err
    assert open(os.path.join(out, "checkpoint.pth"), "rb").read() == old
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert [r["epoch"] for r in read_log(out)] == [0, 1]      # written before the failed save
    monkeypatch.undo()
    assert run(tree, out, "--resume", "auto") == 0
    assert "log.jsonl: dropped 1 line(s)" in capsys.readouterr().out
    assert_consistent(out, 2)
    assert_same_weights(reference, out)


def test_file_size_limit_while_saving(tmp_path):
    """A real write failure (RLIMIT_FSIZE, as a full disk): one line, the old checkpoint loads, no temporary file."""
    path = tmp_path / "checkpoint.pth"
    code = (f"import resource, sys; sys.path.insert(0, {ROOT!r}); import torch, checkpoint as c\n"
            f"c.save_checkpoint({{'x': torch.zeros(10)}}, {str(path)!r})\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))\n"
            f"c.save_checkpoint({{'x': torch.zeros(100_000)}}, {str(path)!r})\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "CheckpointError: cannot write" in res.stderr
    assert "File too large; the previous checkpoint.pth is intact and the temporary file was removed" in res.stderr
    assert load(path)["x"].shape == (10,) and os.listdir(tmp_path) == ["checkpoint.pth"]


class Killed(BaseException):
    pass


def test_kill_between_checkpoint_and_best_link_is_repaired_on_resume(tree, reference, tmp_path, monkeypatch, capsys):
    def killed(*a, **k):
        raise Killed
    monkeypatch.setattr(ckpt_io, "link_best", killed)
    out = str(tmp_path / "run")
    with pytest.raises(Killed):
        run(tree, out)
    assert load(os.path.join(out, "checkpoint.pth"))["best"]["epoch"] == 0 and not os.path.exists(
        os.path.join(out, "best.pth"))
    monkeypatch.undo()
    assert run(tree, out, "--resume", "auto") == 0
    assert "best.pth: relinked" in capsys.readouterr().out
    assert_consistent(out, 2)
    assert_same_weights(reference, out)


# ------------------------------------------------------------------------------------------------ resume
def test_resume_honours_a_new_schedule_and_keeps_the_optimizer(tree, reference, tmp_path, capsys):
    from timm.scheduler import create_scheduler_v2
    new = ["--epochs", "3", "--lr", "2e-3", "--warmup_epochs", "0", "--min_lr", "1e-6"]
    out = copy(reference, tmp_path, "keep")
    assert run(tree, out, "--resume", "auto", *new) == 0
    lines = capsys.readouterr().out.splitlines()
    for key in ("epochs", "lr", "warmup_epochs", "min_lr"):
        assert sum(ln.startswith(f"resume: {key} changed from") for ln in lines) == 1, key
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3 * 16 / 64)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=3, min_lr=1e-6, warmup_lr=1e-6, warmup_epochs=0,
                                   cooldown_epochs=0, decay_epochs=30, decay_rate=0.1)
    sched.step(2)
    assert read_log(out)[-1]["train_lr"] == pytest.approx(opt.param_groups[0]["lr"])
    steps = {int(s["step"]) for s in load(os.path.join(out, "checkpoint.pth"))["optimizer"]["state"].values()}
    assert steps == {3 * ITERS}                                   # the moments went on
    fresh = copy(reference, tmp_path, "fresh")
    assert run(tree, fresh, "--resume", "auto", "--resume_optimizer", "false", *new) == 0
    steps = {int(s["step"]) for s in load(os.path.join(fresh, "checkpoint.pth"))["optimizer"]["state"].values()}
    assert steps == {ITERS}


def test_timm_format_checkpoint_resumes(tree, reference, tmp_path, capsys):
    ours = load(os.path.join(reference, "checkpoint.pth"))
    timm_ckpt = {"epoch": 1, "arch": "vit_tiny_patch16_224", "state_dict": ours["model"],
                 "state_dict_ema": ours["model_ema"], "optimizer": ours["optimizer"], "version": 2, "metric": 10.0}
    torch.save(timm_ckpt, tmp_path / "timm.pth")
    assert run(tree, tmp_path / "run", "--resume", str(tmp_path / "timm.pth"), "--epochs", "3") == 0
    assert "no lr scheduler state (timm's format)" in capsys.readouterr().out
    assert [r["epoch"] for r in read_log(tmp_path / "run")] == [2]


# ------------------------------------------------------------------------------------------------ bad images
@pytest.fixture(scope="module")
def bad_tree(tree, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("badtree") / "tree")
    shutil.copytree(tree, root)
    for i in range(4):
        with open(os.path.join(root, "train", "c3", f"bad{i}.png"), "wb") as f:
            f.write(b"\x89PNG not really")
    with open(os.path.join(root, "val", "c5", "bad.png"), "wb") as f:
        f.write(b"")
    return root


def test_corrupt_image_is_one_line_with_workers_or_skipped_and_counted(bad_tree, tmp_path, capfd):
    assert run(bad_tree, tmp_path / "stop", "--num_workers", "1", "--epochs", "1", "--toe.expansion_steps", "[0]",
               "--toe.keep_rates", "[0.5]") == entry.EXIT_ERROR
    err = one_line(capfd.readouterr().err)
    assert re.search(r"error: cannot read image .*bad\d?\.png", err), err
    assert run(bad_tree, tmp_path / "skip", "--num_workers", "1", "--skip_bad_images", "--epochs", "1",
               "--toe.expansion_steps", "[0]", "--toe.keep_rates", "[0.5]") == 0
    rec = read_log(tmp_path / "skip")[0]
    assert rec["val_skipped_images"] == 1 and rec["val_count"] == 40
    assert rec["train_skipped_images"] >= 1
    assert "warning: skipping an image" in capfd.readouterr().err


# ------------------------------------------------------------------------------------------------ two processes
def torchrun(tree, out, *extra, until=None, action=None):
    """Start a two-process torchrun (gloo); when a stdout line contains ``until``, freeze its process group, call
    ``action(proc)`` (a signal waits for the group to continue), let it continue."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "main.py"), *args(tree, out, "--batch_size", "8", "--print_freq", "1", *extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if until and until in line:
                os.killpg(proc.pid, signal.SIGSTOP)             # torchrun and its workers frozen at this line
                action(proc)
                os.killpg(proc.pid, signal.SIGCONT)
                break
        lines.append(proc.communicate(timeout=240)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(lines)


def ranks(proc):
    """``{rank: pid}`` of the worker processes torchrun ``proc`` started."""
    found = {}
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        rank = next((e[5:] for e in environ if e.startswith(b"RANK=")), None)
        if ppid == proc.pid and rank is not None:
            found[int(rank)] = int(pid)
    return found


def kill_rank_1(proc):
    pid = ranks(proc).get(1)
    if pid is None:
        raise AssertionError("rank 1 not found")
    os.kill(pid, signal.SIGKILL)


def sigterm_every_rank(proc):
    """What a cluster's scheduler does (Slurm signals every process of the job): SIGTERM to each worker."""
    pids = ranks(proc)
    assert sorted(pids) == [0, 1], pids
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)


def test_two_processes_sigterm_a_killed_rank_and_exact_resume(tree, tmp_path):
    ref = str(tmp_path / "ref")
    code, out = torchrun(tree, ref)
    assert code == 0, out[-3000:]
    log = read_log(ref)
    assert [r["toe_kept_tokens"] for r in log] == [8, 16] and log[-1]["val_count"] == 40   # the shards add up
    assert out.count("Epoch 2/2:") == 1                              # only rank 0 reports
    ckpt = load(os.path.join(ref, "checkpoint.pth"))
    assert not any(k.startswith("module.") for k in ckpt["model"])
    # the EMA every rank evaluated is the one saved: it was built after DDP synchronised the weights
    assert entry.main(args(tree, ref, "--eval", "--resume", "auto")) == 0
    ema = json.load(open(os.path.join(ref, "eval.json")))["ema"]
    assert ema["loss"] == pytest.approx(log[-1]["val_ema_loss"], rel=1e-5)

    for attempt in range(3):    # on a busy machine the ranks can be past the epoch's last stop check when the line
        run_dir = str(tmp_path / f"run{attempt}")           # is read (then they stop after it): try again then
        code, out = torchrun(tree, run_dir, until="Epoch [1/2] [2/", action=sigterm_every_rank)
        if "stopped by SIGTERM at epoch 1/2" in out:
            break
    assert code != 0 and "stopped by SIGTERM at epoch 1/2" in out, out[-3000:]
    ckpt = load(os.path.join(run_dir, "checkpoint.pth"))
    assert ckpt["mid_epoch"]["world_size"] == 2 and len(ckpt["mid_epoch"]["ranks"]) == 2
    code, out = torchrun(tree, run_dir, "--resume", "auto", until="Epoch [1/2] [", action=kill_rank_1)
    assert code != 0 and "[rank 0] error: another process of the run failed" in out, out[-3000:]
    load(os.path.join(run_dir, "checkpoint.pth"))                    # still loadable
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]
    code, out = torchrun(tree, run_dir, "--resume", "auto")
    assert code == 0, out[-3000:]
    assert_same_weights(ref, run_dir)
    assert_consistent(run_dir, 2)
