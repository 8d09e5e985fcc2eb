#!/usr/bin/env python3
"""Side by side: one recipe trained with different methods (or none), under the same seed(s), data and schedule.

    python scripts/compare.py --config configs/demo.yaml --methods none,toe,pss            # trains each, compares
    python scripts/compare.py --config configs/demo.yaml --methods none,toe --seeds 3      # mean +- std over 3 seeds
    python scripts/compare.py --config CFG --methods none,a+b --launcher "torchrun --nproc_per_node=8"
    python scripts/compare.py --runs runs/deit_s runs/deit_s_toe                            # finished runs

Each ``--methods`` entry is ``none`` (the plain recipe), a method section of the config, or a ``+`` combination;
every run gets the resolved config with only ``methods`` (and the seed) changed, so the sections stay as written.
A run directory that already holds all its epochs is read, not retrained (an interrupted comparison resumes).
Writes ``compare.md``, ``compare.json`` and ``compare.png`` (val top-1 against training time and against training
FLOPs, the methods' phase boundaries marked): final and best top-1 of the model and its EMA, training and
wall-clock time, training FLOPs, and the measured against the FLOPs-ideal speed-up over the first entry.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from config import ConfigError, load_config, save_config, validate  # noqa: E402
from logger import run_totals  # noqa: E402
from methods import MethodError, parse_combination  # noqa: E402
from plan import phase_boundaries  # noqa: E402


# --------------------------------------------------------------------------------------------------- reading runs
def read_run(run_dir: str) -> Dict[str, Any]:
    """A run directory: its resolved config and per-epoch log (one JSON line per epoch)."""
    for name in ("config.yaml", "log.jsonl"):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise FileNotFoundError(f"{run_dir} is not a run directory: {name} is missing")
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    if not log:
        raise ValueError(f"{run_dir}/log.jsonl has no epochs")
    by_epoch = {r["epoch"]: r for r in log}          # a record written again after a resume replaces the old one
    return {"dir": run_dir, "cfg": cfg, "log": [by_epoch[e] for e in sorted(by_epoch)]}


def entry_name(cfg) -> str:
    """``none``, ``toe``, ``toe+pss``: the active methods of a run's config."""
    return "+".join(cfg.active_methods()) or "none"


def run_metrics(run: Dict[str, Any]) -> Dict[str, Any]:
    """Accuracy and time of one run, from its per-epoch log (so a resumed run adds up all its epochs)."""
    log = run["log"]
    acc = [r["val_acc1"] for r in log]
    ema = [r["val_ema_acc1"] for r in log if "val_ema_acc1" in r]
    elapsed = [run_totals(log[:i + 1]) for i in range(len(log))]      # wall_seconds restarts in a resumed process
    return {"epochs": len(log), "final_acc1": acc[-1], "best_acc1": max(acc),
            "final_ema_acc1": ema[-1] if ema else None, "best_ema_acc1": max(ema) if ema else None,
            "train_seconds": elapsed[-1]["train_seconds"], "wall_seconds": elapsed[-1]["wall_seconds"],
            "train_elapsed": [t["train_seconds"] for t in elapsed], "wall_elapsed": [t["wall_seconds"] for t in elapsed],
            "acc1": acc, "ema_acc1": ema}


def flops_of(cfg) -> Dict[str, Any]:
    """Training FLOPs of the config's schedule, the ideal speed-up over the plain recipe, and the cumulative
    training FLOPs at the end of every epoch (for the plot)."""
    from measure import epoch_flops, images_per_epoch, model_flops, num_classes_of, schedule_training_flops
    images = images_per_epoch(cfg)
    report = model_flops(cfg, num_classes_of(cfg), images=images)
    out = schedule_training_flops(report, images)
    out["cumulative"] = epoch_flops(report, images, cumulative=True)
    return out


# --------------------------------------------------------------------------------------------------- comparing
def _stats(values: List[Optional[float]]) -> Dict[str, Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


KEYS = ("final_acc1", "best_acc1", "final_ema_acc1", "best_ema_acc1", "train_seconds", "wall_seconds")


def compare(entries: Dict[str, List[Dict[str, Any]]], flops: bool = True) -> Dict[str, Any]:
    """``entries``: name -> the runs of that entry (one per seed). Speed-ups are over the first entry."""
    out: Dict[str, Any] = {"entries": {}, "baseline": next(iter(entries))}
    for name, runs in entries.items():
        metrics = [run_metrics(r) for r in runs]
        e = {"dirs": [r["dir"] for r in runs], "runs": metrics, **{k: _stats([m[k] for m in metrics]) for k in KEYS},
             "boundaries": phase_boundaries(runs[0]["cfg"])}
        if flops:
            f = flops_of(runs[0]["cfg"])
            e.update(train_flops=f["total"], plain_flops=f["full_total"], ideal_speedup=f["ideal_speedup"],
                     cumulative_flops=f["cumulative"])
        out["entries"][name] = e
    base = out["entries"][out["baseline"]]
    for e in out["entries"].values():
        e["speedup_train"] = base["train_seconds"]["mean"] / e["train_seconds"]["mean"]
        e["speedup_wall"] = base["wall_seconds"]["mean"] / e["wall_seconds"]["mean"]
        e["delta_final_acc1"] = e["final_acc1"]["mean"] - base["final_acc1"]["mean"]
        if flops:
            e["ideal_speedup_vs_baseline"] = base["train_flops"] / e["train_flops"]
            e["efficiency_train"] = e["speedup_train"] / e["ideal_speedup_vs_baseline"]
    return out


# --------------------------------------------------------------------------------------------------- reporting
def _ms(s: Dict[str, Optional[float]], spec: str = ".2f") -> str:
    if s["mean"] is None:
        return "-"
    return format(s["mean"], spec) + (f" ± {s['std']:{spec}}" if s["n"] > 1 else "")


def format_table(result: Dict[str, Any]) -> str:
    names = list(result["entries"])
    es = [result["entries"][n] for n in names]
    rows = [("final top-1", [_ms(e["final_acc1"]) for e in es]),
            ("best top-1", [_ms(e["best_acc1"]) for e in es]),
            ("final EMA top-1", [_ms(e["final_ema_acc1"]) for e in es]),
            ("best EMA top-1", [_ms(e["best_ema_acc1"]) for e in es]),
            (f"final top-1 vs {result['baseline']}", [f"{e['delta_final_acc1']:+.2f}" for e in es]),
            ("training time (s)", [_ms(e["train_seconds"], ".1f") for e in es]),
            ("wall-clock (s)", [_ms(e["wall_seconds"], ".1f") for e in es]),
            ("measured speed-up (training time)", [f"{e['speedup_train']:.2f}x" for e in es]),
            ("measured speed-up (wall-clock)", [f"{e['speedup_wall']:.2f}x" for e in es])]
    if "train_flops" in es[0]:
        rows += [("training FLOPs", [f"{e['train_flops']:.3e}" for e in es]),
                 ("ideal speed-up (FLOPs)", [f"{e['ideal_speedup_vs_baseline']:.2f}x" for e in es]),
                 ("efficiency (measured / ideal)", [f"{e['efficiency_train']:.0%}" for e in es])]
    rows.append(("runs (seeds)", [str(len(e["runs"])) for e in es]))
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


def plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_flops = all("cumulative_flops" in e for e in result["entries"].values())
    fig, axes = plt.subplots(1, 2 if with_flops else 1, figsize=(11 if with_flops else 6, 4), squeeze=False)
    ax_t = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, e) in enumerate(result["entries"].items()):
        color = colors[i % len(colors)]
        for j, m in enumerate(e["runs"]):
            label = name if j == 0 else None
            ax_t.plot(m["train_elapsed"], m["acc1"], color=color, label=label, alpha=1.0 if j == 0 else 0.5)
            if with_flops:
                cum = e["cumulative_flops"][:len(m["acc1"])]
                axes[0][1].plot(cum, m["acc1"][:len(cum)], color=color, label=label, alpha=1.0 if j == 0 else 0.5)
        first = e["runs"][0]
        for epochs in e["boundaries"].values():
            for b in epochs:
                if 0 < b <= len(first["train_elapsed"]):
                    ax_t.axvline(first["train_elapsed"][b - 1], color=color, alpha=0.3, linestyle="--")
                    if with_flops and b <= len(e["cumulative_flops"]):
                        axes[0][1].axvline(e["cumulative_flops"][b - 1], color=color, alpha=0.3, linestyle="--")
    ax_t.set_xlabel("training time (s, compute only)")
    if with_flops:
        axes[0][1].set_xlabel("training FLOPs")
    for ax in axes[0]:
        ax.set_ylabel("val top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("val top-1 per epoch; dashed: the methods' phase boundaries")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(result: Dict[str, Any], out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    table = format_table(result)
    dirs = "\n".join(f"- {name}: {', '.join(e['dirs'])}" for name, e in result["entries"].items())
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(f"{dirs}\n\n{table}\n")
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(out_dir, "compare.png"))
    return table


# --------------------------------------------------------------------------------------------------- running
def finished(run_dir: str, epochs: int) -> bool:
    """The run's final state is on disk: ``summary.json`` (written after the last epoch's checkpoint) for all
    ``epochs``. The log is not enough: a run killed after its last record and before its final checkpoint is not
    finished."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)["final"]["epoch"] + 1 >= epochs
    except (OSError, ValueError, KeyError, TypeError):
        return False


def launch(cfg_path: str, run_dir: str, launcher: str) -> None:
    # --resume auto: an interrupted comparison continues its runs (and starts fresh where nothing was saved)
    cmd = shlex.split(launcher) + [os.path.join(ROOT, "main.py"), "--config", cfg_path, "--resume", "auto"]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def train_entries(cfg, entries: List[str], seeds: int, out: str, launcher: str) -> Dict[str, List[str]]:
    """Train every entry x seed (skipping finished runs); returns entry -> run directories."""
    dirs: Dict[str, List[str]] = {}
    for entry in entries:
        for i in range(seeds):
            run_cfg = copy.deepcopy(cfg)
            run_cfg.methods = parse_combination(entry)
            run_cfg.seed = cfg.seed + i
            run_dir = os.path.join(out, entry if seeds == 1 else f"{entry}_seed{run_cfg.seed}")
            run_cfg.output_dir = run_dir
            dirs.setdefault(entry, []).append(run_dir)
            if finished(run_dir, run_cfg.total_epochs()):
                print(f"{run_dir}: finished, reading it", flush=True)
                continue
            os.makedirs(out, exist_ok=True)
            path = os.path.join(out, f"{os.path.basename(run_dir)}.yaml")
            save_config(run_cfg, path)
            launch(path, run_dir, launcher)
    return dirs


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the recipe, with a section for every method named in --methods")
    p.add_argument("--methods", default=None,
                   help="comma-separated entries: none, a method section, or a+b (default: none,<the config's methods>)")
    p.add_argument("--seeds", type=int, default=1, help="runs per entry, seeds seed, seed+1, ... (mean ± std)")
    p.add_argument("--runs", nargs="+", metavar="RUN_DIR", help="compare finished run directories instead")
    p.add_argument("--out", default="", help="output folder (default: runs/compare_<config name>)")
    p.add_argument("--launcher", default=sys.executable, help='how to start main.py, e.g. "torchrun --nproc_per_node=8"')
    p.add_argument("--no-flops", action="store_true", help="skip the fvcore count")
    args, overrides = p.parse_known_args(argv)
    if bool(args.config) == bool(args.runs):
        p.error("give either --config (train the entries) or --runs RUN_DIR ...")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    try:
        if args.runs:
            runs = [read_run(d) for d in args.runs]
            entries: Dict[str, List[Dict[str, Any]]] = {}
            for r in runs:
                entries.setdefault(entry_name(r["cfg"]), []).append(r)
            out = args.out or args.runs[0]
        else:
            cfg = load_config(args.config, overrides)
            names = (args.methods.split(",") if args.methods
                     else ["none"] + (["+".join(cfg.active_methods())] if cfg.active_methods() else []))
            for name in names:
                missing = [m for m in parse_combination(name) if m not in cfg.sections]
                if missing:
                    p.error(f"--methods entry '{name}': {args.config} has no {missing[0]}: section")
            for name in names:                                   # every entry must be a valid run before any trains
                trial = copy.deepcopy(cfg)
                trial.methods = parse_combination(name)
                validate(trial)
            name = os.path.splitext(os.path.basename(args.config))[0]
            out = args.out or os.path.join("runs", f"compare_{name}")
            dirs = train_entries(cfg, names, args.seeds, out, args.launcher)
            entries = {entry: [read_run(d) for d in ds] for entry, ds in dirs.items()}
    except (ConfigError, MethodError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = compare(entries, flops=not args.no_flops)
    print(save(result, out))
    print(f"saved {out}/compare.md, compare.json, compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
