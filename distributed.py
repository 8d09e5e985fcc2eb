"""Process-group setup from torchrun / Slurm environment variables, and the few collectives the engine needs."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str):
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    return None


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by the environment (``env://``), or run as a single process.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; under ``srun`` without torchrun, SLURM_PROCID/SLURM_NTASKS/
    SLURM_LOCALID are used (MASTER_ADDR/MASTER_PORT must then be exported by the job script). The local GPU is
    taken from LOCAL_RANK, never from a ``--local_rank`` argument. NCCL on GPU, gloo on CPU.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' was asked for but no GPU is visible; use device: auto or cpu")
    rank = _env_int("RANK", "SLURM_PROCID")
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS")
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    if rank is None or world is None or world <= 1:
        dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        return DistInfo(0, 1, 0, dev)
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    if use_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                            rank=rank, world_size=world, device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_all(seed: int) -> None:
    """Seed every generator the pipeline draws from (torch, numpy for timm's mixup, random for RandAugment)."""
    seed = seed % (2 ** 32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce_sum(values, device: torch.device):
    """Sum a list of floats over all ranks (identity on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
