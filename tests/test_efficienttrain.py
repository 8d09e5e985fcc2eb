"""EfficientTrain as a curriculum plug-in: the low-frequency crop, the model following the input size, the recipe
per phase, the published plan, and runs through the real entrypoint that change loaders and model size between
epochs, resumed across a phase boundary (at an epoch's end and inside an epoch) and on two processes."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import main as entry
import plan as plan_mod
from config import load_config
from efficienttrain import low_frequency_crop
from efficienttrain.method import phases_of
from methods import MethodError, MethodSet
from models import create_model
from models.resize import at_input_size, input_size_of, set_input_size
from tests.runs import (CONFIGS, DEMO, TINY_MODEL, assert_same_weights, interrupt_epoch, load, read_log, runner,
                       signal_at, torchrun)

# three one-epoch phases at 8 / 12 / 16 px (2x2, 3x3, 4x4 patches), the first two with a doubled per-process batch
# and half the accumulation, RandAugment magnitude 1 / 5 / 9; ToE on top keeps 50 % then all of the current patches
TINY = [*TINY_MODEL, "--epochs", "3", "--num_workers", "0", "--batch_size", "32", "--grad_accum_steps", "2",
        "--warmup_epochs", "1", "--print_freq", "5", "--tensorboard", "false", "--model_ema_decay", "0.9",
        "--methods", "[efficienttrain, toe]", "--toe.expansion_steps", "[0, 2]", "--toe.keep_rates", "[0.5, 1.0]",
        "--toe.init_keep_rate", "0.25", "--efficienttrain.input_sizes", "[8, 12, 16]",
        "--efficienttrain.rand_magnitudes", "[1, 5, 9]", "--efficienttrain.batch_scale", "[2, 2, 1]",
        "--efficienttrain.rand_augment", "rand-m{m}-mstd0.5-inc1"]
run = runner(*TINY)


# ------------------------------------------------------------------------------------------------ the crop
def test_low_frequency_crop_keeps_exactly_the_low_frequencies():
    """A band-limited image (frequencies below the new Nyquist limit) comes out as the same picture sampled on the
    smaller grid; a random image equals the centre crop of its shifted spectrum, an independent formulation."""
    n, size = 32, 20
    i = torch.arange(n, dtype=torch.float64)
    j = torch.arange(size, dtype=torch.float64)
    waves = [(0, 0, 0.7, 0.0), (3, -2, 0.5, 0.4), (-9, 6, 0.25, 1.3), (4, 9, 0.1, 2.0)]   # |a|, |b| < size / 2

    def picture(grid, m):
        y, x = torch.meshgrid(grid, grid, indexing="ij")
        return sum(amp * torch.cos(2 * np.pi * (a * y + b * x) / m + ph) for a, b, amp, ph in waves)
    big = picture(i, n)[None, None]
    assert torch.allclose(low_frequency_crop(big, size), picture(j, size)[None, None], atol=1e-10)

    x = torch.randn(2, 3, n, n, dtype=torch.float64)
    spec = np.fft.fftshift(np.fft.fft2(x.numpy()), axes=(-2, -1))
    c, h = n // 2, size // 2
    crop = spec[..., c - h:c + h, c - h:c + h] * (size / n) ** 2
    expected = np.real(np.fft.ifft2(np.fft.ifftshift(crop, axes=(-2, -1))))
    assert np.allclose(low_frequency_crop(x, size).numpy(), expected, atol=1e-10)
    assert torch.allclose(low_frequency_crop(x, size).mean((-2, -1)), x.mean((-2, -1)), atol=1e-10)
    assert low_frequency_crop(x, n) is x
    with pytest.raises(ValueError, match="even"):
        low_frequency_crop(x, 15)


# ------------------------------------------------------------------------------------------------ the model
def test_input_size_follows_with_the_position_embedding_and_its_moments():
    cfg = load_config(DEMO, TINY)
    model = create_model(cfg, 10, MethodSet([]), img_size=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    opt.step()
    pos = model.pos_embed
    before, moments = pos.detach().clone(), {k: v.clone() for k, v in opt.state[pos].items() if torch.is_tensor(v)}

    def bilinear(t, old, new):          # EfficientTrain's rule: bilinear, align_corners False, CLS unchanged
        grid = t[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new, new), mode="bilinear", align_corners=False)
        return torch.cat([t[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)
    assert set_input_size(model, 12, [opt]) and input_size_of(model) == 12
    pos = model.pos_embed
    assert pos.shape == (1, 1 + 9, 32) and any(p is pos for g in opt.param_groups for p in g["params"])
    assert torch.allclose(pos.detach(), bilinear(before, 2, 3), atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.allclose(opt.state[pos][key], bilinear(moments[key], 2, 3), atol=1e-7)
    assert len(opt.state) == len([p for g in opt.param_groups for p in g["params"]])     # nothing left behind
    model(torch.randn(4, 3, 12, 12)).sum().backward()
    opt.step()                                                            # shapes agree: the step runs
    saved = pos.detach().clone()
    with at_input_size(model, 16):
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10) and model.pos_embed.shape[1] == 17
    assert input_size_of(model) == 12 and model.pos_embed is pos and torch.equal(pos.detach(), saved)  # not resampled twice
    assert not set_input_size(model, 12)


# ------------------------------------------------------------------------------------------------ the recipe
def test_phases_and_recipe_follow_the_published_driver():
    cfg = load_config(os.path.join(CONFIGS, "deit_s_et.yaml"))
    phases = phases_of(cfg.efficienttrain, 300)
    assert [(p.first, p.end, p.input_size, p.magnitude, p.batch_scale) for p in phases] == [
        (0, 60, 160, 1, 2), (60, 120, 160, 3, 2), (120, 180, 160, 5, 2), (180, 240, 192, 7, 2), (240, 300, 224, 9, 1)]
    methods = MethodSet.from_config(cfg)
    for epoch, (batch, accum, m, size) in {0: (512, 1, 1, 160), 119: (512, 1, 3, 160), 180: (512, 1, 7, 192),
                                           299: (256, 2, 9, 224)}.items():
        s = entry.settings_at(cfg, methods, epoch)
        assert (s.batch_size, s.grad_accum_steps, s.aa, s.input_size, s.eval_size) == \
            (batch, accum, f"rand-m{m}-mstd0.5-inc1", size, 224)
        assert s.batch_size * s.grad_accum_steps * cfg.nproc == 4096                   # the effective batch
    assert [p.end for p in phases_of(cfg.efficienttrain, 7)] == [1, 2, 4, 5, 7]         # int(epochs / 5 * (i + 1))


@pytest.mark.parametrize("overrides,needle", [
    (["--grad_accum_steps", "1"], "efficienttrain.batch_scale: phase 1 scales the per-process batch by 2, which "
                                  "keeps the effective batch only if grad_accum_steps (1) is a multiple of it"),
    (["--efficienttrain.input_sizes", "[8, 12, 12]"], "efficienttrain.input_sizes: the last phase trains at 12 px "
                                                      "but input_size is 16"),
    (["--efficienttrain.input_sizes", "[7, 12, 16]"], "efficienttrain.input_sizes: phase 1 size 7 must be even"),
    (["--efficienttrain.input_sizes", "[6, 12, 16]"], "efficienttrain.input_sizes: 6 is not a multiple of the patch "
                                                      "size 4"),
    (["--efficienttrain.batch_scale", "[2, 1]"], "efficienttrain.batch_scale: 2 values for 3 phases"),
    (["--efficienttrain.rand_augment", "rand-m9"], "efficienttrain.rand_augment: 'rand-m9' has no {m}"),
    (["--efficienttrain.eval_size", "last"], "efficienttrain.eval_size: 'last' is not one of final, phase"),
])
def test_bad_sections_stop_with_one_line_naming_the_key(digits, tmp_path, overrides, needle, capsys):
    assert run(digits, tmp_path / "run", *overrides) == entry.EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()                               # refused before anything is written


def test_a_model_without_absolute_position_embedding_is_refused():
    cfg = load_config(os.path.join(CONFIGS, "deit_s_et.yaml"), ["--model", "pss_deit_small_patch16_224"])
    with pytest.raises(MethodError, match="efficienttrain: .* has no absolute position embedding"):
        create_model(cfg, 10)


def test_plan_of_the_published_recipes():
    """DeiT-T: EfficientTrain's published computation speed-up is 1.59x (its Tab. 5); ET + ToE keeps 60 of 100
    patches at 160 px and 114 of 144 at 192 px (the counts papers.md derives from the ToE flags)."""
    rows, totals = plan_mod.plan(load_config(os.path.join(CONFIGS, "deit_t_et.yaml")))
    assert round(totals["ideal_speedup"], 2) == 1.59
    spans = [(r["first"], r["state"]["input_size"], r["state"]["batch"], r["state"]["aa"]) for r in rows]
    assert (60, 160, "512 x 8 x 1 = 4096", "rand-m3-mstd0.5-inc1") in spans
    assert (240, 224, "256 x 8 x 2 = 4096", "rand-m9-mstd0.5-inc1") in spans
    rows, totals = plan_mod.plan(load_config(os.path.join(CONFIGS, "deit_t_et_toe.yaml")))
    states = {(r["state"]["input_size"], r["state"]["toe"]) for r in rows}
    assert {(160, "stage 1, 60/100 tokens"), (160, "stage 2, 80/100 tokens"), (192, "stage 2, 114/144 tokens"),
            (192, "stage 3, 144/144 tokens"), (224, "stage 3, 196/196 tokens")} == states
    assert totals["ideal_speedup"] > 1.59


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def straight(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("et") / "straight"
    assert run(digits, out) == 0
    return out


def _same_weights(a_dir, b_dir):
    a, b = load(a_dir / "checkpoint.pth"), load(b_dir / "checkpoint.pth")
    assert_same_weights(a, b)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert a["clock"] == b["clock"]                                      # iterations per epoch of the last phase too


def test_one_run_changes_loader_and_model_at_every_phase(straight, capsys):
    log = read_log(straight)
    assert [r["efficienttrain_phase"] for r in log] == [1, 2, 3]
    assert [r["efficienttrain_input_size"] for r in log] == [8, 12, 16]
    assert [r["toe_kept_tokens"] for r in log] == [2, 4, 16]             # 50 % of 4 and of 9 patches, then all 16
    # 1,442 digits: 45 batches of 32 at scale 1, 22 of 64 at scale 2 (the loader was rebuilt)
    assert [r["train_iters"] for r in log] == [22, 22, 45]
    assert all(r["val_count"] == 355 for r in log)                       # evaluated at 16 px in every phase
    ckpt = load(straight / "checkpoint.pth")
    assert ckpt["model"]["pos_embed"].shape == (1, 17, 32) and ckpt["clock"]["input_size"] == 16
    moments = [v.shape for st in ckpt["optimizer"]["state"].values() for k, v in st.items() if k == "exp_avg"]
    assert (1, 17, 32) in moments and (1, 5, 32) not in moments and (1, 10, 32) not in moments
    summary = json.loads((straight / "summary.json").read_text())
    assert [p["input_size"] for p in summary["methods"]["efficienttrain"]["phases"]] == [8, 12, 16]


def test_resume_at_a_phase_boundary_is_exact(digits, straight, tmp_path, monkeypatch):
    """Killed during phase 2's epoch: the checkpoint of phase 1 (8 px) resumes into phase 2 (12 px) and ends with
    the uninterrupted run's weights, EMA and optimizer state."""
    interrupt_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(digits, tmp_path / "split")
    assert load(tmp_path / "split" / "checkpoint.pth")["model"]["pos_embed"].shape == (1, 5, 32)
    monkeypatch.undo()
    assert run(digits, tmp_path / "split", "--resume", "auto") == 0
    _same_weights(straight, tmp_path / "split")


def test_sigterm_inside_a_doubled_batch_phase_resumes_exactly(digits, straight, tmp_path, monkeypatch, capsys):
    signal_at(monkeypatch, epoch=1, step=5)
    assert run(digits, tmp_path / "stopped") == entry.EXIT_STOPPED
    monkeypatch.undo()
    ckpt = load(tmp_path / "stopped" / "checkpoint.pth")
    assert ckpt["mid_epoch"]["batch_size"] == 64 and ckpt["mid_epoch"]["grad_accum_steps"] == 1
    assert ckpt["clock"]["input_size"] == 12 and ckpt["model"]["pos_embed"].shape == (1, 10, 32)
    assert run(digits, tmp_path / "stopped", "--resume", "auto") == 0
    assert "continuing at epoch 2, iteration 7" in capsys.readouterr().out
    _same_weights(straight, tmp_path / "stopped")
    assert [r["train_loss"] for r in read_log(tmp_path / "stopped")] == [r["train_loss"] for r in read_log(straight)]


def test_eval_only_and_phase_size_evaluation(digits, straight, tmp_path):
    assert entry.main(["--config", DEMO, "--data_path", digits, "--output_dir", str(straight), *TINY, "--eval",
                       "--resume", "auto"]) == 0
    ev = json.loads((straight / "eval.json").read_text())
    assert ev["model"]["acc1"] == pytest.approx(read_log(straight)[-1]["val_acc1"])
    assert run(digits, tmp_path / "phase", "--epochs", "3", "--efficienttrain.eval_size", "phase") == 0
    log = read_log(tmp_path / "phase")
    straight_log = read_log(straight)
    assert log[-1]["val_acc1"] == straight_log[-1]["val_acc1"]             # the last phase is at 16 px either way
    assert log[0]["val_loss"] != straight_log[0]["val_loss"]               # phase 1 scored on 8 px crops here


def test_two_process_torchrun_across_phases(digits, tmp_path):
    """DDP is built again around the resized model: two processes train all three phases."""
    from datasets import prepare_digits
    prepare_digits(digits)
    res = torchrun("--config", DEMO, "--data_path", digits, "--output_dir", tmp_path / "ddp", *TINY, "--batch_size", "16",
                   timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    log = read_log(tmp_path / "ddp")
    assert [r["efficienttrain_input_size"] for r in log] == [8, 12, 16]
    assert [r["train_iters"] for r in log] == [22, 22, 45]                 # 2 x 32 per step, then 2 x 16
    assert load(tmp_path / "ddp" / "checkpoint.pth")["model"]["pos_embed"].shape == (1, 17, 32)


# ------------------------------------------------------------------------------------------------ the lr per update
def test_per_update_schedule_is_the_published_curve():
    """``sched_step: iteration`` (the ET configs): the ConvNeXt code base's ``cosine_scheduler`` over updates, a
    linear warm-up from 0 (``np.linspace(0, lr, W)``: ours reaches lr one update later, within 1/W) and then
    ``min + (lr - min)(1 + cos(pi i / (T - W))) / 2``; an epoch has images // 4096 updates in every phase."""
    import math
    cfg = load_config(os.path.join(CONFIGS, "deit_s_et.yaml"))
    u = entry.updates_per_epoch(cfg, 1_281_167, 8)
    assert u == 1_281_167 // 4096 == 312
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=4e-3)
    sched = entry.build_scheduler(cfg, opt, u)
    w, t = 20 * u, 300 * u
    for i in (1, 100, w // 2, w - 1):
        sched.step_update(i)
        assert opt.param_groups[0]["lr"] == pytest.approx(4e-3 * i / (w - 1), rel=2.0 / w)
    for i in (w, w + 1, 60 * u, t // 2, t - 1):
        sched.step_update(i)
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-6 + 0.5 * (4e-3 - 1e-6) * (1 + math.cos(math.pi * (i - w) / (t - w))),
                                                          rel=1e-12)


def test_per_update_schedule_through_main(digits, tmp_path):
    """The lr a run ends each epoch with is that of its last update: 22 updates per epoch (1,442 // 64) in every
    phase (22 of 64 x 1, then 45 batches of 32 x 2: the leftover update keeps the epoch's last lr)."""
    import math
    assert run(digits, tmp_path / "run", "--sched_step", "iteration", "--warmup_lr", "0", "--min_lr", "1e-5") == 0
    w, t, lr = 22, 66, 1e-3

    def published(i):
        return lr * i / w if i < w else 1e-5 + 0.5 * (lr - 1e-5) * (1 + math.cos(math.pi * (i - w) / (t - w)))
    assert [r["train_lr"] for r in read_log(tmp_path / "run")] == pytest.approx([published(e * 22 + 21) for e in range(3)],
                                                                               rel=1e-9)
