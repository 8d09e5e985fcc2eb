"""Issue 10, part B: the keys that make a config a published recipe (``reproduces``, ``nproc``, ``sched_step``,
``repeated_aug_single``, ``cooldown_epochs``, the token-label options) and the compute-only training time."""
import glob
import importlib.util
import json
import os

import pytest
import torch

import main as entry
from config import ConfigError, load_config
from methods import published_rows
from tests.runs import CONFIGS, DEMO, ROOT, TINY


def _tables():
    spec = importlib.util.spec_from_file_location("tables_for_recipes", os.path.join(ROOT, "scripts", "tables.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------ reproduces
def test_reproduces_names_an_existing_row():
    cfg = load_config(DEMO, ["--reproduces", "{paper: toe, row: DeiT-S ToE}"])
    assert cfg.reproduces == {"paper": "toe", "row": "DeiT-S ToE"}
    assert load_config(DEMO).reproduces is None


@pytest.mark.parametrize("value,needle", [
    ("{paper: toe, row: DeiT-S Toe}", "close rows: 'DeiT-S ToE'"),
    ("{paper: tokens, row: DeiT-S ToE}", "reproduces.paper: unknown paper 'tokens' (known:"),
    ("{paper: toe}", "reproduces: "),
    ("{paper: toe, row: DeiT-S ToE, epochs: 3}", "reproduces: "),
    ("toe", "reproduces: expected a mapping"),
])
def test_reproduces_mistakes_are_one_line(value, needle):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["--reproduces", value])
    assert needle in str(err.value) and "\n" not in str(err.value)


TABLE_CONFIGS = sorted(p for p in glob.glob(os.path.join(CONFIGS, "*.yaml")) + glob.glob(os.path.join(CONFIGS, "ablations", "*.yaml"))
                       if "trilevel" not in p)


@pytest.mark.parametrize("path", TABLE_CONFIGS, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_a_config_that_names_a_row_is_a_run_of_it(path):
    """The named row exists, and where the row says which runs match it (model, methods, settings), this config is
    one of them: the key cannot name a row the recipe does not run."""
    cfg = load_config(path)
    if cfg.reproduces is None:
        return
    tables = _tables()
    for named in (cfg.reproduces if isinstance(cfg.reproduces, list) else [cfg.reproduces]):
        row = next(r for r in published_rows() if (r.paper, r.row) == (named["paper"], named["row"]))
        if row.methods is not None:
            assert tables.matches(cfg, row), (path, row.row)


def test_every_table_config_names_its_row():
    named = {os.path.relpath(p, CONFIGS) for p in TABLE_CONFIGS if load_config(p).reproduces}
    expected = {"deit_t_toe.yaml", "deit_s_toe.yaml", "deit_b_toe.yaml", "lvvit_t.yaml", "lvvit_s.yaml",
                "lvvit_m.yaml", "lvvit_t_toe.yaml", "lvvit_s_toe.yaml", "lvvit_m_toe.yaml", "deit_s_pss.yaml",
                "deit_s_384_pss.yaml", "deit_s_pss_baseline.yaml", "vit_b_simmim_ft.yaml", "deit_t.yaml", "deit_s.yaml",
                "deit_b.yaml", "deit_t_et.yaml", "deit_s_et.yaml", "deit_t_et_toe.yaml", "deit_s_et_toe.yaml"}
    assert expected <= named
    assert {n for n in named if n.startswith("vit_b_simmim_ft_pss_")} == {
        os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "vit_b_simmim_ft_pss_*.yaml"))}
    ablations = {os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "ablations", "*.yaml"))}
    assert {a for a in ablations if "nearest" not in a} <= named          # the corrected rule has no published row
    for path in glob.glob(os.path.join(CONFIGS, "ablations", "*.yaml")):
        with open(path) as f:
            assert "Part B" not in f.read(), path


# ------------------------------------------------------------------------------------------------ the lr clock
def test_sched_step_published_trains_epoch_e_with_lr_of_e_minus_1():
    cfg = load_config(DEMO, ["--sched_step", "published"])
    assert [entry.lr_epoch(cfg, e) for e in range(4)] == [0, 0, 1, 2]
    cfg = load_config(DEMO)
    assert cfg.sched_step == "timm" and [entry.lr_epoch(cfg, e) for e in range(4)] == [0, 1, 2, 3]


def test_nproc_note_says_how_batch_and_lr_differ():
    cfg = load_config(os.path.join(CONFIGS, "deit_s_toe.yaml"))
    assert entry.nproc_note(cfg, 4) is None
    note = entry.nproc_note(cfg, 1)
    assert "expects 4 process(es), this run has 1" in note and "global batch 256 instead of 1024" in note
    assert "\n" not in note
    assert entry.nproc_note(load_config(DEMO), 3) is None                  # no nproc: nothing to say
    with pytest.raises(ConfigError, match="nproc: 0 must be > 0"):
        load_config(DEMO, ["--nproc", "0"])


def test_repeated_aug_single_published_samples_plainly_on_one_process(digits):
    from datasets import RASampler, ShuffleSampler, build_loaders
    over = ["--data_path", digits, "--num_workers", "0", "--input_size", "16", "--batch_size", "32",
            "--repeated_aug", "true"]
    loader, _, _ = build_loaders(load_config(DEMO, over), 0, 1, 0)
    assert isinstance(loader.sampler, RASampler)                           # ours: repeats on one process too
    loader, _, _ = build_loaders(load_config(DEMO, over + ["--repeated_aug_single", "published"]), 0, 1, 0)
    assert isinstance(loader.sampler, ShuffleSampler)
    loader, _, _ = build_loaders(load_config(DEMO, over + ["--repeated_aug_single", "published"]), 0, 2, 0)
    assert isinstance(loader.sampler, RASampler)                           # distributed: the published rule repeats


def test_token_label_options_reach_the_criterion():
    cfg = load_config(os.path.join(CONFIGS, "lvvit_t.yaml"))
    assert (cfg.token_label.box_order, cfg.token_label.rand_augment) == ("published", "published")
    assert cfg.token_label.smoothing_form == "published"
    criterion, _ = entry.build_criterion(cfg, 1000, torch.device("cpu"))
    assert (criterion.box_order, criterion.smoothing_form) == ("published", "published")
    with pytest.raises(ConfigError, match="token_label.rand_augment: 'geometric' is not one of"):
        load_config(os.path.join(CONFIGS, "lvvit_t.yaml"), ["--token_label.rand_augment", "geometric"])
    with pytest.raises(ConfigError, match="token_label.smoothing_form: 'sum' is not one of"):
        load_config(os.path.join(CONFIGS, "lvvit_t.yaml"), ["--token_label.smoothing_form", "sum"])


def test_cooldown_sched_step_compute_time_and_nproc_end_to_end(digits, tmp_path, capsys):
    """2 epochs + 1 of cooldown with DeiT's lr clock: 3 epochs trained, lr(0), lr(0), lr(1); the compute-only time
    per epoch in log.jsonl and in total in summary.json; one line about the process count."""
    from timm.scheduler import create_scheduler_v2
    out = tmp_path / "run"
    code = entry.main(["--config", DEMO, "--data_path", digits, "--output_dir", str(out), *TINY,
                       "--cooldown_epochs", "1", "--sched_step", "published", "--nproc", "2", "--amp", "none"])
    assert code == 0
    text = capsys.readouterr().out
    assert sum("nproc: the recipe expects 2 process(es), this run has 1" in ln for ln in text.splitlines()) == 1
    with open(out / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    cfg = load_config(str(out / "config.yaml"))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=entry.scaled_lr(cfg, 1))
    sched, total = create_scheduler_v2(opt, sched=cfg.sched, num_epochs=cfg.epochs, min_lr=cfg.min_lr,
                                       warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, cooldown_epochs=1)
    assert total == 3
    lrs = []
    for e in (0, 0, 1):
        sched.step(e)
        lrs.append(opt.param_groups[0]["lr"])
    assert [r["train_lr"] for r in log] == pytest.approx(lrs)
    assert log[0]["train_lr"] == pytest.approx(cfg.warmup_lr)
    for r in log:
        assert 0 < r["train_compute_seconds"] <= r["train_epoch_seconds"]
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["train_compute_seconds"] == pytest.approx(sum(r["train_compute_seconds"] for r in log))
    assert 0 < summary["train_compute_seconds"] <= summary["train_seconds"] <= summary["wall_seconds"]


# ------------------------------------------------------------------------------------------------ published checkpoints
def _published_checkpoints(tmp_path):
    """A tiny demo model saved in the two published layouts, each with its pickled argparse.Namespace."""
    import argparse
    from methods import MethodSet
    cfg = load_config(DEMO, TINY)
    model = entry.build_model(cfg, 10, MethodSet.from_config(cfg))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    args = argparse.Namespace(model="deit_tiny_patch16_224", lr=5e-4, epochs=300, input_size=224)
    deit = {"model": state, "model_ema": state, "optimizer": {}, "lr_scheduler": {}, "epoch": 299, "scaler": {},
            "args": args}                                              # DeiT / ToE / PSS main.py
    timm_saver = {"epoch": 309, "arch": "lvvit_s", "state_dict": state, "state_dict_ema": state, "optimizer": {},
                  "version": 2, "args": args, "metric": 83.3}          # timm's CheckpointSaver (TokenLabeling)
    paths = {}
    for name, ckpt in (("deit", deit), ("timm", timm_saver)):
        paths[name] = str(tmp_path / f"{name}.pth")
        torch.save(ckpt, paths[name])
    return paths, state


def test_published_checkpoint_layouts_load_with_exactly_namespace_allowed(tmp_path):
    import argparse
    import fractions
    import checkpoint as ckpt_io
    paths, state = _published_checkpoints(tmp_path)
    with pytest.raises(Exception):                                     # plain weights_only refuses them
        torch.load(paths["deit"], map_location="cpu", weights_only=True)
    for name, path in paths.items():
        ckpt = ckpt_io.load_checkpoint(path, "finetune")
        assert ckpt["args"]["lr"] == 5e-4                              # plain data once loaded
        assert set(ckpt_io.model_state(ckpt)) == set(state) and set(ckpt_io.ema_state(ckpt)) == set(state)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()     # allowed for the load only
    torch.save({"model": state, "args": argparse.Namespace(lr=fractions.Fraction(1, 2))}, tmp_path / "inner.pth")
    torch.save({"model": state, "args": argparse.ArgumentTypeError("x")}, tmp_path / "other.pth")
    for bad in ("inner.pth", "other.pth"):
        with pytest.raises(ckpt_io.CheckpointError, match="would run pickled code") as err:
            ckpt_io.load_checkpoint(str(tmp_path / bad), "finetune")
        assert "\n" not in str(err.value)


def test_published_checkpoints_finetune_and_eval_through_main(digits, tmp_path, capsys):
    paths, _ = _published_checkpoints(tmp_path)
    base = ["--config", DEMO, "--data_path", digits, *TINY, "--amp", "none"]
    assert entry.main(base + ["--output_dir", str(tmp_path / "ft"), "--finetune", paths["deit"], "--epochs", "1",
                              "--toe", "none"]) == 0
    assert "fine-tuning from" in capsys.readouterr().out
    assert entry.main(base + ["--output_dir", str(tmp_path / "ev"), "--finetune", paths["timm"], "--eval"]) == 0
    with open(tmp_path / "ev" / "eval.json") as f:
        assert json.load(f)["model"]["count"] > 0


# ------------------------------------------------------------------------------------------------ --plan, Hyper
def test_plan_prints_the_schedule_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as done:
        entry.main(["--config", os.path.join(CONFIGS, "deit_s_toe.yaml"), "--plan", "--output_dir", str(out),
                    "--data_path", str(tmp_path / "no_data")])
    assert done.value.code == 0 and not out.exists()
    text = capsys.readouterr().out
    assert "on 4 process(es)" in text and "256 x 4 x 1 = 1024" in text
    for span, tokens in (("0-4", "98/196"), ("5-99", "98/196"), ("100-199", "147/196"), ("200-299", "196/196")):
        assert any(ln.startswith(span + " ") and tokens in ln for ln in text.splitlines()), span
    assert "ideal speed-up 1.306x" in text and "images seen 384,350,100" in text
    assert "plan" not in load_config(os.path.join(CONFIGS, "deit_s_toe.yaml")).to_dict()


def test_plan_rows_follow_cooldown_nproc_and_method_states():
    from plan import plan
    cfg = load_config(os.path.join(CONFIGS, "lvvit_s_toe.yaml"), ["--nproc", "8"])
    rows, totals = plan(cfg)
    assert totals["epochs"] == 310 and totals["nproc"] == 8
    assert rows[-1]["first"] == 300 and rows[-1]["last"] == 309 and rows[-1]["state"]["phase"] == "cooldown"
    assert rows[-1]["lr"] == pytest.approx(cfg.min_lr)
    pss_rows, _ = plan(load_config(os.path.join(CONFIGS, "deit_s_pss.yaml")))
    assert [r["state"]["pss"] for r in pss_rows] == ["keep 0.2-1.0", "keep 0.2-1.0", "keep 1.0"]
    assert pss_rows[-1]["first"] == 290


def test_hyper_configs_load_with_unknown_min_lr_plan_it_and_refuse_to_train(capsys):
    from plan import format_plan, plan
    for name, row in (("deit_s_toe_hyper_04.yaml", "ToE^Hyper_0.4"), ("deit_s_toe_hyper_05.yaml", "ToE^Hyper_0.5")):
        path = os.path.join(CONFIGS, name)
        cfg = load_config(path)
        assert cfg.min_lr is None and cfg.toe.expansion_steps == [0, 130, 260]
        assert cfg.reproduces == {"paper": "toe", "row": row}
        with open(path) as f:
            assert "not recovered" in f.read()
        text = format_plan(cfg, *plan(cfg))
        assert "min_lr unknown (null)" in text and "unknown (min_lr: null)" in text
        assert entry.main(["--config", path]) == 2
        err = capsys.readouterr().err.strip()
        assert "min_lr: unknown (null)" in err and "\n" not in err
        assert load_config(path, ["--min_lr", "1e-6"]).min_lr == 1e-6
