"""Train or evaluate a timm ViT with the DeiT recipe, optionally with training-acceleration methods (plug-ins).

    python main.py --config configs/demo.yaml
    torchrun --nproc_per_node=8 main.py --config configs/deit_s_toe.yaml --data_path /data/imagenet
    python main.py --config configs/deit_s.yaml --eval true --resume runs/deit_s/best.pth

Every ``--key value`` after the config overrides that key (``--toe.keep_rates [0.4,0.7,1.0]``, ``--toe none``,
``--methods [pss]``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import List, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import checkpoint as ckpt_io
from config import Config, ConfigError, load_config, save_config
from datasets import DatasetError, build_loaders, check_num_classes
from distributed import DistInfo, barrier, cleanup, init_distributed, seed_all
from engine import AMP_DTYPES, DistillationLoss, NonFiniteLossError, evaluate, train_one_epoch
from logger import RunLogger, format_seconds
from methods import Clock, MethodError, MethodSet
from models import create_model
from token_labels import TokenLabelError

def parse_args(argv: List[str]) -> Config:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nAll keys, their defaults and meaning: see config.py and README.md (Config reference).")
        sys.exit(0)
    path = None
    rest = list(argv)
    for i, a in enumerate(rest):
        if a == "--config" and i + 1 < len(rest):
            path = rest[i + 1]
            del rest[i:i + 2]
            break
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
            del rest[i]
            break
    return load_config(path, rest)


def resolve_amp(cfg: Config, device: torch.device) -> Optional[torch.dtype]:
    if cfg.amp == "none" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ConfigError(f"amp: '{cfg.amp}' needs a GPU; mixed precision is off on CPU (use amp: auto or none)")
    return torch.bfloat16 if cfg.amp == "auto" else AMP_DTYPES[cfg.amp]


def scaled_lr(cfg: Config, world_size: int) -> float:
    """DeiT's linear rule: lr x global batch / lr_base_batch (global batch includes accumulation)."""
    if cfg.unscale_lr:
        return cfg.lr
    return cfg.lr * cfg.batch_size * world_size * cfg.grad_accum_steps / cfg.lr_base_batch


def build_criterion(cfg: Config, nb_classes: int, device: torch.device):
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None:
        if cfg.batch_size % 2:
            raise ConfigError(f"batch_size: {cfg.batch_size} must be even when mixup/cutmix is on")
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                         prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                         label_smoothing=cfg.smoothing, num_classes=nb_classes)
        base = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        base = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        base = nn.CrossEntropyLoss()
    if cfg.token_label is not None:
        from token_labels import TokenLabelCriterion
        tl = cfg.token_label
        return TokenLabelCriterion(nb_classes, tl.size, cfg.smoothing, tl.cls_weight, tl.dense_weight, tl.cls_target), None
    teacher = None
    if cfg.distillation_type != "none":
        import timm
        teacher = timm.create_model(cfg.teacher_model, pretrained=False, num_classes=nb_classes, **cfg.teacher_kwargs)
        ckpt_io.load_weights_strict(teacher, ckpt_io.model_state(ckpt_io.load_checkpoint(cfg.teacher_path)),
                                    f"teacher_path {cfg.teacher_path}")
        teacher.to(device).eval()
    return DistillationLoss(base, teacher, cfg.distillation_type, cfg.distillation_alpha, cfg.distillation_tau), mixup_fn


def run(cfg: Config, dist: DistInfo) -> dict:
    device = dist.device
    amp_dtype = resolve_amp(cfg, device)
    out = cfg.output_dir
    log = RunLogger(out, enabled=dist.is_main, tensorboard=cfg.tensorboard)
    if dist.is_main:
        save_config(cfg, os.path.join(out, "config.yaml"))
    seed_all(cfg.seed + dist.rank)

    train_loader, val_loader, nb_classes = build_loaders(cfg, dist.rank, dist.world_size, cfg.seed)
    check_num_classes(cfg.nb_classes, nb_classes)
    methods = MethodSet.from_config(cfg)
    model = create_model(cfg, nb_classes, methods)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if cfg.token_label is not None and grid is not None and tuple(grid) != (cfg.token_label.size,) * 2:
        raise ConfigError(f"token_label.size: {cfg.token_label.size} does not match the model's {tuple(grid)} token grid "
                          f"at input_size {cfg.input_size}; set it to input_size / patch size")
    if cfg.distillation_type != "none":
        if not hasattr(model, "set_distilled_training"):
            raise ConfigError(f"distillation_type: '{cfg.distillation_type}' needs a distilled model "
                              f"(e.g. deit_small_distilled_patch16_224), not {cfg.model}")
        model.set_distilled_training(True)
    if cfg.finetune:
        report = ckpt_io.adapt_for_finetune(model, ckpt_io.model_state(ckpt_io.load_checkpoint(cfg.finetune)),
                                            f"finetune {cfg.finetune}")
        log.info(f"fine-tuning from {cfg.finetune}: dropped {report['dropped'] or 'nothing'}, "
                 f"resampled {report['resampled'] or 'nothing'}")
    model.to(device)
    model_ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3
        model_ema = ModelEmaV3(model, decay=cfg.model_ema_decay)
    methods.attach([model, model_ema.module if model_ema is not None else None])
    model_without_ddp = model
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    lr = scaled_lr(cfg, dist.world_size)
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    opt_kwargs = {"momentum": cfg.momentum} if cfg.opt == "sgd" else {"eps": cfg.opt_eps}
    if cfg.opt_betas is not None:
        opt_kwargs["betas"] = tuple(cfg.opt_betas)
    optimizer = create_optimizer_v2(model_without_ddp, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    layer_decay=cfg.layer_decay, **opt_kwargs)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs,
                                       decay_rate=cfg.decay_rate, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
                                       warmup_epochs=cfg.warmup_epochs, cooldown_epochs=0)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    criterion, mixup_fn = build_criterion(cfg, nb_classes, device)

    start_epoch, best, global_step = 0, {"acc1": -1.0, "epoch": -1, "on": cfg.best_on}, 0
    resume, ema_loaded = ckpt_io.resume_path(cfg.resume, out), False
    if resume:
        state = ckpt_io.load_checkpoint(resume)
        ckpt_io.load_weights_strict(model_without_ddp, ckpt_io.model_state(state), f"resume {resume}")
        if model_ema is not None and isinstance(state.get("model_ema"), dict):
            ckpt_io.load_weights_strict(model_ema.module, state["model_ema"], f"resume {resume} (EMA)")
            ema_loaded = True
        if not cfg.eval and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["lr_scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start_epoch = int(state["epoch"]) + 1
            best = state.get("best", best)
            global_step = int(state.get("global_step", start_epoch * len(train_loader)))
            methods.load_state_dict(state.get("methods") or {})
        log.info(f"resumed from {resume} (epoch {state.get('epoch')})")

    if dist.distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = torch.compile(model) if cfg.compile else model

    if cfg.eval:
        stats = {"model": evaluate(model, val_loader, device, amp_dtype)}
        if ema_loaded:
            stats["ema"] = evaluate(model_ema.module, val_loader, device, amp_dtype)
        for who, s in stats.items():
            log.info(f"eval {who}: top-1 {s['acc1']:.2f}  top-5 {s['acc5']:.2f}  loss {s['loss']:.4f}  on {s['count']} images")
        log.close()
        return stats

    log.info(f"model {cfg.model}: {n_params / 1e6:.2f}M params, {nb_classes} classes, input {cfg.input_size}px | "
             f"world {dist.world_size} x batch {cfg.batch_size} x accum {cfg.grad_accum_steps} | lr {lr:.3e} | "
             f"amp {amp_dtype or 'off'} | methods: {methods.describe()}")
    scheduler.step(start_epoch)
    iters_per_epoch = None         # the period of per-iteration schedules: this process's first epoch's length
    eval_variants = methods.eval_variants()
    wall_start = time.perf_counter()
    train_seconds, images_seen, history = 0.0, 0, []
    for epoch in range(start_epoch, cfg.epochs):
        # reseed per epoch so a resumed run draws the same augmentations as an uninterrupted one
        seed_all(cfg.seed + dist.rank + 1_000_003 * (epoch + 1))
        train_loader.sampler.set_epoch(epoch)
        subset = methods.train_indices(epoch, len(train_loader.dataset))
        train_loader.sampler.set_indices(subset)
        iters_per_epoch = iters_per_epoch or len(train_loader)
        methods.on_epoch(Clock(epoch, 0, global_step, iters_per_epoch, cfg.epochs))
        train_stats = train_one_epoch(
            train_model, criterion, train_loader, optimizer, device, epoch, cfg.epochs, log,
            amp_dtype=amp_dtype, scaler=scaler, model_ema=model_ema, mixup_fn=mixup_fn, clip_grad=cfg.clip_grad,
            accum_steps=cfg.grad_accum_steps, print_freq=cfg.print_freq, world_size=dist.world_size,
            methods=methods, global_step=global_step, iters_per_epoch=iters_per_epoch)
        global_step += train_stats["iters"]
        scheduler.step(epoch + 1)
        train_seconds += train_stats["epoch_seconds"]
        images_seen += train_stats["iters"] * cfg.batch_size * dist.world_size
        val = evaluate(model, val_loader, device, amp_dtype)
        val_ema = evaluate(model_ema.module, val_loader, device, amp_dtype) if model_ema is not None and cfg.model_ema_eval else None
        val_extra = {}
        for suffix, setting in eval_variants.items():
            with setting():
                val_extra[suffix] = evaluate(model, val_loader, device, amp_dtype)
        score = (val_ema if cfg.best_on == "ema" else val)["acc1"]
        improved = score > best["acc1"]
        if improved:
            best = {"acc1": score, "epoch": epoch, "on": cfg.best_on}
        record = {"epoch": epoch, **methods.epoch_fields(), "global_step": global_step,
                  "train_examples": len(subset) if subset is not None else len(train_loader.dataset),
                  **{f"train_{k}": v for k, v in train_stats.items()},
                  **{f"val_{k}": v for k, v in val.items()},
                  **({f"val_ema_{k}": v for k, v in val_ema.items()} if val_ema else {}),
                  **{f"val_{suffix}_{k}": v for suffix, stats in val_extra.items() for k, v in stats.items()},
                  "best_acc1": best["acc1"], "n_parameters": n_params, "wall_seconds": time.perf_counter() - wall_start}
        log.log_epoch(record)
        history.append(record)
        log.info(f"Epoch {epoch + 1}/{cfg.epochs}: train loss {train_stats['loss']:.4f} | val top-1 {val['acc1']:.2f}"
                 + (f" | EMA top-1 {val_ema['acc1']:.2f}" if val_ema else "")
                 + "".join(f" | {suffix} top-1 {stats['acc1']:.2f}" for suffix, stats in val_extra.items())
                 + f" | {train_stats['images_per_s']:.0f} img/s | {format_seconds(train_stats['epoch_seconds'])}"
                 + (f" | {methods.epoch_text()}" if methods.epoch_text() else ""))
        methods_state = methods.state_dict()       # on every rank: a method may gather its per-rank state here
        if dist.is_main:
            state = {"model": model_without_ddp.state_dict(),
                     "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
                     "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "epoch": epoch, "global_step": global_step, "methods": methods_state,
                     "best": best, "config": cfg.to_dict(), "version": ckpt_io.VERSION}
            if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                ckpt_io.save_checkpoint(state, os.path.join(out, "checkpoint.pth"))
            if improved:
                ckpt_io.save_checkpoint(state, os.path.join(out, "best.pth"))
        barrier()

    wall = time.perf_counter() - wall_start
    summary = {"final": history[-1] if history else None, "best": best, "wall_seconds": wall,
               "train_seconds": train_seconds, "images_per_s": images_seen / max(train_seconds, 1e-9),
               "methods": methods.summary(), "output_dir": os.path.abspath(out)}
    if dist.is_main and history:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        last = history[-1]
        log.info("=" * 78)
        log.info(f"done: {len(history)} epochs in {format_seconds(wall)} ({summary['images_per_s']:.0f} train img/s)")
        log.info(f"final val top-1 {last['val_acc1']:.2f}" + (f", EMA {last['val_ema_acc1']:.2f}" if "val_ema_acc1" in last else "")
                 + f"; best ({best['on']}) {best['acc1']:.2f} at epoch {best['epoch'] + 1}")
        if len(methods):
            log.info(f"methods: {methods.describe()}")
        log.info(f"outputs: {os.path.abspath(out)} (config.yaml, log.jsonl, tensorboard/, checkpoint.pth, best.pth, summary.json)")
    log.close()
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    dist = init_distributed(cfg.device)
    try:
        run(cfg, dist)
        return 0
    except (ConfigError, MethodError, DatasetError, TokenLabelError, ckpt_io.CheckpointError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
