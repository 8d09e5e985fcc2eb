"""``python main.py --config CFG --plan``: the whole schedule of a run, before spending the GPUs.

One row per span of epochs where anything changes (phase, input size, RandAugment, batch and accumulation, optimizer
updates per epoch, every active method's state through :meth:`methods.Method.plan_state`), with the lr at the span's
start, then the totals:
training FLOPs (:func:`measure.model_flops`), the ideal speed-up against the same recipe without its methods, and
the images seen. It reads the config only: no data, no outputs, no device. The process count is the recipe's
``nproc`` (``--nproc N`` overrides it; 1 without either). An unknown ``min_lr`` (``null``) shows as unknown.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

import measure
from files import first_line
from methods import Clock, MethodSet
from recipe import (PER_UPDATE, build_scheduler, lr_epoch, lr_update, planned_iterations, scaled_lr, settings_at,
                    updates_per_epoch)


def _lrs(cfg, nproc: int, epochs: int, images: int) -> List[Optional[float]]:
    """The lr each epoch starts with (after the linear rule at ``nproc`` processes; per-iteration schedules: at the
    epoch's first update); ``None`` where it depends on an unknown ``min_lr``."""
    unknown = cfg.min_lr is None
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=scaled_lr(cfg, nproc))
    updates = updates_per_epoch(cfg, images, nproc)
    sched = build_scheduler(cfg, opt, updates)
    out = []
    for e in range(epochs):
        t = lr_epoch(cfg, e)
        if cfg.sched_step in PER_UPDATE:
            sched.step_update(lr_update(cfg, e, 0, updates))
        else:
            sched.step(t)
        known = not unknown or (t < cfg.warmup_epochs) or cfg.sched == "constant"
        out.append(opt.param_groups[0]["lr"] if known else None)
    return out


def plan(cfg, nproc: Optional[int] = None) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """``(rows, totals)`` of the run's schedule (see the module docstring)."""
    nproc = int(nproc or cfg.nproc or 1)
    total = cfg.total_epochs()
    try:
        images: Optional[int] = measure.images_per_epoch(cfg)
    except ValueError:
        images = None
    iters = measure.iterations_per_epoch(cfg, images or 1_281_167, nproc)
    methods = MethodSet.from_config(cfg)
    patch = int(cfg.model_kwargs.get("patch_size", _patch_size(cfg.model)))
    lrs = _lrs(cfg, nproc, total, images or 1_281_167)
    fraction = methods.data_fraction((cfg.input_size // patch) ** 2, cfg.epochs, iters)
    rows: List[Dict[str, Any]] = []
    for e in range(total):
        phase = "warm-up" if e < cfg.warmup_epochs else ("cooldown" if e >= cfg.epochs else "")
        clock = Clock(e, 0, e * iters, iters, total)
        s = settings_at(cfg, methods, e)          # the config's recipe with what the methods change this epoch
        patches = (s.input_size // patch) ** 2
        state = {"phase": phase, "input_size": s.input_size, "aa": s.aa or "none",
                 "batch": f"{s.batch_size} x {nproc} x {s.grad_accum_steps} = "
                          f"{s.batch_size * nproc * s.grad_accum_steps}",
                 "updates": (str(planned_iterations(cfg, s, images, nproc, fraction)[1]) if images
                             else "unknown"),
                 **{m.name: m.plan_state(clock, patches) or "-" for m in methods}}
        if rows and rows[-1]["state"] == state:
            rows[-1]["last"] = e
            continue
        rows.append({"first": e, "last": e, "lr": lrs[e], "state": state})
    totals: Dict[str, Any] = {"epochs": total, "nproc": nproc, "images_per_epoch": images,
                              "images_seen": images * total * fraction if images else None}
    try:
        report = measure.model_flops(cfg, measure.num_classes_of(cfg), images=images, world_size=nproc,
                                     methods=methods)
        per_epoch = measure.epoch_flops(report, images)
        run_total = sum(per_epoch) + cfg.cooldown_epochs * per_epoch[-1]
        full_total = report["full"].fvcore.total * measure.FWD_BWD_FACTOR * images * total
        totals.update(flops=run_total, full_flops=full_total, ideal_speedup=full_total / run_total if run_total else 1.0)
    except Exception as e:  # noqa: BLE001 -- a model or dataset the counter cannot size: the rows still stand
        totals.update(flops=None, full_flops=None, ideal_speedup=None, flops_error=first_line(e)[:120])
    return rows, totals


def phase_boundaries(cfg, nproc: Optional[int] = None) -> Dict[str, List[int]]:
    """Per active method, the epochs where its plan state changes: the phase boundaries comparison plots mark."""
    nproc = int(nproc or cfg.nproc or 1)
    try:
        images: Optional[int] = measure.images_per_epoch(cfg)
    except ValueError:
        images = None
    iters = measure.iterations_per_epoch(cfg, images or 1_281_167, nproc)
    patches = (cfg.input_size // int(cfg.model_kwargs.get("patch_size", _patch_size(cfg.model)))) ** 2
    return MethodSet.from_config(cfg).boundaries(cfg.total_epochs(), iters, patches)


def _patch_size(model_name: str) -> int:
    import re
    m = re.search(r"patch(\d+)", model_name)
    return int(m.group(1)) if m else 16


def format_plan(cfg, rows: List[Dict[str, Any]], totals: Dict[str, Any]) -> str:
    names = [k for k in rows[0]["state"] if k not in ("phase", "input_size", "aa", "batch", "updates")] if rows else []
    head = ["epochs", "phase", "input", "RandAugment", "batch/proc x procs x accum", "updates/epoch", "lr at start",
            *names]
    table = [head]
    for r in rows:
        s = r["state"]
        lr = "unknown (min_lr: null)" if r["lr"] is None else f"{r['lr']:.3e}"
        table.append([f"{r['first']}-{r['last']}", s["phase"] or "-", str(s["input_size"]), s["aa"], s["batch"],
                      s["updates"], lr, *[s[n] for n in names]])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [f"plan of {cfg.model}: {totals['epochs']} epochs ({cfg.epochs} + {cfg.cooldown_epochs} cooldown) on "
             f"{totals['nproc']} process(es), sched_step {cfg.sched_step}, min_lr "
             f"{'unknown (null)' if cfg.min_lr is None else cfg.min_lr}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    if totals.get("flops") is not None:
        lines.append(f"training FLOPs {totals['flops'] / 1e18:.3f} EFLOPs; same recipe without methods "
                     f"{totals['full_flops'] / 1e18:.3f} EFLOPs; ideal speed-up {totals['ideal_speedup']:.3f}x")
    else:
        lines.append(f"training FLOPs unknown ({totals.get('flops_error', 'no dataset size')})")
    seen = totals.get("images_seen")
    lines.append(f"images seen {seen:,.0f} ({totals['images_per_epoch']:,} per epoch)" if seen
                 else "images seen unknown (no dataset size for this data_set)")
    return "\n".join(lines)
