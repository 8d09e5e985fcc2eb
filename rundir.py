"""The run directory (``output_dir``): read-only checks before anything is written, then, on rank 0 under the
run's lock, preparing it: removing an old run (``--overwrite``), repairing what a kill can leave, writing the config
and opening the log files.
"""
from __future__ import annotations

import os
from typing import List, Optional

import checkpoint as ckpt_io
from checkpoint import RunDirError
from config import Config, save_config
from distributed import DistInfo
from exits import on_main
from files import first_line
from logger import ITERATIONS, restore_record, trim_iterations, trim_log


def check_output(cfg: Config, dist: DistInfo, overwrite: bool) -> None:
    """Read-only checks of ``output_dir``: a directory (or creatable), not another run's (unless resuming or
    ``--overwrite``), not locked by a live run."""
    def check():
        ckpt_io.check_output_dir(cfg.output_dir)
        if cfg.eval:
            return
        ckpt_io.refuse_existing_run(cfg.output_dir, resuming=bool(cfg.resume), overwrite=overwrite)
        holder = ckpt_io.lock_holder(cfg.output_dir)
        if holder:
            raise RunDirError(f"output_dir: {cfg.output_dir} is in use by another run ({holder}); wait for it to "
                              f"end, stop it, or pick another --output_dir")
    on_main(dist, check)


def open_run_dir(r, overwrite: bool) -> Optional[ckpt_io.RunLock]:
    """Rank 0 takes the lock, removes the old run (``--overwrite``), repairs what a kill can leave (best.pth, log
    records after the checkpoint), writes config.yaml and opens the log files (``r``: the :class:`main.Run`)."""
    cfg, out = r.cfg, r.cfg.output_dir
    holder: List[ckpt_io.RunLock] = []

    def open_dir():
        holder.append(ckpt_io.RunLock(out).acquire())
        try:
            prepare()
        except OSError as e:
            raise RunDirError(f"output_dir: cannot write in {out} ({e.strerror or first_line(e)}); free space or "
                              f"pick another --output_dir") from None

    def prepare():
        # decided again under the lock: another run may have written here since the checks before it
        ckpt_io.refuse_existing_run(out, resuming=bool(cfg.resume), overwrite=overwrite)
        if not overwrite:
            ckpt_io.check_unchanged(out, r.resume)
        if overwrite and ckpt_io.run_files(out):
            ckpt_io.clear_run(out)
            r.log.info(f"--overwrite: removed the previous run's outputs in {out}")
        own = os.path.join(out, "checkpoint.pth")
        if r.resume is not None and os.path.isfile(own) and os.path.samefile(r.resume.path, own):
            if ckpt_io.reconcile_best(own, os.path.join(out, "best.pth"), r.resume.ckpt):
                r.log.info("best.pth: relinked to checkpoint.pth, which records itself as the best epoch")
        dropped = trim_log(os.path.join(out, "log.jsonl"), r.start.epoch)
        if r.resume is not None and restore_record(os.path.join(out, "log.jsonl"), r.resume.ckpt.get("log_record")):
            r.log.info(f"log.jsonl: wrote back the record of epoch {r.start.epoch} from the checkpoint (it was lost)")
        if dropped:
            r.log.info(f"log.jsonl: dropped {dropped} line(s): records of epochs the checkpoint does not cover, "
                       f"repeated, or unreadable")
        dropped = trim_iterations(os.path.join(out, ITERATIONS), r.start.global_step)
        if dropped:
            r.log.info(f"{ITERATIONS}: dropped {dropped} record(s) of iterations the checkpoint does not cover")
        save_config(cfg, os.path.join(out, "config.yaml"))
        r.log.open_files(out, cfg.tensorboard, iterations=cfg.log_every > 0, resume_step=r.start.global_step)

    try:
        on_main(r.dist, open_dir)
    except BaseException:
        for lock in holder:
            lock.release()
        raise
    return holder[0] if holder else None
