"""End-to-end runs of the trainer on a tiny model: learning, saving, accumulation, determinism."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from seqcls.build import build_trainer
from seqcls.train import run
from tests.conftest import compose_cfg, synthetic_overrides


def read_rows(run_dir, split):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_tiny_model_learns_a_learnable_task_and_writes_its_run_dir(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run"
    results = run(compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + [
        "step_scheduler.num_epochs=6", "step_scheduler.val_every_steps=4"]))
    val = read_rows(run_dir, "validation")
    assert val[0]["accuracy"] < 0.75 and results["final"]["accuracy"] >= 0.9
    assert val[-1]["num_examples"] == 64  # every validation example, once
    train = read_rows(run_dir, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    assert {"step", "epoch", "loss", "lr", "samples_per_s"} <= set(train[0])
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["steps"] == results["steps"] == 6 * (256 // 16)
    assert saved["best"]["metric"] == "accuracy" and saved["best"]["value"] >= 0.9
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == f"step_{saved['steps']:08d}"


def test_saved_directory_reloads_with_transformers_and_gives_equal_logits(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run"
    cfg = compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + ["step_scheduler.max_steps=3"])
    trainer = build_trainer(cfg, run_dir)
    trainer.fit()
    model_dir = run_dir / "checkpoints" / "step_00000003" / "model"
    reloaded = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(["the movie was great", "awful plot"], padding=True, return_tensors="pt")
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(trainer.model(**batch).logits, reloaded(**batch).logits, atol=1e-6)
    assert set(load_file(model_dir / "model.safetensors")) == set(trainer.model.state_dict())


def final_weights(tmp_path, synthetic_dir, name, overrides):
    run_dir = tmp_path / name
    trainer = build_trainer(compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + overrides + [
        "step_scheduler.max_steps=4", "step_scheduler.log_every_steps=1", "checkpoint.enabled=false"]), run_dir)
    trainer.fit()
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}, [r["loss"] for r in read_rows(run_dir, "train")]


def test_accumulating_two_micro_batches_of_4_equals_one_batch_of_8(tmp_path, synthetic_dir):
    w_acc, loss_acc = final_weights(tmp_path, synthetic_dir, "acc", [
        "step_scheduler.global_batch_size=8", "step_scheduler.local_batch_size=4"])
    w_one, loss_one = final_weights(tmp_path, synthetic_dir, "one", [
        "step_scheduler.global_batch_size=8", "step_scheduler.local_batch_size=8"])
    assert loss_acc == pytest.approx(loss_one, abs=1e-6)
    for k in w_one:
        torch.testing.assert_close(w_acc[k], w_one[k], atol=1e-6, rtol=0)


def test_same_seed_gives_the_same_run_and_another_seed_does_not(tmp_path, synthetic_dir):
    w1, l1 = final_weights(tmp_path, synthetic_dir, "a", ["seed=3"])
    w2, l2 = final_weights(tmp_path, synthetic_dir, "b", ["seed=3"])
    w3, l3 = final_weights(tmp_path, synthetic_dir, "c", ["seed=4"])
    assert l1 == l2 and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert l1 != l3


def test_non_divisible_batch_sizes_are_refused(tmp_path, synthetic_dir):
    from seqcls.config import ConfigError
    cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path / "r") + ["step_scheduler.global_batch_size=12",
                                                                             "step_scheduler.local_batch_size=8"])
    with pytest.raises(ConfigError, match="not divisible"):
        build_trainer(cfg, tmp_path / "r")


def test_bf16_frozen_lora_base_trains_bit_for_bit_as_fp32_and_saves_the_merged_update_in_fp32(tmp_path, synthetic_dir):
    """With bf16 autocast, what autocast reads only as bf16 (frozen Linear weights and biases, and the
    LayerNorms of the bf16 residual stream) is stored in bf16 for training: the same training as fp32
    storage, bit for bit. The saved model is fp32 and holds the whole LoRA update (a bf16 merge would
    round most of it away)."""
    losses = {}
    for flag in ("false", "true"):
        run_dir = tmp_path / flag
        cfg = compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + [
            "precision=bf16", "peft=lora", "peft.target_modules=[*.query,*.value]", "step_scheduler.max_steps=3",
            "step_scheduler.log_every_steps=1", "optimizer.lr=1e-2", f"compile.bf16_frozen_weights={flag}",
            "compile.bf16_master_weights=false"])  # the adapters stay fp32 here (test_master_weights.py: bf16)
        trainer = build_trainer(cfg, run_dir)
        params = dict(trainer.model.named_parameters())
        query = "bert.encoder.layer.0.attention.self.query"
        low = torch.bfloat16 if flag == "true" else torch.float32
        for name in (f"{query}.weight", f"{query}.bias", "bert.embeddings.LayerNorm.weight",
                     "bert.encoder.layer.0.output.dense.bias"):
            assert params[name].dtype == low, name
        assert params["bert.embeddings.word_embeddings.weight"].dtype == torch.float32  # autocast reads it in fp32
        assert params[f"{query}.lora_A.weight"].dtype == torch.float32
        trainer.fit()
        losses[flag] = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                        if json.loads(line)["split"] == "train"]
    assert len(losses["true"]) == 3 and losses["true"] == losses["false"]
    saved = load_file(run_dir / "checkpoints" / "step_00000003" / "model" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in saved.values())
    m = trainer.model.get_submodule(query)
    delta = m.scale * (m.lora_B.weight.float() @ m.lora_A.weight.float())
    assert delta.abs().max() > 0
    torch.testing.assert_close(saved[f"{query}.weight"] - m.weight.float(), delta, atol=1e-6, rtol=1e-4)


def test_log_values_are_taken_when_the_step_is_queued_and_read_later():
    """The next step overwrites its buffers in place (step graphs, the lr tensor): what is read later must be
    what they held at the log step."""
    from seqcls.trainer import LogValues
    loss, norm, lr, bad = torch.tensor(6.5), torch.tensor(0.25), torch.tensor(1e-4, dtype=torch.float64), torch.tensor(2**62)
    values = LogValues(loss, norm, lr, bad)
    for t in (loss, norm, lr, bad):
        t.fill_(-1)
    assert values.read() == (6.5, 0.25, 1e-4, 2**62)
    assert LogValues(loss, norm, 3e-5, torch.tensor(7)).read() == (-1.0, -1.0, 3e-5, 7)


def test_a_log_steps_values_are_read_after_the_next_step_is_queued_and_its_row_precedes_validation(tmp_path, synthetic_dir):
    """Reading a log step's loss at once would leave a GPU idle while the host writes the row and prepares
    the next batch: its row is written once the next step is launched, and before any validation row."""
    run_dir = tmp_path / "run"
    trainer = build_trainer(compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + [
        "step_scheduler.max_steps=7", "step_scheduler.log_every_steps=2", "step_scheduler.val_every_steps=4",
        "checkpoint.enabled=false"]), run_dir)
    events, step, write = [], trainer.train_step, trainer.metrics_log.write
    trainer.train_step = lambda micro: (events.append(f"step {trainer.step + 1}"), step(micro))[1]
    trainer.metrics_log.write = lambda row: (events.append(f"{row['split']} {row['step']}"), write(row))[1]
    trainer.fit()
    assert events == ["step 1", "step 2", "step 3", "train 2", "step 4", "train 4", "validation 4",
                      "step 5", "step 6", "step 7", "train 6", "train 7", "validation 7"]
    rows = read_rows(run_dir, "train")
    assert [r["step"] for r in rows] == [2, 4, 6, 7] and all(r["samples_per_s"] > 0 for r in rows)
    assert all(isinstance(r[k], float) for r in rows for k in ("loss", "lr", "grad_norm"))


def test_early_stopping_stops_after_its_patience_keeps_the_best_and_resumes_its_count(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run"
    # A threshold no accuracy change can pass: only the first validation counts as an improvement.
    base = synthetic_overrides(synthetic_dir, run_dir) + [
        "step_scheduler.num_epochs=6", "step_scheduler.val_every_steps=2", "step_scheduler.early_stopping_threshold=1.0"]
    results = run(compose_cfg(base + ["step_scheduler.early_stopping_patience=2"]))
    assert results["steps"] == 6 and results["early_stopped"]
    assert [r["step"] for r in read_rows(run_dir, "validation")] == [2, 4, 6]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "BEST").read_text().strip() == "step_00000002"  # saved as the new best
    assert (ckpts / "LATEST").read_text().strip() == "step_00000006"
    assert json.loads((run_dir / "results.json").read_text())["early_stopped"]
    rows = (run_dir / "metrics.jsonl").read_text()
    assert run(compose_cfg(base + ["step_scheduler.early_stopping_patience=2"]))["steps"] == 6  # complete: untouched
    assert (run_dir / "metrics.jsonl").read_text() == rows
    # More patience resumes the run with its count (2 validations without improvement): one more validation.
    more = run(compose_cfg(base + ["step_scheduler.early_stopping_patience=3"]))
    assert more["steps"] == 8 and more["early_stopped"]
    assert [r["step"] for r in read_rows(run_dir, "validation")] == [2, 4, 6, 8]
    # Patience running out at the last step is not an early stop.
    full = run(compose_cfg(base[:-3] + [f"run_dir={tmp_path / 'full'}", "step_scheduler.max_steps=6",
                                        "step_scheduler.val_every_steps=2", "step_scheduler.early_stopping_threshold=1.0",
                                        "step_scheduler.early_stopping_patience=2"]))
    assert full["steps"] == 6 and not full["early_stopped"]


def test_loss_as_best_metric_keeps_the_lowest_loss(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run"
    results = run(compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + [
        "step_scheduler.max_steps=8", "step_scheduler.val_every_steps=2", "step_scheduler.ckpt_every_steps=2",
        "checkpoint.best_metric=loss", "checkpoint.keep_last_k=1", "optimizer.lr=3e-3"]))
    val = read_rows(run_dir, "validation")
    lowest = min(val, key=lambda r: r["loss"])
    assert max(r["loss"] for r in val) > lowest["loss"]
    assert results["best"]["value"] == lowest["loss"] and results["best"]["step"] == lowest["step"]
    assert not results["best"]["greater_is_better"]
    assert (run_dir / "checkpoints" / "BEST").read_text().strip() == f"step_{lowest['step']:08d}"


def test_a_checkpoint_from_before_greater_is_better_resumes_loss_as_lower_is_better(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run"
    trainer = build_trainer(compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + [
        "checkpoint.enabled=false", "checkpoint.best_metric=loss"]), run_dir)
    state = trainer.state_dict()
    state["best"] = {"metric": "loss", "value": 0.5, "step": 4}  # no greater_is_better: written before the key
    trainer.load_state_dict(state)
    assert trainer.best["greater_is_better"] is False


def test_class_weights_and_label_smoothing_are_the_loss_the_run_trains_on(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run"
    trainer = build_trainer(compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + [
        "step_scheduler.max_steps=1", "step_scheduler.log_every_steps=1", "checkpoint.enabled=false",
        "loss.class_weights=[0.25,2.0]", "loss.label_smoothing=0.1"]), run_dir)
    loader = trainer.train_loader  # the first batch, without moving the sampler
    batch = loader.collate_fn([loader.dataset[i] for i in loader.batch_sampler.micro_batches(0)[0]])
    labels = batch.pop("labels")
    trainer.model.train()
    with torch.no_grad():
        logits = trainer.model(**batch).logits

    def loss(logits, labels, **kw):
        return torch.nn.functional.cross_entropy(logits, labels, reduction="sum", **kw).item() / len(labels)

    expected = loss(logits, labels, weight=torch.tensor([0.25, 2.0]), label_smoothing=0.1)
    assert abs(expected - loss(logits, labels)) > 1e-2  # the weights matter on this batch
    trainer.fit()
    assert read_rows(run_dir, "train")[0]["loss"] == pytest.approx(expected, rel=1e-5)
    trainer.model.eval()
    val_logits, val_labels = [], []
    with torch.no_grad():
        for b in trainer.val_loaders["validation"]:
            val_labels.append(b.pop("labels"))
            val_logits.append(trainer.model(**b).logits)
    # Validation reports plain cross-entropy, comparable between runs with other weights.
    expected_val = loss(torch.cat(val_logits), torch.cat(val_labels))
    assert read_rows(run_dir, "validation")[-1]["loss"] == pytest.approx(expected_val, rel=1e-5)


def test_balanced_class_weights_are_scikit_learns():
    from sklearn.utils.class_weight import compute_class_weight
    from seqcls.errors import ConfigError
    from seqcls.trainer import class_weights
    labels = [0] * 7 + [1] * 2 + [2] * 3
    assert class_weights("balanced", labels, 3) == pytest.approx(
        compute_class_weight("balanced", classes=np.arange(3), y=np.array(labels)).tolist())
    assert class_weights([1, 3], [0, 1], 2) == [1.0, 3.0] and class_weights(None, labels, 3) is None
    with pytest.raises(ConfigError, match="class 1 has no training example"):
        class_weights("balanced", [0, 0, 2], 3)


def _saved_bytes_and_weights(synthetic_dir, run_dir, extra):
    """Bytes the first batch's forward keeps for the backward (saved-tensor hooks), and the weights after 3 steps;
    with dropout (0.1) and 4 layers."""
    overrides = [o for o in synthetic_overrides(synthetic_dir, run_dir) if "dropout_prob" not in o]
    trainer = build_trainer(compose_cfg(overrides + [
        "model.config_overrides.num_hidden_layers=4", "step_scheduler.max_steps=3", "checkpoint.enabled=false"] + extra),
        run_dir)
    loader = trainer.train_loader
    batch = loader.collate_fn([loader.dataset[i] for i in loader.batch_sampler.micro_batches(0)[0]])
    saved = []
    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        trainer._forward_loss(batch)
    trainer.model.zero_grad(set_to_none=True)
    trainer.fit()
    return sum(saved), {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled_blocks"])
def test_activation_checkpointing_trains_as_without_it_and_keeps_fewer_activations(tmp_path, synthetic_dir, compiled):
    extra = ["compile.enabled=true", "compile.scope=blocks"] if compiled else []
    plain_bytes, plain = _saved_bytes_and_weights(synthetic_dir, tmp_path / "plain", extra)
    ac_bytes, ac = _saved_bytes_and_weights(synthetic_dir, tmp_path / "ac",
                                            extra + ["distributed.activation_checkpointing=true"])
    assert ac_bytes < plain_bytes / 4
    # The recompute draws the forward's dropout masks again (the RNG state restored): the same training.
    for name in plain:
        torch.testing.assert_close(ac[name], plain[name], rtol=0, atol=0, msg=name)


def test_fp16_with_loss_scaling_learns_the_task_with_the_gradients_of_fp32(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run"
    results = run(compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + [
        "precision=fp16", "step_scheduler.num_epochs=5", "step_scheduler.log_every_steps=1"]))
    assert results["final"]["accuracy"] >= 0.9
    state = json.loads((run_dir / "checkpoints" / f"step_{results['steps']:08d}" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] == 2.0 ** 16 and state["grad_scaler"]["_growth_tracker"] == results["steps"]
    # The gradients are unscaled before the norm is taken and clipped: the first step's norm is fp32's (up to fp16
    # rounding), not 2^16 times it.
    run(compose_cfg(synthetic_overrides(synthetic_dir, tmp_path / "fp32") + [
        "step_scheduler.max_steps=1", "step_scheduler.log_every_steps=1"]))
    first, = read_rows(tmp_path / "fp32", "train")
    assert read_rows(run_dir, "train")[0]["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-2)


def test_fp16_skips_a_step_whose_gradients_overflow_and_resumes_its_loss_scale(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run"
    cfg = synthetic_overrides(synthetic_dir, run_dir) + ["precision=fp16", "lr_scheduler=constant",
                                                         "step_scheduler.max_steps=2"]
    trainer = build_trainer(compose_cfg(cfg), run_dir)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    # A scale of 2^100 overflows the fp16 gradients: both steps are skipped, the scale halving each time.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100, growth_interval=3)
    trainer.fit()
    assert trainer.scaler.get_scale() == 2.0 ** 98
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # The resumed run takes the checkpoint's scaler state, not a fresh one (2^16, growth every 2000 steps).
    resumed = build_trainer(compose_cfg(cfg[:-1] + ["step_scheduler.max_steps=4"]), run_dir)
    assert resumed.step == 2 and resumed.scaler.state_dict() == trainer.scaler.state_dict()
    # At a usable scale the steps are taken.
    fresh = build_trainer(compose_cfg(cfg[:-1] + [f"run_dir={tmp_path / 'fresh'}", "step_scheduler.max_steps=1"]),
                          tmp_path / "fresh")
    fresh.fit()
    assert any(not torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items())
