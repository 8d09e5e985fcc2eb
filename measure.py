"""What a run costs: forward FLOPs of every state the run's methods put the model in, total training FLOPs, and
measured training throughput, for any method (the methods declare their states; nothing here knows one by name).

Two halves, used by ``scripts/flops.py``, ``scripts/benchmark.py``, ``scripts/compare.py`` and ``scripts/sweep.py``:

* **FLOPs** (:func:`model_flops`, :func:`training_flops`, :func:`analytic_vit_flops`): fvcore counts of one
  ``1x3xSxS`` forward pass of the plain model and of every method state (:class:`methods.Variant`: a ToE stage, a
  PSS keep-rate level, ...), next to the closed-form ViT cost of the token counts that really entered each block.
  fvcore counts one fused multiply-add as one FLOP (so these are MACs, the unit of the DeiT/ToE/PSS papers). It has
  no handle for ``aten::scaled_dot_product_attention`` (timm's fused attention), so we register one; without it the
  attention products ``q@k^T`` and ``attn@v`` would silently count as zero. The methods' own operators
  (``Method.op_modules``) are reported on their own: their matmuls (or ``cdist``) are counted; their ``topk`` /
  gathers / scatters are memory operations and, like every elementwise op, are not.
* **Throughput** (:func:`benchmark_training`, :func:`benchmark_inference`): real optimizer steps of the plain model
  and in every method state, interleaved round-robin in one process so that machine drift hits every variant alike,
  against the FLOPs-ideal speed-up. The efficiency ``measured / ideal`` is what a user of a method actually gets.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from engine import AMP_DTYPES
from engine import autocast as engine_autocast
from methods import MethodSet
from models import create_model
from models.tokens import find_positions

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


def iterations_per_epoch(cfg, images: int, world_size: int = 1) -> int:
    """Optimizer-loop iterations of one epoch: the period of per-iteration method schedules (PSS's cycle)."""
    return max(1, images // (cfg.batch_size * world_size))


# ================================================================================================ analytic FLOPs
def analytic_vit_flops(img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                       num_classes: int = 1000, mlp_ratio: float = 4.0, num_prefix_tokens: int = 1,
                       in_chans: int = 3, num_heads_out: int = 1,
                       block_tokens: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """Closed-form forward MACs of a plain ViT whose block ``i`` sees ``block_tokens[i]`` tokens (prefix included;
    default: every token in every block).

    patch embedding ``N*C*in*p^2``; each block ``(4 + 2*mlp_ratio)*n*C^2 + 2*n^2*C`` with ``n`` tokens (qkv 3nC^2,
    proj nC^2, MLP 2*mlp_ratio*nC^2, q@k^T and attn@v n^2C each); head ``C*classes`` per head (``num_heads_out=2``
    for distilled DeiT). Norms, activations, softmax and the methods' operators are left out, as in the papers'
    tables.
    """
    patches = (img_size // patch_size) ** 2
    tokens = list(block_tokens) if block_tokens is not None else [patches + num_prefix_tokens] * depth
    c = embed_dim
    patch_embed = patches * c * in_chans * patch_size ** 2
    blocks = sum((4 + 2 * mlp_ratio) * n * c * c + 2 * n * n * c for n in tokens)
    head = c * num_classes * num_heads_out
    return {"patch_embed": float(patch_embed), "blocks": float(blocks), "head": float(head),
            "total": float(patch_embed + blocks + head)}


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
    """One fvcore count: ``total`` = ``model`` (everything outside the methods' operators) + ``method_op``."""
    total: float
    method_op: float
    by_operator: Dict[str, float]
    not_counted: List[str]                     # operators that ran but have no FLOPs handle (memory/elementwise)
    block_tokens: List[int]                    # tokens (prefix included) that entered each block
    op_acted: bool = False                     # a method operator returned something other than its input

    @property
    def model(self) -> float:
        return self.total - self.method_op


def count_flops(model: nn.Module, input_size: int, in_chans: int = 3,
                op_modules: Sequence[nn.Module] = ()) -> FlopCount:
    """fvcore forward FLOPs (MACs) of ``model`` on one ``1 x in_chans x S x S`` image, in the model's current mode.

    Fused attention is counted through :data:`EXTRA_HANDLES`. The share of ``op_modules`` (the methods' operators)
    comes from fvcore's per-module attribution; the tokens entering every block are recorded on the way.
    """
    names = {id(m): n for n, m in model.named_modules()}
    op_names = [names[id(m)] for m in op_modules if id(m) in names]
    seen: List[int] = []
    hooks = [blk.register_forward_pre_hook(lambda mod, args: seen.append(int(args[0].shape[1])))
             for blk in getattr(model, "blocks", [])]
    acted: List[bool] = []          # an operator whose FLOPs fvcore does not count (topk, gathers) still acts

    def op_hook(mod, args, out):
        first = out[0] if isinstance(out, (tuple, list)) else out
        acted.append(bool(args) and first is not args[0])
    hooks += [op.register_forward_hook(op_hook) for op in op_modules]
    image = torch.randn(1, in_chans, input_size, input_size, generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")          # tracer and torch.jit deprecation warnings say nothing here
            from fvcore.nn import FlopCountAnalysis
            analysis = FlopCountAnalysis(model, image.to(device))
            analysis.set_op_handle(**EXTRA_HANDLES)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            total = float(analysis.total())
            by_module = analysis.by_module()
            op = float(sum(by_module.get(n, 0) for n in op_names))
            by_op = {k: float(v) for k, v in analysis.by_operator().items()}
            skipped = sorted(analysis.unsupported_ops())
    finally:
        for h in hooks:
            h.remove()
    depth = len(getattr(model, "blocks", []))
    return FlopCount(total, op, by_op, skipped, seen[-depth:] if depth else [], any(acted))


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


@dataclass
class VariantFlops:
    """Forward cost of one state: the plain model (``label`` "full tokens") or a method state with its share of
    the training schedule."""
    label: str
    share: float
    epochs: Optional[Tuple[int, int]]          # [first, last) epochs when the state is a span of epochs
    patch_tokens: int                          # fewest patch tokens any block sees
    fvcore: FlopCount
    analytic: Dict[str, float]
    apply: Optional[Callable[[nn.Module], None]] = field(default=None, repr=False, compare=False)
    variant: Optional[Any] = field(default=None, repr=False, compare=False)     # the methods.Variant counted
    # runs as the plain model: same tokens in every block, same FLOPs, no operator (e.g. ToE's final keep rate 1.0)
    same_as_full: bool = False

    def row(self) -> Dict[str, Any]:
        return {"label": self.label, "share": self.share, "epochs": list(self.epochs) if self.epochs else None,
                "patch_tokens": self.patch_tokens, "forward_gflops": self.fvcore.total / 1e9,
                "fvcore": {"total": self.fvcore.total, "model": self.fvcore.model, "method_op": self.fvcore.method_op,
                           "by_operator": self.fvcore.by_operator, "not_counted": self.fvcore.not_counted,
                           "block_tokens": self.fvcore.block_tokens},
                "analytic": self.analytic, "same_as_full": self.same_as_full}


def _prepared(model: nn.Module, cfg) -> nn.Module:
    if cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(False)            # recomputation adds no forward FLOPs and does not trace
    return model.eval()


def model_flops(cfg, num_classes: int, input_size: Optional[int] = None, images: Optional[int] = None,
                world_size: int = 1) -> Dict[str, Any]:
    """fvcore and analytic forward FLOPs of ``cfg.model``: the plain model, and every state the active methods
    declare (combinations of several methods are their product, with the product of the shares).

    The models are built by :func:`models.create_model` exactly as for training. They are counted in eval mode with
    each method state applied (``Variant.apply`` turns the operators on in eval mode too): the same layers and
    token counts as a training forward, without its randomness (dropout, drop-path, LV-ViT's MixToken) or its tuple
    outputs (distilled DeiT, LV-ViT). ``images`` per epoch sets the period of per-iteration schedules.
    """
    size = int(input_size or cfg.input_size)
    methods = MethodSet.from_config(cfg)
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
    variants: List[VariantFlops] = []
    if len(methods):
        model = _prepared(create_model(cfg, num_classes, methods, img_size=size), cfg)
        ops = methods.op_modules(model)
        iters = iterations_per_epoch(cfg, images or 1_281_167, world_size)
        for v in methods.variants(num_patches, cfg.epochs, iters):
            v.apply(model)              # a state with its own input_size resizes the model (a curriculum phase)
            vf = measured(v.label, model, v.share, v.epochs, ops, v.apply, v.input_size or size)
            vf.variant = v
            vf.same_as_full = (vf.fvcore.method_op == 0 and not vf.fvcore.op_acted
                               and vf.fvcore.total == full.fvcore.total
                               and vf.fvcore.block_tokens == full.fvcore.block_tokens)
            variants.append(vf)
    return {"model": cfg.model, "input_size": size, "num_classes": num_classes, "params": params,
            "num_patches": num_patches, "epochs": cfg.epochs, "methods": methods.names,
            "data_fraction": methods.data_fraction(), "full": full, "variants": variants}


# ================================================================================================ training FLOPs
def training_flops(parts: Sequence[Tuple[float, float]], full_forward: float, images: int, epochs: int,
                   data_fraction: float = 1.0, factor: int = FWD_BWD_FACTOR) -> Dict[str, Any]:
    """Total training FLOPs of a schedule and its ratio to the plain recipe on every image and token.

    ``parts``: ``(share of the training images, forward FLOPs per image)`` per method state (shares sum to 1).
    The run presents ``data_fraction`` of the ``images`` per epoch (an example-level method trains on a subset);
    an image costs ``forward x factor``. The ideal speed-up is ``plain total / schedule total``.
    """
    seen = images * epochs * data_fraction
    total = sum(share * fwd for share, fwd in parts) * factor * seen
    full_total = full_forward * factor * images * epochs
    average = total / (factor * seen) if seen else 0.0
    return {"epochs": epochs, "images_per_epoch": images, "data_fraction": data_fraction, "factor": factor,
            "images_seen": seen, "total": total, "full_total": full_total, "average_forward": average,
            "ratio": total / full_total if full_total else 1.0,
            "ideal_speedup": full_total / total if total else 1.0}


def schedule_training_flops(report: Dict[str, Any], images: int, which: str = "total") -> Dict[str, Any]:
    """:func:`training_flops` of a :func:`model_flops` report (``which``: ``total`` fvcore, ``model`` or ``analytic``)."""
    def fwd(v: VariantFlops) -> float:
        if which == "analytic":
            return v.analytic.get("total", 0.0)
        return getattr(v.fvcore, which)
    parts = [(v.share, fwd(v)) for v in report["variants"]] or [(1.0, fwd(report["full"]))]
    return training_flops(parts, fwd(report["full"]), images, report["epochs"], report.get("data_fraction", 1.0))


def epoch_flops(report: Dict[str, Any], images: int, cumulative: bool = False,
                factor: int = FWD_BWD_FACTOR) -> List[float]:
    """Training FLOPs of every epoch of the run (or the running total), from each state's share in that epoch."""
    seen = images * report.get("data_fraction", 1.0) * factor
    out, total = [], 0.0
    for e in range(report["epochs"]):
        if report["variants"]:
            fwd = sum(v.variant.share_in_epoch(e) * v.fvcore.total for v in report["variants"])
        else:
            fwd = report["full"].fvcore.total
        total += fwd * seen
        out.append(total if cumulative else fwd * seen)
    return out


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


class _OpTimer:
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


def benchmark_training(cfg, num_classes: int, batch_size: int = 32, steps: int = 5, warmup: int = 2,
                       amp: str = "none", compile: bool = False, device: str = "auto", input_size: Optional[int] = None,
                       flops: Optional[Dict[str, Any]] = None, inference: bool = True, keep_memory: bool = False,
                       log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Median training throughput of the plain model and in every method state that differs from it, plus the
    ideal and measured speed-up.

    One random batch with random labels; each model has its own AdamW optimizer. After ``warmup`` rounds,
    ``steps`` rounds each run one step of every variant in turn (round-robin), so slow phases of a shared machine
    hit all variants. A step is forward, cross-entropy, backward and ``optimizer.step()``, between device syncs.
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
    methods = MethodSet.from_config(cfg)
    runners: Dict[int, nn.Module] = {}
    optimizers: Dict[int, torch.optim.Optimizer] = {}

    def prepared(m: nn.Module) -> nn.Module:
        m = m.to(dev).train()
        runners[id(m)] = torch.compile(m, dynamic=False) if compile else m
        optimizers[id(m)] = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05)
        return m

    plain = prepared(create_model(cfg, num_classes, MethodSet([]), img_size=size))
    patched_at: Dict[int, nn.Module] = {}        # the patched model per input size (a curriculum's phases)

    def patched(at: int) -> nn.Module:
        if at not in patched_at:
            patched_at[at] = prepared(create_model(cfg, num_classes, methods, img_size=at))
        return patched_at[at]
    scaler = torch.amp.GradScaler(dev.type) if amp == "fp16" else None
    in_chans = input_channels(plain)
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(batch_size, in_chans, size, size, generator=gen).to(dev)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(dev)
    images_at = {size: images}

    def images_for(at: int) -> torch.Tensor:
        if at not in images_at:
            images_at[at] = F.interpolate(images, size=(at, at), mode="bilinear", antialias=True)
        return images_at[at]

    full = flops["full"]
    timed = [Timed("full tokens", plain, None, full.patch_tokens, full.fvcore.total, size)]
    for v in flops["variants"]:
        if not v.same_as_full:
            at = (v.variant.input_size if v.variant is not None else None) or size
            timed.append(Timed(v.label, patched(at), v.apply, v.patch_tokens, v.fvcore.total, at))
    mem = _MemMeter(dev)
    ops = [op for m in patched_at.values() for op in methods.op_modules(m)]
    op_timer = _OpTimer(ops, images_for, autocast, dev)

    def step(t: Timed) -> None:
        opt = optimizers[id(t.model)]
        with autocast():
            loss = training_loss(runners[id(t.model)](images_for(t.size)), labels)
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
        is_timed = r >= warmup
        round_s = []
        for t in timed:
            if t.apply is not None:
                t.apply(t.model)
                t.model.train()
            _sync(dev)
            mem.reset()
            start = time.perf_counter()
            step(t)
            _sync(dev)
            elapsed = time.perf_counter() - start
            round_s.append(f"{t.name} {elapsed:.3f}s")
            if is_timed:
                t.step_s.append(elapsed)
                peak = mem.peak_mb()
                if peak is not None:
                    t.peak_mb.append(peak)
            if t.activations_mb is None:
                t.activations_mb = saved_activations_mb(t.model, images_for(t.size), labels, autocast)
            if t.apply is not None:
                op_timer.capture(t)
                op = op_timer.time(t)
                if is_timed and op is not None:
                    t.op_s.append(op)
        log(f"{'timed' if is_timed else 'warm-up'} round {r + 1 - (warmup if is_timed else 0)}/"
            f"{steps if is_timed else warmup}: " + ", ".join(round_s))

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
    result = {
        "model": cfg.model, "methods": methods.names, "input_size": size, "batch_size": batch_size,
        "num_classes": num_classes, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(), "amp": amp, "compile": compile, "steps": steps, "warmup": warmup,
        "torch": torch.__version__, "keep_freed_memory": kept_memory, "load_average_start": load_start,
        "load_average_end": _load_average(),
        "peak_mem_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "n/a on CPU",
        "process_peak_rss_mb": process_peak_rss_mb(), "variants": rows,
    }
    if inference:       # a fresh model: the states applied above force operators on in eval mode
        fresh = create_model(cfg, num_classes, MethodSet.from_config(cfg), img_size=size).to(dev)
        result["inference"] = benchmark_inference(fresh, images, steps=steps, warmup=warmup, autocast=autocast,
                                                  compile=compile)
    return result


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


# ================================================================================================ printing
def format_flops_report(report: Dict[str, Any], images: int) -> str:
    """The console table of ``scripts/flops.py``."""
    g = 1e9
    methods = "+".join(report["methods"]) or "none"
    lines = [f"{report['model']} at {report['input_size']} px, {report['num_classes']} classes: "
             f"{report['params'] / 1e6:.2f} M parameters, {report['num_patches']} patch tokens; methods: {methods}",
             "forward GFLOPs per image (fvcore; 1 multiply-add = 1 FLOP); 'op' = the methods' own operators",
             f"{'variant':<28} {'share':>6} {'epochs':>9} {'patches':>7} {'fvcore':>9} {'of which':>9} "
             f"{'analytic':>9} {'diff':>7}",
             f"{'':<28} {'':>6} {'':>9} {'':>7} {'total':>9} {'op':>9} {'':>9} {'':>7}"]
    for v in [report["full"]] + list(report["variants"]):
        epochs = f"{v.epochs[0]}-{v.epochs[1] - 1}" if v.epochs else "-"
        ana = v.analytic.get("total")
        diff = f"{(v.fvcore.total / ana - 1) * 100:+.2f}%" if ana else "-"
        ana_text = f"{ana / g:>9.3f}" if ana else f"{'-':>9}"
        share = "-" if v is report["full"] else f"{v.share * 100:.1f}%"
        tokens = f"{v.patch_tokens}" + ("*" if v.same_as_full else "")
        lines.append(f"{v.label[:28]:<28} {share:>6} {epochs:>9} {tokens:>7} {v.fvcore.total / g:>9.3f} "
                     f"{v.fvcore.method_op / g:>9.4f} {ana_text} {diff:>7}")
    if any(v.same_as_full for v in report["variants"]):
        lines.append("* the method changes nothing in this state: the plain model runs")
    fv = schedule_training_flops(report, images, "total")
    if report["variants"]:
        an = schedule_training_flops(report, images, "analytic")
        versus = (f", analytic {an['average_forward'] / g:.3f} "
                  f"({(fv['average_forward'] / an['average_forward'] - 1) * 100:+.2f}%)") if an["total"] else ""
        lines += ["", f"schedule average forward: fvcore {fv['average_forward'] / g:.3f} GFLOPs{versus}"]
    fraction = f" x {fv['data_fraction']:.3f} of the data" if fv["data_fraction"] != 1.0 else ""
    lines += [f"training FLOPs = forward x {fv['factor']} (fwd+bwd) x {images:,} images{fraction} x epochs, "
              f"weighted by each state's share:",
              f"  this run {si_flops(fv['total'])} over {fv['epochs']} epochs; plain recipe {si_flops(fv['full_total'])}; "
              f"ratio {fv['ratio']:.3f} -> ideal speed-up {fv['ideal_speedup']:.3f}x"]
    not_counted = sorted({op for v in [report["full"]] + list(report["variants"]) for op in v.fvcore.not_counted})
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
    out = {k: v for k, v in report.items() if k not in ("full", "variants")}
    out["full"] = report["full"].row()
    out["variants"] = [v.row() for v in report["variants"]]
    out["training"] = schedule_training_flops(report, images, "total")
    out["training_analytic"] = schedule_training_flops(report, images, "analytic")
    return out


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
