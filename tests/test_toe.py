"""ToE against the authors' reference outputs, and its wiring into live timm models."""
import copy

import pytest
import timm
import torch

from tests.reference import load_reference
from toe import ToESchedule, apply_toe, find_toe, remove_toe, set_epoch, set_sparse_eval, token_expansion

DEIT_S = ToESchedule((0, 100, 200), (0.5, 0.75, 1.0), 0.25, 2)


def reference_cases():
    return load_reference("toe_reference.pt", "TOE_REFERENCE")


def tiny_vit(name="vit_tiny_patch16_224", **kw):
    """A real timm ViT at 224 px / patch 16 (196 patches) with a tiny width and depth, so it runs in milliseconds."""
    args = dict(embed_dim=32, depth=3, num_heads=2, num_classes=10, drop_path_rate=0.0)
    args.update(kw)
    return timm.create_model(name, pretrained=False, **args)


def capture_block_inputs(model, index):
    seen = []
    model.blocks[index].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    return seen


def test_reproduces_reference_fixture():
    cases = reference_cases()
    assert cases, "the fixture holds no case"
    for c in cases:
        assert "kind" not in c, f"a ToE fixture case of unknown kind {c['kind']!r}"       # ToE cases are one kind
        s = ToESchedule(c["expansion_steps"], c["keep_rates"], c["init_keep_rate"], c["repeat_k"], c["distance"])
        out, index = token_expansion(c["x"], s, s.stage(c["epoch"]), c["num_prefix_tokens"])
        what = f"{c['recipe']}/{c['distance']}/epoch {c['epoch']}"
        if c["index"] is None:
            assert index is None and torch.equal(out, c["out"]), what
            continue
        assert out.shape == c["out"].shape, what
        assert torch.equal(index, c["index"]), what          # same positions, same order
        torch.testing.assert_close(out, c["out"], rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("schedule,expected", [
    (DEIT_S, [196, 98, 147, 196]),
    (ToESchedule((0, 100, 200), (0.4, 0.7, 1.0), 0.2, 2), [196, 78, 136, 196]),
    (ToESchedule((0, 100, 200), (0.6, 0.8, 1.0), 0.3, 2), [196, 116, 155, 196]),
])
def test_kept_token_counts_per_stage(schedule, expected):
    assert [schedule.kept_tokens(196, stage) for stage in range(4)] == expected
    x = torch.randn(2, 197, 16)
    for stage in (1, 2, 3):
        out, _ = token_expansion(x, schedule, stage)
        assert out.shape[1] == 1 + expected[stage]


def test_deit_s_recipe_counts_in_a_real_model():
    model = tiny_vit()
    apply_toe(model, DEIT_S)
    seen = capture_block_inputs(model, 1)
    model.train()
    for epoch in (0, 99, 100, 199, 200, 299):
        set_epoch(model, epoch)
        model(torch.randn(2, 3, 224, 224))
    assert [s.shape[1] - 1 for s in seen] == [98, 98, 147, 147, 196, 196]


def test_stage_from_epoch_and_noop_stages():
    s = ToESchedule((5, 100, 200), (0.5, 0.75, 1.0), 0.25, 2)
    assert [s.stage(e) for e in (0, 4, 5, 99, 100, 200, 300)] == [0, 0, 1, 1, 2, 3, 3]
    assert not s.is_reducing(0) and s.is_reducing(1) and not s.is_reducing(3)
    x = torch.randn(1, 197, 8)
    assert token_expansion(x, s, 0)[1] is None


@pytest.mark.parametrize("name,kwargs,prefix", [
    ("deit_tiny_distilled_patch16_224", {}, 2),
    ("vit_tiny_patch16_224", {"reg_tokens": 4}, 5),
])
def test_prefix_tokens_are_never_selected_or_merged(name, kwargs, prefix):
    model = tiny_vit(name, **kwargs)
    assert model.num_prefix_tokens == prefix
    before = capture_block_inputs(model, 1)
    toe = apply_toe(model, DEIT_S)
    after = capture_block_inputs(model, 1)
    model.train()
    set_epoch(model, 0)
    model(torch.randn(2, 3, 224, 224))
    # hooks run in registration order: `before` sees block 0's output, `after` the reduced tokens
    x_in, x_out = before[0], after[0]
    assert x_in.shape[1] == prefix + 196 and x_out.shape[1] == prefix + 98
    assert torch.equal(x_out[:, :prefix], x_in[:, :prefix])
    index = toe.kept_index
    assert torch.equal(index[:, :prefix], torch.arange(prefix).expand(2, -1))
    assert (index[:, prefix:] >= prefix).all()


def test_kept_index_points_at_source_tokens_and_merging_is_a_mean():
    torch.manual_seed(0)
    x = torch.randn(3, 1 + 196, 24)
    out, index = token_expansion(x, DEIT_S, 1)
    assert torch.equal(out[:, 0], x[:, 0])
    for b in range(3):
        kept = index[b, 1:]
        assert kept.unique().numel() == kept.numel()               # no position twice
        # recompute the merge from the kept positions: each dropped token joins its most cosine-similar kept token
        tokens = x[b, 1:]
        dropped = torch.tensor([i for i in range(196) if i + 1 not in set(kept.tolist())])
        unit = tokens / tokens.norm(dim=-1, keepdim=True)
        owner = (unit[dropped] @ unit[kept - 1].T).argmax(-1)
        for row, pos in enumerate(kept.tolist()):
            members = [tokens[pos - 1]] + [tokens[d] for d in dropped[owner == row]]
            torch.testing.assert_close(out[b, 1 + row], torch.stack(members).mean(0), rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_merged_tokens():
    x = torch.randn(2, 197, 16, requires_grad=True)
    out, index = token_expansion(x, DEIT_S, 1)
    out.sum().backward()
    # every patch token is either kept or merged into a kept one, so every token gets a gradient
    assert (x.grad[:, 1:].abs().sum(-1) > 0).all()


def test_state_dict_and_outputs_identical_to_plain_timm_when_inactive():
    torch.manual_seed(0)
    plain = tiny_vit()
    patched = copy.deepcopy(plain)
    apply_toe(patched, DEIT_S)
    assert list(patched.state_dict()) == list(plain.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(v, patched.state_dict()[k])
    x = torch.randn(2, 3, 224, 224)
    plain.eval(), patched.eval()
    assert torch.equal(patched(x), plain(x))                       # evaluation: full tokens
    plain.train(), patched.train()
    set_epoch(patched, 250)                                        # last stage, keep rate 1.0: no-op
    assert torch.equal(patched(x), plain(x))
    # a checkpoint of the patched model loads into plain timm, and removing ToE restores the plain model
    fresh = tiny_vit()
    fresh.load_state_dict(patched.state_dict())
    set_epoch(patched, 0)
    remove_toe(patched)
    assert find_toe(patched) is None and torch.equal(patched(x), plain(x))


def test_active_in_training_only_unless_sparse_eval():
    model = tiny_vit()
    toe = apply_toe(model, DEIT_S)
    seen = capture_block_inputs(model, 1)
    set_epoch(model, 0)
    x = torch.randn(1, 3, 224, 224)
    model.eval()
    model(x)
    set_sparse_eval(model, True)
    model(x)
    assert [s.shape[1] for s in seen] == [197, 99]
    assert toe.kept_tokens(196) == 98


def test_grad_checkpointing_keeps_toe_and_gradients():
    torch.manual_seed(0)
    ref = tiny_vit()
    apply_toe(ref, DEIT_S)
    ckpt = copy.deepcopy(ref)
    ckpt.set_grad_checkpointing(True)
    seen = capture_block_inputs(ckpt, 1)
    x = torch.randn(2, 3, 224, 224)
    for m in (ref, ckpt):
        m.train()
        set_epoch(m, 0)
        m(x).sum().backward()
    assert seen and all(s.shape[1] == 99 for s in seen)
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_ema_copy_has_its_own_operator_and_follows_set_epoch():
    from timm.utils import ModelEmaV3
    model = tiny_vit()
    apply_toe(model, DEIT_S, sparse_eval=True)
    ema = ModelEmaV3(model, decay=0.9)
    assert find_toe(ema) is not find_toe(model)
    set_epoch(ema, 150)
    assert find_toe(ema).stage == 2 and find_toe(model).stage == 1
    seen = capture_block_inputs(ema.module, 1)
    ema.module(torch.randn(1, 3, 224, 224))        # EMA is in eval mode; sparse_eval keeps ToE on
    assert seen[0].shape[1] == 1 + 147


def test_schedule_rejects_impossible_settings():
    from toe import ScheduleError
    bad = [
        dict(keep_rates=(0.75, 0.5, 1.0)), dict(keep_rates=(0.5, 0.75, 1.5)), dict(keep_rates=(0.0, 0.5, 1.0)),
        dict(init_keep_rate=0.6), dict(expansion_steps=(0, 100, 100)), dict(expansion_steps=(0, 100)),
        dict(repeat_k=0), dict(distance="cos"),
    ]
    for kw in bad:
        with pytest.raises(ScheduleError):
            ToESchedule(**kw)


# ============================================================================================ pipeline ablations
ABLATIONS = [(i, e, m) for i in ("grid", "random") for e in ("farthest", "random", "none") for m in ("mean", "drop")]


def ablated(base=DEIT_S, **kw):
    args = dict(expansion_steps=base.expansion_steps, keep_rates=base.keep_rates, init_keep_rate=base.init_keep_rate,
                repeat_k=base.repeat_k, distance=base.distance)
    args.update(kw)
    return ToESchedule(**args)


def test_ablation_keys_default_to_the_published_method():
    from toe.method import ToEConfig
    cfg = ToEConfig()
    assert (cfg.init, cfg.expansion, cfg.merge) == ("grid", "farthest", "mean")
    s = cfg.schedule()
    assert s.published_selection and s.ablations == {} and s == DEIT_S
    # spelled out, the published settings take the published code path: bit-identical outputs
    x = torch.randn(2, 197, 16)
    explicit = ablated(init="grid", expansion="farthest", merge="mean")
    for stage in (1, 2):
        a, b = token_expansion(x, DEIT_S, stage), token_expansion(x, explicit, stage)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_ablation_choices_are_checked():
    from toe import ScheduleError
    for kw in (dict(init="uniform"), dict(expansion="nearest"), dict(merge="sum")):
        with pytest.raises(ScheduleError, match=list(kw)[0]):
            ablated(**kw)
    from config import ConfigError, build_config
    with pytest.raises(ConfigError, match="toe.expansion: 'far' is not one of farthest, random, none"):
        build_config(dict(epochs=300, toe=dict(expansion="far")))


@pytest.mark.parametrize("init,expansion,merge", ABLATIONS)
@pytest.mark.parametrize("base", [DEIT_S, ToESchedule((0, 100, 200), (0.4, 0.7, 1.0), 0.2, 2)])
def test_every_ablation_keeps_the_published_count_of_distinct_tokens(init, expansion, merge, base):
    s = ablated(base, init=init, expansion=expansion, merge=merge)
    x = torch.randn(3, 1 + 196, 8)
    for stage in (1, 2):
        out, index = token_expansion(x, s, stage)
        kept = base.kept_tokens(196, stage)
        assert out.shape == (3, 1 + kept, 8) and index.shape == (3, 1 + kept)
        assert (index[:, 0] == 0).all() and torch.equal(out[:, 0], x[:, 0])
        for b in range(3):
            assert index[b].unique().numel() == 1 + kept and (index[b, 1:] >= 1).all()


def _farthest_reference(unit, seeds, sizes):
    """Farthest-first expansion from the given seeds, one token at a time in plain Python (cosine scores)."""
    selected = list(seeds)
    for size in sizes:
        rest = [j for j in range(unit.shape[0]) if j not in selected]
        best = (unit[rest] @ unit[selected].T).max(1).values
        selected += [rest[i] for i in best.argsort()[:size].tolist()]
    return selected


def test_random_init_seeds_are_per_image_random_subsets_then_farthest_expansion():
    torch.manual_seed(0)
    s = ablated(init="random")
    x = torch.randn(4, 1 + 196, 16)
    out, index = token_expansion(x, s, 1)
    seeds = index[:, 1:1 + 49] - 1
    grid = torch.arange(0, 196, 4)
    assert all(torch.equal(seeds[b], seeds[b].sort().values) for b in range(4))     # raster order
    assert not any(torch.equal(seeds[b], grid) for b in range(4))
    assert len({tuple(seeds[b].tolist()) for b in range(4)}) == 4                     # one draw per image
    for b in range(4):
        unit = x[b, 1:] / x[b, 1:].norm(dim=-1, keepdim=True)
        expected = _farthest_reference(unit, seeds[b].tolist(), s.chunk_sizes(196, 1))
        assert (index[b, 1:] - 1).tolist() == expected


def test_random_expansion_adds_a_uniform_random_subset_of_the_non_seed_tokens():
    torch.manual_seed(0)
    s = ablated(expansion="random")
    x = torch.randn(600, 1 + 196, 4)
    _, index = token_expansion(x, s, 1)
    grid = torch.arange(0, 196, 4)
    assert torch.equal(index[:, 1:50] - 1, grid.expand(600, -1))                      # the published seeds
    added = index[:, 50:] - 1
    assert added.shape == (600, 49) and not torch.isin(added, grid).any()
    assert len({tuple(a.tolist()) for a in added[:10]}) == 10
    # every non-seed position is added with probability 49 / 147
    freq = torch.bincount(added.reshape(-1), minlength=196)[[i for i in range(196) if i % 4]].float() / 600
    assert (freq - 1 / 3).abs().max() < 0.1
    _, index2 = token_expansion(x[:2], s, 2)
    assert index2.shape[1] == 1 + 147 and torch.equal(index2[:, 1:50] - 1, grid.expand(2, -1))


def test_no_expansion_grid_keeps_seeds_plus_an_even_fill_independent_of_the_features():
    s = ablated(expansion="none")
    rest = [i for i in range(196) if i % 4]
    for stage, fill in ((1, 49), (2, 98)):
        expected = list(range(0, 196, 4)) + [rest[j * 147 // fill] for j in range(fill)]
        a = token_expansion(torch.randn(2, 197, 8), s, stage)[1]
        b = token_expansion(torch.randn(2, 197, 8), s, stage)[1]
        assert torch.equal(a, b) and (a[0, 1:] - 1).tolist() == expected and torch.equal(a[0], a[1])
    assert (token_expansion(torch.randn(1, 197, 8), s, 1)[1][0, 50:53] - 1).tolist() == [1, 5, 9]
    # random seeds and no expansion: a random kept set per image, seeds and the rest each in raster order
    torch.manual_seed(1)
    _, index = token_expansion(torch.randn(3, 197, 8), ablated(init="random", expansion="none"), 1)
    for b in range(3):
        seeds, rest_b = index[b, 1:50], index[b, 50:]
        assert torch.equal(seeds, seeds.sort().values) and torch.equal(rest_b, rest_b.sort().values)
    assert not torch.equal(index[0], index[1])


@pytest.mark.parametrize("init,expansion", [("grid", "farthest"), ("random", "random"), ("grid", "none")])
def test_drop_merging_discards_unselected_tokens(init, expansion):
    x = torch.randn(3, 1 + 196, 16, requires_grad=True)
    torch.manual_seed(0)
    out, index = token_expansion(x, ablated(init=init, expansion=expansion, merge="drop"), 1)
    assert torch.equal(out, torch.stack([x[b, index[b]] for b in range(3)]))           # rows as they were
    out.sum().backward()
    kept = torch.zeros(3, 197, dtype=torch.bool).scatter_(1, index, True)
    assert (x.grad[kept] == 1).all() and (x.grad[~kept] == 0).all()
    # with mean merging the same selection averages the unselected tokens in (so every token gets a gradient)
    torch.manual_seed(0)
    mean_out, mean_index = token_expansion(x, ablated(init=init, expansion=expansion), 1)
    assert torch.equal(mean_index, index) and not torch.equal(mean_out, out)


@pytest.mark.parametrize("init,expansion", [("random", "farthest"), ("grid", "random"), ("random", "none")])
def test_random_ablations_draw_from_the_default_generator_reproducibly(init, expansion):
    s = ablated(init=init, expansion=expansion)
    x = torch.randn(2, 197, 8)
    torch.manual_seed(5)
    a = token_expansion(x, s, 2)[1]
    state = torch.get_rng_state()
    torch.manual_seed(5)
    torch.rand(1)                         # a different position in the default generator's stream ...
    b = token_expansion(x, s, 2)[1]
    torch.manual_seed(5)
    c = token_expansion(x, s, 2)[1]      # ... and the same position again
    assert not torch.equal(a, b) and torch.equal(a, c) and torch.equal(torch.get_rng_state(), state)
    # the deterministic settings leave the generator alone
    before = torch.get_rng_state()
    token_expansion(x, ablated(expansion="none", merge="drop"), 1)
    token_expansion(x, DEIT_S, 1)
    assert torch.equal(torch.get_rng_state(), before)


def test_grad_checkpointing_redraws_the_same_random_tokens():
    s = ablated(init="random", expansion="random", merge="drop")
    torch.manual_seed(0)
    ref = tiny_vit()
    apply_toe(ref, s)
    ckpt = copy.deepcopy(ref)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 224, 224)
    kept = []
    for m in (ref, ckpt):
        m.train()
        set_epoch(m, 0)
        torch.manual_seed(7)
        m(x).sum().backward()
        kept.append(find_toe(m).kept_index)
    assert torch.equal(kept[0], kept[1])
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_ablation_configs_load_and_name_their_setting():
    import glob
    import os
    from config import load_config
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "ablations")
    paths = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert len(paths) >= 10
    for path in paths:
        cfg = load_config(path)
        assert cfg.active_methods() == ["toe"], path
        assert cfg.output_dir == "runs/ablations/" + os.path.basename(path)[:-5], path
        with open(path) as f:
            assert "# Ablation row:" in f.read(), path
        cfg.toe.schedule()
