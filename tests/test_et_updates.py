"""Issue 15, item 11: optimizer updates per epoch as the published EfficientTrain engine takes them.

The ConvNeXt code base that ToE's ``ET_training.py`` launches computes ``len(dataset) // global batch`` updates per
epoch and skips every micro-batch past them; its loader drops the last incomplete batch of a padded distributed
shard. ``epoch_updates: images`` is that rule (the table configs); ``loader`` trains every micro-batch of the loader.
"""
import copy
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import main as entry
import plan as plan_mod
from config import ConfigError, load_config
from engine import DistillationLoss, train_one_epoch
from logger import RunLogger
from tests.runs import CONFIGS, DEMO, ROOT, TINY_MODEL, load, main_argv, read_log

ET_CONFIGS = ["deit_t_et.yaml", "deit_s_et.yaml", "deit_t_et_toe.yaml", "deit_s_et_toe.yaml"]
IMAGENET, PROCS = 1_281_167, 8


def _published_updates(global_batch):
    """``num_training_steps_per_epoch`` of the published main.py: ``len(dataset_train) // total_batch_size``."""
    return IMAGENET // global_batch


def _loader_batches(batch):
    """Micro-batches per process of the published loader: a DistributedSampler shard (padded to
    ``ceil(n / procs)``), ``drop_last=True``."""
    return math.ceil(IMAGENET / PROCS) // batch


@pytest.fixture
def no_flops(monkeypatch):
    """The plan without its FLOPs count (minutes of fvcore tracing on full-size models; not what is tested here)."""
    import measure

    def skip(*args, **kwargs):
        raise ValueError("FLOPs not counted in this test")
    monkeypatch.setattr(measure, "model_flops", skip)


# ------------------------------------------------------------------------------------------------ the table configs
@pytest.mark.parametrize("name", ET_CONFIGS)
def test_table_configs_take_the_published_updates_in_every_phase(name, no_flops):
    """Phase 5 (256 x 8 x 2): 625 micro-batches per process, of which the published engine trains 624 in 312
    updates; phases 1-4 (512 x 8 x 1): 312 micro-batches, 312 updates. The plan shows 312 for every span."""
    cfg = load_config(os.path.join(CONFIGS, name))
    assert cfg.epoch_updates == "images"
    rows, _ = plan_mod.plan(cfg)
    assert {r["state"]["updates"] for r in rows} == {str(_published_updates(4096))} == {"312"}
    methods = entry.MethodSet.from_config(cfg)
    for first in (0, 60, 120, 180, 240):                     # every phase's first epoch
        s = entry.settings_at(cfg, methods, first)
        got = entry.epoch_iterations(cfg, s, _loader_batches(s.batch_size), IMAGENET, PROCS)
        n = _published_updates(s.batch_size * s.grad_accum_steps * PROCS)
        assert got == (n * s.grad_accum_steps, n)
    assert _loader_batches(256) == 625                        # so phase 5 leaves one micro-batch per process untrained


def test_plan_column_and_the_loader_option(no_flops):
    """``--epoch_updates loader`` (every micro-batch) makes phase 5 take ceil(625 / 2) = 313 updates: 60 more over
    the phase, the 313th on a single micro-batch. The plan's column says so, headed ``updates/epoch``."""
    cfg = load_config(os.path.join(CONFIGS, "deit_s_et.yaml"))
    text = plan_mod.format_plan(cfg, *plan_mod.plan(cfg))
    head = text.splitlines()[1]
    assert "updates/epoch" in head.split("  ")
    last = text.splitlines()[-3]                              # the last span, before the two total lines
    assert last.startswith("240-299 ") and " 312 " in last
    loader = load_config(os.path.join(CONFIGS, "deit_s_et.yaml"), ["--epoch_updates", "loader"])
    rows, _ = plan_mod.plan(loader)
    assert [r["state"]["updates"] for r in rows if r["first"] >= 240] == [str(math.ceil(_loader_batches(256) / 2))]
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["--epoch_updates", "all"])
    assert "epoch_updates" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ the engine
def _tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                             num_classes=5)


def _published_epoch(model, loader, optimizer, update_freq, images):
    """The published engine's loop, one process, full precision: ``step = i // update_freq``; micro-batches with
    ``step >= images // global batch`` are skipped; each loss is divided by ``update_freq``; the optimizer steps after
    every ``update_freq``-th micro-batch."""
    steps = images // (loader.batch_size * update_freq)
    optimizer.zero_grad()
    for i, (x, y, _) in enumerate(loader):
        if i // update_freq >= steps:
            continue
        loss = F.cross_entropy(model(x), y) / update_freq
        loss.backward()
        if (i + 1) % update_freq == 0:
            optimizer.step()
            optimizer.zero_grad()


def test_engine_epoch_equals_the_published_loop():
    """44 images, batches of 8 (5 micro-batches, drop_last), accumulation 2: the published loop makes
    44 // 16 = 2 updates and leaves the 5th micro-batch out; ours with ``epoch_updates: images`` ends with the same
    weights and Adam step count. With ``loader`` a 3rd update trains the 5th micro-batch alone."""
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(44, 3, 16, 16, generator=g), torch.randint(0, 5, (44,), generator=g),
                         torch.arange(44))
    loader = DataLoader(data, batch_size=8, drop_last=True)
    ref_model = _tiny_vit()
    ours_model, loader_model = copy.deepcopy(ref_model), copy.deepcopy(ref_model)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    _published_epoch(ref_model, loader, ref_opt, 2, len(data))

    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, "none", 0.0, 1.0)
    s = entry.Settings(batch_size=8, grad_accum_steps=2, aa=None, input_size=16, eval_size=16)
    for mode, model, updates in (("images", ours_model, 2), ("loader", loader_model, 3)):
        cfg = load_config(DEMO, ["--epoch_updates", mode, "--batch_size", "8", "--grad_accum_steps", "2"])
        iters, n = entry.epoch_iterations(cfg, s, len(loader), len(data), 1)
        assert n == updates
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        stats = train_one_epoch(model, criterion, loader, opt, torch.device("cpu"), 0, 1, RunLogger(enabled=False),
                                accum_steps=2, epoch_iters=iters)
        assert stats["iters"] == iters == {"images": 4, "loader": 5}[mode]
        assert {int(st["step"]) for st in opt.state.values()} == {updates}
    assert {int(st["step"]) for st in ref_opt.state.values()} == {2}
    for (name, ref), ours, other in zip(ref_model.state_dict().items(), ours_model.state_dict().values(),
                                        loader_model.state_dict().values()):
        assert torch.equal(ref, ours), name
    assert not all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), loader_model.parameters()))


# ------------------------------------------------------------------------------------------------ through main.py
TINY = [*TINY_MODEL, "--epochs", "2", "--num_workers", "0", "--batch_size", "32", "--grad_accum_steps", "2",
        "--warmup_epochs", "1", "--print_freq", "50", "--tensorboard", "false", "--model_ema_decay", "0.9",
        "--methods", "[efficienttrain]", "--efficienttrain.input_sizes", "[12, 16]",
        "--efficienttrain.rand_magnitudes", "[1, 9]", "--efficienttrain.batch_scale", "[2, 1]",
        "--efficienttrain.rand_augment", "rand-m{m}-mstd0.5-inc1", "--sched_step", "iteration",
        "--warmup_lr", "0", "--min_lr", "1e-5", "--epoch_updates", "images"]


def test_run_takes_images_over_the_global_batch_updates_in_every_phase(digits, tmp_path):
    """1,442 digits, global batch 64: 22 updates in both phases (the published ``1442 // 64``): 22 micro-batches of
    64 at 12 px, then 44 of the last phase's 45 micro-batches of 32 (the 45th untrained). The optimizer counts 44
    steps and the lr of each epoch's last update is the published curve's at ``e x 22 + 21``."""
    out = tmp_path / "run"
    assert entry.main(main_argv(digits, out, *TINY)) == 0
    log = read_log(out)
    assert [r["train_iters"] for r in log] == [22, 44]
    assert [r["global_step"] for r in log] == [22, 66]
    ckpt = load(out / "checkpoint.pth")
    assert {int(st["step"]) for st in ckpt["optimizer"]["state"].values()} == {2 * (1442 // 64)}
    assert ckpt["clock"]["iters_per_epoch"] == 44
    w, t, lr = 22, 44, 1e-3
    curve = [lr * i / w if i < w else 1e-5 + 0.5 * (lr - 1e-5) * (1 + math.cos(math.pi * (i - w) / (t - w)))
             for i in range(t)]
    assert [r["train_lr"] for r in log] == pytest.approx([curve[e * 22 + 21] for e in range(2)], rel=1e-9)


# ------------------------------------------------------------------------------------------------ the docs
@pytest.mark.parametrize("config", ["deit_s_toe.yaml", "deit_s_et_toe.yaml"])
def test_documented_plan_examples_are_what_the_command_prints(config, no_flops):
    """Item 12: the ``--plan`` examples of docs/reproducing.md ("See the plan") are today's output, line for line
    (the FLOPs line aside: counted elsewhere, in tests of the plan's totals)."""
    with open(os.path.join(ROOT, "docs", "reproducing.md"), encoding="utf-8") as f:
        page = f.read()
    command = f"$ python main.py --config configs/{config} --plan\n"
    assert command in page
    shown = page.split(command, 1)[1].split("```", 1)[0].splitlines()
    cfg = load_config(os.path.join(CONFIGS, config))
    printed = plan_mod.format_plan(cfg, *plan_mod.plan(cfg)).splitlines()
    keep = lambda lines: [ln for ln in lines if not ln.startswith("training FLOPs")]      # noqa: E731
    assert keep(shown) == keep(printed) and len(shown) == len(printed)
