"""What seqcls.evaluate, seqcls.predict and seqcls.export share: reading a run dir (its config, its
checkpoints, its saved model), running the model over tokenised examples, and their ``key=value``
command line.

A run dir holds config.yaml (the composed config, written by seqcls.train) and
checkpoints/{LATEST,BEST,step_XXXXXXXX/model/} (a Hugging Face directory; merged weights for LoRA runs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import seqcls  # noqa: F401  (registers the schema and the resolvers config.yaml uses)
from seqcls.config import ConfigError, TrainConfig
from seqcls.data import DataError, PadCollator

log = logging.getLogger("seqcls")
USER_ERRORS = (ConfigError, DataError)
RUN_OVERRIDE_PREFIXES = ("dataset.",)  # the parts of a run's config a command may change


# ---------------------------------------------------------------------- command line
def parse_args(argv: Optional[Sequence[str]], schema: type, *, usage: str, doc: str) -> tuple[Any, list[str]]:
    """``key=value`` arguments into ``schema`` (a dataclass) plus the run-config overrides (``dataset.*``).

    String fields take the value as typed (a text may hold ':' or '['); lists of strings are
    ``[a,b]`` or ``a,b`` with the names as typed; other fields parse it as YAML (``true``, ``64``,
    ``null``) and are checked by OmegaConf against the field's type.
    ``-h``/``--help`` prints ``doc``; a bad argument prints ``usage`` and exits with status 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip())
        sys.exit(0)

    def fail(msg: str):
        print(f"{usage}\nerror: {msg}", file=sys.stderr)
        sys.exit(2)

    hints = typing.get_type_hints(schema)
    names = [f.name for f in fields(schema)]
    values: dict[str, Any] = {}
    overrides: list[str] = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            fail(f"{arg!r} is not key=value")
        if key.startswith(RUN_OVERRIDE_PREFIXES):
            overrides.append(arg)
        elif key not in names:
            fail(f"unknown argument {key!r}; arguments are {', '.join(names)} and dataset.KEY=VALUE")
        elif hints[key] in (str, Optional[str]):
            values[key] = value
        elif hints[key] in (list[str], Optional[list[str]]):
            # Column names as typed, not YAML: GLUE's are '#1 String' ('#' starts a YAML comment).
            items = value[1:-1] if value.startswith("[") and value.endswith("]") else value
            values[key] = [item.strip().strip("'\"") for item in items.split(",") if item.strip()]
        else:
            try:
                values[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                fail(f"{key}={value}: not a valid value")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values)), overrides
    except OmegaConfBaseException as e:
        key, msg = getattr(e, "full_key", None), str(e).strip().splitlines()[0]
        fail(f"{key} is required" if type(e).__name__ == "MissingMandatoryValue" and key
             else f"{key}: {msg}" if key else msg)
    except ConfigError as e:
        fail(str(e))


def setup_cli() -> None:
    """Log lines on stderr (stdout holds the command's result), no progress bars."""
    from transformers.utils import logging as hf_logging

    from seqcls.train import setup_logging
    setup_logging(True)
    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A mistake in the arguments or the data: one line on stderr and exit status 2, no traceback."""
    try:
        yield
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------- run dir
def load_run_config(run_dir: str | os.PathLike, overrides: Sequence[str] = ()) -> DictConfig:
    """The run's config.yaml with ``dataset.KEY=VALUE`` overrides, checked against the training schema."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found: run_dir must be a seqcls.train run dir (it writes config.yaml)")
    bad = [o for o in overrides if not o.startswith(RUN_OVERRIDE_PREFIXES)]
    if bad:
        raise ConfigError(f"only dataset.* keys of the run's config can be overridden, not {bad}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path),
                              OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.to_object(cfg)  # the schema's __post_init__ checks, on the overridden values too
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path} with overrides {list(overrides)}: {str(e).strip().splitlines()[0]}") from None
    return cfg


def find_checkpoint(run_dir: str | os.PathLike, cfg: DictConfig, which: str = "best") -> Path:
    """A run's checkpoint folder (step_XXXXXXXX): ``best``, ``latest``, ``step_N`` or a path.

    ``best`` falls back to the latest checkpoint when none was saved at the best validation step
    (a run that checkpoints only at its end and peaked earlier).
    """
    root = Path(cfg.checkpoint.checkpoint_dir or Path(run_dir) / "checkpoints")
    from seqcls.checkpoint import read_pointer

    if which in ("best", "latest"):
        path = read_pointer(root, which.upper())
        if path is None and which == "best":
            path = read_pointer(root, "LATEST")
            if path is not None:
                log.warning("no checkpoint was saved at the best validation step; using the latest, %s", path.name)
        if path is None:
            raise ConfigError(f"{root} holds no checkpoint (was checkpoint.enabled false, or the run stopped "
                              f"before its first?)")
    elif re.fullmatch(r"(step_)?\d+", which):
        path = root / f"step_{int(which.removeprefix('step_')):08d}"
        if not path.is_dir():
            kept = sorted(p.name for p in root.glob("step_*") if p.is_dir())
            raise ConfigError(f"checkpoint={which}: {path} does not exist; this run keeps {kept}")
    else:
        path = Path(which)
        if (path / "LATEST").is_file():  # a checkpoints folder
            path = read_pointer(path, "LATEST") or path
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"checkpoint={which}: not a checkpoint folder (no trainer_state.json); pass best, "
                              f"latest, step_N or a step_XXXXXXXX folder")
    if not (path / "model" / "config.json").is_file():
        raise ConfigError(f"{path} has no model/ folder: the run was trained with checkpoint.save_consolidated=false")
    return path


def checkpoint_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["step"])


def load_classifier(model_dir: Path, device: torch.device):
    """The saved Hugging Face model (eval mode, on ``device``) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval().to(device)
    return model, AutoTokenizer.from_pretrained(model_dir)


def label_names(model) -> list[str]:
    """Class names in index order, from the saved config's id2label."""
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(model.config.num_labels)]


# ---------------------------------------------------------------------- inference
@torch.no_grad()
def logits_of(model, examples: Sequence[dict[str, list[int]]], *, batch_size: int, pad_token_id: int,
              device: torch.device) -> np.ndarray:
    """Logits [N, num_labels] (fp32) of tokenised examples, in their order.

    Batches hold examples of similar length (sorted, then put back in order), so padding wastes little.
    """
    collate = PadCollator(pad_token_id)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    out = np.zeros((len(examples), model.config.num_labels), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        batch = collate([{k: v for k, v in examples[i].items() if k != "labels"} for i in idx])
        out[idx] = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy()
    return out


def tokenize(tokenizer, texts: Sequence[Sequence[Any]], *, max_length: int) -> list[dict[str, list[int]]]:
    """One or two text columns → examples, tokenised exactly as data.prepare_split does in training."""
    columns = [["" if t is None else str(t) for t in col] for col in texts]
    enc = tokenizer(*columns, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(columns[0]))]


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
