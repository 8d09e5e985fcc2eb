"""Measured training and inference throughput: real optimizer steps of several models (the plain model and the
patched model in each method state) on one random batch, interleaved round-robin in one process so that machine
drift hits every state alike, with memory figures and the methods' operators timed alone; and the console table of
``scripts/benchmark.py``. :func:`measure.benchmark_training` builds the models from a config and times them here.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from devices import autocast as amp_autocast
from devices import loss_scaler, resolve_amp
from models.tokens import find_positions


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _MemMeter:
    """Peak memory of a step on CUDA (``max_memory_allocated``). On CPU there is no honest per-step figure: the
    allocator keeps freed pages, so an RSS delta mostly measures what it happened to keep (``None`` = n/a there;
    :func:`saved_activations_mb` is the comparable figure on every device)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> Optional[float]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        return None


def process_peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this whole process so far (Linux ``VmHWM``), or ``None``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def autocast_for(device: torch.device, amp: str):
    """A script's ``--amp`` as a factory of autocast contexts (the rule is :func:`devices.resolve_amp`)."""
    dtype = resolve_amp(amp, device, "--amp")
    return lambda: amp_autocast(device, dtype)


def _median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def training_loss(out, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the class logits. Models with more training outputs (LV-ViT's dense aux logits, a distilled
    DeiT's second head) get a cheap term on those too, so that their backward runs as in training."""
    if isinstance(out, (tuple, list)):
        extra = [o for o in out[1:] if torch.is_tensor(o) and o.is_floating_point()]
        return F.cross_entropy(out[0], labels) + sum(o.float().mean() for o in extra)
    return F.cross_entropy(out, labels)


def saved_activations_mb(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, autocast) -> float:
    """MB of tensors the forward pass saves for backward (parameters excluded, shared storages counted once).

    Deterministic, and on every device: this is the activation memory that ToE shrinks and that dominates the
    training peak at large batch, whereas a CPU process's peak RSS mostly reflects what the allocator kept.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):       # tensors without storage (e.g. some wrapper subclasses)
            return t
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        loss = training_loss(model(images), labels)
    del loss
    return sum(storages.values()) / 2 ** 20


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (``mallopt``; Linux CPU only).

    By default glibc serves buffers above a dynamic threshold (at most 32 MB) with ``mmap`` and unmaps them on free,
    so every step pays page faults for its largest activations again; DeiT-S at batch 32 with full tokens has 38 MB
    MLP activations, its ToE stages do not. Raising the thresholds removes that cost from every variant.
    Returns whether it took effect.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False


@dataclass
class Timed:
    """One timed training configuration: the plain model, or the patched model in one method state."""
    name: str
    model: nn.Module
    apply: Optional[Callable[[nn.Module], None]]
    patch_tokens: int
    forward_flops: float
    size: int = 224                            # the input size of this state
    activations_mb: Optional[float] = None
    step_s: List[float] = field(default_factory=list)
    peak_mb: List[float] = field(default_factory=list)
    op_s: List[float] = field(default_factory=list)


class OpTimer:
    """Times the methods' operators alone, forward and backward, on the real inputs they saw in a state.

    The inputs are captured once per state from an eager forward of the model (pre-hooks on the operators), so the
    timing covers exactly the tensors of a real step; the operators run eagerly here even under ``--compile``, so
    under compilation this is an upper bound.
    """

    def __init__(self, ops: Sequence[nn.Module], images: Callable[[int], torch.Tensor], autocast, device: torch.device):
        self.ops, self.images, self.autocast, self.device = list(ops), images, autocast, device
        self.inputs: Dict[str, List[Tuple[nn.Module, torch.Tensor]]] = {}

    def capture(self, t: Timed) -> None:
        if not self.ops or t.name in self.inputs:
            return
        seen: List[Tuple[nn.Module, torch.Tensor]] = []
        hooks = [op.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].detach().clone())))
                 for op in self.ops]
        try:
            with torch.no_grad(), self.autocast():
                t.model(self.images(t.size))
        finally:
            for h in hooks:
                h.remove()
        self.inputs[t.name] = seen

    def time(self, t: Timed) -> Optional[float]:
        pairs = self.inputs.get(t.name)
        if not pairs:
            return None
        _sync(self.device)
        start = time.perf_counter()
        for op, x in pairs:
            x = x.requires_grad_(True)
            with self.autocast():
                out = op(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            if out is not x:
                torch.autograd.grad(out, x, torch.ones_like(out))
        _sync(self.device)
        return time.perf_counter() - start


class TrainingBench:
    """Training steps of several models on one random batch, each model with its own AdamW optimizer.

    :meth:`run` times ``warmup + steps`` rounds; each round runs one step of every state in turn (round-robin), so
    slow phases of a shared machine hit all states. A step is forward, cross-entropy, backward and
    ``optimizer.step()``, between device syncs.
    """

    def __init__(self, device: torch.device, amp: str, autocast, compile: bool = False):
        self.device, self.autocast, self.compile = device, autocast, compile
        self.scaler = loss_scaler(resolve_amp(amp, device, "--amp"), device)
        self.runners: Dict[int, nn.Module] = {}
        self.optimizers: Dict[int, torch.optim.Optimizer] = {}
        self.images: Optional[torch.Tensor] = None
        self.images_at: Dict[int, torch.Tensor] = {}
        self.labels: Optional[torch.Tensor] = None
        self.mem = _MemMeter(device)

    def add(self, model: nn.Module) -> nn.Module:
        """``model`` on the device in training mode, with its optimizer (and its compiled runner under compile)."""
        m = model.to(self.device).train()
        self.runners[id(m)] = torch.compile(m, dynamic=False) if self.compile else m
        self.optimizers[id(m)] = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05)
        return m

    def random_batch(self, batch_size: int, in_chans: int, size: int, num_classes: int, seed: int) -> torch.Tensor:
        """Random images and labels from ``seed``, the same for every state; returns the images."""
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(batch_size, in_chans, size, size, generator=gen).to(self.device)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(self.device)
        self.images_at = {size: self.images}
        return self.images

    def images_for(self, at: int) -> torch.Tensor:
        """The batch at input size ``at`` (a curriculum phase trains at its own size)."""
        if at not in self.images_at:
            self.images_at[at] = F.interpolate(self.images, size=(at, at), mode="bilinear", antialias=True)
        return self.images_at[at]

    def step(self, t: Timed) -> None:
        opt = self.optimizers[id(t.model)]
        with self.autocast():
            loss = training_loss(self.runners[id(t.model)](self.images_for(t.size)), self.labels)
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            opt.step()

    def timed_step(self, t: Timed) -> float:
        """Seconds of one step of ``t`` in its state, between device syncs."""
        if t.apply is not None:
            t.apply(t.model)
            t.model.train()
        _sync(self.device)
        self.mem.reset()
        start = time.perf_counter()
        self.step(t)
        _sync(self.device)
        return time.perf_counter() - start

    def measure(self, t: Timed, op_timer: "OpTimer", is_timed: bool) -> float:
        """One step of ``t``; in a timed round its time, peak memory and operator time are recorded."""
        elapsed = self.timed_step(t)
        if is_timed:
            t.step_s.append(elapsed)
            peak = self.mem.peak_mb()
            if peak is not None:
                t.peak_mb.append(peak)
        if t.activations_mb is None:
            t.activations_mb = saved_activations_mb(t.model, self.images_for(t.size), self.labels, self.autocast)
        if t.apply is not None:
            op_timer.capture(t)
            op = op_timer.time(t)
            if is_timed and op is not None:
                t.op_s.append(op)
        return elapsed

    def run(self, timed: Sequence[Timed], warmup: int, steps: int, op_timer: "OpTimer",
            log: Callable[[str], None]) -> None:
        """``warmup`` untimed rounds, then ``steps`` timed ones; one line of ``log`` per round."""
        for r in range(warmup + steps):
            is_timed = r >= warmup
            round_s = [f"{t.name} {self.measure(t, op_timer, is_timed):.3f}s" for t in timed]
            log(f"{'timed' if is_timed else 'warm-up'} round {r + 1 - (warmup if is_timed else 0)}/"
                f"{steps if is_timed else warmup}: " + ", ".join(round_s))


def training_rows(timed: Sequence[Timed], batch_size: int) -> List[Dict[str, Any]]:
    """One row per state: median step time, throughput, memory, and the measured against the FLOPs-ideal speed-up
    over the first (plain) state."""
    full_step = _median(timed[0].step_s)
    rows = []
    for t in timed:
        step_s = _median(t.step_s)
        ideal = timed[0].forward_flops / t.forward_flops
        measured = full_step / step_s
        op = _median(t.op_s)
        rows.append({
            "name": t.name, "patch_tokens": t.patch_tokens, "forward_gflops": t.forward_flops / 1e9,
            "step_s_median": step_s, "step_s": t.step_s, "images_per_s": batch_size / step_s,
            "peak_mem_mb": max(t.peak_mb) if t.peak_mb else None, "activations_mb": t.activations_mb,
            "speedup": measured, "ideal_speedup": ideal, "efficiency": measured / ideal,
            "op_ms": op * 1e3 if op is not None else None, "op_share": op / step_s if op is not None else None,
        })
    return rows


def benchmark_inference(model: nn.Module, images: torch.Tensor, steps: int = 5, warmup: int = 2, autocast=None,
                        compile: bool = False) -> Dict[str, Any]:
    """Evaluation-mode throughput of the trained architecture with the methods' evaluation behaviour (ToE and PSS
    evaluate on all tokens; a method that prunes in evaluation does so here too); ``reduced_tokens`` says which.
    The model's train/eval mode is restored afterwards."""
    autocast = autocast or contextlib.nullcontext
    dev = images.device
    was_training = model.training
    run = torch.compile(model, dynamic=False) if compile else model
    mem = _MemMeter(dev)
    times, peaks = [], []
    model.eval()
    try:
        with torch.inference_mode():
            for r in range(warmup + steps):
                _sync(dev)
                mem.reset()
                start = time.perf_counter()
                with autocast():
                    out = run(images)
                _sync(dev)
                if r >= warmup:
                    times.append(time.perf_counter() - start)
                    peak = mem.peak_mb()
                    if peak is not None:
                        peaks.append(peak)
        positions = find_positions(model)
        reduced = bool(positions is not None and positions.reduced)
    finally:
        model.train(was_training)
    step_s = _median(times)
    return {"images_per_s": images.shape[0] / step_s, "step_s_median": step_s, "step_s": times,
            "peak_mem_mb": max(peaks) if peaks else None, "reduced_tokens": reduced,
            "logits_shape": list(out.shape)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def format_benchmark(result: Dict[str, Any]) -> str:
    """The console table of ``scripts/benchmark.py``."""
    def fmt(x, spec, none="n/a"):
        return none if x is None else format(x, spec)
    head = (f"{result['model']} ({'+'.join(result['methods']) or 'no method'}) at {result['input_size']} px, "
            f"batch {result['batch_size']}, {result['device']} ({result['device_name']}, {result['threads']} threads), "
            f"amp {result['amp']}, compile {result['compile']}; median of {result['steps']} steps after "
            f"{result['warmup']} warm-up, variants interleaved")
    lines = [head,
             f"{'variant':<28} {'patches':>7} {'GFLOPs':>7} {'step s':>7} {'img/s':>7} {'peak MB':>8} {'act. MB':>8} "
             f"{'speed-up':>8} {'ideal':>6} {'effic.':>6} {'op ms':>7} {'op %':>6}"]
    for v in result["variants"]:
        lines.append(f"{v['name'][:28]:<28} {v['patch_tokens']:>7} {v['forward_gflops']:>7.3f} {v['step_s_median']:>7.3f} "
                     f"{v['images_per_s']:>7.1f} {fmt(v['peak_mem_mb'], '8.0f'):>8} {fmt(v['activations_mb'], '8.0f'):>8} "
                     f"{v['speedup']:>7.3f}x "
                     f"{v['ideal_speedup']:>5.3f}x {v['efficiency'] * 100:>5.1f}% {fmt(v['op_ms'], '7.1f', '-'):>7} "
                     f"{fmt(v['op_share'] and v['op_share'] * 100, '6.2f', '-'):>6}")
    lines.append(f"peak MB: {result['peak_mem_kind']}; act. MB: tensors saved for backward; "
                 f"ideal = plain-model FLOPs / variant FLOPs; efficiency = speed-up / ideal")
    lines.append("op = the methods' operators' forward+backward timed alone on that state's real input (eager), "
                 "% of the step" + ("; glibc told to keep freed memory (--keep-freed-memory)"
                                    if result.get("keep_freed_memory") else ""))
    inf = result.get("inference")
    if inf:
        lines.append(f"inference (eval mode, the methods' evaluation behaviour: "
                     f"{'REDUCED tokens' if inf['reduced_tokens'] else 'all tokens'}): "
                     f"{inf['images_per_s']:.1f} img/s, {inf['step_s_median']:.3f} s/batch"
                     + (f", peak {inf['peak_mem_mb']:.0f} MB" if inf["peak_mem_mb"] is not None else ""))
    rss = result.get("process_peak_rss_mb")
    lines.append(f"load average (1/5/15 min) at start {result['load_average_start']}, at end {result['load_average_end']}"
                 + (f"; process peak RSS {rss:.0f} MB" if rss else ""))
    return "\n".join(lines)
