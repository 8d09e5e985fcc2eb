"""What ``loader: dali`` does not reproduce of the PIL pipeline, measured (docs/measuring.md, "loader: dali").

    python scripts/dali_differences.py                     # on photo crops it writes to a temporary folder
    python scripts/dali_differences.py --write_images DIR  # only write the photo crops (scripts/gpu_check.sh)

On the CPU (DALI's ``device_id=None``): the random-resized crop's area and aspect distributions (torchvision's
``RandomResizedCrop.get_params`` against ``fn.decoders.image_random_crop``), JPEG decoding, the resize, and every
RandAugment op of ``rand-m9-inc1`` at magnitude 9 with the same sign (timm on PIL with DeiT's fill and bicubic
interpolation, against the DALI op ``dali_augment`` builds). The images are crops of 500x375 from the two photos that
ship with scikit-learn. Needs DALI (pip install -r requirements-dali.txt).
"""
import argparse
import os
import random
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZE = (500, 375)


def photo_folder(root: str, per_class: int = 512, val: int = 16) -> str:
    """An ImageFolder tree of 500x375 JPEG crops (quality 90) of scikit-learn's two photos, one class each."""
    import sklearn.datasets
    src = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val)):
        for name in ("china", "flower"):
            photo = Image.open(os.path.join(src, f"{name}.jpg")).convert("RGB")
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                x, y = int(rng.integers(0, photo.width - SIZE[0])), int(rng.integers(0, photo.height - SIZE[1]))
                box = (x, y, x + SIZE[0], y + SIZE[1])
                photo.crop(box).save(os.path.join(root, split, name, f"{i}.jpg"), quality=90)
    return root


def _runs(pipeline_fn, batch: int, runs: int = 1) -> list:
    """``runs`` runs of one CPU pipeline (a DALI function of no arguments returning its outputs)."""
    from nvidia.dali import pipeline_def
    pipe = pipeline_def(pipeline_fn)(batch_size=batch, num_threads=1, device_id=None, seed=0)
    pipe.build()
    return [pipe.run() for _ in range(runs)]


def crop_distribution(path: str, draws: int = 4000) -> None:
    """Area fraction and aspect (w/h) of the crops both draw on the image at ``path``."""
    from nvidia.dali import fn, types
    from torchvision.transforms import RandomResizedCrop
    data, batch = np.fromfile(path, dtype=np.uint8), 200
    width, height = Image.open(path).size

    def pipeline():
        encoded = fn.external_source(source=lambda: [data] * batch, batch=True)
        crops = fn.decoders.image_random_crop(encoded, device="cpu", output_type=types.RGB, random_area=[0.08, 1.0],
                                              random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
        return crops.shape()
    dali = np.concatenate([np.array(out[0].as_tensor()) for out in _runs(pipeline, batch, draws // batch)])[:, :2]
    torch.manual_seed(0)
    ref = np.array([RandomResizedCrop.get_params(torch.empty(3, height, width), (0.08, 1.0), (3 / 4, 4 / 3))[2:]
                    for _ in range(draws)])
    print(f"crops of a {width}x{height} image, {draws} draws each (quantiles 5, 25, 50, 75, 95 %):")
    for name, hw in (("torchvision", ref), ("DALI", dali)):
        h, w = hw[:, 0].astype(float), hw[:, 1].astype(float)
        area, aspect = h * w / (width * height), w / h
        q = lambda x: " ".join(f"{v:.3f}" for v in np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95]))  # noqa: E731
        print(f"  {name:11s} area mean {area.mean():.3f} q {q(area)} | aspect mean {aspect.mean():.3f} q {q(aspect)}"
              f" | full height {np.mean(h == height):.3f}")


def crop_fallback(draws: int = 2000) -> None:
    """The crop both take after 10 failed attempts, on a 1000x150 image (most attempts fail there)."""
    import io
    from collections import Counter
    from nvidia.dali import fn
    from torchvision.transforms import RandomResizedCrop
    buffer = io.BytesIO()
    Image.new("RGB", (1000, 150), (90, 30, 200)).save(buffer, "JPEG")
    data, batch = np.frombuffer(buffer.getvalue(), np.uint8), 200

    def pipeline():
        encoded = fn.external_source(source=lambda: [data] * batch, batch=True)
        return fn.decoders.image_random_crop(encoded, device="cpu", random_area=[0.08, 1.0],
                                             random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10).shape()
    dali = np.concatenate([np.array(out[0].as_tensor()) for out in _runs(pipeline, batch, draws // batch)])[:, :2]
    torch.manual_seed(0)
    image = torch.empty(3, 150, 1000)
    ref = [RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))[2:] for _ in range(draws)]
    for name, hw in (("torchvision", [tuple(x) for x in ref]), ("DALI", [tuple(x) for x in dali.tolist()])):
        (shape, count), = Counter(hw).most_common(1)
        print(f"  {name:11s} on 1000x150: most frequent crop (h, w) {shape} in {count / draws:.3f} of the draws")


def pixel_differences(paths) -> None:
    """JPEG decoding, and the resize of the same decoded image to 224x224 (cubic and linear)."""
    from nvidia.dali import fn, types
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    encoded = [np.fromfile(p, dtype=np.uint8) for p in paths]

    def pipeline():
        images = fn.decoders.image(fn.external_source(source=lambda: encoded, batch=True), output_type=types.RGB)
        return (images, fn.resize(images, size=[224, 224], interp_type=types.INTERP_CUBIC, antialias=True),
                fn.resize(images, size=[224, 224], interp_type=types.INTERP_LINEAR, antialias=True))
    full, cubic, linear = _runs(pipeline, len(paths))[0]
    diffs = {"decode": [], "bicubic resize": [], "bilinear resize": []}
    for k, path in enumerate(paths):
        decoded = np.array(full[k])
        diffs["decode"].append(np.asarray(Image.open(path).convert("RGB"), np.int16) - decoded)
        for name, out, mode in (("bicubic resize", cubic, InterpolationMode.BICUBIC),
                                ("bilinear resize", linear, InterpolationMode.BILINEAR)):
            ref = np.asarray(TF.resize(Image.fromarray(decoded), [224, 224], mode), np.int16)
            diffs[name].append(ref - np.array(out[k], np.int16))
    for name, d in diffs.items():
        d = np.abs(np.stack(d))
        print(f"{name} (PIL vs DALI, {len(paths)} images): mean |diff| {d.mean():.3f} levels, max {d.max()}, "
              f"values differing {np.mean(d > 0):.3f}")


def _timm_args(name: str, magnitude: int) -> tuple:
    """timm's argument of op ``name`` at ``magnitude`` with the sign that keeps it at or above neutral."""
    from timm.data.auto_augment import LEVEL_TO_ARG
    neutral = 1.0 if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                              "SharpnessIncreasing") else 0.0
    for seed in range(100):
        random.seed(seed)
        args = LEVEL_TO_ARG[name](magnitude, {}) if LEVEL_TO_ARG[name] else ()
        if all(a >= neutral for a in args):
            return args
    raise RuntimeError(f"no positive draw of {name}")


def rand_augment_differences(paths, magnitude: int = 9) -> None:
    """Every op of rand-m{magnitude}-inc1, same sign, on 224 px images: timm (PIL, DeiT's fill, bicubic) vs DALI."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug.core import signed_bin
    from timm.data.auto_augment import NAME_TO_OP
    import dali_augment as aug
    images = [np.asarray(Image.open(p).convert("RGB").resize((224, 224), Image.BICUBIC)) for p in paths]
    plan = aug.rand_augment_plan(f"rand-m{magnitude}-inc1")
    suite = dict(zip(plan.ops, aug._dali_suite(plan)))
    print(f"RandAugment op at m{magnitude} | argument | mean |diff| | share > 2 levels")
    for name in plan.ops:
        def pipeline():
            x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
            sign = fn.random.uniform(values=[0], dtype=types.INT32)
            return suite[name](x, magnitude_bin=signed_bin(magnitude * aug.BINS_PER_LEVEL, random_sign=sign),
                               num_magnitude_bins=plan.num_bins, shape=(224, 224), fill_value=115,
                               interp_type=types.INTERP_LINEAR)
        out, args = _runs(pipeline, len(images))[0][0], _timm_args(name, magnitude)
        ref = [NAME_TO_OP[name](Image.fromarray(im), *args, fillcolor=(124, 116, 104), resample=Image.BICUBIC)
               for im in images]
        d = np.abs(np.stack([np.asarray(r, np.int16) - np.array(out[k], np.int16) for k, r in enumerate(ref)]))
        print(f"{name} | {', '.join(f'{a:.3g}' for a in args) or '-'} | {d.mean():.2f} | {np.mean(d > 2):.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--write_images", default=None, help="only write the photo crops into this folder and stop")
    args = p.parse_args(argv)
    if args.write_images:
        photo_folder(args.write_images)
        print(f"wrote {args.write_images}: 1,024 training JPEGs of 500x375 in 2 classes (and 32 for val)")
        return 0
    with tempfile.TemporaryDirectory(prefix="dali_differences_") as tmp:
        root = photo_folder(tmp, per_class=8, val=1)
        paths = [os.path.join(root, "train", c, f"{i}.jpg") for c in ("china", "flower") for i in range(8)]
        crop_distribution(paths[0])
        crop_fallback()
        pixel_differences(paths)
        rand_augment_differences(paths[::2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
