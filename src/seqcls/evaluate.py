"""Metrics of a trained run on any split of its dataset.

usage: python -m seqcls.evaluate run_dir=DIR [split=validation] [checkpoint=best] [batch_size=64]
                                 [device=auto] [dataset.KEY=VALUE ...]

  run_dir      a seqcls.train run dir (config.yaml, checkpoints/)
  split        validation (the run's first validation split), test, train (with the run's
               dataset.limit_train_samples), or any split name the dataset's reader knows
               (e.g. validation_mismatched for MNLI)
  checkpoint   best (default; the latest when no checkpoint was saved at the best step), latest,
               step_N, or the path of a step_XXXXXXXX folder
  dataset.*    change the run's dataset config, e.g. dataset.data_dir=../shared/data/mrpc or
               dataset.test_file=other.csv

Writes <run_dir>/eval_<split>.json and prints it: the task's metrics (seqcls.metrics), loss,
num_examples, the split and the checkpoint; for classification also ``per_class`` (precision, recall, F1
and support of each class or label, by name) and, single-label, ``confusion_matrix`` (rows: true class,
columns: predicted).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import MISSING

from seqcls.build import build_split, resolve_device
from seqcls.config import ConfigError
from seqcls.data import DataError
from seqcls.metrics import compute_metrics, per_class_report
from seqcls.runs import (checkpoint_step, find_checkpoint, label_names, load_classifier, load_run_config, logits_of,
                         parse_args, setup_cli, user_errors, write_json_atomic)
from seqcls.trainer import loss_sum

log = logging.getLogger("seqcls")
USAGE = ("usage: python -m seqcls.evaluate run_dir=DIR [split=validation|test|train|NAME] "
         "[checkpoint=best|latest|step_N|PATH] [batch_size=64] [device=auto|cpu|cuda] [dataset.KEY=VALUE ...]")


@dataclass
class EvaluateArgs:
    run_dir: str = MISSING
    split: str = "validation"
    checkpoint: str = "best"
    batch_size: int = 64
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be > 0, got {self.batch_size}")


def evaluate_run(run_dir: str | os.PathLike, *, split: str = "validation", checkpoint: str = "best",
                 overrides: Sequence[str] = (), batch_size: int = 64, device: str = "auto") -> dict[str, Any]:
    """Evaluate one checkpoint of a run on one split; writes and returns <run_dir>/eval_<split>.json's content."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    ckpt = find_checkpoint(run_dir, cfg, checkpoint)
    dev = resolve_device(device)
    model, tokenizer = load_classifier(ckpt / "model", dev)
    ds = build_split(cfg.dataset, tokenizer, split)
    if "labels" not in ds.column_names:
        raise DataError(f"split {split!r} has no labels (GLUE's hub test sets hide theirs), so it has no metrics; "
                        f"seqcls.predict gives its predictions")
    logits = logits_of(model, ds.to_list(), batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, device=dev)
    labels = torch.tensor(ds["labels"])
    num_labels = cfg.dataset.num_labels
    metrics = compute_metrics(cfg.dataset.task, num_labels, logits, labels.numpy())
    # The loss the trainer reports on validation: mean cross-entropy (MSE for regression), plain.
    loss = loss_sum(torch.from_numpy(logits), labels, num_labels,
                    multi_label=cfg.dataset.task == "multi_label") / max(1, len(labels))
    result = {"split": split, "checkpoint": str(ckpt), "step": checkpoint_step(ckpt), **metrics,
              "loss": float(loss), "num_examples": len(ds),
              **per_class_report(cfg.dataset.task, num_labels, logits, labels.numpy(), label_names(model))}
    write_json_atomic(run_dir / f"eval_{split}.json", result)
    log.info("%s (%d examples, %s): %s", split, len(ds), ckpt.name,
             " ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float)))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    args, overrides = parse_args(argv, EvaluateArgs, usage=USAGE, doc=__doc__)
    setup_cli()
    with user_errors():
        result = evaluate_run(args.run_dir, split=args.split, checkpoint=args.checkpoint, overrides=overrides,
                              batch_size=args.batch_size, device=args.device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
