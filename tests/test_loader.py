"""``loader: fast`` hands over uint8 images and finishes them on the device; its batches equal the ``reference``
loader's, whole batches, with every augmentation of the DeiT, CIFAR fine-tune, EfficientTrain and LV-ViT token-label
recipes on; an unreadable image is named or skipped as in ``reference``; a run stopped by SIGTERM resumes bit for bit.

Both loaders are real DataLoaders from ``datasets.build_loaders`` on the table configs, at small image sizes."""
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import load_config  # noqa: E402
from datasets import DatasetError, build_loaders  # noqa: E402
from fast_loader import (ERASE_MODES, SeededErasing, device_images, draw_erasing, erase_batch,  # noqa: E402
                         erase_per_sample, erasing_noise)
from tests.runs import image_tree  # noqa: E402

CONFIGS = os.path.join(ROOT, "configs")


def make_folder(root, classes=("ant", "bee", "cat"), per_class=4, size=(50, 38)):
    """An ImageFolder tree (train/ and val/) of random-content JPEGs and one PNG of another size."""
    def image(rng, i):
        w, h = (size[0] + 7, size[1] - 5) if i == 0 else size
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), f"{i}.png" if i == 0 else f"{i}.jpg"
    return str(image_tree(root, classes, {"train": per_class, "val": per_class}, image))


def loaders(path, *overrides, loader):
    cfg = load_config(os.path.join(CONFIGS, path), [*overrides, "--num_workers", "0", "--pin_memory", "false",
                                                    "--loader", loader])
    return cfg, build_loaders(cfg, 0, 1, cfg.seed)[0]


def same(a, b):
    """Equal batches, element for element (tensors exactly, mappings key by key)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_batches_equal(path, *overrides, epoch=1, batches=2):
    """The first ``batches`` of ``epoch`` from both loaders: the fast ones, finished on the device, equal the
    reference ones; returns how many samples were erased (so a test can insist that erasing ran)."""
    got = {}
    for loader in ("reference", "fast"):
        _, train = loaders(path, *overrides, loader=loader)
        train.sampler.set_epoch(epoch)
        got[loader] = [b for _, b in zip(range(batches), train)]
    erased = 0
    for ref, fast in zip(got["reference"], got["fast"]):
        assert torch.is_tensor(ref[0]) and ref[0].dtype == torch.float32
        assert fast[0]["uint8"].dtype == torch.uint8
        erased += int((fast[0]["boxes"][:, :, 2] > 0).any(dim=1).sum())
        images = device_images(fast[0], torch.device("cpu"))
        assert images.dtype == torch.float32 and torch.equal(images, ref[0])
        assert same(list(ref[1:]), list(fast[1:]))
    return erased


# ------------------------------------------------------------------------------------------------ the noise
def test_noise_is_standard_normal_and_streams_differ():
    keys = torch.tensor([[3], [4]], dtype=torch.int64)
    z = erasing_noise(keys, torch.arange(100_000))
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
    assert abs((z.abs() < 1).float().mean().item() - 0.6827) < 0.01 and z.abs().max() < 4.5     # its shape too
    assert abs(float(np.corrcoef(z[0].numpy(), z[1].numpy())[0, 1])) < 0.02
    assert torch.equal(erasing_noise(keys[1], torch.arange(50, 60)), z[1, 50:60])      # any slice alone


@pytest.mark.parametrize("mode", ERASE_MODES)
def test_batch_erasing_equals_the_per_sample_code(mode):
    """The GPU path (whole-batch kernels) computes the reference loader's numbers, checked here on the CPU; the
    second sample has no box, the third two overlapping ones."""
    boxes = torch.tensor([[[2, 3, 5, 7], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]], [[10, 1, 6, 4], [9, 0, 3, 12]]],
                         dtype=torch.int32)
    seeds = torch.tensor([11, 0, 2 ** 32 - 1])
    x = torch.randn(3, 3, 16, 12)
    a, b = x.clone(), x.clone()
    erase_per_sample(a, mode, boxes, seeds)
    erase_batch(b, mode, boxes, seeds)
    assert not torch.equal(a, x) and torch.equal(a[1], x[1])
    assert torch.equal(a, b)                  # integer hashing and a table lookup: the same bits on any device


def test_reference_erasing_draws_timms_boxes():
    """SeededErasing erases where timm's RandomErasing would, with the same draws of Python's random."""
    import random
    from timm.data.random_erasing import RandomErasing
    rer = RandomErasing(1.0, mode="const", max_count=3, device="cpu")
    for seed in range(20):
        random.seed(seed)
        timm_img = rer(torch.ones(3, 24, 20))
        random.seed(seed)
        ours = SeededErasing(rer)(torch.ones(3, 24, 20))
        assert torch.equal(timm_img, ours)
        random.seed(seed)
        boxes, noise_seed = draw_erasing(rer, 24, 20)
        assert 1 <= len(boxes) <= 3 and 0 <= noise_seed < 2 ** 32


# ------------------------------------------------------------------------------------------------ whole batches
@pytest.mark.parametrize("remode,recount", [("pixel", 1), ("rand", 3), ("const", 2)])
def test_deit_recipe_batches_equal(tmp_path, remode, recount):
    """DeiT-S: random-resized crop, flip, RandAugment m9, erasing (every sample, to see it), repeated augmentation."""
    tree = make_folder(tmp_path)
    erased = assert_batches_equal("deit_s.yaml", "--data_set", "folder", "--data_path", tree, "--input_size", "48",
                                  "--batch_size", "6", "--reprob", "1.0", "--remode", remode, "--recount", str(recount))
    assert erased >= 10


def test_cifar_finetune_recipe_batches_equal(tmp_path):
    from tests.test_datasets import write_cifar
    write_cifar(tmp_path)
    assert_batches_equal("cifar10_finetune.yaml", "--data_path", str(tmp_path), "--batch_size", "4", "--reprob", "1.0",
                         batches=1)


def test_efficienttrain_phase_batches_equal(tmp_path):
    """EfficientTrain's loader in a late phase: its own RandAugment magnitude (recipe.recipe_config)."""
    import dataclasses
    from methods import MethodSet
    from recipe import recipe_config, settings_at
    tree = make_folder(tmp_path)
    over = ["--data_set", "folder", "--data_path", tree, "--batch_size", "4", "--reprob", "1.0"]          # at 224 px
    cfg = load_config(os.path.join(CONFIGS, "deit_s_et.yaml"), over)
    last = settings_at(cfg, MethodSet.from_config(cfg), cfg.total_epochs() - 1)
    first = settings_at(cfg, MethodSet.from_config(cfg), 0)
    assert first.aa != last.aa and last.aa
    phase = recipe_config(dataclasses.replace(cfg, batch_size=4), last)
    assert_batches_equal("deit_s_et.yaml", *over, "--aa", phase.aa, batches=1)


@pytest.mark.parametrize("rand_augment", ["photometric", "published"])
def test_lvvit_token_label_batches_equal(tmp_path, rand_augment):
    """LV-ViT-S with token labels: the crop, flip and label maps are drawn by the token-label dataset (its own image
    transforms); the label dictionaries come out equal too."""
    import token_labels as tl
    tree = make_folder(tmp_path / "img")
    keys = sorted(os.path.relpath(os.path.join(b, f), os.path.join(tree, "train")).replace(os.sep, "/")
                  for b, _, fs in os.walk(os.path.join(tree, "train")) for f in fs)
    rng = np.random.default_rng(1)
    w = tl.LabelStoreWriter(str(tmp_path / "labels"), keys, 2, 4, 4, 3)
    w.write(list(range(len(keys))), rng.random((len(keys), 2, 4, 4)), rng.integers(0, 3, (len(keys), 2, 4, 4)))
    erased = assert_batches_equal("lvvit_s.yaml", "--data_set", "folder", "--data_path", tree, "--input_size", "64",
                                  "--token_label.data", str(tmp_path / "labels"), "--token_label.size", "4",
                                  "--batch_size", "4", "--reprob", "1.0", "--token_label.rand_augment", rand_augment)
    assert erased >= 4


def test_fast_hands_over_a_quarter_of_the_bytes(tmp_path):
    tree = make_folder(tmp_path)
    sizes = {}
    for loader in ("reference", "fast"):
        _, train = loaders("deit_s.yaml", "--data_set", "folder", "--data_path", tree, "--input_size", "64",
                           "--batch_size", "4", loader=loader)
        images = next(iter(train))[0]
        parts = images.values() if isinstance(images, dict) else [images]
        sizes[loader] = sum(t.numel() * t.element_size() for t in parts)
    assert 3.9 < sizes["reference"] / sizes["fast"] <= 4.0


def test_memory_is_pinned_only_for_a_run_on_the_gpu(tmp_path, monkeypatch):
    """Pinned memory serves the non-blocking copy to a GPU: a run on the CPU of a GPU machine does not pin."""
    tree = make_folder(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pinned = {}
    for device in ("cpu", "auto"):
        cfg = load_config(os.path.join(CONFIGS, "deit_s.yaml"), ["--data_set", "folder", "--data_path", tree,
                                                                  "--batch_size", "4", "--num_workers", "0",
                                                                  "--device", device])
        train, val, _ = build_loaders(cfg, 0, 1, cfg.seed)
        pinned[device] = (train.pin_memory, val.pin_memory)
    assert pinned == {"cpu": (False, False), "auto": (True, True)}


# ------------------------------------------------------------------------------------------------ bad images
def test_unreadable_image_is_named_or_skipped(tmp_path):
    tree = make_folder(tmp_path)
    bad = os.path.join(tree, "train", "bee", "2.jpg")
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    over = ["--data_set", "folder", "--data_path", tree, "--input_size", "32", "--batch_size", "4",
            "--repeated_aug", "false"]
    _, train = loaders("deit_s.yaml", *over, loader="fast")
    with pytest.raises(DatasetError, match=f"cannot read image {bad}"):
        list(train)
    _, train = loaders("deit_s.yaml", *over, "--skip_bad_images", "true", loader="fast")
    seen = []
    for images, _, indices in train:
        assert images["uint8"].shape[0] == len(indices) == images["boxes"].shape[0]
        seen += indices.tolist()
    bad_index = [p for p, _ in train.dataset.samples].index(bad)
    # 12 images in 3 batches of 4; the bad one's batch keeps 3, then 2 (mixup pairs the batch with its flip)
    assert bad_index not in seen and len(seen) == 10 and len(set(seen)) == 10


# ------------------------------------------------------------------------------------------------ whole runs
def test_fast_run_equals_reference_and_resumes_bit_for_bit(digits, tmp_path):
    """main.py with a worker, erasing, flips and RandAugment on: loader fast trains the weights loader reference
    trains; stopped by SIGTERM inside epoch 2 and resumed (persistent workers), it ends with the same weights and log."""
    import shutil
    from tests.runs import TOE_TWO_STAGES, assert_same_weights, read_log
    from tests.test_resume_fields import main_py, stopper, without_timings
    flags = ["--epochs", "2", "--num_workers", "1", "--reprob", "0.5", "--hflip", "0.5", "--aa", "rand-m9-mstd0.5-inc1",
             "--methods", "[toe]", *TOE_TWO_STAGES]
    runs = {}
    for name, extra, script in (("reference", ["--loader", "reference"], None), ("fast", [], None),
                                ("stopped", [], stopper(tmp_path, 1, 4))):
        runs[name] = res = main_py(digits, tmp_path / name, *flags, *extra, script=script)
        assert res.returncode == (3 if name == "stopped" else 0), res.stderr[-3000:]
    assert "stopped by SIGTERM at epoch 2/2" in runs["stopped"].stderr
    assert "loader fast x 1 workers" in runs["fast"].stdout + runs["fast"].stderr
    assert "loader reference x 1 workers" in runs["reference"].stdout + runs["reference"].stderr
    assert_same_weights(tmp_path / "reference", tmp_path / "fast")
    assert without_timings(read_log(tmp_path / "reference")) == without_timings(read_log(tmp_path / "fast"))
    shutil.copytree(tmp_path / "stopped", tmp_path / "resumed")
    res = main_py(digits, tmp_path / "resumed", *flags, "--resume", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_weights(tmp_path / "fast", tmp_path / "resumed")
    assert without_timings(read_log(tmp_path / "fast")) == without_timings(read_log(tmp_path / "resumed"))


def test_loader_benchmark_reports_every_setting_and_the_verdict(tmp_path, capsys):
    """scripts/loader_benchmark.py on generated JPEGs: the JSON holds per setting its images/s (in all and per worker),
    step times and bytes per sample, and cores per accelerator = the model's rate / one worker's images/s."""
    import json
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import loader_benchmark
    out = tmp_path / "loader.json"
    code = loader_benchmark.main(["--config", os.path.join(CONFIGS, "deit_s_toe.yaml"), "--make_images", "24",
                                  "--batch_size", "4", "--input_size", "64", "--batches", "2", "--rounds", "2",
                                  "--num_workers", "0", "1", "--step_samples", "3", "--settings", "reference", "fast",
                                  "--model_images_per_s", "1000", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    for name in ("reference", "fast"):
        r = result[name]
        assert r["images_per_s"] > 0 and r["images_per_s_per_worker"] == r["by_num_workers"]["1"]["images_per_s"]
        assert len(r["by_num_workers"]["0"]["rounds"]) == 2 and "decode" in r["step_ms"]
    assert "RandAugment" in result["reference"]["step_ms"] and "Uint8HandOver" in result["fast"]["step_ms"]
    assert result["reference"]["bytes_per_sample"] == 3 * 64 * 64 * 4 + 16              # float images, class, index
    assert 3.9 < result["fast_vs_reference"]["bytes_per_sample"] <= 4.0
    states = result["verdict"]
    assert [s["name"] for s in states][0] == "full tokens" and len(states) == 3           # ToE's two stages
    for s in states:
        for name in ("reference", "fast"):
            assert s["cores_per_accelerator"][name] == pytest.approx(
                s["images_per_s"] / result[name]["images_per_s_per_worker"])
    assert states[1]["images_per_s"] > states[0]["images_per_s"] == 1000
    assert "cores fast" in capsys.readouterr().out


def test_loader_benchmark_times_the_model_here_without_a_rate(tmp_path):
    """Without --model_images_per_s the model's rate is scripts/benchmark.py's measurement on this device."""
    import json
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import loader_benchmark
    out = tmp_path / "loader.json"
    code = loader_benchmark.main(["--config", os.path.join(CONFIGS, "deit_s.yaml"), "--make_images", "12",
                                  "--batch_size", "4", "--input_size", "32", "--batches", "1", "--rounds", "1",
                                  "--num_workers", "0", "--step_samples", "2", "--settings", "reference", "fast",
                                  "--model_kwargs", "{embed_dim: 32, depth: 1, num_heads: 2, patch_size: 8}",
                                  "--device", "cpu", "--bench_batch", "2", "--bench_steps", "1", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["model"]["source"].startswith("scripts/benchmark.py on ")
    (state,) = result["verdict"]
    assert state["name"] == "full tokens" and state["images_per_s"] > 0
    assert state["cores_per_accelerator"]["fast"] == pytest.approx(
        state["images_per_s"] / result["fast"]["images_per_s_per_worker"])
