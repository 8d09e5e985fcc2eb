"""Whole-step fixture of EfficientTrain v1 + ToE (issue 19): this project's training against the published code.

``tests/fixtures/et_step.pt`` (``ET_STEP_REFERENCE`` replaces it) was written by ``tests/fixtures/generate_et.py``
running ToE's EfficientTrain fork (``Osilly/TokenExpansion``, ``ToE/EfficientTrain``) unchanged; see
``tests/fixtures/README.md``. Two parts:

* the table configs' whole runs (``deit_t_et_toe.yaml``, ``deit_s_et_toe.yaml``): the five launches of the published
  ``ET_training.py`` against the curriculum's phases, and at the first, last and boundary updates of the 300 epochs
  the lr, the phase's input size, batch, accumulation and RandAugment, the updates per epoch and the ToE stage and
  kept tokens, from this project's config, scheduler, ``epoch_iterations`` and methods;
* a tiny model of ``deit_t_et_toe.yaml`` (the overrides below; curriculum scaled to 15 epochs) trained by this
  project's engine for the fixture's two launches: epoch 11 (phase 4: low-frequency crops, ToE stage 2, 3 updates)
  from the published initial weights, then, with the position embedding and its Adam moments resampled as the
  trainer does at a phase change, epoch 12 (phase 5: full size, accumulation 2, 6 of 7 micro-batches trained). Logits
  and loss of every micro-batch, every gradient of the first update and every parameter after each launch agree
  within 1e-5 (relative, per tensor); lr, tokens, parameter groups, updates and Adam steps exactly.

The mixup/cutmix and drop-path draws are the fixture's: the same seeds are set at the same points of the step
(numpy before mixup, torch between mixup and the forward pass). The published run is float32 on the CPU (its CUDA AMP
is disabled there), so this one runs with ``amp: none``.
"""
from __future__ import annotations

import math
import types
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import checkpoint as ckpt_io
import main as entry
from efficienttrain import low_frequency_crop
from devices import resolve_amp
from engine import train_one_epoch
from logger import RunLogger
from methods import Clock, MethodSet
from models.resize import set_input_size
from tests import steps

FIXTURE, ENV = "et_step.pt", "ET_STEP_REFERENCE"
CONFIG = "deit_t_et_toe.yaml"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ref() -> Dict[str, Any]:
    return steps.step_reference(FIXTURE, ENV)


# ------------------------------------------------------------------------------------------------ the whole runs
def test_table_configs_follow_the_published_launches(ref):
    """Each table config's phases, lr, warm-up, clipping, drop path and ToE flags are the published launches'."""
    for name, run in ref["run"].items():
        cfg = steps.table_config(name)
        et, toe = (next(m for m in MethodSet.from_config(cfg) if m.name == n) for n in ("efficienttrain", "toe"))
        assert [(p.first, p.end, p.input_size, f"rand-m{p.magnitude}-mstd0.5-inc1") for p in et.phases] == \
            [(a["start_epoch"], a["end_epoch"], a["input_size"], a["aa"]) for a in run["launches"]], name
        for a in run["launches"]:
            assert (cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.clip_grad, cfg.drop_path, cfg.epochs) == \
                (a["lr"], a["min_lr"], a["warmup_epochs"], a["clip_grad"], a["drop_path"], run["epochs"]), name
            assert a["use_amp"] and cfg.amp == "fp16", name
            assert (list(toe.section.expansion_steps), list(toe.section.keep_rates), toe.section.init_keep_rate,
                    toe.section.repeat_k) == (a["expansion_step"], a["keep_rate"], a["initialization_keep_rate"],
                                              a["expansion_multiple_stage"]), name
        assert scaled_lr_of(cfg) == run["launches"][0]["lr"]


def scaled_lr_of(cfg) -> float:
    return entry.scaled_lr(cfg, cfg.nproc)


class WholeRun:
    """This project's lr schedule and methods for a table config, queried at any update (a tiny model stands in for
    the table's: only the patch grid matters to the methods' state)."""

    def __init__(self, name: str, run: Dict[str, Any], *overrides: str):
        self.cfg = steps.table_config(name, "--model_kwargs", "{embed_dim: 64, depth: 2, num_heads: 2}", *overrides)
        self.run = run
        self.methods = MethodSet.from_config(self.cfg)
        first = entry.settings_at(self.cfg, self.methods, 0)
        self.model = entry.build_model(self.cfg, 10, self.methods, img_size=first.input_size)
        self.methods.attach([self.model])
        self.optimizer = entry.create_optimizer(self.cfg, self.model, scaled_lr_of(self.cfg))
        self.updates = entry.updates_per_epoch(self.cfg, run["images"], self.cfg.nproc)
        self.scheduler = entry.build_scheduler(self.cfg, self.optimizer, self.updates)
        self.setter = types.SimpleNamespace(cfg=self.cfg, scheduler=self.scheduler, updates_per_epoch=self.updates)

    def at(self, g: int) -> Dict[str, Any]:
        """Our state at global update ``g`` (``updates`` per epoch)."""
        cfg, epoch, k = self.cfg, g // self.updates, g % self.updates
        s = entry.settings_at(cfg, self.methods, epoch)
        set_input_size(self.model, s.input_size, [self.optimizer])
        self.methods.on_epoch(Clock(epoch, k, g, self.updates, cfg.total_epochs()))
        self.scheduler.step(entry.lr_epoch(cfg, epoch))
        set_lr = entry.lr_setter(self.setter, epoch)
        if set_lr is not None:
            set_lr(k)
        loader_batches = math.ceil(self.run["images"] / cfg.nproc) // s.batch_size   # DistributedSampler, drop_last
        fields = self.methods.step_fields()
        return dict(epoch=epoch, lr=self.optimizer.param_groups[0]["lr"], phase=fields["efficienttrain_phase"],
                    input_size=fields["efficienttrain_input_size"], batch_size=s.batch_size,
                    update_freq=s.grad_accum_steps, aa=s.aa,
                    updates_per_epoch=entry.epoch_iterations(cfg, s, loader_batches, self.run["images"],
                                                             cfg.nproc)[1],
                    toe_stage=fields["toe_stage"], num_patches=self.model.patch_embed.num_patches,
                    toe_kept_tokens=fields["toe_kept_tokens"])


def compare_run(ref_run: Dict[str, Any], ours: WholeRun) -> None:
    """Every recorded update: the state exactly; the lr exactly, but in the warm-up, where timm's linear warm-up
    reaches the peak one update later than the published ``np.linspace`` (README, EfficientTrain: a relative
    ``1 / warm-up updates``): there ours is the published value times ``(W - 1) / W``."""
    assert ours.updates == ref_run["updates_per_epoch"]
    warmup = ref_run["warmup_epochs"] * ref_run["updates_per_epoch"]
    for row in ref_run["rows"]:
        got = ours.at(row["iteration"])
        for key in ("epoch", "phase", "input_size", "batch_size", "update_freq", "aa", "updates_per_epoch",
                    "toe_stage", "num_patches", "toe_kept_tokens"):
            assert got[key] == row[key], (row["iteration"], key, got[key], row[key])
        want = row["lr"] * (warmup - 1) / warmup if row["iteration"] < warmup else row["lr"]
        tol = 1e-12 * want if row["iteration"] < warmup else 0.0
        assert abs(got["lr"] - want) <= tol, f"lr of update {row['iteration']}: {got['lr']!r}, published {row['lr']!r}"


@pytest.mark.parametrize("name", ["deit_t_et_toe.yaml", "deit_s_et_toe.yaml"])
def test_whole_run_lr_and_state_at_the_boundaries(ref, name):
    """312 updates per epoch in every phase; phase, size, batch, accumulation, RandAugment and ToE tokens (60 / 80 of
    100 at 160 px, 114 / 144 of 144 at 192 px, 196 at 224 px) at the first, last and boundary updates of 300
    epochs; the lr of every such update."""
    run = ref["run"][name]
    assert len(run["rows"]) >= 20 and {r["phase"] for r in run["rows"]} == {1, 2, 3, 4, 5}
    compare_run(run, WholeRun(name, run))


# (option, what the whole-run comparison reports, what the step comparison reports)
DEVIATIONS = [(("--epoch_updates", "loader"), "updates_per_epoch", "B: 4 updates of the epoch"),
              (("--sched_step", "timm"), "lr of update", "logits"),
              (("--sched_step", "published"), "lr of update", "logits"),
              (("--sched_step", "swin"), "lr of update", "logits")]
WHOLE_RUN_DEVIATIONS = [(option, run) for option, run, _ in DEVIATIONS]
STEP_DEVIATIONS = [(option, step) for option, _, step in DEVIATIONS] + [(("--amp", "bf16"), "logits")]


@pytest.mark.parametrize("option,reported", WHOLE_RUN_DEVIATIONS)
def test_whole_run_fails_with_a_deviation_option(ref, option, reported):
    """The options of ``docs/fidelity.md`` that leave the published EfficientTrain run: ``epoch_updates: loader``
    (313 updates in phase 5), ``sched_step: timm`` / ``published`` (lr per epoch), ``swin`` (lr of the previous
    update). Each makes the comparison fail."""
    name = "deit_t_et_toe.yaml"
    run = ref["run"][name]
    with pytest.raises(AssertionError, match=reported):
        compare_run(run, WholeRun(name, run, *option))


# ------------------------------------------------------------------------------------------------ the tiny steps
def tiny_overrides(steps_ref: Dict[str, Any]) -> List[str]:
    """``deit_t_et_toe.yaml`` as the fixture's tiny launches: its model size, 16 px images, the curriculum and ToE
    stages scaled to 15 epochs, a global batch of 4 (2 x accumulation 2; phases 1-4: 4 x 1) at the table's lr."""
    t, mk = steps_ref["tiny"], steps_ref["model_kwargs"]
    kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in mk.items()) + "}"
    return ["--model_kwargs", kwargs, "--input_size", str(t["base_size"]),
            "--efficienttrain.input_sizes", str(list(t["sizes"])), "--epochs", str(t["epochs"]),
            "--warmup_epochs", str(t["warmup_epochs"]), "--batch_size", str(t["final_bs"]),
            "--grad_accum_steps", str(t["global_batch"] // t["final_bs"]), "--lr_base_batch", str(t["global_batch"]),
            "--toe.expansion_steps", str(list(t["expansion_steps"])), "--amp", "none", "--num_workers", "0"]


class Recording(nn.Module):
    """The run's criterion, keeping every micro-batch's logits and loss."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base, self.logits, self.losses = base, [], []

    def forward(self, images, outputs, targets):
        loss = self.base(images, outputs, targets)
        self.logits.append(outputs.detach().clone())
        self.losses.append(loss.detach().clone())
        return loss


class Seeded:
    """The run's mixup/cutmix with the fixture's draws: numpy seeded before it, torch (drop path) after it (a
    micro-batch the published run did not train draws unseeded)."""

    def __init__(self, mixup, np_seeds: List[int], torch_seeds: List[int]):
        self.mixup, self.np_seeds, self.torch_seeds = mixup, iter(np_seeds), iter(torch_seeds)

    def __call__(self, images, targets):
        np_seed, torch_seed = next(self.np_seeds, None), next(self.torch_seeds, None)
        if np_seed is not None:
            np.random.seed(np_seed)
        images, targets = self.mixup(images, targets)
        if torch_seed is not None:
            torch.manual_seed(torch_seed)
        return images, targets


def train_launch(cfg, methods, model, optimizer, launch: Dict[str, Any], images, labels) -> Dict[str, Any]:
    """One epoch of the trainer's loop (``main.train``: recipe, lr schedule, methods' clock, the engine) on the
    fixture's images in the published presentation order."""
    epoch, n = launch["epoch"], launch["images"]
    s = entry.settings_at(cfg, methods, epoch)
    order = launch["order"]
    data = TensorDataset(images[order], labels[order], order)
    loader = DataLoader(data, batch_size=s.batch_size, shuffle=False, drop_last=True)
    iters, updates = entry.epoch_iterations(cfg, s, len(loader), n, 1)
    per_epoch = entry.updates_per_epoch(cfg, n, 1)
    scheduler = entry.build_scheduler(cfg, optimizer, per_epoch)
    scheduler.step(entry.lr_epoch(cfg, epoch))
    set_lr = entry.lr_setter(types.SimpleNamespace(cfg=cfg, scheduler=scheduler, updates_per_epoch=per_epoch), epoch)
    methods.on_epoch(Clock(epoch, 0, epoch * iters, iters, cfg.total_epochs()))
    criterion, mixup = entry.build_criterion(cfg, 10, CPU)
    recording = Recording(criterion)
    out: Dict[str, Any] = dict(lr=[], grads=[], tokens=[], settings=s, updates=updates, per_epoch=per_epoch)

    def pre_step(opt, *_):
        out["lr"].append([g["lr"] for g in opt.param_groups])
        out["grads"].append(steps.gradients(model))
    handles = [optimizer.register_step_pre_hook(pre_step),
               model.blocks[1].register_forward_pre_hook(lambda m, a: out["tokens"].append(a[0].shape[1]))]
    try:
        stats = train_one_epoch(model, recording, loader, optimizer, CPU, epoch, cfg.total_epochs(),
                                RunLogger(enabled=False), amp_dtype=resolve_amp(cfg.amp, CPU),
                                mixup_fn=Seeded(mixup, launch["np_seeds"], launch["torch_seeds"]),
                                clip_grad=cfg.clip_grad, accum_steps=s.grad_accum_steps, methods=methods,
                                global_step=epoch * iters, iters_per_epoch=iters, input_size=s.input_size,
                                set_lr=set_lr, epoch_iters=iters)
    finally:
        for h in handles:
            h.remove()
    out.update(iters=stats["iters"], logits=recording.logits, loss=recording.losses,
               params=steps.parameters(model, [n for n, _ in model.named_parameters()]),
               adam_steps=sorted({int(st["step"]) for st in optimizer.state.values()}))
    return out


def tiny_run(ref, *extra: str) -> Dict[str, Any]:
    """The fixture's two launches through this project's config, factory, optimizer, trainer steps and engine."""
    sr = ref["steps"]
    cfg = steps.table_config(CONFIG, *tiny_overrides(sr), *extra)
    methods = MethodSet.from_config(cfg)
    la, lb = sr["launches"]["A"], sr["launches"]["B"]
    size = entry.settings_at(cfg, methods, la["epoch"]).input_size
    model = entry.build_model(cfg, sr["num_classes"], methods, img_size=size)
    ckpt_io.load_weights_strict(model, {k: v.float() for k, v in sr["init_state"].items()}, "et step fixture")
    methods.attach([model])
    lr = entry.scaled_lr(cfg, 1)
    groups = steps.parameter_groups(cfg, model, lr)
    optimizer = entry.create_optimizer(cfg, model, lr)
    images, labels = sr["images"].float() / 64 - 2, sr["labels"]
    out = dict(cfg=cfg, groups=groups, lr=lr, crop=low_frequency_crop(images[la["order"][:1]], sr["crop"]["size"]))
    out["A"] = train_launch(cfg, methods, model, optimizer, la, images[:la["images"]], labels[:la["images"]])
    sb = entry.settings_at(cfg, methods, lb["epoch"])
    set_input_size(model, sb.input_size, [optimizer])            # the trainer's phase change (main.apply_recipe)
    out["B_start"] = dict(pos_embed=model.pos_embed.detach().clone(),
                          **{k: optimizer.state[model.pos_embed][k].clone() for k in ("exp_avg", "exp_avg_sq")})
    out["B"] = train_launch(cfg, methods, model, optimizer, lb, images[:lb["images"]], labels[:lb["images"]])
    return out


def assert_params(got: Dict[str, torch.Tensor], pub: Dict[str, torch.Tensor], lrs: List[float], what: str) -> None:
    """Every parameter within 1e-5 relative, but the key thirds of the ``qkv`` biases: softmax does not change when
    the same value is added to every logit of a row, so their gradient is zero but for float rounding (~1e-10, in
    either implementation its own) and Adam, dividing by its root mean square, turns that noise into steps of about
    ``lr / 100``. Both sides' key biases must stay that small (within ``0.1 x`` the lrs of the updates so far, from
    their zero start); the query and value thirds are compared as the rest."""
    got, pub = dict(got), dict(pub)
    bound = 0.1 * sum(lrs)
    for name in [n for n in pub if n.endswith("attn.qkv.bias")]:
        (q, k, v), (qo, ko, vo) = pub[name].chunk(3), got[name].chunk(3)
        assert k.abs().max() <= bound and ko.abs().max() <= bound, (what, name, k.abs().max(), ko.abs().max(), bound)
        pub[name], got[name] = torch.cat([q, v]), torch.cat([qo, vo])
    steps.assert_all_close(got, pub, 1e-5, what)


def compare_steps(sr: Dict[str, Any], ours: Dict[str, Any]) -> None:
    """Everything the fixture holds of the two launches (raises AssertionError at the first difference)."""
    for name in ("A", "B"):
        pub, got = sr["launches"][name], ours[name]
        s = got["settings"]
        assert (s.input_size, s.batch_size, s.grad_accum_steps, s.aa) == \
            (pub["input_size"], pub["batch_size"], pub["update_freq"], pub["aa"]), name
        assert got["per_epoch"] == got["updates"] == pub["updates_per_epoch"], \
            f"{name}: {got['updates']} updates of the epoch, published {pub['updates_per_epoch']}"
        assert got["iters"] == pub["trained_micro_batches"], (name, got["iters"], pub["trained_micro_batches"])
        assert got["tokens"] == pub["tokens_at_block1"], (name, got["tokens"], pub["tokens_at_block1"])
        assert len(got["loss"]) == len(pub["loss"]), name
        for i, (logits, loss) in enumerate(zip(got["logits"], got["loss"])):
            steps.assert_close(logits, pub["logits"][i], 1e-5, f"{name} logits of micro-batch {i}")
            steps.assert_close(loss, pub["loss"][i], 1e-5, f"{name} loss of micro-batch {i}")
        assert got["lr"] == pub["group_lr"], (name, got["lr"], pub["group_lr"])
        if "grads" in pub:
            steps.assert_all_close(got["grads"][0], pub["grads"], 1e-5, f"{name} gradients of the first update")
        if name == "B":
            start = ours["B_start"]
            steps.assert_close(start["pos_embed"], pub["start_pos_embed"], 1e-5, "B pos_embed after resampling")
            for k in ("exp_avg", "exp_avg_sq"):
                steps.assert_close(start[k], pub["start_pos_embed_moments"][k], 1e-5, f"B pos_embed {k} resampled")
        lrs = [lr[0] for launch in ("A", "B")[:"AB".index(name) + 1] for lr in sr["launches"][launch]["group_lr"]]
        assert_params(got["params"], pub["params_after"], lrs, f"{name} parameters after the launch")
        assert got["adam_steps"] == pub["adam_steps"], (name, got["adam_steps"], pub["adam_steps"])


@pytest.fixture(scope="module")
def tiny(ref) -> Dict[str, Any]:
    return tiny_run(ref)


def test_tiny_config_is_the_published_launches(ref, tiny):
    """The overrides give the published tiny launches: lr 4e-3 for the global batch, phases at the fixture's sizes,
    and the model the fixture's initial weights fit (loaded strictly)."""
    sr = ref["steps"]
    assert tiny["lr"] == sr["launches"]["A"]["lr_arg"] == sr["launches"]["B"]["lr_arg"]
    cfg = tiny["cfg"]
    assert (cfg.clip_grad, cfg.drop_path, cfg.mixup, cfg.cutmix, cfg.smoothing) == (5.0, 0.1, 0.8, 1.0, 0.1)


def test_parameter_groups_are_the_published(ref, tiny):
    """No weight decay on 1-D parameters, biases, the position embedding and the class token; lr scale 1."""
    steps.assert_groups(tiny["groups"], ref["steps"]["param_groups"])


def test_low_frequency_crop_is_the_published(ref, tiny):
    steps.assert_close(tiny["crop"], ref["steps"]["crop"]["output"], 1e-6, "low-frequency crop")


def test_tiny_launches_equal_the_published_steps(ref, tiny):
    """Phase 4 (12 px crops of 16 px images, 5 of 9 patches kept by ToE) then phase 5 (16 px, accumulation 2, the 7th
    micro-batch untrained): logits, losses, gradients, lr, tokens and parameters as the published code's."""
    assert tiny["A"]["tokens"] == [6, 6, 6] and tiny["B"]["iters"] == 6
    compare_steps(ref["steps"], tiny)


@pytest.mark.parametrize("option,reported", STEP_DEVIATIONS)
def test_tiny_launches_fail_with_a_deviation_option(ref, option, reported):
    """The documented options that leave the published behaviour make the step comparison fail (``amp: bf16``
    too: the published steps are float32 here, fp16 on a GPU)."""
    with pytest.raises(AssertionError, match=reported):
        compare_steps(ref["steps"], tiny_run(ref, *option))


def odd_cutmix(ref, *overrides):
    """The run's mixup on the fixture's published cutmix draw whose box has two odd sides."""
    odd = ref["steps"]["cutmix_odd"]
    cfg = steps.table_config(CONFIG, *tiny_overrides(ref["steps"]), *overrides)
    _, mixup = entry.build_criterion(cfg, ref["steps"]["num_classes"], CPU)
    x = ref["steps"]["images"][:2].float() / 64 - 2
    np.random.seed(odd["seed"])
    mixed, target = mixup(x.clone(), odd["labels"].clone())
    return x, mixed, target


def test_cutmix_box_of_odd_sides_is_the_published_one(ref):
    """The published timm 0.9.2 cuts a box of odd side ``c`` one pixel short (``cy + c // 2``), the mixed targets
    following the box (``correct_lam``): the table configs' ``cutmix_box: published``. timm >= 1.0 cuts it in full
    (``cy + (c + 1) // 2``): ``cutmix_box: timm`` is one pixel taller and wider, and its targets differ."""
    odd = ref["steps"]["cutmix_odd"]
    x, mixed, target = odd_cutmix(ref)
    assert torch.equal(mixed, odd["mixed"]) and torch.allclose(target, odd["target"], rtol=0, atol=1e-7)
    box = lambda m: (m[0] != x[0]).any(dim=0)                      # noqa: E731  (where image 0 took image 1's pixels)
    rows, cols = lambda b: int(b.any(dim=1).sum()), lambda b: int(b.any(dim=0).sum())     # noqa: E731
    assert (rows(box(mixed)), cols(box(mixed))) == (odd["cut_h"] - 1, odd["cut_w"] - 1)
    _, mixed_timm, target_timm = odd_cutmix(ref, "--cutmix_box", "timm")
    assert (rows(box(mixed_timm)), cols(box(mixed_timm))) == (odd["cut_h"], odd["cut_w"])
    assert not torch.allclose(target_timm, odd["target"])
