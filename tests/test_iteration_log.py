"""The per-iteration log (``log_every``): what a record holds, that it costs nothing when off, and that
``iterations.jsonl`` and TensorBoard read as one uninterrupted run after SIGTERM + ``--resume auto`` and after a kill
past the last checkpoint.

The engine checks use a tiny timm ViT and a real DataLoader against a hand-written training loop; the end-to-end
checks run main.py (as a subprocess where a signal comes from outside) on 120 random 8x8 images at 16 px, two
2-block epochs of 7 iterations with the PSS cyclic schedule, whose drop ratio is checked against the published
formula.
"""
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

import engine
import main as entry
from logger import ITERATIONS, RunLogger, read_iterations, trim_iterations
from tests.runs import ROOT, TINY_MODEL, load, main_argv, read_log
from tests.test_faults import make_tree

TINY = [*TINY_MODEL, "--epochs", "2", "--methods", "[pss]", "--pss.cooldown_epochs", "0", "--num_workers", "0",
        "--batch_size", "16", "--warmup_epochs", "1", "--print_freq", "1", "--model_ema_decay", "0.9"]
ITERS = 7                                                  # 120 images // 16
TIMINGS = ("seconds",)


# ------------------------------------------------------------------------------------------------ the engine
class Triples(torch.utils.data.Dataset):
    """(image, class, dataset index), as the trainer's loaders yield them."""

    def __init__(self, n=12):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                             num_classes=3)


def train_logged(tmp_path, log_every, accum, clip_grad=None, global_step=10, scaled=False):
    """One epoch of 6 micro-batches through engine.train_one_epoch (``scaled``: with a loss scaler, as fp16 AMP
    runs); returns the model and the records written."""
    model = tiny_vit()
    loader = torch.utils.data.DataLoader(Triples(), batch_size=2, shuffle=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    log = RunLogger(stream=io.StringIO())
    os.makedirs(tmp_path, exist_ok=True)
    log.open_files(str(tmp_path), tensorboard=False, iterations=log_every > 0)
    criterion = engine.DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.0, 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaled else None
    engine.train_one_epoch(model, criterion, loader, opt, torch.device("cpu"), 0, 1, log, accum_steps=accum,
                           scaler=scaler, clip_grad=clip_grad, log_every=log_every, global_step=global_step,
                           print_freq=100)
    log.close()
    return model, read_iterations(str(tmp_path / ITERATIONS))


def reference_loop(accum, clip_grad):
    """The same epoch by hand: per micro-batch the loss, per update the gradient norm before clipping."""
    model = tiny_vit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, norms = [], {}
    for k, (x, y, _) in enumerate(torch.utils.data.DataLoader(Triples(), batch_size=2, shuffle=False)):
        loss = nn.functional.cross_entropy(model(x), y)
        (loss / accum).backward()
        losses.append(loss.item())
        if (k + 1) % accum == 0:
            grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
            norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
            norms[k] = norm
            if clip_grad is not None:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(min(1.0, clip_grad / (norm + 1e-6)))
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model, losses, norms


@pytest.mark.parametrize("accum,clip_grad,scaled", [(1, None, False), (2, None, False), (2, 0.05, False),
                                                    (1, None, True), (2, 0.05, True)])
def test_every_record_matches_a_hand_written_loop(tmp_path, accum, clip_grad, scaled):
    model, records = train_logged(tmp_path, 1, accum, clip_grad, scaled=scaled)
    ref, losses, norms = reference_loop(accum, clip_grad)
    assert [r["iteration"] for r in records] == list(range(10, 16)) and [r["step"] for r in records] == list(range(6))
    for k, rec in enumerate(records):
        assert rec["epoch"] == 0 and rec["lr"] == 1e-2
        assert rec["loss"] == pytest.approx(losses[k], rel=1e-5)
        assert rec["loss_avg"] == pytest.approx(sum(losses[:k + 1]) / (k + 1), rel=1e-5)
        if k in norms:
            assert rec["grad_norm"] == pytest.approx(norms[k], rel=1e-4)        # unscaled, before clipping
        else:
            assert rec["grad_norm"] is None                                     # inside an accumulation
    if clip_grad is not None:
        assert all(n > clip_grad for n in norms.values())                       # the clip did act
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_off_adds_nothing_per_iteration_and_on_reads_the_norm_every_n(tmp_path, monkeypatch):
    calls = []
    real_norm = nn.utils.get_total_norm
    monkeypatch.setattr(nn.utils, "get_total_norm", lambda *a, **k: calls.append(1) or real_norm(*a, **k))
    monkeypatch.setattr(RunLogger, "log_iteration", lambda *a: pytest.fail("log_every 0 wrote an iteration record"))
    monkeypatch.setattr(engine, "iteration_record", lambda *a: pytest.fail("log_every 0 built an iteration record"))
    off, records = train_logged(tmp_path / "off", 0, 1)
    assert calls == [] and records == [] and not os.path.exists(tmp_path / "off" / ITERATIONS)
    monkeypatch.undo()
    monkeypatch.setattr(nn.utils, "get_total_norm", lambda *a, **k: calls.append(1) or real_norm(*a, **k))
    on, records = train_logged(tmp_path / "on", 3, 1)
    assert [r["iteration"] for r in records] == [12, 15]           # global iterations 10..15 divisible by 3
    assert len(calls) == 2                                         # the norm only where a record is written
    for p, q in zip(off.parameters(), on.parameters()):
        assert torch.equal(p, q)                                   # logging changes nothing in training
    off, _ = train_logged(tmp_path / "off_scaled", 0, 1, scaled=True)
    on, _ = train_logged(tmp_path / "on_scaled", 1, 1, scaled=True)   # unscaled before step() on logged updates
    for p, q in zip(off.parameters(), on.parameters()):
        assert torch.equal(p, q)


def test_trim_keeps_one_record_per_iteration_before_the_checkpoint(tmp_path):
    path = tmp_path / ITERATIONS
    lines = [{"iteration": i, "loss": float(i)} for i in (0, 1, 2, 3, 2, 3, 4)] + [{"epoch": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"iteration": 5, "lo')
    assert trim_iterations(str(path), 4) == 5
    assert read_iterations(str(path)) == [{"iteration": i, "loss": float(i)} for i in range(4)]
    assert trim_iterations(str(path), 4) == 0
    assert trim_iterations(str(tmp_path / "absent.jsonl"), 4) == 0


# ------------------------------------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(str(tmp_path_factory.mktemp("data") / "tree"))


def args(tree, out, *extra):
    return main_argv(tree, out, "--data_set", "folder", *TINY, "--log_every", "1", *extra)


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    """An uninterrupted run with a record every iteration (TensorBoard on)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert entry.main(args(tree, out)) == 0
    return str(out)


def published_cyclic(g, iters, start=0.8, end=-0.1):
    """The published DeiT code's cyclic patch drop ratio at global iteration g (no cooldown): a triangle inside
    every epoch from ``start`` to ``end`` and back, clipped to [0, 1], snapped to a multiple of 0.2."""
    c = g % iters
    p = c / (iters / 2) if c <= iters // 2 else (iters - c) / (iters / 2)
    return round(max(0.0, min(1.0, (1 - p) * start + p * end)) * 5) / 5


def without_timings(records):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def tensorboard_scalars(out, tag):
    """``{step: value}`` of one TensorBoard tag, as TensorBoard shows it (purged steps hidden), and the steps seen."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars(tag)
    return {e.step: e.value for e in events}, [e.step for e in events]


def test_records_hold_loss_lr_and_the_published_drop_ratio(reference):
    records, log = read_iterations(os.path.join(reference, ITERATIONS)), read_log(reference)
    assert [r["iteration"] for r in records] == list(range(2 * ITERS))
    assert [(r["epoch"], r["step"]) for r in records] == [(e, s) for e in range(2) for s in range(ITERS)]
    for e in range(2):
        mine = records[e * ITERS:(e + 1) * ITERS]
        assert sum(r["loss"] for r in mine) / ITERS == pytest.approx(log[e]["train_loss"], rel=1e-6)
        assert mine[-1]["loss_avg"] == pytest.approx(log[e]["train_loss"], rel=1e-6)
        assert {r["lr"] for r in mine} == {log[e]["train_lr"]}           # the per-epoch schedule
        assert all(r["grad_norm"] > 0 for r in mine)
    assert [r["pss_drop_ratio"] for r in records] == [published_cyclic(g, ITERS) for g in range(2 * ITERS)]
    assert len({r["pss_drop_ratio"] for r in records}) > 2
    assert records[0]["pss_kept_patches"] == 2 and records[ITERS // 2]["pss_kept_patches"] == 16   # 0.8 and 0.0 of 16
    loss, steps = tensorboard_scalars(reference, "iter/loss")
    assert steps == list(range(2 * ITERS)) and loss == pytest.approx({r["iteration"]: r["loss"] for r in records})
    drop, _ = tensorboard_scalars(reference, "iter/pss_drop_ratio")
    assert drop == pytest.approx({r["iteration"]: r["pss_drop_ratio"] for r in records})


def evit_ratio(g, target, total):
    """The EViT / Tri-Level keep ratio at global iteration g with no warm-up: a cosine from 1 to ``target`` over
    ``total`` iterations."""
    return target + (1 - target) * (math.cos(g / total * math.pi) + 1) * 0.5


MORE_METHODS = {   # a run's methods, its extra keys, and each logged iteration's expected state (g: global iteration)
    "trilevel": (["--methods", "[trilevel]", "--trilevel.example_level", "false", "--trilevel.pruning_loc", "[1]",
                  "--trilevel.warmup_epochs", "0", "--trilevel.decay_epochs", "2", "--log_every", "2"],
                 lambda g: {"trilevel_keep_ratio": pytest.approx(evit_ratio(g, 0.7, 2 * ITERS), rel=1e-12),
                            "trilevel_attn_ratio": pytest.approx(evit_ratio(g, 0.3, 2 * ITERS), rel=1e-12)}),
    # EfficientTrain at 8 then 16 px (4 then 16 patches), ToE keeping half of them, then all
    "efficienttrain+toe": (["--methods", "[efficienttrain,toe]", "--efficienttrain.input_sizes", "[8, 16]",
                            "--efficienttrain.batch_scale", "[1, 1]", "--efficienttrain.rand_magnitudes", "[1, 2]",
                            "--toe.expansion_steps", "[0, 1]", "--toe.keep_rates", "[0.5, 1.0]",
                            "--toe.init_keep_rate", "0.25", "--log_every", "3"],
                           lambda g: {"efficienttrain_phase": 1 + g // ITERS, "toe_stage": 1 + g // ITERS,
                                      "efficienttrain_input_size": (8, 16)[g // ITERS],
                                      "toe_kept_tokens": (2, 16)[g // ITERS]}),
}


@pytest.mark.parametrize("name", sorted(MORE_METHODS))
def test_every_method_reports_its_state_per_iteration(tree, tmp_path, name):
    extra, expected = MORE_METHODS[name]
    assert entry.main(args(tree, tmp_path, "--tensorboard", "false", *extra)) == 0
    records = read_iterations(str(tmp_path / ITERATIONS))
    every = int(extra[-1])
    assert [r["iteration"] for r in records] == list(range(0, 2 * ITERS, every))
    for r in records:
        assert {k: r[k] for k in expected(0)} == expected(r["iteration"]), r["iteration"]


def _default_signals():
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def sigterm_inside_epoch_2(tree, out):
    """main.py as a subprocess, sent SIGTERM from outside while it prints epoch 2's third iteration."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *args(tree, out)], cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    try:
        for line in proc.stdout:
            if "Epoch [2/2] [3/" in line:
                proc.send_signal(signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_sigterm_inside_an_epoch_and_resume_give_the_uninterrupted_log(tree, reference, tmp_path):
    for attempt in range(3):    # on a busy machine the run can be past the epoch's last stop check: try again then
        out = str(tmp_path / f"run{attempt}")
        code, err = sigterm_inside_epoch_2(tree, out)
        if "stopped by SIGTERM at epoch 2/2" in err:
            break
    assert code == entry.EXIT_STOPPED and "stopped by SIGTERM at epoch 2/2" in err, err[-2000:]
    stop = load(os.path.join(out, "checkpoint.pth"))["global_step"]
    assert ITERS < stop < 2 * ITERS
    assert [r["iteration"] for r in read_iterations(os.path.join(out, ITERATIONS))] == list(range(stop))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args(tree, out, "--resume", "auto")],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    ref = read_iterations(os.path.join(reference, ITERATIONS))
    assert without_timings(read_iterations(os.path.join(out, ITERATIONS))) == without_timings(ref)
    loss, steps = tensorboard_scalars(out, "iter/loss")
    assert steps == list(range(2 * ITERS)) and loss == pytest.approx({r["iteration"]: r["loss"] for r in ref})


def test_a_kill_past_the_checkpoint_is_dropped_on_resume(tree, reference, tmp_path, monkeypatch, capsys):
    """A run that went on past its last checkpoint and was killed (here: the finished reference, its checkpoint put
    back to one saved inside epoch 2, its last record cut short): resume drops what the checkpoint does not cover
    from iterations.jsonl and TensorBoard, and ends with the uninterrupted run's records."""
    from tests.runs import signal_at
    stopped = str(tmp_path / "stopped")
    signal_at(monkeypatch, epoch=1, step=2)
    assert entry.main(args(tree, stopped)) == entry.EXIT_STOPPED
    monkeypatch.undo()
    out = str(tmp_path / "killed")
    shutil.copytree(reference, out)
    shutil.copy(os.path.join(stopped, "checkpoint.pth"), os.path.join(out, "checkpoint.pth"))
    with open(os.path.join(out, ITERATIONS), "a") as f:
        f.write('{"iteration": 14, "epoch": 2, "lo')
    stop = load(os.path.join(out, "checkpoint.pth"))["global_step"]
    assert stop == ITERS + 3
    capsys.readouterr()
    assert entry.main(args(tree, out, "--resume", "auto")) == 0
    assert f"{ITERATIONS}: dropped {2 * ITERS - stop + 1} record(s)" in capsys.readouterr().out
    ref = read_iterations(os.path.join(reference, ITERATIONS))
    assert without_timings(read_iterations(os.path.join(out, ITERATIONS))) == without_timings(ref)
    loss, steps = tensorboard_scalars(out, "iter/loss")          # the first session's later steps are purged
    assert sorted(set(steps)) == list(range(2 * ITERS)) and len(steps) == 2 * ITERS
    assert loss == pytest.approx({r["iteration"]: r["loss"] for r in ref})


def test_log_every_is_validated_and_off_by_default(tree, tmp_path, capsys):
    assert entry.main(args(tree, tmp_path / "bad", "--log_every", "-1")) == entry.EXIT_CONFIG
    assert "log_every: -1 must be >= 0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad")
    from config import Config
    assert Config().log_every == 0


# ------------------------------------------------------------------------------------------------ the plot
def test_plot_script_draws_every_logged_field_against_iterations(reference, tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import plot_iterations
    finally:
        sys.path.pop(0)
    records = read_iterations(os.path.join(reference, ITERATIONS))
    fig = plot_iterations.plot({"ref": records}, str(tmp_path / "it.png"), smooth=2)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels == ["loss", "lr", "grad_norm", "pss_drop_ratio", "pss_kept_patches"]
    raw, smooth = fig.axes[0].get_lines()[:2]
    assert list(raw.get_xdata()) == list(range(2 * ITERS)) and list(raw.get_ydata()) == [r["loss"] for r in records]
    assert smooth.get_ydata()[-1] == pytest.approx((records[-1]["loss"] + records[-2]["loss"]) / 2)
    assert list(fig.axes[3].get_lines()[0].get_ydata()) == [published_cyclic(g, ITERS) for g in range(2 * ITERS)]
    from matplotlib.image import imread
    assert imread(str(tmp_path / "it.png")).shape[0] > 100
    assert plot_iterations.moving_mean([1.0, 2.0, 3.0, 5.0], 2) == [1.0, 1.5, 2.5, 4.0]

    out = tmp_path / "cmd.png"
    script = os.path.join(ROOT, "scripts", "plot_iterations.py")
    res = subprocess.run([sys.executable, script, reference, "--fields", "loss,pss_drop_ratio", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and out.is_file(), res.stderr
    res = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip() == f"error: {tmp_path}: no {ITERATIONS} (train with " \
                                                          f"--log_every N, e.g. --log_every 10)"
