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
    a.pop("output_dir"), b.pop("output_dir")
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
