"""PSS against the authors' reference outputs (``pss_reference.pt``), and its wiring into live timm models."""
import copy
import time
from collections import Counter

import numpy as np
import pytest
import timm
import torch
from timm.models import beit

import pss
from models.tokens import token_positions
from pss import (PatchSampler, PSSSchedule, ScheduleError, apply_sampler, from_published_state_dict,
                 num_kept_patches, remove_sampler, sample_patches)
from tests.reference import load_reference

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10, drop_path_rate=0.0)


def reference_cases():
    return load_reference("pss_reference.pt", "PSS_REFERENCE")


def tiny(name, **kw):
    """A registered model at 32 px / patch 4 (8 x 8 = 64 patches), width 32, 2 blocks: runs in milliseconds."""
    return timm.create_model(name, pretrained=False, **{**TINY, **kw})


def randomize(model, seed=0, scale=0.5):
    """Random values everywhere (the bias tables start at zero, which would hide a wrong lookup)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def plain_beit(**kw):
    """timm's own Beit, built directly, with the PSS DeiT model's architecture."""
    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10, qkv_bias=True,
                use_abs_pos_emb=True, use_rel_pos_bias=True, init_values=None, global_pool="avg")
    return beit.Beit(**{**args, **kw})


# ------------------------------------------------------------------------------------------ reference fixture
def check_schedule(case, what):
    s = PSSSchedule(case["scheduler"], case["start_drop_ratio"], case["end_drop_ratio"], case["epochs"],
                    case["iterations_per_epoch"], case["cooldown_epochs"])
    assert s.scheduled_iterations == case["scheduled_iterations"], what
    steps, expected = case["iterations"].tolist(), case["drop_ratio"].tolist()
    got = [s.drop_ratio(g) for g in steps]
    wrong = [(g, a, b) for g, a, b in zip(steps, got, expected) if a != b]
    assert not wrong, f"{what}: {len(wrong)} of {len(steps)} iterations differ, first (g, ours, ref): {wrong[:5]}"
    assert np.array_equal(s.drop_ratios(steps), np.asarray(expected)), f"{what}: vectorised path"
    assert [s.keep_rate(g) for g in steps[:3]] == [1.0 - d for d in expected[:3]], what


def check_keep_count(case, what):
    n = case["num_patches"]
    x = torch.randn(1, 1 + n, 4)
    for d, k, t in zip(case["drop_ratios"], case["num_kept_patches"], case["num_tokens"]):
        assert num_kept_patches(n, d) == k and k + 1 == t, f"{what}: d={d}"
        sampler = PatchSampler("magnitude").train()
        sampler.set_drop_ratio(d)
        assert sampler(x).shape[1] == t, f"{what}: d={d}"


def check_magnitude(case, what):
    sampler = PatchSampler("magnitude", case["num_prefix_tokens"]).train()
    sampler.set_drop_ratio(case["drop_ratio"])
    out = sampler(case["x"])
    if case["index"] is None:
        assert sampler.kept_index is None and out is case["x"], what
        return
    assert num_kept_patches(case["num_patches"], case["drop_ratio"]) == case["num_kept_patches"], what
    assert torch.equal(sampler.kept_index, case["index"]), f"{what}: kept positions or their order differ"
    torch.testing.assert_close(out, case["out"], rtol=0, atol=0, msg=what)


def check_rel_pos_bias(case, what):
    """The bias through OUR model's attention lookup: the case's table and positions loaded into a registered model."""
    rows, cols = case["window_size"]
    heads = case["num_heads"]
    model = timm.create_model("pss_deit_small_patch16_224", img_size=(2 * rows, 2 * cols), patch_size=2,
                              embed_dim=8 * heads, num_heads=heads, depth=1, num_classes=0)
    attn = model.blocks[0].attn
    assert torch.equal(attn.relative_position_index, case["relative_position_index"]), f"{what}: index layout"
    with torch.no_grad():
        attn.relative_position_bias_table.copy_(case["table"])
    positions = token_positions(model)
    positions.clear()
    if case["index"] is not None:
        positions.record(0.0, case["index"])
    bias = attn._get_rel_pos_bias()
    assert torch.equal(bias.expand_as(case["bias"]), case["bias"]), what


CHECKS = {"schedule": check_schedule, "keep_count": check_keep_count, "magnitude": check_magnitude,
          "rel_pos_bias": check_rel_pos_bias}


def test_reproduces_reference_fixture():
    cases = reference_cases()
    seen = Counter()
    for i, case in enumerate(cases):
        kind = case.get("kind")
        if kind not in CHECKS:
            pytest.fail(f"case {i}: unknown kind {kind!r}; teach tests/test_pss.py to check it")
        label = {k: case[k] for k in ("label", "scheduler", "drop_ratio", "window_size", "num_patches") if k in case}
        CHECKS[kind](case, f"case {i} {kind} {label}")
        seen[kind] += 1
    print(f"checked {dict(seen)}")
    assert set(seen) == set(CHECKS), f"the fixture has no case of {sorted(set(CHECKS) - set(seen))}"


# ------------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("kwargs,key", [
    (dict(scheduler="step"), "pss.scheduler"),
    (dict(scheduler="fixed"), "pss.scheduler"),
    (dict(start_drop_ratio=1.0), "pss.start_drop_ratio"),
    (dict(scheduler="linear", start_drop_ratio=0.5, end_drop_ratio=1.5), "pss.end_drop_ratio"),
    (dict(scheduler="linear", start_drop_ratio=0.9, end_drop_ratio=0.9), "pss.end_drop_ratio"),  # float noise -> 1.0
    (dict(start_drop_ratio=float("nan")), "pss.start_drop_ratio"),
    (dict(cooldown_epochs=300), "pss.cooldown_epochs"),
    (dict(epochs=0, cooldown_epochs=0), "pss.epochs"),
    (dict(iterations_per_epoch=0), "pss.iterations_per_epoch"),
    (dict(epochs=2.5), "pss.epochs"),
])
def test_impossible_schedules_name_the_key(kwargs, key):
    with pytest.raises(ScheduleError) as e:
        PSSSchedule(**kwargs)
    message = str(e.value)
    assert message.startswith(key) and "\n" not in message, message


def test_negative_end_ratios_clip():
    s = PSSSchedule("linear", 0.8, -5.0, epochs=3, iterations_per_epoch=4, cooldown_epochs=0)
    assert s.drop_ratio(0) == 0.8 and s.drop_ratio(11) == 0.0


@pytest.mark.parametrize("args", [
    ("cyclic", 0.8, -0.1, 12, 7, 2), ("cyclic", 0.8, -0.1, 5, 1, 1), ("linear", 0.8, -0.1, 12, 10, 2),
    ("linear", 0.1, 0.1, 12, 10, 2), ("linear", 0.7, 0.7, 9, 13, 1), ("cosine", 0.8, -0.1, 12, 10, 2),
    ("cosine", 0.5, 0.3, 7, 11, 3), ("cosine", 0.6, 0.0, 20, 9, 0),
])
def test_level_shares_count_every_iteration(args):
    s = PSSSchedule(*args)
    brute = Counter(s.drop_ratio(g) for g in range(s.total_iterations))
    assert s.level_counts() == dict(brute)
    shares = s.level_shares()
    assert list(shares) == sorted(brute) and abs(sum(shares.values()) - 1.0) < 1e-12
    assert np.array_equal(s.drop_ratios(np.arange(s.total_iterations)),
                          [s.drop_ratio(g) for g in range(s.total_iterations)])


def test_level_shares_of_the_published_deit_run_are_fast():
    start = time.perf_counter()
    s = PSSSchedule("cyclic", 0.8, -0.1, epochs=300, iterations_per_epoch=1250, cooldown_epochs=10)  # uncached
    shares = s.level_shares()
    assert time.perf_counter() - start < 1.0
    # per cycle the paper quotes rho = 0.2 for 1/9 of the iterations and 2/9 for each other level; the 10 cooldown
    # epochs run on all patches
    scheduled = 290 / 300
    assert abs(shares[0.8] - scheduled / 9) < 1e-3
    for level in (0.2, 0.4, 0.6):
        assert abs(shares[level] - scheduled * 2 / 9) < 1e-3
    assert abs(shares[0.0] - (scheduled * 2 / 9 + 10 / 300)) < 1e-3


# -------------------------------------------------------------------------------------------------- operator
def test_random_sampling_properties():
    batch, prefix, n, keep = 6, 2, 64, 20
    x = torch.randn(batch, prefix + n, 8)
    out, index = sample_patches(x, keep, "random", prefix, generator=torch.Generator().manual_seed(0))
    assert index.shape == (batch, prefix + keep) and index.dtype == torch.long
    assert out.shape == (batch, prefix + keep, 8)
    assert torch.equal(index[:, :prefix], torch.arange(prefix).expand(batch, -1))         # prefix first, in order
    patches = index[:, prefix:]
    assert bool(((patches >= prefix) & (patches < prefix + n)).all())
    assert all(len(set(row.tolist())) == keep for row in patches)                          # distinct
    assert len({tuple(sorted(row.tolist())) for row in patches}) == batch                  # differs per image
    assert torch.equal(out, torch.stack([x[b, index[b]] for b in range(batch)]))
    again, _ = sample_patches(x, keep, "random", prefix, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, out)                                                         # generator reproducible


def test_magnitude_sampling_keeps_prefix_tokens_and_the_largest_patches():
    x = torch.randn(3, 2 + 30, 5)
    out, index = sample_patches(x, 7, "magnitude", num_prefix_tokens=2)
    assert torch.equal(out[:, :2], x[:, :2])
    norms = x[:, 2:].abs().sum(-1)
    assert torch.equal(index[:, 2:] - 2, norms.argsort(dim=1, descending=True)[:, :7])


def test_noop_paths_return_the_input():
    x = torch.randn(2, 1 + 16, 4)
    assert sample_patches(x, 16, "magnitude") == (x, None)
    sampler = PatchSampler("random")
    sampler.set_drop_ratio(0.6)
    assert sampler.eval()(x) is x and sampler.kept_index is None                            # evaluation
    sampler.train().set_drop_ratio(0.0)
    assert sampler(x) is x                                                                 # d = 0
    sampler.eval().force = True
    sampler.set_drop_ratio(0.6)
    assert sampler(x).shape[1] == 1 + num_kept_patches(16, 0.6)                            # forced (measurement)
    with pytest.raises(ValueError):
        sampler.set_drop_ratio(1.0)
    with pytest.raises(ValueError):
        PatchSampler("l2_magnitude")


# ------------------------------------------------------------------------------------------ wiring into timm
def test_patched_vit_runs_sampled_in_training_and_unchanged_otherwise():
    torch.manual_seed(0)
    model = tiny("vit_tiny_patch16_224")
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    sampler = apply_sampler(model, "magnitude")
    assert model.pss is sampler and sampler.num_prefix_tokens == 1
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    sampler.set_drop_ratio(0.6)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference.eval()(x))                          # eval: all patches
        sampler.set_drop_ratio(0.0)
        assert torch.equal(model.train()(x), reference.train()(x))                        # d = 0: untouched
        sampler.set_drop_ratio(0.6)
        model(x)
        assert seen[-1] == 1 + num_kept_patches(64, 0.6)
        assert token_positions(model).before(1).shape == (2, seen[-1])
        remove_sampler(model)
        assert not hasattr(model, "pss") and torch.equal(model(x), reference.train()(x))


def test_pss_model_is_timm_beit_and_equal_without_sampling():
    model = randomize(tiny("pss_deit_small_patch16_224"))
    # timm's Beit; the subclass only changes which parameters are exempt from weight decay (as published)
    assert type(model).__mro__[1] is beit.Beit and vars(type(model)).keys() >= {"no_weight_decay"}
    assert {k for k in vars(type(model)) if callable(vars(type(model))[k]) and not k.startswith("__")} == \
        {"no_weight_decay", "adapt_state_dict"}
    assert model.global_pool == "avg" and model.pos_embed is not None
    plain = plain_beit()
    assert set(plain.state_dict()) == set(model.state_dict())
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    sampler = apply_sampler(model, "magnitude")
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))
        sampler.set_drop_ratio(0.0)
        assert torch.equal(model.train()(x), plain.train()(x))


def test_sampled_pss_model_equals_full_model_with_dropped_keys_masked():
    """Sampling + per-pair bias lookup == timm's full-set Beit with the dropped patches masked out as keys and left
    out of the mean pool: the attention of every kept token must see exactly the kept tokens with their own bias."""
    model = randomize(tiny("pss_deit_small_patch16_224"), seed=1).eval()
    sampler = apply_sampler(model, "magnitude")
    sampler.force = True
    sampler.set_drop_ratio(0.6)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = model(x)
        index = sampler.kept_index
        plain = plain_beit().eval()
        plain.load_state_dict(model.state_dict())
        tokens = plain.patch_embed(x)
        tokens = torch.cat([plain.cls_token.expand(3, -1, -1), tokens], dim=1) + plain.pos_embed
        keep = torch.zeros(tokens.shape[:2], dtype=torch.bool).scatter_(1, index, True)
        key_mask = torch.zeros(3, 1, 65, 65).masked_fill(~keep[:, None, None, :], float("-inf"))
        for block in plain.blocks:
            tokens = block(tokens, shared_rel_pos_bias=key_mask)
        pooled = (tokens[:, 1:] * keep[:, 1:, None]).sum(1) / keep[:, 1:].sum(1, keepdim=True)
        expected = plain.head(plain.fc_norm(pooled))
    assert index.shape == (3, 1 + num_kept_patches(64, 0.6))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "pss_deit_small_patch16_224"])
def test_random_sampling_gradients_equal_with_grad_checkpointing(name):
    """Non-reentrant checkpointing restores the RNG state for the recompute, so the same patches are redrawn."""
    model = randomize(tiny(name), seed=2, scale=0.1).train()
    sampler = apply_sampler(model, "random")
    sampler.set_drop_ratio(0.4)
    x = torch.randn(2, 3, 32, 32)

    def run(checkpointing):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(123)
        out = model(x)
        index = sampler.kept_index.clone()
        out.square().sum().backward()
        return out.detach(), index, {n: p.grad.clone() for n, p in model.named_parameters()}

    out, index, grads = run(False)
    out_ck, index_ck, grads_ck = run(True)
    assert index.shape[1] == 1 + num_kept_patches(64, 0.4)
    assert torch.equal(index, index_ck) and torch.equal(sampler.kept_index, index)           # recompute redrew them
    torch.testing.assert_close(out_ck, out, rtol=0, atol=0)
    for n in grads:
        torch.testing.assert_close(grads_ck[n], grads[n], rtol=1e-6, atol=1e-7, msg=n)


def test_sampler_on_plain_timm_beit_and_model_copies():
    model = timm.create_model("beit_base_patch16_224", pretrained=False, **TINY).train()
    apply_sampler(model, "magnitude").set_drop_ratio(0.4)
    assert all(isinstance(b.attn, pss.PositionalRelPosAttention) for b in model.blocks)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    ema = copy.deepcopy(model)                     # a model EMA: its own record, bound to its own hooks
    positions = token_positions(ema)
    assert positions is not token_positions(model)
    assert ema.pss.positions is positions and all(b.attn.token_positions is positions for b in ema.blocks)
    ema(torch.randn(2, 3, 32, 32))
    assert positions.before(1) is not None
    shared = timm.create_model("beit_base_patch16_224", pretrained=False, use_rel_pos_bias=False,
                               use_shared_rel_pos_bias=True, **TINY)
    with pytest.raises(TypeError):
        apply_sampler(shared, "magnitude")


# ------------------------------------------------------------------------------------------ published layout
def published_shapes(dim, depth, heads, grid, patch, num_classes, abs_pos, layer_scale):
    """Key names and shapes of the published ``PSSVisionTransformer`` (deit/pss.py, simmim/models/
    pss_vision_transformer.py) with ``qkv_bias=True, use_rel_pos_bias=True, use_mean_pooling=True``."""
    rows, cols = grid
    n = rows * cols
    shapes = {"cls_token": (1, 1, dim), "patch_embed.proj.weight": (dim, 3, patch, patch),
              "patch_embed.proj.bias": (dim,)}
    if abs_pos:
        shapes["pos_embed"] = (1, n + 1, dim)
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
                       p + "attn.qkv.weight": (3 * dim, dim), p + "attn.q_bias": (dim,), p + "attn.v_bias": (dim,),
                       p + "attn.relative_position_bias_table": ((2 * rows - 1) * (2 * cols - 1) + 3, heads),
                       p + "attn.relative_position_index": (n + 1, n + 1),
                       p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
                       p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
                       p + "mlp.fc1.weight": (4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,),
                       p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,)})
        if layer_scale:
            shapes.update({p + "gamma_1": (dim,), p + "gamma_2": (dim,)})
    shapes.update({"fc_norm.weight": (dim,), "fc_norm.bias": (dim,), "head.weight": (num_classes, dim),
                   "head.bias": (num_classes,)})
    return shapes


def published_state_dict(shapes, rel_index):
    """Random values in the published layout; every block stores the authors' ``relative_position_index``."""
    gen = torch.Generator().manual_seed(3)
    return {k: rel_index.clone() if k.endswith("relative_position_index") else torch.randn(s, generator=gen)
            for k, s in shapes.items()}


@pytest.mark.parametrize("name,abs_pos,layer_scale,dim,depth,heads", [
    ("pss_deit_small_patch16_224", True, False, 384, 12, 6),
    ("pss_deit_small_patch16_384", True, False, 384, 12, 6),
    ("pss_vit_base_patch16_224", False, True, 768, 12, 12),
])
def test_registered_models_have_the_published_layout(name, abs_pos, layer_scale, dim, depth, heads, monkeypatch):
    monkeypatch.setattr(beit.Beit, "init_weights", lambda self, needs_reset=True: None)   # shapes only: skip init
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    grid = model.patch_embed.grid_size
    published = {k: torch.empty(s, device="meta")
                 for k, s in published_shapes(dim, depth, heads, grid, 16, 1000, abs_pos, layer_scale).items()}
    expected = {k: tuple(v.shape) for k, v in from_published_state_dict(published).items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert isinstance(model.fc_norm, torch.nn.LayerNorm) and isinstance(model.norm, torch.nn.Identity)
    assert model.rel_pos_bias is None and model.num_prefix_tokens == 1
    assert all(isinstance(b.attn, pss.PositionalRelPosAttention) for b in model.blocks)


def test_published_checkpoint_loads():
    case = next(c for c in reference_cases() if c["kind"] == "rel_pos_bias")   # the authors' own index layout
    rows, cols = case["window_size"]
    for name, abs_pos, layer_scale in (("pss_deit_small_patch16_224", True, False),
                                       ("pss_vit_base_patch16_224", False, True)):
        model = timm.create_model(name, img_size=(4 * rows, 4 * cols), patch_size=4, embed_dim=16, depth=2,
                                  num_heads=2, num_classes=5)
        if layer_scale:
            assert model.blocks[0].gamma_1[0].item() == pytest.approx(0.1)     # SimMIM INIT_VALUES
        sd = published_state_dict(published_shapes(16, 2, 2, (rows, cols), 4, 5, abs_pos, layer_scale),
                                  case["relative_position_index"])
        checkpoint = {"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}
        model.load_state_dict(from_published_state_dict(checkpoint, model), strict=True)
        for key, value in model.state_dict().items():
            assert torch.equal(value, sd[key]), key
        sd["blocks.1.attn.relative_position_index"] = sd["blocks.1.attn.relative_position_index"].flip(0)
        with pytest.raises(ValueError, match="relative_position_index"):
            from_published_state_dict(sd, model)
