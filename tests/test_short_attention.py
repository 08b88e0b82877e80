"""seqcls.short_attention's Triton kernels, run in Triton's CPU interpreter (tests/short_attention_cases.py,
in a process of its own). On the GPU: tests/test_gpu.py (the kernels against the reference in bf16, the
dropout replay under CUDA graphs, packed training under step graphs against padded eager)."""

import pytest
import torch

from tests.conftest import run_interpreted


def run_case(name: str) -> dict:
    return run_interpreted("short_attention_cases", name)


def check_match(r: dict) -> None:
    # fp16 inputs, fp32 reference on the same rounded inputs: fp16 products and outputs.
    for key in ("fwd_fused", "fwd_parts"):
        assert r[key] < 5e-3 * max(1.0, r["ref_out"]), r
    for key in ("grad_fused", "grad_parts"):  # fused: the gradient of the one qkv tensor, written whole
        assert r[key] < 1e-2 * max(1.0, r["ref_grad"]), r


def check_dropout(r: dict) -> None:
    assert r["fwd"] < 5e-3, r
    for err, ref in zip(r["grads"], r["ref_grads"]):
        assert err < 1e-2 * max(1.0, ref), r  # the backward regenerated the forward's mask
    # p = 0.3: the standard deviation of the dropped fraction is below 0.005 at these sizes (>= 12k entries)
    assert r["entries"] > 12_000 and 0.27 < r["dropped"] < 0.33, r
    assert not any(r["same_across_heads"]) and not r["same_across_equal_lengths"], r
    assert r["same_seed_same_output"] and not r["other_seed_same_output"], r


def test_forward_and_gradients_match_attention_within_each_sequence_in_every_tile():
    check_match(run_case("match"))


def test_tails_take_lengths_65_to_96_in_a_64_row_tile_with_the_same_values_and_dropout():
    r = run_case("tails")
    assert r["launches"] == [[0, 32, 0], [32, 64, 0], [64, 64, 16], [80, 64, 32], [96, 128, 0], [128, 256, 0]], r
    check_match(r["match"])
    check_dropout(r["dropout"])


def test_queries_apart_from_the_keys_as_the_first_token_last_layer_asks():
    r = run_case("cross")
    assert r["fwd"] < 5e-3 * max(1.0, r["ref_out"]), r
    for err, ref in zip(r["grads"], r["ref_grads"]):
        assert ref > 0 and err < 1e-2 * max(1.0, ref), r
    assert r["filler_grads_zero"], r


def test_dropout_mask_is_replayed_by_the_backward_and_independent_across_heads_and_sequences():
    check_dropout(run_case("dropout"))


def test_the_one_block_backward_gives_the_loops_gradients_where_a_query_block_covers_the_tile():
    r = run_case("one_block")
    assert all(r["same"].values()) and len(r["same"]) == 4, r
    assert all(v for k, v in r.items() if k.startswith("nonzero_")), r
    # default configuration: query blocks of 32, 64 and 128 for the 32-, 64- and 128-row tiles
    for name, paths in r["paths"].items():
        expected = [[32, name != "cross"], [64, name != "cross"], [128, name != "cross"]]
        assert paths == expected, (name, paths)


def test_the_custom_ops_fake_implementations_and_autograd_pass_torch_opcheck():
    assert run_case("opcheck")["failures"] == []


def test_sequences_longer_than_the_widest_tile_or_past_the_dropout_counters_are_refused():
    from seqcls.short_attention import short_attention, short_self_attention
    x = torch.zeros(4, 2, 16, dtype=torch.float16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="up to 256 tokens"):
        short_attention(x, x, x, cu, cu, 300, dropout=0.0, scale=0.25)
    with pytest.raises(ValueError, match="up to 256 tokens"):
        short_self_attention(torch.zeros(4, 96, dtype=torch.float16), 16, cu, 257, dropout=0.0, scale=0.25)

    big = torch.tensor([0] * 131072 + [4], dtype=torch.int32)  # 131,072 sequences x 2 heads
    with pytest.raises(ValueError, match="pairs a call, got 131072 x 2"):
        short_attention(x, x, x, big, big, 128, dropout=0.1, scale=0.25)
