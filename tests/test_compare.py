"""scripts/compare.py: its arithmetic on hand-made run directories, seeds, old runs, its files, and a real run."""
import importlib.util
import json
import os

import pytest

from config import load_config, save_config
from tests.runs import DEMO, ROOT
from tests.runs import TOE_FOUR_EPOCHS as TINY

spec = importlib.util.spec_from_file_location("compare", os.path.join(ROOT, "scripts", "compare.py"))
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def make_run(path, methods, train_s, wall_s, acc, ema, seed=0):
    os.makedirs(path)
    cfg = load_config(DEMO, TINY + ["--methods", methods, "--seed", str(seed)])
    save_config(cfg, os.path.join(path, "config.yaml"))
    with open(os.path.join(path, "log.jsonl"), "w") as f:
        for e in range(4):
            f.write(json.dumps({"epoch": e, "val_acc1": acc[e], "val_ema_acc1": ema[e], "train_epoch_seconds": train_s[e],
                                "wall_seconds": wall_s[e]}) + "\n")
    return str(path)


def test_compare_arithmetic_files_and_plot(tmp_path):
    # the plain run was resumed after epoch 2: its wall_seconds restarts, and must still add up to 12
    full = make_run(tmp_path / "none", "[]", [2, 2, 2, 2], [3.0, 6.0, 3.0, 6.0], [20, 55, 75, 78], [8, 40, 70, 77])
    toe = make_run(tmp_path / "toe", "[toe]", [1, 1, 2, 2], [1.5, 3.0, 5.5, 8.0], [10, 50, 70, 80], [5, 30, 60, 79])
    runs = [compare.read_run(full), compare.read_run(toe)]
    assert [compare.entry_name(r["cfg"]) for r in runs] == ["none", "toe"]
    result = compare.compare({"none": [runs[0]], "toe": [runs[1]]})
    a, b = result["entries"]["toe"], result["entries"]["none"]
    assert a["train_seconds"]["mean"] == 6 and b["train_seconds"]["mean"] == 8
    assert b["wall_seconds"]["mean"] == 12 and a["wall_seconds"]["mean"] == 8
    assert a["speedup_train"] == pytest.approx(8 / 6) and a["speedup_wall"] == pytest.approx(12 / 8)
    assert a["delta_final_acc1"] == 2 and a["best_ema_acc1"]["mean"] == 79 and b["final_ema_acc1"]["mean"] == 77
    assert a["boundaries"] == {"toe": [2]} and b["boundaries"] == {}
    # FLOPs: two epochs at 8 of 16 patch tokens (seeds 0.25, keep 0.5) after the first block, two at all 16
    assert b["ideal_speedup_vs_baseline"] == 1.0 and b["train_flops"] == pytest.approx(b["plain_flops"])
    assert 1.0 < a["ideal_speedup_vs_baseline"] < 4 / 3       # the first block always runs on all tokens
    assert a["ideal_speedup_vs_baseline"] == pytest.approx(b["train_flops"] / a["train_flops"])
    assert a["efficiency_train"] == pytest.approx(a["speedup_train"] / a["ideal_speedup_vs_baseline"])
    cum = a["cumulative_flops"]
    assert len(cum) == 4 and cum[-1] == pytest.approx(a["train_flops"])
    assert cum[1] - cum[0] == pytest.approx(cum[0]) and cum[3] - cum[2] > cum[1] - cum[0]     # stage 2 costs more
    table = compare.save(result, str(tmp_path / "out"))
    assert "| | none | toe |" in table
    assert "| training time (s) | 8.0 | 6.0 |" in table and "| measured speed-up (training time) | 1.00x | 1.33x |" in table
    assert "| wall-clock (s) | 12.0 | 8.0 |" in table
    for name in ("compare.md", "compare.json", "compare.png"):
        assert os.path.getsize(tmp_path / "out" / name) > 0
    with open(tmp_path / "out" / "compare.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_seeds_give_mean_and_std(tmp_path):
    r1 = make_run(tmp_path / "a", "[toe]", [1] * 4, [1, 2, 3, 4], [10, 20, 30, 80], [1, 2, 3, 4])
    r2 = make_run(tmp_path / "b", "[toe]", [3] * 4, [3, 6, 9, 12], [10, 20, 30, 84], [1, 2, 3, 6], seed=1)
    result = compare.compare({"toe": [compare.read_run(r1), compare.read_run(r2)]}, flops=False)
    e = result["entries"]["toe"]
    assert e["final_acc1"] == {"mean": 82.0, "std": pytest.approx(2 ** 0.5 * 2), "n": 2}
    assert "82.00 ± 2.83" in compare.format_table(result) and "| runs (seeds) | 2 |" in compare.format_table(result)


def test_a_run_written_before_methods_were_plugins_stays_readable(tmp_path):
    """Old runs: config.yaml without a `methods` key, log records with `toe_stage` / `kept_tokens`."""
    run = tmp_path / "old"
    os.makedirs(run)
    cfg = load_config(DEMO, TINY).to_dict()
    cfg.pop("methods")
    for section in ("pss", "trilevel", "efficienttrain"):          # sections that did not exist then
        cfg.pop(section, None)
    import yaml
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(run / "log.jsonl", "w") as f:
        for e in range(4):
            f.write(json.dumps({"epoch": e, "toe_stage": 1 + e // 2, "kept_tokens": 8 if e < 2 else 16,
                                "val_acc1": 50.0 + e, "train_epoch_seconds": 1.0, "wall_seconds": 1.5 * (e + 1)}) + "\n")
        # a record written twice (a kill after the log line, before the checkpoint): the later one counts
        f.write(json.dumps({"epoch": 3, "val_acc1": 60.0, "train_epoch_seconds": 1.0, "wall_seconds": 6.5}) + "\n")
    r = compare.read_run(str(run))
    assert compare.entry_name(r["cfg"]) == "toe" and [x["epoch"] for x in r["log"]] == [0, 1, 2, 3]
    m = compare.run_metrics(r)
    assert m["final_acc1"] == 60.0 and m["final_ema_acc1"] is None and m["train_seconds"] == 4.0


def test_refuses_entries_the_config_cannot_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--config", os.path.join(ROOT, "configs", "deit_s.yaml"), "--methods", "none,toe"])
    assert "has no toe: section" in capsys.readouterr().err
    assert compare.main(["--config", DEMO, "--methods", "none,nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        compare.read_run(str(tmp_path))


def test_trains_each_entry_through_main_and_compares(tmp_path):
    digits = str(tmp_path / "digits")
    out = tmp_path / "cmp"
    args = ["--config", DEMO, "--methods", "none,toe", "--out", str(out), "--data_path", digits, *TINY,
            "--epochs", "2", "--toe.expansion_steps", "[0, 1]", "--num_workers", "0", "--batch_size", "128",
            "--warmup_epochs", "1", "--tensorboard", "false"]
    assert compare.main(args) == 0
    for entry in ("none", "toe"):
        log = compare.read_run(str(out / entry))["log"]
        assert len(log) == 2
    assert [r.get("toe_stage") for r in compare.read_run(str(out / "toe"))["log"]] == [1, 2]
    assert "toe_stage" not in compare.read_run(str(out / "none"))["log"][0]
    data = json.loads((out / "compare.json").read_text())
    assert list(data["entries"]) == ["none", "toe"] and data["entries"]["toe"]["ideal_speedup_vs_baseline"] > 1
    # a second call finds both runs finished and only reads them
    mtime = os.path.getmtime(out / "toe" / "log.jsonl")
    assert compare.main(args) == 0 and os.path.getmtime(out / "toe" / "log.jsonl") == mtime
