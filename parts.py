"""The parts :func:`main.build` puts together, each checked so that a mistake stops the run before anything is
written: the model (a timm ViT the config can build), the criterion and mixup, the val loader's batch, the parameter
count, and every epoch's batch against the samples a process gets.
"""
from __future__ import annotations

import contextlib
import re
import sys
from typing import List, Optional

import torch
from torch import nn

import checkpoint as ckpt_io
from config import Config, ConfigError
from datasets import DatasetError
from engine import DistillationLoss
from extensions import ExtensionError, ExtensionSet
from files import first_line
from methods import MethodError, MethodSet
from models import create_model, vit_problem
from models.resize import at_input_size
from recipe import Settings


def build_model(cfg: Config, nb_classes: int, methods: MethodSet, img_size: Optional[int] = None) -> nn.Module:
    """The timm ViT, patched by the methods; a model timm cannot build from the config is one line naming the key."""
    try:
        model = create_model(cfg, nb_classes, methods, img_size=img_size or cfg.input_size)
    except (MethodError, ConfigError):
        raise
    except TypeError as e:
        m = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(e))
        if m and m.group(2) in cfg.model_kwargs:
            raise ConfigError(f"model_kwargs: '{m.group(2)}' is not an argument of {cfg.model} ({m.group(1)})"
                              f"{_close_arguments(cfg.model, m.group(1), m.group(2))}") from None
        if m:
            raise ConfigError(f"model: {cfg.model} is not a ViT ({m.group(1)} takes no '{m.group(2)}'); this trainer "
                              f"takes timm Vision Transformers such as deit_small_patch16_224, vit_*, lvvit_*") from None
        raise ConfigError(f"model_kwargs: {cfg.model} cannot be built with {cfg.model_kwargs}: {first_line(e)}") from None
    except (ValueError, AssertionError, RuntimeError) as e:
        if not cfg.model_kwargs:
            raise
        raise ConfigError(f"model_kwargs: {cfg.model} cannot be built with {cfg.model_kwargs}: "
                          f"{type(e).__name__}: {first_line(e)}") from None
    problem = vit_problem(model)
    if problem:
        raise ConfigError(f"model: {cfg.model} is not a ViT ({problem}); this trainer takes timm Vision Transformers "
                          f"such as deit_small_patch16_224, vit_*, lvvit_*")
    return model


def _close_arguments(model_name: str, class_name: str, key: str) -> str:
    """``; did you mean 'x'?`` from the model class's constructor arguments."""
    import difflib
    import inspect

    import timm
    module = sys.modules.get(getattr(timm.models.model_entrypoint(model_name), "__module__", ""), None)
    cls = getattr(module, class_name, None)
    if cls is None:
        return ""
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    close = difflib.get_close_matches(key, names, n=2, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; it takes {', '.join(names[:12])}, ..."


def check_model(cfg: Config, model: nn.Module, extensions: Optional[ExtensionSet] = None) -> None:
    """The built model against the config: the extensions' checks (e.g. a label grid) and distillation's head."""
    try:
        (extensions if extensions is not None else ExtensionSet.from_config(cfg)).check_model(model)
    except ExtensionError as e:
        raise ConfigError(str(e)) from None
    if cfg.distillation_type != "none":
        if not hasattr(model, "set_distilled_training"):
            raise ConfigError(f"distillation_type: '{cfg.distillation_type}' needs a distilled model "
                              f"(e.g. deit_small_distilled_patch16_224), not {cfg.model}")
        model.set_distilled_training(True)


def build_criterion(cfg: Config, nb_classes: int, device: torch.device, extensions: Optional[ExtensionSet] = None):
    """The training criterion and mixup: an extension's criterion when one gives it (then no mixup and no
    distillation), else DeiT's (label smoothing or soft targets, with the distillation loss around it)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from cutmix import PublishedBoxMixup

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None:
        if cfg.batch_size % 2:
            raise ConfigError(f"batch_size: {cfg.batch_size} must be even when mixup/cutmix is on")
        mixup_fn = (PublishedBoxMixup if cfg.cutmix_box == "published" else Mixup)(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                         prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                         label_smoothing=cfg.smoothing, num_classes=nb_classes)
        base = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        base = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        base = nn.CrossEntropyLoss()
    replaced = (extensions if extensions is not None else ExtensionSet.from_config(cfg)).criterion(nb_classes)
    if replaced is not None:
        return replaced, None
    teacher = None
    if cfg.distillation_type != "none":
        import timm
        teacher = timm.create_model(cfg.teacher_model, pretrained=False, num_classes=nb_classes, **cfg.teacher_kwargs)
        ckpt_io.load_weights_strict(teacher, ckpt_io.model_state(ckpt_io.load_checkpoint(cfg.teacher_path, "teacher_path")),
                                    f"teacher_path {cfg.teacher_path}")
        teacher.to(device).eval()
    return DistillationLoss(base, teacher, cfg.distillation_type, cfg.distillation_alpha, cfg.distillation_tau), mixup_fn


def count_parameters(model: nn.Module, size: Optional[int] = None) -> int:
    """Trainable parameters, of the model at ``size`` px when given (a curriculum that resizes the position embedding
    reports the count of the model it ends with, whatever the epoch the process started in)."""
    with (at_input_size(model, size) if size is not None else contextlib.nullcontext()):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)


def with_batch_size(loader, batch_size: int):
    """``loader`` with another batch size (the same dataset, sampler, workers and collate). The val loader keeps the
    config's batch through a curriculum of other training batches, so that evaluation does not depend on the epoch
    the process started in."""
    if loader.batch_size == batch_size:
        return loader
    from torch.utils.data import DataLoader
    return DataLoader(loader.dataset, sampler=loader.sampler, batch_size=batch_size, drop_last=loader.drop_last,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers,
                      collate_fn=loader.collate_fn)


def check_recipe_batches(r, every_epoch: List[Settings]) -> None:
    """Every epoch's per-process batch (a curriculum may double it) fits the samples each process of run ``r`` gets."""
    have = len(r.train_loader.sampler)
    for e, s in enumerate(every_epoch):
        if s.batch_size > have:
            raise DatasetError(f"batch_size: epoch {e + 1} trains with a per-process batch of {s.batch_size} (the "
                               f"methods' recipe) but each of {r.dist.world_size} process(es) gets {have} samples per "
                               f"epoch from {r.cfg.data_path}; lower batch_size")
