"""Process-group setup from torchrun / Slurm environment variables, the device, the few collectives the trainer
needs, and the random-number state a mid-epoch checkpoint carries."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist

from devices import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by the environment (``env://``), or run as a single process.

    Ranks come from timm's ``world_info_from_env`` (torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or Slurm's
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID under ``srun`` without torchrun; MASTER_ADDR/MASTER_PORT must then be
    exported by the job script). The local GPU is taken from the local rank, never from a ``--local_rank``
    argument. NCCL on GPU, gloo on CPU.
    """
    from timm.utils.distributed import world_info_from_env

    local, rank, world = world_info_from_env()
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(0, 1, dev)
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                            rank=rank, world_size=world, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def seed_all(seed: int) -> None:
    """Seed every generator the pipeline draws from (torch, numpy for timm's mixup, random for RandAugment)."""
    seed = seed % (2 ** 32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce_sum(values, device: torch.device):
    """Sum a list of floats over all ranks (identity on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _initialized():
        dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any rank (a collective: every rank must call it at the same point)."""
    if not _initialized():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_to_all(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` on one process)."""
    if not _initialized():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------------ RNG states
def rng_state() -> Dict[str, Any]:
    """This process's generator states as plain data and tensors (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                       float(np_state[4])],
             "random": _random_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss = state["random"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
