#!/usr/bin/env python3
"""Dynamic inference: evaluate a trained checkpoint at every value of an inference knob that a method declares.

    python scripts/sweep.py --config configs/deit_s_pss.yaml --checkpoint runs/deit_s_pss/best.pth --data_path /data/imagenet
    python scripts/sweep.py --config CFG --checkpoint CKPT --values 1.0,0.6,0.2 --ema          # the EMA weights

The knob and its default values come from the config's active methods (PSS: the patch keep rate, 1.0 ... 0.2, as
in the published sweep). For every value: top-1 / top-5 over the whole validation split, forward GFLOPs per image
(fvcore, as ``scripts/flops.py`` counts them) and images/s over the whole validation pass, data loading included
(the published throughput's definition). Writes ``sweep.md``, ``sweep.json`` and ``sweep.png`` (top-1 against
GFLOPs and against images/s). Any other ``--key value`` overrides the config, as for main.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import checkpoint as ckpt_io  # noqa: E402
from config import ConfigError, load_config  # noqa: E402
from datasets import DatasetError, ShardSampler, build_dataset  # noqa: E402
from devices import resolve_amp, resolve_device  # noqa: E402
from engine import evaluate  # noqa: E402
from measure import count_flops, input_channels  # noqa: E402
from methods import MethodError, MethodSet  # noqa: E402
from models import create_model  # noqa: E402


def sweep(cfg, checkpoint: str, values: Optional[List[float]] = None, knob_name: Optional[str] = None,
          use_ema: bool = False, device: str = "auto", amp: str = "none", batch_size: Optional[int] = None,
          log=print) -> Dict[str, Any]:
    methods = MethodSet.from_config(cfg)
    knobs = {k.name: k for k in methods.inference_knobs()}
    if not knobs:
        raise MethodError(f"no active method of this config declares an inference knob (active: "
                          f"{', '.join(methods.names) or 'none'})")
    if knob_name is None and len(knobs) > 1:
        raise MethodError(f"several knobs ({', '.join(knobs)}): choose one with --knob")
    knob = knobs[knob_name] if knob_name else next(iter(knobs.values()))
    values = list(values or knob.values)
    dev = resolve_device(device, key="--device")
    amp_dtype = resolve_amp(amp, dev, "--amp")
    val_set, nb_classes = build_dataset(cfg, is_train=False)
    loader = DataLoader(val_set, sampler=ShardSampler(val_set), batch_size=batch_size or int(1.5 * cfg.batch_size),
                        num_workers=cfg.num_workers, pin_memory=dev.type == "cuda")
    model = create_model(cfg, nb_classes, methods)
    state = ckpt_io.load_checkpoint(checkpoint)
    key = "model_ema" if use_ema else "model"
    if use_ema and not isinstance(state.get("model_ema"), dict):
        raise ckpt_io.CheckpointError(f"{checkpoint} holds no EMA weights (model_ema)")
    ckpt_io.load_weights_strict(model, ckpt_io.model_state(state, key), f"checkpoint {checkpoint}")
    model.to(dev).eval()
    in_chans, size = input_channels(model), cfg.input_size
    ops = methods.op_modules(model)
    rows = []
    for v in values:
        knob.apply(model, v)
        gflops = count_flops(model, size, in_chans, ops).total / 1e9
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        stats = evaluate(model, loader, dev, amp_dtype)
        seconds = time.perf_counter() - start
        rows.append({knob.name: v, "acc1": stats["acc1"], "acc5": stats["acc5"], "loss": stats["loss"],
                     "count": stats["count"], "gflops": gflops, "images_per_s": stats["count"] / seconds,
                     "seconds": seconds})
        log(f"{knob.name} {v:g}: top-1 {stats['acc1']:.2f}  top-5 {stats['acc5']:.2f}  {gflops:.3f} GFLOPs  "
            f"{stats['count'] / seconds:.1f} img/s")
    knob.apply(model, knob.default)
    return {"config_model": cfg.model, "checkpoint": os.path.abspath(checkpoint), "weights": key, "knob": knob.name,
            "methods": methods.names, "device": str(dev), "amp": amp, "rows": rows}


def format_table(result: Dict[str, Any]) -> str:
    k = result["knob"]
    lines = [f"| {k} | top-1 | top-5 | GFLOPs | images/s |", "|---|---|---|---|---|"]
    lines += [f"| {r[k]:g} | {r['acc1']:.2f} | {r['acc5']:.2f} | {r['gflops']:.4g} | {r['images_per_s']:.1f} |"
              for r in result["rows"]]
    return "\n".join(lines)


def plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, k = result["rows"], result["knob"]
    fig, (ax_f, ax_s) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x, label in ((ax_f, "gflops", "forward GFLOPs per image"), (ax_s, "images_per_s", "images/s (val pass)")):
        ax.plot([r[x] for r in rows], [r["acc1"] for r in rows], marker="o")
        for r in rows:
            ax.annotate(f"{r[k]:g}", (r[x], r["acc1"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel(label)
        ax.set_ylabel("val top-1 (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['config_model']} ({result['weights']}): top-1 across {k}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the recipe the checkpoint was trained with")
    p.add_argument("--checkpoint", required=True, help="checkpoint file (ours, or any with model weights)")
    p.add_argument("--values", default=None, help="comma-separated knob values (default: the method's)")
    p.add_argument("--knob", default=None, help="which knob, when several active methods declare one")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--batch", type=int, default=None, help="evaluation batch (default 1.5 x batch_size, as DeiT)")
    p.add_argument("--out", default="", help="output folder (default: the checkpoint's folder)")
    args, overrides = p.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        values = [float(v) for v in args.values.split(",")] if args.values else None
        result = sweep(cfg, args.checkpoint, values, args.knob, args.ema, args.device, args.amp, args.batch)
    except (ConfigError, MethodError, DatasetError, ckpt_io.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    os.makedirs(out, exist_ok=True)
    table = format_table(result)
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write(f"{result['checkpoint']} ({result['weights']})\n\n{table}\n")
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(out, "sweep.png"))
    print(table)
    print(f"saved {out}/sweep.md, sweep.json, sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
