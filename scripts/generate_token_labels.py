#!/usr/bin/env python3
"""Generate dense token labels for an ImageFolder tree with any timm classifier, into a packed label store.

    # a teacher by timm name, weights from a local checkpoint (nothing is downloaded)
    python scripts/generate_token_labels.py data/imagenet/train --out labels/imagenet_nfnet \\
        --model dm_nfnet_f6 --checkpoint weights/nfnet_f6.pth --img-size 576 --topk 5 --batch-size 64

    # pack the published per-image files (<label_root>/<class_dir>/<stem>.pt, [2, k, H, W]) instead
    python scripts/generate_token_labels.py data/imagenet/train --out labels/imagenet_nfnet \\
        --convert-pt label_top5_train_nfnet

The classifier becomes a per-location classifier over the final feature grid: a ViT's head is applied to every
patch token (an ``aux_head`` if the model has one), a CNN's pooled classifier is applied as a 1x1 convolution to the
unpooled feature map. The top-k logits and class indices of every location are stored. Re-running the same command
skips the rows already written, so an interrupted run continues.

Preprocessing (``--preprocess``), bicubic in both:

* ``whole`` (default): each image is resized whole, without cropping, to the input size, so the label grid covers
  exactly the image that training crops are taken from (training normalises crop boxes to the whole image).
* ``center-crop``: the published one. TokenLabeling's ``generate_label.py`` runs timm's evaluation transform: the
  shorter side resized to ``floor(img_size / crop_pct)``, then a centre crop of ``img_size``. The published NFNet-F6
  label files (``label_top5_train_nfnet``, README command ``--model dm_nfnet_f6 --img-size 576 --crop-pct 1.0``) were
  made this way, so their maps cover the central square of each image (the middle 3/4 of the long side of a 4:3
  image), while the published training, like ours, reads them as covering the whole image.

The store's ``index.json`` records the preprocessing (``meta.preprocess``, ``meta.crop_pct``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import List, Optional, Sequence

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import token_labels as tl  # noqa: E402
from devices import DeviceError, autocast, resolve_amp, resolve_device  # noqa: E402
from logger import format_seconds  # noqa: E402


class Progress:
    """One progress line: rewritten in place on a terminal, printed every ``every`` seconds otherwise."""

    def __init__(self, total: int, start: int, every: float = 30.0, stream=sys.stderr):
        self.total, self.start, self.every, self.stream = total, start, every, stream
        self.t0 = self.last = time.perf_counter()
        self.live = stream.isatty()

    def __call__(self, done: int, total: Optional[int] = None, final: bool = False) -> None:
        now = time.perf_counter()
        if not (final or self.live or now - self.last >= self.every):
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_s = "--" if eta == float("inf") else format_seconds(eta)
        pct = 100.0 * done / max(self.total, 1)
        line = f"token labels: {done}/{self.total} images ({pct:.1f}%) {rate:.1f} img/s eta {eta_s}"
        if self.live:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ------------------------------------------------------------------------------------------------- teacher
class DenseClassifier(nn.Module):
    """Per-location class logits ``[B, K, h, w]`` from a classifier's final feature grid."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        aux = getattr(model, "aux_head", None)        # LV-ViT: the dense head is the per-token classifier
        self.head = aux if isinstance(aux, nn.Module) else model.get_classifier()
        if not isinstance(self.head, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"{type(model).__name__}: its classifier is a {type(self.head).__name__}; only a Linear "
                             "or 1x1 Conv2d classifier can be applied per location")
        head_module = getattr(model, "head", None)
        # ConvNeXt-style heads normalise the pooled features first; the same per-channel norm works per location
        self.pre_norm = getattr(head_module, "norm", None) if isinstance(head_module, nn.Module) else None
        self.num_features = getattr(model, "num_features", None)

    def _classify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` features -> ``[B, K, h, w]`` logits with the classifier as a 1x1 conv."""
        if isinstance(self.head, nn.Conv2d):
            return self.head(x)
        out = torch.einsum("bchw,kc->bkhw", x, self.head.weight)
        return out if self.head.bias is None else out + self.head.bias.view(1, -1, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(images)
        if feats.ndim == 3:                                        # ViT-like tokens [B, P + N, C]
            prefix = getattr(self.model, "num_prefix_tokens", 1 if getattr(self.model, "cls_token", None) is not None else 0)
            tokens = feats[:, prefix:]
            fc_norm = getattr(self.model, "fc_norm", None)
            if isinstance(fc_norm, nn.Module):
                tokens = fc_norm(tokens)
            grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
            if grid is None or grid[0] * grid[1] != tokens.shape[1]:
                side = int(round(tokens.shape[1] ** 0.5))
                if side * side != tokens.shape[1]:
                    raise ValueError(f"cannot arrange {tokens.shape[1]} tokens of {type(self.model).__name__} on a grid")
                grid = (side, side)
            feats = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid[0], grid[1])
        elif feats.ndim == 4:
            if self.num_features and feats.shape[1] != self.num_features and feats.shape[-1] == self.num_features:
                feats = feats.permute(0, 3, 1, 2)                   # NHWC feature maps (e.g. Swin)
            if isinstance(self.pre_norm, nn.Module) and not isinstance(self.pre_norm, nn.Identity):
                feats = self.pre_norm(feats)
        else:
            raise ValueError(f"forward_features of {type(self.model).__name__} returned shape {list(feats.shape)}")
        return self._classify(feats)


def load_weights(model: nn.Module, path: str, use_ema: bool) -> None:
    """Load a local checkpoint: ours/DeiT's (``model``/``model_ema``), timm's (``state_dict``/``state_dict_ema``) or bare."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    keys = ("model_ema", "state_dict_ema", "model", "state_dict") if use_ema else ("model", "state_dict")
    state = next((ckpt[k] for k in keys if isinstance(ckpt, dict) and isinstance(ckpt.get(k), dict)), ckpt)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def build_teacher(args, num_classes: int) -> nn.Module:
    import timm
    import models.lvvit  # noqa: F401 -- registers lvvit_* so an LV-ViT can be the teacher
    kwargs = dict(json.loads(args.model_kwargs)) if args.model_kwargs else {}
    kwargs.setdefault("num_classes", num_classes)
    if args.img_size:
        try:
            return timm.create_model(args.model, pretrained=False, img_size=args.img_size, **kwargs)
        except TypeError:     # CNNs take any input size and have no img_size argument
            pass
    return timm.create_model(args.model, pretrained=False, **kwargs)


PREPROCESS = ("whole", "center-crop")


def image_dataset(root: str, size: int, mean, std, preprocess: str = "whole", crop_pct: float = 1.0):
    """The teacher's input images: ``whole`` resizes each image to ``size`` x ``size``; ``center-crop`` (the published
    generator) resizes its shorter side to ``floor(size / crop_pct)`` and takes the centre ``size`` x ``size``."""
    from torchvision import datasets, transforms
    bicubic = transforms.InterpolationMode.BICUBIC
    if preprocess == "whole":
        resize = [transforms.Resize((size, size), interpolation=bicubic)]
    elif preprocess == "center-crop":
        if not 0 < crop_pct <= 1:
            raise ValueError(f"--crop-pct {crop_pct} must lie in (0, 1]")
        resize = [transforms.Resize(math.floor(size / crop_pct), interpolation=bicubic), transforms.CenterCrop(size)]
    else:
        raise ValueError(f"--preprocess '{preprocess}' is not one of {', '.join(PREPROCESS)}")
    tf = transforms.Compose(resize + [transforms.ToTensor(), transforms.Normalize(mean, std)])
    return datasets.ImageFolder(root, transform=tf)


class _Rows(torch.utils.data.Dataset):
    """The pending rows of a dataset, yielding ``(image, row)``."""

    def __init__(self, dataset, rows: Sequence[int]):
        self.dataset, self.rows = dataset, list(rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return self.dataset[row][0], row


# ------------------------------------------------------------------------------------------------- modes
def generate(args) -> int:
    from torchvision import datasets
    keys_ds = datasets.ImageFolder(args.data)
    num_classes = args.num_classes or len(keys_ds.classes)
    try:
        device = resolve_device(args.device, key="--device")
    except DeviceError as e:
        raise SystemExit(str(e)) from None
    model = build_teacher(args, num_classes)
    if args.checkpoint:
        load_weights(model, args.checkpoint, args.use_ema)
    model_classes = getattr(model, "num_classes", num_classes)
    if model_classes != num_classes:
        raise SystemExit(f"the teacher has {model_classes} classes but --num-classes is {num_classes}")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = args.img_size or cfg.get("input_size", (3, 224, 224))[-1]
    mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
    teacher = DenseClassifier(model).to(device).eval()
    with torch.no_grad():
        probe = teacher(torch.zeros(1, 3, size, size, device=device))
    _, classes, h, w = probe.shape
    if args.topk > classes:
        raise SystemExit(f"--topk {args.topk} exceeds the teacher's {classes} classes")

    keys = [tl.image_key(p, keys_ds.root) for p, _ in keys_ds.samples]
    meta = dict(model=args.model, checkpoint=args.checkpoint, img_size=size, classes=keys_ds.classes,
                preprocess=args.preprocess, crop_pct=args.crop_pct if args.preprocess == "center-crop" else None)
    writer = tl.LabelStoreWriter(args.out, keys, args.topk, h, w, num_classes, meta=meta)
    pending = writer.pending()
    progress = Progress(len(keys), writer.num_done, every=args.log_every)
    if len(pending) == 0:
        print(f"token labels: all {len(keys)} images already done in {args.out}")
        return 0
    print(f"token labels: {args.model} at {size} px ({args.preprocess}) -> {h}x{w} grid, top-{args.topk} of "
          f"{num_classes} classes; {len(pending)} of {len(keys)} images to do, writing {args.out}", flush=True)
    dataset = image_dataset(args.data, size, mean, std, args.preprocess, args.crop_pct)
    loader = torch.utils.data.DataLoader(_Rows(dataset, pending), batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    amp = autocast(device, resolve_amp("bf16" if args.amp else "none", device, "--amp"))
    done = writer.num_done
    with torch.no_grad():
        for images, rows in loader:
            with amp:
                logits = teacher(images.to(device, non_blocking=True))
            scores, indices = logits.float().topk(args.topk, dim=1)
            writer.write(rows.numpy(), scores.cpu(), indices.cpu())
            done += len(rows)
            progress(done)
    progress(done, final=True)
    writer.close()
    return 0


def convert(args) -> int:
    from torchvision import datasets
    ds = datasets.ImageFolder(args.data)
    keys = [tl.image_key(p, ds.root) for p, _ in ds.samples]
    num_classes = args.num_classes or 1000
    progress = Progress(len(keys), 0, every=args.log_every)
    writer = tl.convert_pt_labels(keys, args.convert_pt, args.out, num_classes, batch_size=args.batch_size,
                                  progress=lambda d, t: progress(d))
    progress(writer.num_done, final=True)
    writer.close()
    return 0


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="ImageFolder root (e.g. data/imagenet/train); keys are paths relative to it")
    p.add_argument("--out", required=True, help="label store directory (created, or resumed if it exists)")
    p.add_argument("--model", default="", help="timm model name of the teacher")
    p.add_argument("--checkpoint", default="", help="local checkpoint of the teacher (without it: random weights)")
    p.add_argument("--use-ema", action="store_true", help="take the EMA weights of the checkpoint if present")
    p.add_argument("--model-kwargs", default="", help='extra timm.create_model arguments as JSON, e.g. \'{"depth": 2}\'')
    p.add_argument("--img-size", type=int, default=0, help="teacher input size (default: the model's)")
    p.add_argument("--preprocess", default="whole", choices=PREPROCESS,
                   help="whole: resize the whole image (default); center-crop: the published generator's resize of "
                        "the shorter side and centre crop (the published NFNet-F6 labels)")
    p.add_argument("--crop-pct", type=float, default=1.0,
                   help="with --preprocess center-crop: resize the shorter side to img_size / crop_pct (published "
                        "command: 1.0)")
    p.add_argument("--num-classes", type=int, default=0,
                   help="classes of the teacher (default: the dataset's; 1000 for --convert-pt)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", action="store_true", help="run the teacher in bfloat16")
    p.add_argument("--log-every", type=float, default=30.0, help="seconds between progress lines off a terminal")
    p.add_argument("--convert-pt", default="", metavar="DIR",
                   help="pack the published per-image .pt labels under DIR instead of running a teacher")
    args = p.parse_args(argv)
    if not args.convert_pt and not args.model:
        p.error("give --model (a teacher to run) or --convert-pt DIR (published labels to pack)")
    if not os.path.isdir(args.data):
        p.error(f"image folder {args.data} does not exist")
    if not 0 < args.crop_pct <= 1:
        p.error(f"--crop-pct {args.crop_pct} must lie in (0, 1]")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return convert(args) if args.convert_pt else generate(args)
    except tl.TokenLabelError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
