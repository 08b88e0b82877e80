"""compile.pack_sequences: a batch's examples laid end to end without padding give the padded model's
logits, gradients and training."""

import copy
import json

import pytest
import torch

from seqcls.build import build_trainer
from seqcls.data import PackCollator, PadCollator
from seqcls.errors import ConfigError
from seqcls.lora import inject_lora
from seqcls.models import (first_token_last_layer, from_config, fuse_frozen_qkv, pack_sequences,
                           packed_position_offset, varlen_attention, varlen_self_attention)
from tests.conftest import compose_cfg, synthetic_overrides
from tests.test_first_token import SMALL, assert_same_logits_and_gradients


def examples(seed=0, lengths=(12, 3, 7, 12, 1, 9)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, 100, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * n, "token_type_ids": [0] * (n // 2) + [1] * (n - n // 2),
                    "labels": int(torch.randint(0, 3, (), generator=g))})
    return out


def test_pack_collator_lays_examples_end_to_end_and_fills_to_the_multiple():
    ex = [{"input_ids": [7, 8, 9], "token_type_ids": [0, 0, 1], "labels": 1},
          {"input_ids": [5, 6], "token_type_ids": [0, 1], "labels": 0}]
    b = PackCollator(pad_token_id=1, position_offset=2, pad_to_multiple_of=4)(ex)
    assert b["input_ids"].tolist() == [[7, 8, 9, 5, 6, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[2, 3, 4, 2, 3, 2, 2, 2]]
    assert b["token_type_ids"].tolist() == [[0, 0, 1, 0, 1, 0, 0, 0]]
    assert b["cu_seq_lens"].tolist() == [0, 3, 5, 8] and b["cu_seq_lens"].dtype == torch.int32
    assert b["labels"].tolist() == [1, 0]
    # Without a multiple the row still ends in one filler token (its own sequence), and the filler is
    # always there: 5 tokens fill to 8 with a multiple of 4, 7 tokens to 8 as well, 8 to 12.
    assert PackCollator(1)(ex)["cu_seq_lens"].tolist() == [0, 3, 5, 6]
    for n, total in ((7, 8), (8, 12)):
        assert PackCollator(1, pad_to_multiple_of=4)([{"input_ids": [5] * n}])["cu_seq_lens"].tolist() == [0, n, total]


def test_varlen_attention_attends_within_each_sequence_only():
    torch.manual_seed(0)
    cu = torch.tensor([0, 4, 5, 9, 11], dtype=torch.int32)
    q, k, v = (torch.randn(11, 2, 8) for _ in range(3))
    out = varlen_attention(q, k, v, cu, cu, 4, 4, dropout=0.0, scale=8 ** -0.5)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = torch.nn.functional.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)))
        torch.testing.assert_close(out[s:e], alone.transpose(0, 1))
    # Queries of a sequence can be fewer than its keys (the first-token layer): one query each, none for the last.
    cu_q = torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32)
    first = varlen_attention(q[cu[:-2].long()], k, v, cu_q, cu, 1, 4, dropout=0.0, scale=8 ** -0.5)
    torch.testing.assert_close(first, out[cu[:-2].long()])


def test_self_attention_on_one_qkv_tensor_is_attention_on_its_thirds():
    torch.manual_seed(0)
    cu = torch.tensor([0, 4, 5, 9, 11], dtype=torch.int32)
    qkv = torch.randn(11, 3 * 2 * 8, requires_grad=True)
    out = varlen_self_attention(qkv, 8, cu, 4, dropout=0.0, scale=8 ** -0.5)
    grad = torch.randn_like(out)
    out.backward(grad)
    parts = [t.detach().reshape(11, 2, 8).requires_grad_() for t in qkv.chunk(3, dim=-1)]
    ref = varlen_attention(*parts, cu, cu, 4, 4, dropout=0.0, scale=8 ** -0.5)
    ref.backward(grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(qkv.grad, torch.cat([p.grad.reshape(11, -1) for p in parts], dim=-1))


def test_the_memory_efficient_kernel_runs_only_without_attention_dropout(monkeypatch):
    """On packed sequences its forward draws one dropout mask for all heads and its backward another
    (tests/test_gpu.py, scripts/bench_attention.py --check-dropout). Where the short-sequence Triton
    kernel runs, auto takes it, with or without dropout; where it does not, auto falls back as before."""
    import seqcls.models as models
    from seqcls import short_attention
    monkeypatch.setattr(models, "flash_varlen_supported", lambda device, head_dim: True)
    query = torch.empty(16, 2, 64, dtype=torch.bfloat16, device="meta")
    monkeypatch.setattr(short_attention, "supported", lambda query, max_len, sequences: False)
    for kernel, dropout, expected in (("auto", 0.0, "efficient"), ("efficient", 0.0, "efficient"),
                                      ("flash", 0.0, "flash"), ("auto", 0.1, "flash"), ("efficient", 0.1, "flash"),
                                      ("short", 0.1, "flash")):
        assert models._varlen_kernel(query, dropout, kernel, 128) == expected, (kernel, dropout)
    assert models._varlen_kernel(query.float(), 0.0, "auto") is None  # fp32: the reference attention
    monkeypatch.setattr(short_attention, "supported", lambda query, max_len, sequences: max_len <= 256)
    for kernel, dropout, max_len, expected in (("auto", 0.1, 128, "short"), ("auto", 0.0, 128, "short"),
                                               ("short", 0.1, 256, "short"), ("auto", 0.1, 512, "flash"),
                                               ("flash", 0.1, 128, "flash"), ("efficient", 0.0, 128, "efficient")):
        assert models._varlen_kernel(query, dropout, kernel, max_len) == expected, (kernel, dropout, max_len)


def test_short_kernel_supports_half_precision_heads_and_lengths_it_compiles_for(monkeypatch):
    from seqcls import short_attention
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors count as runnable (Triton's interpreter)
    if not short_attention.available():
        pytest.fail("Triton is not installed: the test extra installs it (pip install -e .[test])")
    half = torch.empty(4, 2, 64, dtype=torch.float16)
    assert short_attention.supported(half, 256) and short_attention.supported(half.bfloat16(), 1)
    assert not short_attention.supported(half, 257)  # longer than the widest tile
    assert not short_attention.supported(half.float(), 128)  # fp32 runs the reference
    assert not short_attention.supported(torch.empty(4, 2, 48, dtype=torch.float16), 128)  # head size
    assert short_attention.supported(half, 128, sequences=131071)  # 2 heads: 262,142 Philox ranges of 8192
    assert not short_attention.supported(half, 128, sequences=131072)  # 2**31 counters: past 32 bits
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not short_attention.supported(half, 128)  # CPU tensors without the interpreter


def pair(model_type, lora, fuse):
    """A padded model (first-token last layer) and its packed copy, same weights, dropout off."""
    torch.manual_seed(0)
    model = from_config(model_type, num_labels=3, config_overrides={**SMALL, "num_hidden_layers": 3,
                                                                    "attn_implementation": "sdpa"})
    if lora:
        inject_lora(model, target_modules=["*.query", "*.value"], dim=4, alpha=8, dropout=0.0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
            p.requires_grad = "lora_" in name or "classifier" in name
    assert first_token_last_layer(model)
    packed = copy.deepcopy(model)
    if fuse:
        assert fuse_frozen_qkv(packed, merge_adapters=True) == 2
    assert pack_sequences(packed, max_length=12)
    return model, packed


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra", "xlm-roberta"])
@pytest.mark.parametrize("lora,fuse", [(False, False), (True, False), (True, True)])
def test_packed_batches_give_the_padded_logits_and_gradients(model_type, lora, fuse):
    padded_model, packed_model = pair(model_type, lora, fuse)
    ex = examples()
    padded = PadCollator(pad_token_id=1)(ex)
    packed = PackCollator(pad_token_id=1, position_offset=packed_position_offset(packed_model),
                          pad_to_multiple_of=16)(ex)
    assert packed["input_ids"].shape == (1, 48)  # 44 real tokens and 4 of filler, against 6 x 12 padded
    labels = padded.pop("labels")
    assert torch.equal(packed.pop("labels"), labels)
    if "roberta" in model_type:  # RoBERTa has one token type: its tokenizer gives none
        for b in (padded, packed):
            b.pop("token_type_ids")

    assert_same_logits_and_gradients(packed_model, padded_model, padded, labels, fast_inputs=packed, atol=1e-5)
    # and padded batches (evaluation, prediction) still run padded through the packed model
    with torch.no_grad():
        torch.testing.assert_close(packed_model(**padded).logits, padded_model(**padded).logits, rtol=1e-5, atol=1e-5)


def test_models_without_the_first_token_layer_are_not_packed():
    model = from_config("bert", num_labels=2, config_overrides={**SMALL, "attn_implementation": "sdpa"})
    assert not pack_sequences(model, max_length=12)
    assert not any("forward" in vars(layer.attention.self) for layer in model.bert.encoder.layer)


def train_losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_roberta"])
def test_training_on_packed_sequences_follows_the_padded_run(tmp_path, synthetic_dir, model):
    """The same batches (no length grouping in either run), dropout off: the packed run's loss curve is the
    padded run's, and its training batches really were packed."""
    runs = {}
    for pack in ("true", "false"):
        run_dir = tmp_path / pack
        cfg = compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + [
            f"model={model}", f"compile.pack_sequences={pack}", "dataloader.group_by_length=false",
            "step_scheduler.max_steps=12"])
        trainer = build_trainer(cfg, run_dir)
        first = next(iter(trainer.train_loader))
        assert ("cu_seq_lens" in first) == (pack == "true")
        if pack == "true":
            assert first["input_ids"].shape[0] == 1 and first["input_ids"].shape[1] % 64 == 0
        trainer.fit()
        runs[pack] = train_losses(run_dir)
    assert len(runs["true"]) == 3
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-4)


def test_packing_is_off_on_cpu_by_default_and_length_grouping_follows_it(tmp_path, synthetic_dir):
    trainer = build_trainer(compose_cfg(synthetic_overrides(synthetic_dir, tmp_path)), tmp_path)
    assert "cu_seq_lens" not in next(iter(trainer.train_loader))
    assert trainer.train_loader.batch_sampler.group_by_length
    packed = build_trainer(compose_cfg(synthetic_overrides(synthetic_dir, tmp_path / "p") + [
        "compile.pack_sequences=true"]), tmp_path / "p")
    assert not packed.train_loader.batch_sampler.group_by_length


def test_packing_a_model_that_cannot_be_packed_is_one_clear_error(tmp_path, synthetic_dir):
    cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path) + [
        "compile.pack_sequences=true", "model.first_token_last_layer=false"])
    with pytest.raises(Exception, match="compile.pack_sequences=true needs a BERT-family encoder"):
        build_trainer(cfg, tmp_path)


def test_asking_for_the_efficient_kernel_with_attention_dropout_is_one_clear_error(tmp_path, synthetic_dir):
    base = synthetic_overrides(synthetic_dir, tmp_path) + ["compile.pack_sequences=true", "compile.varlen_kernel=efficient"]
    with pytest.raises(ConfigError, match="compile.varlen_kernel=efficient needs a model without attention dropout"):
        build_trainer(compose_cfg(base + ["model.config_overrides.attention_probs_dropout_prob=0.1"]), tmp_path)
    trainer = build_trainer(compose_cfg(base), tmp_path)  # the tests' tiny model has no attention dropout
    assert all(layer.attention.self.varlen_kernel == "efficient" for layer in trainer.model.base_model.encoder.layer)


def test_flash_kernels_are_used_only_where_they_run(monkeypatch):
    from seqcls.models import flash_varlen_supported
    cuda = torch.device("cuda")
    assert not flash_varlen_supported(torch.device("cpu"), 64)
    for capability, head_dim, expected in (((9, 0), 64, True), ((8, 0), 128, True), ((7, 5), 64, False),
                                           ((9, 0), 60, False), ((9, 0), 512, False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert flash_varlen_supported(cuda, head_dim) == expected, (capability, head_dim)
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm builds: not these kernels
    assert not flash_varlen_supported(cuda, 64)


@pytest.mark.parametrize("overrides,packed", [([], True), (["model.attn_implementation=eager"], False),
                                              (["model.first_token_last_layer=false"], False),
                                              (["precision=fp32"], False), (["dataloader.collate_fn._target_=x.Y"], False)])
def test_packing_by_default_needs_a_flash_gpu_autocast_sdpa_and_the_first_token_layer(monkeypatch, overrides, packed):
    """The null setting's decision, on a stand-in Hopper GPU (the model itself stays on the CPU)."""
    from seqcls.build import autocast_dtype, build_model, use_packing
    from seqcls.models import load_tokenizer
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cfg = compose_cfg(["model=tiny_roberta", "device=cuda"] + overrides)
    cuda = torch.device("cuda")
    model = build_model(cfg, load_tokenizer(cfg.model.tokenizer_name_or_path))
    offset = use_packing(cfg, cuda, autocast_dtype(cfg.precision, cuda), model)
    assert (offset is not None) == packed
    if packed:  # RoBERTa counts positions from padding_idx + 1
        assert offset == model.config.pad_token_id + 1
        assert all("forward" in vars(layer.attention.self) for layer in model.roberta.encoder.layer[:-1])


def test_asking_for_the_short_kernel_where_it_cannot_run_is_one_clear_error(tmp_path, synthetic_dir, monkeypatch):
    from seqcls import short_attention
    base = synthetic_overrides(synthetic_dir, tmp_path) + ["compile.pack_sequences=true", "compile.varlen_kernel=short"]
    with pytest.raises(ConfigError, match="takes sequences of up to 256 tokens, and dataset.max_length is 300"):
        build_trainer(compose_cfg(base + ["dataset.max_length=300"]), tmp_path)
    with pytest.raises(ConfigError, match=r"dataset.max_length is 64 \(compile.pack_bucket 512\)"):
        build_trainer(compose_cfg(base + ["dataset.max_length=64", "compile.pack_bucket=512"]), tmp_path)
    monkeypatch.setattr(short_attention, "available", lambda: False)
    with pytest.raises(ConfigError, match="compile.varlen_kernel=short needs Triton, which is not installed"):
        build_trainer(compose_cfg(base), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_packed_length_bound_covers_the_filler_when_pack_bucket_is_longer_than_the_examples(tmp_path, synthetic_dir):
    """The GPU kernels compute sequences up to this bound only (FlashAttention's query blocks, the Triton
    kernel's tiles): a filler longer than it would be left uncomputed."""
    base = synthetic_overrides(synthetic_dir, tmp_path) + ["compile.pack_sequences=true", "dataset.max_length=32"]
    for bucket, bound in ((16, 32), (64, 64)):
        trainer = build_trainer(compose_cfg(base + [f"compile.pack_bucket={bucket}"]), tmp_path / str(bucket))
        layers = trainer.model.base_model.encoder.layer
        assert {layer.attention.self.packed_max_length for layer in layers} == {bound}
        batch = next(iter(trainer.train_loader))
        assert (batch["cu_seq_lens"].diff() <= bound).all()
