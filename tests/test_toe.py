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
