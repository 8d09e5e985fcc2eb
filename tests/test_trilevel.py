"""Tri-Level E-ViT against the authors' reference outputs (``trilevel_reference.pt``), case by case, plus the
properties the fixture cannot pin: the live-model patch (off = plain timm, gradients, grad checkpointing, prefix
tokens, refusals) and the example selector's bookkeeping (duplicates, checkpoints, gathering)."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer

from models.tokens import find_positions, restore_grid
from tests.reference import load_reference
from trilevel import (ExampleLevel, ExampleSelector, KeepSchedule, RatioSchedule, TriLevelBlock, TriLevelConfigError,
                      apply_trilevel, cls_attention, find_trilevel, forgetting_statistics, masked_attention,
                      masked_attention_reference,
                      presentation_stats, prune_tokens, remove_trilevel, set_dense_eval, set_enabled, set_ratios,
                      swap_epochs, token_counts)

ENV_VAR = "TRILEVEL_REFERENCE"
CASES = load_reference("trilevel_reference.pt", ENV_VAR)     # $TRILEVEL_REFERENCE, ../shared/fixtures, tests/fixtures
IDS = [f"{i}-{c.get('kind')}" for i, c in enumerate(CASES)]


# ---------------------------------------------------------------------------------------------- fixture cases
def check_keep_schedule(c):
    epochs, steps = c["epoch"].tolist(), c["step"].tolist()
    for key, target in (("token_keep_ratio", c["keep_ratio"]), ("attn_keep_ratio", c["attn_ratio"])):
        sched = KeepSchedule(target, c["iterations_per_epoch"], c["warmup_epochs"], c["decay_epochs"])
        got = torch.tensor([sched(e, s) for e, s in zip(epochs, steps)], dtype=torch.float64)
        assert torch.equal(got, c[key]), key
    both = RatioSchedule(c["keep_ratio"], c["attn_ratio"], c["warmup_epochs"], c["decay_epochs"])
    pairs = [both.at(e, s, c["iterations_per_epoch"]) for e, s in zip(epochs, steps)]
    want = torch.stack([c["token_keep_ratio"], c["attn_keep_ratio"]], 1)
    assert torch.equal(torch.tensor(pairs, dtype=torch.float64), want)


def tiny_vit(grid, depth=12, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    kwargs = {"embed_dim": 16, "num_heads": 2, "num_classes": 5, **kwargs}
    return VisionTransformer(img_size=(2 * grid[0], 2 * grid[1]), patch_size=2, in_chans=1, depth=depth, **kwargs)


def run_counting(model, images):
    """Forward ``images``; return patch tokens entering each block, the mask each block saw, and the output."""
    state, seen = find_trilevel(model), []

    def pre(block, args):
        seen.append((args[0].shape[1] - state.num_prefix_tokens, state.mask_before(block._trilevel_index)))
    handles = [b.register_forward_pre_hook(pre) for b in model.blocks]
    out = model.forward_features(images)
    for h in handles:
        h.remove()
    return seen, out


def check_stage_counts(c):
    counts = token_counts(c["num_patches"], c["keep_ratio"], c["attn_ratio"], c["pruning_loc"], c["depth"])
    assert counts.tokens_in == c["tokens_in"] and counts.tokens_out == c["tokens_out"]
    assert counts.mask_size == c["mask_size"] and counts.mask_all_ones == c["mask_all_ones"]
    assert c["grid"][0] * c["grid"][1] == c["num_patches"]
    model = tiny_vit(c["grid"], c["depth"])
    apply_trilevel(model, c["keep_ratio"], c["attn_ratio"], c["pruning_loc"])
    for training in (True, False):       # training at ratios set from outside; evaluation at the targets
        model.train(training)
        set_ratios(model, c["keep_ratio"], c["attn_ratio"])
        with torch.no_grad():
            seen, out = run_counting(model, torch.randn(1, 1, 2 * c["grid"][0], 2 * c["grid"][1]))
        assert [n for n, _ in seen] == c["tokens_in"]
        assert out.shape[1] - 1 == c["tokens_out"]
        for (n, mask), size, ones in zip(seen, c["mask_size"], c["mask_all_ones"]):
            if mask is None:
                assert ones
            else:
                assert mask.shape == (1, size, size)
                assert bool((mask == 1).all()) == ones


def check_token_prune(c):
    x, attn, r, a = c["x"], c["attn"], c["keep_ratio"], c["attn_ratio"]
    assert x.shape[1] == attn.shape[-1] == c["num_patches"] + 1 and attn.shape[1] == c["num_heads"]
    assert x.shape[2] == c["dim"] and c["stage"] in (1, 2)
    assert torch.equal(cls_attention(attn), c["cls_attn"])
    out, index, mask = prune_tokens(x, attn, r, a)
    assert index.shape == (x.shape[0], c["num_keep_tokens"]) and mask.shape[-1] == c["num_keep_tokens"] + 1
    assert int(mask[:, 1:, 1:].sum(-1).min()) >= c["num_keep_attn"]     # a threshold keeps at least k_a per row
    if c["tied_pairs"]:
        # the members of an identical pair may come out in either order: the same scores in the same order and,
        # the members being identical tokens, the same output rows and the same mask
        assert torch.equal(c["cls_attn"].gather(1, index), c["cls_attn"].gather(1, c["index"]))
    else:
        assert torch.equal(index, c["index"])
    assert torch.equal(out, c["out"])
    assert torch.equal(mask, c["attn_mask"])
    assert bool((mask[:, 0] == 1).all()) and bool((mask[:, :, 0] == 1).all())    # the CLS row and column


def check_masked_attention(c):
    logits, mask = c["logits"], c["mask"]
    assert logits.shape[-1] == c["num_tokens"] and logits.shape[1] == c["num_heads"] and isinstance(c["note"], str)
    out = masked_attention(logits, mask, c["eps"])
    # one float32 ulp: the authors' expression run verbatim on this machine differs from the fixture by as much
    torch.testing.assert_close(out, c["out"], rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(out.sum(-1), torch.ones_like(out[..., 0]))
    if bool((mask == 1).all()):
        assert torch.equal(masked_attention(logits, None, c["eps"]), out)


def present_round_robin(selector, case, with_cls=True):
    """Present the examples in rounds (round p: every example with a p-th presentation, in ``example_ids`` order),
    so the order of first presentation is ``example_ids``; the batch size varies, the statistics do not care."""
    rows = list(zip(case["example_ids"], case["acc"], case["loss"], case["margin"], case["cls_var"]))
    for p in range(max(len(acc) for _, acc, *_ in rows)):
        live = [r for r in rows if len(r[1]) > p]
        selector.record([r[0] for r in live], [r[1][p] for r in live],
                        cls_var=[r[4][p] for r in live] if with_cls else None,
                        loss=[r[2][p] for r in live], margin=[r[3][p] for r in live])


def check_forgetting(c):
    ids, n = c["example_ids"], c["npresentations"]
    assert len(ids) == len(c["acc"]) == len(c["loss"]) == len(c["margin"]) == len(c["cls_var"])

    def check_stats(stats):
        assert stats.counts.tolist() == c["forgetting_count"]
        assert [stats.forgetting_presentations(i) for i in range(len(ids))] == c["forgetting_presentations"]
        assert [None if f < 0 else f for f in stats.first_learned.tolist()] == c["first_learned"]
        assert stats.presentations_needed.tolist() == c["presentations_needed_to_learn"]
    check_stats(forgetting_statistics(c["acc"], n))

    train = c["train_before"] if c["train_before"] is not None else ids
    pool = c["pool_before"] if c["pool_before"] is not None else []
    seed = c["np_seed"] if c["np_seed"] is not None else 0
    for tie_break in ("none", "cls_var"):
        level = ExampleLevel(remove_n=c["remove_n"], keep_lowest_n=c["keep_lowest_n"], npresentations=n,
                             tie_break=tie_break)
        sel = ExampleSelector(level, train, pool, seed=seed, keep_history=True)
        present_round_robin(sel, c)
        assert sel.presented_ids().tolist() == ids and sel.history[ids[0]][0][2] == c["margin"][0][0]
        check_stats(sel.forgetting()[1])
        order, counts = sel.ordered()
        cut = slice(c["keep_lowest_n"], c["keep_lowest_n"] + c["remove_n"])
        removed = order[cut]
        if tie_break == "none":
            assert counts.tolist() == c["sorted_counts"]
            assert set(c["removed_certain"]) <= set(removed.tolist())
            for group in c["removed_tie_groups"]:
                assert len(set(group["pool"]) & set(removed.tolist())) == group["n"]
                assert set(group["pool"]) == {i for i, k in zip(ids, c["forgetting_count"]) if k == group["count"]}
            assert len(removed) == len(c["removed_certain"]) + sum(g["n"] for g in c["removed_tie_groups"])
            if c["removed_ids"] is not None:
                assert sorted(removed.tolist()) == c["removed_ids"]
        else:
            assert order.tolist() == c["cls_order"] and counts.tolist() == c["cls_sorted_counts"]
        if c["np_seed"] is None:          # the reference ran no swap for this case
            assert all(c[k] is None for k in ("train_before", "pool_before", "restored_ids", "pool_after",
                                              "train_after_removal", "train_size_after", "pool_size_after",
                                              "putback_batch_after", "example_stats_reset", "cls_removed_ids",
                                              "cls_train_after_removal", "cls_pool_after"))
            continue
        result = sel.swap()
        assert result.restored.tolist() == c["restored_ids"]
        kept = np.setdiff1d(np.asarray(train), removed)
        assert sel.train_ids.tolist() == kept.tolist() + c["restored_ids"]
        assert len(sel.train_ids) == c["train_size_after"] and len(sel.pool_ids) == c["pool_size_after"]
        assert sel.swaps_done == c["putback_batch_after"]
        assert (len(sel.presented_ids()) == 0) == c["example_stats_reset"]
        rest = max(0, len(pool) - c["keep_lowest_n"] - len(c["restored_ids"]))
        if tie_break == "none":
            if c["train_after_removal"] is not None:
                assert kept.tolist() == c["train_after_removal"]
            if c["pool_after"] is not None:
                # removal order inside a group of equal counts is numpy's unstable argsort in the reference
                assert sel.pool_ids[:rest].tolist() == c["pool_after"][:rest]
                assert sorted(sel.pool_ids[rest:].tolist()) == sorted(c["pool_after"][rest:])
            assert sel.pool_ids[rest:].tolist() == removed.tolist()
        else:
            assert sorted(removed.tolist()) == c["cls_removed_ids"]
            assert kept.tolist() == c["cls_train_after_removal"]
            assert sel.pool_ids.tolist() == c["cls_pool_after"]


def check_swap_epochs(c):
    assert swap_epochs(c["epochs"]) == c["swap_epochs"]
    sel = ExampleSelector(ExampleLevel(), [0, 1], [2])
    fired = []
    for epoch in range(c["epochs"]):
        if sel.should_swap(epoch):
            sel.swap(epoch)
            fired.append(epoch)
    assert fired == c["swap_epochs"]


CHECKS = {"keep_schedule": check_keep_schedule, "stage_counts": check_stage_counts, "token_prune": check_token_prune,
          "masked_attention": check_masked_attention, "forgetting": check_forgetting, "swap_epochs": check_swap_epochs}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_case(case):
    assert case.get("kind") in CHECKS, f"fixture case of unknown kind {case.get('kind')!r}"
    assert "ZLKong/Tri-Level-ViT" in case.get("source", "")
    CHECKS[case["kind"]](case)


def test_reference_is_not_empty():
    assert isinstance(CASES, list) and CASES, "the Tri-Level reference fixture holds no cases"


# ---------------------------------------------------------------------------------------------- the live patch
def images(grid=(4, 4), batch=2):
    return torch.randn(batch, 1, 2 * grid[0], 2 * grid[1], generator=torch.Generator().manual_seed(1))


def test_off_equals_plain_timm_exactly():
    plain = tiny_vit((4, 4), depth=4)
    model = copy.deepcopy(plain)
    x = images()
    for mode in (True, False):
        plain.train(mode), model.train(mode)
        want = plain(x)
        state = apply_trilevel(model, 0.5, 0.5, pruning_loc=(1, 2))
        set_ratios(model, 0.5, 0.5)
        assert not torch.equal(model(x), want)
        set_enabled(model, False)
        assert torch.equal(model(x), want)
        set_enabled(model, True)
        state.dense_shortcut = True
        set_ratios(model, 1.0, 1.0)
        if mode:
            assert torch.equal(model(x), want)
        set_dense_eval(model, True)
        if not mode:
            assert torch.equal(model(x), want)
        remove_trilevel(model)
        assert all(type(b) is Block for b in model.blocks) and find_trilevel(model) is None
        assert torch.equal(model(x), want)
    assert list(model.state_dict()) == list(plain.state_dict())


def test_masked_attention_backward_matches_the_published_chain():
    """The closed-form backward (with the row-maximum path) against autograd through the published expression."""
    gen = torch.Generator().manual_seed(3)
    for dtype, sparse in ((torch.float64, False), (torch.float64, True), (torch.float32, True), (torch.bfloat16, True)):
        logits = (torch.randn(2, 3, 9, 9, generator=gen) * 4).to(dtype).requires_grad_()
        mask = (torch.rand(2, 9, 9, generator=gen) > 0.6).float() if sparse else None
        if mask is not None:
            mask[:, 0], mask[:, :, 0] = 1, 1
        grad = torch.randn(2, 3, 9, 9, generator=gen)
        fast, ref = masked_attention(logits, mask), masked_attention_reference(logits, mask)
        assert torch.equal(fast, ref) and fast.dtype == torch.float32          # the forward is the published one
        (g_fast,), (g_ref,) = (torch.autograd.grad(y, logits, grad) for y in (fast, ref))
        assert g_fast.dtype == dtype
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(g_fast.float(), g_ref.float(), rtol=tol, atol=tol)


def test_ratio_one_masked_form_is_close_to_softmax():
    plain = tiny_vit((4, 4), depth=4).train()
    model = copy.deepcopy(plain)
    apply_trilevel(model, 1.0, 1.0, pruning_loc=(1, 2))
    x = images()
    out = model(x)
    assert not torch.equal(out, plain(x))            # the published form, not a softmax ...
    torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-5)    # ... within eps of it


def test_gradients_checkpointing_and_positions():
    model = tiny_vit((4, 4), depth=6).train()
    apply_trilevel(model, 0.7, 0.3, pruning_loc=(1, 3))
    set_ratios(model, 0.6, 0.4)
    x = images()
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["blocks.5.mlp.fc1.weight"].abs().sum() > 0 and grads["pos_embed"].abs().sum() > 0
    positions = find_positions(model)
    assert sorted(positions.sites) == [1.5, 3.5]
    first, second = positions.sites[1.5], positions.sites[3.5]
    assert first.shape == (2, 1 + 10) and second.shape == (2, 1 + 6)        # ceil(16 * 0.6), ceil(10 * 0.6)
    assert (first[:, 0] == 0).all() and (second[:, 0] == 0).all()
    composed = positions.before()
    assert composed.shape == (2, 7) and all(len(set(row)) == 7 for row in composed.tolist())
    tokens = model.forward_features(x)
    assert restore_grid(tokens, positions.before(), 17).shape == (2, 17, 16)

    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)
    assert torch.equal(positions.sites[3.5], second)

    with torch.autocast("cpu", dtype=torch.bfloat16):       # AMP: ranking in float32, products in bfloat16
        out = model(x)
    assert out.dtype == torch.bfloat16 and positions.sites[3.5].shape == (2, 7)
    out.float().sum().backward()


def test_prefix_tokens_are_kept_and_refusals():
    for kwargs, prefix in (({"reg_tokens": 2}, 3), ({}, 1)):
        model = tiny_vit((4, 4), depth=4, **kwargs).train()
        state = apply_trilevel(model, 0.5, 0.5, pruning_loc=(1,))
        assert state.num_prefix_tokens == prefix
        set_ratios(model, 0.5, 0.5)
        out = model.forward_features(images())
        assert out.shape[1] == prefix + 8
        kept = find_positions(model).sites[1.5]
        assert kept[:, :prefix].tolist() == [list(range(prefix))] * 2 and (kept[:, prefix:] >= prefix).all()
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=16,
                                  depth=4, num_heads=2, num_classes=5)
    apply_trilevel(distilled, 0.5, 0.5, pruning_loc=(1,))
    set_ratios(distilled.train(), 0.5, 0.5)
    distilled.set_distilled_training(True)
    cls, dist = distilled(torch.randn(2, 3, 32, 32))
    assert cls.shape == dist.shape == (2, 5) and find_positions(distilled).sites[1.5].shape == (2, 2 + 8)

    for kwargs in ({"class_token": False, "global_pool": "avg"}, {"global_pool": "avg"}):
        with pytest.raises(TriLevelConfigError, match=r"^trilevel: [^\n]*CLS") as err:
            apply_trilevel(tiny_vit((4, 4), depth=4, **kwargs))
        assert "\n" not in str(err.value)
    model = tiny_vit((4, 4), depth=4)
    for kwargs, key in (({"keep_ratio": 0.0}, "keep_ratio"), ({"attn_ratio": 1.5}, "attn_ratio"),
                        ({"pruning_loc": (1, 4)}, "pruning_loc"), ({"pruning_loc": (2, 1)}, "pruning_loc")):
        with pytest.raises(TriLevelConfigError, match=rf"^trilevel\.{key} "):
            apply_trilevel(model, **kwargs)
    assert all(type(b) is Block for b in model.blocks)
    apply_trilevel(model, pruning_loc=(1,))
    with pytest.raises(TriLevelConfigError, match="already"):
        apply_trilevel(model, pruning_loc=(1,))


def test_ema_copy_and_checkpoint_roundtrip():
    model = tiny_vit((4, 4), depth=4).train()
    apply_trilevel(model, 0.5, 0.5, pruning_loc=(1, 2))
    ema = copy.deepcopy(model)
    assert type(ema.blocks[0]) is TriLevelBlock and find_trilevel(ema) is not find_trilevel(model)
    assert ema.blocks[3]._trilevel is find_trilevel(ema)
    set_ratios(model, 0.5, 0.5)
    assert find_trilevel(ema).keep_ratio == 1.0
    ema.eval()
    assert ema.forward_features(images()).shape[1] == 1 + 4          # evaluation at the targets: 16 -> 8 -> 4
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    plain = tiny_vit((4, 4), depth=4)
    plain.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))


# ---------------------------------------------------------------------------------------------- the example level
def test_presentation_stats_under_mixup():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.1, 0.3, 0.2], [1.0, 1.0, -1.0]])
    labels = torch.tensor([0, 0, 1])          # the examples' own classes: what "correct" means under mixup too
    correct, margin = presentation_stats(logits, labels)
    assert correct.tolist() == [True, False, False]
    assert torch.allclose(margin, torch.tensor([1.0, -0.2, 0.0]))


def test_duplicates_in_a_batch_are_sequential_presentations():
    rng = np.random.RandomState(0)
    level = ExampleLevel(remove_n=5, npresentations=10, tie_break="cls_var")
    batched, single = (ExampleSelector(level, np.arange(40), np.arange(40, 50), seed=3) for _ in range(2))
    for _ in range(6):
        ids = rng.randint(0, 40, size=24)            # repeated augmentation puts an id several times in a batch
        correct, var = rng.rand(24) > 0.4, rng.rand(24)
        batched.record(torch.from_numpy(ids), torch.from_numpy(correct), cls_var=torch.from_numpy(var))
        for i, c, v in zip(ids, correct, var):
            single.record([i], [c], cls_var=[v])
    assert batched.presented_ids().tolist() == single.presented_ids().tolist()
    assert [a.tolist() for a in batched.ordered()] == [a.tolist() for a in single.ordered()]
    seen = batched.presented_ids()
    np.testing.assert_allclose(batched.mean_cls_var(seen), single.mean_cls_var(seen))


def test_state_dict_roundtrip_size_and_gathering():
    rng = np.random.RandomState(1)
    level = ExampleLevel(remove_n=100, keep_lowest_n=2)
    make = lambda: ExampleSelector.from_dataset_size(level, 5000, seed=7)
    sel, half_a, half_b = make(), make(), make()
    assert len(sel.train_ids) == 4000 and len(sel.pool_ids) == 1000
    for _ in range(35):
        ids = rng.permutation(sel.train_ids)[:2000]
        correct = rng.rand(ids.size) > 0.3
        sel.record(ids, correct)
        (half_a if _ % 2 else half_b).record(ids, correct)
    buffer = io.BytesIO()
    torch.save(sel.state_dict(), buffer)
    assert len(buffer.getvalue()) < 16 * 5000 + 50_000      # ~13 bytes per example: ~13 MB for ImageNet
    restored = make()
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert [a.tolist() for a in restored.ordered()] == [a.tolist() for a in sel.ordered()]
    a, b = sel.swap(30), restored.swap(30)
    assert a.removed.tolist() == b.removed.tolist() and a.restored.tolist() == b.restored.tolist()
    assert sel.train_ids.tolist() == restored.train_ids.tolist() and len(a.dropped) == 2

    # disjoint shards gathered by export/import give every example its full statistics
    shard_a, shard_b = make(), make()
    ids = rng.permutation(4000)
    for step in range(8):
        c = rng.rand(4000) > 0.5
        shard_a.record(ids[:2000], c[:2000])
        shard_b.record(ids[2000:], c[2000:])
        sel.record(ids, c)
    shard_a.import_stats(shard_b.export_stats())
    _, want = sel.forgetting()
    got_ids, got = shard_a.forgetting()
    assert sorted(got_ids.tolist()) == sorted(sel.presented_ids().tolist())
    want_counts = dict(zip(sel.presented_ids().tolist(), want.counts.tolist()))
    assert dict(zip(got_ids.tolist(), got.counts.tolist())) == want_counts


def test_example_level_errors_name_the_key():
    for kwargs, key in (({"remove_n": -1}, "remove_n"), ({"npresentations": 0}, "npresentations"),
                        ({"tie_break": "loss"}, "tie_break"), ({"initial_removal": 1.0}, "initial_removal")):
        with pytest.raises(TriLevelConfigError, match=rf"^trilevel\.{key} "):
            ExampleLevel(**kwargs)
