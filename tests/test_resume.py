"""Resume exactly where a run stopped; never lose or corrupt a checkpoint."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import seqcls.checkpoint as ckpt_mod
from seqcls.build import build_trainer
from seqcls.config import ConfigError
from seqcls.train import run
from seqcls.trainer import EXIT_PREEMPTED, NonFiniteLossError
from tests.conftest import REPO, compose_cfg, synthetic_overrides

# Dropout stays on (0.1) so that a resume that missed the RNG state would show in the losses.
RESUME = ["model=tiny_bert", "peft=none", "step_scheduler.max_steps=24", "step_scheduler.num_epochs=3",
          "step_scheduler.ckpt_every_steps=4", "step_scheduler.log_every_steps=1", "step_scheduler.val_every_steps=8",
          "step_scheduler.global_batch_size=8", "step_scheduler.local_batch_size=4", "checkpoint.keep_last_k=3"]


def overrides(data, run_dir, extra=()):
    base = [o for o in synthetic_overrides(data, run_dir) if "dropout" not in o and "batch_size" not in o]
    return base + RESUME + list(extra)


def launch(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "seqcls.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train_rows(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def final_weights(run_dir):
    latest = (run_dir / "checkpoints" / "LATEST").read_text().strip()
    return load_file(run_dir / "checkpoints" / latest / "model" / "model.safetensors")


def wait_for_step(run_dir, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(s >= step for s, _ in train_rows(run_dir)):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.01)
    raise TimeoutError


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, in a subprocess like the interrupted ones."""
    from tests.conftest import write_synthetic
    root = tmp_path_factory.mktemp("ref")
    data = write_synthetic(root / "data", n_train=96)
    proc = launch(overrides(data, root / "run"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return data, root / "run"


def assert_same_run(run_dir, ref_dir):
    assert train_rows(run_dir) == train_rows(ref_dir)  # exactly, fp32 on CPU
    a, b = final_weights(run_dir), final_weights(ref_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run_dir / "results.json").read_text())["final"] == \
        json.loads((ref_dir / "results.json").read_text())["final"]


def test_kill_9_at_a_random_step_then_rerun_matches_an_uninterrupted_run(tmp_path, reference):
    data, ref_dir = reference
    run_dir = tmp_path / "run"
    kill_at = random.Random().randint(5, 19)  # mid-epoch: an epoch is 12 steps here
    proc = launch(overrides(data, run_dir))
    wait_for_step(run_dir, kill_at, proc)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "results.json").exists()
    proc = launch(overrides(data, run_dir))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "resumed from" in out
    assert_same_run(run_dir, ref_dir)


def test_sigterm_saves_at_the_next_step_exits_distinctly_and_resumes(tmp_path, reference):
    data, ref_dir = reference
    run_dir = tmp_path / "run"
    proc = launch(overrides(data, run_dir, ["step_scheduler.ckpt_every_steps=100"]))
    wait_for_step(run_dir, 6, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out
    latest = (run_dir / "checkpoints" / "LATEST").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert 6 <= stopped_at < 24
    proc = launch(overrides(data, run_dir, ["step_scheduler.ckpt_every_steps=100"]))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert train_rows(run_dir) == train_rows(ref_dir)
    a, b = final_weights(run_dir), final_weights(ref_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_crash_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, synthetic_dir, monkeypatch):
    run_dir = tmp_path / "run"
    calls = {"n": 0}
    real = ckpt_mod.save_hf_dir

    def crash_on_second(out, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            (out).mkdir(parents=True, exist_ok=True)
            (out / "model.safetensors").write_bytes(b"half-written")
            raise OSError("disk gone mid-write")
        return real(out, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_hf_dir", crash_on_second)
    with pytest.raises(OSError, match="mid-write"):
        run(compose_cfg(overrides(synthetic_dir, run_dir)))
    root = run_dir / "checkpoints"
    assert (root / "LATEST").read_text().strip() == "step_00000004"
    assert (root / ".tmp-step_00000008").exists() and not (root / "step_00000008").exists()
    monkeypatch.setattr(ckpt_mod, "save_hf_dir", real)
    trainer = build_trainer(compose_cfg(overrides(synthetic_dir, run_dir)), run_dir)
    assert trainer.step == 4  # resumed from the intact checkpoint
    trainer.fit()
    assert (root / "LATEST").read_text().strip() == "step_00000024" and not (root / ".tmp-step_00000008").exists()


def test_checkpoint_from_another_model_is_refused_before_anything_loads(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run"
    run(compose_cfg(overrides(synthetic_dir, run_dir, ["step_scheduler.max_steps=4"])))
    with pytest.raises(ConfigError, match="another setup .*model: checkpoint 'bert' vs config 'roberta'"):
        build_trainer(compose_cfg(overrides(synthetic_dir, run_dir, ["model=tiny_roberta"])), run_dir)


def test_existing_run_is_never_restarted_over_and_a_finished_run_is_left_alone(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run"
    first = run(compose_cfg(overrides(synthetic_dir, run_dir, ["step_scheduler.max_steps=4"])))
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        build_trainer(compose_cfg(overrides(synthetic_dir, run_dir, ["checkpoint.restore_from=none"])), run_dir)
    again = run(compose_cfg(overrides(synthetic_dir, run_dir, ["step_scheduler.max_steps=4"])))
    assert again == json.loads(json.dumps(first))
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_restore_from_a_path_without_a_checkpoint_is_an_error(tmp_path, synthetic_dir):
    with pytest.raises(ConfigError, match="no checkpoint there"):
        build_trainer(compose_cfg(overrides(synthetic_dir, tmp_path / "r", [f"checkpoint.restore_from={tmp_path}"])),
                      tmp_path / "r")


def test_retention_keeps_the_last_k_and_best_follows_the_task_metric_not_loss(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run"
    run(compose_cfg(overrides(synthetic_dir, run_dir, ["checkpoint.keep_last_k=2"])))
    root = run_dir / "checkpoints"
    best = (root / "BEST").read_text().strip()
    kept = sorted(p.name for p in root.glob("step_*"))
    assert kept[-2:] == ["step_00000020", "step_00000024"] and set(kept) <= {"step_00000020", "step_00000024", best}
    val = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["split"] == "validation"]
    best_row = max(val, key=lambda r: r["accuracy"])  # first step that reached the top accuracy
    assert best == f"step_{best_row['step']:08d}"


def test_nan_loss_stops_the_run_naming_the_step_and_saves_nothing_after_it(tmp_path, synthetic_dir, monkeypatch):
    from seqcls.trainer import Trainer
    real = Trainer._loss_sum

    def poisoned(self, logits, labels):
        loss = real(self, logits, labels)
        return loss * float("nan") if self.step >= 5 and self.model.training else loss

    monkeypatch.setattr(Trainer, "_loss_sum", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="at step 6"):
        run(compose_cfg(overrides(synthetic_dir, run_dir)))
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_00000004"
    w = load_file(run_dir / "checkpoints" / "step_00000004" / "model" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())
