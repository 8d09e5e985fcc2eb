"""Config files, overrides and the one-line errors for mistakes."""
import glob
import os

import pytest

from config import ConfigError, load_config, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.model


def test_toe_recipe_inherits_the_baseline_and_adds_only_toe():
    base = load_config(os.path.join(ROOT, "configs", "deit_s.yaml"))
    toe = load_config(os.path.join(ROOT, "configs", "deit_s_toe.yaml"))
    assert base.toe is None
    assert toe.toe.expansion_steps == [0, 100, 200] and toe.toe.keep_rates == [0.5, 0.75, 1.0]
    assert toe.toe.init_keep_rate == 0.25 and toe.toe.repeat_k == 2 and toe.toe.distance == "cosine"
    a, b = base.to_dict(), toe.to_dict()
    assert "toe" not in a and b.pop("toe")["keep_rates"] == [0.5, 0.75, 1.0]
    # the ToE script's launch (4 x 256 = the same global batch 1024, seed 3407) and the row it reproduces
    assert (a["nproc"] * a["batch_size"], b["nproc"] * b["batch_size"], b["seed"]) == (1024, 1024, 3407)
    for key in ("output_dir", "reproduces", "nproc", "batch_size", "seed"):
        a.pop(key), b.pop(key)
    assert a == b


def test_command_line_overrides_yaml(tmp_path):
    p = write(tmp_path, "c.yaml", "lr: 1.0e-3\nepochs: 10\ntoe:\n  expansion_steps: [0, 3, 6]\n")
    cfg = load_config(p, ["--lr", "2e-3", "--toe.keep_rates", "[0.4, 0.7, 1.0]", "--drop-path=0.2"])
    assert cfg.lr == 2e-3 and cfg.epochs == 10 and cfg.drop_path == 0.2
    assert cfg.toe.keep_rates == [0.4, 0.7, 1.0] and cfg.toe.expansion_steps == [0, 3, 6]
    assert load_config(p, ["--toe", "none"]).toe is None


@pytest.mark.parametrize("text,overrides,needle", [
    ("lrr: 0.1\n", [], "did you mean 'lr'"),
    ("toe:\n  keep_rate: [0.5, 0.75, 1.0]\n", [], "did you mean 'toe.keep_rates'"),
    ("epochs: ten\n", [], "epochs: expected int"),
    ("", ["--batch_size", "1.5"], "batch_size: expected int"),
    ("toe:\n  keep_rates: [0.75, 0.5, 1.0]\n", [], "toe.keep_rates"),
    ("toe:\n  keep_rates: [0.5, 0.75, 1.2]\n", [], "(0, 1]"),
    ("toe:\n  init_keep_rate: 0.6\n", [], "toe.init_keep_rate"),
    ("toe:\n  expansion_steps: [0, 200, 100]\n", [], "toe.expansion_steps"),
    ("toe:\n  expansion_steps: [0, 100]\n", [], "one keep rate per stage"),
    ("epochs: 50\ntoe: {}\n", [], "scale the steps"),
    ("opt: adamww\n", [], "opt: 'adamww' is not one of"),
    ("lr: -1\n", [], "lr: -1.0 must be >= 0"),
    ("distillation_type: hard\n", [], "teacher_path"),
    ("", ["--lr"], "has no value"),
])
def test_mistakes_give_one_line_naming_the_key(tmp_path, text, overrides, needle):
    p = write(tmp_path, "c.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(p, overrides)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_resolved_config_round_trips(tmp_path):
    p = write(tmp_path, "c.yaml", "model: deit_tiny_patch16_224\nmodel_kwargs: {depth: 2}\ntoe: {}\n")
    cfg = load_config(p, ["--seed", "7"])
    out = str(tmp_path / "resolved.yaml")
    save_config(cfg, out)
    assert load_config(out) == cfg


def test_base_cycle_and_missing_file(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))


# ------------------------------------------------------------------------------------------------ published recipes
# The configs of README's recipe table, with the recipe each one names; a config that drifts from it fails here.
# ``world``: the processes the recipe assumes (README: 8 x 128 = 1024 for ImageNet), so ``global_batch`` is
# batch_size x world x grad_accum_steps and ``lr`` the learning rate after the linear scaling rule at that batch.
# PSS / Tri-Level configs: add theirs here when they join the table.
DEIT = dict(epochs=300, global_batch=1024, lr=1e-3, opt="adamw", weight_decay=0.05, sched="cosine", warmup_epochs=5,
            warmup_lr=1e-6, min_lr=1e-5, smoothing=0.1, drop_path=0.1, aa="rand-m9-mstd0.5-inc1", mixup=0.8,
            cutmix=1.0, reprob=0.25, repeated_aug=True, ra_repeats=3, model_ema=True, model_ema_decay=0.99996,
            input_size=224, data_set="imagenet")          # DeiT (Touvron et al. 2021), Table 9 and main.py defaults
TOE_DEIT = dict(expansion_steps=[0, 100, 200], keep_rates=[0.5, 0.75, 1.0], init_keep_rate=0.25, repeat_k=2,
                distance="cosine", insert_block=1, sparse_eval=False)       # Osilly/TokenExpansion, DeiT-S script
LVVIT = dict(epochs=300, global_batch=1024, lr=1.6e-3, opt="adamw", weight_decay=0.05, sched="cosine",
             warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, smoothing=0.1, mixup=0.0, cutmix=0.0, repeated_aug=False,
             model_ema_decay=0.99992, input_size=224, data_set="imagenet")     # TokenLabeling (Jiang et al. 2021)
TOE_LVVIT = dict(expansion_steps=[0, 100, 200], keep_rates=[0.4, 0.7, 1.0], init_keep_rate=0.2, repeat_k=2,
                 distance="cosine", insert_block=1, sparse_eval=False)     # Osilly/TokenExpansion, LV-ViT-S script
CIFAR = dict(model="deit_small_patch16_224", epochs=1000, global_batch=768, opt="adamw", weight_decay=0.05,
             sched="cosine", warmup_epochs=5, drop_path=0.1, mixup=0.8, cutmix=1.0, aa="rand-m9-mstd0.5-inc1",
             input_size=224)                              # DeiT's transfer recipe (facebookresearch/dino#81, #144)
# issue 10 B: DeiT's loop and sampler rules, fp16 with a loss scaler; LV-ViT: 300 + 10 cooldown epochs, best on
# the EMA, seed 42, the published crop box and RandAugment; the ToE scripts: 4 x 256 and (DeiT) seed 3407.
DEIT.update(amp="fp16", sched_step="published", repeated_aug_single="published", cooldown_epochs=0)
LVVIT.update(amp="fp16", sched_step="timm", cooldown_epochs=10, best_on="ema", seed=42)
TOE_SCRIPT = dict(seed=3407)
RECIPES = {
    "deit_t.yaml": (8, dict(model="deit_tiny_patch16_224", seed=0, **DEIT), None),
    "deit_s.yaml": (8, dict(model="deit_small_patch16_224", seed=0, **DEIT), None),
    "deit_b.yaml": (8, dict(model="deit_base_patch16_224", seed=0, **DEIT), None),
    "deit_t_toe.yaml": (4, dict(model="deit_tiny_patch16_224", **TOE_SCRIPT, **DEIT), TOE_DEIT),
    "deit_s_toe.yaml": (4, dict(model="deit_small_patch16_224", **TOE_SCRIPT, **DEIT), TOE_DEIT),
    "deit_b_toe.yaml": (4, dict(model="deit_base_patch16_224", **TOE_SCRIPT, **DEIT), TOE_DEIT),
    "lvvit_t.yaml": (8, dict(model="lvvit_t", drop_path=0.1, **LVVIT), None),
    "lvvit_s.yaml": (8, dict(model="lvvit_s", drop_path=0.1, **LVVIT), None),
    "lvvit_m.yaml": (8, dict(model="lvvit_m", drop_path=0.2, **LVVIT), None),
    "lvvit_t_toe.yaml": (4, dict(model="lvvit_t", drop_path=0.1, **LVVIT), TOE_LVVIT),
    "lvvit_s_toe.yaml": (4, dict(model="lvvit_s", drop_path=0.1, **LVVIT), TOE_LVVIT),
    "lvvit_m_toe.yaml": (4, dict(model="lvvit_m", drop_path=0.2, **LVVIT), TOE_LVVIT),
    "cifar10_finetune.yaml": (8, dict(data_set="cifar10", lr=7.5e-6, **CIFAR), None),
    "cifar100_finetune.yaml": (8, dict(data_set="cifar100", lr=5e-6, **CIFAR), None),
    # the demo: DeiT-Ti's recipe shape on the digits, one process, with the authors' LV-ViT ToE schedule in thirds
    "demo.yaml": (1, dict(epochs=45, global_batch=64, lr=1e-3, sched="cosine", warmup_epochs=5, min_lr=1e-5,
                          weight_decay=0.05, input_size=24, data_set="digits", mixup=0.0, cutmix=0.0),
                  dict(TOE_LVVIT, expansion_steps=[0, 15, 30])),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_table_config_matches_the_published_recipe(name):
    from main import scaled_lr
    world, recipe, toe = RECIPES[name]
    cfg = load_config(os.path.join(ROOT, "configs", name))
    resolved = {k: getattr(cfg, k) for k in recipe if k not in ("global_batch", "lr")}
    resolved["global_batch"] = cfg.batch_size * world * cfg.grad_accum_steps
    resolved["lr"] = scaled_lr(cfg, world)
    assert resolved == pytest.approx(recipe), name
    if name != "demo.yaml":
        assert cfg.nproc == world, name            # the recipe's process count is in the config (issue 10 B)
    assert cfg.active_methods() == (["toe"] if toe else [])
    if toe:
        assert {k: getattr(cfg.toe, k) for k in toe} == toe
    if name.startswith("lvvit"):
        assert cfg.token_label is not None and cfg.token_label.size == 14
        assert (cfg.token_label.box_order, cfg.token_label.rand_augment) == ("published", "published")
    if name.startswith("cifar"):
        assert cfg.finetune


# ------------------------------------------------------------------------------------------------ conventions
def test_help_lists_every_key_with_type_default_and_description(capsys):
    import main
    from config_help import key_rows
    with pytest.raises(SystemExit) as done:
        main.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    rows = key_rows()
    keys = {r[1] for r in rows}
    assert {"lr", "model_kwargs", "skip_bad_images", "resume_optimizer", "token_label.size", "toe.keep_rates"} <= keys
    assert "--overwrite" in out and "--config FILE" in out and "Exit codes" in out
    for group, key, tp, default, text in rows:
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [key])
        assert tp in line and default[:10] in line, key
        if "." not in key or key.startswith("token_label."):
            assert text and text in line, f"{key} has no description"      # Config's own keys are all described
    lr = next(r for r in rows if r[1] == "lr")
    assert lr[2:] == ("float", "0.0005", "for a global batch of lr_base_batch")


def test_boolean_keys_work_as_bare_flags():
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"),
                      ["--eval", "--resume", "x.pth", "--no-model_ema", "--no-tensorboard", "--toe.sparse_eval"])
    assert cfg.eval is True and cfg.model_ema is False and cfg.tensorboard is False and cfg.toe.sparse_eval is True
    cfg = load_config(None, ["--no-model-ema", "--eval=false", "--pin_memory"])
    assert cfg.model_ema is False and cfg.eval is False and cfg.pin_memory is True
    with pytest.raises(ConfigError, match="has no value"):
        load_config(None, ["--lr"])


def test_model_kwargs_merge_key_by_key(tmp_path):
    demo = os.path.join(ROOT, "configs", "demo.yaml")
    assert load_config(demo, ["--model_kwargs", "{depth: 2}"]).model_kwargs == dict(
        patch_size=4, embed_dim=96, depth=2, num_heads=4)
    assert load_config(demo, ["--model_kwargs.depth", "3"]).model_kwargs["depth"] == 3
    write(tmp_path, "base.yaml", "model_kwargs: {patch_size: 4, depth: 12}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nmodel_kwargs: {depth: 2}\n")
    assert load_config(child).model_kwargs == {"patch_size": 4, "depth": 2}


@pytest.mark.parametrize("overrides,needle", [
    (["--lr", "nan"], "lr: 'nan' is not a finite number"),
    (["--lr", ".inf"], "lr: inf is not a finite number"),
    (["--toe.init_keep_rate", "nan"], "toe.init_keep_rate: 'nan' is not a finite number"),
    (["--opt_betas", "[0.9]"], "opt_betas: [0.9] must be two values in [0, 1)"),
    (["--momentum", "-1"], "momentum: -1.0 must be in [0, 1)"),
    (["--smoothing", "1.5"], "smoothing: 1.5 must be in [0, 1)"),
    (["--drop_path", "2"], "drop_path: 2.0 must be in [0, 1)"),
    (["--hflip", "1.5"], "hflip: 1.5 must be in [0, 1] (a probability)"),
    (["--aa", "bogus"], "aa: 'bogus' is not a timm auto-augment policy"),
    (["--model", "deit_smal_patch16_224"], "model: unknown timm model 'deit_smal_patch16_224'; did you mean "
                                           "deit_small_patch16_224"),
    (["--model_kwargs", "{patch_size:4,embed_dim:96}"], "model_kwargs: 'patch_size:4' has no value; YAML needs a space "
                                                        "after the colon: {patch_size: 4}"),
    (["--model_kwargs", "{patch_size: 4"], "--model_kwargs: '{patch_size: 4' is not valid YAML"),
])
def test_more_mistakes_give_one_line(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(os.path.join(ROOT, "configs", "demo.yaml"), overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    p = write(tmp_path, "c.yaml", "lr: 1.0e-3\nepochs: [3\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3:5 \(line 3, column 5\): YAML syntax error"):
        load_config(p)


def test_aa_none_means_off():
    assert load_config(None, ["--aa", "none"]).aa is None
