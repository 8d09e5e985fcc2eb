"""Training throughput of the plain model and in every state of the config's methods, against the FLOPs-ideal
speed-up; inference too.

    python scripts/benchmark.py --config configs/deit_s_toe.yaml                      # batch 32, fp32
    python scripts/benchmark.py --config configs/deit_s_toe.yaml --amp bf16 --compile --batch 128 --json bench.json

Any other ``--key value`` is a config override (as for main.py), e.g. ``--input_size 160``. Variants are timed
round-robin in one process after warm-up, between device syncs; timings on a shared machine are noisy, so the
load average is reported with the results.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ConfigError, load_config  # noqa: E402
from measure import benchmark_training, format_benchmark, num_classes_of  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False,
                                     epilog="other --key value pairs override the config")
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds; each runs one step of every variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compilation happens here)")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype (default fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    parser.add_argument("--num-classes", type=int, default=None, help="head size (default: nb_classes or the dataset's)")
    parser.add_argument("--no-inference", action="store_true", help="skip the eval-mode throughput")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU/glibc: keep freed buffers for reuse (mallopt) instead of paying page faults every step")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        print("error: --steps and --batch must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    try:
        result = benchmark_training(cfg, num_classes_of(cfg, args.num_classes), batch_size=args.batch,
                                    steps=args.steps, warmup=args.warmup, amp=args.amp, compile=args.compile,
                                    device=args.device, inference=not args.no_inference,
                                    keep_memory=args.keep_freed_memory,
                                    log=lambda msg: print(msg, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_benchmark(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
