"""Data pipeline: every data_set through a real DataLoader with DeiT's transforms, one-line errors, and the samplers."""
import os
import pickle
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import Config  # noqa: E402
from datasets import (DatasetError, RASampler, ShardSampler, build_dataset, build_loaders,  # noqa: E402
                      build_transform, check_num_classes, prepare_digits)
from tests.runs import image_tree  # noqa: E402


def make_cfg(tmp, **kw):
    base = dict(data_set="folder", data_path=str(tmp), input_size=32, batch_size=4, num_workers=0,
                pin_memory=False)
    base.update(kw)
    return Config(**base)


def make_folder(root, classes=("cat", "dog", "eel"), n_train=4, n_val=2):
    """A tiny ImageFolder tree with odd sizes, one grayscale image per class, and a JPEG."""
    def image(rng, i):
        shape = (20 + 3 * i, 27 + 2 * i) + (() if i == 0 else (3,))
        return rng.integers(0, 256, shape, dtype=np.uint8), f"{i}.png" if i == 0 else f"{i}.jpg"
    return image_tree(root, classes, {"train": n_train, "val": n_val}, image)


def write_cifar(root, hundred=False, n=8):
    """CIFAR files in torchvision's extracted-archive layout, with n images per batch file."""
    rng = np.random.default_rng(0)
    k = 100 if hundred else 10

    def dump(path, obj):
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    def batch():
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, k, n)]
        return data, labels

    if hundred:
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        for name in ("train", "test"):
            data, labels = batch()
            dump(d / name, {"data": data, "fine_labels": labels, "coarse_labels": [x // 5 for x in labels]})
        dump(d / "meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                          "coarse_label_names": [f"s{i}" for i in range(20)]})
    else:
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data, labels = batch()
            dump(d / name, {"data": data, "labels": labels})
        dump(d / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return d


def check_batches(loader, size, nb_classes, max_batches=2):
    from fast_loader import device_images
    seen = 0
    for batch in loader:
        x, y = batch[:2]
        if isinstance(x, dict):      # loader: fast (the default) hands over uint8 images, finished on the device
            assert x["uint8"].dtype == torch.uint8
            x = device_images(x, torch.device("cpu"))
        assert x.dtype == torch.float32 and x.shape[1:] == (3, size, size)
        assert x.shape[0] <= loader.batch_size and y.max() < nb_classes
        if len(batch) == 3:          # training batches end with the dataset indices of their samples
            assert batch[2].dtype == torch.long and 0 <= batch[2].min() and batch[2].max() < len(loader.dataset)
        seen += 1
        if seen == max_batches:
            break
    assert seen > 0


# ------------------------------------------------------------------------------------------------ datasets
@pytest.mark.parametrize("size", [32, 48])
def test_folder_loaders(tmp_path, size):
    make_folder(tmp_path)
    cfg = make_cfg(tmp_path, input_size=size, num_workers=1 if size == 32 else 0)
    train, val, n = build_loaders(cfg, rank=0, world_size=1, seed=0)
    assert n == 3 and len(val.dataset) == 6 and val.batch_size == 6
    assert isinstance(train.sampler, RASampler)
    train.sampler.set_epoch(1)
    check_batches(train, size, n)
    check_batches(val, size, n)
    assert train.dataset[0][0]["uint8"].shape == (size, size, 3)


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_loaders(tmp_path, hundred):
    write_cifar(tmp_path, hundred)
    cfg = make_cfg(tmp_path, data_set="cifar100" if hundred else "cifar10", input_size=40, repeated_aug=False)
    train, val, n = build_loaders(cfg, rank=1, world_size=2, seed=0)
    assert n == (100 if hundred else 10)
    assert len(train.dataset) == (8 if hundred else 40) and len(val.dataset) == 8
    assert isinstance(train.sampler, DistributedSampler)
    train.sampler.set_epoch(3)
    check_batches(train, 40, n)
    check_batches(val, 40, n)
    assert [len(val.sampler)] == [4]


def test_cifar_32px_keeps_deit_crop(tmp_path):
    """At input_size 32 the first op is a no-op resize then RandomCrop(32, padding=4); eval leaves 32 px as is."""
    write_cifar(tmp_path)
    cfg = make_cfg(tmp_path, data_set="cifar10", aa=None, reprob=0.0)
    t = build_transform(cfg, is_train=True)
    assert type(t.transforms[1]).__name__ == "RandomCrop" and t.transforms[1].padding == 4
    ds, _ = build_dataset(cfg, is_train=False)
    raw = np.asarray(ds.data[0], dtype=np.float32) / 255.0
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    mean, std = np.array(IMAGENET_DEFAULT_MEAN), np.array(IMAGENET_DEFAULT_STD)
    expected = torch.from_numpy(((raw - mean) / std).transpose(2, 0, 1)).float()
    assert torch.allclose(ds[0][0], expected, atol=1e-5)


def test_digits_tree_built_once_and_loads(tmp_path):
    root = tmp_path / "digits"
    cfg = make_cfg(root, data_set="digits", input_size=32, batch_size=64, nb_classes=10)
    train, val, n = build_loaders(cfg, rank=0, world_size=1, seed=0)
    assert n == 10
    counts = {s: sum(len(f) for _, _, f in os.walk(root / s)) for s in ("train", "val")}
    assert counts["train"] + counts["val"] == 1797 and 350 <= counts["val"] <= 370
    assert len(train.dataset) == counts["train"] and len(val.dataset) == counts["val"]
    from sklearn.datasets import load_digits
    digits = load_digits()
    totals = Counter(digits.target.tolist())
    assert Counter(val.dataset.targets) == {c: totals[c] // 5 for c in range(10)}   # every 5th of each class
    img = Image.open(root / "train" / str(digits.target[0]) / "0.png")
    assert img.size == (8, 8) and img.mode == "L"
    assert np.array_equal(np.asarray(img), np.round(digits.images[0] * 255 / 16).astype(np.uint8))
    stamp = os.stat(root / "train").st_mtime_ns
    build_dataset(cfg, is_train=True)
    assert os.stat(root / "train").st_mtime_ns == stamp
    assert len(train) == (counts["train"] // 256 * 256) // 64          # RA epoch: 1280 samples -> 20 batches
    check_batches(train, 32, 10, max_batches=1)
    check_batches(val, 32, 10, max_batches=1)


def test_digits_losing_the_race(tmp_path, monkeypatch):
    """Another rank (torchrun) renames its tree into place first: ours is discarded, one whole tree remains."""
    root = str(tmp_path / "digits")
    real_rename = os.rename

    def other_rank_wins(src, dst):
        monkeypatch.setattr(os, "rename", real_rename)
        prepare_digits(dst)                     # the other rank finishes while we were writing
        real_rename(src, dst)                   # ours now fails: dst is not empty

    monkeypatch.setattr(os, "rename", other_rank_wins)
    prepare_digits(root)
    assert os.rename is real_rename             # our rename really was attempted and lost
    assert sorted(os.listdir(tmp_path)) == ["digits"]
    assert sum(len(f) for _, _, f in os.walk(root)) == 1797


def test_small_images_upsample(tmp_path):
    cfg = make_cfg(tmp_path, input_size=32)
    img = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("RGB")
    for is_train in (True, False):
        assert build_transform(cfg, is_train)(img).shape == (3, 32, 32)
    cfg = make_cfg(tmp_path, input_size=64)
    for is_train in (True, False):
        assert build_transform(cfg, is_train)(img).shape == (3, 64, 64)


def test_posterize_zero_bits_is_black(tmp_path):
    """RandAugment at level 10 keeps 0 bits; Pillow >= 13 rejects that, so the transform must return black instead."""
    t = build_transform(make_cfg(tmp_path, aa="rand-m10-mstd0-inc1"), is_train=True)
    ops = [op for op in t.transforms[3].ops if op.name == "PosterizeIncreasing"]
    assert len(ops) == 1
    ops[0].prob = 1.0
    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(ops[0](img)).max() == 0
    t = build_transform(make_cfg(tmp_path, aa="rand-m0-mstd0-inc0"), is_train=True)
    op = [op for op in t.transforms[3].ops if op.name == "Posterize"][0]
    op.prob = 1.0
    assert np.asarray(op(img)).max() == 0


# ------------------------------------------------------------------------------------------------ errors
def test_missing_data_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=str(missing)):
        build_dataset(make_cfg(missing), is_train=True)


def test_missing_split_dir(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match=str(tmp_path / "val")):
        build_dataset(make_cfg(tmp_path), is_train=False)


def test_empty_trees(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match=f"no images found under {tmp_path / 'train'}"):
        build_dataset(make_cfg(tmp_path), is_train=True)
    (tmp_path / "train" / "a").mkdir()
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=str(tmp_path / "train")):
        build_dataset(make_cfg(tmp_path), is_train=True)


def test_train_val_classes_must_match(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "val" / "fox").mkdir()
    Image.new("RGB", (9, 9)).save(tmp_path / "val" / "fox" / "0.png")
    with pytest.raises(DatasetError, match=r"train \(3 classes\) and .*val \(4 classes\), e.g. fox"):
        build_dataset(make_cfg(tmp_path), is_train=True)


def test_wrong_nb_classes(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(DatasetError, match=r"nb_classes: config says 1000 but the dataset has 3"):
        build_dataset(make_cfg(tmp_path, nb_classes=1000), is_train=True)
    assert check_num_classes(None, 7) == 7 and check_num_classes(7, 7) == 7


def test_corrupt_image_names_path(tmp_path):
    make_folder(tmp_path, n_train=1, n_val=1)
    bad = tmp_path / "val" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    ds, _ = build_dataset(make_cfg(tmp_path), is_train=False)
    with pytest.raises(DatasetError, match=f"cannot read image {bad}"):
        for i in range(len(ds)):
            ds[i]


@pytest.mark.parametrize("data_set,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing(tmp_path, data_set, folder):
    with pytest.raises(DatasetError, match=f"expected {tmp_path / folder}/.*downloads are off"):
        build_dataset(make_cfg(tmp_path, data_set=data_set), is_train=True)


def test_cifar_unreadable(tmp_path):
    d = write_cifar(tmp_path)
    (d / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=f"cannot read CIFAR files in {d}"):
        build_dataset(make_cfg(tmp_path, data_set="cifar10"), is_train=True)


def test_batch_larger_than_epoch(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(DatasetError, match="batch_size: 64"):
        build_loaders(make_cfg(tmp_path, batch_size=64), rank=0, world_size=1, seed=0)


# ------------------------------------------------------------------------------------------------ samplers
def test_ra_sampler_two_ranks():
    data = range(1000)
    samplers = [RASampler(data, num_replicas=2, rank=r, repeats=3, seed=5) for r in range(2)]
    per_rank = [list(s) for s in samplers]
    assert [len(p) for p in per_rank] == [384, 384] == [len(s) for s in samplers]   # floor(1000//256*256 / 2)
    stream = [i for pair in zip(*per_rank) for i in pair]          # rank0, rank1, rank0, ... = repeated order
    runs = [stream[k:k + 3] for k in range(0, len(stream), 3)]
    assert all(len(set(run)) == 1 for run in runs)                  # each sample appears 3 times in a row ...
    assert len({run[0] for run in runs}) == len(runs)               # ... and only in its own run
    assert set(Counter(per_rank[0] + per_rank[1]).values()) == {3}
    assert set(per_rank[0]) == set(per_rank[1])                     # the copies of a sample span both ranks
    first = list(samplers[0])
    for s in samplers:
        s.set_epoch(1)
    assert list(samplers[0]) != first and len(list(samplers[0])) == 384
    samplers[0].set_epoch(0)
    assert list(samplers[0]) == first                               # deterministic per (seed, epoch)


def test_ra_sampler_single_process_and_small_dataset():
    s = RASampler(range(600), num_replicas=1, rank=0, repeats=3)
    idx = list(s)
    assert len(idx) == 512 and all(idx[k] == idx[k + 1] == idx[k + 2] for k in range(0, 510, 3))
    s = RASampler(range(10), num_replicas=2, rank=1, repeats=3)
    assert len(s) == 5 and len(list(s)) == 5                        # never an empty epoch
    s = RASampler(range(7), num_replicas=1, rank=0, repeats=3)
    assert len(list(s)) == 7


@pytest.mark.parametrize("n,world", [(10, 3), (7, 1), (2, 4)])
def test_shard_sampler_disjoint_and_exact(n, world):
    shards = [list(ShardSampler(range(n), world, r)) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n)) and len(set(flat)) == n
    assert all(ShardSampler(range(n), world, r).dataset_len == n for r in range(world))


@pytest.mark.parametrize("kind", ["ra", "shuffle"])
def test_start_position_skips_samples_and_seeds_follow_the_position(kind):
    """A resumed epoch skips what was trained; every other sample keeps its index and its augmentation seed."""
    from datasets import ShuffleSampler
    data = range(100)
    make = (lambda: RASampler(data, 2, 1, repeats=3, seed=4)) if kind == "ra" else (lambda: ShuffleSampler(data, 2, 1, seed=4))
    s = make()
    s.sample_seeds = True
    s.set_epoch(3)
    full = list(s)
    assert all(isinstance(i, int) and isinstance(seed, int) for i, seed in full)
    assert len({seed for _, seed in full}) == len(full)                 # repeated copies get their own seeds
    s.set_indices(list(range(0, 100, 2)))
    subset = list(s)
    s.set_start(10)
    assert list(s) == subset[10:] and len(s) == len(subset) - 10
    s.set_epoch(4)
    assert s.start == 0 and len(list(s)) == len(subset)


def test_seeded_samples_repeat_and_leave_the_main_generators_alone(tmp_path):
    import random
    from datasets import WithIndex
    make_folder(tmp_path)
    ds, _ = build_dataset(make_cfg(tmp_path), is_train=True)
    ds = WithIndex(ds)
    torch.manual_seed(0)
    random.seed(0)
    before = (torch.get_rng_state(), random.getstate())
    a, b, c = ds[(3, 11)], ds[(3, 11)], ds[(3, 12)]
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0]) and a[-1] == 3
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]


def test_skipped_images_leave_the_batch(tmp_path):
    from datasets import BadImage, SkippingCollate
    batch = [(torch.zeros(2), 0, 5), BadImage("x.png"), (torch.ones(2), 1, 6), (torch.ones(2), 2, 7)]
    images, labels, index = SkippingCollate(even=True)(batch)
    assert images.shape == (2, 2) and index.tolist() == [5, 6]
    with pytest.raises(DatasetError, match="every image of a batch is unreadable, e.g. x.png"):
        SkippingCollate()([BadImage("x.png")])


@pytest.mark.parametrize("toe", [False, True], ids=["plain", "toe"])
def test_cifar_finetune_end_to_end_with_and_without_toe(tmp_path, toe, capsys):
    """An ImageNet-style checkpoint (another head) fine-tuned on CIFAR-10 batch files through main.py with the
    shipped fine-tuning configs: without ToE, and with ToE during the fine-tune (cifar10_finetune_toe.yaml)."""
    import json
    import main as entry
    from config import load_config
    from methods import MethodSet
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    write_cifar(tmp_path / "cifar", n=16)
    name = "cifar10_finetune_toe.yaml" if toe else "cifar10_finetune.yaml"
    common = ["--model_kwargs", "{patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}", "--input_size", "16",
              "--num_workers", "0", "--amp", "none", "--batch_size", "16", "--warmup_epochs", "1", "--epochs", "2",
              "--repeated_aug", "false"]
    pre = load_config(os.path.join(root, "configs", "cifar10_finetune.yaml"), common + ["--nb_classes", "100"])
    model = entry.build_model(pre, 100, MethodSet([]))
    torch.save({"model": model.state_dict(), "epoch": 299}, tmp_path / "imagenet.pth")
    extra = ["--toe.expansion_steps", "[0, 1]", "--toe.keep_rates", "[0.5, 1.0]", "--toe.init_keep_rate", "0.25"]
    code = entry.main(["--config", os.path.join(root, "configs", name), "--data_path", str(tmp_path / "cifar"),
                       "--output_dir", str(tmp_path / "run"), "--finetune", str(tmp_path / "imagenet.pth"), *common,
                       *(extra if toe else [])])
    assert code == 0, capsys.readouterr().err
    assert "fine-tuning from" in capsys.readouterr().out
    with open(tmp_path / "run" / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [r["epoch"] for r in log] == [0, 1] and log[0]["val_count"] == 16
    if toe:
        assert [(r["toe_stage"], r["toe_kept_tokens"]) for r in log] == [(1, 8), (2, 16)]
    else:
        assert "toe_stage" not in log[0]
