"""model.fuse_frozen_qkv: query, key and value from one matrix multiply where their weights are frozen,
with the same outputs, gradients, parameters and state dict as three."""

import copy
import json

import pytest
import torch

from seqcls.build import build_trainer
from seqcls.lora import LoRALinear, inject_lora
from seqcls.models import bf16_read_parameters, first_token_last_layer, from_config, fuse_frozen_qkv, merged_lora_linear
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
@pytest.mark.parametrize("merge", [False, True])
def test_same_logits_gradients_and_state_dict_as_three_projections(model_type, attn, lora, first_token, merge):
    plain = frozen_base(model_type, attn, lora)
    if first_token:
        assert first_token_last_layer(plain)
    fused = copy.deepcopy(plain)
    assert fuse_frozen_qkv(fused, merge_adapters=merge) == (2 if first_token else 3)  # the first-token last layer keeps its own
    before = plain.state_dict()
    after = fused.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    attn0 = getattr(fused, fused.base_model_prefix).encoder.layer[0].attention.self
    weight = attn0.fused_qkv[0]
    rows = attn0.query.weight.numel() * weight.element_size()  # the parameters are views of the fused rows
    assert [m.weight.data_ptr() - weight.data_ptr() for m in (attn0.query, attn0.key, attn0.value)] == [0, rows, 2 * rows]
    assert attn0.fused_qkv[3] == (merge and lora)  # two adapters (query, value) to merge, or none

    inputs, labels = batch()
    assert_same_logits_and_gradients(fused, plain, inputs, labels)


def merged_block(dropout, targets=("query", "value")):
    """A BERT self-attention block with fused, merged LoRA adapters (B non-zero), and a batch of rows."""
    model = small_model("bert", "sdpa", False, num_hidden_layers=1)
    inject_lora(model, target_modules=[f"*.{t}" for t in targets], dim=4, alpha=8, dropout=dropout)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert fuse_frozen_qkv(model, merge_adapters=True) == 1
    attn = model.bert.encoder.layer[0].attention.self
    return attn, torch.randn(20, 32)


def merged_terms(rows, adapters):
    """The three LoRA terms (query, key, value) that merged_lora_linear adds onto a zero projection."""
    out = next(a for a in adapters if a is not None).out_features
    return merged_lora_linear(rows, torch.zeros(3 * out, rows.shape[1]), None, adapters).split(out, dim=-1)


def test_merged_adapters_share_one_dropout_mask_and_give_each_its_own_term():
    attn, rows = merged_block(dropout=0.5)
    attn.train()
    _, _, adapters, merged = attn.fused_qkv
    assert merged
    query, value = attn.query, attn.value
    torch.manual_seed(1)
    terms = merged_terms(rows, adapters)
    assert torch.equal(terms[1], torch.zeros_like(terms[1]))  # key has no adapter
    torch.manual_seed(1)
    dropped = query.lora_dropout(rows)  # the one mask the merged path draws
    assert 0 < (dropped == 0).float().mean() < 1
    for term, adapter in ((terms[0], query), (terms[2], value)):
        expected = adapter.lora_B(adapter.lora_A(dropped) * adapter.scale)
        assert expected.abs().sum() > 0
        torch.testing.assert_close(term, expected, rtol=1e-5, atol=1e-6)
    # Each adapter alone draws its own masks: the value term then differs from the merged one.
    torch.manual_seed(1)
    query.lora_delta(rows)
    alone_value = value.lora_delta(rows)
    assert not torch.allclose(alone_value, terms[2])


@pytest.mark.parametrize("targets", [("query", "key", "value"), ("query", "value"), ("key", "value")])
def test_merged_adapters_gradients_equal_separate_adapters_without_dropout(targets):
    """B's gradient is computed in its nonzero blocks alone (lora._lora_b_grad); each adapter's equals its
    own, also where a projection between or before them has none."""
    attn, rows = merged_block(dropout=0.0, targets=targets)
    _, _, adapters, merged = attn.fused_qkv
    assert merged
    rows.requires_grad_(True)
    present = [a for a in adapters if a is not None]
    params = [p for a in present for p in (a.lora_A.weight, a.lora_B.weight)]
    weights = torch.randn(3, 20, 32)
    got = torch.autograd.grad(sum((t * w).sum() for t, w in zip(merged_terms(rows, adapters), weights)),
                              params + [rows])
    want = torch.autograd.grad(sum((a.lora_delta(rows) * w).sum() for a, w in zip(adapters, weights) if a is not None),
                               params + [rows])
    for g, w in zip(got, want):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bf16_adapters", [False, True])
def test_merged_adapters_under_bf16_autocast_match_unmerged(bf16_adapters):
    """The training setup on GPU: bf16 autocast, frozen weights in bf16, adapters in bf16 (master weights)
    or fp32; the block-wise B matrix then mixes the dtypes of its zero blocks and the adapters."""
    plain = frozen_base("roberta", "sdpa", True)
    for p in bf16_read_parameters(plain):
        if bf16_adapters or not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    merged, unmerged = copy.deepcopy(plain), copy.deepcopy(plain)
    assert fuse_frozen_qkv(merged, merge_adapters=True) == fuse_frozen_qkv(unmerged) == 3
    inputs, labels = batch()
    hidden = []
    for model in (merged, unmerged):
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden.append(getattr(model, model.base_model_prefix)(**inputs).last_hidden_state.float())
            torch.nn.functional.cross_entropy(model(**inputs).logits.float(), labels).backward()
    # bf16 rounding moves the hidden states by ~5e-4 here; a LoRA term off by its scale moves them by ~4e-2.
    torch.testing.assert_close(hidden[0], hidden[1], rtol=0, atol=5e-3)
    grads = {n: p.grad for n, p in unmerged.named_parameters() if p.grad is not None}
    for name, p in merged.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.dtype == p.dtype, name
            want = grads[name].float()
            assert want.norm() > 0 and (p.grad.float() - want).norm() / want.norm() < 0.05, name


def test_adapters_of_different_rank_are_not_merged():
    model = small_model("bert", "sdpa", False, num_hidden_layers=1)
    inject_lora(model, target_modules=["*.query"], dim=4, alpha=8, dropout=0.1)
    attn = model.bert.encoder.layer[0].attention.self
    attn.value = LoRALinear.from_linear(attn.value, dim=2, alpha=8, dropout=0.1)  # rank 2 beside query's 4
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    assert fuse_frozen_qkv(model, merge_adapters=True) == 1
    assert attn.fused_qkv[3] is False


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

    fused, fused_losses = run("fused", ["model.fuse_frozen_qkv=true", "peft.merge_qkv=false"])
    plain, plain_losses = run("plain", ["model.fuse_frozen_qkv=false"])
    merged, merged_losses = run("merged", [])  # the default: fused and merged
    assert merged.model.bert.encoder.layer[0].attention.self.fused_qkv[3]
    assert not fused.model.bert.encoder.layer[0].attention.self.fused_qkv[3]
    # One mask for the three adapters instead of three: other draws, the same kind of training.
    assert len(merged_losses) == 6 and merged_losses != pytest.approx(plain_losses, rel=1e-4)
    assert merged_losses == pytest.approx(plain_losses, rel=0.05)
    assert merged.model.state_dict().keys() == plain.model.state_dict().keys()
    assert "fused_qkv" in vars(fused.model.bert.encoder.layer[0].attention.self)
    assert "fused_qkv" not in vars(plain.model.bert.encoder.layer[0].attention.self)
    assert len(fused_losses) == 6 and fused_losses == pytest.approx(plain_losses, rel=1e-4)
    a, b = fused.model.state_dict(), plain.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # adapters trained alike; the frozen base is untouched in both
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=k)
