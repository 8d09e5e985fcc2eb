"""Datasets, DeiT's transforms, repeated-augmentation sampling and the train/val loaders.

    train_loader, val_loader, nb_classes = build_loaders(cfg, rank, world_size, seed)
    for epoch in range(start, cfg.epochs):
        train_loader.sampler.set_epoch(epoch)      # reshuffles; the same seed must be passed on every rank
        train_loader.sampler.set_start(position)   # a resumed epoch: skip the samples already trained

``data_set`` picks the source: ``imagenet`` / ``folder`` (an ImageFolder tree with ``train/`` and ``val/``),
``cifar10`` / ``cifar100`` (torchvision's extracted python archives, never downloaded) or ``digits`` (scikit-learn's
bundled 8x8 digits, written once as an ImageFolder tree so the demo runs the same code path as ImageNet).
Every data mistake stops with one :class:`DatasetError` line that names the path or config key (an unreadable image
names its file, also from a loader worker); ``skip_bad_images`` leaves such images out instead, counted in the log.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import shutil
import signal
import sys
import tempfile
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate, get_worker_info
from torchvision import datasets, transforms
from torchvision.datasets.folder import find_classes, has_file_allowed_extension

from extensions import ExtensionSet
from files import first_line
from fast_loader import hand_over, loader_options


class DatasetError(ValueError):
    """A data mistake; ``str(err)`` is the one line shown to the user."""


# ------------------------------------------------------------------------------------------------ transforms
def build_transform(cfg, is_train: bool):
    """DeiT's transforms: timm's training pipeline, and Resize(size / eval_crop_ratio) + CenterCrop for eval.

    For ``input_size <= 32`` DeiT swaps the random-resized crop for RandomCrop(size, padding=4) and evaluates
    uncropped; we resize to ``input_size`` first, which is a no-op on 32 px CIFAR and upsamples the 8 px digits.
    """
    size = cfg.input_size
    small = size <= 32
    bicubic = transforms.InterpolationMode.BICUBIC
    if is_train:
        from timm.data import create_transform
        t = create_transform(size, is_training=True, color_jitter=cfg.color_jitter, auto_augment=cfg.aa,
                             interpolation=cfg.train_interpolation, re_prob=cfg.reprob, re_mode=cfg.remode,
                             re_count=cfg.recount, scale=tuple(cfg.crop_scale), hflip=cfg.hflip)
        if small:
            t.transforms[0:1] = [transforms.Resize(size, interpolation=bicubic),
                                 transforms.RandomCrop(size, padding=4)]
        return fix_posterize(t)
    resize = size if small else int(size / cfg.eval_crop_ratio)
    return transforms.Compose([
        transforms.Resize(resize, interpolation=bicubic),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def fix_posterize(t):
    """Swap timm's posterize for :func:`_posterize` inside any RandAugment / AutoAugment of ``t``."""
    for op in _augment_ops(t):
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return t


def _augment_ops(t) -> list:
    """The AugmentOps inside timm's RandAugment / AutoAugment / AugMix in a Compose."""
    ops = []
    for aug in getattr(t, "transforms", []):
        ops += list(getattr(aug, "ops", []))
        ops += [op for sub in getattr(aug, "policy", []) for op in sub]
    return [op for op in ops if hasattr(op, "aug_fn") and hasattr(op, "name")]


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with old Pillow's answer for 0 bits kept: a black image.

    RandAugment's magnitude noise reaches level 10, where timm asks to keep 0 bits; Pillow >= 13 raises ValueError
    there instead of returning zeros, which would stop training at a random step.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


# ------------------------------------------------------------------------------------------------ datasets
def load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader, but a broken file names itself instead of surfacing as a bare PIL traceback."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # noqa: BLE001 -- any decoder failure becomes one message that names the file
        raise DatasetError(f"cannot read image {path}: {first_line(e)}") from None


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder (same classes, same sample order) that enters no directory twice.

    torchvision walks class folders following links, so a link loop (``c3/again -> .``) is read again and again,
    until the OS gives up, and multiplies that class. Directories are told apart by device and inode: a loop, or a
    second link to a folder already read, is left out and listed in ``skipped_dirs``; links to image files, and
    class folders that are links to folders elsewhere (common for ImageNet), are read as before.
    """

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        if (extensions is None) == (is_valid_file is None):
            raise ValueError("exactly one of extensions and is_valid_file must be given")
        valid = is_valid_file or (lambda path: has_file_allowed_extension(path, extensions))
        self.skipped_dirs, seen = [], {_dir_id(directory)}
        samples, found = [], set()
        for name in sorted(class_to_idx):
            top = os.path.join(directory, name)
            if not os.path.isdir(top) or not self._enter(top, seen):
                continue
            for base, files in sorted(self._walk(top, seen)):
                for path in (os.path.join(base, f) for f in sorted(files)):
                    if valid(path):
                        samples.append((path, class_to_idx[name]))
                        found.add(name)
        empty = sorted(set(class_to_idx) - found)
        if empty and not allow_empty:
            skipped = f" (skipped as already read: {', '.join(self.skipped_dirs[:3])})" if self.skipped_dirs else ""
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}{skipped}")
        return samples

    def _enter(self, path: str, seen: set) -> bool:
        """Whether ``path`` is a directory not read yet (and now marked as read)."""
        key = _dir_id(path)
        if key in seen:
            self.skipped_dirs.append(path)
            return False
        seen.add(key)
        return True

    def _walk(self, top: str, seen: set):
        """``os.walk(top, followlinks=True)`` as (directory, file names), pruned of directories already read."""
        for base, dirs, files in os.walk(top, followlinks=True):
            # sorted: of two ways into one folder, every run keeps the same one
            dirs[:] = [d for d in sorted(dirs) if self._enter(os.path.join(base, d), seen)]
            yield base, files


def _dir_id(path: str) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _check_data_path(root: str) -> None:
    """A data_path that exists but is no directory is named as such, not reported missing."""
    if os.path.exists(root) and not os.path.isdir(root):
        kind = "a file" if os.path.isfile(root) else "not a regular file or folder"
        raise DatasetError(f"data_path {root} is {kind}, not a directory; point it at the dataset's folder")


def _image_folder(root: str, split: str, transform, warn: bool = True) -> datasets.ImageFolder:
    path = os.path.join(root, split)
    if not os.path.isdir(root):
        raise DatasetError(f"data_path {root} does not exist")
    if os.path.isfile(path):
        raise DatasetError(f"split directory {path} is a file, not a directory (expected {root}/train and {root}/val)")
    if not os.path.isdir(path):
        raise DatasetError(f"split directory {path} does not exist (expected {root}/train and {root}/val)")
    try:
        ds = _ImageFolder(path, transform=transform, loader=load_rgb)
    except FileNotFoundError as e:       # no class dirs, or a class dir without images
        raise DatasetError(f"no images found under {path}: {first_line(e)}") from None
    if ds.skipped_dirs and warn:
        shown = ", ".join(os.path.relpath(d, path) for d in ds.skipped_dirs[:3])
        more = f" and {len(ds.skipped_dirs) - 3} more" if len(ds.skipped_dirs) > 3 else ""
        print(f"warning: {path}: skipped {len(ds.skipped_dirs)} link(s) to a folder already read (a link loop or a "
              f"second link to the same folder): {shown}{more}", file=sys.stderr, flush=True)
    other = os.path.join(root, "val" if split == "train" else "train")
    if os.path.isdir(other):             # a label index must mean the same class in both splits
        try:
            other_classes = find_classes(other)[0]
        except FileNotFoundError:
            other_classes = []
        if other_classes != ds.classes:
            train, val = (ds.classes, other_classes) if split == "train" else (other_classes, ds.classes)
            diff = sorted(set(train) ^ set(val))[:5]
            raise DatasetError(f"class folders differ between {root}/train ({len(train)} classes) and {root}/val "
                               f"({len(val)} classes), e.g. {', '.join(diff)}")
    return ds


class _LocalCIFAR10(datasets.CIFAR10):
    """CIFAR-10 read from disk without MD5 checks.

    torchvision hashes every batch file against the published archive on each construction; those hashes guard a
    download, and we never download. A corrupt file still fails when it is unpickled, with the directory named.
    """
    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _LocalCIFAR100(datasets.CIFAR100):
    """CIFAR-100 read from disk without MD5 checks (see :class:`_LocalCIFAR10`)."""
    train_list = [[name, None] for name, _ in datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR100.test_list]
    meta = {**datasets.CIFAR100.meta, "md5": None}


def _cifar(cls, root: str, is_train: bool, transform):
    folder = os.path.join(root, cls.base_folder)
    needed = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [n for n in needed if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise DatasetError(f"{cls.__bases__[0].__name__} files not found: expected {folder}/ with {', '.join(needed)} "
                           f"(missing {', '.join(missing)}; downloads are off, extract the python archive there)")
    try:
        return cls(root, train=is_train, transform=transform, download=False)
    except Exception as e:  # noqa: BLE001 -- unpickling errors come in many types
        raise DatasetError(f"cannot read CIFAR files in {folder}: {type(e).__name__}: {e}") from None


def prepare_digits(root: str) -> None:
    """Write scikit-learn's 1,797 digits once as ``root/{train,val}/<digit>/<i>.png`` (every 5th of a class to val).

    The tree is built in a temporary sibling directory and renamed into place, so ranks that start together never
    see half a tree: the first rename wins and the others discard their copy.
    """
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        return
    if os.path.isdir(root) and os.listdir(root):
        raise DatasetError(f"data_path {root} exists but holds no digits tree (train/, val/); "
                           f"point data_path at an empty or new directory")
    import numpy as np
    from sklearn.datasets import load_digits
    digits = load_digits()
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".digits-", dir=parent)
    try:
        seen = [0] * 10
        for i, (img, label) in enumerate(zip(digits.images, digits.target)):
            split = "val" if seen[label] % 5 == 4 else "train"
            seen[label] += 1
            out = os.path.join(tmp, split, str(label))
            os.makedirs(out, exist_ok=True)
            pixels = np.round(img * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(out, f"{i}.png"))
        try:
            os.rename(tmp, root)           # atomic; replaces an empty directory, fails if another rank won
        except OSError:
            if not os.path.isdir(os.path.join(root, "val")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_num_classes(cfg_nb_classes: Optional[int], dataset_classes: int) -> int:
    """The class count to build the head with: the dataset's, which a set ``nb_classes`` must agree with."""
    if cfg_nb_classes is not None and cfg_nb_classes != dataset_classes:
        raise DatasetError(f"nb_classes: config says {cfg_nb_classes} but the dataset has {dataset_classes} classes; "
                           f"set nb_classes: {dataset_classes} or leave it empty")
    return dataset_classes


def build_dataset(cfg, is_train: bool, warn: bool = True, extensions=None) -> Tuple[Dataset, int]:
    """The ``train`` (or ``val``) split of ``cfg.data_set`` with DeiT's transforms, and its class count; ``warn``:
    print what the folder walk skipped (one process of a run says it). The training split goes through the config's
    extensions (``extensions``: an :class:`extensions.ExtensionSet`, else the one ``cfg`` describes)."""
    transform = build_transform(cfg, is_train)
    root = cfg.data_path
    _check_data_path(root)
    if cfg.data_set == "cifar10":
        ds = _cifar(_LocalCIFAR10, root, is_train, transform)
    elif cfg.data_set == "cifar100":
        ds = _cifar(_LocalCIFAR100, root, is_train, transform)
    elif cfg.data_set in ("imagenet", "folder", "digits"):
        if cfg.data_set == "digits":
            prepare_digits(root)
        ds = _image_folder(root, "train" if is_train else "val", transform, warn)
    else:
        raise DatasetError(f"data_set: unknown dataset '{cfg.data_set}' (imagenet, folder, cifar10, cifar100, digits)")
    nb_classes = check_num_classes(cfg.nb_classes, len(ds.classes))
    if is_train:
        ds = (extensions if extensions is not None else ExtensionSet.from_config(cfg)).train_dataset(ds, cfg)
    return ds, nb_classes


# ------------------------------------------------------------------------------------------------ samplers
def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The seed of one training sample's augmentation: a function of where it is drawn (splitmix64 of the run seed,
    epoch, rank and position in the rank's stream), so skipping trained batches on resume, or any number of
    loader workers, leaves every other sample's augmentation unchanged."""
    x = (((seed * 1_000_003 + epoch) * 1_000_033 + rank) * 1_000_037 + position) & 0xFFFFFFFFFFFFFFFF
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1                    # 63 bits: a valid torch seed


@contextlib.contextmanager
def seeded(seed: int):
    """Seed random, numpy and torch's CPU generator for one sample. In a loader worker the global state is the
    worker's own; in the main process (``num_workers: 0``) the training's generator states are put back after."""
    saved = None if get_worker_info() is not None else (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class BadImage:
    """What :class:`SkipBadImages` returns for an unreadable image; the loader's collate leaves it out."""

    def __init__(self, reason: str):
        self.reason = reason


class SkipBadImages(Dataset):
    """``skip_bad_images: true``: an unreadable image becomes a :class:`BadImage` (left out of its batch and counted in
    the log, with one warning line naming the file) instead of stopping the run."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except DatasetError as e:
            print(f"warning: skipping an image (skip_bad_images): {e}", file=sys.stderr, flush=True)
            return BadImage(str(e))

    def __getattr__(self, name: str):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SkippingCollate:
    """torch's ``default_collate`` without the :class:`BadImage` entries; ``even``: drop one more sample when that
    leaves an odd batch (mixup/cutmix pair each image with the batch flipped)."""

    def __init__(self, even: bool = False):
        self.even = even

    def __call__(self, batch):
        good = [b for b in batch if not isinstance(b, BadImage)]
        if len(good) < len(batch):
            if not good:
                bad = next(b for b in batch if isinstance(b, BadImage))
                raise DatasetError(f"every image of a batch is unreadable, e.g. {bad.reason}")
            if self.even and len(good) % 2:
                good = good[:-1]
        return default_collate(good)


def _worker_init(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which saves a checkpoint and shuts them down (a
    Ctrl-C reaches the whole process group; Slurm's SIGTERM reaches every process of the job)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_EXIT_HOOK = False


def _kill_leftover_workers() -> None:
    """At interpreter exit, before multiprocessing's own hook (which stops daemonic children with SIGTERM, which our
    workers ignore, and then waits for them): kill the daemonic children it would stop, the loader workers an
    unfinished or persistent iterator left behind (a started Process no longer holds its target to tell them by)."""
    import multiprocessing
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)        # torch's handler would report the kill as a worker failure
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()


def _register_exit_hook() -> None:
    global _EXIT_HOOK
    if not _EXIT_HOOK:
        import atexit
        import multiprocessing.util        # registers its hook now, so ours (registered after it) runs before it
        atexit.register(_kill_leftover_workers)
        _EXIT_HOOK = True


class WithIndex(Dataset):
    """A training set whose samples end with their dataset index, so methods that select examples can key their
    per-example statistics through augmentation, mixup and repeated augmentation.

    Indexed with ``(index, seed)`` (what the training samplers yield for the trainer's loader), the sample's
    augmentation is drawn from generators seeded with ``seed`` (:func:`seeded`)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            i, seed = key
            with seeded(seed):
                sample = self.dataset[i]
        else:
            i, sample = key, self.dataset[key]
        if isinstance(sample, BadImage):
            return sample
        return (*sample, i) if isinstance(sample, tuple) else (sample, i)

    def __getattr__(self, name: str):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class _SubsetMixin:
    """What the training samplers share: a subset of the dataset's indices chosen per epoch by a method
    (``set_indices``), a start position in the epoch's stream (``set_start``: a resumed epoch skips the samples
    already trained; ``set_epoch`` goes back to 0) and, for the trainer's loader, ``(index, seed)`` pairs
    (``sample_seeds``, see :func:`sample_seed`)."""

    subset: Optional[list] = None
    start: int = 0
    sample_seeds: bool = False

    def set_indices(self, indices: Optional[list]) -> None:
        self.subset = None if indices is None else list(indices)
        self._resize(len(self.dataset) if self.subset is None else len(self.subset))

    def set_start(self, position: int) -> None:
        """Skip the first ``position`` samples of this rank's stream this epoch."""
        self.start = int(position)

    def _map(self, positions: Iterator[int]):
        idx = iter(positions) if self.subset is None else (self.subset[i] for i in positions)
        if self.start:
            idx = itertools.islice(idx, self.start, None)
        if not self.sample_seeds:
            return idx
        return ((i, sample_seed(self.seed, self.epoch, self.rank, p)) for p, i in enumerate(idx, self.start))


class RASampler(_SubsetMixin, Sampler[int]):
    """Repeated augmentation (Hoffer et al.; DeiT): each sample is drawn ``repeats`` times per epoch, and the copies
    go to consecutive ranks so each process augments its own view.

    As in DeiT an epoch is cut to a multiple of 256 samples over all ranks (so it sees about 1/repeats of the
    data); a dataset smaller than 256 keeps its plain per-rank share instead of an empty epoch. Unlike DeiT this is
    also used on a single process, where the copies land in the same batch.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, repeats: int = 3,
                 seed: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.shuffle, self.repeats, self.seed, self.epoch = shuffle, repeats, seed, 0
        self._resize(len(dataset))

    def _resize(self, n: int) -> None:
        self.n = n
        self.num_samples = math.ceil(n * self.repeats / self.num_replicas)       # per rank before the cut
        self.total_size = self.num_samples * self.num_replicas
        self.num_selected = (n // 256 * 256) // self.num_replicas or math.ceil(n / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        n = self.n
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        stream = [i for i in order for _ in range(self.repeats)]
        stream += stream[:self.total_size - len(stream)]               # pad so every rank gets as many
        return self._map(stream[self.rank:self.total_size:self.num_replicas][:self.num_selected])

    def __len__(self) -> int:
        return self.num_selected - self.start

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0


class ShuffleSampler(_SubsetMixin, DistributedSampler):
    """torch's DistributedSampler (shuffled, padded to equal shards), over a subset when a method sets one."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.full_dataset = dataset

    def _resize(self, n: int) -> None:
        self.dataset = range(n)            # DistributedSampler only reads len(self.dataset)
        self.num_samples = math.ceil(n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_indices(self, indices: Optional[list]) -> None:
        self.subset = None if indices is None else list(indices)
        self._resize(len(self.full_dataset) if self.subset is None else len(self.subset))

    def __iter__(self) -> Iterator[int]:
        return self._map(super().__iter__())

    def __len__(self) -> int:
        return self.num_samples - self.start

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0


class ShardSampler(Sampler[int]):
    """Evaluation shard ``range(rank, n, world_size)``: disjoint, unpadded, so metrics summed over ranks are exact.

    ``dataset_len`` is the count the summed shards must reach.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0):
        self.dataset_len = len(dataset)
        self.indices = range(rank, self.dataset_len, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ------------------------------------------------------------------------------------------------ loaders
def build_loaders(cfg, rank: int, world_size: int, seed: int, extensions=None) -> Tuple[DataLoader, DataLoader, int]:
    """Train and val loaders for one process, and the class count.

    ``seed`` must be the same on every rank: it orders the shared shuffle. Training samples end with their dataset
    index (:class:`WithIndex`), and the train sampler can be narrowed to a subset per epoch (``set_indices``) and
    started part-way (``set_start``, for a resumed epoch). Each training sample's augmentation is seeded by where it
    is drawn (:func:`sample_seed`: seed, epoch, rank, position), so it does not depend on the number of workers or
    on the batches a resumed epoch skips. Workers ignore SIGINT/SIGTERM (the main process handles them). What the
    training workers hand over follows ``cfg.loader`` (:mod:`fast_loader`).
    """
    train_set, nb_classes = build_dataset(cfg, is_train=True, warn=rank == 0, extensions=extensions)
    val_set, _ = build_dataset(cfg, is_train=False, warn=rank == 0)
    skip = bool(getattr(cfg, "skip_bad_images", False))
    if skip:
        train_set, val_set = SkipBadImages(train_set), SkipBadImages(val_set)
    if not hand_over(train_set, cfg.loader):
        raise DatasetError(f"loader: fast found no ToTensor + Normalize at the end of the training transforms of "
                           f"{cfg.data_set}; use loader: reference")
    train_set = WithIndex(train_set)
    # the published DeiT repeats only when distributed (one process: a plain random sampler); "always": here too
    repeat = cfg.repeated_aug and (world_size > 1 or getattr(cfg, "repeated_aug_single", "always") == "always")
    if repeat:
        train_sampler = RASampler(train_set, world_size, rank, shuffle=True, repeats=cfg.ra_repeats, seed=seed)
    else:
        train_sampler = ShuffleSampler(train_set, world_size, rank, seed=seed)
    train_sampler.sample_seeds = True
    if len(train_sampler) < cfg.batch_size:
        raise DatasetError(f"batch_size: {cfg.batch_size} is more than the {len(train_sampler)} training samples each "
                           f"of {world_size} process(es) gets per epoch from {cfg.data_path}; lower batch_size")
    if cfg.num_workers > 0:
        _register_exit_hook()
    common = dict(num_workers=cfg.num_workers, worker_init_fn=_worker_init if cfg.num_workers > 0 else None)
    mixing = cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None
    pin = cfg.pin_memory and cfg.device != "cpu" and torch.cuda.is_available()    # only for a run on the GPU
    train_loader = DataLoader(train_set, sampler=train_sampler, batch_size=cfg.batch_size, drop_last=True,
                              collate_fn=SkippingCollate(even=mixing) if skip else None,
                              **loader_options(cfg.loader, cfg.num_workers, pin), **common)
    val_loader = DataLoader(val_set, sampler=ShardSampler(val_set, world_size, rank), batch_size=int(1.5 * cfg.batch_size),
                            drop_last=False, persistent_workers=cfg.num_workers > 0,
                            pin_memory=pin,
                            collate_fn=SkippingCollate() if skip else None, **common)
    return train_loader, val_loader, nb_classes


__all__ = ["DatasetError", "build_dataset", "build_transform", "build_loaders", "check_num_classes",
           "prepare_digits", "load_rgb", "RASampler", "ShuffleSampler", "ShardSampler", "WithIndex", "SkipBadImages",
           "BadImage", "sample_seed"]
