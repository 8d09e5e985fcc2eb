"""The PSS table configs against the published run as a whole (what the operator fixtures can't see): parameter
groups and weight decay, SimMIM's lr at every update, published PSS and SimMIM checkpoints from the command line,
ties in magnitude sampling, and keep counts down to the class token alone.

The published rules are written out here from the published code (BradMcDanel/pss at 90c12ba: ``deit/pss.py``,
``simmim/optimizer.py``, ``simmim/lr_scheduler.py``, ``simmim/utils.py``, ``simmim/main_finetune.py``,
``deit/patch_sampler.py``), independently of the implementation under test.
"""
import argparse
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import main as entry
from config import load_config
from methods import MethodSet
from models import create_model
from pss import PatchSampler, apply_sampler, num_kept_patches, select_patches
from tests.runs import CONFIGS, DEMO, ROOT, TINY_MODEL, TINY_VIT


def tiny(config, *extra):
    """A table config with a tiny model of the same family (2 blocks, width 32, 16 px: a 4 x 4 patch grid)."""
    return load_config(os.path.join(CONFIGS, config), [*TINY_MODEL, *extra])


# ------------------------------------------------------------------------------------------ 1: parameter groups
def published_layer(name: str, depth: int) -> int:
    """``get_vit_layer`` of the published SimMIM optimizer (``num_layers = depth + 2``)."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return depth + 1
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return depth + 1


def published_groups(model, weight_decay, lr, layer_decay=None):
    """name -> (weight decay, peak lr) as the published optimizers build them: no decay for 1-D parameters, biases
    and the model's published ``no_weight_decay()`` = {pos_embed, cls_token}; SimMIM's layer scales
    ``layer_decay ** (depth + 1 - layer)`` on the lr."""
    depth = len(model.blocks)
    out = {}
    for name, p in model.named_parameters():
        exempt = p.ndim == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token")
        scale = 1.0 if layer_decay is None else layer_decay ** (depth + 1 - published_layer(name, depth))
        out[name] = (0.0 if exempt else weight_decay, lr * scale)
    return out


def our_groups(cfg, model, lr):
    optimizer = entry.create_optimizer(cfg, model, lr)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["weight_decay"], g["lr"] * g.get("lr_scale", 1.0))
            for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("config", ["deit_s_pss.yaml", "deit_s_384_pss.yaml", "vit_b_simmim_ft.yaml",
                                    "vit_b_simmim_ft_pss_magnitude_cyclic_80_0.yaml"])
def test_parameter_groups_are_the_published_ones(config):
    cfg = tiny(config, "--finetune", "")
    model = create_model(cfg, 10)
    ours = our_groups(cfg, model, 1e-3)
    published = published_groups(model, cfg.weight_decay, 1e-3, cfg.layer_decay)
    assert set(ours) == set(published)
    for name in published:
        assert ours[name][0] == published[name][0], name
        assert ours[name][1] == pytest.approx(published[name][1], rel=1e-12), name
    tables = [n for n in ours if n.endswith("relative_position_bias_table")]
    assert len(tables) == 2 and all(ours[n][0] == cfg.weight_decay > 0 for n in tables)       # the tables decay


def test_exempting_the_bias_tables_is_an_option_that_breaks_the_published_groups():
    cfg = tiny("deit_s_pss.yaml", "--model_kwargs", "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, "
                                                    "rel_pos_bias_decay: false}")
    model = create_model(cfg, 10)
    ours = our_groups(cfg, model, 1e-3)
    published = published_groups(model, cfg.weight_decay, 1e-3)
    differ = sorted(n for n in published if ours[n][0] != published[n][0])
    assert differ == ["blocks.0.attn.relative_position_bias_table", "blocks.1.attn.relative_position_bias_table"]


# ------------------------------------------------------------------------------------------ 2: SimMIM's lr
def published_simmim_lr(peak, warmup_lr, min_lr, warmup_updates, total_updates, update):
    """The lr update ``update`` trains with in the published fine-tuning: timm 0.4's ``CosineLRScheduler`` with
    ``t_initial = epochs x iterations``, ``warmup_t``, no warm-up prefix, per group ``peak = base lr x scale`` and
    the same ``warmup_lr`` / ``min_lr``; ``step_update(epoch * num_steps + idx)`` runs after each update, so update
    ``g`` trains with the value at ``g - 1`` (the first with the warm-up start set at construction)."""
    t = max(update - 1, 0)
    if t < warmup_updates:
        return warmup_lr + t * (peak - warmup_lr) / warmup_updates
    if t >= total_updates:
        return min_lr
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t / total_updates))


def lr_per_update(cfg, model, updates):
    """Every group's lr at every update of the run, as the engine sets it (``main.lr_setter``)."""
    optimizer = entry.create_optimizer(cfg, model, entry.scaled_lr(cfg, cfg.nproc))
    sched = entry.build_scheduler(cfg, optimizer, updates)
    out = []
    for epoch in range(cfg.epochs):
        for k in range(updates):
            sched.step_update(entry.lr_update(cfg, epoch, k, updates))
            out.append([g["lr"] for g in optimizer.param_groups])
    return optimizer, out


@pytest.mark.parametrize("bounds,faithful", [("shared", True), ("scaled", False)])
def test_simmim_lr_at_every_update(bounds, faithful):
    cfg = tiny("vit_b_simmim_ft.yaml", "--finetune", "", "--epochs", "6", "--warmup_epochs", "2",
               "--layer_decay_bounds", bounds)
    updates = 7
    model = create_model(cfg, 10)
    optimizer, lrs = lr_per_update(cfg, model, updates)
    peak = entry.scaled_lr(cfg, cfg.nproc)
    assert peak == pytest.approx(1.25e-3)                                        # 4 x 128 = 512: as given
    published = published_groups(model, cfg.weight_decay, peak, cfg.layer_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    worst = 0.0
    for i, group in enumerate(optimizer.param_groups):
        group_peak = published[names[id(group["params"][0])]][1]
        for g, row in enumerate(lrs):
            want = published_simmim_lr(group_peak, 2.5e-7, 2.5e-7, 2 * updates, 6 * updates, g)
            worst = max(worst, abs(row[i] - want) / want)
    if faithful:
        assert worst < 1e-12
    else:
        assert worst > 0.5             # timm 1.x scales warm-up start and min lr too: far off for the low layers


def test_simmim_configs_set_the_published_schedule():
    for name in sorted(os.listdir(CONFIGS)):
        if name.startswith("vit_b_simmim_ft"):
            cfg = load_config(os.path.join(CONFIGS, name), [])
            assert (cfg.sched_step, cfg.layer_decay_bounds, cfg.warmup_lr, cfg.min_lr) == \
                ("swin", "shared", 2.5e-7, 2.5e-7), name


# ------------------------------------------------------------------------------------------ 3, 4: checkpoints
def pss_deit(seed=0, **kwargs):
    torch.manual_seed(seed)
    cfg = load_config(DEMO, ["--model", "pss_deit_small_patch16_224", "--model_kwargs", TINY_VIT,
                             "--input_size", "16", "--methods", "[]"])
    return create_model(cfg, 10, MethodSet([]), **kwargs)


def published_pss_checkpoint(model):
    """What the published DeiT PSS main.py saves: every block's ``relative_position_index`` (the authors' model
    keeps it in its state dict), the argparse Namespace, DDP's ``module.`` prefix absent (model_without_ddp)."""
    state = dict(model.state_dict())
    for i, block in enumerate(model.blocks):
        state[f"blocks.{i}.attn.relative_position_index"] = block.attn.relative_position_index.clone()
    return {"model": state, "optimizer": {}, "epoch": 299, "args": argparse.Namespace(model="pss_deit_small")}


def test_published_pss_checkpoint_evaluates_and_fine_tunes_from_the_command_line(digits, tmp_path):
    model = pss_deit(seed=1)
    path = tmp_path / "published.pth"
    torch.save(published_pss_checkpoint(model), path)
    common = ["--config", DEMO, "--data_path", digits, "--model", "pss_deit_small_patch16_224", "--model_kwargs",
              TINY_VIT, "--input_size", "16", "--num_workers", "0", "--tensorboard", "false", "--methods", "[pss]",
              "--pss.cooldown_epochs", "0"]
    assert entry.main([*common, "--output_dir", str(tmp_path / "eval"), "--eval", "true", "--finetune", str(path)]) == 0
    assert entry.main([*common, "--output_dir", str(tmp_path / "ft"), "--finetune", str(path), "--epochs", "1",
                       "--warmup_epochs", "0", "--batch_size", "256"]) == 0
    sweep = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sweep.py"), "--config", DEMO,
                            "--checkpoint", str(path), "--values", "1.0,0.6", "--out", str(tmp_path / "sweep"),
                            "--data_path", digits, "--model", "pss_deit_small_patch16_224", "--model_kwargs", TINY_VIT,
                            "--input_size", "16", "--num_workers", "0", "--methods", "[pss]"],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert sweep.returncode == 0, sweep.stderr
    assert (tmp_path / "sweep" / "sweep.json").exists()


def simmim_pretraining_checkpoint(tmp_path, depth=2, dim=32, heads=2, grid=4):
    """A file in the layout the published SimMIM pre-training saves: the ViT under ``encoder.`` with one shared
    bias table (USE_SHARED_RPB) and its index, a ``mask_token``, the final ``norm``, a ``decoder.``, and the config
    as a pickled yacs ``CfgNode`` (a class this repository cannot import)."""
    gen = torch.Generator().manual_seed(5)
    rnd = lambda *s: torch.randn(*s, generator=gen)                 # noqa: E731
    table_rows = (2 * grid - 1) ** 2 + 3
    enc = {"cls_token": rnd(1, 1, dim), "mask_token": rnd(1, 1, dim), "patch_embed.proj.weight": rnd(dim, 3, 4, 4),
           "patch_embed.proj.bias": rnd(dim), "rel_pos_bias.relative_position_bias_table": rnd(table_rows, heads),
           "rel_pos_bias.relative_position_index": torch.randint(0, table_rows, (grid * grid + 1,) * 2, generator=gen),
           "norm.weight": rnd(dim), "norm.bias": rnd(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        enc.update({b + "gamma_1": rnd(dim), b + "gamma_2": rnd(dim), b + "norm1.weight": rnd(dim),
                    b + "norm1.bias": rnd(dim), b + "attn.qkv.weight": rnd(3 * dim, dim), b + "attn.q_bias": rnd(dim),
                    b + "attn.v_bias": rnd(dim), b + "attn.proj.weight": rnd(dim, dim), b + "attn.proj.bias": rnd(dim),
                    b + "norm2.weight": rnd(dim), b + "norm2.bias": rnd(dim), b + "mlp.fc1.weight": rnd(4 * dim, dim),
                    b + "mlp.fc1.bias": rnd(4 * dim), b + "mlp.fc2.weight": rnd(dim, 4 * dim), b + "mlp.fc2.bias": rnd(dim)})
    state = {"encoder." + k: v for k, v in enc.items()}
    state.update({"decoder.0.weight": rnd(48, dim, 1, 1), "decoder.0.bias": rnd(48)})
    pkg = tmp_path / "pkg" / "yacs"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("class CfgNode(dict):\n    def __init__(self, d=None):\n"
                                   "        super().__init__(d or {})\n        self.__dict__['__immutable__'] = True\n")
    path = tmp_path / "simmim_pretrain.pth"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path / 'pkg')!r})
        from yacs.config import CfgNode
        state = torch.load({str(tmp_path / 'state.pt')!r})
        cfg = CfgNode({{"MODEL": CfgNode({{"TYPE": "vit", "VIT": CfgNode({{"USE_SHARED_RPB": True}})}})}})
        torch.save({{"model": state, "config": cfg, "epoch": 799, "max_accuracy": 0.0}}, {str(path)!r})
    """)
    torch.save(state, tmp_path / "state.pt")
    subprocess.run([sys.executable, "-c", script], check=True)
    return path, enc


def published_simmim_load(model, enc):
    """``load_pretrained`` + ``remap_pretrained_keys_vit`` of the published fine-tuning, step by step."""
    ckpt = dict(enc)
    shared = ckpt.pop("rel_pos_bias.relative_position_bias_table")
    for i in range(len(model.blocks)):
        ckpt[f"blocks.{i}.attn.relative_position_bias_table"] = shared.clone()
    ckpt = {k: v for k, v in ckpt.items() if "relative_position_index" not in k}
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in ckpt.items() if k in own}, strict=False)      # strict=False there
    return model


def test_simmim_pretraining_checkpoint_is_converted_as_published(digits, tmp_path, capsys):
    import checkpoint as ckpt_io
    path, enc = simmim_pretraining_checkpoint(tmp_path)
    cfg = tiny("vit_b_simmim_ft.yaml", "--finetune", str(path))
    ckpt = ckpt_io.load_checkpoint(str(path), "finetune")                      # weights_only; the CfgNode as data
    assert "yacs.config.CfgNode" in capsys.readouterr().out
    assert ckpt["config"]["MODEL"]["VIT"]["USE_SHARED_RPB"] is True
    torch.manual_seed(0)
    ours = create_model(cfg, 10, MethodSet([]))
    report = ckpt_io.adapt_for_finetune(ours, ckpt_io.model_state(ckpt), "finetune")
    assert report["dropped"] == []
    torch.manual_seed(0)
    published = published_simmim_load(create_model(cfg, 10, MethodSet([])), enc)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), published.eval()(x), atol=1e-5, rtol=0)
    for i in range(2):
        assert torch.equal(ours.blocks[i].attn.relative_position_bias_table,
                           enc["rel_pos_bias.relative_position_bias_table"])
    # and from the command line: fine-tune one epoch from it (a tiny ViT-B of the SimMIM layout)
    args = ["--config", os.path.join(CONFIGS, "vit_b_simmim_ft.yaml"), "--data_set", "digits", "--data_path", digits,
            "--model_kwargs", TINY_VIT, "--input_size", "16", "--num_workers", "0", "--tensorboard", "false",
            "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "256", "--finetune", str(path),
            "--output_dir", str(tmp_path / "ft"), "--aa", "null", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
            "--reproduces", "null", "--amp", "none"]
    assert entry.main(args) == 0


# ------------------------------------------------------------------------------------------ 5: ties
def published_magnitude_keep(x, drop_ratio):
    """``get_magnitude_patches`` of the published code: the kept patch positions (1-based, CLS = 0 excluded)."""
    n = x.shape[1]
    keep_point = int(round((1 - drop_ratio) * n)) - 1
    sample_mat = x[:, 1:].abs().sum(dim=2)
    sample_mat = sample_mat / torch.sum(sample_mat, dim=1, keepdim=True)
    return (sample_mat.argsort(dim=1, descending=True) + 1)[:, :keep_point]


def test_magnitude_sampling_keeps_the_published_positions_on_ties():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1 + 196, 24, generator=gen)
    border = torch.randn(24, generator=gen)
    for b in range(64):                                   # flat borders: many identical patch tokens per image
        rows = torch.arange(196).view(14, 14)
        edge = torch.cat([rows[:1 + b % 3].flatten(), rows[-2:].flatten(), rows[:, :2].flatten()])
        x[b, 1 + edge] = border
    for d in (0.2, 0.4, 0.6, 0.8):
        k = num_kept_patches(196, d)
        want = published_magnitude_keep(x, d) - 1
        got = select_patches(x, k, "magnitude")
        assert torch.equal(got, want), d
    # the case matters: a top-k of the same scores keeps other positions on these ties
    k = num_kept_patches(196, 0.6)
    scores = x[:, 1:].abs().sum(-1)
    topk = scores.topk(k, dim=1).indices
    assert not torch.equal(topk.sort(1).values, (published_magnitude_keep(x, 0.6) - 1).sort(1).values)


# ------------------------------------------------------------------------------------------ 6: keep counts near 0
def test_the_operator_keeps_the_class_token_alone_when_the_published_count_is_zero():
    assert num_kept_patches(16, 0.95) == 0
    cfg = load_config(DEMO, [*TINY_MODEL, "--methods", "[]"])
    model = create_model(cfg, 10, MethodSet([]))
    sampler = apply_sampler(model, "magnitude")
    sampler.set_drop_ratio(0.95)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    model.train()
    out = model(torch.randn(2, 3, 16, 16))
    assert seen == [1] and torch.isfinite(out).all()                 # the class token alone, as published
    assert isinstance(sampler, PatchSampler) and sampler.kept_index.tolist() == [[0], [0]]


def test_a_schedule_that_reaches_zero_patches_is_refused_before_anything_is_written(digits, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config", DEMO, "--data_path", digits,
                           "--output_dir", str(out), "--model_kwargs", "{patch_size: 8, embed_dim: 32, depth: 2, "
                           "num_heads: 2}", "--input_size", "16", "--methods", "[pss]", "--num_workers", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "pss.start_drop_ratio" in lines[0] and "4" in lines[0]
    assert not out.exists()


def test_a_pickled_call_beside_fine_tensors_is_still_refused_and_never_run(tmp_path):
    import checkpoint as ckpt_io
    marker = tmp_path / "ran"
    path = tmp_path / "call.pth"
    script = (f"import os, torch\nclass Call:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n"
              f"torch.save({{'model': {{'w': torch.ones(2)}}, 'config': Call()}}, {str(path)!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True)
    with pytest.raises(ckpt_io.CheckpointError, match="would run pickled code"):
        ckpt_io.load_checkpoint(str(path), "finetune")
    assert not marker.exists()
