"""Tri-Level E-ViT on the method interface: the ``trilevel:`` section, training through ``main.py`` on the embedded
digits (token + attention levels, the example level's swaps in the log), checkpoints (kill and resume across a swap,
on one process and on two under torchrun/gloo, ``per_rank`` and ``global``), one-line errors and measurement.

The reference behaviour of the operators and the selector is checked in ``tests/test_trilevel.py``.
"""
import io
import json
import textwrap

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import Block

import main as entry
from config import ConfigError, load_config
from methods import MethodError, MethodSet
from models import create_model
from trilevel import find_trilevel, set_enabled
from trilevel.cost import ForwardCost, ViTDims, representative_states, stage_tokens
from trilevel.method import TriLevel
from trilevel.schedule import keep_rate
from tests.runs import DEMO, ROOT, assert_same_weights, interrupt_epoch, load, read_log, runner, torchrun
from tests.test_resume_fields import STOPPER, without_timings

MODEL = ["--model_kwargs", "{patch_size: 4, embed_dim: 32, depth: 3, num_heads: 2}", "--input_size", "16"]
TINY = [*MODEL, "--num_workers", "0", "--batch_size", "128", "--warmup_epochs", "1", "--print_freq", "50",
        "--tensorboard", "false", "--model_ema_eval", "false", "--methods", "[trilevel]"]
N_TRAIN, SUBSET, POOL = 1442, 1154, 288          # digits training split; 80 / 20 %


def section(**kw) -> str:
    """A ``--trilevel`` override: small schedule and swaps (a swap at every epoch from epoch 1)."""
    base = dict(pruning_loc=[1], warmup_epochs=0, decay_epochs=2, swap_interval=1, npresentations=2, remove_n=100,
                eval_dense=False)
    base.update(kw)
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in base.items()) + "}"


run = runner(*TINY)


def assert_same_selector(a, b):
    assert a["swaps_done"] == b["swaps_done"] and a["seed"] == b["seed"]
    for key in ("train_ids", "pool_ids"):
        assert torch.equal(a[key], b[key]), key
    assert a["stats"].keys() == b["stats"].keys()
    for key in a["stats"]:
        assert torch.equal(a["stats"][key], b["stats"][key]), key


def nbytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


# ---------------------------------------------------------------------------------------------- the model
def test_method_off_and_dense_paths_equal_plain_timm():
    cfg = load_config(DEMO, [*MODEL, "--methods", "[trilevel]", "--trilevel",
                             section(dense_warmup=True, eval_dense=True), "--drop_path", "0.0"])
    plain = create_model(cfg, 10, MethodSet([]))
    methods = MethodSet.from_config(cfg)
    model = create_model(cfg, 10, methods)
    model.load_state_dict(plain.state_dict())
    assert list(model.state_dict()) == list(plain.state_dict())          # the patch adds no weights
    methods.attach([model])
    method = methods.methods[0]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    plain.train(), model.train()
    method._set_ratios(0.5, 0.5)
    assert not torch.equal(model(x), plain(x))
    set_enabled(model, False)                                            # off: timm's own blocks, in training too
    assert torch.equal(model(x), plain(x))
    set_enabled(model, True)
    method._set_ratios(1.0, 1.0)                                         # dense_warmup: timm's blocks at ratio 1
    assert torch.equal(model(x), plain(x))
    plain.eval(), model.eval()
    assert not torch.equal(model(x), plain(x))                           # evaluation at the targets ...
    undo = methods.eval_variants(16, 10, 4)["dense"].apply(model)
    assert torch.equal(model(x), plain(x))                               # ... and dense when asked
    undo()
    assert not torch.equal(model(x), plain(x))

    # the example level alone leaves the model alone: plain timm blocks, same outputs
    cfg = load_config(DEMO, [*MODEL, "--methods", "[trilevel]", "--trilevel",
                             section(token_level=False, attention_level=False)])
    only = create_model(cfg, 10, MethodSet.from_config(cfg)).eval()
    only.load_state_dict(plain.state_dict())
    assert all(type(b) is Block for b in only.blocks) and find_trilevel(only) is None
    assert torch.equal(only(x), plain(x))


# ---------------------------------------------------------------------------------------------- training
def test_token_and_attention_levels_train_end_to_end(digits, tmp_path):
    out = tmp_path / "run"
    assert run(digits, out, "--epochs", "2", "--trilevel",
               section(example_level=False, pruning_loc=[0, 2], decay_epochs=1, eval_dense=True)) == 0
    log = read_log(out)
    assert 0.7 < log[0]["trilevel_keep_ratio"] < 0.71 and log[1]["trilevel_keep_ratio"] == 0.7   # end of each epoch
    assert [r["trilevel_tokens"] for r in log] == [[16, 12, 9]] * 2
    assert log[1]["trilevel_attn_ratio"] == pytest.approx(0.3)
    assert all(r["train_examples"] == N_TRAIN and "trilevel_subset" not in r for r in log)   # no example level
    assert all(r["val_dense_count"] == r["val_count"] and r["train_loss"] > 0 for r in log)  # both evaluations
    ckpt = load(out / "checkpoint.pth")
    assert ckpt["methods"] == {"trilevel": {}}
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4, embed_dim=32,
                              depth=3, num_heads=2)
    plain.load_state_dict(ckpt["model"])                                # plain timm weights
    summary = json.loads((out / "summary.json").read_text())["methods"]["trilevel"]
    assert summary["tokens_at_target"] == [16, 12, 9] and summary["levels"] == ["token", "attention"]


def test_example_level_swaps_and_resume_across_a_swap(digits, tmp_path, monkeypatch):
    """The swap at epoch 1 shows in the log; killed in epoch 1 (before its swap is saved) and resumed, the run ends
    with bit-identical weights and example state (one process, sync global, the cls tie-break)."""
    tl = ("--trilevel", section(tie_break="cls"))
    straight = tmp_path / "straight"
    assert run(digits, straight, "--epochs", "2", *tl) == 0
    log = read_log(straight)
    assert [r["trilevel_swaps"] for r in log] == [0, 1]
    assert [r["trilevel_swapped"] for r in log] == [0, 100] and [r["trilevel_restored"] for r in log] == [0, 100]
    assert all(r["trilevel_subset"] == r["train_examples"] == SUBSET and r["trilevel_pool"] == POOL for r in log)
    assert all(0 < r["trilevel_presented"] <= SUBSET for r in log) and log[0]["train_iters"] == SUBSET // 128
    assert [r["trilevel_tokens"] for r in log][-1] == [16, 12]

    interrupt_epoch(monkeypatch, 2)
    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        run(digits, split, "--epochs", "2", *tl)
    assert load(split / "checkpoint.pth")["methods"]["trilevel"]["selector"]["swaps_done"] == 0
    monkeypatch.undo()
    assert run(digits, split, "--epochs", "2", "--resume", "auto", *tl) == 0

    a, b = load(straight / "checkpoint.pth"), load(split / "checkpoint.pth")
    assert_same_weights(a, b)
    sa, sb = a["methods"]["trilevel"], b["methods"]["trilevel"]
    assert sa["sync"] == sb["sync"] == "global" and sa["selector"]["swaps_done"] == 1
    assert_same_selector(sa["selector"], sb["selector"])
    assert "cls_var_sum" in sa["selector"]["stats"]
    assert [r["trilevel_swaps"] for r in read_log(split)] == [0, 1]
    # what the checkpoint holds for the example level: ids, counts, correctness bits, CLS-variance sums
    per_example = (nbytes(sa) - nbytes({**sa, "selector": {}})) / N_TRAIN
    assert per_example < 24, per_example                                # ~16 bytes/example without the cls sums


# ---------------------------------------------------------------------------------------------- errors
def test_bad_sections_stop_with_one_line_naming_the_key(digits, tmp_path, capsys):
    for tl, needle in [
        (section(keep_ratio=0.0), "trilevel.keep_ratio"),
        (section(attn_ratio=1.5), "trilevel.attn_ratio"),
        (section(pruning_loc=[2, 1]), "trilevel.pruning_loc"),
        (section(pruning_loc=[]), "trilevel.pruning_loc"),
        (section(pool_fraction=1.0), "trilevel.pool_fraction"),
        (section(swap_interval=0), "trilevel.swap_interval"),
        (section(remove_n=-1), "trilevel.remove_n"),
        (section(tie_break="loss"), "trilevel.tie_break"),
        (section(sync="nccl"), "trilevel.sync"),
        (section(warmup_epochs=5), "trilevel.warmup_epochs"),
        (section(example_level=False, token_level=False, attention_level=False), "all false"),
        (section(dense_warmup=True, tie_break="cls"), "trilevel.dense_warmup"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(DEMO, [*TINY, "--epochs", "2", "--trilevel", tl])
        assert needle in str(err.value) and "\n" not in str(err.value), (tl, str(err.value))
    # a model without a CLS token: in the config, and for a model that has none by its own definition
    with pytest.raises(ConfigError, match=r"^model: .*no CLS token") as err:
        load_config(DEMO, [*TINY, "--trilevel", section(), "--model_kwargs",
                           "{patch_size: 4, embed_dim: 32, depth: 3, num_heads: 2, class_token: false, global_pool: avg}"])
    assert "\n" not in str(err.value)
    cfg = load_config(DEMO, [*TINY, "--trilevel", section()])
    gap = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                            global_pool="avg", class_token=False)
    with pytest.raises(MethodError, match="no CLS token"):
        TriLevel(cfg.trilevel, cfg).patch(gap)
    # known only at start-up: pruning locations outside the model, remove_n larger than the subset
    for tl, needle in [(section(pruning_loc=[1, 3]), "trilevel.pruning_loc [1, 3] is outside 0..2 for a 3-block model"),
                       (section(remove_n=SUBSET + 1), f"trilevel.remove_n: {SUBSET + 1} (after keep_lowest_n 0) is more "
                                                      f"than the {SUBSET}-example training subset")]:
        assert run(digits, tmp_path / f"bad{len(needle)}", "--epochs", "1", "--trilevel", tl) != 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines


# ---------------------------------------------------------------------------------------------- measurement
def test_variant_shares_reproduce_the_schedule_flops():
    dims = ViTDims(embed_dim=384, mlp_hidden=1536, depth=12, num_prefix_tokens=1)
    loc, epochs, iters = (3, 6, 9), 14, 7
    cost = ForwardCost(dims, loc)
    states = representative_states(0.7, 0.3, 2, 9, epochs, iters, 196, loc, cost)
    assert [s.c for s in states] == [1.0, 0.75, 0.5, 0.25, 0.0] and states[-1].stages == (196, 138, 97, 68)
    for e in range(epochs):
        exact = np.mean([cost(stage_tokens(196, keep_rate(e, s, 0.7, iters, 2, 9), loc)) for s in range(iters)])
        assert sum(s.epoch_shares[e] for s in states) == pytest.approx(1.0)
        assert sum(s.epoch_shares[e] * cost(s.stages) for s in states) == pytest.approx(exact, rel=1e-12)
    assert states[0].epoch_shares[:2] == [1.0, 1.0] and states[-1].epoch_shares[-3:] == [1.0] * 3
    assert len(representative_states(1.0, 1.0, 2, 9, epochs, iters, 196, loc, cost)) == 1

    # the cached per-count FLOPs are fvcore's (differences between states, pruning in the last block included)
    from measure import model_flops
    cfg = load_config(DEMO, [*MODEL, "--epochs", "6", "--methods", "[trilevel]", "--trilevel",
                             section(pruning_loc=[1, 2], warmup_epochs=1, decay_epochs=3)])
    report = model_flops(cfg, 10, images=N_TRAIN)
    assert report["data_fraction"] == pytest.approx(0.8)
    full = report["full"].fvcore.total
    cost = ForwardCost(ViTDims(32, 128, 3, 1), (1, 2))
    warm, *rest = report["variants"]
    assert warm.label.endswith("warm-up") and not warm.same_as_full       # the masked form and the pruning op run
    assert warm.fvcore.total == full and warm.fvcore.op_acted
    for v in rest:
        stages = (16, v.fvcore.block_tokens[2] - 1, v.variant.patch_tokens)     # block 2 prunes inside itself
        assert v.fvcore.total - full == cost(stages) - cost((16, 16, 16)), v.label
    assert sum(v.share for v in report["variants"]) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- two processes
KEEPER = textwrap.dedent("""
    import shutil, sys
    sys.path.insert(0, {root!r})
    import checkpoint
    import main as entry
    real = checkpoint.save_checkpoint

    def save_and_keep_epoch_0(state, path, *args, **kwargs):
        out = real(state, path, *args, **kwargs)
        if state.get("epoch") == 0 and not state.get("mid_epoch") and path.endswith("checkpoint.pth"):
            shutil.copyfile(path, {keep!r})
        return out
    checkpoint.save_checkpoint = save_and_keep_epoch_0
    sys.exit(entry.main(sys.argv[1:]))
""")


def torchrun_demo(script, digits, out, *extra):
    return torchrun("--config", DEMO, "--data_path", digits, "--output_dir", out, *TINY, "--batch_size", "64", *extra,
                    script=script)


def test_two_processes_per_rank_resume_across_a_swap_and_global_sync(digits, tmp_path, capsys):
    """Two processes (torchrun, gloo). ``per_rank``: the run keeps a copy of its epoch-0 checkpoint (what a kill in
    epoch 1 leaves on disk: each process's subset and statistics, before the swap at epoch 1); resumed from it in a
    fresh directory, the run ends bit-identical. Stopped by SIGTERM inside epoch 1 (after each process's own swap),
    its checkpoint holds both processes' subsets of that epoch and the resumed run ends with the uninterrupted run's
    weights, example state and log. Resuming on one process is refused. ``global``: one subset, statistics of both
    processes' presentations on each, the same swap (checked at every save)."""
    keep = tmp_path / "epoch0.pth"
    keeper = tmp_path / "keeper.py"
    keeper.write_text(KEEPER.format(root=ROOT, keep=str(keep)))
    per_rank = ("--epochs", "2", "--trilevel", section(sync="per_rank"))

    res = torchrun_demo(str(keeper), digits, tmp_path / "straight", *per_rank)
    assert res.returncode == 0, res.stderr[-3000:]
    assert load(keep)["epoch"] == 0 and load(keep)["methods"]["trilevel"]["selectors"][0]["swaps_done"] == 0
    res = torchrun_demo(None, digits, tmp_path / "resumed", *per_rank, "--resume", str(keep))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load(tmp_path / "straight" / "checkpoint.pth"), load(tmp_path / "resumed" / "checkpoint.pth")
    assert_same_weights(a, b)
    sa, sb = a["methods"]["trilevel"], b["methods"]["trilevel"]
    assert sa["sync"] == "per_rank" and sa["world_size"] == 2 and len(sa["selectors"]) == 2
    for x, y in zip(sa["selectors"], sb["selectors"]):
        assert_same_selector(x, y)
        assert x["swaps_done"] == 1 and len(x["train_ids"]) == SUBSET
    r0, r1 = sa["selectors"]
    assert r0["seed"] == 0 and r1["seed"] == 1 and not torch.equal(r0["train_ids"], r1["train_ids"])  # own subsets
    # each process presented only its own shard of its own subset since the last swap
    assert all(len(s["stats"]["ids"]) <= SUBSET // 2 + 64 for s in sa["selectors"])
    assert nbytes(sa) < 2 * 16 * N_TRAIN + 8192                          # <= 16 bytes per example per process

    # SIGTERM inside epoch 1: every process's subset of the epoch in progress is saved, the resume is exact
    stopper = tmp_path / "stop.py"
    stopper.write_text(STOPPER.format(root=ROOT, epoch=1, step=4))
    stopped = tmp_path / "stopped"
    res = torchrun_demo(str(stopper), digits, stopped, *per_rank)
    assert res.returncode != 0 and "stopped by SIGTERM at epoch 2/2" in res.stderr, res.stderr[-3000:]
    ckpt = load(stopped / "checkpoint.pth")
    ranks, selectors = ckpt["mid_epoch"]["ranks"], ckpt["methods"]["trilevel"]["selectors"]
    assert ckpt["clock"]["step"] == 5 and len(ranks) == len(selectors) == 2
    for mine, sel in zip(ranks, selectors):
        assert sel["swaps_done"] == 1 and torch.equal(mine["subset"], torch.sort(sel["train_ids"].long()).values)
    assert not torch.equal(ranks[0]["subset"], ranks[1]["subset"])
    res = torchrun_demo(None, digits, stopped, *per_rank, "--resume", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    b = load(stopped / "checkpoint.pth")
    assert_same_weights(a, b)
    for x, y in zip(sa["selectors"], b["methods"]["trilevel"]["selectors"]):
        assert_same_selector(x, y)
    assert without_timings(read_log(stopped)) == without_timings(read_log(tmp_path / "straight"))

    # another process count in per_rank mode is refused with one line
    code = entry.main(["--config", DEMO, "--data_path", digits, "--output_dir", str(tmp_path / "one"), *TINY,
                       *per_rank, "--resume", str(keep)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "holds the example subsets of 2 processes but this run has 1" in lines[0]

    # sync global: every process records every presentation and all make the same swap (checked at every save)
    res = torchrun_demo(None, digits, tmp_path / "global", "--epochs", "2", "--trilevel",
                   section(sync="global"))
    assert res.returncode == 0, res.stderr[-3000:]
    log = read_log(tmp_path / "global")
    assert [r["trilevel_swaps"] for r in log] == [0, 1] and log[-1]["trilevel_subset"] == SUBSET
    state = load(tmp_path / "global" / "checkpoint.pth")["methods"]["trilevel"]
    assert state["sync"] == "global" and state["selector"]["seed"] == 0
    presented = len(state["selector"]["stats"]["ids"])
    assert presented > SUBSET // 2 + 64 and presented == log[-1]["trilevel_presented"]   # both processes' examples
