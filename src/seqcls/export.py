"""A trained run as a Hugging Face directory, for ``transformers.pipeline`` and ``from_pretrained``.

usage: python -m seqcls.export run_dir=DIR out=DIR [merged=true] [checkpoint=best] [dataset.max_length=N]

  out          a new (or empty) folder
  merged       LoRA runs: true (default) writes the model with LoRA folded into its weights at out
               itself and the peft adapter at out/adapter; false keeps out free of weights, with
               out/merged (the merged model) and out/adapter side by side. A full fine-tuning run has
               no adapter: out is its model either way.
  checkpoint   best (default), latest, step_N, or the path of a step_XXXXXXXX folder

The model folder holds config.json (with id2label/label2id), model.safetensors and the tokenizer,
whose model_max_length is the run's dataset.max_length: call the pipeline with truncation=True to
truncate as training and seqcls.predict do. The adapter folder (adapter_config.json,
adapter_model.safetensors, tokenizer) loads with peft.PeftModel.from_pretrained on the base model
named in adapter_config.json.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import MISSING

from seqcls.config import ConfigError
from seqcls.runs import checkpoint_step, find_checkpoint, load_run_config, parse_args, setup_cli, user_errors

log = logging.getLogger("seqcls")
USAGE = ("usage: python -m seqcls.export run_dir=DIR out=DIR [merged=true|false] "
         "[checkpoint=best|latest|step_N|PATH] [dataset.KEY=VALUE ...]")


@dataclass
class ExportArgs:
    run_dir: str = MISSING
    out: str = MISSING
    merged: bool = True
    checkpoint: str = "best"


def _copy_with_tokenizer(src: Path, dst: Path, *, tokenizer_dir: Path, max_length: int) -> None:
    """A checkpoint folder, plus the run's tokenizer set to truncate at the run's max_length."""
    from transformers import AutoTokenizer
    shutil.copytree(src, dst, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(dst)


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, *, merged: bool = True, checkpoint: str = "best",
               overrides: Sequence[str] = ()) -> dict[str, Path]:
    """Export one checkpoint of a run; returns the folders written ({"model": ..., "adapter": ...})."""
    cfg = load_run_config(run_dir, overrides)
    ckpt = find_checkpoint(run_dir, cfg, checkpoint)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out={out} is not empty; pass a new folder (or delete it)")
    lora = (ckpt / "adapter").is_dir()
    # Build everything in a sibling folder and rename it at the end: a failed export leaves no half folder.
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model_rel = Path("merged") if lora and not merged else Path(".")
        max_length = cfg.dataset.max_length
        _copy_with_tokenizer(ckpt / "model", tmp / model_rel, tokenizer_dir=ckpt / "model", max_length=max_length)
        if lora:
            _copy_with_tokenizer(ckpt / "adapter", tmp / "adapter", tokenizer_dir=ckpt / "model", max_length=max_length)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = {"model": out / model_rel}
    if lora:
        written["adapter"] = out / "adapter"
    log.info("exported %s (step %d) to %s", ckpt, checkpoint_step(ckpt), ", ".join(map(str, written.values())))
    return written


def main(argv: Sequence[str] | None = None) -> None:
    args, overrides = parse_args(argv, ExportArgs, usage=USAGE, doc=__doc__)
    setup_cli()
    with user_errors():
        written = export_run(args.run_dir, args.out, merged=args.merged, checkpoint=args.checkpoint,
                             overrides=overrides)
    for kind, path in written.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
