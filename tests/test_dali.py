"""``loader: dali``: DALI's training pipeline on the CPU (``device_id=None``), skipped where DALI is not installed,
and the one-line refusal where it is not (that test always runs)."""
import math
import sys

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import dali_augment as aug
from config import Config
from datasets import DatasetError, sample_seed, seeded
from exits import EXIT_CONFIG
from dali_loader import Spec
from fast_loader import draw_erasing
from tests.runs import TINY_MODEL, image_tree, one_line, read_log, runner

SIZE = 40          # above 32 px: DeiT's random-resized-crop path
# one epoch of the demo config's plain recipe on the tiny ViT (16 px: the small-image path), 11 iterations
ONE_EPOCH = [*TINY_MODEL, "--epochs", "1", "--methods", "[]", "--num_workers", "1", "--batch_size", "128",
             "--warmup_epochs", "0", "--print_freq", "5"]


def jpeg_folder(root, classes=("ant", "bee", "cow"), n_train=8, n_val=2):
    """An ImageFolder tree of photo-sized random JPEGs of a few sizes."""
    return image_tree(root, classes, {"train": n_train, "val": n_val}, lambda rng, i: (
        rng.integers(0, 256, (48 + 5 * i, 64 + 3 * i, 3), dtype=np.uint8), f"{i}.jpg"))


def dali_cfg(root, **kw):
    base = dict(data_set="folder", data_path=str(root), input_size=SIZE, batch_size=4, num_workers=1,
                pin_memory=False, device="cpu", repeated_aug=False, aa="rand-m9-mstd0.5-inc1", reprob=0.0,
                hflip=0.5, loader="dali")
    base.update(kw)
    return Config(**base)


def loaders(cfg, rank=0, world=1, seed=0, epoch=0):
    from dali_loader import build_dali_loaders
    train, val, nb = build_dali_loaders(cfg, rank, world, seed)
    train.sampler.set_epoch(epoch)
    return train, val, nb


def first_batch(train):
    return next(iter(train))


# ------------------------------------------------------------------------------------------------ without DALI
def test_missing_dali_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)        # what find_spec sees where DALI is not installed
    out = tmp_path / "run"
    code = runner(*ONE_EPOCH)(str(tmp_path / "data"), out, "--loader", "dali")
    assert code == EXIT_CONFIG
    assert one_line(capsys.readouterr().err).endswith("pip install -r requirements-dali.txt")
    assert not out.exists()


def test_rand_augment_plan_follows_timm():
    plan = aug.rand_augment_plan("rand-m9-mstd0.5-inc1")
    assert (plan.num_layers, plan.magnitude, plan.magnitude_std, plan.prob, plan.num_bins) == (2, 9.0, 0.5, 0.5, 101)
    assert "PosterizeIncreasing" in plan.ops and len(plan.ops) == 15
    assert aug.rand_augment_plan(None) is None
    with pytest.raises(aug.AugmentError, match="aa: 'v0' is an AutoAugment/AugMix policy"):
        aug.rand_augment_plan("v0")
    _, rotate, _ = aug.TIMM_TO_DALI["Rotate"]
    _, posterize, _ = aug.TIMM_TO_DALI["PosterizeIncreasing"]
    assert math.isclose(rotate(0.9), 27.0) and posterize(0.9) == 1 and posterize(1.0) == 0


# ------------------------------------------------------------------------------------------------ with DALI (CPU)
def test_batch_shape_range_and_labels(tmp_path):
    pytest.importorskip("nvidia.dali")
    train, _, nb = loaders(dali_cfg(jpeg_folder(tmp_path)))
    samples = train.dataset.samples
    lo = min((0 - m) / s for m, s in zip(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    seen = []
    for images, labels, indices in train:
        assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
        assert labels.dtype == indices.dtype == torch.int64
        assert images.min() >= lo - 1e-4 and images.max() <= hi + 1e-4 and images.std() > 0.1
        assert labels.tolist() == [samples[i][1] for i in indices.tolist()]
        seen += indices.tolist()
    assert len(train) == 6 and sorted(seen) == list(range(24)) and nb == 3


def test_erasing_fills_the_seeded_boxes(tmp_path):
    pytest.importorskip("nvidia.dali")
    cfg = dali_cfg(jpeg_folder(tmp_path), reprob=1.0, remode="const", aa=None, hflip=0.0)
    train, _, _ = loaders(cfg, seed=3, epoch=2)
    images, _, _ = first_batch(train)
    rer = Spec.from_config(cfg).erasing
    for position, image in enumerate(images):
        with seeded(sample_seed(3, 2, 0, position)):          # the boxes drawn for the sample at this position
            (top, left, h, w), = draw_erasing(rer, SIZE, SIZE)[0]
        assert torch.all(image[:, top:top + h, left:left + w] == 0)        # const mode: zeros after normalising
        assert int((image == 0).sum()) == 3 * h * w > 0                    # and nowhere else


def test_ranks_get_disjoint_shards(tmp_path):
    pytest.importorskip("nvidia.dali")
    cfg = dali_cfg(jpeg_folder(tmp_path), batch_size=3, aa=None)
    shards = []
    for rank in (0, 1):
        train, _, _ = loaders(cfg, rank=rank, world=2)
        shards.append([i for _, _, idx in train for i in idx.tolist()])
    assert len(shards[0]) == len(shards[1]) == 12
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(24))


def test_repeated_augmentation_augments_each_copy(tmp_path):
    pytest.importorskip("nvidia.dali")
    cfg = dali_cfg(jpeg_folder(tmp_path), batch_size=3, aa=None, repeated_aug=True, ra_repeats=3)
    images, _, indices = first_batch(loaders(cfg)[0])        # one process: the 3 copies of a sample in one batch
    assert len(set(indices.tolist())) == 1
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])


def test_subset_and_same_seed_same_batch(tmp_path):
    pytest.importorskip("nvidia.dali")
    cfg = dali_cfg(jpeg_folder(tmp_path), reprob=0.5, remode="pixel", aa="rand-m9-inc1")   # quicker to define
    a, b = (loaders(cfg, seed=5)[0] for _ in range(2))
    for loader in (a, b):
        loader.sampler.set_indices(list(range(0, 24, 2)))
    (xa, ya, ia), (xb, yb, ib) = list(a)[0], first_batch(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    assert all(i % 2 == 0 for i in ia.tolist()) and len(a) == 3
    for loader in (a, b):                   # the same samples again, after a whole pass and after one left early:
        loader.sampler.set_epoch(0)         # the pipeline goes on, its generators too
        x_again, _, i_again = first_batch(loader)
        assert torch.equal(i_again, ia) and not torch.equal(x_again, xa)
    assert len(list(b)) == 3 and b.feed.left == 0


def test_unreadable_image_names_its_file(tmp_path):
    pytest.importorskip("nvidia.dali")
    root = jpeg_folder(tmp_path)
    bad = root / "train" / "bee" / "3.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    train, _, _ = loaders(dali_cfg(root, batch_size=24, aa=None))
    with pytest.raises(DatasetError, match=f"cannot read image {bad}"):
        first_batch(train)


def test_refused_combinations_one_line(tmp_path):
    pytest.importorskip("nvidia.dali")
    from dali_loader import config_problem
    root = jpeg_folder(tmp_path)
    assert config_problem(dali_cfg(root)) is None
    assert "use loader: fast" in config_problem(dali_cfg(root, data_set="cifar10"))
    assert "skip_bad_images" in config_problem(dali_cfg(root, skip_bad_images=True))
    assert config_problem(dali_cfg(root, aa="augmix-m5")).startswith("aa: 'augmix-m5'")


def test_demo_runs_end_to_end(digits, tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "run"
    assert runner(*ONE_EPOCH, "--loader", "dali")(digits, out) == 0
    assert (out / "checkpoint.pth").exists()


def test_stop_and_resume(digits, tmp_path):
    """Stopped by SIGTERM inside epoch 2 and resumed, a dali run trains every iteration of both epochs once (the
    resumed pass starts where the sampler stopped; its augmentations are DALI's new draws, so no weights check)."""
    pytest.importorskip("nvidia.dali")
    import shutil
    from tests.test_resume_fields import main_py, stopper
    flags = ["--epochs", "2", "--num_workers", "1", "--methods", "[]", "--loader", "dali"]
    res = main_py(digits, tmp_path / "stopped", *flags, script=stopper(tmp_path, 1, 4))
    assert res.returncode == 3 and "stopped by SIGTERM at epoch 2/2" in res.stderr, res.stderr[-3000:]
    assert "loader dali x 1 workers" in res.stdout + res.stderr
    shutil.copytree(tmp_path / "stopped", tmp_path / "resumed")
    res = main_py(digits, tmp_path / "resumed", *flags, "--resume", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    log = read_log(tmp_path / "resumed")
    assert [r["epoch"] for r in log] == [0, 1] and [r["global_step"] for r in log] == [11, 22]
