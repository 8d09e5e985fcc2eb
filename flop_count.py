"""Forward FLOPs of a model and training FLOPs of a schedule: fvcore counts of one ``1x3xSxS`` forward pass next to
the closed-form ViT cost of the token counts that really entered each block, and the console/JSON report of
``scripts/flops.py``. :func:`measure.model_flops` applies these counts to a config's plain model and method states.

fvcore counts one fused multiply-add as one FLOP (so these are MACs, the unit of the DeiT/ToE/PSS papers). It has no
handle for ``aten::scaled_dot_product_attention`` (timm's fused attention), so we register one; without it the
attention products ``q@k^T`` and ``attn@v`` would silently count as zero. The methods' own operators
(``Method.op_modules``) are reported on their own: their matmuls (or ``cdist``) are counted; their ``topk`` / gathers /
scatters are memory operations and, like every elementwise op, are not.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

FWD_BWD_FACTOR = 3          # backward costs about twice the forward: one training image = 3 forward passes


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
