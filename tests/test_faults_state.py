"""Faults that used to lose work or leave a run unfinished: non-finite weights saved over a good checkpoint, a fresh
run replacing another run that finished while it started, an unfinished run taken as finished, a signal in the last
iteration, log and TensorBoard write errors, a damaged log.

Each case goes through ``main.main(argv)`` (or ``scripts/compare.py``'s reader) on the tiny tree of
``tests/test_faults.py`` (7 iterations per epoch).
"""
import errno
import json
import os
import subprocess
import sys

import torch

import main as entry
from tests.runs import ROOT, load, one_line, read_log, signal_at
from tests.test_faults import ITERS, assert_consistent, tree  # noqa: F401 (tree: a fixture)
from tests.test_faults import args as tiny_args

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import compare  # noqa: E402


def args(tree, out, *extra):
    """The tiny run without a method (its epochs can change between sessions)."""
    return tiny_args(tree, out, "--methods", "[]", *extra)


def run(tree, out, *extra):
    return entry.main(args(tree, out, *extra))


def finite(ckpt):
    return all(torch.isfinite(t).all() for key in ("model", "model_ema") for t in ckpt[key].values())


# ------------------------------------------------------------------------------------------ 1: non-finite weights
def test_non_finite_weights_never_replace_the_last_good_checkpoint(tree, tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    assert run(tree, out, "--epochs", "1") == 0
    before = load(out / "checkpoint.pth")
    # the next epoch: every loss finite, its last update leaves a weight NaN (as a huge lr's last step does)
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *a, **k):
        result = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == ITERS:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    capfd.readouterr()
    code = run(tree, out, "--epochs", "3", "--resume", "auto")
    err = one_line(capfd.readouterr().err)
    assert code == entry.EXIT_ERROR
    assert "weights are not finite after epoch 2" in err and f"global iteration {2 * ITERS}" in err and "intact" in err
    after = load(out / "checkpoint.pth")
    assert finite(after) and after["epoch"] == before["epoch"] == 0
    assert [r["epoch"] for r in read_log(out)] == [0]                  # the NaN epoch was neither logged nor saved
    monkeypatch.undo()
    assert run(tree, out, "--epochs", "2", "--resume", "auto") == 0   # and the run goes on from the good state
    assert_consistent(out, 2)


# ------------------------------------------------------------------------------------------ 2: decided under the lock
def test_a_fresh_run_never_replaces_a_run_that_finished_while_it_started(tree, tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    real_build = entry.build

    def slow_build(cfg, dist, log):                     # the checks passed; meanwhile another run fills the directory
        r = real_build(cfg, dist, log)
        other = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args(tree, out, "--epochs", "1")],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert other.returncode == 0, other.stderr
        theirs.update({n: (out / n).read_bytes() for n in ("log.jsonl", "checkpoint.pth", "config.yaml", "summary.json")})
        return r
    theirs = {}
    monkeypatch.setattr(entry, "build", slow_build)
    capfd.readouterr()
    assert run(tree, out) == entry.EXIT_ERROR
    err = one_line(capfd.readouterr().err)
    assert "already holds a run" in err
    assert {n: (out / n).read_bytes() for n in theirs} == theirs
    monkeypatch.setattr(entry, "build", real_build)
    assert run(tree, out, "--resume", "auto") == 0                      # the lock was released


def test_a_resume_whose_checkpoint_was_replaced_while_it_started_stops(tree, tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    assert run(tree, out, "--epochs", "1") == 0
    real_build = entry.build

    def slow_build(cfg, dist, log):
        r = real_build(cfg, dist, log)
        other = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"),
                                *args(tree, out, "--epochs", "2", "--resume", "auto")],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert other.returncode == 0, other.stderr
        return r
    monkeypatch.setattr(entry, "build", slow_build)
    capfd.readouterr()
    assert run(tree, out, "--epochs", "3", "--resume", "auto") == entry.EXIT_ERROR
    assert "was replaced by another run" in one_line(capfd.readouterr().err)
    assert [r["epoch"] for r in read_log(out)] == [0, 1]                 # the other run's epoch 2 is kept
    assert load(out / "checkpoint.pth")["epoch"] == 1


# ------------------------------------------------------------------------------------------ 3, 4: finished runs
def test_a_run_killed_before_its_final_checkpoint_is_not_finished(tree, tmp_path):
    out = tmp_path / "run"
    assert run(tree, out, "--epochs", "1") == 0
    first = (out / "checkpoint.pth").read_bytes()
    assert run(tree, out, "--epochs", "2", "--resume", "auto") == 0
    assert compare.finished(str(out), 2)
    # as a kill between the last log record and the final checkpoint leaves it: the log says 2 epochs
    (out / "checkpoint.pth").write_bytes(first)
    (out / "best.pth").unlink()
    (out / "summary.json").unlink()
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
    assert not compare.finished(str(out), 2)
    assert run(tree, out, "--epochs", "2", "--resume", "auto") == 0      # what compare.py launches: it trains epoch 2
    assert load(out / "checkpoint.pth")["epoch"] == 1 and compare.finished(str(out), 2)


def test_a_signal_in_the_last_iteration_finishes_the_run(tree, tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    signal_at(monkeypatch, epoch=1, step=ITERS - 1)                     # the last batch of the last epoch
    assert run(tree, out) == entry.EXIT_OK
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["epoch"] == 1 and summary["epochs"] == 2
    assert_consistent(out, 2)


def test_a_finished_run_without_its_summary_gets_it_on_resume(tree, tmp_path):
    out = tmp_path / "run"
    assert run(tree, out) == 0
    want = json.loads((out / "summary.json").read_text())
    (out / "summary.json").unlink()                                     # killed after the final checkpoint
    assert run(tree, out, "--resume", "auto") == 0
    got = json.loads((out / "summary.json").read_text())
    assert got["final"] == want["final"] and got["train_seconds"] == want["train_seconds"]


def test_summary_times_cover_every_process_of_a_resumed_run(tree, tmp_path):
    out = tmp_path / "run"
    assert run(tree, out, "--epochs", "1") == 0
    assert run(tree, out, "--epochs", "2", "--resume", "auto") == 0
    log = read_log(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["epochs"] == 2
    assert summary["train_seconds"] == sum(r["train_epoch_seconds"] for r in log)
    assert summary["wall_seconds"] == log[0]["wall_seconds"] + log[1]["wall_seconds"]


# ------------------------------------------------------------------------------------------ 8: log write errors
class FullDisk:
    """A ``log.jsonl`` file object whose writes fail with ENOSPC from the ``n``-th record on."""

    def __init__(self, f, n):
        self.f, self.n = f, n

    def write(self, text):
        self.n -= 1
        if self.n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_on_the_log_saves_the_checkpoint_first_and_stops_in_one_line(tree, tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    real_open = entry.RunLogger.open_files

    def open_files(self, *a, **k):
        real_open(self, *a, **k)
        self.jsonl = FullDisk(self.jsonl, 2)                             # epoch 2's record cannot be written
    monkeypatch.setattr(entry.RunLogger, "open_files", open_files)
    assert run(tree, out, "--save_every", "5") == entry.EXIT_ERROR
    err = one_line(capfd.readouterr().err)
    assert "log.jsonl: cannot write the record of epoch 2" in err and "checkpoint is saved" in err
    assert load(out / "checkpoint.pth")["epoch"] == 1                  # saved although save_every would skip it
    assert [r["epoch"] for r in read_log(out)] == [0]
    monkeypatch.setattr(entry.RunLogger, "open_files", real_open)
    assert run(tree, out, "--resume", "auto") == 0                      # lock released; the record written back
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
    assert "wrote back the record of epoch 2" in capfd.readouterr().out


def test_a_tensorboard_failure_is_one_warning_and_training_goes_on(tree, tmp_path, monkeypatch, capfd):
    from torch.utils.tensorboard import SummaryWriter

    def broken(self, *a, **k):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "tensorboard/events.out")
    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)
    out = tmp_path / "run"
    assert run(tree, out, "--tensorboard", "true") == 0
    captured = capfd.readouterr()
    warnings = [ln for ln in captured.out.splitlines() if ln.startswith("warning: tensorboard")]
    assert len(warnings) == 1 and "training goes on" in warnings[0] and "Traceback" not in captured.err
    assert_consistent(out, 2)


# ------------------------------------------------------------------------------------------ 9: a damaged log
def test_a_damaged_log_is_trimmed_in_one_line_and_the_run_resumes(tree, tmp_path, capfd):
    out = tmp_path / "run"
    assert run(tree, out, "--epochs", "1") == 0
    with open(out / "log.jsonl", "ab") as f:
        f.write(b"\xff\xfe\x00garbage\n" + json.dumps({"epoch": None, "val_acc1": 1.0}).encode() + b"\n")
    capfd.readouterr()
    assert run(tree, out, "--epochs", "2", "--resume", "auto") == 0
    lines = [ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("log.jsonl:")]
    assert len(lines) == 1 and "dropped 2 line(s)" in lines[0]
    assert_consistent(out, 2)


def test_a_changed_process_count_is_said_with_the_other_resume_changes(tree, tmp_path, capfd):
    out = tmp_path / "run"
    assert run(tree, out, "--epochs", "1") == 0
    ckpt = load(out / "checkpoint.pth")
    assert ckpt["clock"]["world_size"] == 1
    ckpt["clock"]["world_size"] = 2                                   # as if written by a run on two processes
    torch.save(ckpt, out / "checkpoint.pth")
    capfd.readouterr()
    assert run(tree, out, "--epochs", "2", "--resume", "auto") == 0
    lines = [ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("resume: processes")]
    assert lines == ["resume: processes changed from 2 to 1: global batch 32 -> 16, lr 5.000e-04 -> 2.500e-04 "
                     "(linear rule; the lr schedule is rebuilt)"]
