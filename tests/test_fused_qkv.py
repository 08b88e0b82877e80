"""model.fuse_frozen_qkv: query, key and value from one matrix multiply where their weights are frozen,
with the same outputs, gradients, parameters and state dict as three."""

import copy
import json

import pytest
import torch

from seqcls.build import build_trainer
from seqcls.models import first_token_last_layer, from_config, fuse_frozen_qkv
from tests.conftest import compose_cfg, synthetic_overrides
from tests.test_first_token import SMALL, assert_same_logits_and_gradients, batch, small_model


def frozen_base(model_type, attn, lora):
    model = small_model(model_type, attn, lora, num_hidden_layers=3)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or "classifier" in name
    return model


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("first_token", [False, True])
def test_same_logits_gradients_and_state_dict_as_three_projections(model_type, attn, lora, first_token):
    plain = frozen_base(model_type, attn, lora)
    if first_token:
        assert first_token_last_layer(plain)
    fused = copy.deepcopy(plain)
    assert fuse_frozen_qkv(fused) == (2 if first_token else 3)  # the first-token last layer keeps its own
    before = plain.state_dict()
    after = fused.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    attn0 = getattr(fused, fused.base_model_prefix).encoder.layer[0].attention.self
    weight = attn0.fused_qkv[0]
    rows = attn0.query.weight.numel() * weight.element_size()  # the parameters are views of the fused rows
    assert [m.weight.data_ptr() - weight.data_ptr() for m in (attn0.query, attn0.key, attn0.value)] == [0, rows, 2 * rows]

    inputs, labels = batch()
    assert_same_logits_and_gradients(fused, plain, inputs, labels)


def test_trainable_projections_are_left_alone():
    torch.manual_seed(0)
    model = from_config("bert", num_labels=2, config_overrides=SMALL)  # full fine-tune: nothing frozen
    assert fuse_frozen_qkv(model) == 0
    assert "forward" not in vars(model.bert.encoder.layer[0].attention.self)


def test_a_lora_run_with_fused_projections_trains_and_saves_as_without(tmp_path, synthetic_dir):
    def run(name, extra):
        cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path / name) + [
            "peft=lora", "peft.target_modules=[*.query,*.key,*.value]", "optimizer.lr=5e-3", "step_scheduler.max_steps=6",
            "step_scheduler.log_every_steps=1", "model.config_overrides.hidden_dropout_prob=0.1"] + extra)
        trainer = build_trainer(cfg, tmp_path / name)
        trainer.fit()
        rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return trainer, [r["loss"] for r in rows if r["split"] == "train"]

    fused, fused_losses = run("fused", ["model.fuse_frozen_qkv=true"])
    plain, plain_losses = run("plain", [])
    assert "fused_qkv" in vars(fused.model.bert.encoder.layer[0].attention.self)
    assert "fused_qkv" not in vars(plain.model.bert.encoder.layer[0].attention.self)
    assert len(fused_losses) == 6 and fused_losses == pytest.approx(plain_losses, rel=1e-4)
    a, b = fused.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # adapters trained alike; the frozen base is untouched in both
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=k)
