"""Forward FLOPs per image (the plain model and every state of the config's methods) and total training FLOPs.

    python scripts/flops.py --config configs/deit_s_toe.yaml
    python scripts/flops.py --config configs/deit_s.yaml --input_size 384 --json flops.json
    python scripts/flops.py --model deit_tiny_patch16_224 --toe '{}'        # no file: defaults + overrides

Any other ``--key value`` is a config override (as for main.py). FLOPs are fvcore's (one multiply-add = one FLOP)
with fused attention counted; the closed-form ViT cost is printed next to them as a check.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ConfigError, load_config  # noqa: E402
from measure import (flops_report_json, format_flops_report, images_per_epoch, model_flops,  # noqa: E402
                     num_classes_of)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False,
                                     epilog="other --key value pairs override the config")
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--images-per-epoch", type=int, default=None,
                        help="training images per epoch (default: the dataset's, e.g. 1,281,167 for imagenet)")
    parser.add_argument("--num-classes", type=int, default=None, help="head size (default: nb_classes or the dataset's)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes of the run (sets iterations per epoch, the period of per-iteration schedules)")
    parser.add_argument("--json", default=None, help="also write the full report to this JSON file")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        images = images_per_epoch(cfg, args.images_per_epoch)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = model_flops(cfg, num_classes_of(cfg, args.num_classes), images=images, world_size=args.nproc)
    print(format_flops_report(report, images))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(flops_report_json(report, images), f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
