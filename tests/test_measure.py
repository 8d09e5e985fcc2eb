"""FLOPs arithmetic, fvcore counting (fused attention included), the benchmark's plumbing for any method, and the
ToE operator's compile-friendliness. Tiny ViTs only (2 blocks of width 64 at 32 px); no assertion depends on a
timing value."""
import json

import pytest
import timm
import torch

import measure
from config import load_config
from measure import (analytic_vit_flops, benchmark_inference, benchmark_training, count_flops, model_flops,
                     schedule_training_flops, training_flops, unfused_attention)
from models import create_model
from toe import ToESchedule, find_toe, remove_toe, set_epoch, token_expansion

# 32 px, patch 8: N = 16 patches + CLS = 17 tokens, C = 64, 2 blocks, 10 classes
TINY = ["--model", "vit_tiny_patch16_224", "--input_size", "32", "--drop_path", "0.0",
        "--model_kwargs", "{patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}"]
PATCH_EMBED = 16 * 64 * 3 * 8 * 8                        # 196,608: N * C * in_chans * p^2
BLOCK_17 = 12 * 17 * 64 ** 2 + 2 * 17 ** 2 * 64          # 872,576: qkv+proj+MLP 12nC^2, q@k^T + attn@v 2n^2C
BLOCK_9 = 12 * 9 * 64 ** 2 + 2 * 9 ** 2 * 64             # 452,736: 8 kept patches + CLS
HEAD = 64 * 10
LAYER_NORM_17 = 5 * 17 * 64                              # fvcore: 5 FLOPs per element of an affine LayerNorm


def tiny_cfg(*extra):
    return load_config(None, TINY + list(extra))


def test_analytic_flops_by_hand():
    full = analytic_vit_flops(img_size=32, patch_size=8, embed_dim=64, depth=2, num_classes=10)
    assert full["total"] == 196_608 + 2 * 872_576 + 640 == PATCH_EMBED + 2 * BLOCK_17 + HEAD
    # ToE after block 0 keeping 8 of 16 patches: block 0 on 17 tokens, block 1 on 9
    toe = analytic_vit_flops(img_size=32, patch_size=8, embed_dim=64, depth=2, num_classes=10, block_tokens=[17, 9])
    assert toe["total"] == 1_522_560 == PATCH_EMBED + BLOCK_17 + BLOCK_9 + HEAD
    # the published DeiT-S figures (papers.md 1.2): 4.599 full, 2.446 in stage 1 (98 patches after block 0)
    assert analytic_vit_flops(embed_dim=384)["total"] / 1e9 == pytest.approx(4.599, abs=5e-4)
    assert analytic_vit_flops(embed_dim=384, block_tokens=[197] + [99] * 11)["total"] / 1e9 == pytest.approx(2.446, abs=5e-4)


def test_fused_attention_products_are_counted():
    model = create_model(tiny_cfg(), 10)
    model.eval()
    attn = [m for m in model.modules() if hasattr(m, "fused_attn")]
    for m in attn:                       # the timm default, unless TIMM_FUSED_ATTN=0 is set in the environment
        m.fused_attn = True
    fused = count_flops(model, 32)
    with unfused_attention(model) as changed:
        assert changed == len(attn) == 2
        explicit = count_flops(model, 32)
    assert all(m.fused_attn for m in attn)                                   # restored
    attention = 2 * (2 * 17 ** 2 * 64)                                       # 2 blocks of q@k^T + attn@v
    assert fused.by_operator["scaled_dot_product_attention"] == attention
    assert explicit.by_operator["matmul"] == attention
    assert fused.total == explicit.total
    # everything else exactly as the closed form; fvcore adds its LayerNorm estimate (2 per block + final)
    assert fused.total - fused.by_operator["layer_norm"] == PATCH_EMBED + 2 * BLOCK_17 + HEAD
    assert fused.by_operator["layer_norm"] == 5 * LAYER_NORM_17


def test_stage_flops_and_toe_operator_counted_separately():
    report = model_flops(tiny_cfg("--toe", "{}"), 10)
    assert [v.label for v in report["variants"]] == ["ToE stage 1", "ToE stage 2", "ToE stage 3"]
    assert [v.share for v in report["variants"]] == pytest.approx([1 / 3] * 3)
    s1 = report["variants"][0]
    assert not s1.same_as_full and s1.patch_tokens == 8 and s1.epochs == (0, 100)
    assert s1.fvcore.block_tokens == [17, 9]                                 # measured, not declared
    assert s1.fvcore.method_op == 8 * 16 * 64                                # cosine scores: 16 patches x 8 kept
    norms = 2 * LAYER_NORM_17 + 3 * 5 * 9 * 64                               # block 0 on 17 tokens, then 9
    assert s1.fvcore.model - s1.fvcore.by_operator["layer_norm"] == s1.analytic["total"] == 1_522_560
    assert s1.fvcore.by_operator["layer_norm"] == norms
    last = report["variants"][-1]
    assert last.same_as_full and last.fvcore.total == report["full"].fvcore.total       # keep rate 1.0: plain model
    assert report["params"] == sum(p.numel() for p in create_model(tiny_cfg(), 10).parameters())


def test_training_flops_by_hand():
    out = training_flops([(0.2, 100.0), (0.3, 60.0), (0.5, 100.0)], full_forward=100.0, images=10, epochs=10)
    assert out["total"] == pytest.approx(3 * 10 * (2 * 100 + 3 * 60 + 5 * 100)) and out["total"] == pytest.approx(26_400)
    assert out["full_total"] == 3 * 10 * 10 * 100 == 30_000
    assert out["epochs"] == 10 and out["average_forward"] == pytest.approx(88.0)
    assert out["ratio"] == pytest.approx(0.88) and out["ideal_speedup"] == pytest.approx(30_000 / 26_400)
    # an example-level method that presents 80 % of the data per epoch saves 20 % more
    sub = training_flops([(1.0, 100.0)], full_forward=100.0, images=10, epochs=10, data_fraction=0.8)
    assert sub["total"] == pytest.approx(0.8 * 30_000) and sub["ideal_speedup"] == pytest.approx(1.25)


def test_schedule_training_flops_of_a_tiny_schedule():
    # epoch 0 full tokens (stage 0), 1-2 stage 1, 3-4 stage 2, 5 stage 3 (keep rate 1.0)
    report = model_flops(tiny_cfg("--epochs", "6", "--toe", "{expansion_steps: [1, 3, 5]}"), 10)
    assert [(v.label, v.epochs) for v in report["variants"]] == [
        ("ToE stage 0", (0, 1)), ("ToE stage 1", (1, 3)), ("ToE stage 2", (3, 5)), ("ToE stage 3", (5, 6))]
    full, s1, s2 = report["full"].fvcore.total, report["variants"][1].fvcore.total, report["variants"][2].fvcore.total
    out = schedule_training_flops(report, images=7)
    assert out["total"] == pytest.approx(3 * 7 * (full + 2 * s1 + 2 * s2 + full))
    assert out["ideal_speedup"] == pytest.approx(6 * full / (2 * full + 2 * s1 + 2 * s2))
    analytic = schedule_training_flops(report, images=7, which="analytic")
    assert analytic["total"] == pytest.approx(3 * 7 * (2 * 1_942_400 + 2 * 1_522_560 + 2 * (PATCH_EMBED + BLOCK_17 + HEAD
                                                                                            + 12 * 13 * 64 ** 2
                                                                                            + 2 * 13 ** 2 * 64)))
    # no method: the plain model over the whole run
    plain = model_flops(tiny_cfg("--epochs", "4"), 10)
    assert plain["variants"] == [] and plain["methods"] == []
    assert schedule_training_flops(plain, images=5)["total"] == pytest.approx(3 * 5 * 4 * plain["full"].fvcore.total)


def test_one_method_set_per_measurement(monkeypatch):
    """The FLOPs report, --plan and the benchmark build the config's MethodSet once and pass it on (the config's own
    check of the combination is before)."""
    import plan
    from methods import MethodSet
    cfg = tiny_cfg("--toe", "{}")
    built, real = [], MethodSet.from_config.__func__
    monkeypatch.setattr(MethodSet, "from_config", classmethod(lambda cls, c: built.append(c) or real(cls, c)))
    rows, totals = plan.plan(cfg)
    assert len(built) == 1 and totals["flops"] > 0
    built.clear()
    res = benchmark_training(cfg, 10, batch_size=2, steps=1, warmup=0, device="cpu")
    assert len(built) == 1 and [v["name"] for v in res["variants"]][:2] == ["full tokens", "ToE stage 1"]


def test_benchmark_reports_every_variant():
    cfg = tiny_cfg("--toe", "{}")
    flops = model_flops(cfg, 10)
    res = benchmark_training(cfg, 10, batch_size=4, steps=2, warmup=1, device="cpu", flops=flops)
    names = [v["name"] for v in res["variants"]]
    assert names == ["full tokens", "ToE stage 1", "ToE stage 2"]           # stage 3 (rate 1.0) is the plain model
    full, s1 = res["variants"][0], res["variants"][1]
    for v in res["variants"]:
        assert len(v["step_s"]) == 2 and v["step_s_median"] == pytest.approx(sorted(v["step_s"])[0] / 2 + sorted(v["step_s"])[1] / 2)
        assert v["images_per_s"] == pytest.approx(4 / v["step_s_median"])
        assert v["speedup"] == pytest.approx(full["step_s_median"] / v["step_s_median"])
        assert v["efficiency"] == pytest.approx(v["speedup"] / v["ideal_speedup"])
    assert full["speedup"] == 1.0 and full["ideal_speedup"] == 1.0 and full["op_ms"] is None
    assert s1["patch_tokens"] == 8 and s1["op_ms"] > 0 and s1["op_share"] == pytest.approx(s1["op_ms"] / 1e3 / s1["step_s_median"])
    assert 0 < s1["activations_mb"] < full["activations_mb"]                # fewer tokens, less to keep for backward
    assert s1["ideal_speedup"] == pytest.approx(flops["full"].fvcore.total / flops["variants"][0].fvcore.total)
    inf = res["inference"]
    assert inf["images_per_s"] == pytest.approx(4 / inf["step_s_median"]) and not inf["reduced_tokens"]
    assert inf["logits_shape"] == [4, 10]
    text = measure.format_benchmark(res)
    assert "ToE stage 1" in text and "inference" in text
    json.dumps(res)                                                          # the --json output is plain data


def test_inference_benchmark_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = create_model(tiny_cfg("--toe", "{}"), 10)
    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                              num_classes=10)
    plain.load_state_dict(model.state_dict())                                # ToE adds no parameters
    model.train()
    set_epoch(model, 0)
    images = torch.randn(2, 3, 32, 32)
    res = benchmark_inference(model, images, steps=1, warmup=0)
    assert not res["reduced_tokens"]
    toe = find_toe(model)
    assert model.training and toe is not None and toe.stage == 1               # mode and stage untouched
    model.eval(), plain.eval()
    assert torch.equal(model(images), plain(images))                         # eval = the plain DeiT
    model.train()
    model(images)
    assert toe.kept_index is not None and toe.kept_index.shape[1] == 1 + 8     # training still reduces


def test_cli_scripts(tmp_path, capsys):
    from scripts import benchmark as bench_cli, flops as flops_cli
    out = tmp_path / "flops.json"
    assert flops_cli.main(TINY + ["--toe", "{}", "--epochs", "3", "--toe.expansion_steps", "[0, 1, 2]",
                                  "--data_set", "cifar10", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["num_classes"] == 10 and data["training"]["images_per_epoch"] == 50_000
    assert data["training"]["ideal_speedup"] > 1 and len(data["variants"]) == 3
    assert "ideal speed-up" in capsys.readouterr().out
    assert flops_cli.main(TINY + ["--data_set", "folder", "--data_path", "x"]) == 2        # size unknown: says so
    bench = tmp_path / "bench.json"
    assert bench_cli.main(TINY + ["--toe", "{}", "--batch", "2", "--steps", "1", "--warmup", "0", "--no-inference",
                                  "--num-classes", "10", "--json", str(bench)]) == 0
    assert [v["name"] for v in json.loads(bench.read_text())["variants"]] == ["full tokens", "ToE stage 1", "ToE stage 2"]


# ------------------------------------------------------------------------------------- the operator's cost
def test_operator_index_tensors_are_cached():
    from toe import ops
    x = torch.randn(2, 1 + 16, 8)
    s = ToESchedule()
    token_expansion(x, s, 1)
    seeds = ops.seed_positions(16, 0.25, x.device)
    token_expansion(x, s, 1)
    assert ops.seed_positions(16, 0.25, x.device) is seeds


def test_operator_compiles_without_graph_breaks():
    model = create_model(tiny_cfg("--toe", "{}"), 10)
    model.train()
    set_epoch(model, 0)
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda inp: model(inp).sum())(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    remove_toe(model)
