"""model.first_token_last_layer: the last layer computed for the first token only gives the same logits
and the same gradients as the whole layer."""

import copy

import pytest
import torch

from seqcls.lora import inject_lora
from seqcls.models import first_token_last_layer, from_config

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, vocab_size=100, pad_token_id=1,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (6, 12), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate([12, 3, 7, 12, 1, 9]):  # padding of every amount, none included
        mask[row, length:] = 0
        ids[row, length:] = 1
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (6,), generator=g)


def small_model(model_type, attn, lora, **overrides):
    """A seeded SMALL model with the given attention kernel, and LoRA on query/value if asked."""
    torch.manual_seed(0)
    model = from_config(model_type, num_labels=3, config_overrides={**SMALL, **overrides, "attn_implementation": attn})
    assert model.config._attn_implementation == attn
    if lora:
        inject_lora(model, target_modules=["*.query", "*.value"], dim=4, alpha=8, dropout=0.0)
        for name, p in model.named_parameters():  # B starts at zero: give it values so A's gradient is not 0
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True])
def test_same_logits_and_gradients_as_the_whole_layer(model_type, attn, lora):
    whole = small_model(model_type, attn, lora)
    fast = copy.deepcopy(whole)
    assert first_token_last_layer(fast)
    inputs, labels = batch()
    base = getattr(fast, fast.base_model_prefix)
    assert base(**inputs).last_hidden_state.shape[1] == 1  # the fast layer ran

    assert_same_logits_and_gradients(fast, whole, inputs, labels)


def assert_same_logits_and_gradients(fast, reference, inputs, labels, *, fast_inputs=None, atol=1e-6):
    """Eval logits to ``atol``, then one backward each: the same parameters get gradients, of equal values.
    ``fast_inputs``: what the fast model reads instead of ``inputs`` (the same batch in another layout)."""
    fast_inputs = inputs if fast_inputs is None else fast_inputs
    reference.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(**fast_inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=atol)
    reference.train(), fast.train()
    for m, b in ((reference, inputs), (fast, fast_inputs)):
        torch.nn.functional.cross_entropy(m(**b).logits, labels).backward()
    grads = {n: p.grad for n, p in fast.named_parameters() if p.grad is not None}
    assert grads.keys() == {n for n, p in reference.named_parameters() if p.grad is not None} != set()
    for name, p in reference.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=atol, msg=name)


def test_dropout_in_the_fast_layer_follows_train_and_eval_mode():
    torch.manual_seed(0)
    model = from_config("bert", num_labels=2, config_overrides={**SMALL, "attention_probs_dropout_prob": 0.5})
    assert first_token_last_layer(model)
    inputs, _ = batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, model(**inputs).logits)


def test_models_whose_head_reads_other_tokens_are_left_alone():
    model = from_config("gpt2", num_labels=2, config_overrides=dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                                                    pad_token_id=0))
    forward = model.transformer.h[-1].forward
    assert not first_token_last_layer(model)
    assert model.transformer.h[-1].forward == forward
