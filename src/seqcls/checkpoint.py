"""Checkpoints: written into a temporary folder, flushed, renamed; the LATEST pointer moves last.

Layout of <checkpoint_dir>:
    step_00000120/
        model/               consolidated Hugging Face directory (config, tokenizer, model.safetensors);
                             LoRA runs store the merged weights here
        adapter/             LoRA runs: peft-format adapter (adapter_config.json, adapter_model.safetensors)
        state/               torch.distributed.checkpoint (sharded under FSDP2): trainable model
                             parameters and optimizer state
        rank_00000.pt        per rank: LR scheduler, data-loader position, RNG states (python, numpy,
                             torch, cuda); loaded with weights_only=True
        trainer_state.json   step, epoch, best-metric bookkeeping, config fingerprint, world size
    LATEST                   name of the newest complete checkpoint
    BEST                     name of the checkpoint with the best validation metric
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from seqcls.config import ConfigError
from seqcls.distributed import DistInfo, barrier

log = logging.getLogger("seqcls")
# DCP says so on every save/load in one process, where that is the intent.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU; under FSDP2 every rank must call this (it all-gathers)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _fsync_dir(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pointer(root: Path, name: str, target: str) -> None:
    """Atomically point root/name at target (write a temp file, then os.replace)."""
    tmp = root / f".{name}.tmp"
    tmp.write_text(target + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, root / name)


def read_pointer(root: Path, name: str) -> Optional[Path]:
    p = root / name
    if not p.is_file():
        return None
    target = root / p.read_text().strip()
    return target if target.is_dir() else None


def master_weights(model: torch.nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """State-dict key -> fp32 master of each bf16 weight that the optimizer keeps one for
    (seqcls.optim.MasterWeightAdamW): the saved model gets the weights at full precision."""
    masters = optimizer.masters() if hasattr(optimizer, "masters") else {}
    return {name: masters[p].detach().to("cpu", copy=True)
            for name, p in model.named_parameters() if p in masters}


def save_hf_dir(out: Path, state_dict: dict[str, torch.Tensor], config, tokenizer) -> None:
    """A directory that AutoModelForSequenceClassification.from_pretrained loads."""
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


class Checkpointer:
    """Saves the trainer's model and progress; only rank 0 touches the file system."""

    def __init__(self, root: Path, *, dist_info: DistInfo, tokenizer, save_consolidated: bool = True,
                 keep_last_k: Optional[int] = 2, lora: Optional[dict[str, Any]] = None,
                 fingerprint: Optional[dict[str, Any]] = None):
        self.root, self.dist, self.tokenizer = Path(root), dist_info, tokenizer
        self.save_consolidated, self.keep_last_k = save_consolidated, keep_last_k
        self.lora, self.fingerprint = lora, fingerprint or {}

    def save(self, trainer) -> Path:
        """Write a complete checkpoint of ``trainer`` (every rank calls this)."""
        name = f"step_{trainer.step:08d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if self.dist.is_writer:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a write that crashed
            tmp.mkdir()
        barrier(self.dist)
        # Sharded training state: each rank writes its own shards; frozen base weights are left out.
        opts = StateDictOptions(ignore_frozen_params=True)
        dcp.save({"model": get_model_state_dict(trainer.model, options=opts),
                  "optim": get_optimizer_state_dict(trainer.model, trainer.optimizer, options=opts)},
                 checkpoint_id=str(tmp / "state"))
        torch.save({"scheduler": trainer.scheduler.state_dict(), "dataloader": trainer.train_loader.state_dict(),
                    "rng": rng_state()}, tmp / f"rank_{self.dist.rank:05d}.pt")
        # fp32 for the saved model: frozen weights kept in bf16 for training (compile.bf16_frozen_weights)
        # would otherwise round away the small LoRA update when it is merged into them.
        state = {k: v.float() if v.is_floating_point() else v for k, v in full_state_dict(trainer.model).items()}
        state.update(master_weights(trainer.model, trainer.optimizer))
        trainer_state = trainer.state_dict()  # on every rank: it all-reduces the train-loss window
        if self.dist.is_writer:
            config = getattr(trainer.model, "config", None)
            if self.lora is not None:
                from seqcls.lora import merge_lora_weights, save_peft_adapter
                save_peft_adapter(state, tmp / "adapter", **self.lora["adapter"])
                state = merge_lora_weights(state, scale=self.lora["scale"])
            if self.save_consolidated and config is not None:
                save_hf_dir(tmp / "model", state, config, self.tokenizer)
            (tmp / "trainer_state.json").write_text(json.dumps(
                {**trainer_state, "fingerprint": self.fingerprint, "world_size": self.dist.world_size},
                indent=2))
        barrier(self.dist)  # every rank's files are in tmp before it is renamed
        if self.dist.is_writer:
            _fsync_dir(tmp)
            if final.exists():  # the same step saved before (a re-run from an earlier checkpoint)
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_pointer(self.root, "LATEST", name)
            if trainer.best.get("step") == trainer.step:
                write_pointer(self.root, "BEST", name)
            self._prune()
            log.info("saved checkpoint %s", final)
        barrier(self.dist)
        return final

    def find(self, restore_from: Optional[str]) -> Optional[Path]:
        """The checkpoint to resume from: latest (if any), an explicit path, or none."""
        if restore_from in (None, "none", "null"):
            return None
        if restore_from == "latest":
            return read_pointer(self.root, "LATEST")
        path = Path(restore_from)
        if path.is_dir() and (path / "LATEST").is_file():
            path = read_pointer(path, "LATEST") or path
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"checkpoint.restore_from={restore_from}: no checkpoint there (no trainer_state.json); "
                              f"pass a step_XXXXXXXX folder, a checkpoints folder, latest or none")
        return path

    def load(self, trainer, path: Path) -> None:
        """Restore everything ``save`` wrote; refuses an incompatible checkpoint before touching anything."""
        meta = json.loads((path / "trainer_state.json").read_text())
        saved = saved_fingerprint(path, meta["fingerprint"])
        diffs = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if k in saved and saved[k] != v}
        if diffs:
            what = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
            raise ConfigError(f"checkpoint {path} comes from another setup ({what}); use a new run_dir or "
                              f"checkpoint.restore_from=none")
        if meta["world_size"] != self.dist.world_size:
            raise ConfigError(f"checkpoint {path} was written by {meta['world_size']} ranks, this run has "
                              f"{self.dist.world_size}; resume with the same number of processes")
        opts = StateDictOptions(ignore_frozen_params=True, strict=False)
        state = {"model": get_model_state_dict(trainer.model, options=opts),
                 "optim": get_optimizer_state_dict(trainer.model, trainer.optimizer, options=opts)}
        dcp.load(state, checkpoint_id=str(path / "state"))
        set_model_state_dict(trainer.model, state["model"], options=opts)
        set_optimizer_state_dict(trainer.model, trainer.optimizer, state["optim"], options=opts)
        local = torch.load(path / f"rank_{self.dist.rank:05d}.pt", weights_only=True)
        trainer.scheduler.load_state_dict(local["scheduler"])
        trainer.train_loader.load_state_dict(local["dataloader"])
        set_rng_state(local["rng"])
        trainer.load_state_dict(meta)
        log.info("resumed from %s (step %d, epoch %d)", path, trainer.step, trainer.epoch)

    def _prune(self) -> None:
        if not self.keep_last_k:
            return
        keep = {p.name for p in (read_pointer(self.root, "LATEST"), read_pointer(self.root, "BEST")) if p}
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for p in steps[: max(0, len(steps) - self.keep_last_k)]:
            if p.name not in keep:
                shutil.rmtree(p)


def saved_fingerprint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's fingerprint (seqcls.build.fingerprint), with keys added since it was written filled in
    from what it holds where that tells: ``multi_label`` from its model's problem_type. A key it cannot
    tell is left out, and not compared."""
    fingerprint = dict(fingerprint)
    config = path / "model" / "config.json"
    if "multi_label" not in fingerprint and config.is_file():
        problem = json.loads(config.read_text()).get("problem_type")
        fingerprint["multi_label"] = problem == "multi_label_classification"
    return fingerprint


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states, in types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                   *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
