"""End-to-end runs of main.py on the embedded digits data: outputs, checkpoints, recipes, fine-tuning.

Resume, signals, kills, two-process runs and bad inputs: tests/test_faults.py."""
import os
import subprocess
import sys

import pytest
import timm
import torch

import engine
import main as entry
from tests.runs import ROOT, TINY, load, read_log, runner

run = runner(*TINY)


def val_size(root):
    return sum(len(files) for _, _, files in os.walk(os.path.join(root, "val")))


def test_tiny_run_writes_every_output(digits, tmp_path, capsys):
    assert run(digits, tmp_path) == 0
    for name in ("config.yaml", "log.jsonl", "checkpoint.pth", "best.pth", "summary.json"):
        assert os.path.isfile(tmp_path / name), name
    assert any(f.startswith("events.") for f in os.listdir(tmp_path / "tensorboard"))
    log = read_log(tmp_path)
    assert [r["epoch"] for r in log] == [0, 1]
    assert [(r["toe_stage"], r["toe_kept_tokens"]) for r in log] == [(1, 8), (2, 16)]
    for key in ("train_loss", "train_lr", "train_images_per_s", "train_epoch_seconds", "val_acc1", "val_acc5",
                "val_ema_acc1", "best_acc1"):
        assert key in log[0], key
    assert log[0]["val_count"] == val_size(digits)        # the whole val split, evaluated once
    ckpt = load(tmp_path / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and isinstance(ckpt["config"], dict) and ckpt["config"]["toe"]["keep_rates"] == [0.5, 1.0]
    assert set(ckpt) >= {"model", "model_ema", "optimizer", "lr_scheduler", "scaler", "epoch", "config"}
    # the weights are plain timm weights
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4, embed_dim=32,
                              depth=2, num_heads=2)
    plain.load_state_dict(ckpt["model"])
    plain.load_state_dict(ckpt["model_ema"])
    out = capsys.readouterr().out
    assert "ToE: stage 1, kept_tokens 8" in out and "ToE: stage 2, kept_tokens 16" in out
    assert "outputs:" in out and "final val top-1" in out


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(digits, tmp_path, monkeypatch, capsys):
    real = engine.DistillationLoss.forward
    seen = {"epoch1": False}

    def nan_in_second_epoch(self, inputs, outputs, targets):
        loss = real(self, inputs, outputs, targets)
        return loss * float("nan") if seen["epoch1"] else loss

    monkeypatch.setattr(engine.DistillationLoss, "forward", nan_in_second_epoch)
    real_eval = entry.evaluate

    def mark(*a, **k):
        seen["epoch1"] = True
        return real_eval(*a, **k)

    monkeypatch.setattr(entry, "evaluate", mark)
    assert run(digits, tmp_path) == 1
    assert "loss is nan at epoch 1" in capsys.readouterr().err
    assert load(tmp_path / "checkpoint.pth")["epoch"] == 0
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_eval_only_and_checkpoint_from_another_model(digits, tmp_path, capsys):
    assert run(digits, tmp_path / "a") == 0
    ckpt = str(tmp_path / "a" / "best.pth")
    assert run(digits, tmp_path / "eval", "--eval", "true", "--resume", ckpt) == 0
    out = capsys.readouterr().out
    assert "eval model: top-1" in out and "eval ema: top-1" in out
    wider = ["--model_kwargs", "{patch_size: 4, embed_dim: 48, depth: 2, num_heads: 2}"]
    assert run(digits, tmp_path / "b", "--resume", ckpt, *wider) == 1
    assert "is from another model" in capsys.readouterr().err


def test_finetune_replaces_head_and_resamples_position_embedding(tmp_path):
    import checkpoint as ckpt_io
    src = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    dst = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    ckpt_io.save_checkpoint({"model": src.state_dict()}, str(tmp_path / "src.pth"))
    state = ckpt_io.model_state(ckpt_io.load_checkpoint(str(tmp_path / "src.pth")))
    report = ckpt_io.adapt_for_finetune(dst, state, "src.pth")
    assert sorted(report["dropped"]) == ["head.bias", "head.weight"]
    assert report["resampled"] and dst.pos_embed.shape == (1, 1 + 64, 32)
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])     # the class token's embedding is kept


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_distillation_with_a_local_teacher(digits, tmp_path, kind):
    teacher = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4, embed_dim=32,
                                depth=1, num_heads=2)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    code = run(digits, tmp_path / "run", "--model", "deit_tiny_distilled_patch16_224", "--epochs", "1",
               "--toe.expansion_steps", "[0]", "--toe.keep_rates", "[0.5]",
               "--distillation_type", kind, "--teacher_model", "vit_tiny_patch16_224",
               "--teacher_kwargs", "{img_size: 16, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}",
               "--teacher_path", str(tmp_path / "teacher.pth"))
    assert code == 0
    log = read_log(tmp_path / "run")
    assert log[0]["toe_kept_tokens"] == 8 and log[0]["train_loss"] > 0


def test_distillation_loss_terms():
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    teacher = torch.nn.Linear(3, 5)
    cls, dist = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    ce = torch.nn.CrossEntropyLoss()
    hard = engine.DistillationLoss(ce, teacher, "hard", alpha=0.5, tau=1.0)(x, (cls, dist), y)
    expected = 0.5 * ce(cls, y) + 0.5 * ce(dist, teacher(x).argmax(1))
    torch.testing.assert_close(hard, expected)
    tau = 2.0
    soft = engine.DistillationLoss(ce, teacher, "soft", alpha=0.3, tau=tau)(x, (cls, dist), y)
    p_t = torch.softmax(teacher(x) / tau, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(dist / tau, 1))).sum() * tau * tau / dist.numel()
    torch.testing.assert_close(soft, 0.7 * ce(cls, y) + 0.3 * kl)
    with pytest.raises(RuntimeError, match="distilled model"):
        engine.DistillationLoss(ce, teacher, "hard", 0.5, 1.0)(x, cls, y)


def test_full_deit_recipe_switches_together(digits, tmp_path, capsys):
    """RandAugment, mixup/cutmix, erasing, repeated augmentation, accumulation, clipping and checkpointing at once."""
    code = run(digits, tmp_path, "--epochs", "1", "--toe.expansion_steps", "[0]", "--toe.keep_rates", "[0.5]",
               "--aa", "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25",
               "--repeated_aug", "true", "--grad_accum_steps", "2", "--clip_grad", "1.0",
               "--grad_checkpointing", "true", "--batch_size", "32", "--hflip", "0.5")
    assert code == 0
    out = capsys.readouterr().out
    # lr 1e-3 for a batch of 64, scaled to the global batch 32 x 1 process x 2 accumulation steps = 64
    assert "lr 1.000e-03" in out and "accum 2" in out
    log = read_log(tmp_path)
    assert log[0]["toe_kept_tokens"] == 8 and log[0]["train_loss"] > 0


def test_lvvit_with_token_labels_and_toe_end_to_end(digits, tmp_path, capsys):
    """Labels from the generation script (a tiny timm teacher), then LV-ViT + token labeling + ToE through main.py."""
    from datasets import prepare_digits
    prepare_digits(digits)
    labels = str(tmp_path / "labels")
    gen = [sys.executable, os.path.join(ROOT, "scripts", "generate_token_labels.py"), os.path.join(digits, "train"),
           "--out", labels, "--model", "vit_tiny_patch16_224", "--img-size", "64", "--topk", "3",
           "--model-kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}', "--workers", "0", "--batch-size", "256"]
    res = subprocess.run(gen, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    code = entry.main([
        "--config", os.path.join(ROOT, "configs", "lvvit_t_toe.yaml"), "--data_set", "digits", "--data_path", digits,
        "--output_dir", str(tmp_path / "run"), "--input_size", "64", "--token_label.size", "4",
        "--token_label.data", labels, "--model_kwargs", "{embed_dim: 32, depth: 2, num_heads: 2, stem_chans: 8}",
        "--epochs", "2", "--toe.expansion_steps", "[0, 1]", "--toe.keep_rates", "[0.5, 1.0]",
        "--toe.init_keep_rate", "0.25", "--batch_size", "128", "--num_workers", "0", "--warmup_epochs", "1",
        "--aa", "rand-m9-mstd0.5-inc1", "--amp", "none", "--cooldown_epochs", "0"])
    assert code == 0, capsys.readouterr().err
    log = read_log(tmp_path / "run")
    assert [(r["toe_stage"], r["toe_kept_tokens"]) for r in log] == [(1, 8), (2, 16)]
    assert log[0]["val_count"] == val_size(digits) and log[-1]["train_loss"] > 0
    # a token-grid mismatch is caught before training
    code = entry.main(["--config", os.path.join(ROOT, "configs", "lvvit_t.yaml"), "--data_set", "digits",
                       "--data_path", digits, "--output_dir", str(tmp_path / "bad"), "--input_size", "64",
                       "--token_label.data", labels, "--num_workers", "0",
                       "--model_kwargs", "{embed_dim: 32, depth: 2, num_heads: 2, stem_chans: 8}",
                       "--amp", "none"])
    assert code == 2 and "token_label.size: 14 does not match" in capsys.readouterr().err


def test_finetune_through_main_at_another_resolution(digits, tmp_path, capsys):
    assert run(digits, tmp_path / "pre", "--epochs", "1", "--toe.expansion_steps", "[0]", "--toe.keep_rates", "[0.5]") == 0
    code = run(digits, tmp_path / "ft", "--finetune", str(tmp_path / "pre" / "checkpoint.pth"), "--input_size", "24",
               "--epochs", "1", "--toe", "none")
    assert code == 0
    out = capsys.readouterr().out
    assert "fine-tuning from" in out and "pos_embed (1, 17, 32) -> (1, 37, 32)" in out
    assert read_log(tmp_path / "ft")[0]["val_count"] == val_size(digits)
