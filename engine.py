"""One training epoch and one evaluation pass (DeiT's ``engine.py``, with accumulation, clipping, AMP and checks)."""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from timm.utils import AverageMeter

from devices import autocast
from distributed import all_reduce_sum
from fast_loader import device_images
from logger import RunLogger, Throughput, format_seconds
from methods import Clock, ExampleBatch, MethodSet


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
    num_iters = start_step + len(loader)
    if epoch_iters is not None:
        num_iters = min(num_iters, epoch_iters)
    run = _Epoch(model, criterion, optimizer, device, epoch, num_epochs, log, methods, num_iters, amp_dtype=amp_dtype,
                 scaler=scaler, model_ema=model_ema, mixup_fn=mixup_fn, clip_grad=clip_grad, accum_steps=accum_steps,
                 print_freq=print_freq, world_size=world_size, log_every=log_every, global_step=global_step,
                 clock_period=iters_per_epoch or num_iters, input_size=input_size, set_lr=set_lr)
    run.resume(resumed or {}, start_step)
    batches = iter(loader)
    if on_start is not None:
        on_start()
    optimizer.zero_grad(set_to_none=True)
    stopped_at, finished = None, False
    t_data = time.perf_counter()
    try:
        for it, batch in enumerate(itertools.islice(batches, max(num_iters - start_step, 0)), start=start_step):
            update = run.step(it, batch, loader.batch_size, t_data)
            if update and it + 1 < num_iters and should_stop is not None and should_stop():
                stopped_at = it + 1
                break
            t_data = time.perf_counter()
        finished = stopped_at is None
    finally:
        _release_workers(loader, batches, finished)
    return run.result(stopped_at)


def _release_workers(loader, batches, finished: bool) -> None:
    """Loader workers ignore SIGINT/SIGTERM: stop them when the run stops inside the epoch or fails; a finished
    epoch keeps persistent ones for the next."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None and not (finished and getattr(loader, "persistent_workers", False)):
        shutdown()


@dataclass
class _Epoch:
    """One training epoch of :func:`train_one_epoch`: its settings, and the running figures of the epoch (a resumed
    epoch starts from those its first part left, :meth:`resume`). :meth:`step` trains one micro-batch."""
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    epoch: int
    num_epochs: int
    log: RunLogger
    methods: MethodSet
    num_iters: int
    amp_dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None
    model_ema: Any = None
    mixup_fn: Optional[Callable] = None
    clip_grad: Optional[float] = None
    accum_steps: int = 1
    print_freq: int = 20
    world_size: int = 1
    log_every: int = 0
    global_step: int = 0
    clock_period: int = 1                       # the methods' iterations per epoch (Clock)
    input_size: Optional[int] = None
    set_lr: Optional[Callable[[int], None]] = None

    def resume(self, resumed: Dict[str, Any], start_step: int) -> None:
        """The running figures: zero, or what the first part of a resumed epoch left."""
        self.loss_meter = AverageMeter()
        self.loss_meter.sum, self.loss_meter.count = resumed.get("loss_sum", 0.0), resumed.get("loss_count", 0)
        self.meter = Throughput(self.num_iters, start_step, resumed.get("images", 0), resumed.get("seconds", 0.0))
        self.data_time, self.skipped = resumed.get("data_seconds", 0.0), resumed.get("skipped", 0)
        self.compute_time = resumed.get("compute_seconds", 0.0)  # forward, backward, step, EMA: no loader wait, no eval

    def step(self, it: int, batch, batch_size: int, t_data: float) -> bool:
        """Train micro-batch ``it`` (the loader handed it over at ``t_data``); returns whether the optimizer stepped."""
        t_compute = time.perf_counter()
        self.data_time += t_compute - t_data
        if self.methods.per_step:
            self.methods.on_step(Clock(self.epoch, it, self.global_step + it, self.clock_period, self.num_epochs))
        if self.set_lr is not None and it % self.accum_steps == 0:
            self.set_lr(it // self.accum_steps)
        images, targets, labels, indices = self.inputs(batch, batch_size)
        update = (it + 1) % self.accum_steps == 0 or it + 1 == self.num_iters
        logged = self.log_every and self.log.enabled and (self.global_step + it) % self.log_every == 0
        outputs, loss_value = self.forward_backward(images, targets, update, it)
        if self.methods.observers:
            self.methods.observe(ExampleBatch(indices, _class_logits(outputs).detach().float(), labels, targets))
        grad_norm = self.optimizer_step(logged) if update else None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)          # the step's kernels belong to its compute time
        self.compute_time += time.perf_counter() - t_compute
        self.loss_meter.update(loss_value, images.shape[0])
        self.meter.step(images.shape[0] * self.world_size)
        self.report(it, loss_value, grad_norm, logged)
        return update

    def inputs(self, batch, batch_size: int):
        """Images and targets on the device, at the current input size, mixed; the class labels before mixing."""
        *data, indices = batch
        self.skipped += batch_size - len(indices)       # images left out (skip_bad_images)
        images = device_images(data[0], self.device)     # a fast loader's uint8 batch: normalised and erased here
        # (images, class), or (images, class, labels) from an extension's training set: the rest are the targets
        targets = to_device(data[1] if len(data) == 2 else tuple(data[1:]), self.device)
        labels = targets if torch.is_tensor(targets) else targets[0]
        if self.input_size is not None and images.shape[-1] != self.input_size:
            images = self.methods.resize_images(images, self.input_size)
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)
        return images, targets, labels, indices

    def forward_backward(self, images: torch.Tensor, targets, update: bool, it: int):
        """Forward, loss and backward of one micro-batch (DDP's gradient sync only before an update)."""
        no_sync = not update and hasattr(self.model, "no_sync")
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with autocast(self.device, self.amp_dtype):
                outputs = self.model(images)
                loss = self.criterion(images, outputs, targets)
            loss_value = loss.item()      # a host sync per step, as in DeiT: it is what catches a NaN at once
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f"loss is {loss_value} at epoch {self.epoch} iteration {it}: stopping; the "
                                         f"last checkpoint was written before this epoch and is intact")
            scaled = loss / self.accum_steps
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        return outputs, loss_value

    def optimizer_step(self, logged: bool) -> Optional[torch.Tensor]:
        """Clip, step, zero the gradients, update the EMA; the gradient norm before clipping when it was taken."""
        grad_norm = None
        model, optimizer, scaler = self.model, self.optimizer, self.scaler
        if scaler is not None and (self.clip_grad is not None or logged):
            scaler.unscale_(optimizer)          # step() would unscale the same way: only the order moves
        if self.clip_grad is not None:
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad)
        elif logged:
            grad_norm = nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.model_ema is not None:
            self.model_ema.update(model)
        return grad_norm

    def report(self, it: int, loss_value: float, grad_norm: Optional[torch.Tensor], logged: bool) -> None:
        """The progress line, and the iteration record (``log_every``) or TensorBoard's per-step scalars."""
        num_iters, meter, log, step = self.num_iters, self.meter, self.log, self.global_step + it
        lr = self.optimizer.param_groups[0]["lr"]
        if it % self.print_freq == 0 or it + 1 == num_iters or log.live:
            state = self.methods.progress()
            log.progress(f"Epoch [{self.epoch + 1}/{self.num_epochs}] [{it + 1}/{num_iters}] eta "
                         f"{format_seconds(meter.eta(it + 1))} loss {loss_value:.4f} ({self.loss_meter.avg:.4f}) "
                         f"lr {lr:.3e} {meter.rate():.1f} img/s" + (f" {state}" if state else ""),
                         final=it + 1 == num_iters)
        if logged:
            log.log_iteration(iteration_record(self.epoch, it, step, loss_value, self.loss_meter.avg,
                                               self.optimizer, grad_norm, meter.elapsed(), self.methods))
        elif not self.log_every and it % self.print_freq == 0:
            log.scalar("iter/loss", loss_value, step)
            log.scalar("iter/lr", lr, step)

    def result(self, stopped_at: Optional[int]) -> Dict[str, Any]:
        """The epoch's metrics, summed over processes; or, when it stopped early, where and the running figures."""
        progress = {"loss_sum": self.loss_meter.sum, "loss_count": self.loss_meter.count, "images": self.meter.images,
                    "seconds": self.meter.elapsed(), "data_seconds": self.data_time,
                    "compute_seconds": self.compute_time, "skipped": self.skipped}
        if stopped_at is not None:
            return {"stopped_at": stopped_at, "iters": stopped_at, "progress": progress}
        total, count, skipped = all_reduce_sum([self.loss_meter.sum, self.loss_meter.count, self.skipped], self.device)
        return {"loss": total / max(count, 1), "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_s": self.meter.rate(), "epoch_seconds": self.meter.elapsed(),
                "data_seconds": self.data_time, "compute_seconds": self.compute_time, "iters": self.num_iters,
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
