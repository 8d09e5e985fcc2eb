"""Whole training steps, the whole run and the example swaps of Tri-Level E-ViT against the published code (issue 19).

``tests/fixtures/trilevel_step.pt`` (``$TRILEVEL_STEP_REFERENCE`` replaces it) was written by
``tests/fixtures/generate_trilevel.py`` from ZLKong/Tri-Level-ViT's DeiT code (its ``main.main`` with the README's
DeiT-T command; see ``tests/fixtures/README.md``). Here the same runs go through this project's config
(``configs/deit_t_trilevel.yaml``, ``deit_s_trilevel.yaml``), model factory, optimizer, scheduler, criterion, mixup,
Tri-Level method and engine:

* three optimizer steps of a tiny DeiT (width 64, 10 blocks for the pruning sites 3 / 6 / 9, 32 px, patch 8) at
  epoch 90 (keep ratio 0.91, attention ratio 0.19): parameter groups, ratios, soft targets, kept patches and
  connection masks of every pruning block, logits, loss, every gradient of the first step and every parameter after
  the third, lr of every step, and the presentations the example level records; one training forward at the warm-up
  ratios (1, 1), where the published model still reorders the patches and runs its masked attention;
* each table config's whole run (300 epochs, 4 x 512): lr of every epoch, updates per epoch, and both ratios at the
  first, second, middle and last update of every epoch;
* the example level on each of the 4 processes at ImageNet's size: the initial split, then the swaps on a fixed
  presentation stream (96 examples per 30-epoch window, ``remove_n`` 12 in place of the table's 64058, which would
  remove every presented one): the ranking, the pool as shuffled, the removed and restored examples, the training
  list after each; and the order numpy's quicksort gives tied forgetting counts;
* each documented option that leaves the published behaviour (``sched_step: timm``, ``amp: bf16``,
  ``trilevel.dense_warmup``, ``trilevel.sync: global``, ``trilevel.sort_kind: stable``) breaks its comparison.

The published runs use fp16 autocast on GPUs; on the CPU both sides run in float32 (``--amp none`` here; the published
``torch.cuda.amp`` is off without CUDA).
"""
from __future__ import annotations

import hashlib
from unittest import mock

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import main as entry
import trilevel.method as tm
from datasets import RASampler
from devices import resolve_amp
from engine import train_one_epoch
from logger import RunLogger
from methods import Clock, ExampleBatch, MethodSet
from models.tokens import token_positions
from tests import compact, steps
from trilevel.examples import ExampleSelector
from trilevel.patch import find_trilevel

FIXTURE, ENV = "trilevel_step.pt", "TRILEVEL_STEP_REFERENCE"
CONFIG = "deit_t_trilevel.yaml"
CPU = torch.device("cpu")
IMAGENET_TRAIN = 1_281_167
# every parameter moves by ~3 lr (4e-5) in the 3 updates, 5e-4 of the largest weights: the 1e-5 bound on the
# parameters alone would let 2 % of an update go wrong, so the updates themselves are held to this bound too
# (observed 3e-4; the fixture stores them to 1.2e-4), all but the key third of each qkv bias (see key_bias)
UPDATE_BOUND = 1e-3
KEY_BIAS_SHARE = 0.05
# swaps compared per process (the fixture holds all five of each): every swap costs ~0.75 s at ImageNet's size (numpy
# 2.x's hash-based np.unique inside the published np.setdiff1d), so processes 1-3 stop after their first two (their
# own seeds for the split, the pool draws and the reset statistics) to keep this file under 20 s
SWAPS_CHECKED = {0: 5, 1: 2, 2: 2, 3: 2}


@pytest.fixture(scope="module")
def ref():
    return steps.step_reference(FIXTURE, ENV)


def tiny_config(step, *overrides: str):
    """``deit_t_trilevel.yaml`` at the fixture's tiny size and batch, on the CPU in float32, drop path 0 (timm 0.4.5
    and timm 1.x draw drop path differently)."""
    kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in step["model_kwargs"].items()) + "}"
    return steps.table_config(CONFIG, "--amp", "none", "--model_kwargs", kwargs, "--input_size",
                              str(step["input_size"]), "--batch_size", str(step["batch_size"]), "--drop_path", "0",
                              *overrides)


def tiny_images(step):
    """The fixture's batches, drawn again from its seed (the fixture keeps their SHA-256)."""
    gen = torch.Generator().manual_seed(step["seed"])
    size, n = step["input_size"], step["steps"] * step["batch_size"]
    images = torch.randn(n, 3, size, size, generator=gen).half().float()
    assert hashlib.sha256(images.numpy().tobytes()).hexdigest() == step["images_sha256"], "the images differ"
    return images


def tiny_model(cfg, step):
    """The tiny model from the published initial weights, its Tri-Level method attached."""
    init = compact.seeded_state([(n, tuple(s)) for n, s in step["init"]["shapes"]], step["init"]["seed"])
    model = steps.table_model(cfg, step["num_classes"], init)
    methods = MethodSet.from_config(cfg)
    methods.attach([model])
    return model, methods, init


def watch_sites(model, sites, log):
    """After every forward: the patches each pruning block kept (0-based among its input's patches) and the
    connection mask it made (all ones where ours keeps none)."""
    positions, state = token_positions(model), find_trilevel(model)

    def hook(m, i, o):
        for b in sites:
            index, mask = positions.sites.get(b + 0.5), state.masks.get(b)
            log["kept"].setdefault(b, []).append(None if index is None else index[:, 1:] - 1)
            if b in state.masks and mask is None:        # all ones: ours skips the product with it
                mask = torch.ones(o.shape[0], index.shape[1], index.shape[1])
            log["masks"].setdefault(b, []).append(None if mask is None else mask.bool())
    return model.register_forward_hook(hook)


def train_steps(cfg, step):
    """The fixture's steps through this project's optimizer, scheduler, criterion, mixup, method and engine."""
    model, methods, init = tiny_model(cfg, step)
    trilevel = methods.methods[0]
    trilevel.train_indices(step["epoch"], IMAGENET_TRAIN)         # the example level records from here
    optimizer = entry.create_optimizer(cfg, model, entry.scaled_lr(cfg, step["world_size"]))
    scheduler = entry.build_scheduler(cfg, optimizer, 1)
    scheduler.step(entry.lr_epoch(cfg, step["epoch"]))
    criterion, mixup_fn = entry.build_criterion(cfg, step["num_classes"], CPU)
    got = {"logits": [], "loss": [], "ratios": [], "mixed_targets": [], "lr": [], "grads": None, "kept": {},
           "masks": {}, "groups": steps.parameter_groups(cfg, model)}

    def mix(x, t):
        x, t = mixup_fn(x, t)
        got["mixed_targets"].append(t.clone())
        return x, t

    def before_step(opt, *_):
        got["lr"].append(opt.param_groups[0]["lr"])
        if got["grads"] is None:
            got["grads"] = steps.gradients(model)

    model.register_forward_pre_hook(lambda m, i: got["ratios"].append(list(trilevel.ratios)))
    model.register_forward_hook(lambda m, i, o: got["logits"].append(o.detach().clone()))
    watch_sites(model, step["sites"], got)
    criterion.register_forward_hook(lambda m, i, o: got["loss"].append(o.detach().clone()))
    optimizer.register_step_pre_hook(before_step)
    loader = DataLoader(TensorDataset(tiny_images(step), step["labels"], step["ids"]), batch_size=step["batch_size"],
                        shuffle=False)
    torch.manual_seed(step["seed"])
    np.random.seed(step["seed"])
    methods.on_epoch(Clock(step["epoch"], 0, 0, len(loader), cfg.total_epochs()))
    train_one_epoch(model, criterion, loader, optimizer, CPU, step["epoch"], cfg.total_epochs(),
                    RunLogger(enabled=False), amp_dtype=resolve_amp(cfg.amp, CPU), mixup_fn=mix,
                    clip_grad=cfg.clip_grad, methods=methods)
    for key in ("logits", "loss", "mixed_targets"):
        got[key] = torch.stack(got[key])
    got["lr"] = torch.tensor(got["lr"], dtype=torch.float64)
    got["ratios"] = torch.tensor(got["ratios"], dtype=torch.float64)
    got["params"] = steps.parameters(model, [n for n, _ in step["init"]["shapes"]])
    got["init"] = init
    got["presented"] = trilevel.selector.export_stats()
    return got


def assert_sites(got, step, what: str) -> None:
    for b in step["sites"]:
        kept = got["kept"][b]
        assert all(k is not None for k in kept), f"{what}: no patches kept at block {b}"
        assert all(m is not None for m in got["masks"][b]), f"{what}: no connection mask made at block {b}"
        assert torch.equal(torch.stack(kept), step["kept"][b]), f"{what}: kept patches differ at block {b}"
        assert torch.equal(torch.stack(got["masks"][b]), step["masks"][b]), f"{what}: masks differ at block {b}"


def assert_steps(got, step) -> None:
    steps.assert_groups(got["groups"], step["param_groups"])
    assert torch.equal(got["lr"], step["lr"]), f"lr differs: {got['lr'].tolist()} vs {step['lr'].tolist()}"
    assert torch.equal(got["ratios"], step["ratios"]), f"ratios differ: {got['ratios']} vs {step['ratios']}"
    steps.assert_close(got["mixed_targets"], step["mixed_targets"], 1e-6, "soft targets")
    steps.assert_close(got["logits"], step["logits"], 1e-5, "logits")
    steps.assert_close(got["loss"], step["loss"], 1e-5, "loss")
    assert_sites(got, step, "steps")
    steps.assert_all_close(got["grads"], compact.unpack_all(step["grads"]), 1e-5, "gradients of step 1")
    init = got["init"]
    updates = compact.unpack_all(step["updates"])
    steps.assert_all_close(got["params"], {k: init[k] + u for k, u in updates.items()}, 1e-5,
                           f"parameters after {step['steps']} steps")
    ours, theirs = steps.split_key_bias({k: v - init[k] for k, v in got["params"].items()}), steps.split_key_bias(updates)
    steps.assert_all_close(ours[0], theirs[0], UPDATE_BOUND, "updates")
    for name, key in theirs[1].items():
        scale = updates[name].abs().max()
        assert key.abs().max() <= KEY_BIAS_SHARE * scale and ours[1][name].abs().max() <= KEY_BIAS_SHARE * scale, name
    # the example level records what the published engine wrote: the examples in order, correct or not
    presented = got["presented"]
    assert torch.equal(presented["ids"].long(), step["presented"]["ids"]), "presented examples differ"
    correct = np.unpackbits(presented["correct_bits"].numpy(), axis=1, bitorder="little")[:, 0].astype(bool)
    assert (presented["presentations"] == 1).all() and np.array_equal(correct, step["presented"]["correct"].numpy())


def test_three_steps_equal_the_published_run(ref):
    step = ref["step"]
    assert (step["ratios"] < 1).all()                                    # pruning and masking active
    assert [k.shape[-1] for k in step["kept"].values()] == [15, 14, 13]
    assert_steps(train_steps(tiny_config(step), step), step)


def warmup_forward(cfg, step):
    """One training forward of the first batch at epoch 0 (ratios 1, 1)."""
    model, methods, _ = tiny_model(cfg, step)
    methods.on_epoch(Clock(0, 0, 0, step["steps"], cfg.total_epochs()))
    methods.on_step(Clock(0, 0, 0, step["steps"], cfg.total_epochs()))
    got = {"kept": {}, "masks": {}}
    watch_sites(model, step["sites"], got)
    model.train()
    with torch.no_grad():
        logits = model(tiny_images(step)[:step["batch_size"]])
    return methods.methods[0].ratios, logits, got


def assert_warmup(cfg, step) -> None:
    warm = step["warmup"]
    ratios, logits, got = warmup_forward(cfg, step)
    assert list(ratios) == warm["ratios"] == [1.0, 1.0]
    steps.assert_close(logits, warm["logits"], 1e-5, "warm-up logits")
    for b in step["sites"]:
        assert got["kept"][b][0] is not None, f"warm-up: no patch order recorded at block {b}"
        assert torch.equal(got["kept"][b][0], warm["kept"][b]), f"warm-up: patch order differs at block {b}"


def test_warmup_forward_reorders_the_patches_as_published(ref):
    step = ref["step"]
    assert any(not torch.equal(k, torch.arange(k.shape[-1]).expand_as(k)) for k in step["warmup"]["kept"].values())
    assert_warmup(tiny_config(step), step)


def test_dense_warmup_leaves_the_published_warmup(ref):
    step = ref["step"]
    with pytest.raises(AssertionError, match="no patch order"):
        assert_warmup(tiny_config(step, "--trilevel.dense_warmup", "true"), step)


@pytest.mark.parametrize("flip", [("--amp", "bf16"), ("--sched_step", "timm")], ids=lambda f: " ".join(f))
def test_deviating_options_leave_the_published_step(ref, flip):
    step = ref["step"]
    with pytest.raises(AssertionError, match="logits|lr differs"):
        assert_steps(train_steps(tiny_config(step, *flip), step), step)


# ------------------------------------------------------------------------------------------------ whole runs
def run_record(cfg):
    """Per epoch: the lr, the updates per epoch (our repeated-augmentation sampler over process 0's subset, as
    ``main.py`` wires it) and both ratios at the epoch's first, second, middle and last update."""
    methods = MethodSet.from_config(cfg)
    trilevel = methods.methods[0]
    sampler = RASampler(range(IMAGENET_TRAIN), cfg.nproc, 0, repeats=cfg.ra_repeats)
    sampler.set_indices(trilevel.train_indices(0, IMAGENET_TRAIN))
    updates = len(sampler) // cfg.batch_size
    lr = run_lrs(cfg)
    ratios = []
    for epoch in range(cfg.total_epochs()):
        row = []
        for it in (0, 1, updates // 2, updates - 1):
            trilevel.on_step(Clock(epoch, it, epoch * updates + it, updates, cfg.total_epochs()))
            row.append(trilevel.ratios)
        ratios.append(row)
    ratios = torch.tensor(ratios, dtype=torch.float64)
    return {"updates": updates, "lr": lr, "keep_ratio": ratios[..., 0], "attn_ratio": ratios[..., 1]}


def run_lrs(cfg):
    """The lr of every epoch: this project's optimizer and scheduler for the launch's 4 processes."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=entry.scaled_lr(cfg, cfg.nproc))
    scheduler = entry.build_scheduler(cfg, optimizer, 1)
    out = []
    for epoch in range(cfg.total_epochs()):
        scheduler.step(entry.lr_epoch(cfg, epoch))
        out.append(optimizer.param_groups[0]["lr"])
    return torch.tensor(out, dtype=torch.float64)


def assert_run(got, run) -> None:
    assert (run["updates"] == got["updates"]).all(), (got["updates"], run["updates"].unique())
    bad = (got["lr"] != run["lr"]).nonzero().flatten().tolist()
    assert not bad, f"lr differs at epochs {bad[:5]}: {got['lr'][bad[:5]].tolist()} vs {run['lr'][bad[:5]].tolist()}"
    for key in ("keep_ratio", "attn_ratio"):
        bad = (got[key] != run[key]).any(dim=1).nonzero().flatten().tolist()
        assert not bad, f"{key} differs at epochs {bad[:5]}"


@pytest.mark.parametrize("config", ["deit_t_trilevel", "deit_s_trilevel"])
def test_whole_run_lr_updates_and_ratios_equal_the_published_loop(ref, config):
    run = ref["runs"][config][0]
    if run.get("same_as"):                    # the DeiT-T command with the DeiT-S model: the generator checked that
        run = ref["runs"][run["same_as"]][0]  # its schedule equals DeiT-T's and kept one copy
    cfg = steps.table_config(f"{config}.yaml")
    assert (cfg.nproc, cfg.total_epochs()) == (run["world_size"], run["epochs"])
    # first, last and boundary epochs (warm-up end, cosine end, the swaps): the whole run is compared below
    assert run["keep_ratio"][[0, 9, 110, 299]].tolist() == [[1.0] * 4, [1.0] * 4, [0.9] * 4, [0.9] * 4]
    assert run["keep_ratio"][10, 0] == 1.0 and 0.9 < run["keep_ratio"][10, 3] < 1.0
    assert (run["subset"] == IMAGENET_TRAIN - int(IMAGENET_TRAIN * 0.2)).all()
    assert run["iterations"] == [0, 1, "middle", "last"]
    assert_run(run_record(cfg), run)


def test_timm_scheduler_stepping_leaves_the_published_lr(ref):
    run = ref["runs"]["deit_t_trilevel"][0]
    with pytest.raises(AssertionError, match="lr differs"):
        assert_run(run_record(steps.table_config(CONFIG, "--sched_step", "timm")), run)


# ------------------------------------------------------------------------------------------------ the example level
def ids_fingerprint(ids) -> dict:
    a = np.asarray(ids, dtype="<i8")
    return {"size": int(a.size), "head": a[:8].tolist(), "sha256": hashlib.sha256(a.tobytes()).hexdigest()}


def assert_ids(ours, theirs, what: str) -> None:
    """An index list equals the published one exactly (its length, order and every entry, by SHA-256)."""
    got = ids_fingerprint(ours)
    want = {"size": theirs["size"], "head": theirs["head"].tolist(), "sha256": theirs["sha256"]}
    assert got == want, f"{what} differs: {got} vs {want}"


def presentations(stream, width: int):
    """A stream's presentations in rounds (as the generator fed the published statistics): round ``j`` presents every
    example with more than ``j`` presentations, in order of first presentation; yields ``(ids, correct)``."""
    ids = stream["ids"].numpy().astype(np.int64)
    counts = stream["counts"].numpy().astype(np.int64)
    bits = np.unpackbits(stream["bits"].numpy(), axis=1, bitorder="little")[:, :width].astype(bool)
    for j in range(int(counts.max())):
        live = counts > j
        yield ids[live], bits[live, j]


def observed(ids, correct) -> ExampleBatch:
    """A training step's outputs in which exactly the ``correct`` examples are classified as their label (0)."""
    logits = torch.zeros(len(ids), 2)
    logits[torch.from_numpy(~correct), 1] = 1.0
    logits[torch.from_numpy(correct), 0] = 1.0
    labels = torch.zeros(len(ids), dtype=torch.long)
    return ExampleBatch(torch.from_numpy(ids), logits, labels, labels)


def assert_swaps(cfg, ranks, only=None) -> None:
    """Each process's example level, as the published per-process ``main.py`` ran it: the initial split of every
    process, then, for process ``only`` (all: ``None``), the window streams and the swaps (ranking, the pool in the
    order it is shuffled, removed and restored examples, the new training list): the first ``SWAPS_CHECKED[rank]``."""
    methods = {}
    for run in ranks:                     # every process's subset before anything is presented
        rank = run["rank"]
        with mock.patch.object(tm, "_dist", return_value=(rank, run["world_size"])):
            method = tm.TriLevel(cfg.trilevel, cfg)
            assert_ids(method.train_indices(0, IMAGENET_TRAIN), run["split"], f"rank {rank}: the initial split")
        methods[rank] = method
    for run in ranks if only is None else [ranks[only]]:
        rank, method, n = run["rank"], methods[run["rank"]], run["remove_n"]
        assert method.swap_epochs() == [s["epoch"] for s in run["swaps"]] == [30, 60, 90, 120, 150]
        with mock.patch.object(tm, "_dist", return_value=(rank, run["world_size"])):
            for window, swap in list(zip(run["windows"], run["swaps"]))[:SWAPS_CHECKED[rank]]:
                method.on_epoch(Clock(window["epoch"], 0, 0, 500, cfg.epochs))
                for ids, correct in presentations(window, cfg.trilevel.npresentations + 6):
                    method.observe(observed(ids, correct))
                ranked, counts = method.selector.ordered()
                what = f"rank {rank}, swap at epoch {swap['epoch']}"
                assert counts[:2 * n].tolist() == swap["ranking_counts"].tolist(), f"{what}: forgetting counts"
                assert ranked[:n].tolist() == swap["ranking"][:n].tolist(), f"{what}: ranking"
                assert_ids(method.selector.pool_ids, swap["pool"], f"{what}: the pool it shuffles")
                subset = method.train_indices(swap["epoch"], IMAGENET_TRAIN)
                done = method.swap_this_epoch
                assert done is not None and done.epoch == swap["epoch"], f"{what}: no swap"
                assert done.removed.tolist() == swap["removed"].tolist(), f"{what}: removed examples"
                assert done.restored.tolist() == swap["restored"].tolist(), f"{what}: restored examples"
                assert_ids(subset, swap["train"], f"{what}: the training list")
            if SWAPS_CHECKED[rank] == len(run["swaps"]):
                assert not method.selector.should_swap(180) and method.selector.swaps_done == 5


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_example_swaps_of_every_process_equal_the_published_ones(ref, rank):
    """Every swap at ImageNet's size (the published split is hard-coded to 1,281,167 images) on a scaled stream:
    96 examples per window, ``remove_n`` 12 (the table's 64058 would remove every presented one)."""
    ranks = ref["runs"]["deit_t_trilevel"]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    cfg = steps.table_config(CONFIG, "--trilevel.remove_n", str(ranks[0]["remove_n"]))
    assert_swaps(cfg, ranks, rank)


def test_one_global_subset_leaves_the_published_split(ref):
    ranks = ref["runs"]["deit_t_trilevel"]
    cfg = steps.table_config(CONFIG, "--trilevel.remove_n", str(ranks[0]["remove_n"]), "--trilevel.sync", "global")
    with pytest.raises(AssertionError, match="rank 1: the initial split differs"):
        assert_swaps(cfg, ranks)


def probe_order(cfg, probe):
    """``(ids, counts)`` in removal order for the tie probe, from the config's example level."""
    ids = probe["ids"].numpy().astype(np.int64)
    selector = ExampleSelector(tm.TriLevel(cfg.trilevel, cfg).level, ids, [], num_examples=int(ids.max()) + 1)
    for batch_ids, correct in presentations(probe, 12):
        selector.record(batch_ids, correct)
    return selector.ordered()


def published_probe_order(probe) -> np.ndarray:
    """The published ranking of the tie probe. numpy's quicksort orders ties by its own algorithm, which depends on
    the machine (its SIMD sorts); where this machine's numpy orders the published counts differently from the
    generator's, the expected order is the published statement (``np.array(ids)[np.argsort(counts)]``) here."""
    ids = probe["ids"].numpy()
    count = dict(zip(probe["ordered"].tolist(), probe["values"].tolist()))
    here = ids[np.argsort(np.array([count[i] for i in ids.tolist()]))]
    if not np.array_equal(here, probe["ordered"].numpy()):
        print("tie probe: this machine's numpy quicksort orders the ties differently from the fixture's; comparing "
              "with the published statement run here")
    return here


def test_tied_forgetting_counts_rank_as_numpys_quicksort(ref):
    probe = ref["tie_probe"]
    ranked, counts = probe_order(steps.table_config(CONFIG), probe)
    assert counts.tolist() == probe["values"].tolist()
    assert ranked.tolist() == published_probe_order(probe).tolist()


def test_stable_ranking_leaves_the_published_tie_order(ref):
    probe = ref["tie_probe"]
    ranked, counts = probe_order(steps.table_config(CONFIG, "--trilevel.sort_kind", "stable"), probe)
    assert counts.tolist() == probe["values"].tolist()
    assert ranked.tolist() != published_probe_order(probe).tolist()
