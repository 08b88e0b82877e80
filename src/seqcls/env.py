"""What the process learns without heavy imports (no torch, no transformers): its launcher rank
and where installed packages live. Used by the config resolvers before anything else loads."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from seqcls.errors import ConfigError


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


def launcher_rank() -> int:
    """This process's rank as the launcher set it (0 without one): who writes, before any group exists."""
    env = launcher_env()
    return env["rank"] if env else 0


def package_dir(package: str, subdir: str = "") -> str:
    """Folder inside an installed Python package (OmegaConf resolver ``seqcls.package_dir``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed; pip install {package.replace('_', '-')}")
    return str(Path(list(spec.submodule_search_locations)[0]) / subdir)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing large blocks back to the OS.

    By default every allocation over 32 MiB is its own mmap, unmapped when freed: a training step on
    CPU that allocates a fresh embedding gradient (MiniLM: 47 MB) then takes ~40k page faults to touch it
    again, ~0.2 s of system time a step on 2 cores. With mmap off and trimming raised, freed blocks stay
    in the heap. Returns False where malloc is not glibc's (nothing changes then).
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))
