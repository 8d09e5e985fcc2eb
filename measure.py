"""What a DeiT / ToE run costs: forward FLOPs per stage, total training FLOPs, and measured training throughput.

Two halves, used by ``scripts/flops.py`` and ``scripts/benchmark.py``:

* **FLOPs** (:func:`model_flops`, :func:`training_flops`, :func:`analytic_vit_flops`): fvcore counts of one
  ``1x3xSxS`` forward pass with full tokens and in every ToE stage, next to the closed-form ViT cost. fvcore counts
  one fused multiply-add as one FLOP (so these are MACs, the unit of the DeiT/ToE papers). It has no handle for
  ``aten::scaled_dot_product_attention`` (timm's fused attention), so we register one; without it the attention
  products ``q@k^T`` and ``attn@v`` would silently count as zero. The ToE operator is reported on its own line:
  its scores of every patch token against the kept ones (matmuls, or ``cdist`` for the non-cosine distances)
  are counted; its ``topk`` / ``index_select`` / ``index_add`` / division are memory operations and, like every
  elementwise op, are not.
* **Throughput** (:func:`benchmark_training`, :func:`benchmark_inference`): real optimizer steps with full tokens and
  in every reducing ToE stage, interleaved round-robin in one process so that machine drift hits every variant alike,
  against the FLOPs-ideal speed-up. The efficiency ``measured / ideal`` is what a user of ToE actually gets.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from engine import AMP_DTYPES
from engine import autocast as engine_autocast
from models import create_model
from toe import find_toe, iter_toe, set_sparse_eval

# Training images per epoch. imagenet: the ILSVRC-2012 train split; cifar: the train splits; digits: the
# scikit-learn digits minus every 5th image of each class, which datasets.prepare_digits holds out for val.
DATASET_SIZES = {"imagenet": 1_281_167, "cifar10": 50_000, "cifar100": 50_000, "digits": 1_442}
DATASET_CLASSES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100, "digits": 10}
FWD_BWD_FACTOR = 3          # backward costs about twice the forward: one training image = 3 forward passes


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


# ================================================================================================ analytic FLOPs
def analytic_vit_flops(img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                       num_classes: int = 1000, mlp_ratio: float = 4.0, num_prefix_tokens: int = 1,
                       in_chans: int = 3, kept_patches: Optional[int] = None, insert_block: int = 1,
                       num_heads_out: int = 1) -> Dict[str, float]:
    """Closed-form forward MACs of a plain ViT, optionally with ToE keeping ``kept_patches`` from ``insert_block`` on.

    patch embedding ``N*C*in*p^2``; each block ``(4 + 2*mlp_ratio)*n*C^2 + 2*n^2*C`` with ``n`` tokens including the
    prefix (qkv 3nC^2, proj nC^2, MLP 2*mlp_ratio*nC^2, q@k^T and attn@v n^2C each); head ``C*classes`` per head
    (``num_heads_out=2`` for distilled DeiT). Norms, activations, softmax and the ToE operator itself are left out,
    as in the papers' tables; ``toe_scores`` gives the operator's cosine scores ``M*N*C`` separately
    (every patch against each of the ``M`` kept ones).
    """
    patches = (img_size // patch_size) ** 2
    full = patches + num_prefix_tokens
    reduced = full if kept_patches is None else kept_patches + num_prefix_tokens
    c = embed_dim

    def block(n: int) -> float:
        return (4 + 2 * mlp_ratio) * n * c * c + 2 * n * n * c

    patch_embed = patches * c * in_chans * patch_size ** 2
    blocks = sum(block(full if i < insert_block else reduced) for i in range(depth))
    head = c * num_classes * num_heads_out
    toe_scores = 0.0 if kept_patches is None else kept_patches * patches * c
    return {"patch_embed": float(patch_embed), "blocks": float(blocks), "head": float(head),
            "toe_scores": float(toe_scores), "total": float(patch_embed + blocks + head)}


def input_channels(model: nn.Module) -> int:
    """Image channels the model takes: those of the first convolution of its patch embedding (3 if none)."""
    conv = next((m for m in getattr(model, "patch_embed", model).modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def vit_dims(model: nn.Module) -> Dict[str, Any]:
    """The arguments of :func:`analytic_vit_flops` read off a timm VisionTransformer; ``{}`` for anything else
    (e.g. LV-ViT's convolutional stem), for which only the fvcore count is given."""
    pe, blocks = getattr(model, "patch_embed", None), getattr(model, "blocks", None)
    proj = getattr(pe, "proj", None)
    convs = [m for m in pe.modules() if isinstance(m, nn.Conv2d)] if pe is not None else []
    if convs != [proj] or blocks is None or not hasattr(blocks[0], "mlp"):
        return {}
    grid = getattr(pe, "grid_size", None)
    if grid is None or grid[0] != grid[1] or proj.kernel_size[0] != proj.kernel_size[1]:
        return {}
    fc1 = getattr(blocks[0].mlp, "fc1", None)
    embed_dim = proj.out_channels
    heads = [h for h in (getattr(model, "head", None), getattr(model, "head_dist", None)) if isinstance(h, nn.Linear)]
    return dict(img_size=grid[0] * proj.kernel_size[0], patch_size=proj.kernel_size[0], embed_dim=embed_dim,
                depth=len(blocks), num_classes=heads[0].out_features if heads else 0,
                mlp_ratio=(fc1.out_features / embed_dim) if fc1 is not None else 4.0,
                num_prefix_tokens=getattr(model, "num_prefix_tokens", 1), in_chans=proj.in_channels,
                num_heads_out=len(heads))


# ================================================================================================ fvcore FLOPs
def _shape(value) -> List[int]:
    from fvcore.nn.jit_handles import get_shape
    return list(get_shape(value))


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::scaled_dot_product_attention``: ``q@k^T`` (``Nq*Nk*D``) plus ``attn@v`` (``Nq*Nk*Dv``) per batch-head,
    counted as MACs exactly as fvcore counts the two ``matmul`` of the unfused path."""
    q, k, v = _shape(inputs[0]), _shape(inputs[1]), _shape(inputs[2])
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def cdist_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::cdist`` ``[*, P, M] x [*, R, M]``: one multiply-add-like term per pair and feature, ``P*R*M``."""
    a, b = _shape(inputs[0]), _shape(inputs[1])
    return math.prod(a[:-2]) * a[-2] * b[-2] * a[-1]


EXTRA_HANDLES: Dict[str, Callable] = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::cdist": cdist_flop_jit,
    "aten::_cdist_forward": cdist_flop_jit,
}


@dataclass
class FlopCount:
    """One fvcore count: ``total`` = ``model`` (everything outside the ToE operator) + ``toe_op``."""
    total: float
    toe_op: float
    by_operator: Dict[str, float]
    not_counted: List[str]                     # operators that ran but have no FLOPs handle (memory/elementwise)

    @property
    def model(self) -> float:
        return self.total - self.toe_op


def count_flops(model: nn.Module, input_size: int, in_chans: int = 3) -> FlopCount:
    """fvcore forward FLOPs (MACs) of ``model`` on one ``1 x in_chans x S x S`` image, in the model's current mode.

    Fused attention is counted through :data:`EXTRA_HANDLES`. The ToE operator's share comes from fvcore's
    per-module attribution (the operator is the ``TokenExpansion`` sub-module, called from a block pre-hook).
    """
    toe = find_toe(model)
    toe_name = next((n for n, m in model.named_modules() if m is toe), None) if toe is not None else None
    image = torch.randn(1, in_chans, input_size, input_size, generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")          # tracer and torch.jit deprecation warnings say nothing here
        from fvcore.nn import FlopCountAnalysis
        analysis = FlopCountAnalysis(model, image.to(device))
        analysis.set_op_handle(**EXTRA_HANDLES)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        total = float(analysis.total())
        toe_op = float(analysis.by_module().get(toe_name, 0)) if toe_name else 0.0
        by_op = {k: float(v) for k, v in analysis.by_operator().items()}
        skipped = sorted(analysis.unsupported_ops())
    return FlopCount(total, toe_op, by_op, skipped)


@contextlib.contextmanager
def unfused_attention(model: nn.Module):
    """Temporarily route every timm attention module through its explicit ``q@k^T`` / ``attn@v`` path."""
    changed = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in changed:
        m.fused_attn = False
    try:
        yield len(changed)
    finally:
        for m in changed:
            m.fused_attn = True


def set_stage(model: nn.Module, stage: int) -> None:
    """Put every ToE operator of ``model`` in ``stage`` (0 = full tokens), whatever epochs the schedule maps to it."""
    for toe in iter_toe(model):
        toe.stage = int(stage)


@dataclass
class StageFlops:
    """Forward cost of one variant: full tokens (``stage=None``) or a ToE stage with its epoch range."""
    name: str
    stage: Optional[int]
    epochs: Optional[Tuple[int, int]]          # [first, last) epochs of the stage in the run
    patch_tokens: int                          # patch tokens after the operator (blocks >= insert_block)
    reducing: bool
    fvcore: FlopCount
    analytic: Dict[str, float]

    def row(self) -> Dict[str, Any]:
        out = asdict(self)
        out["fvcore"]["model"] = self.fvcore.model
        return out


def model_flops(cfg, num_classes: int, input_size: Optional[int] = None) -> Dict[str, Any]:
    """fvcore and analytic forward FLOPs of ``cfg.model`` with full tokens and in every ToE stage of the run.

    The model is built by :func:`models.create_model` (ToE patched in exactly as for training). It is counted in
    eval mode with the operator forced on (``sparse_eval``): the same layers and token counts as a training forward,
    without its randomness (dropout, drop-path, LV-ViT's MixToken) or its tuple outputs (distilled DeiT, LV-ViT).
    """
    size = int(input_size or cfg.input_size)
    model = create_model(cfg, num_classes, img_size=size)
    if cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(False)            # recomputation adds no forward FLOPs and does not trace
    model.eval()
    set_sparse_eval(model, True)
    params = sum(p.numel() for p in model.parameters())
    dims = vit_dims(model)
    in_chans = input_channels(model)
    toe = find_toe(model)
    num_patches = (size // dims["patch_size"]) ** 2 if dims else int(getattr(model.patch_embed, "num_patches", 0))

    def variant(name: str, stage: Optional[int], epochs: Optional[Tuple[int, int]]) -> StageFlops:
        set_stage(model, stage or 0)
        reducing = toe is not None and stage is not None and toe.schedule.is_reducing(stage)
        kept = toe.schedule.kept_tokens(num_patches, stage) if reducing else num_patches
        analytic = analytic_vit_flops(**dims, kept_patches=kept if reducing else None,
                                      insert_block=toe.insert_block if toe else 1) if dims else {}
        return StageFlops(name, stage, epochs, kept, reducing, count_flops(model, size, in_chans), analytic)

    full = variant("full tokens", None, None)
    stages: List[StageFlops] = []
    if toe is not None:
        for stage, first, last in toe.schedule.stage_epochs(cfg.epochs):
            if toe.schedule.is_reducing(stage):
                stages.append(variant(f"stage {stage}", stage, (first, last)))
            else:        # stage 0 and a final keep rate of 1.0 run the plain model: same count as full tokens
                stages.append(StageFlops(f"stage {stage}", stage, (first, last), full.patch_tokens, False,
                                         full.fvcore, full.analytic))
    set_stage(model, 0)
    return {"model": cfg.model, "input_size": size, "num_classes": num_classes, "params": params,
            "num_patches": num_patches, "epochs": cfg.epochs, "toe": toe is not None, "full": full, "stages": stages}


# ================================================================================================ training FLOPs
def training_flops(stage_forward: Sequence[Tuple[int, int, float]], full_forward: float, images: int,
                   factor: int = FWD_BWD_FACTOR) -> Dict[str, Any]:
    """Total training FLOPs of a schedule and its ratio to the same run on full tokens.

    ``stage_forward``: ``(first_epoch, last_epoch_exclusive, forward FLOPs per image)`` per stage, covering the run.
    A stage costs ``forward x factor x images x epochs``; the ideal speed-up is ``full total / schedule total``.
    """
    rows, total, epochs = [], 0.0, 0
    for first, last, fwd in stage_forward:
        n = last - first
        cost = fwd * factor * images * n
        rows.append({"first_epoch": first, "last_epoch": last, "epochs": n, "forward": fwd, "train": cost})
        total += cost
        epochs += n
    full_total = full_forward * factor * images * epochs
    return {"stages": rows, "epochs": epochs, "images_per_epoch": images, "factor": factor,
            "total": total, "full_total": full_total,
            "average_forward": total / (factor * images * epochs) if epochs else 0.0,
            "ratio": total / full_total if full_total else 1.0,
            "ideal_speedup": full_total / total if total else 1.0}


def schedule_training_flops(report: Dict[str, Any], images: int, which: str = "total") -> Dict[str, Any]:
    """:func:`training_flops` of a :func:`model_flops` report (``which``: ``total`` fvcore, ``model`` or ``analytic``)."""
    def fwd(v: StageFlops) -> float:
        if which == "analytic":
            return v.analytic.get("total", 0.0)
        return getattr(v.fvcore, which)
    full = report["full"]
    stages = report["stages"] or [StageFlops("full tokens", None, (0, report["epochs"]), full.patch_tokens,
                                             False, full.fvcore, full.analytic)]
    return training_flops([(v.epochs[0], v.epochs[1], fwd(v)) for v in stages], fwd(full), images)


# ================================================================================================ benchmark
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


def resolve_device(name: str) -> torch.device:
    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, amp: str):
    """``--amp bf16|fp16`` as an autocast context (fp16 needs a GPU); ``none`` is a no-op."""
    dtype = None if amp in ("none", "", None) else AMP_DTYPES[amp]
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError("--amp fp16 needs a GPU (use bf16 on CPU, or none)")
    return lambda: engine_autocast(device, dtype)


@dataclass
class Variant:
    """One timed training configuration: full tokens (``stage`` 0) or a reducing ToE stage."""
    name: str
    stage: int
    patch_tokens: int
    forward_flops: float
    activations_mb: Optional[float] = None
    step_s: List[float] = field(default_factory=list)
    peak_mb: List[float] = field(default_factory=list)
    toe_op_s: List[float] = field(default_factory=list)


def _median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def _load_average() -> Optional[List[float]]:
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


class _OpTimer:
    """Times the ToE operator alone, forward and backward, on the real input it saw in this stage.

    The input is captured once from an eager forward of the model (a pre-hook on the operator), so the timing
    covers exactly the tensors of a real step; the operator runs eagerly here even under ``--compile``, so under
    compilation this is an upper bound.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, autocast, device: torch.device):
        self.toe = find_toe(model)
        self.inputs: Dict[int, torch.Tensor] = {}
        self.grads: Dict[int, torch.Tensor] = {}
        self.model, self.images, self.autocast, self.device = model, images, autocast, device

    def capture(self, stage: int) -> None:
        if self.toe is None or stage in self.inputs:
            return
        seen = []
        handle = self.toe.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
        try:
            set_stage(self.model, stage)
            with torch.no_grad(), self.autocast():
                self.model(self.images)
        finally:
            handle.remove()
        self.inputs[stage] = seen[0].requires_grad_(True)
        with self.autocast():
            out, _ = self.toe(self.inputs[stage])
        self.grads[stage] = torch.ones_like(out)

    def time(self, stage: int) -> float:
        x = self.inputs[stage]
        set_stage(self.model, stage)
        _sync(self.device)
        start = time.perf_counter()
        with self.autocast():
            out, _ = self.toe(x)
        torch.autograd.grad(out, x, self.grads[stage])
        _sync(self.device)
        return time.perf_counter() - start


def benchmark_training(cfg, num_classes: int, batch_size: int = 32, steps: int = 5, warmup: int = 2,
                       amp: str = "none", compile: bool = False, device: str = "auto", input_size: Optional[int] = None,
                       flops: Optional[Dict[str, Any]] = None, inference: bool = True, keep_memory: bool = False,
                       log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Median training throughput with full tokens and in every reducing ToE stage, plus ideal and measured speed-up.

    One model, one AdamW optimizer, one random batch with random labels. After ``warmup`` rounds, ``steps`` rounds
    each run one step of every variant in turn (round-robin), so slow phases of a shared machine hit all variants.
    A step is forward, cross-entropy, backward and ``optimizer.step()``, between device syncs.
    """
    log = log or (lambda msg: None)
    dev = resolve_device(device)
    size = int(input_size or cfg.input_size)
    torch.manual_seed(cfg.seed)
    kept_memory = keep_freed_memory() if keep_memory and dev.type == "cpu" else False
    autocast = autocast_for(dev, amp)                    # before the slow parts: a wrong --amp fails at once
    if flops is None:
        log("counting FLOPs (fvcore) ...")
        flops = model_flops(cfg, num_classes, size)
    model = create_model(cfg, num_classes, img_size=size).to(dev)
    model.train()
    toe = find_toe(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(dev.type) if amp == "fp16" else None
    run = torch.compile(model, dynamic=False) if compile else model
    in_chans = input_channels(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(batch_size, in_chans, size, size, generator=gen).to(dev)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(dev)

    variants = [Variant("full tokens", 0, flops["full"].patch_tokens, flops["full"].fvcore.total)]
    for v in flops["stages"]:
        if v.reducing:
            variants.append(Variant(v.name, v.stage, v.patch_tokens, v.fvcore.total))
    mem = _MemMeter(dev)
    op_timer = _OpTimer(model, images, autocast, dev)

    def step() -> None:
        with autocast():
            loss = training_loss(run(images), labels)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    load_start = _load_average()
    for r in range(warmup + steps):
        timed = r >= warmup
        round_s = []
        for v in variants:
            set_stage(model, v.stage)
            _sync(dev)
            mem.reset()
            start = time.perf_counter()
            step()
            _sync(dev)
            elapsed = time.perf_counter() - start
            round_s.append(f"{v.name} {elapsed:.3f}s")
            if timed:
                v.step_s.append(elapsed)
                peak = mem.peak_mb()
                if peak is not None:
                    v.peak_mb.append(peak)
            if v.activations_mb is None:
                v.activations_mb = saved_activations_mb(model, images, labels, autocast)
            if v.stage and toe is not None:
                op_timer.capture(v.stage)
                t = op_timer.time(v.stage)
                if timed:
                    v.toe_op_s.append(t)
        log(f"{'timed' if timed else 'warm-up'} round {r + 1 - (warmup if timed else 0)}/{steps if timed else warmup}: "
            + ", ".join(round_s))
    set_stage(model, 0)

    full_step = _median(variants[0].step_s)
    rows = []
    for v in variants:
        step_s = _median(v.step_s)
        ideal = variants[0].forward_flops / v.forward_flops
        measured = full_step / step_s
        op = _median(v.toe_op_s)
        rows.append({
            "name": v.name, "stage": v.stage, "patch_tokens": v.patch_tokens, "forward_gflops": v.forward_flops / 1e9,
            "step_s_median": step_s, "step_s": v.step_s, "images_per_s": batch_size / step_s,
            "peak_mem_mb": max(v.peak_mb) if v.peak_mb else None, "activations_mb": v.activations_mb,
            "speedup": measured, "ideal_speedup": ideal, "efficiency": measured / ideal,
            "toe_op_ms": op * 1e3 if op is not None else None,
            "toe_op_share": op / step_s if op is not None else None,
        })
    result = {
        "model": cfg.model, "input_size": size, "batch_size": batch_size, "num_classes": num_classes,
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(), "amp": amp, "compile": compile, "steps": steps, "warmup": warmup,
        "torch": torch.__version__, "keep_freed_memory": kept_memory, "load_average_start": load_start, "load_average_end": _load_average(),
        "peak_mem_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "n/a on CPU",
        "process_peak_rss_mb": process_peak_rss_mb(),
        "variants": rows,
    }
    if inference:
        result["inference"] = benchmark_inference(model, images, steps=steps, warmup=warmup, autocast=autocast,
                                                  compile=compile)
    return result


def benchmark_inference(model: nn.Module, images: torch.Tensor, steps: int = 5, warmup: int = 2, autocast=None,
                        compile: bool = False) -> Dict[str, Any]:
    """Evaluation-mode throughput. ToE is inactive in eval (unless ``sparse_eval``), so this is the plain DeiT that
    the training produced; the model's train/eval mode is restored afterwards."""
    autocast = autocast or contextlib.nullcontext
    dev = images.device
    was_training = model.training
    toe = find_toe(model)
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
        toe_active = bool(toe is not None and toe.active)
        kept = toe.kept_index if toe is not None else None
    finally:
        model.train(was_training)
    step_s = _median(times)
    return {"images_per_s": images.shape[0] / step_s, "step_s_median": step_s, "step_s": times,
            "peak_mem_mb": max(peaks) if peaks else None, "toe_active": toe_active,
            "full_tokens": kept is None, "logits_shape": list(out.shape)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


# ================================================================================================ printing
def format_flops_report(report: Dict[str, Any], images: int) -> str:
    """The console table of ``scripts/flops.py``."""
    g = 1e9
    lines = [f"{report['model']} at {report['input_size']} px, {report['num_classes']} classes: "
             f"{report['params'] / 1e6:.2f} M parameters, {report['num_patches']} patch tokens",
             "forward GFLOPs per image (fvcore; 1 multiply-add = 1 FLOP); 'ToE op' = the operator's token scores",
             f"{'variant':<12} {'epochs':>9} {'patches':>7} {'fvcore':>9} {'of which':>9} {'analytic':>9} {'diff':>7}",
             f"{'':<12} {'':>9} {'':>7} {'total':>9} {'ToE op':>9} {'':>9} {'':>7}"]
    for v in [report["full"]] + list(report["stages"]):
        epochs = f"{v.epochs[0]}-{v.epochs[1] - 1}" if v.epochs else "-"
        ana = v.analytic.get("total")
        diff = f"{(v.fvcore.total / ana - 1) * 100:+.2f}%" if ana else "-"
        ana_text = f"{ana / g:>9.3f}" if ana else f"{'-':>9}"
        tokens = f"{v.patch_tokens}" + ("" if v.reducing or v.stage is None else "*")
        lines.append(f"{v.name:<12} {epochs:>9} {tokens:>7} {v.fvcore.total / g:>9.3f} {v.fvcore.toe_op / g:>9.4f} "
                     f"{ana_text} {diff:>7}")
    if any(not v.reducing for v in report["stages"]):
        lines.append("* ToE inactive in this stage: the plain model runs")
    if report["stages"]:
        fv = schedule_training_flops(report, images, "total")
        an = schedule_training_flops(report, images, "analytic")
        versus = (f", analytic {an['average_forward'] / g:.3f} "
                  f"({(fv['average_forward'] / an['average_forward'] - 1) * 100:+.2f}%)") if an["total"] else ""
        lines += ["", f"schedule average forward: fvcore {fv['average_forward'] / g:.3f} GFLOPs{versus}"]
    fv = schedule_training_flops(report, images, "total")
    lines += [f"training FLOPs = forward x {fv['factor']} (fwd+bwd) x {images:,} images x epochs, summed over stages:",
              f"  this run {si_flops(fv['total'])} over {fv['epochs']} epochs; full tokens {si_flops(fv['full_total'])}; "
              f"ratio {fv['ratio']:.3f} -> ideal speed-up {fv['ideal_speedup']:.3f}x"]
    not_counted = sorted({op for v in [report["full"]] + list(report["stages"]) for op in v.fvcore.not_counted})
    if not_counted:
        lines.append("not counted (no FLOPs handle; memory/elementwise): " + ", ".join(not_counted))
    return "\n".join(lines)


def si_flops(x: float) -> str:
    """``4.074 EFLOPs``, ``1.2 TFLOPs``: a FLOP count with an SI prefix."""
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {prefix}FLOPs"
    return f"{x:.0f} FLOPs"


def flops_report_json(report: Dict[str, Any], images: int) -> Dict[str, Any]:
    out = {k: v for k, v in report.items() if k not in ("full", "stages")}
    out["full"] = report["full"].row()
    out["stages"] = [v.row() for v in report["stages"]]
    out["training"] = schedule_training_flops(report, images, "total")
    out["training_analytic"] = schedule_training_flops(report, images, "analytic")
    return out


def format_benchmark(result: Dict[str, Any]) -> str:
    """The console table of ``scripts/benchmark.py``."""
    def fmt(x, spec, none="n/a"):
        return none if x is None else format(x, spec)
    head = (f"{result['model']} at {result['input_size']} px, batch {result['batch_size']}, {result['device']} "
            f"({result['device_name']}, {result['threads']} threads), amp {result['amp']}, compile {result['compile']}; "
            f"median of {result['steps']} steps after {result['warmup']} warm-up, variants interleaved")
    lines = [head,
             f"{'variant':<12} {'patches':>7} {'GFLOPs':>7} {'step s':>7} {'img/s':>7} {'peak MB':>8} {'act. MB':>8} "
             f"{'speed-up':>8} {'ideal':>6} {'effic.':>6} {'ToE op ms':>9} {'ToE %':>6}"]
    for v in result["variants"]:
        lines.append(f"{v['name']:<12} {v['patch_tokens']:>7} {v['forward_gflops']:>7.3f} {v['step_s_median']:>7.3f} "
                     f"{v['images_per_s']:>7.1f} {fmt(v['peak_mem_mb'], '8.0f'):>8} {fmt(v['activations_mb'], '8.0f'):>8} "
                     f"{v['speedup']:>7.3f}x "
                     f"{v['ideal_speedup']:>5.3f}x {v['efficiency'] * 100:>5.1f}% {fmt(v['toe_op_ms'], '9.1f', '-'):>9} "
                     f"{fmt(v['toe_op_share'] and v['toe_op_share'] * 100, '6.2f', '-'):>6}")
    lines.append(f"peak MB: {result['peak_mem_kind']}; act. MB: tensors saved for backward; "
                 f"ideal = full-token FLOPs / stage FLOPs; efficiency = speed-up / ideal")
    lines.append("ToE op = the operator's forward+backward timed alone on that stage's real input (eager), % of the step"
                 + ("; glibc told to keep freed memory (--keep-freed-memory)" if result.get("keep_freed_memory") else ""))
    inf = result.get("inference")
    if inf:
        lines.append(f"inference (eval mode, ToE {'ACTIVE' if inf['toe_active'] else 'off'}: "
                     f"{'full tokens, the plain model' if inf['full_tokens'] else 'REDUCED tokens'}): "
                     f"{inf['images_per_s']:.1f} img/s, {inf['step_s_median']:.3f} s/batch"
                     + (f", peak {inf['peak_mem_mb']:.0f} MB" if inf["peak_mem_mb"] is not None else ""))
    rss = result.get("process_peak_rss_mb")
    lines.append(f"load average (1/5/15 min) at start {result['load_average_start']}, at end {result['load_average_end']}"
                 + (f"; process peak RSS {rss:.0f} MB" if rss else ""))
    return "\n".join(lines)
