#!/usr/bin/env python3
"""Side by side: the same recipe trained with and without Token Expansion.

    python scripts/compare.py --config configs/demo.yaml                      # runs both, then compares
    python scripts/compare.py --config configs/deit_s_toe.yaml --data_path /data/imagenet --launcher "torchrun --nproc_per_node=8"
    python scripts/compare.py --runs runs/deit_s_toe runs/deit_s              # compares two finished runs

Both runs get the resolved config (same seed, data, recipe); the full-token run only drops the ``toe:`` section.
Prints and saves (``compare.md``, ``compare.json``) final and best top-1 of the model and its EMA, training time and
wall-clock, the measured speed-up, the FLOPs-ideal speed-up and the training FLOPs, and plots (``compare.png``)
val top-1 against wall-clock time and against epoch, with the ToE stage boundaries marked.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from config import load_config, save_config  # noqa: E402


# --------------------------------------------------------------------------------------------------- reading runs
def read_run(run_dir: str) -> Dict[str, Any]:
    """A finished run: its resolved config, per-epoch log and summary."""
    for name in ("config.yaml", "log.jsonl"):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise FileNotFoundError(f"{run_dir} is not a run directory: {name} is missing")
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    if not log:
        raise ValueError(f"{run_dir}/log.jsonl has no epochs")
    return {"dir": run_dir, "cfg": cfg, "log": log}


def run_metrics(run: Dict[str, Any]) -> Dict[str, Any]:
    """Accuracy and time of one run, from its per-epoch log (so a resumed run adds up all its epochs)."""
    log = run["log"]
    acc = [r["val_acc1"] for r in log]
    ema = [r["val_ema_acc1"] for r in log if "val_ema_acc1" in r]
    train_s = sum(r["train_epoch_seconds"] for r in log)
    epoch_s = [r["wall_seconds"] for r in log]
    # wall_seconds restarts at 0 in a resumed process: sum the per-process increments
    wall, prev = 0.0, 0.0
    elapsed = []
    for w in epoch_s:
        wall += w - prev if w >= prev else w
        prev = w
        elapsed.append(wall)
    return {"epochs": len(log), "final_acc1": acc[-1], "best_acc1": max(acc),
            "final_ema_acc1": ema[-1] if ema else None, "best_ema_acc1": max(ema) if ema else None,
            "train_seconds": train_s, "wall_seconds": wall, "elapsed": elapsed, "acc1": acc, "ema_acc1": ema,
            "stages": [r.get("toe_stage") for r in log], "kept_tokens": [r.get("kept_tokens") for r in log]}


def flops_of(cfg) -> Dict[str, Any]:
    """Total training FLOPs of the config's schedule and the FLOPs-ideal speed-up over full tokens (fvcore)."""
    from measure import images_per_epoch, model_flops, num_classes_of, schedule_training_flops
    report = model_flops(cfg, num_classes_of(cfg))
    return schedule_training_flops(report, images_per_epoch(cfg))


def compare(toe_run: Dict[str, Any], full_run: Dict[str, Any], flops: bool = True) -> Dict[str, Any]:
    a, b = run_metrics(toe_run), run_metrics(full_run)
    out = {"toe": a, "full": b,
           "toe_dir": toe_run["dir"], "full_dir": full_run["dir"],
           "speedup_train": b["train_seconds"] / a["train_seconds"],
           "speedup_wall": b["wall_seconds"] / a["wall_seconds"],
           "delta_final_acc1": a["final_acc1"] - b["final_acc1"], "delta_best_acc1": a["best_acc1"] - b["best_acc1"]}
    if flops:
        f = flops_of(toe_run["cfg"])
        out.update(train_flops_toe=f["total"], train_flops_full=f["full_total"], ideal_speedup=f["ideal_speedup"])
        out["efficiency_train"] = out["speedup_train"] / f["ideal_speedup"]
    toe = toe_run["cfg"].toe
    out["stage_starts"] = [s for s in (toe.expansion_steps if toe else []) if 0 < s < a["epochs"]]
    return out


# --------------------------------------------------------------------------------------------------- reporting
def _fmt(v: Optional[float], spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(result: Dict[str, Any]) -> str:
    t, f = result["toe"], result["full"]
    rows = [("final top-1", _fmt(f["final_acc1"]), _fmt(t["final_acc1"]), _fmt(result["delta_final_acc1"], "+.2f")),
            ("best top-1", _fmt(f["best_acc1"]), _fmt(t["best_acc1"]), _fmt(result["delta_best_acc1"], "+.2f")),
            ("final EMA top-1", _fmt(f["final_ema_acc1"]), _fmt(t["final_ema_acc1"]), ""),
            ("best EMA top-1", _fmt(f["best_ema_acc1"]), _fmt(t["best_ema_acc1"]), ""),
            ("training time (s)", _fmt(f["train_seconds"], ".1f"), _fmt(t["train_seconds"], ".1f"),
             f"{result['speedup_train']:.2f}x"),
            ("wall-clock (s)", _fmt(f["wall_seconds"], ".1f"), _fmt(t["wall_seconds"], ".1f"),
             f"{result['speedup_wall']:.2f}x")]
    if "ideal_speedup" in result:
        rows.append(("training FLOPs", f"{result['train_flops_full']:.3e}", f"{result['train_flops_toe']:.3e}",
                     f"{result['ideal_speedup']:.2f}x ideal"))
        rows.append(("efficiency (measured / ideal)", "", "", f"{result['efficiency_train']:.0%}"))
    lines = ["| | full tokens | ToE | ToE vs full |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, color in (("full", "full tokens", "tab:gray"), ("toe", "ToE", "tab:red")):
        m = result[key]
        epochs = list(range(1, len(m["acc1"]) + 1))
        ax_t.plot(m["elapsed"], m["acc1"], label=label, color=color)
        ax_e.plot(epochs, m["acc1"], label=label, color=color)
        if m["ema_acc1"]:
            ax_e.plot(epochs[:len(m["ema_acc1"])], m["ema_acc1"], label=f"{label} (EMA)", color=color, linestyle=":")
    toe = result["toe"]
    for i, start in enumerate(result["stage_starts"]):
        ax_e.axvline(start + 0.5, color="tab:red", alpha=0.3, linestyle="--", label="ToE stage start" if i == 0 else None)
        if start - 1 < len(toe["elapsed"]):
            ax_t.axvline(toe["elapsed"][start - 1], color="tab:red", alpha=0.3, linestyle="--")
    ax_t.set_xlabel("wall-clock (s)")
    ax_e.set_xlabel("epoch")
    for ax in (ax_t, ax_e):
        ax.set_ylabel("val top-1 (%)")
        ax.grid(alpha=0.3)
    ax_e.legend(loc="lower right", fontsize=8)
    title = f"ToE {result['speedup_wall']:.2f}x faster (wall-clock)"
    if "ideal_speedup" in result:
        title += f", ideal {result['ideal_speedup']:.2f}x from FLOPs"
    fig.suptitle(title + f"; final top-1 {toe['final_acc1']:.2f} vs {result['full']['final_acc1']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(result: Dict[str, Any], out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    table = format_table(result)
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(f"ToE run: {result['toe_dir']}\nfull-token run: {result['full_dir']}\n\n{table}\n")
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(out_dir, "compare.png"))
    return table


# --------------------------------------------------------------------------------------------------- running
def launch(cfg_path: str, launcher: str) -> None:
    cmd = shlex.split(launcher) + [os.path.join(ROOT, "main.py"), "--config", cfg_path]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a recipe with a toe: section")
    p.add_argument("--runs", nargs=2, metavar=("TOE_RUN", "FULL_RUN"), help="compare two finished run directories")
    p.add_argument("--out", default="", help="output folder (default: runs/compare_<config name>)")
    p.add_argument("--launcher", default=sys.executable, help='how to start main.py, e.g. "torchrun --nproc_per_node=8"')
    p.add_argument("--no-flops", action="store_true", help="skip the fvcore count")
    args, overrides = p.parse_known_args(argv)
    if bool(args.config) == bool(args.runs):
        p.error("give either --config (run both) or --runs TOE_RUN FULL_RUN")
    if args.runs:
        toe_dir, full_dir = args.runs
        out = args.out or toe_dir
    else:
        cfg = load_config(args.config, overrides)
        if cfg.toe is None:
            p.error(f"{args.config} has no toe: section to compare against")
        name = os.path.splitext(os.path.basename(args.config))[0]
        out = args.out or os.path.join("runs", f"compare_{name}")
        toe_dir, full_dir = os.path.join(out, "toe"), os.path.join(out, "full")
        os.makedirs(out, exist_ok=True)
        for run_dir, toe in ((toe_dir, cfg.toe), (full_dir, None)):
            cfg.output_dir, cfg.toe = run_dir, toe
            path = os.path.join(out, f"{os.path.basename(run_dir)}.yaml")
            save_config(cfg, path)
            launch(path, args.launcher)
    result = compare(read_run(toe_dir), read_run(full_dir), flops=not args.no_flops)
    print(save(result, out))
    print(f"saved {out}/compare.md, compare.json, compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
