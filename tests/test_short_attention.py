"""seqcls.attention: the short-sequence Triton kernel computes sdpa's attention, forward and backward, with
the same dropout mask in both. On a machine without a GPU the kernels run in Triton's CPU interpreter
(conftest sets TRITON_INTERPRET=1)."""

import pytest
import torch
import torch.nn.functional as F

from seqcls.attention import MAX_LEN, short_attention, short_attention_fwd
from tests.conftest import compose_cfg, synthetic_overrides

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def hf_layout(b, h, length, d, seed):
    """q, k, v as HF hands them over: (batch, heads, length, dim) views of (batch, length, heads * dim)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, length, h * d, generator=g).to(DEVICE).view(b, length, h, d).transpose(1, 2)
            .requires_grad_() for _ in range(3)]


def padding_mask(b, length, lengths):
    """sdpa's boolean mask for padded sequences: (batch, 1, query, key), True where a key is real."""
    real = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    return real[:, None, None, :].expand(b, 1, length, length).to(DEVICE)


class Layer(torch.nn.Module):
    pass


@pytest.mark.parametrize("length,d,kind", [(24, 16, "padding"), (16, 32, "padding"), (100, 64, "padding"),
                                           (24, 16, "per-query")])  # 24: a block of 32, 8 rows outside it
def test_forward_and_backward_equal_sdpa_without_dropout(length, d, kind):
    b, h = 3, 2
    mask = padding_mask(b, length, [length, length - 5, 7])
    if kind == "per-query":  # each query row its own keys (causal here): the kernel reads the mask row by row
        mask = mask & torch.ones(length, length, dtype=torch.bool, device=DEVICE).tril()
    q, k, v = hf_layout(b, h, length, d, seed=0)
    out, _ = short_attention(Layer().eval(), q, k, v, mask, dropout=0.1, scaling=0.3)
    assert out.shape == (b, length, h, d)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, w in zip("qkv", got, want):
        assert a.shape == w.shape
        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-4, msg=name)
    assert got[1][2, :, 7:].abs().max() == 0  # padded keys of the third sequence get no gradient


def test_dropout_drops_a_fraction_p_rescales_the_rest_and_backward_uses_the_same_mask():
    b, h, length, p = 4, 2, 16, 0.25
    mask = padding_mask(b, length, [16, 12, 16, 9])
    q, k, v = hf_layout(b, h, length, length, seed=1)
    train = Layer().train()
    # With v the identity, the output is the dropped-out probabilities themselves.
    eye = torch.eye(length, device=DEVICE).expand(b, h, length, length)
    torch.manual_seed(7)
    dropped = short_attention(train, q, k, eye, mask, dropout=p)[0].transpose(1, 2).detach()
    probs = torch.softmax((q @ k.transpose(2, 3) / length ** 0.5).masked_fill(~mask, float("-inf")), -1).detach()
    keep = dropped != 0
    real = mask.expand(b, h, length, length)
    assert not keep[~real].any()
    share = 1 - keep[real].float().mean().item()
    assert abs(share - p) < 0.05, share  # 1,708 real entries: 0.05 is ~4.7 standard deviations
    torch.testing.assert_close(dropped[keep], probs[keep] / (1 - p), atol=1e-6, rtol=1e-5)
    # Same seed, same mask: forward and backward against the mask made explicit.
    torch.manual_seed(7)
    out = short_attention(train, q, k, v, mask, dropout=p)[0]
    ref = ((probs.masked_fill(~keep, 0) / (1 - p)) @ v).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    scores = (q @ k.transpose(2, 3) / length ** 0.5).masked_fill(~mask, float("-inf"))
    ref = ((torch.softmax(scores, -1) * keep / (1 - p)) @ v).transpose(1, 2)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, w in zip("qkv", got, want):
        torch.testing.assert_close(a, w, atol=1e-5, rtol=1e-4, msg=name)
    # Another draw, another mask.
    again = short_attention(train, q, k, eye, mask, dropout=p)[0].transpose(1, 2)
    assert not torch.equal(again != 0, keep)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach the Triton kernel."""
    import seqcls.attention as attention
    calls, real = [], attention.short_attention_fwd

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(attention, "short_attention_fwd", counted)
    return calls


def test_what_the_kernel_does_not_take_goes_to_sdpa(kernel_calls):
    b, h, d = 2, 2, 16
    long_q, long_k, long_v = hf_layout(b, h, MAX_LEN + 8, d, seed=2)
    out, _ = short_attention(Layer().eval(), long_q, long_k, long_v, None)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(long_q, long_k, long_v).transpose(1, 2))
    q, k, v = hf_layout(b, h, 20, d, seed=3)
    additive = torch.zeros(b, 1, 20, 20, device=DEVICE)
    out, _ = short_attention(Layer().eval(), q, k, v, additive)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=additive).transpose(1, 2))
    assert kernel_calls == []
    short_attention(Layer().eval(), q, k, v, None)
    assert kernel_calls == [(b, h, 20, d)]  # and a boolean mask or none, length <= MAX_LEN does reach it


def test_a_model_built_with_seqcls_short_gives_sdpa_logits_and_trains(tmp_path, synthetic_dir, kernel_calls):
    from seqcls.build import build_trainer
    models = {}
    for attn in ("seqcls_short", "sdpa"):
        cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path / attn) + [f"model.attn_implementation={attn}",
                                                                                 f"device={DEVICE}"])
        models[attn] = build_trainer(cfg, tmp_path / attn).model.eval()
        assert models[attn].config._attn_implementation == attn
    models["sdpa"].load_state_dict(models["seqcls_short"].state_dict())
    ids = torch.randint(5, 100, (3, 12), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        got = models["seqcls_short"](input_ids=ids, attention_mask=mask).logits
        ref = models["sdpa"](input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    layers = models["sdpa"].config.num_hidden_layers
    assert len(kernel_calls) == layers - 1  # the last layer computes the first token only, through sdpa
    # gradients reach every attention projection through the kernel
    model = models["seqcls_short"].train()
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0], device=DEVICE)).loss.backward()
    for name, p in model.named_parameters():
        if ".attention.self." in name and "layer.0." in name:
            assert p.grad is not None and p.grad.abs().max() > 0, name
