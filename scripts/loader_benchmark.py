"""Images/s of the config's real training loader in every loader setting, and the CPU cores per accelerator that
feed the model in every state of the run's methods.

    python scripts/loader_benchmark.py --config configs/deit_s_toe.yaml --data_path data/imagenet --num_workers 1 2 \\
        --model_images_per_s 1053.64 --batch_size 32 --json loader.json
    python scripts/loader_benchmark.py --config configs/deit_s.yaml --make_images 200 --num_workers 1 2 --batch_size 32

The loader is ``datasets.build_loaders``' training loader of the config: the dataset, the recipe's transforms, the
sampler, the workers, the collate, pinned memory on a GPU, and the hand-over to the device (``fast``: the on-device
normalisation and erasing, timed on a GPU; on a CPU-only machine it would steal the workers' cores and is reported
per sample instead). The settings (``reference``, ``fast``, ``dali`` where installed) take turns, round after round,
each round a fresh loader from start-up to its last batch, so a shared machine's load falls on all of them alike.

The model's rate comes from ``--model_images_per_s N`` (the plain model on an accelerator that is not here; each
method state then at its FLOPs-ideal speed-up), or else from scripts/benchmark.py's measurement on this device
(``--device``, ``--amp``, ``--bench_batch``). Any other ``--key value`` overrides the config, as for main.py.
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ConfigError, load_config  # noqa: E402
from datasets import DatasetError, sample_seed, seeded  # noqa: E402
from devices import resolve_device  # noqa: E402
from files import first_line  # noqa: E402
from fast_loader import LOADERS, device_images, erasing_noise, image_transforms  # noqa: E402
from loaders import build_loaders  # noqa: E402
from throughput import load_average  # noqa: E402


def settings() -> List[str]:
    """The loader settings this machine can run."""
    try:
        from dali_loader import dali_installed
    except ImportError:
        return list(LOADERS)
    return list(LOADERS) + (["dali"] if dali_installed() else [])


def make_image_folder(root: str, n: int, size=(500, 375), classes: int = 2) -> str:
    """``n`` training JPEGs (and a few for val) of ``size`` with random content: smooth colour fields with pixel noise,
    so they compress and decode like photographs rather than like pure noise."""
    rng = np.random.default_rng(0)
    w, h = size
    for split, count in (("train", n), ("val", 2 * classes)):
        for i in range(count):
            folder = os.path.join(root, split, f"c{i % classes}")
            os.makedirs(folder, exist_ok=True)
            coarse = Image.fromarray(rng.integers(0, 256, (h // 25, w // 25, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
            pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 8, (h, w, 3)).astype(np.int16)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return root


def build_train_loader(cfg, setting: str, num_workers: int):
    """The training loader a run of ``cfg`` with ``loader: setting`` and ``num_workers`` workers trains from."""
    return build_loaders(dataclasses.replace(cfg, loader=setting, num_workers=num_workers), 0, 1, cfg.seed)[0]


def batch_bytes(obj) -> int:
    """Bytes of the tensors in a batch (images, targets, indices, a fast loader's boxes and seeds)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(batch_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(batch_bytes(v) for v in obj)
    return 0


def fresh(loader):
    """The same DataLoader anew (its dataset, sampler, workers, collate, pinning, prefetch), so that a round starts its
    own workers even where the loader keeps them (persistent workers)."""
    if not isinstance(loader, torch.utils.data.DataLoader):
        return loader                                   # a loader that builds its pipeline on every pass
    return torch.utils.data.DataLoader(
        loader.dataset, sampler=loader.sampler, batch_size=loader.batch_size, drop_last=loader.drop_last,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn, persistent_workers=loader.persistent_workers,
        prefetch_factor=loader.prefetch_factor)


def timed_pass(loader, batches: int, device: torch.device, epoch: int) -> Dict[str, float]:
    """One round: a fresh iterator (worker start-up included) to its ``batches``-th batch, each handed to the device
    when it is a GPU; the workers are stopped after it."""
    loader.sampler.set_epoch(epoch)
    start = time.perf_counter()
    it = iter(fresh(loader))
    images = nbytes = 0
    try:
        for _, batch in zip(range(batches), it):
            if device.type == "cuda":
                device_images(batch[0], device)
            images += len(batch[-1])
            nbytes += batch_bytes(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    return {"images": images, "seconds": seconds, "bytes_per_sample": nbytes / max(images, 1)}


def measure_loaders(cfg, names: List[str], worker_counts: List[int], rounds: int, batches: int,
                    device: torch.device) -> Dict[str, Dict[int, List[Dict[str, float]]]]:
    """Every setting at every worker count, interleaved: round r runs each (workers, setting) pair once."""
    loaders = {(n, w): build_train_loader(cfg, n, w) for w in worker_counts for n in names}
    for loader in loaders.values():
        if len(loader) < batches:
            raise DatasetError(f"--batches {batches}: the training set gives {len(loader)} batches of "
                               f"{loader.batch_size} per epoch; use more images or a smaller --batch_size")
    found: Dict[str, Dict[int, List[Dict[str, float]]]] = {n: {w: [] for w in worker_counts} for n in names}
    for r in range(rounds):
        for w in worker_counts:
            for n in names:
                res = timed_pass(loaders[(n, w)], batches, device, epoch=r)
                found[n][w].append(res)
                print(f"round {r + 1}/{rounds}  {n:9s} x {w} workers: {res['images'] / res['seconds']:7.1f} images/s",
                      flush=True)
    return found


def step_ms(cfg, setting: str, samples: int, device: torch.device) -> Dict[str, float]:
    """Milliseconds per sample of each step of the training pipeline, in this process on one thread as in a loader
    worker, with the samples' own seeds: the decode, each transform of the image pipeline, and (fast) the device
    step per sample of a batch of 32."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _step_ms(cfg, setting, samples, device)
    finally:
        torch.set_num_threads(threads)


def _step_ms(cfg, setting: str, samples: int, device: torch.device) -> Dict[str, float]:
    dataset = build_train_loader(cfg, setting, 0).dataset
    inner = dataset
    while "dataset" in inner.__dict__:
        inner = inner.__dict__["dataset"]
    pipelines = image_transforms(inner)
    if not hasattr(inner, "samples") or not pipelines or not hasattr(inner, "transform"):
        return {}
    ops, times = pipelines[0].transforms, {}
    erasing_noise(0, torch.arange(1))                   # the noise table, built once per process
    for k in range(-1, samples):                        # sample -1 warms up, untimed
        path, _ = inner.samples[k % len(inner.samples)]
        with seeded(sample_seed(cfg.seed, 0, 0, k)):
            t0 = time.perf_counter()
            x = inner.loader(path)
            times.setdefault("decode", []).append(time.perf_counter() - t0)
            for op in ops:
                t0 = time.perf_counter()
                x = op(x)
                times.setdefault(type(op).__name__, []).append(time.perf_counter() - t0)
    out = {name: 1e3 * statistics.mean(ts[1:]) for name, ts in times.items()}       # their sum: the time of a sample
    if isinstance(x, dict):
        batch = torch.utils.data.default_collate([ops[-1](inner.loader(inner.samples[0][0]))] * 32)
        device_images(batch, device)
        t0 = time.perf_counter()
        device_images(batch, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out[f"device step ({device.type}): normalise + erase"] = 1e3 * (time.perf_counter() - t0) / 32
    return out


def model_rates(cfg, args, device: torch.device) -> Dict[str, Any]:
    """The model's images/s on one accelerator in every state of the run's methods."""
    from measure import benchmark_training, model_flops, num_classes_of
    nc = num_classes_of(cfg)
    if args.model_images_per_s:
        flops = model_flops(cfg, nc)
        full = flops["full"].fvcore.total
        states = [{"name": "full tokens", "speedup": 1.0}]
        states += [{"name": v.label, "speedup": full / v.fvcore.total} for v in flops["variants"] if not v.same_as_full]
        for s in states:
            s["images_per_s"] = args.model_images_per_s * s["speedup"]
        return {"source": f"--model_images_per_s {args.model_images_per_s:g} (states at their FLOPs-ideal speed-up)",
                "states": states}
    result = benchmark_training(cfg, nc, batch_size=args.bench_batch, steps=args.bench_steps, warmup=2, amp=args.amp,
                                compile=args.compile, device=str(device), inference=False)
    states = [{"name": r["name"], "speedup": r["speedup"], "images_per_s": r["images_per_s"]}
              for r in result["variants"]]
    return {"source": f"scripts/benchmark.py on {result['device_name']} (batch {args.bench_batch}, amp {args.amp}"
                      f"{', compiled' if args.compile else ''})", "states": states}


def summarise(found, steps, worker_counts) -> Dict[str, Any]:
    """Per setting: the median images/s over the rounds at every worker count, per worker, the bytes per sample."""
    out = {}
    for name, by_workers in found.items():
        rows = {}
        for w, passes in by_workers.items():
            rate = statistics.median(p["images"] / p["seconds"] for p in passes)
            rows[str(w)] = {"images_per_s": rate, "images_per_s_per_worker": rate / max(w, 1),
                            "rounds": [p["images"] / p["seconds"] for p in passes]}
        top = rows[str(max(worker_counts))]
        out[name] = {"images_per_s": top["images_per_s"], "images_per_s_per_worker": top["images_per_s_per_worker"],
                     "step_ms": steps[name], "bytes_per_sample": by_workers[worker_counts[0]][0]["bytes_per_sample"],
                     "num_workers": max(worker_counts), "by_num_workers": rows}
    return out


def verdict(result: Dict[str, Any], names: List[str]) -> List[Dict[str, Any]]:
    """Cores per accelerator: the model's rate in each state over one worker's images/s, per setting."""
    rows = []
    for s in result["model"]["states"]:
        cores = {n: s["images_per_s"] / result[n]["images_per_s_per_worker"] for n in names}
        rows.append({**s, "cores_per_accelerator": cores})
    return rows


def report(result: Dict[str, Any], names: List[str]) -> str:
    lines = [f"{result['config']} at {result['input_size']} px, batch {result['batch_size']}, {result['images']} on "
             f"{result['device']}; load average {result['load_average_start']} -> {result['load_average_end']}", ""]
    for w in result["num_workers_measured"]:
        cells = "  ".join(f"{n} {result[n]['by_num_workers'][str(w)]['images_per_s_per_worker']:7.1f}" for n in names)
        lines.append(f"images/s per worker at {w} workers: {cells}")
    lines.append("bytes per sample: " + "  ".join(f"{n} {result[n]['bytes_per_sample']:,.0f}" for n in names))
    for n in names:
        steps = result[n]["step_ms"]
        lines.append(f"ms per sample, {n}: " + (", ".join(f"{k} {v:.2f}" for k, v in steps.items())
                                                 or "not timed step by step (one pipeline)"))
    lines += ["", f"model: {result['model']['source']}",
              f"{'state':42s} {'images/s':>9s} " + " ".join(f"{'cores ' + n:>15s}" for n in names)]
    for row in result["verdict"]:
        lines.append(f"{row['name'][:42]:42s} {row['images_per_s']:9.0f} "
                     + " ".join(f"{row['cores_per_accelerator'][n]:15.1f}" for n in names))
    return "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False,
                                epilog="other --key value pairs override the config")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--num_workers", type=int, nargs="+", default=None, help="worker counts to measure (default: the config's)")
    p.add_argument("--settings", nargs="+", default=None, help="loader settings to measure (default: all installed)")
    p.add_argument("--make_images", type=int, default=0, help="measure on N random 500x375 JPEGs in a temporary ImageFolder")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every setting once (default 3)")
    p.add_argument("--batches", type=int, default=6, help="batches per round and setting (default 6)")
    p.add_argument("--step_samples", type=int, default=32, help="samples timed step by step (default 32)")
    p.add_argument("--model_images_per_s", type=float, default=None,
                   help="the plain model's training images/s on one accelerator (default: measure it here)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda: where batches are handed and the model timed")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="the model benchmark's autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the benchmarked model")
    p.add_argument("--bench_batch", type=int, default=64, help="the model benchmark's batch (default 64)")
    p.add_argument("--bench_steps", type=int, default=5, help="the model benchmark's timed steps (default 5)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_known_args(argv)


def run(args, overrides, tmp: str) -> Dict[str, Any]:
    if args.make_images:
        overrides = [*overrides, "--data_set", "folder", "--data_path", make_image_folder(tmp, args.make_images)]
    cfg = load_config(args.config, overrides)
    device = resolve_device(args.device, key="--device")
    names, workers = args.settings or settings(), args.num_workers or [cfg.num_workers]
    unknown = sorted(set(names) - set(settings()))
    if unknown or not {"reference", "fast"} <= set(names):
        raise ValueError(f"--settings: {', '.join(names)} must include reference and fast, from {', '.join(settings())}")
    load_start = load_average()
    found = measure_loaders(cfg, names, workers, args.rounds, args.batches, device)
    steps = {n: step_ms(cfg, n, args.step_samples, device) if n in LOADERS else {} for n in names}
    result = {"config": args.config, "input_size": cfg.input_size, "batch_size": cfg.batch_size,
              "images": f"{args.make_images} random 500x375 JPEGs" if args.make_images else cfg.data_path,
              "device": str(device), "num_workers_measured": workers, "rounds": args.rounds, "batches": args.batches,
              "load_average_start": load_start, "load_average_end": load_average(), "torch": torch.__version__,
              **summarise(found, steps, workers)}
    result["fast_vs_reference"] = {
        "images_per_s_per_worker": {str(w): result["fast"]["by_num_workers"][str(w)]["images_per_s_per_worker"]
                                    / result["reference"]["by_num_workers"][str(w)]["images_per_s_per_worker"]
                                    for w in workers},
        "bytes_per_sample": result["reference"]["bytes_per_sample"] / result["fast"]["bytes_per_sample"]}
    result["model"] = model_rates(cfg, args, device)
    result["verdict"] = verdict(result, names)
    return result


def main(argv=None) -> int:
    args, overrides = parse(argv)
    if args.rounds < 1 or args.batches < 1 or (args.num_workers and min(args.num_workers) < 0):
        print("error: --rounds and --batches must be >= 1, --num_workers >= 0", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="loader_benchmark_") as tmp:
            result = run(args, overrides, tmp)
    except (ConfigError, DatasetError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    print(report(result, args.settings or settings()))
    ratios = result["fast_vs_reference"]
    print("fast / reference: images/s per worker " + ", ".join(f"{v:.2f}x at {w}" for w, v in
                                                             ratios["images_per_s_per_worker"].items())
          + f"; {ratios['bytes_per_sample']:.2f}x fewer bytes per sample")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
