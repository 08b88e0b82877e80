"""Shared fixtures: compose the real config with overrides, and a small learnable dataset."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

# Tiny models run fastest on one thread, and the suite shares 2 cores: no thread oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import seqcls  # noqa: F401
from seqcls.train import CONF_DIR

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A tiny, dropout-free model and short runs: what most tests train.
TINY = ["model=tiny_bert", "peft=none", "+model.config_overrides.hidden_dropout_prob=0.0",
        "+model.config_overrides.attention_probs_dropout_prob=0.0"]


def pytest_collection_modifyitems(config, items):
    """GPU tests are deselected, not skipped, on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    gpu = [i for i in items if i.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [i for i in items if not i.get_closest_marker("gpu")]


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def write_synthetic(folder: Path, *, n_train: int = 256, n_val: int = 64, seed: int = 0) -> Path:
    """A learnable task: label 1 when the text holds a 'good' word, 0 when it holds a 'bad' one."""
    rng = random.Random(seed)
    good, bad = ["great", "good", "excellent", "fine", "happy"], ["awful", "bad", "terrible", "poor", "sad"]
    filler = ["the", "movie", "was", "really", "a", "plot", "actor", "film", "quite", "story"]

    def rows(n):
        out = []
        for _ in range(n):
            label = rng.randint(0, 1)
            words = rng.sample(filler, 4) + [rng.choice(good if label else bad)]
            rng.shuffle(words)
            out.append((" ".join(words), label))
        return out

    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("dev", n_val), ("test", n_val)):
        with open(folder / f"{name}.csv", "w") as f:
            f.write("text,label\n")
            for text, label in rows(n):
                f.write(f"{text},{label}\n")
    return folder


@pytest.fixture
def synthetic_dir(tmp_path) -> Path:
    return write_synthetic(tmp_path / "data")


def synthetic_overrides(data_dir: Path, run_dir: Path) -> list[str]:
    return TINY + ["dataset=files", f"dataset.train_file={data_dir}/train.csv",
                   f"dataset.validation_file={data_dir}/dev.csv", f"dataset.test_file={data_dir}/test.csv",
                   "dataset.max_length=32", f"run_dir={run_dir}", "optimizer.lr=1e-3",
                   "step_scheduler.global_batch_size=16", "step_scheduler.local_batch_size=16",
                   "step_scheduler.log_every_steps=4"]


def run_interpreted(module: str, *args: str) -> dict:
    """``python -m tests.<module> args`` in a process of its own with TRITON_INTERPRET=1 (which must be set
    before triton is imported: Triton's kernels then run on CPU tensors); returns its last line's JSON."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(root), str(root / "src")])}
    done = subprocess.run([sys.executable, "-m", f"tests.{module}", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
