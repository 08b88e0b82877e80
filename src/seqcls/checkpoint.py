"""Checkpoints: written into a temporary folder, flushed, renamed; the LATEST pointer moves last.

Layout of <checkpoint_dir>:
    step_00000120/
        model/               consolidated Hugging Face directory (config, tokenizer, model.safetensors);
                             LoRA runs store the merged weights here
        adapter/             LoRA runs: peft-format adapter (adapter_config.json, adapter_model.safetensors)
        trainer_state.json   step, epoch, best-metric bookkeeping, config fingerprint
    LATEST                   name of the newest complete checkpoint
    BEST                     name of the checkpoint with the best validation metric
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from seqcls.distributed import DistInfo, barrier

log = logging.getLogger("seqcls")


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
        name = f"step_{trainer.step:08d}"
        final = self.root / name
        state = full_state_dict(trainer.model)
        if self.dist.is_writer:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            config = getattr(trainer.model, "config", None)
            if self.lora is not None:
                from seqcls.lora import merge_lora_weights, save_peft_adapter
                save_peft_adapter(state, tmp / "adapter", **self.lora["adapter"])
                state = merge_lora_weights(state, scale=self.lora["scale"])
            if self.save_consolidated and config is not None:
                save_hf_dir(tmp / "model", state, config, self.tokenizer)
            (tmp / "trainer_state.json").write_text(json.dumps(
                {**trainer.state_dict(), "fingerprint": self.fingerprint}, indent=2))
            _fsync_dir(tmp)
            if final.exists():  # same step saved before (e.g. a re-run): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_pointer(self.root, "LATEST", name)
            if trainer.best.get("step") == trainer.step:
                write_pointer(self.root, "BEST", name)
            self._prune()
            log.info("saved checkpoint %s", final)
        barrier(self.dist)
        return final

    def _prune(self) -> None:
        if not self.keep_last_k:
            return
        keep = {p.name for p in (read_pointer(self.root, "LATEST"), read_pointer(self.root, "BEST")) if p}
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for p in steps[: max(0, len(steps) - self.keep_last_k)]:
            if p.name not in keep:
                shutil.rmtree(p)
