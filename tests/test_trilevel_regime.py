"""Tri-Level's published run as a whole, on the table configs: the data regime (each process its own 80 % subset and
statistics, numpy's quicksort ranking), the DeiT-S launch (the DeiT-T command with the DeiT-S model), fp16 as
resolved. (A ``per_rank`` checkpoint written inside an epoch holds every process's subset and resumes exactly on two
processes: ``tests/test_trilevel_method.py``.)
"""
import glob
import os
from unittest import mock

import numpy as np
import pytest

import main as entry
import trilevel.method as tm
from config import load_config
from datasets import RASampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "deit_*_trilevel*.yaml")))
IMAGENET = 1_281_167


def config(path, *extra):
    return load_config(path, list(extra))


def rows(cfg):
    return [(r["paper"], r["row"]) for r in (cfg.reproduces if isinstance(cfg.reproduces, list) else [cfg.reproduces])]


def test_the_table_configs_use_the_published_data_regime_and_fp16():
    assert len(CONFIGS) == 7
    with_examples = []
    for path in CONFIGS:
        cfg = config(path)
        assert all(paper == "trilevel" for paper, _ in rows(cfg)), path
        assert cfg.amp == "fp16", path                        # the published float16 autocast ...
        assert "bf16" not in open(path).read(), path           # ... and no comment that says otherwise
        if cfg.trilevel.example_level:
            with_examples.append(os.path.basename(path))
            assert (cfg.trilevel.sync, cfg.trilevel.sort_kind) == ("per_rank", "quicksort"), path
    assert {"deit_t_trilevel.yaml", "deit_s_trilevel.yaml", "deit_s_trilevel_keep08.yaml",
            "deit_s_trilevel_keep07.yaml"} <= set(with_examples)
    with open(os.path.join(ROOT, "docs", "methods.md"), encoding="utf-8") as f:
        page = f.read()
    start = page.index("\n## Tri-Level E-ViT")
    section = page[start:page.index("\n## ", start + 1)]
    assert "bf16 by default" not in section and "table configs run fp16 autocast with a loss scaler" in section


def epoch_images(cfg, sync, n, world=4):
    """The dataset indices the ``world`` processes of a run train on in epoch 0 (the method's subsets through our
    repeated-augmentation sampler, as main.py wires them), per process."""
    cfg = load_config(cfg, ["--trilevel.sync", sync, "--trilevel.remove_n", str(n // 20)])     # 5 %, as 64058
    out = []
    for rank in range(world):
        with mock.patch.object(tm, "_dist", return_value=(rank, world)):
            subset = tm.TriLevel(cfg.trilevel, cfg).train_indices(0, n)
        sampler = RASampler(range(n), world, rank, repeats=cfg.ra_repeats, seed=cfg.seed)
        sampler.set_indices(subset)
        sampler.set_epoch(0)
        out.append((np.asarray(subset), np.fromiter(iter(sampler), dtype=np.int64)))
    return out


def test_per_rank_trains_each_process_on_its_own_subset():
    """``per_rank`` (the table configs): 4 subsets of 80 % cover 1 - 0.2^4 = 99.84 % of the data and the three
    repeated-augmentation copies of a draw are three different images, so an epoch sees about 59 % of the data
    (ImageNet: 59.1 %); ``global`` (one subset): 80 % and about 27 % (26.7 %). At 1/50 of ImageNet's size."""
    n = IMAGENET // 50
    path = os.path.join(ROOT, "configs", "deit_s_trilevel.yaml")
    per_rank, one = epoch_images(path, "per_rank", n), epoch_images(path, "global", n)
    union = np.unique(np.concatenate([s for s, _ in per_rank]))
    assert abs(union.size / n - (1 - 0.2 ** 4)) < 0.002
    assert all(s.size == n - int(n * 0.2) for s, _ in per_rank)
    assert len({tuple(s[:50]) for s, _ in per_rank}) == 4                      # seeds seed + rank
    distinct = np.unique(np.concatenate([i for _, i in per_rank])).size / n
    assert 0.56 < distinct < 0.62, distinct
    assert np.unique(one[0][0]).size == n - int(n * 0.2) and all(np.array_equal(s, one[0][0]) for s, _ in one)
    distinct_global = np.unique(np.concatenate([i for _, i in one])).size / n
    assert 0.24 < distinct_global < 0.29, distinct_global
    # the ranking of forgetting counts is numpy's default sort
    cfg = config(path)
    assert tm.TriLevel(cfg.trilevel, cfg).level.sort_kind == "quicksort"


def test_the_deit_s_launch_is_the_deit_t_command_with_the_deit_s_model():
    t, s = config(os.path.join(ROOT, "configs", "deit_t_trilevel.yaml")), config(os.path.join(ROOT, "configs",
                                                                                             "deit_s_trilevel.yaml"))
    flat = lambda c: entry._flatten(c.to_dict())                                           # noqa: E731
    ft, fs = flat(t), flat(s)
    assert {k for k in ft.keys() | fs.keys() if ft.get(k) != fs.get(k)} == {"model", "output_dir", "reproduces.row"}
    for name in ("deit_s_trilevel.yaml", "deit_s_trilevel_keep08.yaml", "deit_s_trilevel_keep07.yaml"):
        cfg = config(os.path.join(ROOT, "configs", name))
        assert (cfg.batch_size, cfg.nproc, cfg.grad_accum_steps) == (512, 4, 1), name
        assert entry.scaled_lr(cfg, cfg.nproc) == pytest.approx(2e-3), name
        # 500 iterations per epoch: each process's 80 % subset of ImageNet through repeated augmentation
        subset = IMAGENET - int(IMAGENET * cfg.trilevel.pool_fraction)
        sampler = RASampler(range(IMAGENET), cfg.nproc, 0, repeats=cfg.ra_repeats)
        sampler.set_indices(range(subset))
        assert len(sampler) // cfg.batch_size == 500, name
    # the attention-only ablation is run.sh's command: 4 x 384
    cfg = config(os.path.join(ROOT, "configs", "deit_s_trilevel_attention_only.yaml"))
    assert (cfg.batch_size, cfg.nproc) == (384, 4) and entry.scaled_lr(cfg, 4) == pytest.approx(1.5e-3)
