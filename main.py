"""Train or evaluate a timm ViT with the DeiT recipe, optionally with training-acceleration methods (plug-ins).

    python main.py --config configs/demo.yaml
    torchrun --nproc_per_node=8 main.py --config configs/deit_s_toe.yaml --data_path /data/imagenet
    python main.py --config configs/deit_s.yaml --eval --resume runs/deit_s/best.pth

Every ``--key value`` after the config overrides that key (``--toe.keep_rates [0.4,0.7,1.0]``, ``--toe none``,
``--methods [pss]``); ``python main.py --help`` lists them all.

A run is checked completely (config, data, model, checkpoints, output directory) before it writes anything. It
takes a lock on ``output_dir`` and never overwrites another run there unless ``--overwrite`` is given. SIGTERM and
SIGINT save a checkpoint of the current iteration; ``--resume auto`` continues from it inside the epoch, with the
weights an uninterrupted run would have.

Exit codes:
    0    training finished (or there was nothing left to train), or the evaluation ran
    1    a run-time failure, reported in one line: data, checkpoint, output directory, full disk, a non-finite loss,
         another process of the run that failed
    2    a mistake in the config or on the command line, reported in one line before anything is written
    3    stopped by SIGTERM or SIGINT: checkpoint.pth holds the current iteration; continue with --resume auto
    130, 143  (128 + the signal) stopped by SIGINT / SIGTERM before training began, or by a second signal while
         stopping: nothing new was saved, the previous checkpoint is intact

This file builds the run and holds the epoch loop; beside it: ``recipe.py`` (the recipe of each epoch, the lr and
its schedule), ``parts.py`` (model, criterion, loaders' batches), ``resume.py`` (checkpoint in, checkpoint out),
``rundir.py`` (output_dir) and ``exits.py`` (exit codes, errors, signals).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import checkpoint as ckpt_io
from checkpoint import ResumeState, RunDirError
from config import Config, ConfigError, load_config
from config_help import help_text
from datasets import check_num_classes
from devices import loss_scaler, resolve_amp
from distributed import (DistInfo, any_rank, barrier, cleanup, gather_to_all, init_distributed, rng_state, seed_all,
                         set_rng_state)
from engine import NonFiniteLossError, evaluate, train_one_epoch
from exits import (CONFIG_ERRORS, EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_STOPPED, RUN_ERRORS, Abort, PeerStopped,
                   StopSignals, Stopped, one_line, peer_failure)
from loaders import build_loaders
from logger import LogWriteError, RunLogger, format_seconds, read_log, run_totals
from extensions import ExtensionSet
from methods import Clock, MethodSet
from models import num_patches
from models.resize import at_input_size, input_size_of, set_input_size
from parts import (build_criterion, build_model, check_model, check_recipe_batches, count_parameters,
                   with_batch_size)
# the schedule rules live in recipe.py; their names stay importable from main, where tests and scripts read them
from recipe import (PER_UPDATE, Settings, build_scheduler, create_optimizer, epoch_iterations, lr_epoch,  # noqa: F401
                    lr_setter, lr_update, nproc_note, recipe_config, scaled_lr, settings_at, share_lr_bounds,
                    trained_iterations, updates_per_epoch)
from resume import Position, _flatten, checkpoint_state, load_resume, restore  # noqa: F401 (_flatten: read by tests)
from rundir import check_output, open_run_dir

USAGE = """usage: python main.py --config FILE [--KEY VALUE ...] [--overwrite | --plan]
       torchrun --nproc_per_node=N main.py --config FILE [--KEY VALUE ...]

Train (or, with --eval, evaluate) a timm ViT with the DeiT recipe; see README.md. Exit codes: 0 done, 1 run-time
error, 2 config error, 3 stopped by SIGTERM/SIGINT with the current iteration saved (continue with --resume auto).

command-line switches (not config keys, never saved in the run's config):
  --config FILE   the YAML recipe (may inherit another with base: other.yaml)
  --overwrite     replace the run that output_dir already holds (its checkpoints, log and config are removed)
  --plan          print the whole schedule (spans of epochs, lr, method states, FLOPs, images seen) and exit;
                  reads no data, writes nothing; the process count is nproc (--nproc N to change it)
  -h, --help      this page"""


# ------------------------------------------------------------------------------------------------ parsing
def parse_args(argv: List[str]) -> Tuple[Config, bool]:
    """``--config FILE``, the ``--overwrite`` switch, and the config keys; ``--help`` prints every key and exits."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(USAGE))
        sys.exit(EXIT_OK)
    rest, path, overwrite, show_plan = [], None, False, False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file: --config configs/demo.yaml")
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a == "--overwrite":
            overwrite = True
        elif a == "--plan":
            show_plan = True
        else:
            rest.append(a)
        i += 1
    cfg = load_config(path, rest)
    if show_plan:
        from plan import format_plan, plan
        print(format_plan(cfg, *plan(cfg)))
        sys.exit(EXIT_OK)
    if overwrite and cfg.resume:
        raise ConfigError("--overwrite replaces the run in output_dir, --resume continues it: give one of them")
    if cfg.min_lr is None and not cfg.eval:
        raise ConfigError("min_lr: unknown (null) in this config (its published value was not recovered); set it, "
                          "e.g. --min_lr 1e-6, to train")
    return cfg, overwrite


# ------------------------------------------------------------------------------------------------ building a run
@dataclass
class Run:
    """Everything a run is made of, built before anything is written."""
    cfg: Config
    dist: DistInfo
    log: RunLogger
    amp_dtype: Optional[torch.dtype] = None
    train_loader: Any = None
    val_loader: Any = None
    nb_classes: int = 0
    methods: MethodSet = None
    extensions: ExtensionSet = None           # the config's extension sections (training set, criterion, model checks)
    model: nn.Module = None                   # the bare model (what is saved)
    ddp_model: nn.Module = None               # DDP-wrapped (or the bare model on one process)
    train_model: nn.Module = None             # what training calls (compiled when asked)
    model_ema: Any = None
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    criterion: Any = None
    mixup_fn: Any = None
    lr: float = 0.0
    n_params: int = 0
    resume: Optional[ResumeState] = None
    ema_loaded: bool = False
    start: Position = field(default_factory=Position)
    best: Dict[str, Any] = field(default_factory=dict)
    iters_per_epoch: Optional[int] = None
    updates_per_epoch: int = 1                # the period of a per-iteration lr schedule
    settings: Optional[Settings] = None       # the recipe of the epoch being trained (and of the train loader)
    first_subset: Optional[Tuple[int, Optional[list]]] = None   # (epoch, the methods' subset), chosen at build
    resizing: bool = False                    # a method changes the input size (the model follows it)


def build_optimizer(r: Run) -> None:
    cfg = r.cfg
    r.lr = scaled_lr(cfg, r.dist.world_size)
    r.optimizer = create_optimizer(cfg, r.model, r.lr)
    # the schedule is always built from the resolved config (also on resume: a new --lr or --epochs takes effect)
    r.updates_per_epoch = updates_per_epoch(cfg, len(r.train_loader.dataset), r.dist.world_size)
    r.scheduler = build_scheduler(cfg, r.optimizer, r.updates_per_epoch)
    r.scaler = loss_scaler(r.amp_dtype, r.dist.device)


def wrap(r: Run, ckpt: Optional[Dict[str, Any]], path: Optional[str]) -> None:
    """DDP (which makes every rank's weights rank 0's), then the EMA from those synchronised weights, then the
    methods see every model that carries their patch."""
    cfg = r.cfg
    rewrap(r)
    if cfg.model_ema:
        from timm.utils import ModelEmaV3
        r.model_ema = ModelEmaV3(r.model, decay=cfg.model_ema_decay)
        ema = ckpt_io.ema_state(ckpt) if ckpt is not None else None
        if ema is not None:
            ckpt_io.load_weights_strict(r.model_ema.module, ema, f"resume {path} (EMA)")
            r.ema_loaded = True
    r.methods.attach([r.model, r.model_ema.module if r.model_ema is not None else None])


def rewrap(r: Run) -> None:
    """DDP around the bare model (again after its parameters changed shape: DDP sizes its buckets once), and
    ``torch.compile`` when asked."""
    r.ddp_model = r.model
    if r.dist.distributed:
        dev = r.dist.device
        r.ddp_model = DistributedDataParallel(r.model, device_ids=[dev.index] if dev.type == "cuda" else None)
    r.train_model = torch.compile(r.ddp_model) if r.cfg.compile else r.ddp_model


def build(cfg: Config, dist: DistInfo, log: RunLogger) -> Run:
    """Every part of the run, in the order that lets each mistake stop it before anything is written."""
    r = Run(cfg, dist, log, best={"acc1": -1.0, "epoch": -1, "on": cfg.best_on})
    r.amp_dtype = resolve_amp(cfg.amp, dist.device)
    resume_file, ckpt, stamp = load_resume(cfg)
    seed_all(cfg.seed + dist.rank)
    r.methods = MethodSet.from_config(cfg)
    r.extensions = ExtensionSet.from_config(cfg)
    every_epoch = [settings_at(cfg, r.methods, e) for e in range(cfg.total_epochs())]
    r.resizing = any((s.input_size, s.eval_size) != (cfg.input_size, cfg.input_size) for s in every_epoch)
    start = ckpt_io.resume_state(ckpt, resume_file).next_epoch if ckpt is not None and not cfg.eval else 0
    r.settings = every_epoch[min(start, len(every_epoch) - 1)]
    r.train_loader, r.val_loader, nb_classes = build_loaders(recipe_config(cfg, r.settings), dist.rank,
                                                             dist.world_size, cfg.seed, extensions=r.extensions)
    r.val_loader = with_batch_size(r.val_loader, int(1.5 * cfg.batch_size))
    check_recipe_batches(r, every_epoch)
    r.nb_classes = check_num_classes(cfg.nb_classes, nb_classes)
    r.model = build_model(cfg, r.nb_classes, r.methods, img_size=cfg.input_size if cfg.eval else r.settings.input_size)
    check_model(cfg, r.model, r.extensions)
    if cfg.finetune:
        report = ckpt_io.adapt_for_finetune(r.model, ckpt_io.model_state(ckpt_io.load_checkpoint(cfg.finetune, "finetune")),
                                            f"finetune {cfg.finetune}")
        log.info(f"fine-tuning from {cfg.finetune}: dropped {report['dropped'] or 'nothing'}, "
                 f"resampled {report['resampled'] or 'nothing'}")
    r.model.to(dist.device)
    r.n_params = count_parameters(r.model, cfg.input_size if r.resizing else None)
    build_optimizer(r)
    r.criterion, r.mixup_fn = build_criterion(cfg, r.nb_classes, dist.device, r.extensions)
    if ckpt is not None:
        if cfg.eval:
            saved_size = (ckpt.get("clock") or {}).get("input_size")
            if r.resizing and saved_size:
                set_input_size(r.model, int(saved_size))
            ckpt_io.load_weights_strict(r.model, ckpt_io.model_state(ckpt), f"resume {resume_file}")
        else:
            restore(r, resume_file, ckpt, stamp)
    wrap(r, ckpt, resume_file)
    if r.resume is not None:        # here, so that a state a method cannot continue refuses before anything is written
        r.methods.load_state_dict(ckpt.get("methods") or {})     # (a mid-epoch state loads again at its epoch's start)
    if not cfg.eval and r.start.epoch < cfg.total_epochs() and not (r.resume is not None and r.resume.mid_epoch):
        # the first epoch's subset, chosen here for the same reason (a dataset of another size, a subset too small)
        r.first_subset = (r.start.epoch, r.methods.train_indices(r.start.epoch, len(r.train_loader.dataset)))
    return r


def apply_recipe(r: Run, epoch: int) -> None:
    """Put the run in ``epoch``'s recipe: rebuild the train loader for a new batch or RandAugment (same process),
    resize the model, its EMA and the position embedding's optimizer moments for a new input size (and wrap it in
    DDP again). One log line says what changed."""
    cfg, new = r.cfg, settings_at(r.cfg, r.methods, epoch)
    changed = []
    if new.loader_key() != r.settings.loader_key():
        r.train_loader = build_loaders(recipe_config(cfg, new), r.dist.rank, r.dist.world_size, cfg.seed,
                                       extensions=r.extensions)[0]
        r.iters_per_epoch = trained_iterations(r, new, len(r.train_loader))
        changed.append(f"batch {new.batch_size}/process, RandAugment {new.aa or 'none'}")
    if new.grad_accum_steps != r.settings.grad_accum_steps:
        changed.append(f"accumulation {new.grad_accum_steps}")
    if r.resizing and new.input_size != input_size_of(r.model):
        r.ddp_model = r.train_model = None          # the old DDP wrapper goes before the parameter changes
        set_input_size(r.model, new.input_size, [r.optimizer])
        if r.model_ema is not None:
            set_input_size(r.model_ema.module, new.input_size)
        rewrap(r)
        changed.append(f"input {new.input_size}px ({num_patches(r.model)} patches)")
    if changed:
        r.log.info(f"epoch {epoch + 1}: recipe now " + ", ".join(changed))
    r.settings = new


@contextlib.contextmanager
def at_eval_size(r: Run):
    """The models to evaluate, at the recipe's eval size for the duration, and what brings val batches to it:
    ``(model, ema, resize)``. Without a size-changing method: the training models as they are."""
    ema = r.model_ema.module if r.model_ema is not None else None
    if not r.resizing:
        yield r.ddp_model, ema, None
        return
    size = r.settings.eval_size
    resize = None if size == r.cfg.input_size else (lambda x: r.methods.resize_images(x, size))
    with contextlib.ExitStack() as stack:
        for m in (r.model, ema):
            if m is not None:
                stack.enter_context(at_input_size(m, size))
        yield r.model, ema, resize


# ------------------------------------------------------------------------------------------------ evaluation only
def evaluate_only(r: Run) -> Dict[str, Any]:
    """Score the weights (and their EMA); print them and write ``eval.json`` (the run's config.yaml is left alone)."""
    cfg, dev = r.cfg, r.dist.device
    r.settings = dataclasses.replace(r.settings, eval_size=cfg.input_size)
    with at_eval_size(r) as (model, ema, resize):
        stats = {"model": evaluate(model, r.val_loader, dev, r.amp_dtype, resize)}
        if r.ema_loaded:
            stats["ema"] = evaluate(ema, r.val_loader, dev, r.amp_dtype, resize)
    for who, s in stats.items():
        r.log.info(f"eval {who}: top-1 {s['acc1']:.2f}  top-5 {s['acc5']:.2f}  loss {s['loss']:.4f}  on {s['count']} images")
    if r.dist.is_main:
        out = {"weights": ckpt_io.resume_path(cfg.resume, cfg.output_dir) or cfg.finetune, **stats,
               "config": cfg.to_dict()}
        os.makedirs(cfg.output_dir, exist_ok=True)
        ckpt_io.write_text(os.path.join(cfg.output_dir, "eval.json"), json.dumps(out, indent=1))
    return stats


# ------------------------------------------------------------------------------------------------ training
def begin_epoch(r: Run, epoch: int, global_step: int) -> Tuple[Optional[list], int, Dict[str, Any]]:
    """Seeds, sampler and methods for ``epoch``; a resumed epoch takes its subset, methods state and start position
    from the checkpoint. Returns the subset, the iterations already trained and the engine's resume arguments."""
    cfg, sampler, methods = r.cfg, r.train_loader.sampler, r.methods
    # reseed per epoch so a resumed run draws what an uninterrupted one does
    seed_all(cfg.seed + r.dist.rank + 1_000_003 * (epoch + 1))
    sampler.set_epoch(epoch)
    mid = r.resume.mid_epoch if r.resume is not None and epoch == r.start.epoch and r.start.step else None
    if mid is None:
        first, r.first_subset = r.first_subset, None
        subset = (first[1] if first is not None and first[0] == epoch
                  else methods.train_indices(epoch, len(r.train_loader.dataset)))
        sampler.set_indices(subset)
        r.iters_per_epoch = r.iters_per_epoch or trained_iterations(r, r.settings, len(r.train_loader))
        methods.on_epoch(Clock(epoch, 0, global_step, r.iters_per_epoch, cfg.total_epochs()))
        return subset, 0, {}
    mine = mid["ranks"][r.dist.rank]
    subset = None if mine.get("subset") is None else mine["subset"].tolist()
    sampler.set_indices(subset)
    r.iters_per_epoch = r.iters_per_epoch or trained_iterations(r, r.settings, len(r.train_loader))
    step = r.start.step
    methods.on_epoch(Clock(epoch, 0, global_step - step, r.iters_per_epoch, cfg.total_epochs()))
    methods.load_state_dict(r.resume.ckpt.get("methods") or {})     # the state at the stop, after the epoch's start
    sampler.set_start(mid["position"])
    return subset, step, {"start_step": step, "resumed": mine["progress"],
                          "on_start": lambda: set_rng_state(mine["rng"])}


def save_mid_epoch(r: Run, epoch: int, stats: Dict[str, Any], subset: Optional[list], global_step: int,
                   stop: StopSignals) -> None:
    """The checkpoint of the current iteration: the sampler position, per rank the epoch's subset, RNG states and
    running figures, the methods' state; then stop (exit 3)."""
    sampler = r.train_loader.sampler
    mine = {"rng": rng_state(), "progress": stats["progress"],        # first: nothing may draw before
            "subset": None if subset is None else torch.tensor(subset), "sampler_len": len(sampler) + sampler.start,
            "dataset_len": len(r.train_loader.dataset)}
    ranks = gather_to_all(mine)
    methods_state = r.methods.state_dict()
    step = stats["stopped_at"]
    path = os.path.join(r.cfg.output_dir, "checkpoint.pth")
    if r.dist.is_main:
        r.log.sync()                              # the iteration records this checkpoint covers, on disk first
        mid = {"position": step * r.settings.batch_size, "world_size": r.dist.world_size,
               "batch_size": r.settings.batch_size, "grad_accum_steps": r.settings.grad_accum_steps, "ranks": ranks}
        state = checkpoint_state(r, epoch - 1, Position(epoch, step, global_step), methods_state, mid)
        ckpt_io.save_checkpoint(state, path)
    barrier()
    raise Stopped(f"stopped by {stop.name} at epoch {epoch + 1}/{r.cfg.total_epochs()}, iteration {step}/"
                  f"{r.iters_per_epoch}: saved {path}; continue with --resume auto")


def end_epoch(r: Run, epoch: int, stats: Dict[str, Any], subset: Optional[list], global_step: int,
              wall_start: Tuple[float, float], stop: StopSignals) -> Tuple[Dict[str, Any], bool]:
    """Evaluate, log the epoch (fsync), then write checkpoint.pth (on its ``save_every`` epochs, when it improved,
    at the end and when a signal asks to stop) and, when it improved, link best.pth to it. Returns the record and
    whether to stop."""
    cfg, dev, log = r.cfg, r.dist.device, r.log
    with at_eval_size(r) as (model, ema, resize):
        val = evaluate(model, r.val_loader, dev, r.amp_dtype, resize)
        val_ema = (evaluate(ema, r.val_loader, dev, r.amp_dtype, resize)
                   if ema is not None and cfg.model_ema_eval else None)
        val_extra = {}
        patches = int(num_patches(r.model) or 0)
        for suffix, state in r.methods.eval_variants(patches, cfg.epochs, r.iters_per_epoch).items():
            undo = state.apply(model)
            try:
                val_extra[suffix] = evaluate(model, r.val_loader, dev, r.amp_dtype, resize)
            finally:
                undo()
    score = (val_ema if cfg.best_on == "ema" else val)["acc1"]
    improved = score > r.best["acc1"]
    if improved:
        r.best = {"acc1": score, "epoch": epoch, "on": cfg.best_on}
    skipped = stats.pop("skipped_images", 0)
    if cfg.skip_bad_images:
        stats["skipped_images"] = skipped
        val["skipped_images"] = len(r.val_loader.dataset) - val["count"]
    record = {"epoch": epoch, **r.methods.epoch_fields(), "global_step": global_step,
              "train_examples": len(subset) if subset is not None else len(r.train_loader.dataset),
              **{f"train_{k}": v for k, v in stats.items()},
              **{f"val_{k}": v for k, v in val.items()},
              **({f"val_ema_{k}": v for k, v in val_ema.items()} if val_ema else {}),
              **{f"val_{suffix}_{k}": v for suffix, s in val_extra.items() for k, v in s.items()},
              "best_acc1": r.best["acc1"], "n_parameters": r.n_params, "wall_seconds": time.perf_counter() - wall_start[0],
              "process_started": wall_start[1]}
    try:
        log.log_epoch(record)
    except LogWriteError as e:        # the checkpoint first: a logging failure must not cost the training state
        unlogged: Optional[LogWriteError] = e
    else:
        unlogged = None
    log.info(f"Epoch {epoch + 1}/{cfg.total_epochs()}: train loss {stats['loss']:.4f} | val top-1 {val['acc1']:.2f}"
             + (f" | EMA top-1 {val_ema['acc1']:.2f}" if val_ema else "")
             + "".join(f" | {suffix} top-1 {s['acc1']:.2f}" for suffix, s in val_extra.items())
             + f" | {stats['images_per_s']:.0f} img/s | {format_seconds(stats['epoch_seconds'])}"
             + (f" | skipped {stats['skipped_images']} unreadable images" if stats.get("skipped_images") else "")
             + (f" | {r.methods.epoch_text()}" if r.methods.epoch_text() else ""))
    methods_state = r.methods.state_dict()       # on every rank: a method may gather its per-rank state here
    stopping = stop.requested(dev)
    if r.dist.is_main and ((epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.total_epochs() or improved
                            or stopping or unlogged is not None):
        out = cfg.output_dir
        state = checkpoint_state(r, epoch, Position(epoch + 1, 0, global_step), methods_state, record=record)
        ckpt_io.save_checkpoint(state, os.path.join(out, "checkpoint.pth"))
        if improved:           # after checkpoint.pth: best.pth is never newer than the best epoch it records
            ckpt_io.link_best(os.path.join(out, "checkpoint.pth"), os.path.join(out, "best.pth"))
    barrier()
    if any_rank(unlogged is not None, dev):
        raise RunDirError(f"{unlogged}; the epoch's checkpoint is saved: free space (or restore the directory) and "
                          f"continue with --resume auto") if unlogged else PeerStopped()
    return record, stopping


def check_finite_weights(r: Run, epoch: int, global_step: int) -> None:
    """Stop before a non-finite model or EMA can be evaluated, logged or saved over the last good checkpoint (a
    finite loss does not prove the update that followed it finite)."""
    for who, model in (("model", r.model), ("EMA", r.model_ema.module if r.model_ema is not None else None)):
        if model is None:
            continue
        if bool(torch.isfinite(nn.utils.get_total_norm([p.detach() for p in model.parameters()]))):
            continue                            # one reduction and one sync; the scan below only if it is not finite
        bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if bad is not None:                     # (None: finite weights whose norm overflowed)
            raise NonFiniteLossError(
                f"the {who}'s weights are not finite after epoch {epoch + 1} (global iteration {global_step}; "
                f"e.g. {bad}): stopped without saving; the last checkpoint is intact: resume it with a lower --lr "
                f"or --clip_grad")


def train(r: Run, stop: StopSignals) -> Dict[str, Any]:
    """The epoch loop, from ``r.start``; a signal ends it with a checkpoint (:class:`Stopped`)."""
    cfg, dist, log = r.cfg, r.dist, r.log
    s = r.settings
    log.info(f"model {cfg.model}: {r.n_params / 1e6:.2f}M params, {r.nb_classes} classes, input {s.input_size}px | "
             f"world {dist.world_size} x batch {s.batch_size} x accum {s.grad_accum_steps} | lr {r.lr:.3e} | "
             f"amp {r.amp_dtype or 'off'} | loader {cfg.loader} x {r.train_loader.num_workers} workers | "
             f"methods: {r.methods.describe()}")
    note = nproc_note(cfg, dist.world_size)
    if note:
        log.info(note)
    r.scheduler.step(lr_epoch(cfg, r.start.epoch))
    global_step = r.start.global_step
    wall_start = (time.perf_counter(), round(time.time(), 3))    # this process's clock, and when it started
    history = []
    stop.armed = True
    for epoch in range(r.start.epoch, cfg.total_epochs()):
        apply_recipe(r, epoch)
        subset, done, resumed = begin_epoch(r, epoch, global_step)
        epoch_start_step = global_step - done
        stats = train_one_epoch(
            r.train_model, r.criterion, r.train_loader, r.optimizer, dist.device, epoch, cfg.total_epochs(), log,
            amp_dtype=r.amp_dtype, scaler=r.scaler, model_ema=r.model_ema, mixup_fn=r.mixup_fn,
            clip_grad=cfg.clip_grad, accum_steps=r.settings.grad_accum_steps, print_freq=cfg.print_freq,
            world_size=dist.world_size, methods=r.methods, global_step=epoch_start_step, log_every=cfg.log_every,
            iters_per_epoch=r.iters_per_epoch, should_stop=lambda: stop.requested(dist.device),
            input_size=r.settings.input_size if r.resizing else None, set_lr=lr_setter(r, epoch),
            epoch_iters=trained_iterations(r, r.settings, done + len(r.train_loader)), **resumed)
        global_step = epoch_start_step + stats["iters"]
        check_finite_weights(r, epoch, global_step)          # before anything of this epoch is evaluated or saved
        if "stopped_at" in stats:
            save_mid_epoch(r, epoch, stats, subset, global_step, stop)
        r.scheduler.step(lr_epoch(cfg, epoch + 1))
        record, stopping = end_epoch(r, epoch, stats, subset, global_step, wall_start, stop)
        history.append(record)
        if stopping and epoch + 1 < cfg.total_epochs():      # a signal during the last epoch: the run is done
            raise Stopped(f"stopped by {stop.name} after epoch {epoch + 1}/{cfg.total_epochs()}: saved "
                          f"{os.path.join(cfg.output_dir, 'checkpoint.pth')}; continue with --resume auto")
    return finish(r, history)


def finish(r: Run, history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """``summary.json`` of the whole run: its last epoch, best epoch and times over every process that trained it
    (read back from ``log.jsonl``, which a resumed run keeps as one uninterrupted run's)."""
    log, out = r.log, r.cfg.output_dir
    records = read_log(os.path.join(out, "log.jsonl")) if r.dist.is_main else history
    records = records or history
    summary = {"final": records[-1] if records else None, "best": r.best, "epochs": len(records),
               **run_totals(records), "methods": r.methods.summary(), "output_dir": os.path.abspath(out)}
    if r.dist.is_main and records:
        ckpt_io.write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
        last = records[-1]
        log.info("=" * 78)
        log.info(f"done: {len(records)} epochs in {format_seconds(summary['wall_seconds'])}"
                 + (f" over {summary['processes']} processes" if summary["processes"] > 1 else "")
                 + f" ({summary['images_per_s']:.0f} train img/s)")
        log.info(f"final val top-1 {last['val_acc1']:.2f}" + (f", EMA {last['val_ema_acc1']:.2f}" if "val_ema_acc1" in last else "")
                 + f"; best ({r.best['on']}) {r.best['acc1']:.2f} at epoch {r.best['epoch'] + 1}")
        if len(r.methods):
            log.info(f"methods: {r.methods.describe()}")
        names = [n + ("/" if os.path.isdir(os.path.join(out, n)) else "") for n in ckpt_io.RUN_FILES + ckpt_io.RUN_DIRS
                 if os.path.exists(os.path.join(out, n))]
        log.info(f"outputs: {os.path.abspath(out)} ({', '.join(names)})")
    return summary


def run(cfg: Config, dist: DistInfo, overwrite: bool = False, stop: Optional[StopSignals] = None) -> Dict[str, Any]:
    """Check everything, then (rank 0) lock and prepare the run directory, then train (or evaluate)."""
    stop = stop or StopSignals()
    log = RunLogger(enabled=dist.is_main)
    try:
        check_output(cfg, dist, overwrite)
        r = build(cfg, dist, log)
        if cfg.eval:
            return evaluate_only(r)
        done = r.start.epoch >= cfg.total_epochs()
        if done:
            log.info(f"nothing to train: the checkpoint has finished {r.start.epoch} of {cfg.total_epochs()} epochs "
                     f"(raise --epochs to train longer)")
            if os.path.isfile(os.path.join(cfg.output_dir, "summary.json")):
                return {"final": None, "best": r.best}
        lock = open_run_dir(r, overwrite)
        try:                     # (a finished run that stopped before its summary was written gets it now)
            return finish(r, []) if done else train(r, stop)
        finally:
            log.close()
            if lock is not None:
                lock.release()
    finally:
        log.close()


# ------------------------------------------------------------------------------------------------ entry point
def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, overwrite = parse_args(argv)
    except CONFIG_ERRORS as e:
        print(f"config error: {one_line(e)}", file=sys.stderr)
        return EXIT_CONFIG
    dist = None
    with StopSignals() as stop:
        try:
            dist = init_distributed(cfg.device)
            run(cfg, dist, overwrite, stop)
            return EXIT_OK
        except Stopped as e:
            if dist is None or dist.is_main:
                print(str(e), file=sys.stderr, flush=True)
            return EXIT_STOPPED
        except Abort as e:
            name = signal.Signals(e.signum).name
            if dist is None or dist.is_main:
                print(f"interrupted by {name}: stopped without saving; the last checkpoint (if any) is intact",
                      file=sys.stderr, flush=True)
            return 128 + e.signum
        except PeerStopped:
            return EXIT_ERROR
        except CONFIG_ERRORS as e:
            if dist is None or dist.is_main:
                print(f"config error: {one_line(e)}", file=sys.stderr)
            return EXIT_CONFIG
        except RUN_ERRORS as e:
            prefix = f"[rank {dist.rank}] " if dist is not None and dist.distributed and not dist.is_main else ""
            print(f"{prefix}error: {one_line(e)}", file=sys.stderr)
            return EXIT_ERROR
        except (torch.distributed.DistError, RuntimeError) as e:
            if dist is None or not dist.distributed or not peer_failure(e):
                raise
            print(f"[rank {dist.rank}] error: another process of the run failed ({one_line(e)[:120]}); stopped "
                  f"without saving: the last checkpoint is intact", file=sys.stderr)
            return EXIT_ERROR
        finally:
            cleanup()


if __name__ == "__main__":
    sys.exit(main())
