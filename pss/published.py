"""Published figures of the Patch Sampling Schedule, as data.

B. McDanel and C. P. Huynh, "Accelerating Vision Transformer Training via a Patch Sampling Schedule", arXiv
2208.09520 (code github.com/BradMcDanel/pss @ 90c12ba; 4 x A100). The paper's tables could not be read; the figures
below come from the repository (file by file in ``docs/sources.md``): its README table [R], its validation logs and
sweep files in the git history (``data/fracpatch/...``, commit cbad0f4) [R data], and the vector paths of its figure
PDFs [V, exact to about +-0.01]. ``None`` cells were not recovered (printed "n/a (not recovered)").

Top-1 is ImageNet-1k validation accuracy on all patches (keep rate 1.0); the README rounds to one decimal, the logs
give the last and the best epoch (the published DeiT code keeps the best checkpoint). Training time is wall-clock
hours of the whole run on 4 x A100. ``sweep`` holds the dynamic-inference figures per test keep rate rho.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from methods import PublishedRow

PAPER = "pss"
SOURCE_README = "BradMcDanel/pss README results table"
SOURCE_LOGS = "BradMcDanel/pss val logs (git history, commit cbad0f4)"
GPUS = "4 x A100"
KEEP = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)


def _sweep(values) -> Dict[float, Optional[float]]:
    return dict(zip(KEEP, values))


def _pss(scheduler: str, start: float, end: float, cooldown: int, sampler: str):
    return {"pss": dict(scheduler=scheduler, start_drop_ratio=start, end_drop_ratio=end, cooldown_epochs=cooldown,
                        sampler=sampler)}


CYCLIC_DEIT = _pss("cyclic", 0.8, -0.1, 10, "magnitude")     # Cyclic(0.2, 1.0), DeiT's 10 cooldown epochs

ROWS: List[PublishedRow] = [
    # --- the README table (main results)
    PublishedRow(PAPER, "README", "SimMIM ViT-B", "pss_vit_base_patch16_224", "baseline (fine-tune, RPB)", methods=(),
                 top1=83.7, top1_final=83.72, top1_best=83.744, train_time=24.62, time_unit="h", gpus=GPUS,
                 source=f"{SOURCE_README}; {SOURCE_LOGS}; time from the overview figure",
                 precision="README 1 decimal (24.6 h); logs 3 decimals; time [V] +-0.01 h",
                 notes="100-epoch fine-tune of SimMIM's 800-epoch pre-training"),
    PublishedRow(PAPER, "README", "SimMIM ViT-B + PSS", "pss_vit_base_patch16_224", "PSS magnitude, Cyclic(0.2, 1.0)",
                 methods=("pss",), settings=_pss("cyclic", 0.8, -0.1, 0, "magnitude"),
                 top1=83.5, top1_final=83.46, top1_best=83.478, train_time=16.99, time_unit="h", gpus=GPUS,
                 speedup=24.62 / 16.99,
                 source=f"{SOURCE_README}; {SOURCE_LOGS}; time from the overview figure",
                 precision="README 1 decimal (17.0 h); logs 3 decimals; time [V] +-0.01 h",
                 notes="abstract: 0.26 % lower top-1 for 31 % less training time (25 -> 17 h); speed-up = 24.62 / 16.99",
                 sweep={"top1": _sweep((83.442, 83.268, 82.780, 82.316, 81.412, 80.188, 78.234, 74.856, 68.740)),
                        "img_per_s": _sweep((1087.3, 1048.9, 1141.5, 1252.1, 1467.4, 1729.1, 1929.5, 2240.3, 2657.6))}),
    PublishedRow(PAPER, "README", "DeiT-S-224", "deit_small_patch16_224", "baseline", methods=(),
                 top1=80.1, top1_final=80.064, top1_best=80.064, train_time=29.9, time_unit="h", gpus=GPUS,
                 gflops=4.608, source=f"{SOURCE_README}; {SOURCE_LOGS}; sweep_drop.json",
                 precision="README 1 decimal; logs 3 decimals",
                 notes="the plain timm DeiT-S (CLS head, no relative position bias), 4 x 256; inference 1592.1 img/s"),
    PublishedRow(PAPER, "README", "DeiT-S-224 + PSS", "pss_deit_small_patch16_224", "PSS magnitude, Cyclic(0.2, 1.0)",
                 methods=("pss",), settings=CYCLIC_DEIT, top1=80.4, top1_final=80.246, top1_best=80.376,
                 train_time=27.9, time_unit="h", gpus=GPUS, gflops=4.608, speedup=29.9 / 27.9,
                 source=f"{SOURCE_README}; {SOURCE_LOGS}; sweep_drop.json",
                 precision="README 1 decimal; logs and sweep 3 decimals",
                 notes="relative position bias + mean pooling (pss_deit_small_patch16_224_384); speed-up = 29.9 / 27.9",
                 sweep={"top1": _sweep((80.376, 80.138, 79.948, 79.410, 78.610, 77.458, 75.790, 72.894, 66.858)),
                        "gflops": _sweep((4.608, 4.113, 3.650, 3.170, 2.698, 2.232, 1.797, 1.346, 0.902)),
                        "img_per_s": _sweep((1712.6, 1852.6, 2149.4, 2382.8, 2767.7, 2973.1, 3021.5, 3057.0, 3110.8))}),
    PublishedRow(PAPER, "README", "DeiT-S-384 + PSS", "pss_deit_small_patch16_384", "PSS magnitude, Cyclic(0.2, 1.0)",
                 methods=("pss",), settings=CYCLIC_DEIT, top1=82.7, top1_final=82.696, top1_best=82.716,
                 train_time=109.0, time_unit="h", gpus=GPUS, gflops=15.52,
                 source=f"{SOURCE_README}; {SOURCE_LOGS}; sweep_drop.json",
                 precision="README 1 decimal; logs and sweep 3 decimals",
                 notes="trained from scratch at 384 px, 4 x 128; 464.9 img/s at rho = 1, 2.74 GFLOPs at rho = 0.2",
                 sweep={"top1": _sweep((82.716, 82.664, 82.434, 82.112, 81.732, 81.020, 79.946, 78.018, 73.858))}),
    PublishedRow(PAPER, "README (older)", "DeiT-S-384", "vit_small_patch16_384", "baseline (384 px)", methods=(),
                 train_time=150.0, time_unit="h", gpus=GPUS,
                 source="BradMcDanel/pss README @ 54bbe43 (row removed in 90c12ba); deit/configs/deit-s-384/baseline.sh",
                 precision="approximate: '~150h' while the run was still training; accuracy '?' (never reported)",
                 notes="deit_small_patch16_384_384: plain DeiT-S at 384 px (CLS head, no relative position bias), "
                       "4 x 128; timm's vit_small_patch16_384 is the same model"),
    # --- schedule comparison, SimMIM ViT-B fine-tune, top-1 at rho = 1.0 and the dynamic-inference sweep
    PublishedRow(PAPER, "Fig. sweep-drop-ratio", "ViT-B (sweep)", "pss_vit_base_patch16_224", "baseline", methods=(),
                 top1=83.712, source="figures/sweep-drop-ratio.pdf; sweep_drop.json", precision="[V] / read, 3 decimals",
                 notes="the sweep's evaluation of the baseline checkpoint",
                 sweep={"top1": _sweep((83.712, 83.312, 82.672, 81.532, 79.762, 76.920, 72.296, 64.050, 48.946)),
                        "img_per_s": _sweep((1102.6, 1059.3, 1161.6, 1297.5, 1539.0, 1764.5, 2072.4, 2439.0, 2916.8))}),
    PublishedRow(PAPER, "Fig. sweep-drop-ratio", "ViT-B + Fixed(0.6), magnitude", "pss_vit_base_patch16_224",
                 "PSS magnitude, Fixed(0.6)", methods=("pss",), settings=_pss("linear", 0.4, 0.4, 0, "magnitude"),
                 top1=83.08, source="figures/sweep-drop-ratio.pdf", precision="[V] +-0.01",
                 notes="training time not recovered",
                 sweep={"top1": _sweep((83.08, 82.98, 82.70, 82.25, 81.57, 80.26, 78.10, None, None))}),
    PublishedRow(PAPER, "Fig. sweep-drop-ratio", "ViT-B + Linear(0.2, 1.0), magnitude", "pss_vit_base_patch16_224",
                 "PSS magnitude, Linear(0.2, 1.0)", methods=("pss",), settings=_pss("linear", 0.8, -0.1, 0, "magnitude"),
                 top1=83.28, source="figures/sweep-drop-ratio.pdf", precision="[V] +-0.01",
                 notes="training time not recovered",
                 sweep={"top1": _sweep((83.28, 83.08, 82.70, 82.21, 81.13, 79.35, 76.72, None, None))}),
    # the same schedules with random sampling: the paper's schedule/sampling table was not recovered
    *[PublishedRow(PAPER, "schedule/sampling table", f"ViT-B + {label}, random", "pss_vit_base_patch16_224",
                   f"PSS random, {label}", methods=("pss",), settings=_pss(sched, start, end, 0, "random"),
                   source="paper table printed by viz/print_comp_table.py", precision="not recovered")
      for label, sched, start, end in (("Fixed(0.6)", "linear", 0.4, 0.4), ("Linear(0.2, 1.0)", "linear", 0.8, -0.1),
                                       ("Cyclic(0.2, 1.0)", "cyclic", 0.8, -0.1))],
    # --- the DynamicViT comparison of the DeiT-S sweep figure (another method; no run of this repository)
    PublishedRow(PAPER, "Fig. dynamicvit-comp", "DynamicViT-S (trained for rho = 0.7)", None, "DynamicViT-S",
                 methods=None, top1=79.38, source="figures/dynamicvit-comp.pdf", precision="[V] +-0.01",
                 kind="context", notes="another method, as the PSS figure plots it",
                 sweep={"top1": _sweep((79.38, 79.57, 79.43, 79.27, 78.47, 76.71, 71.94))}),     # not plotted below 0.4
]
