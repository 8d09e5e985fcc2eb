"""Whole training steps and the whole run of ToE on LV-ViT with token labeling and MixToken against the published code
(issue 19).

``tests/fixtures/lvvit_step.pt`` (``$LVVIT_STEP_REFERENCE`` replaces it) was written by
``tests/fixtures/generate_lvvit.py`` from Osilly/TokenExpansion's ``ToE/lvvit`` (the TokenLabeling code base with
ToE; see ``tests/fixtures/README.md``). Here the same data and steps go through this project's config
(``configs/lvvit_s_toe.yaml`` at a tiny size), dataset, token-label targets, model factory, optimizer, scheduler,
criterion and engine:

* eight images with their label maps through the training dataset, each with the published draws (flip,
  RandAugment's generator states, crop, interpolation): images, transformed label maps, crops, and the dense and
  class targets of the batch;
* three optimizer steps of a tiny LV-ViT-S (width 64, 2 blocks, 16 px, patch 2: 8x8 tokens) at epochs 0, 100 and
  200 (ToE stages 1, 2, 3) with the published MixToken boxes and drop-path draws: parameter groups, lr, the tokens
  ToE keeps, logits of the class token and of every patch token, loss, every gradient of the first step, every
  parameter (and the stem's batch-norm statistics) after the third;
* the table config's whole run (310 epochs, 4 x 256): lr of every update, updates per epoch, ToE's stage and tokens;
* each documented option that leaves the published behaviour breaks the comparison it should.

The published run uses apex fp16 on GPUs; here both sides run in float32 on the CPU (``--amp none``). Random erasing
is drawn by the published prefetcher on the whole batch: the steps train on the published (erased) batch, the
dataset comparison runs without erasing (``--reprob 0``).
"""
from __future__ import annotations

import contextlib
import os
import random
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, RandomResizedCrop

import main as entry
import models.lvvit as lvvit
import token_labels as tl
from datasets import build_dataset
from engine import train_one_epoch
from logger import RunLogger
from methods import Clock, MethodSet
from tests import compact, steps

FIXTURE, ENV = "lvvit_step.pt", "LVVIT_STEP_REFERENCE"
CPU = torch.device("cpu")
IMAGENET_TRAIN = 1_281_167
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def ref():
    return steps.step_reference(FIXTURE, ENV)


@pytest.fixture(scope="module")
def tree(ref, tmp_path_factory):
    """The fixture's images as an ImageFolder and their label maps as a packed store."""
    root = tmp_path_factory.mktemp("lvvit_data")
    data = ref["data"]
    keys = [s["path"] for s in data["samples"]]
    for key, img in zip(keys, data["images"]):
        os.makedirs(root / "train" / os.path.dirname(key), exist_ok=True)
        Image.fromarray(img.numpy()).save(root / "train" / key)
    scores, indices = torch.stack(data["scores"]), torch.stack(data["indices"])
    tl.LabelStoreWriter(str(root / "labels"), keys, *scores.shape[1:], ref["num_classes"]).write(
        range(len(keys)), scores.numpy(), indices.numpy())
    return root


def tiny_config(ref, tree, *overrides: str):
    """``lvvit_s_toe.yaml`` at the fixture's tiny size, on the CPU in float32, reading the fixture's data."""
    t = ref["tiny"]
    kwargs = "{" + ", ".join(f"{k}: {t[k]}" for k in ("embed_dim", "depth", "num_heads", "patch_size")) + "}"
    return steps.table_config(ref["config"], "--amp", "none", "--model_kwargs", kwargs, "--input_size",
                              str(t["img_size"]), "--token_label.size", str(ref["token_grid"]), "--data_path",
                              str(tree), "--token_label.data", str(tree / "labels"), "--num_workers", "0", *overrides)


# ------------------------------------------------------------------------------------------------ the data
@contextlib.contextmanager
def published_draws(ds, sample):
    """Make the dataset draw what the published pipeline drew for ``sample``: the flip, RandAugment's generator
    states (its op choice, probabilities, magnitudes and signs follow from them), the crop and the interpolation."""
    np_state = sample["np_state"]
    py_state = sample["py_state"]
    joint = ds.joint_transform

    def replay(img, scores, indices):
        np.random.set_state(("MT19937", np_state["keys"].numpy().view(np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["cached_gaussian"]))
        words = tuple(int(w) for w in py_state["words"].numpy().view(np.uint32)) + (py_state["index"],)
        random.setstate((py_state["version"], words, py_state["gauss_next"]))
        return joint(img, scores, indices)
    flip = torch.tensor(0.0 if sample["flip"] else 1.0)          # the dataset flips when rand() < hflip (0.5)
    mode = InterpolationMode.BICUBIC if sample["interpolation"] == "bicubic" else InterpolationMode.BILINEAR
    with mock.patch.object(torch, "rand", lambda *a, **k: flip.clone()), \
            mock.patch.object(RandomResizedCrop, "get_params", staticmethod(lambda *a: tuple(sample["crop"]))), \
            mock.patch.object(ds, "_interpolation", lambda: mode), \
            mock.patch.object(ds, "joint_transform", replay if joint is not None else None):
        yield


def our_samples(cfg, ref):
    """Every fixture sample through this project's training dataset, with the published draws."""
    ds, num_classes = build_dataset(cfg, is_train=True)
    assert num_classes == ref["num_classes"] and len(ds) == len(ref["data"]["samples"])
    out = []
    for i, sample in enumerate(ref["data"]["samples"]):
        assert ds.keys[i] == sample["path"]
        with published_draws(ds, sample):
            out.append(ds[i])
    return out


def published_crop(sample) -> torch.Tensor:
    """The published prefetcher's normalisation of the uint8 crop: ``(x - 255 mean) / (255 std)``."""
    mean = torch.tensor([m * 255 for m in MEAN]).view(3, 1, 1)
    std = torch.tensor([s * 255 for s in STD]).view(3, 1, 1)
    return (sample["crop_u8"].float() - mean) / std


def assert_samples(ours, ref) -> None:
    for i, ((img, target, label), sample) in enumerate(zip(ours, ref["data"]["samples"])):
        pub = sample["label"]
        assert target == sample["class"], i
        steps.assert_close(img, published_crop(sample), 1e-5, f"image {i} ({sample['ops']})")
        height, width = ref["data"]["images"][i].shape[:2]
        assert label["crop"].tolist() == [*sample["crop"], height, width], i
        assert torch.equal(label["scores"].float(), pub[0]), f"label scores of sample {i} ({sample['ops']})"
        assert torch.equal(label["indices"].float(), pub[1]), f"label indices of sample {i} ({sample['ops']})"


def our_targets(cfg, ref, ours) -> tl.TokenTargets:
    classes = torch.tensor([o[1] for o in ours])
    label = torch.utils.data.default_collate([o[2] for o in ours])
    tlc = cfg.token_label
    return tl.token_label_targets(label, ref["num_classes"], tlc.size, cfg.smoothing, classes, tlc.cls_target,
                                  tlc.box_order, tlc.smoothing_form)


def assert_targets(targets: tl.TokenTargets, ref) -> None:
    pub = ref["batch"]["targets"]                      # [B, K, 2 + N]: ground truth, class token, patch tokens
    steps.assert_close(targets.cls, pub[:, :, 1], 1e-6, "class-token targets")
    steps.assert_close(targets.dense, pub[:, :, 2:].transpose(1, 2), 1e-6, "patch-token targets")


def test_the_draws_cover_flips_and_label_moving_rand_augment(ref):
    samples = ref["data"]["samples"]
    assert {s["flip"] for s in samples} == {True, False}
    assert {s["interpolation"] for s in samples} == {"bilinear", "bicubic"}
    geometric = [s for s in samples if any(op in tl.GEOMETRIC_RAND_OPS for op, _ in s["ops"])]
    assert geometric and any(not torch.equal(s["label"][:2], s["label"][:2].flip(-1)) for s in geometric)


def test_dataset_and_targets_equal_the_published_pipeline(ref, tree):
    cfg = tiny_config(ref, tree, "--reprob", "0")
    ours = our_samples(cfg, ref)
    assert_samples(ours, ref)
    assert_targets(our_targets(cfg, ref, ours), ref)


@pytest.mark.parametrize("mode", ["aligned", "photometric"])
def test_other_rand_augment_modes_leave_the_published_samples(ref, tree, mode):
    cfg = tiny_config(ref, tree, "--reprob", "0", "--token_label.rand_augment", mode)
    with pytest.raises(AssertionError):
        assert_samples(our_samples(cfg, ref), ref)


def test_fixed_box_order_leaves_the_published_targets(ref, tree):
    cfg = tiny_config(ref, tree, "--reprob", "0", "--token_label.box_order", "fixed")
    with pytest.raises(AssertionError):
        assert_targets(our_targets(cfg, ref, our_samples(cfg, ref)), ref)


# ------------------------------------------------------------------------------------------------ the steps
class _Batch(Dataset):
    def __init__(self, images, samples):
        self.images, self.samples = images, samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        _, target, label = self.samples[i]
        return self.images[i], target, label, i


def tiny_model(cfg, ref):
    """The tiny model from the fixture's seeded initial weights (the published model started from the same)."""
    w = ref["weights"]
    state = compact.seeded_state([(n, tuple(s)) for n, s in w["shapes"]], w["seed"])
    model = steps.table_model(cfg, ref["num_classes"], {**state, **w["buffers"]})
    methods = MethodSet.from_config(cfg)
    methods.attach([model])
    return model, methods, state


def train_steps(ref, tree, *overrides: str, count: int = 3):
    """The fixture's three steps through this project's dataset, optimizer, scheduler, criterion and engine; returns
    what the published run recorded, in the same layout."""
    cfg = tiny_config(ref, tree, *overrides)
    samples = our_samples(tiny_config(ref, tree, "--reprob", "0", *overrides), ref)
    model, methods, init = tiny_model(cfg, ref)
    optimizer = entry.create_optimizer(cfg, model, entry.scaled_lr(cfg, cfg.nproc))
    scheduler = entry.build_scheduler(cfg, optimizer, 1)
    criterion, mixup_fn = entry.build_criterion(cfg, ref["num_classes"], CPU)
    assert mixup_fn is None
    got = {"cls": [], "aux": [], "loss": [], "lr": [], "kept": [], "grads": None,
           "groups": steps.parameter_groups(cfg, model)}

    def before_step(opt, *_):
        got["lr"].append(opt.param_groups[0]["lr"])
        if got["grads"] is None:
            got["grads"] = steps.gradients(model)

    def outputs(module, inputs, out):
        got["cls"].append(out[0].detach().clone())
        got["aux"].append(out[1].detach().clone())
        kept = model.toe.kept_index                     # ToE's positions of its last call (None: all tokens)
        got["kept"].append(None if kept is None else kept.clone())

    model.register_forward_hook(outputs)
    criterion.register_forward_hook(lambda m, i, o: got["loss"].append(o.detach().clone()))
    optimizer.register_step_pre_hook(before_step)
    loader = DataLoader(_Batch(ref["batch"]["images"], samples), batch_size=len(samples), shuffle=False,
                        generator=torch.Generator())      # its base seed leaves the global generator alone
    for step in ref["steps"][:count]:
        epoch = step["epoch"]
        scheduler.step(entry.lr_epoch(cfg, epoch))
        methods.on_epoch(Clock(epoch, 0, epoch, 1, cfg.total_epochs()))
        top, left, bottom, right = step["box"][0], step["box"][1], step["box"][2], step["box"][3]
        box = lvvit.MixBox(top, bottom, left, right, ref["token_grid"], ref["token_grid"])
        torch.manual_seed(step["torch_seed"])           # drop path
        with mock.patch.object(lvvit, "sample_mix_box", lambda *a, box=box: box):
            train_one_epoch(model, criterion, loader, optimizer, CPU, epoch, cfg.total_epochs(),
                            RunLogger(enabled=False), clip_grad=cfg.clip_grad, methods=methods)
    got["params"] = steps.parameters(model, [n for n, _ in ref["weights"]["shapes"]])
    got["buffers"] = {n: b for n, b in model.state_dict().items() if n in ref["buffers"]}
    got["init"] = init
    return got


def assert_steps(got, ref) -> None:
    """Everything the published steps recorded; with fewer steps trained, what those steps recorded (lr, logits,
    loss, gradients of step 1)."""
    count = len(got["loss"])
    published = ref["steps"][:count]
    steps.assert_groups(got["groups"], ref["groups"])
    assert got["lr"] == [s["lr"] for s in published], (got["lr"], [s["lr"] for s in published])
    for k, step in enumerate(published):
        if step["kept"] is None:
            assert got["kept"][k] is None, f"step {k + 1} kept {got['kept'][k].shape[1]} tokens, the published all"
        else:     # the same tokens (their order in the reduced set changes nothing the next blocks compute)
            assert got["kept"][k] is not None and torch.equal(got["kept"][k].sort(1).values,
                                                              step["kept"].long().sort(1).values), f"kept, step {k + 1}"
        steps.assert_close(got["cls"][k], step["cls"], 1e-5, f"class logits of step {k + 1}")
        steps.assert_close(got["aux"][k], step["aux"], 1e-5, f"patch-token logits of step {k + 1}")
        steps.assert_close(got["loss"][k], torch.tensor(step["loss"]), 1e-5, f"loss of step {k + 1}")
    steps.assert_all_close(got["grads"], compact.unpack_all(ref["grads"]), 1e-5, "gradients of step 1")
    if count < len(ref["steps"]):
        return
    steps.assert_all_close(got["params"], compact.unpack_all(ref["params"], got["init"]), 1e-5,
                           f"parameters after {count} steps")
    steps.assert_all_close({n: b.float() for n, b in got["buffers"].items()},
                           {n: b.float() for n, b in ref["buffers"].items()}, 1e-5, "batch-norm statistics")


def test_three_steps_equal_the_published_run(ref, tree):
    assert [s["stage"] for s in ref["steps"]] == [1, 2, 3]
    assert all(0 < (s["box"][2] - s["box"][0]) * (s["box"][3] - s["box"][1]) < ref["token_grid"] ** 2
               for s in ref["steps"])                   # every step mixes a part of the grid
    assert_steps(train_steps(ref, tree), ref)


FLIPS = {          # each switches one documented departure from the published code on
    "smoothing normalized": ("--token_label.smoothing_form", "normalized"),
    "cls target ground truth": ("--token_label.cls_target", "ground_truth"),
    "cls target corrected": ("--token_label.cls_target", "corrected"),
    "toe init random": ("--toe.init", "random"),
    "toe expansion random": ("--toe.expansion", "random"),
    "toe expansion none": ("--toe.expansion", "none"),
    "toe merge drop": ("--toe.merge", "drop"),
}


@pytest.mark.parametrize("flip", sorted(FLIPS))
def test_departures_leave_the_published_step(ref, tree, flip):
    """The first step (ToE stage 1) already tells them apart: lr, logits, loss, gradients."""
    with pytest.raises(AssertionError):
        assert_steps(train_steps(ref, tree, *FLIPS[flip], count=1), ref)


def test_normalized_smoothing_leaves_the_published_targets(ref, tree):
    cfg = tiny_config(ref, tree, "--reprob", "0", "--token_label.smoothing_form", "normalized")
    with pytest.raises(AssertionError):
        assert_targets(our_targets(cfg, ref, our_samples(cfg, ref)), ref)


# ------------------------------------------------------------------------------------------------ the whole run
def run_record(cfg, images: int = IMAGENET_TRAIN):
    """Updates per epoch, the lr of the first and last update of every epoch (``main.lr_setter``'s rule where the lr
    is set per update) and ToE's state per epoch, from this project's pieces as ``main.train`` uses them, at the
    recipe's process count."""
    from datasets import ShuffleSampler
    methods = MethodSet.from_config(cfg)
    model = steps.table_model(cfg, 1000)
    methods.attach([model])
    optimizer = entry.create_optimizer(cfg, model, entry.scaled_lr(cfg, cfg.nproc))
    s = entry.settings_at(cfg, methods, 0)
    sampler = ShuffleSampler(range(images), cfg.nproc, 0)
    updates = entry.epoch_iterations(cfg, s, len(sampler) // s.batch_size, images, cfg.nproc)[1]
    scheduler = entry.build_scheduler(cfg, optimizer, updates)
    total = cfg.total_epochs()
    lr_first, lr_last, stage, kept = [], [], [], []
    for epoch in range(total):
        scheduler.step(entry.lr_epoch(cfg, epoch))
        setter = (lambda k: scheduler.step_update(entry.lr_update(cfg, epoch, k, updates))) \
            if cfg.sched_step in entry.PER_UPDATE else (lambda k: None)
        for k, out in ((0, lr_first), (updates - 1, lr_last)):
            setter(k)
            assert len({g["lr"] for g in optimizer.param_groups}) == 1
            out.append(optimizer.param_groups[0]["lr"])
        methods.on_epoch(Clock(epoch, 0, epoch * updates, updates, total))
        fields = methods.epoch_fields()
        stage.append(fields["toe_stage"])
        kept.append(fields["toe_kept_tokens"])
    return {"epochs": total, "updates_per_epoch": updates, "lr_first": torch.tensor(lr_first, dtype=torch.float64),
            "lr_last": torch.tensor(lr_last, dtype=torch.float64), "stage": stage, "kept_tokens_224": kept}


def run_config(*overrides: str, config: str = "lvvit_s_toe.yaml"):
    """A table config as launched (224 px, 4 x 256), narrower so that building it is quick (the schedule, the
    updates and the token counts do not depend on the width)."""
    return steps.table_config(config, "--model_kwargs", "{embed_dim: 64, depth: 2, num_heads: 4}", *overrides)


def assert_run(got, run) -> None:
    assert (got["epochs"], got["updates_per_epoch"]) == (run["epochs"], run["updates_per_epoch"])
    for key in ("lr_first", "lr_last"):
        bad = (got[key] != run[key]).nonzero().flatten().tolist()
        assert not bad, f"{key} differs at epochs {bad[:5]}: {got[key][bad[:5]].tolist()} vs {run[key][bad[:5]].tolist()}"
    assert got["stage"] == run["stage"] and got["kept_tokens_224"] == run["kept_tokens_224"]


def test_whole_run_equals_the_published_loop(ref):
    run = ref["run"]
    # the epochs the issue names: first, each stage boundary, the last of the schedule, the cooldown, the last
    edges = [0, 4, 5, 99, 100, 199, 200, 299, 300, run["epochs"] - 1]
    assert run["epochs"] == 310 and run["updates_per_epoch"] == 1251
    assert [run["stage"][e] for e in edges] == [1, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    assert [run["kept_tokens_224"][e] for e in edges] == [78, 78, 78, 78, 136, 136, 196, 196, 196, 196]
    assert run["lr_first"][0].item() == 1e-6 and run["lr_first"][300:].eq(1e-5).all()
    assert torch.equal(run["lr_first"], run["lr_last"])        # one lr per epoch, stepped between epochs
    assert_run(run_record(run_config()), run)


@pytest.mark.parametrize("config", ["lvvit_t_toe.yaml", "lvvit_m_toe.yaml"])
def test_the_other_lvvit_toe_configs_run_the_published_lvvit_s_script(ref, config):
    """The authors publish the LV-ViT-S script only; the T and M configs reuse its schedule and launch."""
    assert_run(run_record(run_config(config=config)), ref["run"])


@pytest.mark.parametrize("flip", [("--sched_step", "published"), ("--cooldown_epochs", "0"),
                                  ("--sched_step", "iteration")])
def test_other_schedules_leave_the_published_run(ref, flip):
    with pytest.raises(AssertionError):
        assert_run(run_record(run_config(*flip)), ref["run"])
