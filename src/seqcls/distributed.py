"""Process-group set-up from the launcher's environment, the helpers that decide who writes, and
FSDP2 sharding (one function per step: ``build_mesh``, ``find_transformer_blocks``, ``apply_fsdp``;
``apply_fsdp2`` reads the ``distributed`` config group and calls them in order).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from seqcls.env import launcher_env, launcher_rank  # noqa: F401  (re-exported)
from torch import nn

log = logging.getLogger("seqcls")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_process_group: bool = False
    """True when init_distributed created the process group, so shutdown_distributed destroys it."""

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes files, logs and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[07-09,12],cpu3' -> 'gpu07', 'r[1-2]-n[3-4]' -> 'r1-n3'."""
    first, depth = "", 0
    for ch in nodelist:  # the first group ends at the first comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            break
        first += ch
    # Slurm expands a group left to right, so its first host takes each bracket's first number.
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], first)


def set_rendezvous_env() -> None:
    """MASTER_ADDR/MASTER_PORT for env:// initialisation, where the launcher did not set them.

    In a Slurm step (srun, e.g. a submitit job with several tasks) rank 0 runs on the step's first
    node and every task derives the same port from the job id, so the tasks agree without talking;
    a requeued job keeps its id and so its port. Elsewhere: 127.0.0.1:29500.
    """
    env = os.environ
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if nodelist and env.get("SLURM_JOB_ID", "").isdigit():
        env.setdefault("MASTER_ADDR", first_slurm_host(nodelist))
        env.setdefault("MASTER_PORT", str(20000 + int(env["SLURM_JOB_ID"]) % 20000))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")


def init_distributed(*, backend: str = "auto", timeout_minutes: int = 10, device: torch.device,
                     single_process_group: bool = False) -> DistInfo:
    """Join the process group the launcher set up; a single process without a launcher needs none.

    Args:
        single_process_group: without a launcher, create a one-rank group anyway (FSDP2 needs a
            group for its mesh). It lives in an in-process HashStore, so no port is opened.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    env = launcher_env()
    if env is None and not single_process_group:
        return DistInfo()
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if env is None:
        if device.type == "cuda":
            torch.cuda.set_device(device.index or 0)
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return DistInfo(local_rank=device.index or 0, owns_process_group=True)
    set_rendezvous_env()
    if device.type == "cuda":
        torch.cuda.set_device(env["local_rank"])
    dist.init_process_group(backend=backend, rank=env["rank"], world_size=env["world_size"], timeout=timeout)
    return DistInfo(**env, owns_process_group=True)


def shutdown_distributed(info: DistInfo) -> None:
    """Destroy the process group if init_distributed created it (a caller's own group is left alone)."""
    if info.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# ---------------------------------------------------------------------------------------- FSDP2

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_mesh(world_size: int, *, dp_size: Optional[int], dp_replicate_size: int, device_type: str):
    """The data-parallel DeviceMesh: 1-D ("dp_shard",) for FSDP, 2-D ("dp_replicate", "dp_shard") for HSDP.

    Args:
        dp_size: ranks that shard one copy of the model; None: world_size / dp_replicate_size.
        dp_replicate_size: copies of the sharded model (> 1 is HSDP: shard within a group of dp_size
            ranks, typically one node, and all-reduce across the groups).

    Raises:
        ConfigError: when dp_size x dp_replicate_size is not the number of launched processes.
    """
    from torch.distributed.device_mesh import init_device_mesh

    from seqcls.config import ConfigError

    if dp_size is None:
        if world_size % dp_replicate_size:
            raise ConfigError(f"distributed.dp_replicate_size={dp_replicate_size} does not divide the {world_size} "
                              f"launched processes; pick a divisor of {world_size}")
        dp_size = world_size // dp_replicate_size
    if dp_size * dp_replicate_size != world_size:
        raise ConfigError(f"distributed.dp_size={dp_size} x dp_replicate_size={dp_replicate_size} = "
                          f"{dp_size * dp_replicate_size} but {world_size} processes were launched; set "
                          f"distributed.dp_size=null (or launch {dp_size * dp_replicate_size} processes)")
    if dp_replicate_size > 1:
        return init_device_mesh(device_type, (dp_replicate_size, dp_size), mesh_dim_names=("dp_replicate", "dp_shard"))
    return init_device_mesh(device_type, (dp_size,), mesh_dim_names=("dp_shard",))


def find_transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers of a Hugging Face encoder (``bert.encoder.layer``, ``*.layers``, ``*.h``, ...).

    Found generically: the nn.ModuleList holding the most parameters whose children are all of one
    class. An empty list means no such list (the model is then sharded as one unit).
    """
    best: list[nn.Module] = []
    best_numel = 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        numel = sum(p.numel() for p in module.parameters())
        if numel > best_numel:
            best, best_numel = list(module), numel
    return best


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing of each transformer block (distributed.activation_checkpointing), with
    torch.distributed's composable ``checkpoint``: module names, state-dict keys and the FSDP2 sharding
    (applied after it) stay as they are. A block's forward keeps only its inputs for the backward, which
    runs the block again with the RNG state of its forward (the same dropout masks). Returns how many."""
    from torch.distributed._composable import checkpoint
    blocks = find_transformer_blocks(model)
    for block in blocks:
        checkpoint(block)
    return len(blocks)


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], mesh, *, param_dtype: Optional[torch.dtype],
               reduce_dtype: Optional[torch.dtype], reshard_after_forward: bool) -> nn.Module:
    """Shard each block, then the root (embeddings, pooler, head: whatever the blocks left over).

    One fully_shard unit per block: its parameters are all-gathered just before the block runs and
    freed after, so at most a block or two is unsharded at a time, and the reduce-scatter of one
    block's gradients overlaps the backward of the next. Frozen (LoRA base) parameters sit in the
    same units; they are all-gathered for compute and simply get no gradient.
    Gradients are averaged (not summed) over every rank of the mesh: reduce-scatter with AVG over
    dp_shard and, for HSDP, all-reduce with AVG over dp_replicate.

    Returns:
        The same model, now an FSDPModule whose parameters are DTensors on ``mesh``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for i, block in enumerate(blocks):
        # The last block and the root (the head) are where backward starts: resharding them after
        # forward would free parameters only to all-gather them again at once (torchtitan's default).
        last = i == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward and not last)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    return model


def apply_fsdp2(model: nn.Module, dcfg, *, dist_info: DistInfo, device: torch.device) -> nn.Module:
    """Shard ``model`` as the ``distributed`` config group says (after LoRA and freezing, before the optimizer).

    On CPU, compute and gradient reduction stay fp32 (CPU runs are for tests and trials, compared
    with unsharded runs to 1e-5); on GPU they follow distributed.param_dtype / reduce_dtype (default
    bf16 compute, fp32 reduction). The sharded parameters and the optimizer state are fp32 always.
    fully_shard moves the parameters onto ``device`` as it shards them.
    """
    if device.type == "cuda":
        param_dtype, reduce_dtype = _DTYPES.get(dcfg.param_dtype), _DTYPES.get(dcfg.reduce_dtype)
    else:
        param_dtype = reduce_dtype = None
    mesh = build_mesh(dist_info.world_size, dp_size=dcfg.dp_size, dp_replicate_size=dcfg.dp_replicate_size,
                      device_type=device.type)
    blocks = find_transformer_blocks(model)
    if not blocks:
        log.warning("fsdp2: found no list of transformer blocks; sharding the model as one unit")
    apply_fsdp(model, blocks, mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
               reshard_after_forward=dcfg.reshard_after_forward)
    log.info("fsdp2: mesh %s %s, %d blocks + root, compute %s, gradient reduction %s",
             dict(zip(mesh.mesh_dim_names, mesh.shape)), device.type, len(blocks), param_dtype or torch.float32,
             reduce_dtype or param_dtype or torch.float32)
    return model
