"""Published figures of the ToE paper, and the figures of other sources its tables sit beside, as data.

W. Huang et al., "A General and Efficient Training for Transformer via Token Expansion", CVPR 2024 (arXiv 2404.00672;
code github.com/Osilly/TokenExpansion @ 01e52fe). What was and was not recovered, with the
address of every source, is in ``docs/sources.md``: **none of the paper's numeric table
cells could be read**, so every ToE cell below is ``None`` (printed as "n/a (not recovered)"). Fill them from the
CVF or arXiv PDF by hand, never from memory. The settings of each row are the official scripts' (named there);
where the paper's model for a row is unconfirmed the note says so.

``kind="context"`` rows are *not* ToE table values: they are the DeiT and LV-ViT READMEs' figures and EfficientTrain's
own table, shown beside a run as orientation (ToE's Tab. 1 / Tab. 4 re-ran their baselines; those re-runs are not
recovered).
"""
from __future__ import annotations

from typing import Any, Dict, List

from methods import PublishedRow

PAPER = "toe"
SOURCE = "ToE, CVPR 2024 (arXiv 2404.00672)"
NOT_RECOVERED = "table cells not recovered (docs/sources.md)"

# the official scripts' schedules (Osilly/TokenExpansion run/*.sh, ET_training.py); every other toe: key at its default
DEIT = dict(expansion_steps=[0, 100, 200], keep_rates=[0.5, 0.75, 1.0], init_keep_rate=0.25, repeat_k=2)
LVVIT = dict(expansion_steps=[0, 100, 200], keep_rates=[0.4, 0.7, 1.0], init_keep_rate=0.2, repeat_k=2)
ET = dict(expansion_steps=[0, 100, 200], keep_rates=[0.6, 0.8, 1.0], init_keep_rate=0.3, repeat_k=2)
# EfficientTrain v1 as ET_training.py runs it (the efficienttrain section's published values)
ET_CURRICULUM = {"efficienttrain": dict(input_sizes=[160, 160, 160, 192, 224], rand_magnitudes=[1, 3, 5, 7, 9],
                                        rand_augment="rand-m{m}-mstd0.5-inc1", batch_scale=[2, 2, 2, 2, 1])}
TAB4_METHODS = {"baseline": (), "EfficientTrain": ("efficienttrain",), "EfficientTrain + ToE": ("efficienttrain", "toe")}
# what makes a run the published method rather than one of its ablations
PUBLISHED_PIPELINE = dict(distance="cosine", distance_mode="published", insert_block=1, init="grid",
                          expansion="farthest", merge="mean")


def _toe(schedule: Dict[str, Any], **changes: Any) -> Dict[str, Dict[str, Any]]:
    return {"toe": {**schedule, **PUBLISHED_PIPELINE, **changes}}


def _tab1(name: str, model: str, schedule: Dict[str, Any], confirmed: bool, script: str) -> List[PublishedRow]:
    presence = "" if confirmed else "presence of this model in Tab. 1 unconfirmed [?]; "
    return [
        PublishedRow(PAPER, "Tab. 1", f"{name} baseline", model, "baseline (full tokens)", methods=(),
                     source=SOURCE, precision=NOT_RECOVERED, notes=f"{presence}the paper's own re-run of the recipe"),
        PublishedRow(PAPER, "Tab. 1", f"{name} ToE", model, "ToE", methods=("toe",), settings=_toe(schedule),
                     source=SOURCE, precision=NOT_RECOVERED, notes=f"{presence}settings: {script}"),
    ]


ROWS: List[PublishedRow] = [
    # --- the abstract's claim (the only published ToE number)
    PublishedRow(PAPER, "abstract", "claim: ~1.3x faster, lossless", None, "ToE", methods=None, speedup=1.3,
                 source="ToE abstract (ar5iv / CVF page): 'about 1.3x faster' with no accuracy loss or a gain",
                 precision="read", kind="claim", notes="no table row; ~1.3x over full-token baselines"),
    # --- Tab. 1: DeiT and LV-ViT on ImageNet-1k, hyper-parameters kept (all cells [NF])
    *_tab1("DeiT-T", "deit_tiny_patch16_224", DEIT, False, "no official Tiny script; the DeiT family's (0.5/0.75/1.0, r0 0.25, k 2)"),
    *_tab1("DeiT-S", "deit_small_patch16_224", DEIT, True, "ToE/deit/run/imagenet_small_run1.sh, 4 x 256, seed 3407"),
    *_tab1("DeiT-B", "deit_base_patch16_224", DEIT, False, "no official Base script; the DeiT family's"),
    *_tab1("LV-ViT-T", "lvvit_t", LVVIT, False, "no official Tiny script; the LV-ViT family's (0.4/0.7/1.0, r0 0.2, k 2)"),
    *_tab1("LV-ViT-S", "lvvit_s", LVVIT, True, "ToE/lvvit/run/imagenet_small_run1.sh, 4 x 256, apex AMP, EMA"),
    *_tab1("LV-ViT-M", "lvvit_m", LVVIT, False, "no official Medium script; the LV-ViT family's"),
    # --- Tab. 2: hyper-parameter consistency relaxed (model not recovered; lower min lr, value not recovered)
    PublishedRow(PAPER, "Tab. 2", "Hyper baseline", None, "baseline", methods=None, source=SOURCE,
                 precision=NOT_RECOVERED, notes="model [NF]"),
    *[PublishedRow(PAPER, "Tab. 2", f"ToE^Hyper_{r}", None, f"ToE^Hyper_{r}", methods=("toe",),
                   settings=_toe({**(LVVIT if r == "0.4" else DEIT), "expansion_steps": [0, 130, 260]}),
                   source=SOURCE, precision=NOT_RECOVERED,
                   notes="model [NF]; stages [0-130], [131-260], [261-300] and a lower min lr (value [NF]); "
                         "the subscript is most likely r1 [?]")
      for r in ("0.4", "0.5")],
    *[PublishedRow(PAPER, "Tab. 2", name, None, name, methods=None, source=SOURCE, precision=NOT_RECOVERED,
                   notes="competitor named by summaries; presence in Tab. 2 unconfirmed [?]")
      for name in ("SViTE", "ToMe", "NetworkExpansion")],
    # --- Tab. 4: on top of EfficientTrain (DeiT-T/S most likely [?]): the `efficienttrain:` curriculum (ET v1 as
    # ToE's ET_training.py runs it), with the ToE section on top for the last row; configs/deit_{t,s}_et*.yaml.
    *[PublishedRow(PAPER, "Tab. 4", f"{name} {label} (Tab. 4)", model, label, methods=TAB4_METHODS[label],
                   settings={**(_toe(ET) if "ToE" in label else {}), **(ET_CURRICULUM if "Eff" in label else {})},
                   source=SOURCE, precision=NOT_RECOVERED,
                   notes="models of Tab. 4 most likely DeiT-T/S [?]; ET v1 recipe, 8 GPUs, batch 4096"
                         + ("; ToE keep 0.6/0.8/1.0, r0 0.3, k 2" if "ToE" in label else ""))
      for name, model in (("DeiT-T", "deit_tiny_patch16_224"), ("DeiT-S", "deit_small_patch16_224"))
      for label in ("baseline", "EfficientTrain", "EfficientTrain + ToE")],
    # --- CIFAR-10/100 fine-tuning (table number, model and cells not recovered)
    *[PublishedRow(PAPER, "CIFAR fine-tuning", f"CIFAR-{n} from {pre}", None, f"fine-tune from {pre}",
                   methods=None, source=SOURCE, precision=NOT_RECOVERED,
                   notes="DeiT size [NF]; DeiT's fine-tuning recipe on 4 GPUs")
      for n in (10, 100) for pre in ("baseline", "ToE")],
    # --- ablations (existence: pipeline and speed-up factor [R: linnk.ai]; k, distance, position [?]); the
    # published default row of each is the Tab. 1 row. Model [NF]: the configs/ablations/ runs use DeiT-S.
    *[PublishedRow(PAPER, f"ablation: {table}", row, None, row, methods=("toe",), settings=_toe(DEIT, **changes),
                   source=SOURCE, precision=NOT_RECOVERED,
                   notes="model and settings of the ablation table [NF]; ours: configs/ablations/")
      for table, row, changes in (
          ("pipeline", "pipeline: random initialization", dict(init="random")),
          ("pipeline", "pipeline: random expansion", dict(expansion="random")),
          ("pipeline", "pipeline: no expansion", dict(expansion="none")),
          ("pipeline", "pipeline: no merging (drop)", dict(merge="drop")),
          ("pipeline", "pipeline: random selection, no merging", dict(init="random", expansion="random", merge="drop")),
          ("speed-up factor", "speed-up factor: r1 = 0.4", dict(keep_rates=[0.4, 0.7, 1.0], init_keep_rate=0.2)),
          ("speed-up factor", "speed-up factor: r1 = 0.6", dict(keep_rates=[0.6, 0.8, 1.0], init_keep_rate=0.3)),
          ("repetition step", "repetition step: k = 1", dict(repeat_k=1)),
          ("repetition step", "repetition step: k = 5", dict(repeat_k=5)),
          ("distance", "distance: manhattan", dict(distance="manhattan")),
          ("distance", "distance: euclidean", dict(distance="euclidean")),
          ("insertion position", "insertion: before block 1 (insert_block 0)", dict(insert_block=0)),
          ("insertion position", "insertion: after block 2 (insert_block 2)", dict(insert_block=2)),
          ("insertion position", "insertion: after block 4 (insert_block 4)", dict(insert_block=4)),
      )],
    # --- context: not ToE's numbers. DeiT README (eval of the released weights), LV-ViT README (224 px) and
    # TokenLabeling issue #23 (LV-ViT-T), EfficientTrain's own Tab. 5 (imgs/in_1k.png @ a85f8ec, 3090 GPUs).
    *[PublishedRow("deit", "README", f"{name} (released weights)", model, "DeiT", methods=(), top1=top1,
                   source="facebookresearch/deit README_deit.md @ 7e160fe (eval of the released checkpoints)",
                   precision="read, 3 decimals", kind="context", notes="the DeiT paper rounds to 72.2 / 79.8 / 81.8")
      for name, model, top1 in (("DeiT-Ti", "deit_tiny_patch16_224", 72.202), ("DeiT-S", "deit_small_patch16_224", 79.854),
                                ("DeiT-B", "deit_base_patch16_224", 81.846))],
    *[PublishedRow("lvvit", "README", f"{name} 224 px", model, "LV-ViT (token labeling)", methods=(), top1=top1,
                   source=source, precision="read", kind="context")
      for name, model, top1, source in (
          ("LV-ViT-T", "lvvit_t", 79.1, "zihangJiang/TokenLabeling README model table (and issue #23: 'Table 1')"),
          ("LV-ViT-S", "lvvit_s", 83.3, "zihangJiang/TokenLabeling README model table"),
          ("LV-ViT-M", "lvvit_m", 84.0, "zihangJiang/TokenLabeling README model table (released checkpoint)"))],
    *[PublishedRow("efficienttrain", "Tab. 5", f"{name} {label}", model, label,
                   methods=("efficienttrain",) if label == "EfficientTrain" else (),
                   settings=ET_CURRICULUM if label == "EfficientTrain" else {},
                   top1=top1, speedup=speed, gpus="NVIDIA 3090 (wall-time)" if speed else None,
                   source="EfficientTrain (ICCV 2023) Tab. 5, LeapLabTHU/EfficientTrain imgs/in_1k.png @ a85f8ec",
                   precision="read from the table image", kind="context",
                   notes=notes + "; whether ToE's Tab. 4 quotes or re-runs these is not recovered")
      for name, model, rows in (
          ("DeiT-T", "deit_tiny_patch16_224", ((72.2, None, "original paper", "DeiT paper's figure as EfficientTrain lists it"),
                                              (72.5, None, "baseline", "EfficientTrain's re-run, 300 epochs"),
                                              (73.3, 1.55, "EfficientTrain", "wall-time speed-up 1.55x, computation 1.59x"))),
          ("DeiT-S", "deit_small_patch16_224", ((79.9, None, "original paper", "DeiT paper's figure as EfficientTrain lists it"),
                                               (80.3, None, "baseline", "EfficientTrain's re-run, 300 epochs"),
                                               (80.3, 1.51, "EfficientTrain", "wall-time speed-up 1.51x, computation 1.56x"))))
      for top1, speed, label, notes in rows],
]
