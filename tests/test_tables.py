"""scripts/tables.py and the published rows: matching runs to rows, the arithmetic on hand-made run directories,
unknown cells, the --published listing, and that the generic script names no method."""
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest

import methods
from config import ConfigError, load_config, save_config
from methods import PublishedRow
from tests.runs import CONFIGS, DEMO, ROOT
from tests.runs import TOE_FOUR_EPOCHS as TINY

spec = importlib.util.spec_from_file_location("tables", os.path.join(ROOT, "scripts", "tables.py"))
tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)


def make_run(path, config, overrides, acc, ema=None, train_s=(1, 1, 1, 1), wall_s=None, compute_s=None, summary=None):
    """A finished run directory: the resolved config, one log line per epoch, and a summary."""
    os.makedirs(path)
    cfg = load_config(config, overrides)
    save_config(cfg, os.path.join(path, "config.yaml"))
    wall = wall_s or [sum(train_s[:e + 1]) * 1.5 for e in range(len(acc))]
    with open(os.path.join(path, "log.jsonl"), "w") as f:
        for e, a in enumerate(acc):
            rec = {"epoch": e, "val_acc1": a, "train_epoch_seconds": train_s[e], "wall_seconds": wall[e]}
            if ema is not None:
                rec["val_ema_acc1"] = ema[e]
            if compute_s is not None:
                rec["train_compute_seconds"] = compute_s[e]
            f.write(json.dumps(rec) + "\n")
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump(summary or {"final_acc1": acc[-1]}, f)
    return str(path)


def rows_by_name(cfg, rows=None):
    return [(r.paper, r.row) for r in tables.published_for(cfg, methods.published_rows() if rows is None else rows)]


# --------------------------------------------------------------------------------------------------- published rows
def test_published_rows_come_from_the_method_packages_through_the_registry():
    rows = methods.published_rows()
    keys = [(r.paper, r.row) for r in rows]
    assert len(keys) == len(set(keys)), "a (paper, row) pair is not unique"
    per_method = {name: methods.published_rows([name]) for name in methods.registry()}
    assert all(per_method[name] for name in ("toe", "pss", "trilevel"))
    assert sum(len(v) for v in per_method.values()) == len(rows)
    assert methods.published_rows(["pss"]) == per_method["pss"]
    for r in rows:
        assert isinstance(r, PublishedRow) and r.source and r.kind in ("table", "context", "claim")
        assert r.methods is None or all(m in methods.registry() for m in r.methods)
        for section, values in r.settings.items():          # every setting names a real key of its section
            fields = methods.method_class(section).Config.__dataclass_fields__
            assert set(values) <= set(fields), (r.row, set(values) - set(fields))
    # a method without published.py has none
    class Bare(methods.Method):
        name = "bare_for_published_test"
    methods.register_method(Bare)
    try:
        assert methods.published_rows([Bare.name]) == []
    finally:
        methods.unregister_method(Bare.name)


def test_published_cells_hold_exactly_what_was_recovered():
    rows = {(r.paper, r.row): r for r in methods.published_rows()}
    # ToE: no table cell was recovered, only the abstract's ~1.3x
    toe = [r for (p, _), r in rows.items() if p == "toe"]
    assert all(r.top1 is None and r.train_time is None and r.gflops is None for r in toe)
    assert [r.speedup for r in toe if r.speedup is not None] == [1.3]
    # PSS: README table with the logs' final / best, hours on 4 x A100, and the sweeps
    r = rows[("pss", "DeiT-S-224 + PSS")]
    assert (r.top1, r.top1_final, r.top1_best, r.train_time, r.gpus) == (80.4, 80.246, 80.376, 27.9, "4 x A100")
    assert r.sweep["top1"][0.2] == 66.858 and r.sweep["gflops"][1.0] == 4.608
    assert rows[("pss", "SimMIM ViT-B + PSS")].train_time == 16.99
    assert rows[("pss", "ViT-B + Fixed(0.6), magnitude")].sweep["top1"][0.3] is None
    # Tri-Level: the abstract (read) and the Fig. 1 read-offs with their precision
    t = rows[("trilevel", "DeiT-S Tri-Level")]
    assert (t.top1, t.train_time, t.time_unit) == (79.9, 84.3, "% of baseline") and "read" in t.precision
    f = rows[("trilevel", "Tri-level/0.7")]
    assert (f.top1, f.train_time) == (79.3, 65.7) and f.precision.startswith("[F]")
    assert rows[("trilevel", "DeiT-T Tri-Level")].top1 == 72.6
    # context figures are marked as such
    assert rows[("deit", "DeiT-S (released weights)")].kind == "context"


@pytest.mark.parametrize("config,expected", [
    ("deit_s.yaml", {("toe", "DeiT-S baseline"), ("pss", "DeiT-S-224"), ("trilevel", "DeiT-S (baseline)"),
                     ("deit", "DeiT-S (released weights)"), ("efficienttrain", "DeiT-S original paper"),
                     ("efficienttrain", "DeiT-S baseline"), ("toe", "DeiT-S baseline (Tab. 4)")}),
    ("deit_s_et.yaml", {("toe", "DeiT-S EfficientTrain (Tab. 4)"), ("efficienttrain", "DeiT-S EfficientTrain")}),
    ("deit_t_et_toe.yaml", {("toe", "DeiT-T EfficientTrain + ToE (Tab. 4)")}),
    ("deit_s_toe.yaml", {("toe", "DeiT-S ToE")}),
    ("lvvit_s_toe.yaml", {("toe", "LV-ViT-S ToE")}),
    ("deit_s_pss.yaml", {("pss", "DeiT-S-224 + PSS")}),
    ("deit_s_384_pss.yaml", {("pss", "DeiT-S-384 + PSS")}),
    ("vit_b_simmim_ft_pss_magnitude_fixed_40.yaml", {("pss", "ViT-B + Fixed(0.6), magnitude")}),
    ("vit_b_simmim_ft_pss_random_cyclic_80_0.yaml", {("pss", "ViT-B + Cyclic(0.2, 1.0), random")}),
    ("deit_s_trilevel.yaml", {("trilevel", "DeiT-S Tri-Level")}),
    ("deit_s_trilevel_keep07.yaml", {("trilevel", "Tri-level/0.7")}),
    ("deit_s_trilevel_token_only.yaml", {("trilevel", "DeiT-S token only")}),
    ("deit_t_trilevel.yaml", {("trilevel", "DeiT-T Tri-Level")}),
    ("ablations/deit_s_toe_expansion_none.yaml", {("toe", "pipeline: no expansion")}),
    ("ablations/deit_s_toe_random_drop.yaml", {("toe", "pipeline: random selection, no merging")}),
    ("ablations/deit_s_toe_keep040.yaml", {("toe", "speed-up factor: r1 = 0.4")}),
    ("ablations/deit_s_toe_distance_manhattan.yaml", {("toe", "distance: manhattan")}),
    ("ablations/deit_s_toe_distance_manhattan_nearest.yaml", set()),       # the corrected rule: no published row
    ("ablations/deit_s_toe_insert_block2.yaml", {("toe", "insertion: after block 2 (insert_block 2)")}),
])
def test_configs_match_their_published_rows(config, expected):
    assert set(rows_by_name(load_config(os.path.join(CONFIGS, config)))) == expected


def test_matching_needs_model_methods_and_every_setting():
    cfg = load_config(os.path.join(CONFIGS, "deit_s_toe.yaml"))
    assert rows_by_name(load_config(os.path.join(CONFIGS, "deit_s_toe.yaml"), ["--toe.repeat_k", "3"])) == []
    assert rows_by_name(load_config(os.path.join(CONFIGS, "deit_s_toe.yaml"), ["--model", "deit_base_patch16_224"])) \
        == [("toe", "DeiT-B ToE")]
    assert ("toe", "DeiT-S baseline") in rows_by_name(load_config(os.path.join(CONFIGS, "deit_s_toe.yaml"),
                                                                  ["--toe", "none"]))
    # the rows of an unknown model match only when no row of the run's own model does
    unknown = PublishedRow("x", "T", "any model", None, "ToE", methods=("toe",), settings={"toe": {"repeat_k": 2}})
    own = PublishedRow("x", "T", "own", "deit_small_patch16_224", "ToE", methods=("toe",))
    assert rows_by_name(cfg, [unknown]) == [("x", "any model")]
    assert rows_by_name(cfg, [unknown, own]) == [("x", "own")]


def test_reproduces_key_names_the_row(tmp_path):
    cfg = load_config(os.path.join(CONFIGS, "deit_s.yaml"))
    cfg.reproduces = {"paper": "toe", "row": "DeiT-S baseline"}       # config.py validates the key (issue 10 B)
    names = rows_by_name(cfg)
    assert names[0] == ("toe", "DeiT-S baseline") and ("pss", "DeiT-S-224") not in names
    assert ("deit", "DeiT-S (released weights)") in names                 # context figures stay beside it

    class Reproduces:                                                    # a dataclass section works too
        paper, row = "trilevel", "DeiT-S (baseline)"
    cfg.reproduces = Reproduces()
    assert rows_by_name(cfg)[0] == ("trilevel", "DeiT-S (baseline)")
    cfg.reproduces = {"paper": "toe", "row": "no such row"}
    with pytest.raises(ValueError, match="no published row 'no such row'"):
        tables.published_for(cfg, methods.published_rows())
    cfg.reproduces = {"paper": "toe", "row": "DeiT-S Toe"}             # the config's own check, hint included
    with pytest.raises(ConfigError, match="^reproduces.row: paper 'toe' has no published row 'DeiT-S Toe'; close rows: "
                                          "'DeiT-S ToE'"):
        tables.published_for(cfg, methods.published_rows())


# --------------------------------------------------------------------------------------------------- runs
def test_table_from_hand_made_runs(tmp_path, capsys):
    plain = make_run(tmp_path / "plain", DEMO, TINY + ["--methods", "[]"], [20, 55, 75, 78], [8, 40, 70, 77],
                     train_s=[2, 2, 2, 2], wall_s=[3, 6, 3, 6])              # resumed after epoch 2: wall adds to 12
    toe = make_run(tmp_path / "toe", DEMO, TINY + ["--methods", "[toe]"], [10, 50, 70, 80], [5, 30, 60, 79],
                   train_s=[1, 1, 2, 2], wall_s=[1.5, 3, 5.5, 8])
    rows = [PublishedRow("paper", "Tab. 9", "tiny ToE", "vit_tiny_patch16_224", "ToE", methods=("toe",),
                         settings={"toe": {"keep_rates": [0.5, 1.0]}}, top1=81.5, source="somewhere",
                         precision="read"),
            PublishedRow("paper", "Tab. 9", "tiny ToE, other run", None, "ToE", methods=("toe",),
                         settings={"toe": {"keep_rates": [0.5, 1.0]}}, source="elsewhere")]
    records = tables.build_table([plain, toe], flops=False, rows=rows)
    assert [(r["cells"]["run"], r["first"]) for r in records] == [("plain", True), ("toe", True)]
    p, t = records[0]["cells"], records[1]["cells"]
    assert p["speed-up measured"] == "baseline" and p["published row"] == tables.NO_ROW
    assert (t["top-1 final"], t["top-1 best"], t["EMA final"], t["EMA best"]) == ("80.00", "80.00", "79.00", "79.00")
    assert (p["EMA final"], p["wall-clock (s)"], p["training time (s)"]) == ("77.00", "12.0", "8.0 (epochs)")
    assert t["speed-up measured"] == "1.33x" and t["speed-up wall-clock"] == "1.50x" and t["speed-up ideal"] == "-"
    assert records[1]["baseline"] == plain
    assert t["published row"] == "paper Tab. 9: tiny ToE" and t["pub. top-1"] == "81.5"
    assert t["pub. time"] == tables.NA and t["pub. GPUs"] == tables.NA and t["pub. speed-up"] == tables.NA
    assert t["source"] == "somewhere (read)"
    md = tables.runs_markdown(records)
    assert "| toe | vit_tiny_patch16_224 | toe | 4 | 80.00 |" in md and "n/a (not recovered)" in md
    parsed = list(csv.DictReader(io.StringIO(tables.runs_csv(records))))
    assert [r["run"] for r in parsed] == ["plain", "toe"] and parsed[1]["pub. time"] == "n/a (not recovered)"
    # through the command line, with the registry's rows (none for this tiny model) and files
    assert tables.main([plain, toe, "--no-flops", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.count(tables.NO_ROW) == 2 and "1.33x" in out
    assert (tmp_path / "out" / "tables.md").read_text().startswith("| run | model |")
    assert (tmp_path / "out" / "tables.csv").read_text().startswith("run,model,methods")


def test_compute_only_time_and_explicit_baseline(tmp_path):
    base = make_run(tmp_path / "base", DEMO, TINY + ["--methods", "[]"], [1, 2, 3, 4], train_s=[4, 4, 4, 4],
                    compute_s=[3, 3, 3, 3])
    fast = make_run(tmp_path / "fast", DEMO, TINY + ["--methods", "[toe]"], [1, 2, 3, 5], train_s=[3, 3, 3, 3],
                    compute_s=[2, 2, 2, 2])
    old = make_run(tmp_path / "old", DEMO, TINY + ["--methods", "[toe]", "--seed", "1"], [1, 2, 3, 6],
                   train_s=[2, 2, 2, 2])                       # a log without compute-only time
    from_summary = make_run(tmp_path / "summ", DEMO, TINY + ["--methods", "[toe]"], [1, 2, 3, 6],
                            train_s=[2, 2, 2, 2], summary={"train_compute_seconds": 4.0})
    records = tables.build_table([fast, old, from_summary], baseline=base, flops=False, rows=[])
    f, o, s = (r["cells"] for r in records)
    assert f["training time (s)"] == "8.0" and f["speed-up measured"] == "1.50x"          # 12 / 8, compute-only
    assert o["training time (s)"] == "8.0 (epochs)" and o["speed-up measured"] == "2.00x"  # 16 / 8, epoch sums
    assert s["training time (s)"] == "4.0" and s["speed-up measured"] == "3.00x"
    assert all(r["baseline"] == base for r in records)
    # the baseline given explicitly and listed too is the baseline of itself
    records = tables.build_table([base, fast], baseline=base, flops=False, rows=[])
    assert records[0]["cells"]["speed-up measured"] == "baseline"


def test_flops_and_ideal_speedup(tmp_path):
    plain = make_run(tmp_path / "plain", DEMO, TINY + ["--methods", "[]"], [1, 2, 3, 4], train_s=[2, 2, 2, 2])
    toe = make_run(tmp_path / "toe", DEMO, TINY + ["--methods", "[toe]"], [1, 2, 3, 4], train_s=[1, 1, 2, 2])
    records = tables.build_table([toe, plain], flops=True, rows=[])
    t, p = records[0]["data"], records[1]["data"]
    ideal = records[0]["speedups"]["ideal"]
    assert ideal == pytest.approx(p["train_flops"] / t["train_flops"]) and 1.0 < ideal < 4 / 3
    assert ideal == pytest.approx(t["own_ideal_speedup"])          # the plain run is this recipe without ToE
    assert records[0]["cells"]["speed-up ideal"] == f"{ideal:.2f}x"
    assert records[0]["cells"]["training FLOPs"] == f"{t['train_flops']:.3e}"


def test_errors_are_one_line(tmp_path, capsys):
    assert tables.main([str(tmp_path), "--no-flops"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tables.main([])


# --------------------------------------------------------------------------------------------------- --published
def test_published_listing(tmp_path, capsys):
    assert tables.main(["--published"]) == 0
    out = capsys.readouterr().out
    for text in ("| toe | Tab. 1 | DeiT-S ToE | deit_small_patch16_224 | ToE | n/a (not recovered) |",
                 "| trilevel | abstract | DeiT-S Tri-Level |", "83.5 (final 83.46, best 83.478)", "84.3 % of baseline",
                 "**pss README: DeiT-S-224 + PSS**", "| 0.2 | 66.858 | 0.902 | 3110.8 |"):
        assert text in out, text
    assert tables.main(["--published", "--paper", "trilevel", "--csv", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert parsed and {r["paper"] for r in parsed} == {"trilevel"}
    assert next(r for r in parsed if r["row"] == "Tri-level/0.8")["training time"] == "70.2 % of baseline"
    assert (tmp_path / "published.csv").read_text() == out
    assert "| paper | table | row |" in (tmp_path / "published.md").read_text()


def test_the_generic_script_names_no_method():
    tool = os.path.join(ROOT, "..", "shared", "tools", "method_names.py")
    if not os.path.isfile(tool):
        pytest.skip("shared/tools/method_names.py is not on this machine")
    res = subprocess.run([sys.executable, tool, "scripts/tables.py"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "no method names" in res.stdout, res.stdout
