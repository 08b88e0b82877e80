"""Unit tests for seqcls.lora, checked against the real peft library on 2-layer models with tiny dims."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from seqcls.lora import (
    LoRALinear,
    from_peft_state_dict,
    inject_lora,
    lora_linear,
    load_peft_adapter,
    mark_trainable,
    merge_lora_weights,
    save_peft_adapter,
    to_peft_state_dict,
)

DIM, ALPHA, DROPOUT = 4, 8.0, 0.1
TARGETS = ("*.query", "*.value")
HEAD = ("classifier", "score")
# initializer_range 0.2 (not 0.02) keeps logits O(1), so a changed adapter moves them far beyond atol.
TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            initializer_range=0.2)


def tiny_bert(num_labels: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**TINY, num_labels=num_labels)).eval()


def tiny_roberta(num_labels: int = 2, seed: int = 0):
    # Its head is a module, classifier.dense + classifier.out_proj, rather than one Linear.
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(RobertaConfig(**TINY, num_labels=num_labels)).eval()


MODELS = {"bert": tiny_bert, "roberta": tiny_roberta}


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 128, (4, 10), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # one padded row, so masking is exercised too
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 1, 1, 0])}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def peft_lora(base, dropout: float = 0.0):
    config = LoraConfig(task_type="SEQ_CLS", r=DIM, lora_alpha=ALPHA, lora_dropout=dropout,
                        target_modules=["query", "value"])
    return get_peft_model(base, config)


def peft_lora_names(peft_model) -> list[str]:
    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))


def save(state_dict, out_dir, target_modules, dropout: float = DROPOUT) -> None:
    save_peft_adapter(state_dict, out_dir, base_model_name_or_path=None, dim=DIM, alpha=ALPHA, dropout=dropout,
                      target_modules=target_modules, modules_to_save=HEAD)


def injected(build, num_labels: int = 2, dropout: float = DROPOUT):
    model = build(num_labels)
    names = inject_lora(model, target_modules=TARGETS, dim=DIM, alpha=ALPHA, dropout=dropout)
    mark_trainable(model, HEAD)
    return model, names


def train_a_few_steps(model, steps: int = 3) -> None:
    # Enough for A, B and the head to move away from their initial values.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        model(**batch(seed=10 + step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("num_labels", [2, 3])
@pytest.mark.parametrize("arch", MODELS)
def test_forward_equals_peft_forward_given_same_adapter_weights(arch, num_labels):
    base = MODELS[arch](num_labels)
    ours = copy.deepcopy(base)
    names = inject_lora(ours, target_modules=TARGETS, dim=DIM, alpha=ALPHA, dropout=0.0)
    theirs = peft_lora(copy.deepcopy(base)).eval()
    assert peft_lora_names(theirs) == names
    torch.manual_seed(2)
    for name in names:
        layer, peft_layer = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)  # B = 0 would make the comparison vacuous
        peft_layer.lora_A["default"].weight.data.copy_(layer.lora_A.weight)
        peft_layer.lora_B["default"].weight.data.copy_(layer.lora_B.weight)
    inputs = batch()
    assert not torch.allclose(logits(ours, inputs), logits(base, inputs), atol=1e-3)
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=0)


def _lora_linear_inputs(bias: bool, dtype=torch.float32):
    torch.manual_seed(0)
    x, weight, u, lora_b = (torch.randn(*shape, dtype=dtype) for shape in ((10, 12), (7, 12), (10, 3), (7, 3)))
    return x, weight, torch.randn(7, dtype=dtype) if bias else None, u, lora_b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("trainable", ["lora", "all"])
@pytest.mark.parametrize("compiled", [False, True])
def test_lora_linear_is_base_plus_term_with_the_same_gradients(bias, trainable, compiled):
    """One multiply of [x | u] by [W | B] with its own backward: the value and every gradient asked for of
    x W^T + b + u B^T; the frozen W and b get none."""
    inputs = _lora_linear_inputs(bias)
    x, weight, b, u, lora_b = inputs
    for t in (x, u, lora_b) + ((weight, b) if trainable == "all" else ()):
        if t is not None:
            t.requires_grad_(True)
    fn = torch.compile(lora_linear, backend="aot_eager", fullgraph=True) if compiled else lora_linear
    out = fn(x, weight, b, u, lora_b)
    want = torch.nn.functional.linear(x, weight, b) + u @ lora_b.t()
    torch.testing.assert_close(out, want)
    w = torch.randn_like(want)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got, ref = torch.autograd.grad((out * w).sum(), wanted), torch.autograd.grad((want * w).sum(), wanted)
    for g, r in zip(got, ref):
        assert r.abs().sum() > 0
        torch.testing.assert_close(g, r)
    if trainable == "lora":
        assert weight.grad is None and (b is None or b.grad is None)


def test_lora_linear_computes_in_autocast_dtype_as_f_linear():
    x, weight, b, u, lora_b = _lora_linear_inputs(True)
    lora_b.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, weight, b, u, lora_b)
        base = torch.nn.functional.linear(x, weight, b)
    assert out.dtype == base.dtype == torch.bfloat16
    # one bf16 rounding of the sum; bf16 inputs move it by ~1e-2 here, a missing term by ~1
    torch.testing.assert_close(out.float(), (x @ weight.t() + b + u @ lora_b.t()), rtol=0, atol=0.1)
    out.float().sum().backward()
    assert lora_b.grad.dtype == torch.float32 and lora_b.grad.abs().sum() > 0


def test_lora_init_is_peft_init_a_kaiming_b_zero():
    peft_layer = peft_lora(tiny_bert()).base_model.model.bert.encoder.layer[0].attention.self.query
    layer = LoRALinear.from_linear(torch.nn.Linear(32, 32), dim=DIM, alpha=ALPHA, dropout=0.0)
    torch.manual_seed(5)
    layer.lora_B.weight.data.fill_(1.0)
    layer.reset_lora_parameters()
    torch.manual_seed(5)
    peft_layer.reset_lora_parameters("default", init_lora_weights=True)
    torch.testing.assert_close(layer.lora_A.weight, peft_layer.lora_A["default"].weight, atol=0, rtol=0)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.scale == ALPHA / DIM


def test_lora_dropout_applies_to_adapter_input_only():
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(torch.nn.Linear(16, 8), dim=DIM, alpha=ALPHA, dropout=0.5).train()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = torch.nn.functional.dropout(x, p=0.5, training=True)
    adapter = dropped @ layer.lora_A.weight.T @ layer.lora_B.weight.T * layer.scale
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias) + adapter
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("arch,num_labels", [("bert", 3), ("roberta", 2)])
def test_trained_adapter_saved_by_us_loads_in_peft_with_same_logits(arch, num_labels, tmp_path):
    base = MODELS[arch](num_labels)
    ours = copy.deepcopy(base)
    names = inject_lora(ours, target_modules=TARGETS, dim=DIM, alpha=ALPHA, dropout=DROPOUT)
    mark_trainable(ours, HEAD)
    train_a_few_steps(ours)
    assert not torch.equal(next(ours.classifier.parameters()), next(base.classifier.parameters()))  # the head trained
    # The globs, as the checkpointer passes them; the config gets the concrete names.
    save(ours.state_dict(), tmp_path, TARGETS)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"]) == ("LORA", "SEQ_CLS", DIM)
    assert (config["lora_alpha"], config["lora_dropout"], config["modules_to_save"]) == (ALPHA, DROPOUT, list(HEAD))
    assert config["target_modules"] == names
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert peft_lora_names(theirs) == names  # peft re-targets exactly the same modules
    inputs = batch()
    torch.testing.assert_close(logits(theirs, inputs), logits(ours, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", MODELS)
def test_gradients_reach_only_lora_and_head_and_counts_match_peft(arch):
    model, names = injected(MODELS[arch])
    trainable, total = mark_trainable(model, HEAD)
    model.train()
    model(**batch()).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    lora_keys = {f"{n}.{ab}.weight" for n in names for ab in ("lora_A", "lora_B")}
    head_keys = {f"classifier.{k}" for k in model.classifier.state_dict()}
    assert with_grad == lora_keys | head_keys

    lora_numel = len(names) * DIM * (32 + 32)
    head_numel = sum(p.numel() for p in model.classifier.parameters())
    assert trainable == lora_numel + head_numel
    assert total == sum(p.numel() for p in MODELS[arch]().parameters()) + lora_numel
    assert trainable == peft_lora(MODELS[arch]()).get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("arch", MODELS)
def test_merged_state_dict_loads_strict_into_plain_model_with_same_outputs(arch):
    model, _ = injected(MODELS[arch])
    train_a_few_steps(model)
    state_dict = model.state_dict()
    before = {k: v.clone() for k, v in state_dict.items()}
    merged = merge_lora_weights(state_dict, scale=ALPHA / DIM)
    assert state_dict.keys() == before.keys() and all(torch.equal(state_dict[k], before[k]) for k in before)

    plain = MODELS[arch](seed=123)
    plain.load_state_dict(merged, strict=True)
    inputs = batch()
    assert not torch.allclose(logits(MODELS[arch](), inputs), logits(model, inputs), atol=1e-3)
    torch.testing.assert_close(logits(plain, inputs), logits(model, inputs), atol=1e-5, rtol=0)


def test_unmatched_glob_error_is_one_line_naming_glob_and_existing_linear_modules():
    with pytest.raises(ValueError) as error:
        inject_lora(tiny_bert(), target_modules=["*.query", "query"], dim=DIM, alpha=ALPHA, dropout=0.0)
    message = str(error.value)
    assert "\n" not in message
    assert "'query'" in message and "'*.query'" in message  # the glob, and the fix
    listed = message.split("modules here: ")[1].split(". Fix")[0].split(", ")
    assert 3 <= len(listed) <= 8
    assert "bert.encoder.layer.0.attention.self.query" in listed
    assert all(n in dict(tiny_bert().named_modules()) and not n.startswith("classifier") for n in listed)


def test_glob_matching_non_linear_module_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"'\*\.attention'.*BertAttention"):
        inject_lora(tiny_bert(), target_modules=["*.attention"], dim=DIM, alpha=ALPHA, dropout=0.0)


def test_exclude_unmatched_and_double_injection_are_errors():
    with pytest.raises(ValueError, match="exclude_modules glob '\\*.nothing'"):
        inject_lora(tiny_bert(), target_modules=TARGETS, exclude_modules=["*.nothing"], dim=DIM, alpha=ALPHA,
                    dropout=0.0)
    model = tiny_bert()
    inject_lora(model, target_modules=TARGETS, dim=DIM, alpha=ALPHA, dropout=0.0)
    with pytest.raises(ValueError, match="already holds LoRALinear"):
        inject_lora(model, target_modules=["*.key"], dim=DIM, alpha=ALPHA, dropout=0.0)


def test_exclude_modules_and_match_all_linear_select_expected_modules_never_the_head():
    layer = "bert.encoder.layer.{}."
    per_layer = ["attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value",
                 "intermediate.dense", "output.dense"]
    every_linear = sorted([layer.format(i) + n for i in (0, 1) for n in per_layer] + ["bert.pooler.dense"])
    kwargs = dict(dim=DIM, alpha=ALPHA, dropout=0.0)
    assert inject_lora(tiny_bert(), target_modules=None, match_all_linear=True, **kwargs) == every_linear
    got = inject_lora(tiny_bert(), target_modules=(), match_all_linear=True,
                      exclude_modules=["*.pooler.*", "*.layer.0.*"], **kwargs)
    assert got == [layer.format(1) + n for n in per_layer]
    got = inject_lora(tiny_bert(), target_modules=TARGETS, exclude_modules=["*.layer.1"], **kwargs)  # a whole block
    assert got == [layer.format(0) + "attention.self.query", layer.format(0) + "attention.self.value"]
    assert inject_lora(tiny_bert(), target_modules=TARGETS, match_all_linear=True, **kwargs) == every_linear
    with pytest.raises(ValueError, match="'\\*.qurey'"):  # a typo fails even when match_all_linear covers it
        inject_lora(tiny_bert(), target_modules=["*.qurey"], match_all_linear=True, **kwargs)

    roberta_all = inject_lora(tiny_roberta(), target_modules=None, match_all_linear=True, **kwargs)
    assert len(roberta_all) == 12 and not any("classifier" in n for n in roberta_all)
    roberta_dense = inject_lora(tiny_roberta(), target_modules=["*.dense"], **kwargs)  # also matches classifier.dense
    assert len(roberta_dense) == 6 and not any("classifier" in n for n in roberta_dense)


@pytest.mark.parametrize("arch", MODELS)
def test_load_peft_adapter_resumes_with_identical_outputs(arch, tmp_path):
    model, names = injected(MODELS[arch], num_labels=3)
    train_a_few_steps(model)
    save(model.state_dict(), tmp_path, names)

    resumed, _ = injected(MODELS[arch], num_labels=3)
    inputs = batch()
    assert not torch.allclose(logits(resumed, inputs), logits(model, inputs), atol=1e-3)
    load_peft_adapter(resumed, tmp_path)
    torch.testing.assert_close(logits(resumed, inputs), logits(model, inputs), atol=0, rtol=0)

    other = MODELS[arch](3)
    inject_lora(other, target_modules=["*.query"], dim=DIM, alpha=ALPHA, dropout=DROPOUT)
    one_line_error = r"^load_peft_adapter: .* 0 missing keys .* 4 unexpected keys .*value\.lora_A[^\n]*$"
    with pytest.raises(ValueError, match=one_line_error):
        load_peft_adapter(other, tmp_path)


def test_load_peft_adapter_reads_an_adapter_saved_by_peft(tmp_path):
    theirs = peft_lora(tiny_bert(3), dropout=DROPOUT)
    train_a_few_steps(theirs)
    theirs.save_pretrained(tmp_path)
    ours, _ = injected(tiny_bert, num_labels=3)
    load_peft_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours, batch()), logits(theirs, batch()), atol=1e-5, rtol=0)


def test_peft_key_conversion_round_trips_and_keeps_the_head(tmp_path):
    model, _ = injected(tiny_roberta)
    state_dict = model.state_dict()
    peft_sd = to_peft_state_dict(state_dict, modules_to_save=HEAD)
    assert "base_model.model.roberta.encoder.layer.1.attention.self.value.lora_B.weight" in peft_sd
    head = ("dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias")
    assert {k for k in peft_sd if "classifier" in k} == {f"base_model.model.classifier.{k}" for k in head}
    assert not any(k.endswith("query.weight") for k in peft_sd)  # base weights stay out of the adapter
    assert from_peft_state_dict(peft_sd) == {k.removeprefix("base_model.model."): v for k, v in peft_sd.items()}
    with pytest.raises(ValueError, match="trained head would be lost"):
        to_peft_state_dict(state_dict, modules_to_save=["head"])
    with pytest.raises(ValueError, match=r"target_modules \['\*\.key'\] match no LoRA module"):
        save(state_dict, tmp_path, ["*.key"])


@pytest.mark.parametrize("arch", MODELS)
def test_base_checkpoint_loads_into_injected_model_with_only_lora_keys_missing(arch):
    plain = MODELS[arch](seed=0)
    model = MODELS[arch](seed=1)
    names = inject_lora(model, target_modules=TARGETS, dim=DIM, alpha=ALPHA, dropout=DROPOUT)
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(f"{n}.{ab}.weight" for n in names for ab in ("lora_A", "lora_B"))
    torch.testing.assert_close(logits(model.eval(), batch()), logits(plain, batch()), atol=0, rtol=0)  # B = 0


def test_meta_device_injection_then_materialise_and_reset_gives_peft_init():
    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig(**TINY, num_labels=2))
    names = inject_lora(model, target_modules=TARGETS, dim=DIM, alpha=ALPHA, dropout=0.0)
    assert model.get_submodule(names[0]).lora_A.weight.is_meta
    model.to_empty(device="cpu")
    for name in names:
        layer = model.get_submodule(name)
        layer.lora_B.weight.data.fill_(float("nan"))  # what to_empty may leave behind
        layer.reset_lora_parameters()
        bound = 1 / 32**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 32
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        assert 0.5 * bound < layer.lora_A.weight.abs().max() <= bound


def test_lora_model_trains_and_checkpoints_under_fsdp2_fully_shard(tmp_path):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    reference, names = injected(tiny_bert, dropout=0.0)
    with torch.no_grad():
        for name in names:
            reference.get_submodule(name).lora_B.weight.normal_()
    model = copy.deepcopy(reference)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for block in model.bert.encoder.layer:
            fully_shard(block)
        fully_shard(model)
        assert isinstance(model.get_submodule(names[0]).lora_A.weight, DTensor)
        inputs = batch()
        torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), atol=1e-6, rtol=0)
        model(**inputs).loss.backward()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        save(full, tmp_path / "adapter", names, dropout=0.0)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.zero_()
        load_peft_adapter(model, tmp_path / "adapter")
        torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), atol=1e-6, rtol=0)
    finally:
        dist.destroy_process_group()
