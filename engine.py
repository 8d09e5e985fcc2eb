"""One training epoch and one evaluation pass (DeiT's ``engine.py``, with accumulation, clipping, AMP and checks)."""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from timm.utils import AverageMeter

from distributed import all_reduce_sum
from logger import RunLogger, Throughput, format_seconds
from methods import Clock, ExampleBatch, MethodSet


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AmpError(ValueError):
    """An AMP setting the device cannot run; ``str(err)`` is the one line shown to the user."""


def resolve_amp(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """The one AMP rule: ``auto`` is bf16 on a GPU and off elsewhere; ``bf16`` runs on
    any device; ``fp16`` needs a GPU (its loss scaler is CUDA's); ``none`` is off."""
    if amp in (None, "", "none") or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16
    if amp not in AMP_DTYPES:
        raise AmpError(f"amp: '{amp}' is not one of auto, bf16, fp16, none")
    if amp == "fp16" and device.type != "cuda":
        raise AmpError("amp: 'fp16' needs a GPU; use bf16 or none on the CPU")
    return AMP_DTYPES[amp]


class NonFiniteLossError(RuntimeError):
    pass


class DistillationLoss(nn.Module):
    """DeiT's distillation: the class token learns the labels, the distillation token learns from the teacher.

    ``soft``: KL divergence of temperature-scaled distributions, times tau^2; ``hard``: cross-entropy against the
    teacher's argmax. ``alpha`` weighs the distillation term. With ``none`` it is the base criterion alone.
    """

    def __init__(self, base: nn.Module, teacher: Optional[nn.Module], kind: str, alpha: float, tau: float):
        super().__init__()
        self.base, self.teacher, self.kind, self.alpha, self.tau = base, teacher, kind, alpha, tau

    def forward(self, inputs: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        out_kd = None
        if isinstance(outputs, (tuple, list)):
            outputs, out_kd = outputs
        base_loss = self.base(outputs, targets)
        if self.kind == "none":
            return base_loss
        if out_kd is None:
            raise RuntimeError("distillation needs a distilled model (e.g. deit_small_distilled_patch16_224) that "
                               "returns class and distillation logits in training")
        with torch.no_grad():
            teacher_out = self.teacher(inputs)
        if self.kind == "soft":
            t = self.tau
            kd = F.kl_div(F.log_softmax(out_kd / t, dim=1), F.log_softmax(teacher_out / t, dim=1),
                          reduction="sum", log_target=True) * (t * t) / out_kd.numel()
        else:
            kd = F.cross_entropy(out_kd, teacher_out.argmax(dim=1))
        return base_loss * (1 - self.alpha) + kd * self.alpha


def to_device(obj, device: torch.device):
    """Tensors, and tuples/dicts of them, on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _class_logits(outputs) -> torch.Tensor:
    """The class logits among a model's training outputs (distilled DeiT and LV-ViT return tuples, class first)."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def train_one_epoch(model: nn.Module, criterion: nn.Module, loader, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, num_epochs: int, log: RunLogger, *,
                    amp_dtype: Optional[torch.dtype] = None, scaler: Optional[torch.amp.GradScaler] = None,
                    model_ema=None, mixup_fn=None, clip_grad: Optional[float] = None, accum_steps: int = 1,
                    print_freq: int = 20, world_size: int = 1, methods: Optional[MethodSet] = None, log_every: int = 0,
                    global_step: int = 0, iters_per_epoch: Optional[int] = None, start_step: int = 0,
                    resumed: Optional[Dict[str, Any]] = None, on_start: Optional[Callable[[], None]] = None,
                    should_stop: Optional[Callable[[], bool]] = None, input_size: Optional[int] = None,
                    set_lr: Optional[Callable[[int], None]] = None,
                    epoch_iters: Optional[int] = None) -> Dict[str, Any]:
    """Train for one epoch; returns averaged metrics. Stops with :class:`NonFiniteLossError` on a NaN/inf loss.

    Batches are ``(images, *targets, dataset indices)``. ``global_step`` is the iteration counter at the start of
    the epoch; the methods see the clock before every iteration (``per_step`` ones) and the per-example outputs
    after it (those that observe examples).

    A resumed epoch has ``start_step`` iterations behind it (the loader's sampler already skips their batches) and
    the running figures they left (``resumed``: what ``progress`` held when it stopped); ``on_start()`` runs once
    the loader's iterator exists (the trainer restores the RNG states there, after the loader drew its seed). After
    every optimizer update but the epoch's last, ``should_stop()`` is asked (a collective under DDP); when it says
    yes the epoch ends there and the result holds ``stopped_at`` (iterations of the epoch done) and ``progress``.
    With ``input_size`` (a curriculum's current size) batches of another size are brought to it by the methods
    (:meth:`methods.MethodSet.resize_images`) before mixup/cutmix. ``set_lr(k)`` (a per-iteration schedule) runs
    before the first micro-batch of the epoch's ``k``-th optimizer update. With ``log_every`` N > 0, every global
    iteration divisible by N writes a record (:func:`iteration_record`) on rank 0; with 0 nothing is added per step.
    ``epoch_iters`` (``start_step`` included) ends the epoch before the loader does (``main.epoch_iterations``: with
    ``epoch_updates: images``, the micro-batches past ``images // global batch`` updates are not trained).
    """
    model.train()
    if criterion is not None:
        criterion.train()
    methods = methods if methods is not None else MethodSet([])
    resumed = resumed or {}
    num_iters = start_step + len(loader)
    if epoch_iters is not None:
        num_iters = min(num_iters, epoch_iters)
    loss_meter = AverageMeter()
    loss_meter.sum, loss_meter.count = resumed.get("loss_sum", 0.0), resumed.get("loss_count", 0)
    meter = Throughput(num_iters, start_step, resumed.get("images", 0), resumed.get("seconds", 0.0))
    data_time, skipped = resumed.get("data_seconds", 0.0), resumed.get("skipped", 0)
    compute_time = resumed.get("compute_seconds", 0.0)     # forward, backward, step, EMA: no loader wait, no eval
    batches = iter(loader)
    if on_start is not None:
        on_start()
    optimizer.zero_grad(set_to_none=True)
    stopped_at = None
    t_data = time.perf_counter()
    try:
        for it, batch in enumerate(itertools.islice(batches, max(num_iters - start_step, 0)), start=start_step):
            t_compute = time.perf_counter()
            data_time += t_compute - t_data
            if methods.per_step:
                methods.on_step(Clock(epoch, it, global_step + it, iters_per_epoch or num_iters, num_epochs))
            if set_lr is not None and it % accum_steps == 0:
                set_lr(it // accum_steps)
            *data, indices = batch
            skipped += loader.batch_size - len(indices)       # images left out (skip_bad_images)
            images = data[0].to(device, non_blocking=True)
            # (images, class) or, with token labels, (images, class, label map): the criterion gets the rest as targets
            targets = to_device(data[1] if len(data) == 2 else tuple(data[1:]), device)
            labels = targets if torch.is_tensor(targets) else targets[0]
            if input_size is not None and images.shape[-1] != input_size:
                images = methods.resize_images(images, input_size)
            if mixup_fn is not None:
                images, targets = mixup_fn(images, targets)
            update = (it + 1) % accum_steps == 0 or it + 1 == num_iters
            logged = log_every and log.enabled and (global_step + it) % log_every == 0
            sync_ctx = model.no_sync() if (not update and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with sync_ctx:
                with autocast(device, amp_dtype):
                    outputs = model(images)
                    loss = criterion(images, outputs, targets)
                loss_value = loss.item()      # a host sync per step, as in DeiT: it is what catches a NaN at once
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(f"loss is {loss_value} at epoch {epoch} iteration {it}: stopping; the last "
                                             f"checkpoint was written before this epoch and is intact")
                scaled = loss / accum_steps
                if scaler is not None:
                    scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            if methods.observers:
                methods.observe(ExampleBatch(indices, _class_logits(outputs).detach().float(), labels, targets))
            grad_norm = None
            if update:
                if scaler is not None and (clip_grad is not None or logged):
                    scaler.unscale_(optimizer)          # step() would unscale the same way: only the order moves
                if clip_grad is not None:
                    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                elif logged:
                    grad_norm = nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if model_ema is not None:
                    model_ema.update(model)
            if device.type == "cuda":
                torch.cuda.synchronize(device)          # the step's kernels belong to its compute time
            compute_time += time.perf_counter() - t_compute
            loss_meter.update(loss_value, images.shape[0])
            meter.step(images.shape[0] * world_size)
            lr = optimizer.param_groups[0]["lr"]
            if it % print_freq == 0 or it + 1 == num_iters or log.live:
                state = methods.progress()
                log.progress(f"Epoch [{epoch + 1}/{num_epochs}] [{it + 1}/{num_iters}] eta {format_seconds(meter.eta(it + 1))} "
                             f"loss {loss_value:.4f} ({loss_meter.avg:.4f}) lr {lr:.3e} {meter.rate():.1f} img/s"
                             + (f" {state}" if state else ""), final=it + 1 == num_iters)
            if logged:
                log.log_iteration(iteration_record(epoch, it, global_step + it, loss_value, loss_meter.avg,
                                                   optimizer, grad_norm, meter.elapsed(), methods))
            elif not log_every and it % print_freq == 0:
                log.scalar("iter/loss", loss_value, global_step + it)
                log.scalar("iter/lr", lr, global_step + it)
            if update and it + 1 < num_iters and should_stop is not None and should_stop():
                stopped_at = it + 1
                break
            t_data = time.perf_counter()
    finally:         # loader workers ignore SIGINT/SIGTERM: stop them here, also when the epoch ends early
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    progress = {"loss_sum": loss_meter.sum, "loss_count": loss_meter.count, "images": meter.images,
                "seconds": meter.elapsed(), "data_seconds": data_time, "compute_seconds": compute_time,
                "skipped": skipped}
    if stopped_at is not None:
        return {"stopped_at": stopped_at, "iters": stopped_at, "progress": progress}
    total, count, skipped = all_reduce_sum([loss_meter.sum, loss_meter.count, skipped], device)
    return {"loss": total / max(count, 1), "lr": optimizer.param_groups[0]["lr"], "images_per_s": meter.rate(),
            "epoch_seconds": meter.elapsed(), "data_seconds": data_time, "compute_seconds": compute_time,
            "iters": num_iters,
            "skipped_images": int(skipped)}


def iteration_record(epoch: int, step: int, iteration: int, loss: float, loss_avg: float, optimizer,
                     grad_norm: Optional[torch.Tensor], seconds: float, methods: MethodSet) -> Dict[str, Any]:
    """One line of ``iterations.jsonl``: where (global ``iteration``, ``epoch``, ``step`` in it), this micro-batch's
    loss and the epoch's running mean (rank 0's), the schedule's lr (the largest of the parameter groups: with
    ``layer_decay`` the lower layers train at a fraction of it), the gradient norm before clipping (``None`` between
    updates of an accumulation, or when it is not finite), the epoch's seconds so far, each method's state."""
    norm = None if grad_norm is None else grad_norm.item()
    return {"iteration": iteration, "epoch": epoch, "step": step, "loss": loss, "loss_avg": loss_avg,
            "lr": max(g["lr"] for g in optimizer.param_groups),
            "grad_norm": norm if norm is not None and math.isfinite(norm) else None, "seconds": seconds,
            **methods.step_fields()}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             resize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, float]:
    """Top-1/top-5 and loss over the whole (sharded, unpadded) validation set, summed exactly across ranks
    (``resize``: what brings a batch to the model's input size, when the loader's is another)."""
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]   # loss, top1, top5, count
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if resize is not None:
            images = resize(images)
        with autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        sums[0] += F.cross_entropy(output, targets, reduction="sum").item()
        top5 = output.topk(min(5, output.shape[1]), dim=1).indices
        hit = top5 == targets[:, None]
        sums[1] += hit[:, 0].sum().item()
        sums[2] += hit.any(dim=1).sum().item()
        sums[3] += images.shape[0]
    loss, top1, top5, count = all_reduce_sum(sums, device)
    count = max(count, 1)
    return {"loss": loss / count, "acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count, "count": int(count)}
