"""Model and tokenizer loaders named by the model group's ``_target_``."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedModel, PreTrainedTokenizerBase)

from seqcls.env import package_dir  # noqa: F401  (re-exported)
from seqcls.errors import ConfigError

OFFLINE_HINT = ("offline, use a local directory (model.pretrained_model_name_or_path=DIR) "
                "or model=minilm_l6, whose weights install with the package")


def _label_kwargs(num_labels: int, labels: Optional[list[str]]) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_labels": num_labels}
    if num_labels == 1:
        kw["problem_type"] = "regression"
    elif labels:
        kw["id2label"] = dict(enumerate(labels))
        kw["label2id"] = {name: i for i, name in enumerate(labels)}
    return kw


def go_offline_if_hub_unreachable() -> None:
    """Without network, huggingface_hub retries each request for ~30 s before failing. When the
    hub's name does not even resolve, switch to offline mode at once (the local cache still works)."""
    import socket

    import huggingface_hub.constants as hf_constants
    if hf_constants.HF_HUB_OFFLINE:
        return
    host = hf_constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        hf_constants.HF_HUB_OFFLINE = True
        try:
            import datasets.config
            datasets.config.HF_HUB_OFFLINE = True
        except ImportError:
            pass


def _is_local(name_or_path: str) -> bool:
    return name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()


def from_pretrained(pretrained_model_name_or_path: str, *, num_labels: int, labels: Optional[list[str]] = None,
                    trust_remote_code: bool = False, **_: Any) -> PreTrainedModel:
    """A pretrained encoder with a freshly initialised classification head."""
    if pretrained_model_name_or_path is None:
        raise ConfigError("model.pretrained_model_name_or_path is not set; pass a hub id or a local directory")
    if _is_local(pretrained_model_name_or_path) and not Path(pretrained_model_name_or_path).is_dir():
        raise ConfigError(f"model path {pretrained_model_name_or_path} does not exist; "
                          f"pass an existing Hugging Face model directory")
    if not _is_local(pretrained_model_name_or_path):
        go_offline_if_hub_unreachable()
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            pretrained_model_name_or_path, trust_remote_code=trust_remote_code,
            ignore_mismatched_sizes=True, **_label_kwargs(num_labels, labels))
    except OSError as e:
        if _is_local(pretrained_model_name_or_path):
            raise ConfigError(f"{pretrained_model_name_or_path} is not a loadable Hugging Face model directory "
                              f"({str(e).splitlines()[0]})") from None
        raise ConfigError(f"cannot load model {pretrained_model_name_or_path!r} from the hub "
                          f"(no network or no such model); {OFFLINE_HINT}") from None


def from_config(model_type: str, *, num_labels: int, labels: Optional[list[str]] = None,
                config_overrides: Optional[dict] = None, tokenizer: Optional[PreTrainedTokenizerBase] = None,
                **_: Any) -> PreTrainedModel:
    """A randomly initialised model of ``model_type`` (tiny models for tests), sized by config_overrides."""
    overrides = dict(config_overrides or {})
    if tokenizer is not None:
        overrides.setdefault("vocab_size", len(tokenizer))
        overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
    config = AutoConfig.for_model(model_type, **overrides, **_label_kwargs(num_labels, labels))
    return AutoModelForSequenceClassification.from_config(config)


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    if _is_local(name_or_path) and not Path(name_or_path).is_dir():
        raise ConfigError(f"tokenizer path {name_or_path} does not exist; pass an existing directory")
    if not _is_local(name_or_path):
        go_offline_if_hub_unreachable()
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError:
        raise ConfigError(f"cannot load the tokenizer of {name_or_path!r} (no network or no such model); "
                          f"{OFFLINE_HINT}") from None
