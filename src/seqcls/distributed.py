"""Process-group set-up from the launcher's environment, and the helpers that decide who writes."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes files, logs and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())


def launcher_env() -> dict[str, int] | None:
    """RANK/WORLD_SIZE/LOCAL_RANK from torchrun, or from Slurm when a job has several tasks."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
                "local_rank": int(env.get("LOCAL_RANK", 0))}
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return {"rank": int(env["SLURM_PROCID"]), "world_size": int(env["SLURM_NTASKS"]),
                "local_rank": int(env.get("SLURM_LOCALID", 0))}
    return None


def init_distributed(*, backend: str = "auto", timeout_minutes: int = 10, device: torch.device) -> DistInfo:
    """Join the process group the launcher set up; a single process without a launcher needs none."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    env = launcher_env()
    if env is None:
        return DistInfo()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(env["local_rank"])
    dist.init_process_group(backend=backend, rank=env["rank"], world_size=env["world_size"],
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(**env)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
