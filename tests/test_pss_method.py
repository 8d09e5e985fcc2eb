"""PSS as a method plug-in: trained through the real entrypoint (one process and two), its schedule wired to the
training clock, exact resume, one-line errors, torch.compile recompilations, measurement and the inference sweep."""
import importlib.util
import json
import os
import re

import pytest
import torch

from config import ConfigError, load_config
from methods import MethodSet
from models import create_model
from pss import PSSSchedule, iter_samplers, num_kept_patches
from tests.runs import (DEMO, ROOT, TINY_MODEL, assert_same_weights, interrupt_epoch, load, read_log, runner,
                       torchrun)

TINY = [*TINY_MODEL, "--epochs", "2", "--num_workers", "0", "--batch_size", "128", "--warmup_epochs", "1",
        "--print_freq", "5", "--tensorboard", "false", "--methods", "[pss]", "--pss.cooldown_epochs", "1"]
run = runner(*TINY)


def test_trains_through_main_on_the_schedule_of_the_global_counter(digits, tmp_path, capsys):
    assert run(digits, tmp_path) == 0
    log = read_log(tmp_path)
    iters = log[0]["train_iters"]                                # 1442 // 128 = 11
    schedule = PSSSchedule("cyclic", 0.8, -0.1, epochs=2, iterations_per_epoch=iters, cooldown_epochs=1)
    for epoch, record in enumerate(log):
        steps = range(epoch * iters, (epoch + 1) * iters)
        assert record["pss_keep_rate"] == pytest.approx(sum(schedule.keep_rate(g) for g in steps) / iters)
    assert log[0]["pss_keep_rate"] < 1.0 and log[1]["pss_keep_rate"] == 1.0      # the last epoch is the cooldown
    assert 0 < log[0]["pss_kept_patches"] < 16 and log[1]["pss_kept_patches"] == 16
    out = capsys.readouterr().out
    shown = re.findall(r"PSS: drop_ratio ([\d.]+), kept_patches (\d+)", out)     # the progress line's state
    assert shown and {round(1 - float(d), 1) for d, _ in shown} > {1.0}
    assert all(int(n) == (num_kept_patches(16, float(d)) if float(d) > 0 else 16) for d, n in shown)
    assert "PSS: keep_rate" in out                                                # the epoch line
    summary = json.loads((tmp_path / "summary.json").read_text())
    shares = summary["methods"]["pss"]["keep_rate_shares"]
    assert sum(shares.values()) == pytest.approx(1.0) and shares["1.0"] > 0.5
    assert load(tmp_path / "checkpoint.pth")["global_step"] == 2 * iters


def test_kill_and_resume_gives_identical_weights(digits, tmp_path, monkeypatch):
    extra = ["--pss.sampler", "random", "--epochs", "3", "--pss.cooldown_epochs", "0"]
    assert run(digits, tmp_path / "straight", *extra) == 0
    interrupt_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run(digits, tmp_path / "split", *extra)
    monkeypatch.undo()
    assert run(digits, tmp_path / "split", *extra, "--resume", "auto") == 0
    a, b = load(tmp_path / "straight" / "checkpoint.pth"), load(tmp_path / "split" / "checkpoint.pth")
    assert_same_weights(a, b)
    assert a["global_step"] == b["global_step"]
    assert [r["pss_keep_rate"] for r in read_log(tmp_path / "straight")] == \
        [r["pss_keep_rate"] for r in read_log(tmp_path / "split")][-3:]


@pytest.mark.parametrize("overrides,needle", [
    (["--pss.sampler", "l2"], "pss.sampler: 'l2' is not one of magnitude, random"),
    (["--pss.scheduler", "step"], "pss.scheduler: 'step' is not one of linear, cosine, cyclic"),
    (["--pss.start_drop_ratio", "0.95"], "pss.start_drop_ratio"),             # snaps to 1.0: no patch left
    (["--pss.cooldown_epochs", "45"], "pss.cooldown_epochs: 45 must lie in [0, epochs=45)"),
    (["--methods", "[toe, pss]"], "toe needs the full patch grid"),
])
def test_bad_sections_stop_with_one_line_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["--methods", "[pss]"] + overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_model_without_patch_tokens_is_refused_with_one_line():
    from methods import MethodError
    from pss.method import PatchSamplingSchedule
    cfg = load_config(DEMO, TINY)
    method = PatchSamplingSchedule(cfg.pss, cfg)
    with pytest.raises(MethodError, match=r"^pss: Sequential has no patch tokens and `blocks`"):
        method.patch(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten()))
    tiny = load_config(DEMO, TINY + ["--input_size", "4", "--pss.start_drop_ratio", "0.8"])   # 1 patch of 4x4 px
    with pytest.raises(MethodError, match="pss.start_drop_ratio: the schedule keeps no patch of the model's 1"):
        create_model(tiny, 10)


def test_compile_recompiles_at_most_once_per_token_count():
    cfg = load_config(DEMO, TINY)
    model = create_model(cfg, 10).train()
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(len(example_inputs))
        return gm.forward
    torch._dynamo.reset()
    run_model = torch.compile(model, backend=backend, dynamic=False)
    x = torch.randn(2, 3, 16, 16)
    ratios = [0.0, 0.2, 0.4, 0.6, 0.8, 0.0, 0.4, 0.8, 0.2, 0.6]
    for d in ratios:
        for s in iter_samplers(model):
            s.set_drop_ratio(d)
        run_model(x).sum().backward()
    assert 1 <= len(compiles) <= len(set(ratios))
    torch._dynamo.reset()


def test_measurement_counts_every_level_with_its_share():
    from measure import model_flops, schedule_training_flops
    cfg = load_config(DEMO, TINY + ["--epochs", "10", "--pss.cooldown_epochs", "2"])
    report = model_flops(cfg, 10, images=1442)
    labels = [v.label for v in report["variants"]]
    assert labels == ["PSS keep 1.0", "PSS keep 0.8", "PSS keep 0.6", "PSS keep 0.4", "PSS keep 0.2"]
    assert sum(v.share for v in report["variants"]) == pytest.approx(1.0)
    tokens = [v.patch_tokens for v in report["variants"]]
    assert tokens == [16, 13, 9, 6, 2]                      # round((1 - d) * 17) - 1, half to even
    assert [v.fvcore.block_tokens for v in report["variants"]][-1] == [3, 3]
    assert report["variants"][0].same_as_full and all(v.fvcore.total < report["full"].fvcore.total
                                                      for v in report["variants"][1:])
    # the last 2 of 10 epochs are the cooldown: all patches there
    assert [v.variant.share_in_epoch(9) for v in report["variants"]] == [1.0, 0.0, 0.0, 0.0, 0.0]
    flops = schedule_training_flops(report, images=1442)
    expected = sum(v.share * v.fvcore.total for v in report["variants"]) * 3 * 1442 * 10
    assert flops["total"] == pytest.approx(expected) and flops["ideal_speedup"] > 1


def test_published_deit_s_levels_cost_the_published_gflops():
    """fvcore GFLOPs of the PSS DeiT-S at every keep rate of the published sweep (papers.md 2.4), within 1 %."""
    from measure import count_flops
    cfg = load_config(os.path.join(ROOT, "configs", "deit_s_pss.yaml"))
    methods = MethodSet.from_config(cfg)
    model = create_model(cfg, 1000, methods).eval()
    knob = methods.inference_knobs()[0]
    published = {1.0: 4.608, 0.5: 2.232, 0.2: 0.902}
    for keep, gflops in published.items():
        knob.apply(model, keep)
        assert count_flops(model, 224).total / 1e9 == pytest.approx(gflops, rel=0.01), keep


def test_two_process_torchrun(digits, tmp_path):
    from datasets import prepare_digits
    prepare_digits(digits)
    res = torchrun("--config", DEMO, "--data_path", digits, "--output_dir", tmp_path / "ddp", *TINY, "--batch_size", "64",
                   "--epochs", "1", "--pss.cooldown_epochs", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    log = read_log(tmp_path / "ddp")
    assert len(log) == 1 and 0 < log[0]["pss_keep_rate"] < 1
    assert log[0]["global_step"] == log[0]["train_iters"]        # the counter counts iterations, not images


def test_sweep_script_evaluates_every_keep_rate(digits, tmp_path):
    assert run(digits, tmp_path / "run", "--epochs", "1", "--pss.cooldown_epochs", "0") == 0
    spec = importlib.util.spec_from_file_location("sweep", os.path.join(ROOT, "scripts", "sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out = tmp_path / "sweep"
    args = ["--config", DEMO, "--checkpoint", str(tmp_path / "run" / "checkpoint.pth"), "--values", "1.0,0.6,0.2",
            "--out", str(out), "--data_path", digits, *TINY]
    assert sweep.main(args) == 0
    data = json.loads((out / "sweep.json").read_text())
    rows = data["rows"]
    assert [r["keep rate"] for r in rows] == [1.0, 0.6, 0.2]
    assert rows[0]["gflops"] > rows[1]["gflops"] > rows[2]["gflops"]
    assert len({r["count"] for r in rows}) == 1 and rows[0]["count"] > 300      # the whole val split each time
    for name in ("sweep.md", "sweep.json", "sweep.png"):
        assert os.path.getsize(out / name) > 0
    assert sweep.main(["--config", DEMO, "--checkpoint", str(tmp_path / "run" / "checkpoint.pth"),
                       "--data_path", digits, "--methods", "[toe]"]) == 2     # ToE declares no inference knob


def test_bf16_autocast_training_step_samples_like_fp32():
    """Mixed precision: the sampler ranks magnitudes in float32, so bf16 activations keep the same patches."""
    from models.tokens import find_positions
    cfg = load_config(DEMO, TINY)
    model = create_model(cfg, 10).train()
    for s in iter_samplers(model):
        s.set_drop_ratio(0.4)
    x = torch.randn(4, 3, 16, 16)
    model(x)
    fp32_index = find_positions(model).before().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    index = find_positions(model).before()
    assert out.dtype == torch.bfloat16 and index.shape == (4, 1 + 9)        # round(0.6 * 17) - 1 = 9 patches
    assert (index[:, 1:].sort(1).values == fp32_index[:, 1:].sort(1).values).float().mean() > 0.9
