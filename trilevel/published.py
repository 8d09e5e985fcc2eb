"""Published figures of Tri-Level E-ViT, as data.

Z. Kong et al., "Peeling the Onion: Hierarchical Reduction of Data Redundancy for Efficient Vision Transformer
Training", AAAI 2023 (arXiv 2211.10801; code github.com/ZLKong/Tri-Level-ViT @ 2bf7f80). The paper's tables could not
be read (``docs/sources.md`` gives every address). What is known:

* the abstract [R]: DeiT-T 72.6 % top-1 (+0.4) at a 15.2 % speed-up, DeiT-S 79.9 % (+0.1) at 15.7 %; "speed-up" is
  the reduction of training time against the dense DeiT at the same epochs, so the time is 84.8 / 84.3 % of it;
* the DeiT-S comparison of the paper's Fig. 1 (``plot_time_acc_table.png`` in the repository), read off the raster
  figure by pixel measurement [F]: about +-0.05 percentage points in top-1 and +-0.3 % in training time.

Training time is in percent of the DeiT baseline's (GPU type not recovered); ``speedup`` is derived from it
(100 / time). The settings of each published row beyond the token keep ratio in its label are not published
(``configs/deit_s_trilevel*.yaml`` record our choices); ``None`` cells were not recovered.
"""
from __future__ import annotations

from typing import List, Optional

from methods import PublishedRow

PAPER = "trilevel"
ABSTRACT = "Tri-Level E-ViT abstract (AAAI 2023, arXiv 2211.10801)"
FIG1 = "Tri-Level E-ViT Fig. 1 (ZLKong/Tri-Level-ViT plot_time_acc_table.png), read off the raster figure"
FIG1_PRECISION = "[F] raster read-off: +-0.05 pt top-1, +-0.3 % time"
ALL_LEVELS = dict(example_level=True, token_level=True, attention_level=True)


def _fig1(label: str, time: float, top1: float, methods: Optional[tuple] = None, settings=None,
          notes: str = "") -> PublishedRow:
    return PublishedRow(PAPER, "Fig. 1 (DeiT-S)", label, "deit_small_patch16_224", label, methods=methods,
                        settings=settings or {}, top1=top1, train_time=time, time_unit="% of baseline",
                        speedup=None if methods == () else round(100.0 / time, 3), source=FIG1, precision=FIG1_PRECISION,
                        kind="table", notes=notes)


ROWS: List[PublishedRow] = [
    # --- the abstract's two results
    PublishedRow(PAPER, "abstract", "DeiT-T Tri-Level", "deit_tiny_patch16_224", "Tri-Level E-ViT", methods=("trilevel",),
                 settings={"trilevel": dict(ALL_LEVELS)}, top1=72.6, train_time=84.8, time_unit="% of baseline",
                 speedup=round(100.0 / 84.8, 3), source=ABSTRACT, precision="read (abstract: 72.6 %, 15.2 % speed-up)",
                 notes="its keep / attention ratios and remove_n are not published; the README's DeiT-T command "
                       "uses keep 0.9, attention 0.1, remove-n 64058 on 4 GPUs x 512"),
    PublishedRow(PAPER, "abstract", "DeiT-T baseline", "deit_tiny_patch16_224", "DeiT-T (dense)", methods=(),
                 top1=72.2, train_time=100.0, time_unit="% of baseline", source=ABSTRACT,
                 precision="implied by the abstract's '72.6 % (+0.4)'"),
    PublishedRow(PAPER, "abstract", "DeiT-S Tri-Level", "deit_small_patch16_224", "Tri-level/0.9", methods=("trilevel",),
                 settings={"trilevel": dict(ALL_LEVELS, keep_ratio=0.9)}, top1=79.9, train_time=84.3,
                 time_unit="% of baseline", speedup=round(100.0 / 84.3, 3), source=ABSTRACT,
                 precision="read (abstract: 79.9 %, 15.7 % speed-up); Fig. 1 reads 84.2-84.3 %",
                 notes="the Tri-level/0.9 point of Fig. 1"),
    # --- Fig. 1: the DeiT-S comparison (the Tri-level/0.9 point is the abstract row above)
    _fig1("DeiT-S (baseline)", 100.0, 79.8, methods=()),
    _fig1("Tri-level/0.8", 70.2, 79.5, ("trilevel",), {"trilevel": dict(ALL_LEVELS, keep_ratio=0.8)}),
    _fig1("Tri-level/0.7", 65.7, 79.3, ("trilevel",), {"trilevel": dict(ALL_LEVELS, keep_ratio=0.7)}),
    _fig1("EViT/0.9", 94.0, 79.8),
    _fig1("EViT/0.8", 87.0, 79.8),
    _fig1("EViT/0.7", 79.9, 79.5),
    _fig1("EViT/0.6", 75.0, 78.9),
    _fig1("EViT/0.5", 72.0, 78.5),
    _fig1("Evo-ViT", 87.0, 79.4),
    _fig1("S2ViTE", 77.3, 79.2),
    _fig1("Forgetting", 83.9, 79.0, notes="the example-level baseline (forgetting-based example removal)"),
    _fig1("Active Bias", 95.7, 79.1),
    _fig1("UVC", 100.0, 79.4),
    _fig1("IA-RED2", 100.0, 79.1),
    _fig1("DynamicViT (pretrain)", 92.8, 77.6),
    # --- per-level ablations, DeiT-T/B rows, GPU hours, FLOPs, Swin: not recovered
    *[PublishedRow(PAPER, "ablation: levels", f"DeiT-S {label} only", "deit_small_patch16_224", f"{label} level only",
                   methods=("trilevel",), settings={"trilevel": {k: k.startswith(level) for k in ALL_LEVELS}},
                   time_unit="% of baseline", source="Tri-Level E-ViT per-level ablation", precision="not recovered",
                   notes="model and settings of the paper's ablation not recovered; ours: configs/deit_s_trilevel_*_only.yaml")
      for label, level in (("example", "example"), ("token", "token"), ("attention", "attention"))],
]
