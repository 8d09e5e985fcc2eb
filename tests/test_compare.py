"""scripts/compare.py: its arithmetic on hand-made run directories, its files, and FLOPs of the ToE schedule."""
import importlib.util
import json
import os

import pytest

from config import load_config, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("compare", os.path.join(ROOT, "scripts", "compare.py"))
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

TINY = ["--model_kwargs", "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}", "--input_size", "16",
        "--epochs", "4", "--toe.expansion_steps", "[0, 2]", "--toe.keep_rates", "[0.5, 1.0]"]


def make_run(path, toe, train_s, wall_s, acc, ema):
    os.makedirs(path)
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), TINY + ([] if toe else ["--toe", "none"]))
    save_config(cfg, os.path.join(path, "config.yaml"))
    with open(os.path.join(path, "log.jsonl"), "w") as f:
        for e in range(4):
            f.write(json.dumps({"epoch": e, "val_acc1": acc[e], "val_ema_acc1": ema[e], "train_epoch_seconds": train_s[e],
                                "wall_seconds": wall_s[e], "toe_stage": (1 if e < 2 else 2) if toe else None}) + "\n")
    return str(path)


def test_compare_arithmetic_files_and_plot(tmp_path):
    toe = make_run(tmp_path / "toe", True, [1, 1, 2, 2], [1.5, 3.0, 5.5, 8.0], [10, 50, 70, 80], [5, 30, 60, 79])
    # the full-token run was resumed after epoch 2: its wall_seconds restarts, and must still add up to 12
    full = make_run(tmp_path / "full", False, [2, 2, 2, 2], [3.0, 6.0, 3.0, 6.0], [20, 55, 75, 78], [8, 40, 70, 77])
    result = compare.compare(compare.read_run(toe), compare.read_run(full))
    assert result["toe"]["train_seconds"] == 6 and result["full"]["train_seconds"] == 8
    assert result["full"]["wall_seconds"] == 12 and result["toe"]["wall_seconds"] == 8
    assert result["speedup_train"] == pytest.approx(8 / 6) and result["speedup_wall"] == pytest.approx(12 / 8)
    assert result["delta_final_acc1"] == 2 and result["delta_best_acc1"] == 80 - 78
    assert result["toe"]["best_ema_acc1"] == 79 and result["full"]["final_ema_acc1"] == 77
    assert result["stage_starts"] == [2]
    # FLOPs: two epochs at 7 of 16 patch tokens (seeds 0.2, keep 0.5), two at all 16, against four at 16
    flops = compare.flops_of(compare.read_run(toe)["cfg"])
    assert result["ideal_speedup"] == pytest.approx(flops["ideal_speedup"])
    assert 1.0 < result["ideal_speedup"] < 4 / 3      # the first block always runs on all tokens
    assert result["efficiency_train"] == pytest.approx(result["speedup_train"] / result["ideal_speedup"])
    table = compare.save(result, str(tmp_path / "out"))
    assert "| training time (s) | 8.0 | 6.0 | 1.33x |" in table
    assert "| wall-clock (s) | 12.0 | 8.0 | 1.50x |" in table
    for name in ("compare.md", "compare.json", "compare.png"):
        assert os.path.getsize(tmp_path / "out" / name) > 0
    with open(tmp_path / "out" / "compare.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_a_config_without_toe_and_bad_dirs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--config", os.path.join(ROOT, "configs", "deit_s.yaml")])
    assert "no toe: section" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        compare.read_run(str(tmp_path))
