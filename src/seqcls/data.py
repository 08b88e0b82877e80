"""Data: readers (hub, GLUE TSV, local files), label checks, tokenisation, padding, samplers.

Every reader returns a ``datasets.Dataset`` whose columns carry the hub's names (for GLUE:
sentence1/sentence2/label, ...), so one dataset config works online and offline.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import datasets
import pyarrow as pa
import torch
from torch.utils.data import Sampler

from seqcls.errors import ConfigError, DataError


# GLUE's own TSV layout → the column names of the hub's nyu-mll/glue.
_GLUE_RENAME = {
    "mrpc": {"Quality": "label", "#1 String": "sentence1", "#2 String": "sentence2"},
    "qqp": {"is_duplicate": "label"},
    "stsb": {"score": "label"},
    "mnli": {"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
}
_GLUE_HEADERLESS = {"cola": ["source", "label", "original_label", "sentence"]}
_GLUE_FILES = {
    "train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv",
    "validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv",
    "test_matched": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv",
}


def read_table(path: str | os.PathLike, *, column_names: Optional[Sequence[str]] = None) -> dict[str, list]:
    """Read a csv/tsv/jsonl/json/parquet file into columns.

    TSV is read with quoting off (GLUE files hold unbalanced quotes) and a UTF-8 BOM is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path} (check the path; relative paths start at {Path.cwd()})")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".csv", ".txt"):
            delim = "," if suffix == ".csv" else "\t"
            quoting = csv.QUOTE_MINIMAL if suffix == ".csv" else csv.QUOTE_NONE
            with open(path, encoding="utf-8-sig", newline="") as f:
                rows = list(csv.reader(f, delimiter=delim, quoting=quoting))
            header = list(column_names) if column_names else (rows.pop(0) if rows else [])
            cols: dict[str, list] = {h: [] for h in header}
            for lineno, row in enumerate(rows, start=1 if column_names else 2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{lineno}: malformed row with {len(row)} fields, expected {len(header)} "
                                    f"({header}); fix the row or set dataset.column_names")
                for h, v in zip(header, row):
                    cols[h].append(v)
            return cols
        if suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if suffix == ".json" and text.lstrip().startswith("["):
                records = json.loads(text)
            else:
                records = []
                for lineno, line in enumerate(text.splitlines(), start=1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); one JSON object per line") from None
            keys = list(dict.fromkeys(k for r in records for k in r))
            return {k: [r.get(k) for r in records] for k in keys}
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pydict()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8") from None
    except PermissionError:
        raise DataError(f"{path}: cannot be read (permission denied); fix its permissions") from None
    raise DataError(f"{path}: unknown file type {suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet")


def iter_records(path: str | os.PathLike, *, chunk_size: int) -> Iterator[list[dict[str, Any]]]:
    """Read a csv/tsv/jsonl file in chunks of at most ``chunk_size`` rows (dicts keyed by column), with
    read_table's conventions (tsv unquoted, UTF-8 BOM dropped): any file size in bounded memory."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path} (check the path; relative paths start at {Path.cwd()})")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl"):
        raise DataError(f"{path}: cannot stream {suffix!r} files; use .csv, .tsv or .jsonl")

    def rows(f) -> Iterator[dict[str, Any]]:
        if suffix == ".jsonl":
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); one JSON object per line") from None
            return
        reader = csv.reader(f, delimiter="," if suffix == ".csv" else "\t",
                            quoting=csv.QUOTE_MINIMAL if suffix == ".csv" else csv.QUOTE_NONE)
        header = next(reader, [])
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: malformed row with {len(row)} fields, expected "
                                f"{len(header)} ({header}); fix the row")
            yield dict(zip(header, row))

    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            chunk: list[dict[str, Any]] = []
            for row in rows(f):
                chunk.append(row)
                if len(chunk) == chunk_size:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8") from None


def load_glue(split: str, *, task: str, data_dir: Optional[str] = None, path: str = "nyu-mll/glue",
              name: Optional[str] = None) -> datasets.Dataset:
    """One split of a GLUE task: from GLUE's TSV files in ``data_dir`` if given, else from the hub."""
    if data_dir is None:
        return load_hub(split, path=path, name=name or task)
    if split not in _GLUE_FILES:
        raise ConfigError(f"GLUE split {split!r} has no TSV file; known splits: {sorted(_GLUE_FILES)}")
    file = Path(data_dir) / _GLUE_FILES[split]
    if not Path(data_dir).is_dir():
        raise DataError(f"dataset.data_dir={data_dir} is not a directory; point it at a folder with GLUE's TSV files")
    cols = read_table(file, column_names=_GLUE_HEADERLESS.get(task))
    rename = _GLUE_RENAME.get(task, {})
    cols = {rename.get(k, k): v for k, v in cols.items()}
    return datasets.Dataset.from_dict(cols)


def load_hub(split: str, *, path: str, name: Optional[str] = None) -> datasets.Dataset:
    """One split of a hub dataset through datasets.load_dataset (the path for users online)."""
    from seqcls.models import go_offline_if_hub_unreachable
    go_offline_if_hub_unreachable()
    try:
        return datasets.load_dataset(path, name, split=split)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as e:
        if isinstance(e, ValueError):
            raise
        raise DataError(f"cannot load dataset {path}{'/' + name if name else ''} split {split!r} from the hub "
                        f"({type(e).__name__}); offline, use dataset.data_dir=DIR (GLUE TSV files) or "
                        f"dataset=files with local files") from None


def load_files(split: str, *, train_file: Optional[str] = None, validation_file: Optional[str] = None,
               test_file: Optional[str] = None, column_names: Optional[Sequence[str]] = None) -> datasets.Dataset:
    """One split from local files: 'train', 'validation' or 'test'."""
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    if split not in files:
        raise ConfigError(f"dataset=files has splits train, validation and test, not {split!r}")
    if files[split] is None:
        raise ConfigError(f"dataset.{split}_file is not set; pass dataset.{split}_file=PATH")
    columns = read_table(files[split], column_names=column_names)
    try:
        return datasets.Dataset.from_dict(columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # e.g. a JSON column holding lists in some rows, strings in others
        for name, values in columns.items():
            try:
                pa.array(values)
                continue
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                pass
            kinds = [type(v) for v in values if v is not None]
            odd = next((i for i, v in enumerate(values) if v is not None and type(v) is not kinds[0]), None)
            if odd is not None:
                raise DataError(f"{files[split]}: column {name!r} holds a {type(values[odd]).__name__} in row {odd} "
                                f"but a {kinds[0].__name__} before it; give every row the same kind of value") from None
        raise


def _class_index(v: Any, index: dict[str, int]) -> Any:
    """A label value as a class index where it reads as one (a name in ``index``, a digit string, an integral
    float); anything else comes back as it is (a string stripped), for the caller to refuse."""
    if isinstance(v, str):
        v = v.strip()
        if v in index:
            return index[v]
        if v.lstrip("-").isdigit():
            return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def encode_multi_labels(values: Sequence[Any], *, num_labels: int, labels: Optional[Sequence[str]], where: str,
                        separator: str = ",") -> list[list[float]]:
    """Each example's set of labels as a 0/1 row of num_labels floats. A value is a list of label names or
    indices (JSON lines, parquet), a string of them joined by ``separator`` (csv, tsv; empty: no label),
    or one index."""
    index = {name: i for i, name in enumerate(labels)} if labels else {}
    out = []
    for i, v in enumerate(values):
        items = v if isinstance(v, (list, tuple)) else \
            [t for t in (x.strip() for x in v.split(separator)) if t] if isinstance(v, str) else [v]
        row = [0.0] * num_labels
        for item in items:
            item = _class_index(item, index)
            if isinstance(item, str) and not labels:
                raise DataError(f"{where}: row {i} has string label {item!r}; set dataset.labels=[...] to the label "
                                f"names in index order")
            if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < num_labels:
                known = f"one of dataset.labels={list(labels)} or " if labels else ""
                raise DataError(f"{where}: row {i} has label {item!r}; a label is {known}an index in "
                                f"0..{num_labels - 1} (several joined by {separator!r}, or a list)")
            row[item] = 1.0
        out.append(row)
    return out


def encode_labels(values: Sequence[Any], *, num_labels: int, labels: Optional[Sequence[str]],
                  where: str) -> list:
    """Labels as class indices (or floats for regression), checked against num_labels."""
    if num_labels == 1:
        try:
            return [float(v) for v in values]
        except (TypeError, ValueError):
            bad = next(i for i, v in enumerate(values) if not _is_float(v))
            raise DataError(f"{where}: row {bad} has label {values[bad]!r}, not a number; regression needs numeric labels") from None
    index = {name: i for i, name in enumerate(labels)} if labels else {}
    out = []
    for i, v in enumerate(values):
        if isinstance(v, (list, tuple)):
            raise DataError(f"{where}: row {i} has a list of labels {v!r}; for several labels a text set "
                            f"dataset.task=multi_label")
        v = _class_index(v, index)
        if isinstance(v, str):
            if labels:
                raise DataError(f"{where}: row {i} has label {v!r}, not one of dataset.labels={list(labels)}")
            raise DataError(f"{where}: row {i} has string label {v!r}; set dataset.labels=[...] "
                            f"to the label names in class-index order")
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < num_labels:
            raise DataError(f"{where}: row {i} has label {v!r}, outside 0..{num_labels - 1}; "
                            f"fix the row or set dataset.num_labels")
        out.append(v)
    return out


def _is_float(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def prepare_split(ds: datasets.Dataset, tokenizer, *, text_fields: Sequence[str], label_field: str,
                  num_labels: int, labels: Optional[Sequence[str]], max_length: int, where: str,
                  require_labels: bool = True, limit: Optional[int] = None, multi_label: bool = False,
                  label_separator: str = ",") -> datasets.Dataset:
    """Check columns and labels, tokenise (pairs as pairs, truncated at max_length, no padding).

    Returns a dataset with input_ids, attention_mask (token_type_ids) and, when labeled, labels (for
    ``multi_label``, a 0/1 row of num_labels floats an example: encode_multi_labels).
    """
    if len(ds) == 0:
        raise DataError(f"{where}: the split is empty; check the file or split name")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    missing = [c for c in text_fields if c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: text column(s) {missing} not found; columns are {ds.column_names} "
                        f"(set dataset.text_fields)")
    has_labels = label_field in ds.column_names
    if require_labels and not has_labels:
        raise DataError(f"{where}: label column {label_field!r} not found; columns are {ds.column_names} "
                        f"(set dataset.label_field)")
    columns = {c: ["" if t is None else str(t) for t in ds[c]] for c in text_fields}
    enc = tokenizer(*[columns[c] for c in text_fields], truncation=True, max_length=max_length)
    out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    if has_labels:
        raw = list(ds[label_field])
        # No label: None, or -1 (GLUE's hub test sets); "" too, except in a multi-label split (an empty set).
        missing = (-1,) if multi_label else ("", -1)
        if not require_labels and any(v is None or (not isinstance(v, (list, tuple)) and v in missing) for v in raw):
            has_labels = False  # an unlabeled test split (GLUE's hub test sets use -1)
        elif multi_label:
            out["labels"] = encode_multi_labels(raw, num_labels=num_labels, labels=labels, where=where,
                                                separator=label_separator)
        else:
            out["labels"] = encode_labels(raw, num_labels=num_labels, labels=labels, where=where)
    return datasets.Dataset.from_dict(out)


def check_train_labels(ds: datasets.Dataset, *, num_labels: int, where: str) -> None:
    """A classification training split must hold at least two classes (label sets, for multi-label)."""
    if num_labels > 1 and len({tuple(v) if isinstance(v, list) else v for v in ds["labels"]}) < 2:
        raise DataError(f"{where}: every example has the same label; a classifier needs at least two classes")


class PadCollator:
    """Pad a list of tokenised examples to the longest one in the batch (dynamic padding)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def padded_length(self, lengths: Sequence[int]) -> int:
        """The length a batch of examples of these lengths is padded to."""
        length = max(lengths)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        return length

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        length = self.padded_length([len(e["input_ids"]) for e in examples])
        batch: dict[str, torch.Tensor] = {}
        for key, pad in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in examples[0]:
                # One tensor from padded lists: far fewer small allocations than filling row by row.
                batch[key] = torch.tensor([e[key] + [pad] * (length - len(e[key])) for e in examples],
                                          dtype=torch.long)
        if "labels" in examples[0]:
            batch["labels"] = torch.tensor([e["labels"] for e in examples])
        return batch


class PackCollator:
    """Lay a batch's examples end to end in one row, without padding (seqcls.models.pack_sequences).

    Gives ``input_ids``, ``position_ids`` (each example's own positions, from ``position_offset``),
    ``token_type_ids`` when the examples have them, ``cu_seq_lens`` (int32: where each example starts,
    then where the filler starts, then the row's length) and ``labels`` (one per example). The row is
    filled up to a multiple of ``pad_to_multiple_of`` tokens with at least one filler token (few
    shapes for compiled code and CUDA graphs); the filler is a sequence of its own, attended to by
    nothing else and read by nothing."""

    def __init__(self, pad_token_id: int, position_offset: int = 0, pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id, self.position_offset = pad_token_id, position_offset
        self.pad_to_multiple_of = pad_to_multiple_of

    def padded_length(self, lengths: Sequence[int]) -> int:
        """The length of the row that examples of these lengths are packed into."""
        total = sum(lengths) + 1
        if self.pad_to_multiple_of:
            total = math.ceil(total / self.pad_to_multiple_of) * self.pad_to_multiple_of
        return total

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(e["input_ids"]) for e in examples]
        total = self.padded_length(lengths)
        fill = total - sum(lengths)
        start = self.position_offset
        batch = {"input_ids": [t for e in examples for t in e["input_ids"]] + [self.pad_token_id] * fill,
                 "position_ids": [p for n in lengths for p in range(start, start + n)] + [start] * fill}
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = [t for e in examples for t in e["token_type_ids"]] + [0] * fill
        out = {k: torch.tensor([v], dtype=torch.long) for k, v in batch.items()}
        out["cu_seq_lens"] = torch.tensor(list(itertools.accumulate(lengths, initial=0)) + [total], dtype=torch.int32)
        if "labels" in examples[0]:
            out["labels"] = torch.tensor([e["labels"] for e in examples])
        return out


class ShardSampler(Sampler[int]):
    """Every index exactly once across ranks, no padding: rank r takes r, r+W, r+2W, ..."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches so that every optimizer step sees one global batch.

    Each epoch draws a seeded permutation. With ``group_by_length`` the permutation is cut into
    mega-batches of ``mega_batch_mult`` global batches, each sorted by length, so a batch holds
    examples of similar length and dynamic padding wastes little; the order of the global batches
    is then shuffled again. A global batch of G = local x accum x world examples goes to rank r as
    its slice [r*local*accum, (r+1)*local*accum), cut into ``accum`` micro-batches: the examples of
    a step do not depend on how they are split over ranks and accumulation.
    Resumable: state_dict holds the epoch and the micro-batches already yielded in it.
    """

    def __init__(self, lengths: Sequence[int], *, local_batch_size: int, grad_accum_steps: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, group_by_length: bool = True, mega_batch_mult: int = 16):
        self.lengths = list(lengths)
        self.local, self.accum, self.rank, self.world = local_batch_size, grad_accum_steps, rank, world_size
        self.seed, self.group_by_length, self.mega_batch_mult = seed, group_by_length, mega_batch_mult
        self.global_batch = local_batch_size * grad_accum_steps * world_size
        self.steps_per_epoch = len(self.lengths) // self.global_batch
        self.epoch, self.yielded = 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.yielded = epoch, 0

    def global_batches(self, epoch: Optional[int] = None) -> list[list[int]]:
        """The global batches of ``epoch`` (default: the current one), in order."""
        g = torch.Generator().manual_seed(self.seed + (self.epoch if epoch is None else epoch))
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        batches = [perm[i: i + self.global_batch] for i in range(0, self.steps_per_epoch * self.global_batch,
                                                                      self.global_batch)]
        if self.group_by_length:
            flat = [i for b in batches for i in b]
            mega = self.global_batch * self.mega_batch_mult
            flat = [i for s in range(0, len(flat), mega)
                    for i in sorted(flat[s: s + mega], key=lambda i: -self.lengths[i])]
            batches = [flat[i: i + self.global_batch] for i in range(0, len(flat), self.global_batch)]
            order = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in order]
        return batches

    def micro_batches(self, epoch: Optional[int] = None) -> list[list[int]]:
        """This rank's micro-batches of ``epoch`` (default: the current one), in order; changes no state."""
        span = self.local * self.accum
        micro = []
        for gb in self.global_batches(epoch):
            mine = gb[self.rank * span: (self.rank + 1) * span]
            micro.extend(mine[j: j + self.local] for j in range(0, span, self.local))
        return micro

    def __iter__(self) -> Iterator[list[int]]:
        start = self.yielded
        for b in self.micro_batches()[start:]:
            self.yielded += 1
            yield b
        self.epoch, self.yielded = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accum

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.yielded = int(state["epoch"]), int(state["yielded"])
