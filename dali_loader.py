"""``loader: dali``: the training images decoded and augmented by NVIDIA DALI, on the GPU where there is one.

For nodes whose CPU cores cannot feed the GPUs (docs/measuring.md, "loader: dali"). The training loader keeps everything but the pixels
of the reference loader: the same ImageFolder file list and class indices, the same training sampler (sharded per
rank, repeated augmentation, the methods' example subsets through ``sampler.set_indices``, a resumed epoch's
``set_start``), the same batches of dataset indices, and the reference validation loader. Per batch it hands over
``(images, classes, dataset indices)`` like the reference loader, the images already normalised float NCHW (on the
GPU with a GPU); mixup/cutmix stay in the engine.

The pipeline: ``fn.decoders.image_random_crop`` (device ``mixed``: nvJPEG / the hardware JPEG decoder; ``cpu``
without a GPU) with the recipe's crop scale and aspect range, resize to ``input_size``, flip, the recipe's
RandAugment (:mod:`dali_augment`) or colour jitter, normalisation. Inputs of 32 px and less take DeiT's small-image
path instead (resize, pad 4, random crop). Random erasing is the ``fast`` loader's, on the device: the same boxes
and noise from each sample's seed (:mod:`fast_loader`). DALI cannot reproduce PIL's pixels; what differs is in
docs/measuring.md. DALI draws its own random numbers from a pipeline seed made of the run seed, epoch, rank and start
position, so the same run gives the same batches, but a resumed epoch draws other crops, flips and RandAugment ops
than the uninterrupted one did. DALI is optional: nothing here imports it until a pipeline is built.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import dali_augment as aug
from extensions import ExtensionSet
from datasets import DatasetError, build_loaders, load_rgb, sample_seed, seeded
from fast_loader import draw_erasing, erase_batch, erase_per_sample

INSTALL = "loader: dali needs NVIDIA DALI, which is not installed: pip install -r requirements-dali.txt"
PREFETCH = 2                                       # batches DALI prepares ahead
FILE_SETS = ("imagenet", "folder", "digits")       # the data sets read as image files (cifar comes as arrays)


def dali_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):                # no ``nvidia`` namespace at all
        return False


def config_problem(cfg) -> Optional[str]:
    """The one line that says why ``loader: dali`` cannot run this config (``None``: it can). Checked with the
    config, before anything is written."""
    if not dali_installed():
        return INSTALL
    if cfg.data_set not in FILE_SETS:
        return (f"loader: dali reads image files (data_set {', '.join(FILE_SETS)}); data_set {cfg.data_set} comes "
                f"as arrays: use loader: fast")
    if getattr(cfg, "skip_bad_images", False):
        return ("loader: dali cannot leave unreadable images out (skip_bad_images: true); use loader: fast, or "
                "remove the files the error names")
    if cfg.train_interpolation not in INTERPOLATIONS:
        return (f"train_interpolation: '{cfg.train_interpolation}' with loader: dali must be one of "
                f"{', '.join(INTERPOLATIONS)}")
    try:
        aug.rand_augment_plan(cfg.aa)
    except aug.AugmentError as e:
        return str(e)
    return None


INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass
class Spec:
    """What the pipeline does, from the epoch's recipe."""
    size: int
    crop_scale: Tuple[float, float]
    hflip: float
    interpolation: str
    color_jitter: float
    rand_augment: Optional[aug.RandAugmentPlan]
    erasing: object                  # timm's RandomErasing (its settings), or None
    max_boxes: int
    gpu: bool

    @classmethod
    def from_config(cls, cfg) -> "Spec":
        rer = _erasing(cfg)
        gpu = torch.cuda.is_available() and getattr(cfg, "device", "auto") != "cpu"
        return cls(size=cfg.input_size, crop_scale=tuple(cfg.crop_scale), hflip=cfg.hflip,
                   interpolation=cfg.train_interpolation, color_jitter=cfg.color_jitter or 0.0,
                   rand_augment=aug.rand_augment_plan(cfg.aa), erasing=rer,
                   max_boxes=rer.max_count if rer is not None else 0, gpu=gpu)


def _erasing(cfg):
    """timm's ``RandomErasing`` of the recipe (its settings: the boxes are drawn per sample, the noise erased on the
    device by :mod:`fast_loader`), or ``None`` when erasing is off."""
    if not cfg.reprob:
        return None
    from timm.data.random_erasing import RandomErasing
    return RandomErasing(cfg.reprob, mode=cfg.remode, max_count=cfg.recount, device="cpu")


# ------------------------------------------------------------------------------------------------ the pipeline
def _decode_and_crop(spec: Spec, encoded):
    """Decoded uint8 HWC images at ``size`` x ``size``: DeiT's random-resized crop, or for small inputs its resize,
    pad 4 and random crop."""
    from nvidia.dali import fn, types
    device = "mixed" if spec.gpu else "cpu"
    interp = types.INTERP_CUBIC if spec.interpolation == "bicubic" else types.INTERP_LINEAR
    if spec.size > 32:
        images = fn.decoders.image_random_crop(encoded, device=device, output_type=types.RGB,
                                               random_area=list(spec.crop_scale), random_aspect_ratio=[3 / 4, 4 / 3],
                                               num_attempts=10)
        return fn.resize(images, size=[spec.size, spec.size], interp_type=interp, antialias=True)
    images = fn.decoders.image(encoded, device=device, output_type=types.RGB)
    images = fn.resize(images, resize_shorter=spec.size, interp_type=types.INTERP_CUBIC, antialias=True)
    padded = spec.size + 8                            # centred window 4 px beyond each side, zeros outside
    images = fn.crop(images, crop=[padded, padded], crop_pos_x=0.5, crop_pos_y=0.5, out_of_bounds_policy="pad",
                     fill_values=0)
    offsets = [k / 8 for k in range(9)]              # the 9 offsets, uniform as RandomCrop's integers
    return fn.crop(images, crop=[spec.size, spec.size], crop_pos_x=fn.random.uniform(values=offsets),
                   crop_pos_y=fn.random.uniform(values=offsets))


def _augment(spec: Spec, images):
    """Flip, then RandAugment (or timm's colour jitter when RandAugment is off), on uint8 HWC."""
    from nvidia.dali import fn, types
    if spec.hflip > 0:
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=spec.hflip))
    if spec.rand_augment is not None:
        fill = int(round(255 * sum(IMAGENET_DEFAULT_MEAN) / 3))     # one grey (timm: the mean per channel)
        return aug.apply_rand_augment(images, spec.rand_augment, spec.size, fill, types.INTERP_LINEAR)
    if spec.color_jitter > 0:
        lo, hi = max(0.0, 1 - spec.color_jitter), 1 + spec.color_jitter
        images = fn.color_twist(images, brightness=fn.random.uniform(range=[lo, hi]),
                                contrast=fn.random.uniform(range=[lo, hi]),
                                saturation=fn.random.uniform(range=[lo, hi]))
    return images


def define_pipeline(spec: Spec, source, batch_size: int, num_threads: int, seed: int):
    """The DALI pipeline: ``source()`` gives per batch the encoded files, classes and dataset indices."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=True)
    def train_pipeline():
        encoded, labels, indices = fn.external_source(source=source, num_outputs=3, batch=True,
                                                      dtype=[types.UINT8, types.INT64, types.INT64])
        images = _augment(spec, _decode_and_crop(spec, encoded))
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[255 * m for m in IMAGENET_DEFAULT_MEAN],
                                          std=[255 * s for s in IMAGENET_DEFAULT_STD])
        return images, labels, indices

    return train_pipeline(batch_size=batch_size, num_threads=num_threads, seed=seed,
                          device_id=torch.cuda.current_device() if spec.gpu else None,
                          prefetch_queue_depth=PREFETCH, exec_dynamic=True)


# ------------------------------------------------------------------------------------------------ the loader
class _Feed:
    """The pipeline's external source: the sampler's next batch as encoded files, classes and indices, for the
    pass's ``batches`` batches, then the end of the pass. Per batch in the pipeline it keeps the files (to name a
    broken one) and the erasing boxes and noise seeds, drawn here from each sample's seed as the ``fast`` loader's
    workers draw them (:func:`fast_loader.draw_erasing`), for the erasing on the device."""

    def __init__(self, loader: "DaliTrainLoader"):
        self.loader, self.keyed, self.left, self.in_flight = loader, iter(()), 0, collections.deque()

    def start(self, keyed: Iterator, batches: int) -> None:
        self.keyed, self.left = keyed, batches
        self.in_flight.clear()

    def __call__(self):
        if self.left <= 0:
            raise StopIteration                 # DALI's end of a pass: the pipeline waits for reset()
        self.left -= 1
        keys = [next(self.keyed) for _ in range(self.loader.batch_size)]
        paths = [self.loader.samples[i][0] for i, _ in keys]
        self.in_flight.append((paths, self.erasing([seed for _, seed in keys])))
        encoded = [np.fromfile(p, dtype=np.uint8) for p in paths]
        labels = [np.array(self.loader.samples[i][1], dtype=np.int64) for i, _ in keys]
        indices = [np.array(i, dtype=np.int64) for i, _ in keys]
        return encoded, labels, indices

    def erasing(self, seeds: List[int]):
        """``(boxes, noise seeds)`` of a batch, boxes ``(batch, max boxes, 4)`` as the fast loader hands them over."""
        spec = self.loader.spec
        if spec.erasing is None:
            return None
        boxes = torch.zeros((len(seeds), spec.max_boxes, 4), dtype=torch.int32)
        noise = torch.zeros(len(seeds), dtype=torch.int64)
        for k, seed in enumerate(seeds):
            with seeded(seed):
                drawn, noise[k] = draw_erasing(spec.erasing, spec.size, spec.size)
            if drawn:
                boxes[k, :len(drawn)] = torch.tensor(drawn, dtype=torch.int32)
        return boxes, noise


class DaliTrainLoader:
    """The training loader of ``loader: dali``: what the trainer reads of a DataLoader (``sampler``, ``dataset``,
    ``batch_size``, ``len``, iteration) over one DALI pipeline.

    The pipeline is defined once (defining RandAugment's graph takes seconds), seeded from where its first pass
    starts (:meth:`pipeline_seed`), and reset between passes; its generators run on from pass to pass."""

    def __init__(self, reference, spec: Spec, num_threads: int, seed: int, rank: int):
        self.sampler, self.dataset, self.batch_size = reference.sampler, reference.dataset, reference.batch_size
        self.samples: List[Tuple[str, int]] = list(self.dataset.samples)
        self.spec, self.num_threads, self.seed, self.rank = spec, num_threads, seed, rank
        self.feed, self.pipe = _Feed(self), None

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size                       # drop_last, as the reference loader

    @property
    def num_workers(self) -> int:
        """The pipeline's CPU threads (at least one), where a DataLoader counts its worker processes."""
        return self.num_threads

    def pipeline_seed(self) -> int:
        return sample_seed(self.seed, self.sampler.epoch, self.rank, self.sampler.start) % (2 ** 31 - 1)

    def _start_pass(self, batches: int) -> None:
        """A pipeline at the start of a pass of ``batches`` batches: the last one, run to the end of its pass (the
        batches it already has in its queue, none more) and reset; a new one when there is none or it failed."""
        feed = self.feed
        if self.pipe is not None:
            feed.left = 0
            try:
                for _ in range(PREFETCH + 1):
                    self.pipe.run()
            except StopIteration:
                feed.start(iter(self.sampler), batches)
                self.pipe.reset()
                return
            except Exception:  # noqa: BLE001 -- a pipeline that failed is replaced, not reused
                pass
        self.pipe = None
        feed.start(iter(self.sampler), batches)
        with _named_errors(feed):
            self.pipe = define_pipeline(self.spec, feed, self.batch_size, self.num_threads, self.pipeline_seed())
            self.pipe.build()

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import feed_ndarray
        batches = len(self)
        self._start_pass(batches)
        device = torch.device("cuda", torch.cuda.current_device()) if self.spec.gpu else torch.device("cpu")
        for _ in range(batches):
            with _named_errors(self.feed):
                images, labels, indices = self.pipe.run()
            _, erasing = self.feed.in_flight.popleft()
            dense = images.as_tensor()
            out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
            # an asynchronous copy on the training stream; DALI reuses its buffer PREFETCH runs later, after the
            # training step's own sync (engine: loss.item()) has waited for it
            feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream() if self.spec.gpu else None)
            if erasing is not None:                     # the fast loader's erasing: same boxes, same noise
                erase = erase_batch if self.spec.gpu else erase_per_sample
                erase(out, self.spec.erasing.mode or "const", *erasing)
            yield out, torch.from_numpy(np.array(labels.as_tensor())), torch.from_numpy(np.array(indices.as_tensor()))


class _named_errors:
    """A DALI failure becomes one :class:`DatasetError` line: PIL reads the files in flight again and names the
    first one it cannot read; when PIL reads them all, the line gives DALI's reason and the batch's first file."""

    def __init__(self, feed: _Feed):
        self.feed = feed

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is None or not issubclass(kind, RuntimeError) or isinstance(err, DatasetError):
            return False
        for paths, _ in self.feed.in_flight:
            for path in paths:
                load_rgb(path)                              # raises DatasetError naming the file
        reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        first = self.feed.in_flight[0][0][0] if self.feed.in_flight else "(no file in flight)"
        raise DatasetError(f"DALI could not process a batch starting with {first}: {reason}") from None


def build_dali_loaders(cfg, rank: int, world_size: int, seed: int, extensions=None):
    """``(train, val, nb_classes)`` like :func:`datasets.build_loaders`: its sampler, dataset and validation loader,
    the training images from DALI."""
    problem = config_problem(cfg)
    if problem is not None:
        raise DatasetError(problem)
    extensions = extensions if extensions is not None else ExtensionSet.from_config(cfg)
    if len(extensions):
        raise DatasetError(f"loader: dali hands over (images, class) batches; {', '.join(extensions.names())} "
                           f"change(s) the training set: use loader: fast")
    reference, val_loader, nb_classes = build_loaders(dataclasses.replace(cfg, loader="reference"), rank, world_size,
                                                      seed, extensions=extensions)
    spec = Spec.from_config(cfg)
    return DaliTrainLoader(reference, spec, max(1, cfg.num_workers), seed, rank), val_loader, nb_classes


__all__ = ["DaliTrainLoader", "Spec", "build_dali_loaders", "config_problem", "dali_installed", "INSTALL"]
