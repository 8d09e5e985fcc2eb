"""PSS whole training steps and whole-run schedules against the published code (BradMcDanel/pss), from
``tests/fixtures/pss_step.pt`` (``PSS_STEP_REFERENCE`` replaces it; ``tests/fixtures/generate_pss.py`` writes it).

Two table configs: ``deit_s_pss.yaml`` (the published DeiT code) and ``vit_b_simmim_ft_pss_magnitude_cyclic_80_0.yaml``
(the published SimMIM fine-tuning code), each with a tiny model of its family (width 64, 1 block, 32 px, patch 8).
This project's own factory, config, optimizer builder, scheduler, criterion and mixup, PSS method and engine run 3
iterations at the fixture's epoch; logits, loss, the kept positions, every gradient and every parameter after the 3
updates are compared with the published loop's, and the lr and drop ratio of the full-size run at its first, last
and boundary iterations with the published schedulers' (also for ``vit_b_simmim_ft_pss_random_cyclic_80_0.yaml``),
as is one draw of the random sampler on each model. See ``tests/fixtures/README.md`` for the bounds and the one
documented difference (SimMIM's drop-ratio timing), and the options that, flipped here, break the comparison.
"""
import types

import numpy as np
import pytest
import torch

import main as entry
from engine import train_one_epoch
from logger import RunLogger
from methods import Clock, MethodSet
from pss import find_sampler
from tests import steps

IMAGENET_TRAIN = 1281167
CONFIGS = {"deit": "deit_s_pss.yaml", "simmim": "vit_b_simmim_ft_pss_magnitude_cyclic_80_0.yaml",
           "simmim_random": "vit_b_simmim_ft_pss_random_cyclic_80_0.yaml"}
SIMMIM_RUNS = {"simmim": "run", "simmim_random": "random_run"}      # table config -> its whole run in the fixture
TINY = "patch_size: 8, embed_dim: 64, depth: 1, num_heads: 2, mlp_ratio: 1"


@pytest.fixture(scope="module")
def fixture():
    return steps.step_reference("pss_step.pt", "PSS_STEP_REFERENCE")


def tiny_config(which, *overrides, model_kwargs=""):
    """The table config with the fixture's tiny model; drop-path off (timm 0.4 and 1.x draw it differently)."""
    kwargs = "{" + TINY + (", " + model_kwargs if model_kwargs else "") + "}"
    return steps.table_config(CONFIGS[which], "--model_kwargs", kwargs, "--input_size", "32", "--drop_path", "0",
                              "--finetune", "", *overrides)


def pss_method(methods):
    return next(m for m in methods if m.name == "pss")


def run_steps(cfg, fixture, which):
    """3 iterations of this project's engine from the fixture's initial weights at the fixture's epoch; what the
    published loop recorded, recorded the same way (hooks that only read)."""
    s = fixture[which]["steps"]
    epoch, per_epoch = s["epoch"], s["iterations_per_epoch"]
    init = {k: v.float() if v.is_floating_point() else v for k, v in s["init"].items()}
    model = steps.table_model(cfg, s["num_classes"], init)
    methods = MethodSet.from_config(cfg)
    methods.attach([model])
    methods.on_epoch(Clock(epoch, 0, epoch * per_epoch, per_epoch, cfg.epochs))
    lr = entry.scaled_lr(cfg, cfg.nproc)
    optimizer = entry.create_optimizer(cfg, model, lr)
    scheduler = entry.build_scheduler(cfg, optimizer, per_epoch)
    scheduler.step(entry.lr_epoch(cfg, epoch))
    set_lr = entry.lr_setter(types.SimpleNamespace(cfg=cfg, scheduler=scheduler, updates_per_epoch=per_epoch), epoch)
    criterion, mixup_fn = entry.build_criterion(cfg, s["num_classes"], torch.device("cpu"))

    out = {"logits": [], "loss": [], "positions": [], "drop_ratio": [], "grads": [], "lrs": []}
    sampler = find_sampler(model)
    model.register_forward_pre_hook(lambda m, a: out["drop_ratio"].append(sampler.drop_ratio))

    def read_output(module, args, logits):
        out["logits"].append(logits.detach().clone())
        out["positions"].append(sampler.kept_index)
    model.register_forward_hook(read_output)
    criterion.register_forward_hook(lambda m, a, o: out["loss"].append(o.detach().clone()))
    step = optimizer.step

    def recorded_step(*args, **kwargs):
        out["grads"].append(steps.gradients(model))
        names = {id(p): n for n, p in model.named_parameters()}
        out["lrs"].append({names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]})
        return step(*args, **kwargs)
    optimizer.step = recorded_step

    images, labels = fixture["images"].float(), fixture["labels"]
    data = torch.utils.data.TensorDataset(images, labels, torch.arange(len(labels)))
    loader = torch.utils.data.DataLoader(data, batch_size=s["batch_size"])
    np.random.seed(s["mixup_seed"])                   # the published mixup draws (all mixup, no cutmix)
    train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), epoch, cfg.epochs,
                    RunLogger(enabled=False), mixup_fn=mixup_fn, clip_grad=cfg.clip_grad, methods=methods,
                    global_step=epoch * per_epoch, iters_per_epoch=per_epoch, set_lr=set_lr)
    out["params"] = steps.parameters(model, s["params"])
    out["groups"] = steps.parameter_groups(cfg, model, lr)
    out["lr"] = lr
    return out


def assert_steps(ours, s):
    """Everything the published loop recorded, within 1e-5 (relative) where it is arithmetic, exactly where it is
    a count, a ratio or a position."""
    steps.assert_groups(ours["groups"], s["groups"])
    assert ours["lr"] == pytest.approx(s["lr"], rel=1e-12)
    assert ours["drop_ratio"] == s["drop_ratio"]
    for i, (mine, theirs) in enumerate(zip(ours["positions"], s["positions"])):
        assert mine is not None and torch.equal(mine, theirs), f"kept positions of iteration {i}"
    steps.assert_close(torch.stack(ours["logits"]), s["logits"], what="logits")
    steps.assert_close(torch.stack(ours["loss"]), s["loss"], what="loss")
    steps.assert_all_close(ours["grads"][0], s["grads"], what="gradients of the first update")
    steps.assert_all_close(ours["params"], s["params"], what="parameters after 3 updates")
    assert len(ours["lrs"]) == len(s["step_lrs"]) == 3
    for i, (mine, theirs) in enumerate(zip(ours["lrs"], s["step_lrs"])):        # every parameter's lr per update
        assert set(mine) == set(theirs)
        for name, want in theirs.items():
            assert mine[name] == pytest.approx(want, rel=1e-12), (i, name, mine[name], want)


# ------------------------------------------------------------------------------------------------ whole runs
def run_lrs(cfg, per_epoch, iterations):
    """Every parameter's lr at the given global updates of the full-size run, set as ``main.train`` sets it: per
    update through ``main.lr_update`` (``sched_step: iteration | swin``), else per epoch through ``main.lr_epoch``."""
    model = steps.table_model(cfg, 10)
    optimizer = entry.create_optimizer(cfg, model, entry.scaled_lr(cfg, cfg.nproc))
    scheduler = entry.build_scheduler(cfg, optimizer, per_epoch)
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in iterations:
        epoch, k = divmod(g, per_epoch)
        if cfg.sched_step in entry.PER_UPDATE:
            scheduler.step_update(entry.lr_update(cfg, epoch, k, per_epoch))
        else:
            scheduler.step(entry.lr_epoch(cfg, epoch))
        out.append({names[id(p)]: grp["lr"] for grp in optimizer.param_groups for p in grp["params"]})
    return out


def drop_ratios(cfg, per_epoch, iterations):
    """The drop ratio this project's PSS method sets before each of the given global iterations."""
    method = pss_method(MethodSet.from_config(cfg))
    method.on_epoch(Clock(0, 0, 0, per_epoch, cfg.epochs))
    out = []
    for g in iterations:
        method.on_step(Clock(g // per_epoch, g % per_epoch, g, per_epoch, cfg.epochs))
        out.append(method.drop_ratio)
    return out


def assert_deit_run_lrs(cfg, ref):
    """The lr of every epoch (DeiT steps it per epoch: one value for all groups), at each epoch's first update."""
    per_epoch = ref["updates_per_epoch"]
    ours = run_lrs(cfg, per_epoch, [e * per_epoch for e in range(cfg.epochs)])
    for e, (mine, want) in enumerate(zip(ours, ref["epoch_lrs"].tolist())):
        assert all(v == pytest.approx(want, rel=1e-12) for v in mine.values()), (e, sorted(set(mine.values())), want)


def assert_simmim_run_lrs(cfg, fixture, run="run"):
    """Every parameter's lr at the recorded updates (the published groups' columns, by the parameter's scale)."""
    ref = fixture["simmim"][run]
    column = {n: ref["lr_scales"].index(g["lr_scale"]) for n, g in fixture["simmim"]["steps"]["groups"].items()}
    ours = run_lrs(cfg, ref["updates_per_epoch"], ref["iterations"].tolist())
    for row, (g, mine) in enumerate(zip(ref["iterations"].tolist(), ours)):
        for name, col in column.items():
            want = ref["lrs"][row, col].item()
            assert mine[name] == pytest.approx(want, rel=1e-12), (g, name, mine[name], want)


# ------------------------------------------------------------------------------------------------ DeiT
def test_deit_steps_are_the_published_ones(fixture):
    assert_steps(run_steps(tiny_config("deit"), fixture, "deit"), fixture["deit"]["steps"])


def test_deit_run_lr_and_drop_ratio_are_the_published_ones(fixture):
    ref = fixture["deit"]["run"]
    cfg = tiny_config("deit")
    assert entry.updates_per_epoch(cfg, IMAGENET_TRAIN, cfg.nproc) == ref["updates_per_epoch"] == 1251
    assert cfg.epochs == ref["epochs"] and cfg.pss.cooldown_epochs == fixture["deit"]["table"]["cooldown_epochs"]
    assert_deit_run_lrs(cfg, ref)
    assert drop_ratios(cfg, ref["updates_per_epoch"], ref["iterations"].tolist()) == ref["drop_ratio"].tolist()


def test_deit_timm_scheduler_stepping_breaks_the_published_lr(fixture):
    with pytest.raises(AssertionError):
        assert_deit_run_lrs(tiny_config("deit", "--sched_step", "timm"), fixture["deit"]["run"])


# ------------------------------------------------------------------------------------------------ SimMIM
def test_simmim_steps_are_the_published_ones(fixture):
    assert_steps(run_steps(tiny_config("simmim"), fixture, "simmim"), fixture["simmim"]["steps"])


def test_setting_the_ratio_before_the_update_breaks_the_published_simmim_steps(fixture):
    with pytest.raises(AssertionError):
        assert_steps(run_steps(tiny_config("simmim", "--pss.ratio_timing", "before"), fixture, "simmim"),
                     fixture["simmim"]["steps"])


@pytest.mark.parametrize("table", sorted(SIMMIM_RUNS))
def test_simmim_run_lr_is_the_published_one(fixture, table):
    cfg = tiny_config(table)
    ref = fixture["simmim"][SIMMIM_RUNS[table]]
    assert cfg.pss.sampler == ref["sampler"]
    assert entry.updates_per_epoch(cfg, IMAGENET_TRAIN, cfg.nproc) == ref["updates_per_epoch"] == 2502
    assert cfg.epochs == ref["epochs"]
    assert_simmim_run_lrs(cfg, fixture, SIMMIM_RUNS[table])


@pytest.mark.parametrize("flip", [("--layer_decay_bounds", "scaled"), ("--sched_step", "iteration"),
                                  ("--sched_step", "timm")])
def test_simmim_lr_options_break_the_published_lr(fixture, flip):
    with pytest.raises(AssertionError):
        assert_simmim_run_lrs(tiny_config("simmim", *flip), fixture)


@pytest.mark.parametrize("table", sorted(SIMMIM_RUNS))
def test_simmim_run_drop_ratio_is_the_published_one(fixture, table):
    """The published SimMIM loop sets the ratio after each update (``set_patch_drop_ratio(get_patch_drop_ratio());
    step()``), so update g trains at the schedule's ratio of g - 1 and update 0 on all patches: the SimMIM table
    configs' ``pss.ratio_timing: after``. Set before each update instead (``before``, the DeiT loop's timing), the
    two differ at 801 of the run's 250,200 updates (one 0.2 level each)."""
    ref = fixture["simmim"][SIMMIM_RUNS[table]]
    its, want = ref["iterations"].tolist(), ref["drop_ratio"].tolist()
    assert its[0] == 0 and want[0] == 0.0
    assert drop_ratios(tiny_config(table), ref["updates_per_epoch"], its) == want
    assert drop_ratios(tiny_config(table, "--pss.ratio_timing", "before"), ref["updates_per_epoch"], its) != want


# ------------------------------------------------------------------------------------------------ both
@pytest.mark.parametrize("which", ["deit", "simmim"])
def test_random_sampling_draws_the_published_patches(fixture, which):
    """Random sampling from the same generator state: the published ``argsort(torch.rand)`` order, and the logits
    (each published model has its own copy of the sampling code)."""
    ref = fixture[which]["random"]
    s = fixture[which]["steps"]
    cfg = tiny_config(which, "--pss.sampler", "random")
    init = {k: v.float() if v.is_floating_point() else v for k, v in s["init"].items()}
    model = steps.table_model(cfg, s["num_classes"], init).train()
    sampler = find_sampler(model)
    sampler.set_drop_ratio(ref["drop_ratio"])
    torch.manual_seed(ref["seed"])
    logits = model(fixture["images"][: s["batch_size"]].float())
    assert torch.equal(sampler.kept_index, ref["positions"])
    steps.assert_close(logits, ref["logits"], what="logits")


@pytest.mark.parametrize("which", ["deit", "simmim"])
def test_exempting_the_bias_tables_breaks_the_published_groups(fixture, which):
    cfg = tiny_config(which, model_kwargs="rel_pos_bias_decay: false")
    model = steps.table_model(cfg, 10)
    groups = fixture[which]["steps"]["groups"]
    with pytest.raises(AssertionError):
        steps.assert_groups(steps.parameter_groups(cfg, model, entry.scaled_lr(cfg, cfg.nproc)), groups)
