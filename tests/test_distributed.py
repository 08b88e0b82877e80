"""FSDP2 data parallelism on CPU (gloo): 2 ranks must train exactly like 1 rank with the same global batch.

The 2-rank runs go through seqcls.train's Hydra entry point under torchrun (all in one launch, see
tests/dist_worker.py), each rank's stdout and stderr captured by torchrun, and are compared with
1-rank runs in this process: 2 ranks x local 2 x accumulation 2 against 1 rank x local 8, global
batch 8 in both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from seqcls.build import build_trainer
from seqcls.config import ConfigError
from seqcls.distributed import build_mesh, find_transformer_blocks
from seqcls.models import from_config
from seqcls.train import run
from tests.conftest import REPO, compose_cfg, synthetic_overrides, write_synthetic

STEPS = 4
N_VAL = 33  # odd: the 2 validation shards differ in size
ATOL = 1e-5
# CPU and fp32 wherever the suite runs; per-step train rows, global batch 8, a validation and a
# consolidated checkpoint at the end; max_grad_norm below the gradients' norm (~0.5), so clipping
# (over DTensor shards under FSDP) acts.
RUN = ["device=cpu", f"step_scheduler.max_steps={STEPS}", "step_scheduler.log_every_steps=1",
       "step_scheduler.global_batch_size=8", "step_scheduler.max_grad_norm=0.1"]
ONE_RANK = RUN + ["step_scheduler.local_batch_size=8"]
TWO_RANKS = RUN + ["step_scheduler.local_batch_size=2", "distributed=fsdp2"]  # accumulation 2
LORA = ["peft=lora", "peft.dropout=0.0"]


def read_rows(run_dir: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def final_model_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"step_{STEPS:08d}" / "model"


def torchrun(tmp: Path, runs: list[list[str]]) -> dict[int, str]:
    """seqcls.train on 2 gloo ranks, once per override list; returns each rank's stdout + stderr."""
    logs = tmp / "torchrun_logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--log-dir={logs}", "--redirects=3", str(REPO / "tests" / "dist_worker.py"), json.dumps(runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = {}
    for rank in (0, 1):
        (rank_dir,) = logs.glob(f"*/attempt_0/{rank}")
        out[rank] = (rank_dir / "stdout.log").read_text() + (rank_dir / "stderr.log").read_text()
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stderr[-3000:]}\nrank 0:\n{out[0][-3000:]}\nrank 1:\n{out[1][-3000:]}"
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("dist") / "data", n_train=64, n_val=N_VAL)


@pytest.fixture(scope="module")
def one_rank(data_dir, tmp_path_factory):
    """The reference: 1 process, no sharding, local batch 8; returns (run_dir, trained model)."""
    run_dir = tmp_path_factory.mktemp("one_rank")
    trainer = build_trainer(compose_cfg(synthetic_overrides(data_dir, run_dir) + ONE_RANK), run_dir)
    trainer.fit()
    return run_dir, trainer.model.eval()


@pytest.fixture(scope="module")
def two_ranks(data_dir, tmp_path_factory):
    """One torchrun launch, four runs: full fine-tuning and LoRA on FSDP (mesh dp_shard=2), LoRA on HSDP, full
    fine-tuning on FSDP with activation checkpointing.

    dp_replicate_size=2 puts both ranks on the replicate dim (mesh 2 x 1): gradients are then averaged
    by HSDP's all-reduce rather than the reduce-scatter. Each rank's Hydra gets its own dir, so that
    what rank 1 writes on its own can be seen.
    Returns ({run name: run_dir}, {rank: its stdout + stderr over all runs}, tmp dir).
    """
    tmp = tmp_path_factory.mktemp("two_ranks")
    hydra_dir = f"hydra.run.dir={tmp}/hydra/" + "${oc.env:RANK}"
    runs = {"fsdp": TWO_RANKS, "fsdp_lora": TWO_RANKS + LORA,
            "hsdp_lora": TWO_RANKS + LORA + ["distributed.dp_replicate_size=2"],
            "fsdp_checkpointed": TWO_RANKS + ["distributed.activation_checkpointing=true"]}
    out = torchrun(tmp, [synthetic_overrides(data_dir, tmp / name) + o + [hydra_dir] for name, o in runs.items()])
    return {name: tmp / name for name in runs}, out, tmp


@pytest.fixture(scope="module")
def one_rank_lora(data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one_rank_lora")
    build_trainer(compose_cfg(synthetic_overrides(data_dir, run_dir) + ONE_RANK + LORA), run_dir).fit()
    return run_dir


def assert_same_training(run_dir: Path, ref_dir: Path) -> None:
    train, ref_train = read_rows(run_dir, "train"), read_rows(ref_dir, "train")
    assert [r["step"] for r in train] == [r["step"] for r in ref_train] == list(range(1, STEPS + 1))
    # grad_norm is the check that gradients are averaged, not summed, over ranks: clipping and AdamW
    # would hide a constant factor from the losses and weights.
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in train] == pytest.approx([r[key] for r in ref_train], abs=ATOL), key
    (val,), (ref_val,) = read_rows(run_dir, "validation"), read_rows(ref_dir, "validation")
    assert val["num_examples"] == ref_val["num_examples"] == N_VAL  # every example once, none padded in
    assert val["accuracy"] == ref_val["accuracy"] and val["loss"] == pytest.approx(ref_val["loss"], abs=ATOL)


def assert_same_weights(model_dir: Path, ref_model_dir: Path) -> None:
    weights, ref = load_file(model_dir / "model.safetensors"), load_file(ref_model_dir / "model.safetensors")
    assert weights.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(weights[k], ref[k], atol=ATOL, rtol=0, msg=k)


# ------------------------------------------------------------------------------------ unit tests

def test_build_mesh_refuses_dp_sizes_whose_product_is_not_the_world_size():
    with pytest.raises(ConfigError, match=r"dp_size=2 x dp_replicate_size=2 = 4 but 2 processes.*dp_size=null"):
        build_mesh(2, dp_size=2, dp_replicate_size=2, device_type="cpu")
    with pytest.raises(ConfigError, match="dp_replicate_size=3 does not divide the 2"):
        build_mesh(2, dp_size=None, dp_replicate_size=3, device_type="cpu")


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_find_transformer_blocks_returns_the_encoder_layers(model_type):
    model = from_config(model_type, num_labels=2, config_overrides=dict(
        vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32))
    blocks = find_transformer_blocks(model)
    assert blocks == list(getattr(model, model_type).encoder.layer) and len(blocks) == 3


# ------------------------------------------------------------------------- FSDP2 vs one rank

@pytest.mark.dist
def test_fsdp2_in_one_process_without_a_launcher_trains_like_unsharded(data_dir, one_rank, tmp_path):
    ref_dir, _ = one_rank
    run_dir = tmp_path / "run"
    run(compose_cfg(synthetic_overrides(data_dir, run_dir) + ONE_RANK + ["distributed=fsdp2"]))
    assert not dist.is_initialized()  # the one-rank group it made is gone again
    assert_same_training(run_dir, ref_dir)
    assert_same_weights(final_model_dir(run_dir), final_model_dir(ref_dir))


@pytest.mark.dist
def test_two_fsdp2_ranks_with_accumulation_match_one_rank_and_only_rank_0_writes(one_rank, two_ranks):
    ref_dir, ref_model = one_rank
    dirs, out, tmp = two_ranks
    run_dir = dirs["fsdp"]
    assert_same_training(run_dir, ref_dir)
    model_dir = final_model_dir(run_dir)
    assert_same_weights(model_dir, final_model_dir(ref_dir))

    # The consolidated directory written under FSDP2 is a plain HF model equal to the 1-rank one.
    reloaded = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = AutoTokenizer.from_pretrained(model_dir)(["the movie was great", "awful plot"], padding=True,
                                                     return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, ref_model(**batch).logits, atol=ATOL, rtol=0)

    # Rank 0 alone logs and writes; rank 1 prints nothing (in either run) and saves no Hydra config.
    assert "fsdp2: mesh {'dp_shard': 2}" in out[0] and "step 4/4" in out[0]
    assert out[1] == ""
    assert (tmp / "hydra/0/.hydra").is_dir() and not (tmp / "hydra/1/.hydra").exists()
    assert len(read_rows(run_dir, "train")) == STEPS  # one writer: no row twice
    assert {"config.yaml", "metrics.jsonl", "results.json", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    assert len(list(run_dir.glob("tensorboard/events.*"))) <= 1


@pytest.mark.dist
@pytest.mark.parametrize("name, mesh", [("fsdp_lora", "{'dp_shard': 2}"),
                                        ("hsdp_lora", "{'dp_replicate': 2, 'dp_shard': 1}")], ids=["fsdp", "hsdp"])
def test_lora_on_two_ranks_trains_like_lora_on_one_rank(one_rank_lora, two_ranks, name, mesh):
    # Most parameters are frozen and share their FSDP units with the trainable LoRA matrices.
    dirs, out, _ = two_ranks
    assert f"fsdp2: mesh {mesh}" in out[0]
    assert_same_training(dirs[name], one_rank_lora)


@pytest.mark.dist
def test_activation_checkpointing_under_fsdp2_trains_like_one_rank(one_rank, two_ranks):
    # FSDP2's all-gathers run again inside each block's recompute in the backward.
    dirs, out, _ = two_ranks
    assert "activation checkpointing: 2 transformer blocks" in out[0]
    assert_same_training(dirs["fsdp_checkpointed"], one_rank[0])
    assert_same_weights(final_model_dir(dirs["fsdp_checkpointed"]), final_model_dir(one_rank[0]))


@pytest.mark.dist
def test_two_fsdp2_ranks_killed_with_sigkill_resume_to_the_uninterrupted_run(data_dir, tmp_path):
    """kill -9 of the whole torchrun job mid-run, then the same command again: per-step losses and the
    final weights equal those of an uninterrupted 2-rank run exactly (sharded DCP state, per-rank
    loader position and RNG; dropout stays on)."""
    import signal
    import time

    def command(run_dir):
        overrides = [o for o in synthetic_overrides(data_dir, run_dir) if "dropout" not in o]
        overrides += ["device=cpu", "distributed=fsdp2", "step_scheduler.max_steps=24",
                      "step_scheduler.log_every_steps=1", "step_scheduler.ckpt_every_steps=4",
                      "step_scheduler.global_batch_size=8", "step_scheduler.local_batch_size=2"]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "-m", "seqcls.train", *overrides]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(command(ref), cwd=REPO, env=env, check=True, capture_output=True, timeout=240)
    proc = subprocess.Popen(command(cut), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        rows = read_rows(cut, "train") if (cut / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= 6:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "results.json").exists()
    out = subprocess.run(command(cut), cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout + out.stderr
    steps = lambda d: [(r["step"], r["loss"]) for r in read_rows(d, "train")]  # noqa: E731
    assert steps(cut) == steps(ref)
    a, b = load_file(ref / "checkpoints" / "step_00000024" / "model" / "model.safetensors"), \
        load_file(cut / "checkpoints" / "step_00000024" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
