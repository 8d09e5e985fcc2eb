"""The training recipe's rules, in one place for the trainer (``main.py``), ``--plan`` (``plan.py``) and measurement
(``measure.py``): the recipe in force at each epoch, the linear lr rule, the optimizer, the lr schedule and which of
its steps trains an epoch or an update, and how many micro-batches and optimizer updates an epoch has.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

from torch import nn

from config import Config
from datasets import RASampler, ShuffleSampler
from methods import MethodSet

PER_UPDATE = ("iteration", "swin")        # sched_step values that set the lr per optimizer update


@dataclass(frozen=True)
class Settings:
    """The recipe in force for an epoch: the config's values, with what the methods' :class:`methods.Recipe` of
    that epoch changes (a curriculum's batch, accumulation, RandAugment and input size)."""
    batch_size: int
    grad_accum_steps: int
    aa: Optional[str]
    input_size: int
    eval_size: int

    def loader_key(self) -> Tuple[int, Optional[str]]:
        return self.batch_size, self.aa


def settings_at(cfg: Config, methods: MethodSet, epoch: int) -> Settings:
    rc = methods.recipe(epoch)
    pick = lambda mine, default: default if mine is None else mine       # noqa: E731
    return Settings(pick(rc.batch_size, cfg.batch_size), pick(rc.grad_accum_steps, cfg.grad_accum_steps),
                    pick(rc.aa, cfg.aa), pick(rc.input_size, cfg.input_size), pick(rc.eval_size, cfg.input_size))


def recipe_config(cfg: Config, s: Settings) -> Config:
    """``cfg`` with an epoch's loader settings (for :func:`datasets.build_loaders`)."""
    return dataclasses.replace(cfg, batch_size=s.batch_size, grad_accum_steps=s.grad_accum_steps, aa=s.aa)


def base_settings(cfg: Config) -> Settings:
    """The config's own recipe, without what any method changes."""
    return Settings(cfg.batch_size, cfg.grad_accum_steps, cfg.aa, cfg.input_size, cfg.input_size)


def scaled_lr(cfg: Config, world_size: int) -> float:
    """DeiT's linear rule: lr x global batch / lr_base_batch (global batch includes accumulation)."""
    if cfg.unscale_lr:
        return cfg.lr
    return cfg.lr * cfg.batch_size * world_size * cfg.grad_accum_steps / cfg.lr_base_batch


def nproc_note(cfg: Config, world_size: int) -> Optional[str]:
    """One line when this run's process count is not the recipe's (``nproc``): how its global batch and lr differ."""
    if cfg.nproc is None or cfg.nproc == world_size:
        return None
    ours, theirs = scaled_lr(cfg, world_size), scaled_lr(cfg, cfg.nproc)
    per = cfg.batch_size * cfg.grad_accum_steps
    lr_text = (f"lr {ours:.3e} instead of {theirs:.3e} (linear rule)" if not cfg.unscale_lr
               else f"lr {ours:.3e} as given (unscale_lr)")
    return (f"nproc: the recipe expects {cfg.nproc} process(es), this run has {world_size}: global batch "
            f"{per * world_size} instead of {per * cfg.nproc}, {lr_text}; keep the recipe's batch with "
            f"--grad_accum_steps or --batch_size")


def create_optimizer(cfg: Config, model: nn.Module, lr: float):
    """timm's optimizer factory for the config: weight decay on all but 1-D parameters, biases and the model's
    ``no_weight_decay()``, layer-wise lr scales with ``layer_decay`` (see :func:`share_lr_bounds`)."""
    from timm.optim import create_optimizer_v2

    opt_kwargs = {"momentum": cfg.momentum} if cfg.opt == "sgd" else {"eps": cfg.opt_eps}
    if cfg.opt_betas is not None:
        opt_kwargs["betas"] = tuple(cfg.opt_betas)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    layer_decay=cfg.layer_decay, **opt_kwargs)
    if cfg.layer_decay_bounds == "shared":
        share_lr_bounds(optimizer)
    return optimizer


def share_lr_bounds(optimizer) -> None:
    """Give every layer-decay group its scaled peak lr as its own base value, so that timm's scheduler (which
    multiplies the whole curve by a group's ``lr_scale``) keeps ``warmup_lr`` and ``min_lr`` the same for every group,
    as the SimMIM / Swin code's groups are built (``layer_decay_bounds: shared``)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.pop("lr_scale", 1.0)


def build_scheduler(cfg: Config, optimizer, updates: int):
    """timm's scheduler for the config: per epoch, or per optimizer update. ``sched_step: iteration`` (the ConvNeXt
    code base, EfficientTrain): a linear warm-up over ``warmup_epochs x updates`` updates comes before the decay over
    the remaining ``(epochs - warmup_epochs) x updates`` (timm's ``warmup_prefix``). ``swin`` (the SimMIM / Swin
    code): the decay spans all ``epochs x updates`` updates and the warm-up replaces its first ones."""
    from timm.scheduler import create_scheduler_v2
    per_update = cfg.sched_step in PER_UPDATE
    prefix = cfg.sched_step == "iteration"
    sched, _ = create_scheduler_v2(optimizer, sched=cfg.sched,
                                   num_epochs=cfg.epochs - (cfg.warmup_epochs if prefix else 0),
                                   decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate,
                                   min_lr=cfg.min_lr if cfg.min_lr is not None else 0.0,   # (eval, plan only)
                                   warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
                                   cooldown_epochs=cfg.cooldown_epochs, warmup_prefix=prefix,
                                   step_on_epochs=not per_update, updates_per_epoch=updates if per_update else 0)
    return sched


def lr_epoch(cfg: Config, epoch: int) -> int:
    """The scheduler epoch whose lr trains ``epoch``: ``epoch`` (``sched_step: timm``), or ``epoch - 1`` (DeiT's
    loop steps the scheduler after an epoch with the index it just finished, so epochs 0 and 1 both train at
    ``lr(0)``, the warm-up lr). (``sched_step: iteration`` / ``swin`` set the lr per update instead: :func:`lr_setter`.)"""
    return max(epoch - 1, 0) if cfg.sched_step == "published" else epoch


def lr_update(cfg: Config, epoch: int, k: int, updates: int) -> int:
    """The scheduler update whose lr trains update ``k`` of ``epoch`` (per-update schedules): global update
    ``g = epoch x updates + k`` (``iteration``: the ConvNeXt engine sets lr(g) before it; with ``epoch_updates:
    loader`` an epoch's leftover update keeps its last value), or ``g - 1`` (``swin``: the SimMIM / Swin engine steps
    the scheduler after each update, and the first one trains at the warm-up start)."""
    g = epoch * updates + min(k, updates - 1)
    return max(g - 1, 0) if cfg.sched_step == "swin" else g


def lr_setter(r, epoch: int):
    """With a per-update schedule: what the engine calls before each update ``k`` of ``epoch``. Else ``None``.
    ``r``: the run (its ``cfg``, ``scheduler`` and ``updates_per_epoch``)."""
    if r.cfg.sched_step not in PER_UPDATE:
        return None
    return lambda k: r.scheduler.step_update(lr_update(r.cfg, epoch, k, r.updates_per_epoch))


def updates_per_epoch(cfg: Config, images: int, world_size: int) -> int:
    """The period of a per-iteration lr schedule: ``images // effective batch`` optimizer updates per epoch (the
    ConvNeXt / EfficientTrain rule; constant through a curriculum that keeps the effective batch)."""
    return max(1, images // (cfg.batch_size * cfg.grad_accum_steps * world_size))


def epoch_iterations(cfg: Config, s: "Settings", loader_len: int, images: int, world_size: int) -> Tuple[int, int]:
    """``(micro-batches trained, optimizer updates)`` of an epoch whose loader yields ``loader_len`` micro-batches per
    process under recipe ``s``. ``epoch_updates: loader``: all of them, the last update on fewer than
    ``grad_accum_steps`` when they do not divide. ``images``: as the ConvNeXt code base's engine, at most
    ``images // global batch`` updates, and the micro-batches past them are not trained."""
    accum = s.grad_accum_steps
    iters = loader_len
    if cfg.epoch_updates == "images":
        iters = min(iters, updates_per_epoch(recipe_config(cfg, s), images, world_size) * accum)
    return iters, -(-iters // accum)


def trained_iterations(r, s: Settings, loader_len: int) -> int:
    """The micro-batches an epoch of recipe ``s`` trains when its loader yields ``loader_len`` (``epoch_updates``);
    ``r``: the run (its ``cfg``, train loader and process count)."""
    return epoch_iterations(r.cfg, s, loader_len, len(r.train_loader.dataset), r.dist.world_size)[0]


def loader_batches(cfg: Config, s: Settings, images: int, world_size: int, fraction: float = 1.0) -> int:
    """The micro-batches per process that an epoch's train loader yields, computed without data: the training
    sampler's share of the epoch's examples, in whole batches (``datasets.build_loaders`` drops the last partial one).
    An example-level method trains on ``fraction`` of the examples (the held-out part rounded down)."""
    n = images - int(images * (1 - fraction))
    if cfg.repeated_aug and (world_size > 1 or cfg.repeated_aug_single == "always"):   # as build_loaders picks
        sampler = RASampler(range(n), world_size, 0, repeats=cfg.ra_repeats)
    else:
        sampler = ShuffleSampler(range(n), world_size, 0)
    return len(sampler) // s.batch_size


def planned_iterations(cfg: Config, s: Settings, images: int, world_size: int,
                       fraction: float = 1.0) -> Tuple[int, int]:
    """``(micro-batches trained, optimizer updates)`` of an epoch under recipe ``s``, as a run counts them
    (:func:`epoch_iterations` of :func:`loader_batches`), for a dataset of ``images`` examples."""
    return epoch_iterations(cfg, s, loader_batches(cfg, s, images, world_size, fraction), images, world_size)
