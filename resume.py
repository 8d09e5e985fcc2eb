"""Continuing a run from its checkpoint: reading the checkpoint ``resume`` names, restoring the weights, optimizer,
scaler and position from it (one line per config key changed since), checking that a position inside an epoch still
means the same batches, and what a checkpoint holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import checkpoint as ckpt_io
from checkpoint import CheckpointError, ResumeState
from config import Config, ConfigError
from files import first_line
from models.resize import input_size_of, set_input_size
from recipe import scaled_lr, settings_at

SCHEDULE_KEYS = ("lr", "epochs", "warmup_epochs", "min_lr", "warmup_lr", "sched", "decay_epochs", "decay_rate",
                 "lr_base_batch", "unscale_lr", "batch_size", "grad_accum_steps", "cooldown_epochs", "sched_step")


@dataclass
class Position:
    """Where training continues: an epoch, the iterations of it already trained, the global iteration counter."""
    epoch: int = 0
    step: int = 0
    global_step: int = 0


def load_resume(cfg: Config) -> Tuple[Optional[str], Optional[Dict[str, Any]], Any]:
    """The checkpoint ``resume`` names (``auto``: output_dir/checkpoint.pth when present), read and checked, and the
    file's stamp before it was read (the run directory checks it again under the lock)."""
    path = ckpt_io.resume_path(cfg.resume, cfg.output_dir)
    if path is None:
        if cfg.eval and not cfg.finetune:
            raise ConfigError(f"eval: --resume {cfg.resume or '(empty)'} found no checkpoint in {cfg.output_dir}; "
                              f"point --resume at a checkpoint file (e.g. {cfg.output_dir}/best.pth)")
        return None, None, None
    stamp = ckpt_io.file_stamp(path)
    return path, ckpt_io.load_checkpoint(path, "resume"), stamp


def restore(r, path: str, ckpt: Dict[str, Any], stamp: Any = None) -> None:
    """Continue from a checkpoint: weights, optimizer state (unless ``resume_optimizer: false``, with the config's
    hyper-parameters), scaler, position, best record; one line per config key that changed since it was written.
    ``r``: the :class:`main.Run` being built."""
    cfg, log = r.cfg, r.log
    rs = ckpt_io.resume_state(ckpt, path, stamp)
    saved_size = (ckpt.get("clock") or {}).get("input_size")
    if r.resizing and saved_size:
        set_input_size(r.model, int(saved_size), [r.optimizer])   # the size it was saved at, before weights and moments load
    ckpt_io.load_weights_strict(r.model, ckpt_io.model_state(ckpt), f"resume {path}")
    if cfg.resume_optimizer:
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in r.optimizer.param_groups]
        try:
            r.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"resume: the optimizer state in {path} does not fit this model's parameter groups "
                                  f"({first_line(e)}); resume with --resume_optimizer false to start it afresh") from None
        for group, hyper in zip(r.optimizer.param_groups, fresh):
            group.update(hyper)                  # lr, weight decay, betas ... come from the config
    else:
        log.info("resume: resume_optimizer is false: the optimizer's moments start afresh")
    if r.scaler is not None and ckpt.get("scaler"):
        r.scaler.load_state_dict(ckpt["scaler"])
    r.start = Position(rs.next_epoch, rs.step, rs.global_step if rs.global_step is not None
                       else rs.next_epoch * len(r.train_loader))
    r.best = ckpt.get("best") or r.best
    r.iters_per_epoch = (ckpt.get("clock") or {}).get("iters_per_epoch")
    if (not rs.mid_epoch and rs.next_epoch > 0
            and settings_at(cfg, r.methods, rs.next_epoch - 1).loader_key() != r.settings.loader_key()):
        r.iters_per_epoch = None          # the checkpoint ends a phase of another batch: this loader's own length
    r.resume = rs
    if rs.mid_epoch:
        check_mid_epoch(r, rs)
    where = f"epoch {rs.next_epoch + 1}" + (f", iteration {rs.step + 1}" if rs.step else "")
    log.info(f"resumed from {path}: continuing at {where}")
    if rs.timm_format:
        log.info(f"resume: {path} has no lr scheduler state (timm's format); the schedule is rebuilt from this config")
    old = _flatten(ckpt.get("config") or {})
    new = _flatten(cfg.to_dict())
    for key in sorted(set(old) | set(new)):
        if key in ("resume", "eval", "resume_optimizer") or old.get(key) == new.get(key) or not old:
            continue
        note = " (the lr schedule is rebuilt with it)" if key in SCHEDULE_KEYS else ""
        log.info(f"resume: {key} changed from {old.get(key)!r} to {new.get(key)!r}{note}")
    saved = (ckpt.get("clock") or {}).get("world_size")
    if saved and saved != r.dist.world_size:
        per = cfg.batch_size * cfg.grad_accum_steps
        log.info(f"resume: processes changed from {saved} to {r.dist.world_size}: global batch {per * saved} -> "
                 f"{per * r.dist.world_size}, lr {scaled_lr(cfg, saved):.3e} -> {r.lr:.3e}"
                 + (" (unscale_lr: as given)" if cfg.unscale_lr else " (linear rule; the lr schedule is rebuilt)"))


def check_mid_epoch(r, rs: ResumeState) -> None:
    """A checkpoint taken inside an epoch continues only where its batches mean the same thing (``r``: the run)."""
    mid = rs.mid_epoch
    sampler = r.train_loader.sampler
    now = {"world_size": r.dist.world_size, "batch_size": r.settings.batch_size,
           "grad_accum_steps": r.settings.grad_accum_steps}
    diff = [f"{k} {mid.get(k)} -> {v}" for k, v in now.items() if mid.get(k) != v]
    if not diff:
        mine = mid["ranks"][r.dist.rank]
        n = len(r.train_loader.dataset)
        if mine.get("dataset_len", n) != n:          # the epoch's subset holds indices of the old dataset
            diff.append(f"training set size {mine['dataset_len']} -> {n}")
        sampler.set_epoch(rs.next_epoch)
        sampler.set_indices(None if mine["subset"] is None else mine["subset"].tolist())
        if len(sampler) != mine["sampler_len"]:
            diff.append(f"training samples per process {mine['sampler_len']} -> {len(sampler)}")
    if diff:
        raise CheckpointError(f"resume: {rs.path} stopped inside epoch {rs.next_epoch + 1} at iteration {rs.step}; "
                              f"that position needs the same {', '.join(diff)}: resume with the old values")


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("model_kwargs", "teacher_kwargs"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def checkpoint_state(r, last_done: int, at: Position, methods_state, mid=None, record=None) -> Dict[str, Any]:
    """What ``checkpoint.pth`` holds of the run ``r``; ``record``: the finished epoch's ``log.jsonl`` record (a resume
    writes it back when the log lost it)."""
    return {"log_record": record, "model": r.model.state_dict(),
            "model_ema": r.model_ema.module.state_dict() if r.model_ema is not None else None,
            "optimizer": r.optimizer.state_dict(), "lr_scheduler": r.scheduler.state_dict(),
            "scaler": r.scaler.state_dict() if r.scaler is not None else None,
            "epoch": last_done, "global_step": at.global_step,
            "clock": {"epoch": at.epoch, "step": at.step, "global_step": at.global_step,
                      "iters_per_epoch": r.iters_per_epoch, "world_size": r.dist.world_size,
                      **({"input_size": input_size_of(r.model)} if r.resizing else {})},
            "mid_epoch": mid, "methods": methods_state, "best": r.best, "config": r.cfg.to_dict(),
            "version": ckpt_io.VERSION}
