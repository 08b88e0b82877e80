"""Predictions of a trained run for texts from a file or from the command line.

usage: python -m seqcls.predict run_dir=DIR input=FILE [output=FILE] [text_fields=[a,b]] [checkpoint=best]
                                [threshold=0.5] [batch_size=64] [chunk_size=4096] [device=auto] [dataset.KEY=VALUE ...]
       python -m seqcls.predict run_dir=DIR text="..." [text_pair="..."] [output=FILE] ...

  input        a .csv, .tsv or .jsonl file with a header (csv/tsv) or one JSON object a line; read
               chunk_size rows at a time, so any size fits in memory
  text_fields  the one or two text columns of input; default: the run's dataset.text_fields
  output       .csv, .tsv or .jsonl, written as the input is read (under <output>.partial, renamed
               when complete); default: JSON lines on stdout
  checkpoint   best (default), latest, step_N, or the path of a step_XXXXXXXX folder
  threshold    multi-label runs: a label is predicted where its probability is above this (0.5)
  dataset.*    change the run's dataset config (dataset.max_length: where texts are truncated)

One output row per input row, in input order: ``label`` (the class name, from the saved config's
id2label) and ``prob_<label>`` for every class; a regression run (num_labels=1) writes ``score``; a
multi-label run writes ``labels`` (the labels whose probability, a sigmoid, is above threshold: a list in JSON
lines, joined by the run's dataset.label_separator in csv/tsv) and ``prob_<label>`` for every label.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import MISSING, DictConfig

from seqcls.build import resolve_device
from seqcls.config import ConfigError
from seqcls.data import DataError, iter_records
from seqcls.runs import (find_checkpoint, label_names, load_classifier, load_run_config, logits_of, parse_args,
                         setup_cli, tokenize, user_errors)

log = logging.getLogger("seqcls")
USAGE = ("usage: python -m seqcls.predict run_dir=DIR (input=FILE | text=TEXT [text_pair=TEXT]) [output=FILE] "
         "[text_fields=[a,b]] [checkpoint=best|latest|step_N|PATH] [threshold=0.5] [batch_size=64] [chunk_size=4096] "
         "[device=auto|cpu|cuda] [dataset.KEY=VALUE ...]")
OUTPUT_TYPES = (".csv", ".tsv", ".jsonl")


@dataclass
class PredictArgs:
    run_dir: str = MISSING
    input: Optional[str] = None
    output: Optional[str] = None
    text: Optional[str] = None
    text_pair: Optional[str] = None
    text_fields: Optional[list[str]] = None
    checkpoint: str = "best"
    threshold: Optional[float] = None
    batch_size: int = 64
    chunk_size: int = 4096
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be between 0 and 1, got {self.threshold}")
        if (self.input is None) == (self.text is None):
            raise ConfigError("give either input=FILE or text=TEXT")
        if self.text_pair is not None and self.text is None:
            raise ConfigError("text_pair= goes with text=")
        # Checked before the model loads: a typo should not cost a model load.
        if self.input is not None and not Path(self.input).is_file():
            raise ConfigError(f"input={self.input}: no such file")
        if self.output is not None and Path(self.output).suffix.lower() not in OUTPUT_TYPES:
            raise ConfigError(f"output={self.output}: use a {', '.join(OUTPUT_TYPES)} file")
        if self.batch_size <= 0 or self.chunk_size <= 0:
            raise ConfigError(f"batch_size and chunk_size must be > 0, got {self.batch_size} and {self.chunk_size}")


@dataclass
class Predictor:
    """A run's saved model with what predicting needs: its tokenizer, class names and truncation length."""
    model: Any
    tokenizer: Any
    labels: list[str]
    text_fields: list[str]
    max_length: int
    device: torch.device
    label_separator: str = ","
    threshold: float = 0.5

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, *, checkpoint: str = "best", overrides: Sequence[str] = (),
                 device: str = "auto") -> Predictor:
        cfg: DictConfig = load_run_config(run_dir, overrides)
        ckpt = find_checkpoint(run_dir, cfg, checkpoint)
        dev = resolve_device(device)
        model, tokenizer = load_classifier(ckpt / "model", dev)
        log.info("predicting with %s", ckpt)
        return cls(model, tokenizer, label_names(model), list(cfg.dataset.text_fields), cfg.dataset.max_length, dev,
                   cfg.dataset.label_separator)

    @property
    def multi_label(self) -> bool:
        return self.model.config.problem_type == "multi_label_classification"

    def fieldnames(self) -> list[str]:
        if self.model.config.num_labels == 1:
            return ["score"]
        return ["labels" if self.multi_label else "label", *(f"prob_{name}" for name in self.labels)]

    def check_fields(self, fields: Sequence[str], what: str) -> None:
        if len(fields) != len(self.text_fields):
            raise ConfigError(f"the run was trained on {len(self.text_fields)} text column(s) ({self.text_fields}); "
                              f"{what} gives {len(fields)}")

    def __call__(self, columns: Sequence[Sequence[Any]], *, batch_size: int = 64) -> list[dict[str, Any]]:
        """One or two text columns → one output row per text (or pair)."""
        examples = tokenize(self.tokenizer, columns, max_length=self.max_length)
        logits = torch.from_numpy(logits_of(self.model, examples, batch_size=batch_size,
                                            pad_token_id=self.tokenizer.pad_token_id, device=self.device))
        if self.model.config.num_labels == 1:
            return [{"score": float(v)} for v in logits[:, 0]]
        names = self.fieldnames()[1:]
        if self.multi_label:
            probs = torch.sigmoid(logits)
            return [{"labels": [self.labels[i] for i in range(len(p)) if p[i] > self.threshold],
                     **dict(zip(names, map(float, p)))} for p in probs]
        probs = torch.softmax(logits, dim=-1)
        return [{"label": self.labels[int(p.argmax())], **dict(zip(names, map(float, p)))} for p in probs]


class PredictionWriter:
    """Rows to a .csv/.tsv/.jsonl file as they come (flushed after each chunk), or JSON lines to stdout.

    A file is written as <output>.partial and renamed when complete: a stopped run leaves no file
    that looks finished.
    """

    def __init__(self, path: Optional[str | os.PathLike], fieldnames: list[str], separator: str = ","):
        self.path, self.separator = (Path(path) if path else None), separator  # separator: joins a list in csv/tsv
        self.suffix = self.path.suffix.lower() if self.path else ".jsonl"
        if self.suffix not in OUTPUT_TYPES:
            raise ConfigError(f"output={path}: unknown file type {self.suffix!r}; use {', '.join(OUTPUT_TYPES)}")
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.partial = self.path.with_name(self.path.name + ".partial")
            self.f = open(self.partial, "w", encoding="utf-8", newline="")
        else:
            self.f = sys.stdout
        self.csv = None
        if self.suffix != ".jsonl":
            self.csv = csv.DictWriter(self.f, fieldnames=fieldnames, delimiter="," if self.suffix == ".csv" else "\t")
            self.csv.writeheader()

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.csv is not None:
            self.csv.writerows({k: self.separator.join(v) if isinstance(v, list) else v for k, v in r.items()}
                               for r in rows)
        else:
            self.f.writelines(json.dumps(r) + "\n" for r in rows)
        self.f.flush()

    def close(self, *, complete: bool) -> None:
        if self.path is None:
            return
        self.f.close()
        if complete:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)


def predict_file(predictor: Predictor, input: str | os.PathLike, output: Optional[str | os.PathLike] = None, *,
                 text_fields: Optional[Sequence[str]] = None, batch_size: int = 64, chunk_size: int = 4096) -> int:
    """Predict every row of ``input`` into ``output``, ``chunk_size`` rows at a time; returns the row count."""
    fields = list(text_fields or predictor.text_fields)
    predictor.check_fields(fields, f"text_fields={fields}")
    writer = PredictionWriter(output, predictor.fieldnames(), predictor.label_separator)
    done, complete = 0, False
    try:
        for chunk in iter_records(input, chunk_size=chunk_size):
            for i, row in enumerate(chunk):
                missing = [c for c in fields if c not in row]
                if missing:
                    raise DataError(f"{input}: row {done + i + 1} has no column {missing}; its columns are "
                                    f"{list(row)} (name the text columns with text_fields=[a,b])")
            writer.write(predictor([[row[c] for row in chunk] for c in fields], batch_size=batch_size))
            done += len(chunk)
            log.info("predicted %d rows", done)
        complete = True
    finally:
        writer.close(complete=complete)
    return done


def predict_text(predictor: Predictor, text: str, text_pair: Optional[str] = None) -> dict[str, Any]:
    texts = [text] if text_pair is None else [text, text_pair]
    predictor.check_fields(texts, "text=/text_pair=")
    return predictor([[t] for t in texts])[0]


def main(argv: Sequence[str] | None = None) -> None:
    args, overrides = parse_args(argv, PredictArgs, usage=USAGE, doc=__doc__)
    setup_cli()
    with user_errors():
        predictor = Predictor.from_run(args.run_dir, checkpoint=args.checkpoint, overrides=overrides,
                                       device=args.device)
        if args.threshold is not None:
            if not predictor.multi_label:
                raise ConfigError("threshold= applies to multi-label runs (dataset.task=multi_label), which this "
                                  "run is not: leave it out")
            predictor.threshold = args.threshold
        if args.input is not None:
            n = predict_file(predictor, args.input, args.output, text_fields=args.text_fields,
                             batch_size=args.batch_size, chunk_size=args.chunk_size)
            log.info("wrote %d predictions to %s", n, args.output or "stdout")
        else:
            writer = PredictionWriter(args.output, predictor.fieldnames(), predictor.label_separator)
            writer.write([predict_text(predictor, args.text, args.text_pair)])
            writer.close(complete=True)


if __name__ == "__main__":
    main()
