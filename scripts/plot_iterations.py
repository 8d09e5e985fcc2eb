#!/usr/bin/env python3
"""Training loss, lr, gradient norm and each method's state against the global iteration, from ``iterations.jsonl``
(a run trained with ``--log_every N``), as one PNG with a panel per field.

    python scripts/plot_iterations.py runs/demo_pss                       # writes runs/demo_pss/iterations.png
    python scripts/plot_iterations.py runs/a runs/b --out a_vs_b.png      # several runs, overlaid
    python scripts/plot_iterations.py runs/a --fields loss,pss_drop_ratio --smooth 50

A run is a directory holding ``iterations.jsonl`` or any JSON-lines file whose records carry an ``iteration`` (the
published PSS code's ``train_log.json`` reads the same way). The loss is drawn as logged (faint) and as a moving mean
over ``--smooth`` records; epoch boundaries are marked when there are at most 60 epochs.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from logger import ITERATIONS, read_iterations  # noqa: E402

FIRST = ("loss", "lr", "grad_norm")                       # panels in this order, then every other number
NOT_PLOTTED = ("iteration", "epoch", "step", "seconds", "loss_avg")   # positions, timing, the epoch's running mean


def read_run(path: str) -> List[Dict[str, Any]]:
    """The records of a run directory's ``iterations.jsonl`` (or of a JSON-lines file), one per iteration."""
    file = os.path.join(path, ITERATIONS) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {ITERATIONS} (train with --log_every N, e.g. --log_every 10)"
                                if os.path.isdir(path) else f"{path}: no such file or run directory")
    by_iteration = {r["iteration"]: r for r in read_iterations(file)}
    if not by_iteration:
        raise ValueError(f"{file}: no records with an 'iteration'")
    return [by_iteration[i] for i in sorted(by_iteration)]


def panel_fields(runs: Sequence[List[Dict[str, Any]]]) -> List[str]:
    """Every numeric field any run logs, loss / lr / grad_norm first, the rest in the order they first appear."""
    seen: List[str] = []
    for records in runs:
        for rec in records:
            for k, v in rec.items():
                if k not in seen and k not in NOT_PLOTTED and isinstance(v, (int, float)) and not isinstance(v, bool):
                    seen.append(k)
    return [f for f in FIRST if f in seen] + [f for f in seen if f not in FIRST]


def moving_mean(values: Sequence[float], window: int) -> List[float]:
    """The mean of the last ``window`` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(runs: Dict[str, List[Dict[str, Any]]], path: str, fields: Sequence[str] = (), smooth: int = 0):
    """Write the PNG; returns the matplotlib figure (one axis per field, one line per run; with a moving mean of
    more than one record the loss panel has it after each run's raw line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = list(fields) or panel_fields(list(runs.values()))
    if not fields:
        raise ValueError("nothing to plot: the records hold no numeric field besides positions and timings")
    fig, axes = plt.subplots(len(fields), 1, figsize=(9, 2.2 * len(fields) + 0.6), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for name, records in runs.items():
        window = smooth or max(1, len(records) // 200)
        for ax, field in zip(axes, fields):
            pts = [(r["iteration"], r[field]) for r in records if isinstance(r.get(field), (int, float))]
            if not pts:
                continue
            x, y = zip(*pts)
            if field == "loss" and window > 1:
                line, = ax.plot(x, y, lw=0.6, alpha=0.35, label=f"{name} (logged)")
                ax.plot(x, moving_mean(y, window), lw=1.4, color=line.get_color(),
                        label=f"{name} (mean of {window})")
            else:
                steps = field not in ("loss", "grad_norm")          # a state holds until the next record
                ax.plot(x, y, lw=1.0, label=name, drawstyle="steps-post" if steps else "default")
        mark_epochs(axes, records)
    for ax, field in zip(axes, fields):
        ax.set_ylabel(field)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    axes[-1].set_xlabel("global iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def mark_epochs(axes, records: List[Dict[str, Any]]) -> None:
    """A faint vertical line where each epoch starts (at most 60 epochs: beyond that they hide the curves)."""
    starts, last = [], None
    for r in records:
        if r.get("epoch") != last:
            if last is not None:
                starts.append(r["iteration"])
            last = r.get("epoch")
    if len(starts) < 60:
        for ax in axes:
            for s in starts:
                ax.axvline(s, color="0.8", lw=0.6, zorder=0)


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (or JSON-lines files with an 'iteration' per record)")
    p.add_argument("--out", help="the PNG (default: <first run>/iterations.png)")
    p.add_argument("--fields", default="", help="comma-separated fields to plot (default: every number logged)")
    p.add_argument("--smooth", type=int, default=0, help="records in the loss's moving mean (default: 1/200 of a run)")
    a = p.parse_args(argv)
    try:
        if a.smooth < 0:
            raise ValueError(f"--smooth {a.smooth} must be >= 0")
        runs = {}
        for path in a.runs:
            runs[os.path.normpath(path)] = read_run(path)
        fields = [f.strip() for f in a.fields.split(",") if f.strip()]
        unknown = [f for f in fields if not any(f in r for records in runs.values() for r in records)]
        if unknown:
            raise ValueError(f"--fields: no record holds '{unknown[0]}' (logged: "
                             f"{', '.join(panel_fields(list(runs.values())))})")
        first = a.runs[0]
        out = a.out or os.path.join(first if os.path.isdir(first) else os.path.dirname(first) or ".", "iterations.png")
        plot(runs, out, fields, a.smooth)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
