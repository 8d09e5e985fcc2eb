#!/usr/bin/env python3
"""The papers' tables from finished runs, with the published figures beside each row.

    python scripts/tables.py runs/deit_s runs/deit_s_toe runs/deit_s_pss           # markdown to stdout
    python scripts/tables.py runs/* --out runs/tables                              # also tables.md and tables.csv
    python scripts/tables.py runs/deit_s_toe --baseline runs/deit_s                # speed-ups against this run
    python scripts/tables.py --published [--paper NAME] [--csv]                    # the published figures alone

A run directory holds ``config.yaml`` and ``log.jsonl`` (``summary.json`` is read when present). One row per run:
model, active methods, top-1 of the model and of its EMA (final and best epoch), training FLOPs of its schedule,
training time (compute-only when the log has ``train_compute_seconds``, else the sum of ``train_epoch_seconds``) and
wall-clock, the measured speed-up against its baseline run and the FLOPs-ideal one, then the published figures of
every published row it reproduces, with their source. Published rows come from the methods' packages through the
registry (:func:`methods.published_rows`); a run reproduces the row its config names in ``reproduces: {paper, row}``,
else every row whose model (where known), active methods and method settings it matches. A published cell that was
not recovered prints ``n/a (not recovered)``: nothing is ever filled in.

Baseline of a run: ``--baseline DIR`` for every run; else the given run without methods of the same epochs and input
size, preferring the same model. Without a baseline the ideal speed-up is against the run's own recipe without its
methods (what ``scripts/flops.py`` reports) and the measured one is left empty.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.dirname(os.path.abspath(__file__))
for path in (ROOT, SCRIPTS):
    if path not in sys.path:
        sys.path.insert(0, path)

from compare import flops_of, read_run, run_metrics  # noqa: E402  (the run reading shared with compare.py)
from config import reproduced_rows  # noqa: E402
from methods import PublishedRow, published_rows  # noqa: E402

NA = "n/a (not recovered)"
NO_ROW = "no published row"


# --------------------------------------------------------------------------------------------------- matching
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def matches(cfg, row: PublishedRow) -> bool:
    """Whether a run of ``cfg`` is a run of ``row``: same active methods, same model (unless the row's model was
    not recovered) and every method setting the row names."""
    if row.methods is None:
        return False
    if sorted(row.methods) != sorted(cfg.active_methods()):
        return False
    if row.model is not None and row.model != cfg.model:
        return False
    for section, values in row.settings.items():
        sec = cfg.sections.get(section)
        if sec is None:
            return False
        for key, value in values.items():
            if not hasattr(sec, key) or not _same(getattr(sec, key), value):
                return False
    return True


def published_for(cfg, rows: Sequence[PublishedRow]) -> List[PublishedRow]:
    """The published rows a run is compared with: the one its ``reproduces`` key names (plus the context figures it
    matches), else every row it matches; rows of its exact model take precedence over rows whose model is unknown."""
    auto = [r for r in rows if matches(cfg, r)]
    if any(r.model is not None for r in auto):
        auto = [r for r in auto if r.model is not None]
    named = reproduced_rows(getattr(cfg, "reproduces", None))      # checked as the config checks it
    if named is None:
        return auto
    chosen = [r for r in rows if (r.paper, r.row) in named]
    if not chosen:
        return auto        # the named rows are not among the rows asked about (a caller's subset)
    if any(r.methods is not None and not matches(cfg, r) for r in chosen):
        return auto        # an override changed the recipe (e.g. --toe.repeat_k 3): no longer a run of the named row
    return chosen + [r for r in auto if r.kind == "context" and r not in chosen]


# --------------------------------------------------------------------------------------------------- runs
def compute_seconds(run: Dict[str, Any]) -> Optional[float]:
    """Compute-only training time: the log's ``train_compute_seconds`` summed over epochs (every record must have
    it), else the summary's total, else ``None``."""
    log = run["log"]
    if log and all("train_compute_seconds" in r for r in log):
        return float(sum(r["train_compute_seconds"] for r in log))
    summary = run.get("summary") or {}
    value = summary.get("train_compute_seconds")
    return float(value) if isinstance(value, (int, float)) else None


def load(run_dir: str, flops: bool = True) -> Dict[str, Any]:
    run = read_run(run_dir)
    path = os.path.join(run_dir, "summary.json")
    if os.path.isfile(path):
        with open(path) as f:
            run["summary"] = json.load(f)
    m = run_metrics(run)
    cfg = run["cfg"]
    out = {"dir": run_dir, "name": os.path.basename(os.path.normpath(run_dir)), "cfg": cfg, "model": cfg.model,
           "methods": "+".join(cfg.active_methods()) or "none", "epochs": m["epochs"],
           "final_acc1": m["final_acc1"], "best_acc1": m["best_acc1"], "final_ema_acc1": m["final_ema_acc1"],
           "best_ema_acc1": m["best_ema_acc1"], "epoch_seconds": m["train_seconds"], "wall_seconds": m["wall_seconds"],
           "compute_seconds": compute_seconds(run)}
    out["train_seconds"] = out["compute_seconds"] if out["compute_seconds"] is not None else out["epoch_seconds"]
    out["time_kind"] = "compute-only" if out["compute_seconds"] is not None else "train epochs"
    if flops:
        f = flops_of(cfg)
        out.update(train_flops=f["total"], plain_flops=f["full_total"], own_ideal_speedup=f["ideal_speedup"])
    return out


def pick_baseline(run: Dict[str, Any], runs: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The plain run (no methods) of the same epochs and input size among ``runs``, preferring the same model."""
    cfg = run["cfg"]
    plain = [r for r in runs if r is not run and not r["cfg"].active_methods()
             and r["cfg"].epochs == cfg.epochs and r["cfg"].input_size == cfg.input_size]
    same = [r for r in plain if r["model"] == run["model"]]
    if same:
        return same[0]
    return plain[0] if len(plain) == 1 else None


def speedups(run: Dict[str, Any], base: Optional[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    out: Dict[str, Optional[float]] = {"measured": None, "wall": None, "ideal": run.get("own_ideal_speedup")}
    if base is None:
        return out
    # the same kind of time on both sides: compute-only only when both logs have it
    if run["compute_seconds"] is not None and base["compute_seconds"] is not None:
        out["measured"] = base["compute_seconds"] / run["compute_seconds"]
    else:
        out["measured"] = base["epoch_seconds"] / run["epoch_seconds"]
    out["wall"] = base["wall_seconds"] / run["wall_seconds"]
    if "train_flops" in run and "train_flops" in base:
        out["ideal"] = base["train_flops"] / run["train_flops"]
    return out


# --------------------------------------------------------------------------------------------------- cells
def _num(value: Optional[float], spec: str = ".2f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def pub_top1(row: PublishedRow) -> str:
    if row.top1 is None and row.top1_final is None and row.top1_best is None:
        return "-" if row.kind == "claim" else NA
    main = _num(row.top1 if row.top1 is not None else row.top1_best, "g")
    extra = [f"{k} {format(v, 'g')}" for k, v in (("final", row.top1_final), ("best", row.top1_best)) if v is not None]
    return main + (f" ({', '.join(extra)})" if extra else "")


def pub_time(row: PublishedRow) -> str:
    if row.train_time is None:
        return "-" if row.kind == "claim" else NA
    return f"{row.train_time:g} {row.time_unit}".strip()


def pub_cell(value: Optional[Any], row: PublishedRow, spec: str = "g", suffix: str = "") -> str:
    if value is None:
        return "-" if row.kind == "claim" else NA
    return (format(value, spec) if isinstance(value, float) else str(value)) + suffix


def pub_speedup(row: PublishedRow) -> str:
    """A baseline row (no method) has no speed-up of its own: ``-``."""
    if row.speedup is None and row.methods == ():
        return "-"
    return pub_cell(row.speedup, row, ".3g", "x")


def published_cells(row: Optional[PublishedRow]) -> Dict[str, str]:
    if row is None:
        return {"published row": NO_ROW, "pub. top-1": "-", "pub. time": "-", "pub. GPUs": "-", "pub. speed-up": "-",
                "source": "-"}
    label = f"{row.paper} {row.table}: {row.row}" + (" [context]" if row.kind == "context" else "")
    return {"published row": label, "pub. top-1": pub_top1(row), "pub. time": pub_time(row),
            "pub. GPUs": pub_cell(row.gpus, row), "pub. speed-up": pub_speedup(row),
            "source": row.source + (f" ({row.precision})" if row.precision else "")}


RUN_COLUMNS = ("run", "model", "methods", "epochs", "top-1 final", "top-1 best", "EMA final", "EMA best",
               "training FLOPs", "training time (s)", "wall-clock (s)", "speed-up measured", "speed-up wall-clock",
               "speed-up ideal")
PUB_COLUMNS = ("published row", "pub. top-1", "pub. time", "pub. GPUs", "pub. speed-up", "source")


def run_cells(run: Dict[str, Any], sp: Dict[str, Optional[float]], is_baseline: bool) -> Dict[str, str]:
    time = _num(run["train_seconds"], ".1f") + ("" if run["time_kind"] == "compute-only" else " (epochs)")
    return {"run": run["name"], "model": run["model"], "methods": run["methods"], "epochs": str(run["epochs"]),
            "top-1 final": _num(run["final_acc1"]), "top-1 best": _num(run["best_acc1"]),
            "EMA final": _num(run["final_ema_acc1"]), "EMA best": _num(run["best_ema_acc1"]),
            "training FLOPs": _num(run.get("train_flops"), ".3e"), "training time (s)": time,
            "wall-clock (s)": _num(run["wall_seconds"], ".1f"),
            "speed-up measured": "baseline" if is_baseline else _num(sp["measured"], ".2f") + ("x" if sp["measured"] else ""),
            "speed-up wall-clock": "baseline" if is_baseline else _num(sp["wall"], ".2f") + ("x" if sp["wall"] else ""),
            "speed-up ideal": _num(sp["ideal"], ".2f") + ("x" if sp["ideal"] else "")}


def build_table(run_dirs: Sequence[str], baseline: Optional[str] = None, flops: bool = True,
                rows: Optional[Sequence[PublishedRow]] = None) -> List[Dict[str, Any]]:
    """One record per (run, published row it is compared with); the run's cells repeat on every record of it
    (``first`` marks its first record). A record also keeps the raw numbers (``data``)."""
    rows = published_rows() if rows is None else rows
    runs = [load(d, flops) for d in run_dirs]
    base_run = load(baseline, flops) if baseline else None
    records = []
    for run in runs:
        if base_run is not None:
            base = base_run
            is_baseline = os.path.realpath(base_run["dir"]) == os.path.realpath(run["dir"])
        else:
            is_baseline = not run["cfg"].active_methods()
            base = None if is_baseline else pick_baseline(run, runs)
        sp = speedups(run, None if is_baseline else base)
        cells = run_cells(run, sp, is_baseline)
        pubs = published_for(run["cfg"], rows) or [None]
        for i, pub in enumerate(pubs):
            records.append({"first": i == 0, "cells": {**cells, **published_cells(pub)}, "published": pub,
                            "data": {k: v for k, v in run.items() if k != "cfg"}, "speedups": sp,
                            "baseline": base["dir"] if base is not None and not is_baseline else None})
    return records


# --------------------------------------------------------------------------------------------------- output
def markdown(columns: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(esc(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def to_csv(columns: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(lines)
    return buf.getvalue()


def runs_markdown(records: Sequence[Dict[str, Any]]) -> str:
    """Markdown: a run's cells on its first line only; further published rows of the same run below it."""
    lines = []
    for rec in records:
        run_part = [rec["cells"][c] if rec["first"] else "" for c in RUN_COLUMNS]
        lines.append(run_part + [rec["cells"][c] for c in PUB_COLUMNS])
    note = ("training time: compute-only where the log has it, else the sum of the training epochs' seconds "
            "(marked '(epochs)'); measured speed-up: the baseline's training time over the run's; ideal: training "
            f"FLOPs ratio. Published cells not recovered: '{NA}'.")
    return markdown(RUN_COLUMNS + PUB_COLUMNS, lines) + "\n\n" + note


def runs_csv(records: Sequence[Dict[str, Any]]) -> str:
    return to_csv(RUN_COLUMNS + PUB_COLUMNS, [[rec["cells"][c] for c in RUN_COLUMNS + PUB_COLUMNS] for rec in records])


PUBLISHED_COLUMNS = ("paper", "table", "row", "model", "method", "top-1", "training time", "GPUs", "GFLOPs",
                     "speed-up", "kind", "source", "precision", "notes")


def published_lines(rows: Sequence[PublishedRow]) -> List[List[str]]:
    return [[r.paper, r.table, r.row, r.model or NA, r.method, pub_top1(r), pub_time(r), pub_cell(r.gpus, r),
             pub_cell(r.gflops, r), pub_speedup(r), r.kind, r.source, r.precision, r.notes]
            for r in rows]


def sweeps_markdown(rows: Sequence[PublishedRow]) -> str:
    parts = []
    for r in rows:
        if not r.sweep:
            continue
        keys = sorted({k for values in r.sweep.values() for k in values}, reverse=True)
        cols = ["rho"] + list(r.sweep)
        lines = [[f"{k:g}"] + [NA if r.sweep[m].get(k) is None else f"{r.sweep[m][k]:g}" for m in r.sweep]
                 for k in keys]
        parts.append(f"**{r.paper} {r.table}: {r.row}** (inference at keep rate rho; {r.source})\n\n"
                     + markdown(cols, lines))
    return "\n\n".join(parts)


def published_markdown(rows: Sequence[PublishedRow]) -> str:
    out = markdown(PUBLISHED_COLUMNS, published_lines(rows))
    sweeps = sweeps_markdown(rows)
    return out + (f"\n\n{sweeps}" if sweeps else "") + f"\n\n'{NA}': a published cell that could not be read."


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="finished run directories")
    p.add_argument("--published", action="store_true", help="print the published figures alone")
    p.add_argument("--paper", action="append", default=None, help="with --published: only this paper (repeatable)")
    p.add_argument("--baseline", default="", metavar="RUN_DIR", help="the baseline run of every speed-up")
    p.add_argument("--out", default="", help="also write tables.md / tables.csv (published.md / .csv) here")
    p.add_argument("--csv", action="store_true", help="print CSV instead of markdown")
    p.add_argument("--no-flops", action="store_true", help="skip the fvcore count (no FLOPs, no ideal speed-up)")
    args = p.parse_args(argv)
    if args.published == bool(args.runs):
        p.error("give run directories, or --published")
    rows = published_rows()
    if args.published:
        if args.paper:
            rows = [r for r in rows if r.paper in args.paper]
        md, text_csv, stem = published_markdown(rows), to_csv(PUBLISHED_COLUMNS, published_lines(rows)), "published"
    else:
        try:
            records = build_table(args.runs, args.baseline or None, flops=not args.no_flops, rows=rows)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        md, text_csv, stem = runs_markdown(records), runs_csv(records), "tables"
    text = text_csv if args.csv else md
    print(text, end="" if text.endswith("\n") else "\n")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for ext, content in (("md", md), ("csv", text_csv)):
            with open(os.path.join(args.out, f"{stem}.{ext}"), "w") as f:
                f.write(content if content.endswith("\n") else content + "\n")
        print(f"saved {args.out}/{stem}.md, {stem}.csv", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
