"""What a run costs: forward FLOPs of every state the run's methods put the model in, total training FLOPs, and
measured training throughput, for any method (the methods declare their states; nothing here knows one by name).

This module builds the models from a config, exactly as for training, and hands them to the two halves, used by
``scripts/flops.py``, ``scripts/benchmark.py``, ``scripts/compare.py`` and ``scripts/sweep.py`` (their public names
are importable from here too):

* **FLOPs** (:func:`model_flops`; the counting in :mod:`flop_count`): fvcore counts of one ``1x3xSxS`` forward pass
  of the plain model and of every method state (:class:`methods.Variant`: a ToE stage, a PSS keep-rate level, ...),
  next to the closed-form ViT cost of the token counts that really entered each block, and the training FLOPs of
  the schedule.
* **Throughput** (:func:`benchmark_training`; the timing in :mod:`throughput`): real optimizer steps of the plain
  model and in every method state, interleaved round-robin in one process so that machine drift hits every variant
  alike, against the FLOPs-ideal speed-up. The efficiency ``measured / ideal`` is what a user of a method actually
  gets.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from devices import resolve_device
from flop_count import (EXTRA_HANDLES, FWD_BWD_FACTOR, FlopCount, VariantFlops, analytic_vit_flops,  # noqa: F401
                        count_flops, epoch_flops, flops_report_json, format_flops_report, input_channels,
                        schedule_training_flops, si_flops, training_flops, unfused_attention, vit_dims)
from methods import MethodError, MethodSet, Variant
from models import create_model
from recipe import base_settings, planned_iterations
from throughput import (OpTimer, Timed, TrainingBench, autocast_for, benchmark_inference, device_name,  # noqa: F401
                        format_benchmark, keep_freed_memory, load_average, process_peak_rss_mb,
                        saved_activations_mb, training_loss, training_rows)


# Training images per epoch. imagenet: the ILSVRC-2012 train split; cifar: the train splits; digits: the
# scikit-learn digits minus every 5th image of each class, which datasets.prepare_digits holds out for val.
DATASET_SIZES = {"imagenet": 1_281_167, "cifar10": 50_000, "cifar100": 50_000, "digits": 1_442}
DATASET_CLASSES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100, "digits": 10}


def images_per_epoch(cfg, override: Optional[int] = None) -> int:
    """Training images per epoch for the config's dataset (``override`` wins; ``folder`` datasets need it)."""
    if override:
        return int(override)
    if cfg.data_set not in DATASET_SIZES:
        raise ValueError(f"no known size for data_set '{cfg.data_set}': pass --images-per-epoch")
    return DATASET_SIZES[cfg.data_set]


def num_classes_of(cfg, override: Optional[int] = None) -> int:
    """The head size to build: ``override``, else ``nb_classes`` from the config, else the dataset's class count."""
    if override:
        return int(override)
    if cfg.nb_classes:
        return int(cfg.nb_classes)
    return DATASET_CLASSES.get(cfg.data_set, 1000)


def iterations_per_epoch(cfg, images: int, world_size: int = 1) -> int:
    """Micro-batches of one epoch of the config's own recipe, counted as a run counts them
    (:func:`recipe.planned_iterations`): the period of per-iteration method schedules (PSS's cycle)."""
    return max(1, planned_iterations(cfg, base_settings(cfg), images, world_size)[0])


def _prepared(model: nn.Module, cfg) -> nn.Module:
    if cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(False)            # recomputation adds no forward FLOPs and does not trace
    return model.eval()


def model_flops(cfg, num_classes: int, input_size: Optional[int] = None, images: Optional[int] = None,
                world_size: int = 1, methods: Optional[MethodSet] = None) -> Dict[str, Any]:
    """fvcore and analytic forward FLOPs of ``cfg.model``: the plain model, and every state the active methods
    declare (combinations of several methods are their product, with the product of the shares).

    The models are built by :func:`models.create_model` exactly as for training. They are counted in eval mode with
    each method state applied (``Variant.apply`` turns the operators on in eval mode too): the same layers and
    token counts as a training forward, without its randomness (dropout, drop-path, LV-ViT's MixToken) or its tuple
    outputs (distilled DeiT, LV-ViT). ``images`` per epoch sets the period of per-iteration schedules. ``methods``:
    the caller's :class:`MethodSet` of ``cfg`` (built here when not given).
    """
    size = int(input_size or cfg.input_size)
    methods = MethodSet.from_config(cfg) if methods is None else methods
    plain = _prepared(create_model(cfg, num_classes, MethodSet([]), img_size=size), cfg)
    params = sum(p.numel() for p in plain.parameters())
    dims = vit_dims(plain)
    in_chans = input_channels(plain)
    prefix = int(getattr(plain, "num_prefix_tokens", 1))

    def measured(label, model, share, epochs, ops, apply=None, at: int = size) -> VariantFlops:
        count = count_flops(model, at, in_chans, ops)
        analytic = analytic_vit_flops(**{**dims, "img_size": at}, block_tokens=count.block_tokens) if dims else {}
        patch_tokens = min(count.block_tokens) - prefix if count.block_tokens else 0
        return VariantFlops(label, share, epochs, patch_tokens, count, analytic, apply)

    full = measured("full tokens", plain, 1.0, None, ())
    num_patches = full.patch_tokens
    iters = iterations_per_epoch(cfg, images or 1_281_167, world_size)
    variants: List[VariantFlops] = []
    if len(methods):
        model = _prepared(create_model(cfg, num_classes, methods, img_size=size), cfg)
        ops = methods.op_modules(model)
        for v in methods.variants(num_patches, cfg.epochs, iters):
            v.apply(model)              # a state with its own input_size resizes the model (a curriculum phase)
            vf = measured(v.label, model, v.share, v.epochs, ops, v.apply, v.input_size or size)
            vf.variant = v
            vf.same_as_full = (vf.fvcore.method_op == 0 and not vf.fvcore.op_acted
                               and vf.fvcore.total == full.fvcore.total
                               and vf.fvcore.block_tokens == full.fvcore.block_tokens)
            check_applied(v, vf.patch_tokens, num_patches)
            variants.append(vf)
    return {"model": cfg.model, "input_size": size, "num_classes": num_classes, "params": params,
            "num_patches": num_patches, "epochs": cfg.epochs, "methods": methods.names,
            "data_fraction": methods.data_fraction(num_patches, cfg.epochs, iters), "full": full, "variants": variants}


def check_applied(v: Variant, counted_tokens: int, num_patches: int) -> None:
    """A state that declares fewer patch tokens must run fewer in the counted (eval-mode) forward: else its
    ``apply`` left the method's operator off in eval mode, and the report would show 1.0x without a word."""
    if v.patch_tokens is not None and v.patch_tokens < num_patches and counted_tokens >= num_patches:
        raise MethodError(f"{v.label}: this state declares {v.patch_tokens} of {num_patches} patch tokens but the "
                          f"model ran all {num_patches} when it was counted (in eval mode); its Variant.apply must "
                          f"turn the method's operator on in eval mode too")


def _timed_states(cfg, num_classes: int, methods: MethodSet, flops: Dict[str, Any], bench: TrainingBench,
                  plain: nn.Module, size: int) -> Tuple[List[Timed], List[nn.Module]]:
    """The plain model and the patched model in every state that differs from it, and the patched models (one per
    input size: a curriculum's phases train at their own)."""
    full = flops["full"]
    timed = [Timed("full tokens", plain, None, full.patch_tokens, full.fvcore.total, size)]
    patched_at: Dict[int, nn.Module] = {}
    for v in flops["variants"]:
        if v.same_as_full:
            continue
        at = (v.variant.input_size if v.variant is not None else None) or size
        if at not in patched_at:
            patched_at[at] = bench.add(create_model(cfg, num_classes, methods, img_size=at))
        timed.append(Timed(v.label, patched_at[at], v.apply, v.patch_tokens, v.fvcore.total, at))
    return timed, list(patched_at.values())


def benchmark_training(cfg, num_classes: int, batch_size: int = 32, steps: int = 5, warmup: int = 2,
                       amp: str = "none", compile: bool = False, device: str = "auto", input_size: Optional[int] = None,
                       flops: Optional[Dict[str, Any]] = None, inference: bool = True, keep_memory: bool = False,
                       log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Median training throughput of the plain model and in every method state that differs from it, plus the
    ideal and measured speed-up.

    One random batch with random labels; each model has its own AdamW optimizer. After ``warmup`` rounds,
    ``steps`` rounds each run one step of every variant in turn (:class:`throughput.TrainingBench`).
    """
    log = log or (lambda msg: None)
    dev = resolve_device(device, key="--device")
    size = int(input_size or cfg.input_size)
    torch.manual_seed(cfg.seed)
    kept_memory = keep_freed_memory() if keep_memory and dev.type == "cpu" else False
    autocast = autocast_for(dev, amp)                    # before the slow parts: a wrong --amp fails at once
    methods = MethodSet.from_config(cfg)
    if flops is None:
        log("counting FLOPs (fvcore) ...")
        flops = model_flops(cfg, num_classes, size, methods=methods)
    bench = TrainingBench(dev, amp, autocast, compile)
    plain = bench.add(create_model(cfg, num_classes, MethodSet([]), img_size=size))
    images = bench.random_batch(batch_size, input_channels(plain), size, num_classes, cfg.seed)
    timed, patched = _timed_states(cfg, num_classes, methods, flops, bench, plain, size)
    op_timer = OpTimer([op for m in patched for op in methods.op_modules(m)], bench.images_for, autocast, dev)
    load_start = load_average()
    bench.run(timed, warmup, steps, op_timer, log)
    result = {
        "model": cfg.model, "methods": methods.names, "input_size": size, "batch_size": batch_size,
        "num_classes": num_classes, "device": str(dev), "device_name": device_name(dev),
        "threads": torch.get_num_threads(), "amp": amp, "compile": compile, "steps": steps, "warmup": warmup,
        "torch": torch.__version__, "keep_freed_memory": kept_memory, "load_average_start": load_start,
        "load_average_end": load_average(),
        "peak_mem_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "n/a on CPU",
        "process_peak_rss_mb": process_peak_rss_mb(), "variants": training_rows(timed, batch_size),
    }
    if inference:       # a fresh model: the states applied above force operators on in eval mode
        fresh = create_model(cfg, num_classes, methods, img_size=size).to(dev)
        result["inference"] = benchmark_inference(fresh, images, steps=steps, warmup=warmup, autocast=autocast,
                                                  compile=compile)
    return result
