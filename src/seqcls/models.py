"""Model and tokenizer loaders named by the model group's ``_target_``."""

from __future__ import annotations

import contextlib
import os
import re
import types
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedModel, PreTrainedTokenizerBase)

from seqcls import gemm
from seqcls.env import package_dir  # noqa: F401  (re-exported)
from seqcls.errors import ConfigError

OFFLINE_HINT = ("offline, use a local directory (model.pretrained_model_name_or_path=DIR) "
                "or model=minilm_l6, whose weights install with the package")


def _label_kwargs(num_labels: int, labels: Optional[list[str]], multi_label: bool = False) -> dict[str, Any]:
    # Always set, over what a pretrained classifier's config says: it is saved in config.json, and from it HF's
    # pipelines (and seqcls.predict) choose softmax, sigmoid or none.
    problem = "regression" if num_labels == 1 else \
        "multi_label_classification" if multi_label else "single_label_classification"
    kw: dict[str, Any] = {"num_labels": num_labels, "problem_type": problem}
    if num_labels > 1 and labels:
        kw["id2label"] = dict(enumerate(labels))
        kw["label2id"] = {name: i for i, name in enumerate(labels)}
    return kw


def go_offline_if_hub_unreachable() -> None:
    """Without network, huggingface_hub retries each request for ~30 s before failing. When the
    hub's name does not even resolve, switch to offline mode at once (the local cache still works)."""
    import socket

    import huggingface_hub.constants as hf_constants
    if hf_constants.HF_HUB_OFFLINE:
        return
    host = hf_constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        hf_constants.HF_HUB_OFFLINE = True
        try:
            import datasets.config
            datasets.config.HF_HUB_OFFLINE = True
        except ImportError:
            pass


def _is_local(name_or_path: str) -> bool:
    return name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()


def from_pretrained(pretrained_model_name_or_path: str, *, num_labels: int, labels: Optional[list[str]] = None,
                    trust_remote_code: bool = False, attn_implementation: Optional[str] = None,
                    multi_label: bool = False, **_: Any) -> PreTrainedModel:
    """A pretrained encoder with a freshly initialised classification head."""
    if pretrained_model_name_or_path is None:
        raise ConfigError("model.pretrained_model_name_or_path is not set; pass a hub id or a local directory")
    if _is_local(pretrained_model_name_or_path) and not Path(pretrained_model_name_or_path).is_dir():
        raise ConfigError(f"model path {pretrained_model_name_or_path} does not exist; "
                          f"pass an existing Hugging Face model directory")
    if not _is_local(pretrained_model_name_or_path):
        go_offline_if_hub_unreachable()
    try:
        with _attn_errors(attn_implementation):
            return AutoModelForSequenceClassification.from_pretrained(
                pretrained_model_name_or_path, trust_remote_code=trust_remote_code, ignore_mismatched_sizes=True,
                **_attn_kwargs(attn_implementation), **_label_kwargs(num_labels, labels, multi_label))
    except OSError as e:
        if _is_local(pretrained_model_name_or_path):
            raise ConfigError(f"{pretrained_model_name_or_path} is not a loadable Hugging Face model directory "
                              f"({str(e).splitlines()[0]})") from None
        raise ConfigError(f"cannot load model {pretrained_model_name_or_path!r} from the hub "
                          f"(no network or no such model); {OFFLINE_HINT}") from None


def from_config(model_type: str, *, num_labels: int, labels: Optional[list[str]] = None,
                config_overrides: Optional[dict] = None, tokenizer: Optional[PreTrainedTokenizerBase] = None,
                attn_implementation: Optional[str] = None, multi_label: bool = False, **_: Any) -> PreTrainedModel:
    """A randomly initialised model of ``model_type`` (tiny models for tests), sized by config_overrides."""
    overrides = dict(config_overrides or {})
    if tokenizer is not None:
        overrides.setdefault("vocab_size", len(tokenizer))
        overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
    config = AutoConfig.for_model(model_type, **overrides, **_label_kwargs(num_labels, labels, multi_label))
    with _attn_errors(attn_implementation):
        return AutoModelForSequenceClassification.from_config(config, **_attn_kwargs(attn_implementation))


def _attn_kwargs(attn_implementation: Optional[str]) -> dict:
    return {} if attn_implementation is None else {"attn_implementation": attn_implementation}


@contextlib.contextmanager
def _attn_errors(attn_implementation: Optional[str]):
    """HF's refusal of an attention kernel (unknown name, package missing) as one line naming the field."""
    try:
        yield
    except (ValueError, ImportError) as e:
        if attn_implementation is None or not re.search(r"attn|attention", str(e), re.IGNORECASE):
            raise
        raise ConfigError(f"model.attn_implementation={attn_implementation} cannot be used: "
                          f"{str(e).splitlines()[0]} (leave it unset for HF's default, sdpa)") from None


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    if _is_local(name_or_path) and not Path(name_or_path).is_dir():
        raise ConfigError(f"tokenizer path {name_or_path} does not exist; pass an existing directory")
    if not _is_local(name_or_path):
        go_offline_if_hub_unreachable()
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError:
        raise ConfigError(f"cannot load the tokenizer of {name_or_path!r} (no network or no such model); "
                          f"{OFFLINE_HINT}") from None


# Encoders whose classification head reads the first token only (BERT's pooler, RoBERTa's and ELECTRA's
# heads take hidden[:, 0]) and whose layers are BERT's: attention.self.{query,key,value}, attention.output,
# feed_forward_chunk.
FIRST_TOKEN_HEADS = ("bert", "roberta", "xlm-roberta", "electra", "camembert")


def _encoder_layers(model: PreTrainedModel):
    """The BERT-style encoder layers of a FIRST_TOKEN_HEADS model with sdpa/eager attention, else None."""
    config = model.config
    base = getattr(model, model.base_model_prefix, None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if (config.model_type not in FIRST_TOKEN_HEADS or not layers or config.is_decoder
            or getattr(config, "add_cross_attention", False)
            or getattr(config, "_attn_implementation", "eager") not in ("sdpa", "eager")):
        return None
    return layers


def tuned_linears(model: PreTrainedModel) -> int:
    """Make the encoder layers' plain Linears seqcls.gemm.TunedLinear (compile.tuned_gemm); returns how many."""
    layers = _encoder_layers(model)
    return 0 if layers is None else gemm.tune_linears(layers)


GELUS = ("gelu", "gelu_new", "gelu_pytorch_tanh")  # hidden_act values gelu_epilogue_mlps takes


def gelu_epilogue_mlps(model: PreTrainedModel, *, trained: bool = True) -> int:
    """Compute each encoder layer's feed-forward with seqcls.gemm.gelu_mlp (compile.gelu_epilogue): its
    GELU in the first matrix multiply's epilogue, the GELU's gradient in the second's backward. Layers
    whose feed-forward Linears carry LoRA adapters keep theirs, and with ``trained=False`` so do those
    whose feed-forward weights train. GELU becomes its tanh form, which differs from erf's ("gelu") by at
    most 4.7e-4, a sixteenth of bf16's rounding of an output there (~2.7). Returns how many layers."""
    layers = _encoder_layers(model)
    if layers is None or getattr(model.config, "hidden_act", None) not in GELUS:
        return 0
    n = 0
    for layer in layers:
        inter, out = getattr(layer, "intermediate", None), getattr(layer, "output", None)
        denses = (getattr(inter, "dense", None), getattr(out, "dense", None))
        if (all(isinstance(d, torch.nn.Linear) for d in denses) and hasattr(layer, "feed_forward_chunk")
                and all(hasattr(out, a) for a in ("dropout", "LayerNorm"))
                and (trained or not any(p.requires_grad for d in denses for p in d.parameters()))):
            layer.feed_forward_chunk = types.MethodType(_gelu_feed_forward, layer)
            n += 1
    return n


def _gelu_feed_forward(layer, attention_output):
    """BERT's feed-forward (intermediate dense + GELU, output dense, dropout, residual LayerNorm) with the
    two matrix multiplies and the GELU as one gemm.gelu_mlp."""
    inter, out = layer.intermediate.dense, layer.output
    rows = attention_output.reshape(-1, attention_output.shape[-1])
    hidden = gemm.gelu_mlp(rows, inter.weight, inter.bias, out.dense.weight, out.dense.bias)
    return out.LayerNorm(out.dropout(hidden.view(attention_output.shape)) + attention_output)


def first_token_last_layer(model: PreTrainedModel) -> bool:
    """Compute the last encoder layer for the first token alone; its keys and values still see every token.

    The head reads nothing else of that layer's output, so the logits are the same; the layer's query,
    attention output and feed-forward shrink from every token to one a sequence (for a 6-layer encoder,
    about a seventh of the step's arithmetic). Returns whether the model qualified.
    """
    layers = _encoder_layers(model)
    if layers is None:
        return False
    last = layers[-1]
    attn = getattr(getattr(last, "attention", None), "self", None)
    if not all(hasattr(attn, a) for a in ("query", "key", "value", "attention_head_size", "scaling", "dropout")):
        return False
    last.forward = types.MethodType(_first_token_forward, last)
    return True


def _first_token_forward(layer, hidden_states, attention_mask=None, *args, **kwargs):
    attn = layer.attention.self
    if kwargs.get("cu_seq_lens") is not None:  # packed sequences (pack_sequences)
        return _first_token_packed(layer, attn, hidden_states, kwargs["cu_seq_lens"])
    batch, length, _ = hidden_states.shape
    first = hidden_states[:, :1]
    query = attn.query(first).view(batch, 1, -1, attn.attention_head_size).transpose(1, 2)
    key = attn.key(hidden_states).view(batch, length, -1, attn.attention_head_size).transpose(1, 2)
    value = attn.value(hidden_states).view(batch, length, -1, attn.attention_head_size).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[2] > 1:
        attention_mask = attention_mask[:, :, :1]  # the first query's row (boolean, or additive for eager)
    context = _attend(attn, query, key, value, attention_mask).reshape(batch, 1, -1)
    attention_output = layer.attention.output(context, first)
    return layer.feed_forward_chunk(attention_output)


def _first_token_packed(layer, attn, hidden_states, cu_seq_lens):
    """The first-token last layer on packed sequences: each sequence's first token queries that
    sequence's keys. Returns (sequences, 1, hidden), what the padded layer returns, so the head reads
    [:, 0] as before. The packing's filler (the last entry of cu_seq_lens) asks no query."""
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    first = rows.index_select(0, cu_seq_lens[:-2])  # (sequences, hidden)
    n = first.shape[0]
    query, key, value = (m(x).view(x.shape[0], -1, attn.attention_head_size) for m, x in
                         ((attn.query, first), (attn.key, rows), (attn.value, rows)))
    cu_q = torch.arange(n + 2, device=rows.device, dtype=cu_seq_lens.dtype).clamp_(max=n)
    context = varlen_attention(query, key, value, cu_q, cu_seq_lens, 1, attn.packed_max_length,
                               dropout=attn.dropout.p if attn.training else 0.0, scale=attn.scaling,
                               kernel=getattr(attn, "varlen_kernel", "auto"))
    first = first[:, None]
    attention_output = layer.attention.output(context.reshape(n, 1, -1), first)
    return layer.feed_forward_chunk(attention_output)


def _attend(attn, query, key, value, attention_mask):
    """Attention as the layer's own sdpa or eager path computes it; returns (batch, length, heads, dim)."""
    dropout = attn.dropout.p if attn.training else 0.0
    if attn.config._attn_implementation == "eager":  # scores, additive mask, softmax, dropout, mixing
        scores = torch.matmul(query, key.transpose(2, 3)) * attn.scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = F.dropout(F.softmax(scores, dim=-1), p=dropout, training=attn.training)
        return torch.matmul(probs, value).transpose(1, 2)
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=attn.scaling)
    return context.transpose(1, 2)


def fuse_frozen_qkv(model: PreTrainedModel, *, merge_adapters: bool = False) -> int:
    """Compute query, key and value with one matrix multiply where their weights and biases are frozen.

    The three weights (and biases) are moved into one tensor and each Parameter becomes a view of its
    rows: the same Parameter objects, names, values and memory, so state dicts, checkpoints and the
    optimizer see no change. LoRA adapters on query/key/value still add their own term; with
    ``merge_adapters`` (see ``merged_lora_linear``) those of one block share one dropout mask and their
    matmuls. Call it after the model has its final device and dtype (``.to()`` replaces a Parameter's
    data and undoes the views). Returns the number of attention blocks fused.
    """
    from seqcls.lora import LoRALinear
    layers = _encoder_layers(model)
    if layers is None:
        return 0
    n = 0
    for layer in layers:
        attn = getattr(getattr(layer, "attention", None), "self", None)
        mods = [getattr(attn, name, None) for name in ("query", "key", "value")]
        if "forward" in vars(layer) or not all(isinstance(m, (torch.nn.Linear, LoRALinear)) for m in mods):
            continue  # the first-token last layer projects the first token's query on its own
        tensors = [m.weight for m in mods] + [m.bias for m in mods]
        if any(t is None or t.requires_grad for t in tensors) or len({(t.dtype, t.device) for t in tensors}) != 1:
            continue
        weight = torch.cat([m.weight.detach() for m in mods])
        bias = torch.cat([m.bias.detach() for m in mods])
        rows = mods[0].weight.shape[0]
        for i, m in enumerate(mods):
            m.weight.data = weight[i * rows:(i + 1) * rows]
            m.bias.data = bias[i * rows:(i + 1) * rows]
        # Which of the three carry a LoRA term, and whether theirs merge: decided here, not on every forward.
        adapters = tuple(m if isinstance(m, LoRALinear) else None for m in mods)
        attn.fused_qkv = (weight, bias, adapters, merge_adapters and mergeable(adapters))
        attn.forward = types.MethodType(_self_attention_forward, attn)
        n += 1
    return n


def _self_attention_forward(attn, hidden_states, attention_mask=None, *args, **kwargs):
    """Self-attention with query/key/value from one fused matrix multiply (fuse_frozen_qkv) or from the
    three projections, over padded batches (the mask HF built) or packed sequences (pack_sequences)."""
    if args or any(kwargs.get(k) is not None for k in ("cache", "past_key_values", "encoder_hidden_states")):
        return type(attn).forward(attn, hidden_states, attention_mask, *args, **kwargs)
    input_shape = hidden_states.shape[:-1]
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    fused = getattr(attn, "fused_qkv", None)
    qkv = None  # query, key and value as one tensor's thirds, where they come from one
    if fused is None:
        parts = [attn.query(rows), attn.key(rows), attn.value(rows)]
    else:
        weight, bias, adapters, merged = fused
        if merged:
            qkv = merged_lora_linear(rows, weight, bias, adapters)
        else:
            qkv = gemm.linear(rows, weight, bias)
            if any(a is not None for a in adapters):
                parts = [p if a is None else p + a.lora_delta(rows) for p, a in zip(qkv.chunk(3, dim=-1), adapters)]
                qkv = None
        if qkv is not None:
            parts = qkv.chunk(3, dim=-1)
    cu_seq_lens = kwargs.get("cu_seq_lens")
    if cu_seq_lens is not None:
        options = dict(dropout=attn.dropout.p if attn.training else 0.0, scale=attn.scaling,
                       kernel=getattr(attn, "varlen_kernel", "auto"))
        if qkv is not None:
            context = varlen_self_attention(qkv, attn.attention_head_size, cu_seq_lens, attn.packed_max_length,
                                            **options)
        else:
            q, k, v = (p.view(rows.shape[0], -1, attn.attention_head_size) for p in parts)
            context = varlen_attention(q, k, v, cu_seq_lens, cu_seq_lens, attn.packed_max_length,
                                       attn.packed_max_length, **options)
        return context.reshape(*input_shape, -1), None
    heads = [p.reshape(*input_shape, -1, attn.attention_head_size).transpose(1, 2) for p in parts]
    context = _attend(attn, *heads, attention_mask)
    return context.reshape(*input_shape, -1), None


def pack_sequences(model: PreTrainedModel, max_length: int, kernel: str = "auto") -> bool:
    """Let the encoder train on packed sequences: a batch's sequences laid end to end in one row with no
    padding (seqcls.data.PackCollator), ``cu_seq_lens`` marking where each starts, and attention kept
    within each sequence by a variable-length kernel (varlen_attention). The matrix multiplies,
    LayerNorms and dropouts then run on real tokens only, not on the padding of a padded batch. Needs
    the first-token last layer (first_token_last_layer), which gives the head one row a sequence.
    ``max_length``: no packed sequence is longer (the data's truncation length, or the filler's
    pack_bucket where that is longer); ``kernel``: varlen_attention's.
    Padded batches (evaluation, prediction) run as before. Returns whether the model qualified."""
    layers = _encoder_layers(model)
    if layers is None or "forward" not in vars(layers[-1]):
        return False
    for layer in layers:
        attn = layer.attention.self
        attn.packed_max_length = int(max_length)
        attn.varlen_kernel = kernel
        if "forward" not in vars(layer) and "forward" not in vars(attn):  # fuse_frozen_qkv patched it already
            attn.forward = types.MethodType(_self_attention_forward, attn)
    return True


def packed_position_offset(model: PreTrainedModel) -> int:
    """The position id of a sequence's first token: RoBERTa-style embeddings (those that derive position
    ids from the padding) count positions from padding_idx + 1, BERT's and ELECTRA's from 0."""
    embeddings = getattr(model.base_model, "embeddings", None)
    if hasattr(embeddings, "create_position_ids_from_input_ids"):
        return int(embeddings.padding_idx) + 1
    return 0


class _FlashVarlen(torch.autograd.Function):
    """FlashAttention's variable-length kernels as torch ships them, with attention dropout (its RNG
    state is saved by the forward and replayed by the backward, also inside CUDA graphs)."""

    @staticmethod
    def forward(ctx, query, key, value, cu_q, cu_k, max_q: int, max_k: int, dropout: float, scale: float):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            query, key, value, cu_q, cu_k, max_q, max_k, dropout, False, False, scale=scale)
        ctx.save_for_backward(query, key, value, out, lse, cu_q, cu_k, rng_state, unused)
        ctx.max_q, ctx.max_k, ctx.dropout, ctx.scale = max_q, max_k, dropout, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, out, lse, cu_q, cu_k, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), query, key, value, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.dropout, False,
            rng_state, unused, scale=ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None


def _efficient_forward(ctx, query, key, value, cu_q, cu_k, max_q: int, max_k: int, dropout: float, scale: float):
    """The memory-efficient kernel's variable-length mode (one batch row, cu_seqlens), saving for
    _efficient_backward what it needs, the dropout's RNG seed and offset among it."""
    out, lse, seed, offset, _, _ = torch.ops.aten._efficient_attention_forward(
        query[None], key[None], value[None], None, cu_q, cu_k, max_q, max_k, dropout, 0, True, scale=scale)
    ctx.save_for_backward(query, key, value, out, lse, cu_q, cu_k, seed, offset)
    ctx.max_q, ctx.max_k, ctx.dropout, ctx.scale = max_q, max_k, dropout, scale
    return out[0]


def _efficient_backward(ctx, grad, shared: bool):
    query, key, value, out, lse, cu_q, cu_k, seed, offset = ctx.saved_tensors
    dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
        grad[None].contiguous(), query[None], key[None], value[None], None, out, cu_q, cu_k, ctx.max_q, ctx.max_k,
        lse, ctx.dropout, seed, offset, 0, False, scale=ctx.scale, shared_storage_dqdkdv=shared)
    return dq[0], dk[0], dv[0]


class _EfficientVarlen(torch.autograd.Function):
    """The memory-efficient kernel's variable-length mode: its backward works in tiles of 64 rows where
    FlashAttention's uses 128, which suits short sequences packed by the thousand (docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, query, key, value, cu_q, cu_k, max_q: int, max_k: int, dropout: float, scale: float):
        return _efficient_forward(ctx, query, key, value, cu_q, cu_k, max_q, max_k, dropout, scale)

    @staticmethod
    def backward(ctx, grad):
        return *_efficient_backward(ctx, grad, shared=False), None, None, None, None, None, None


class _EfficientVarlenQKV(torch.autograd.Function):
    """_EfficientVarlen for self-attention whose query, key and value are the thirds of one tensor
    (tokens, 3 * heads * dim), as a fused projection gives them. The backward writes their gradients into
    one buffer of that layout (the kernel's shared_storage_dqdkdv): the fused tensor's gradient, with no
    concatenation of three."""

    @staticmethod
    def forward(ctx, qkv, head_dim: int, cu, max_len: int, dropout: float, scale: float):
        query, key, value = qkv.view(qkv.shape[0], 3, -1, head_dim).unbind(1)
        return _efficient_forward(ctx, query, key, value, cu, cu, max_len, max_len, dropout, scale)

    @staticmethod
    def backward(ctx, grad):
        dq, dk, dv = _efficient_backward(ctx, grad, shared=True)
        width = dq[0].numel()
        if dq.stride(0) == 3 * width and dk.data_ptr() == dq.data_ptr() + width * dq.element_size() \
                and dv.data_ptr() == dk.data_ptr() + width * dq.element_size():
            dqkv = dq.as_strided((dq.shape[0], 3 * width), (3 * width, 1))
        else:  # a torch whose kernel did not share the storage
            dqkv = torch.cat([g.reshape(g.shape[0], -1) for g in (dq, dk, dv)], dim=-1)
        return dqkv, None, None, None, None, None


def flash_varlen_supported(device: torch.device, head_dim: int) -> bool:
    """Whether torch's FlashAttention kernels run here: an NVIDIA GPU of compute capability 8.0 or newer
    (Ampere, Hopper, ...) and a head size they compile for."""
    return (device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0)
            and head_dim % 8 == 0 and head_dim <= 256)


def _varlen_kernel(query: torch.Tensor, dropout: float, kernel: str, max_len: int = 0,
                   sequences: int = 1) -> Optional[str]:
    """Which kernel varlen attention runs: short, flash, efficient, or None for the reference. auto and
    short take seqcls.short_attention's Triton kernel where it runs (CUDA, bf16/fp16, sequences of up to
    256 queries and keys: ``max_len``); on MRPC's packed
    batches it was faster than every kernel below, with and without dropout (docs/benchmarks.md). The
    memory-efficient kernel only without attention dropout: on packed sequences its forward draws one mask
    for every head and every sequence of a length (in torch 2.11 the variable-length forward passes the
    kernel 0 keys, which zeroes each (sequence, head)'s RNG offset), and its backward draws another
    (tests/test_gpu.py; scripts/bench_attention.py --check-dropout). FlashAttention's draws independent
    masks and replays them. Without dropout the efficient kernel was the faster of the two on
    roberta-large's heads at b32 and b256 (docs/benchmarks.md)."""
    if kernel in ("auto", "short"):
        from seqcls import short_attention
        if short_attention.supported(query, max_len, sequences):
            return "short"
    if not (query.dtype in (torch.bfloat16, torch.float16) and flash_varlen_supported(query.device, query.shape[-1])):
        return None
    return "efficient" if kernel in ("auto", "efficient") and dropout == 0.0 else "flash"


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_q: torch.Tensor,
                     cu_k: torch.Tensor, max_q: int, max_k: int, *, dropout: float, scale: float,
                     kernel: str = "auto") -> torch.Tensor:
    """Attention over packed sequences: query rows [cu_q[i], cu_q[i+1]) attend to key/value rows
    [cu_k[i], cu_k[i+1]) alone. query (Tq, heads, dim), key and value (Tk, heads, dim), cu_* int32
    (sequences + 1,), max_*: bounds on a sequence's length; returns (Tq, heads, dim). On CUDA in
    bf16/fp16: on sequences up to 256 tokens seqcls's Triton kernel
    (seqcls.short_attention) unless ``kernel`` is flash or efficient; otherwise, where they run
    (flash_varlen_supported), FlashAttention's varlen kernels, or without dropout the memory-efficient
    kernel's unless ``kernel`` is flash (_varlen_kernel); elsewhere the same attention as SDPA with a
    block-diagonal mask (memory quadratic in the packed length)."""
    chosen = _varlen_kernel(query, dropout, kernel, max(max_q, max_k), cu_q.shape[0] - 1)
    if chosen == "short":
        from seqcls.short_attention import short_attention
        return short_attention(query, key, value, cu_q, cu_k, max(max_q, max_k), dropout=dropout, scale=scale)
    if chosen is not None:
        function = _EfficientVarlen if chosen == "efficient" else _FlashVarlen
        return function.apply(query, key, value, cu_q, cu_k, max_q, max_k, dropout, scale)
    seq_q = torch.searchsorted(cu_q[1:], torch.arange(query.shape[0], device=query.device, dtype=cu_q.dtype), right=True)
    seq_k = torch.searchsorted(cu_k[1:], torch.arange(key.shape[0], device=key.device, dtype=cu_k.dtype), right=True)
    mask = seq_q[:, None] == seq_k[None, :]
    out = F.scaled_dot_product_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                         attn_mask=mask, dropout_p=dropout, scale=scale)
    return out.transpose(0, 1)


def varlen_self_attention(qkv: torch.Tensor, head_dim: int, cu: torch.Tensor, max_len: int, *, dropout: float,
                          scale: float, kernel: str = "auto") -> torch.Tensor:
    """varlen_attention of packed sequences on themselves, query, key and value given as the thirds of
    ``qkv`` (tokens, 3 * heads * head_dim). With the short-sequence and the memory-efficient kernels the
    backward writes the gradient of ``qkv`` whole (short_self_attention, _EfficientVarlenQKV); otherwise
    it is varlen_attention on the thirds."""
    query, key, value = (p.view(qkv.shape[0], -1, head_dim) for p in qkv.chunk(3, dim=-1))
    chosen = _varlen_kernel(query, dropout, kernel, max_len, cu.shape[0] - 1)
    if chosen == "short":
        from seqcls.short_attention import short_self_attention
        return short_self_attention(qkv, head_dim, cu, max_len, dropout=dropout, scale=scale)
    if chosen == "efficient":
        return _EfficientVarlenQKV.apply(qkv, head_dim, cu, max_len, dropout, scale)
    return varlen_attention(query, key, value, cu, cu, max_len, max_len, dropout=dropout, scale=scale, kernel=kernel)


def mergeable(adapters) -> bool:
    """Two or more LoRA adapters with one rank, scale and dropout rate (one peft config gives them that)."""
    present = [a for a in adapters if a is not None]
    return len(present) > 1 and len({(a.dim, a.scale, getattr(a.lora_dropout, "p", 0.0),
                                      a.lora_A.weight.dtype) for a in present}) == 1


def merged_lora_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, adapters) -> torch.Tensor:
    """The fused query/key/value projection of ``rows`` (weight and bias: the three stacked) with the LoRA
    terms of the adapters on them, merged as loralib's MergedLinear merges a fused query/key/value: one
    dropout mask for all, one matmul with their A matrices stacked, and their B matrices laid out
    block-wise (zeros where a projection has no adapter) beside the frozen weight, so the base projection
    and every term are one matmul (seqcls.lora.lora_linear). Each term is (alpha / dim) * B(A(dropout(x)))
    as alone, but the adapters see the same dropped input (peft draws a mask per adapter). Forward and
    backward, that is one dropout and four matmuls a block for all its adapters and the base, against one
    dropout, six matmuls and an add per adapter beside the base's."""
    from seqcls.lora import lora_linear
    present = [a for a in adapters if a is not None]
    first = present[0]
    u = F.linear(first.lora_dropout(rows), torch.cat([a.lora_A.weight for a in present])) * first.scale
    width, out = u.shape[-1], weight.shape[0] // len(adapters)
    blocks, nonzero, start = [], [], 0
    for i, adapter in enumerate(adapters):
        if adapter is None:
            blocks.append(u.new_zeros(out, width))
        else:
            blocks.append(F.pad(adapter.lora_B.weight, (start, width - start - adapter.dim)))
            nonzero.append((i * out, (i + 1) * out, start, start + adapter.dim))
            start += adapter.dim
    return lora_linear(rows, weight, bias, u, torch.cat(blocks), tuple(nonzero))


class RandDropout(torch.nn.Dropout):
    """nn.Dropout with its mask drawn by torch.rand instead of bernoulli_: the same distribution, and on
    CPU about a quarter less time forward and backward (bernoulli_ draws element by element)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        keep = (torch.rand_like(x) >= self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * keep


def _swap_class(model: torch.nn.Module, old: type, new: type) -> int:
    """Make every module of exactly type ``old`` a ``new`` (in place: parameters, names and state dict
    unchanged). Returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            n += 1
    return n


def rand_dropout(model: torch.nn.Module) -> int:
    """Make every plain nn.Dropout of ``model`` a RandDropout (in place: parameters and names unchanged)."""
    return _swap_class(model, torch.nn.Dropout, RandDropout)


class AutocastLayerNorm(torch.nn.LayerNorm):
    """nn.LayerNorm that, under autocast, reads and writes the autocast dtype (bf16) and normalises in
    fp32 inside the kernel. Autocast alone runs LayerNorm in fp32 and returns fp32, which makes the whole
    residual stream between blocks fp32: every dropout + residual + LayerNorm pass then moves twice the
    bytes. Outside autocast it is nn.LayerNorm. Parameters (and their dtype) are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if not torch.is_autocast_enabled(device_type):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device_type)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)


def autocast_layernorms(model: torch.nn.Module) -> int:
    """Make every plain nn.LayerNorm of ``model`` an AutocastLayerNorm (in place: names, parameters and
    state dict unchanged). Returns how many."""
    return _swap_class(model, torch.nn.LayerNorm, AutocastLayerNorm)


def bf16_read_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that a forward under bf16 autocast reads only as bf16: weights and biases of Linear
    layers (autocast casts them for the matmul) and of AutocastLayerNorms. Stored in bf16 they give the
    same forward and backward, bit for bit, without a cast kernel each step."""
    from seqcls.lora import LoRALinear
    seen: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, LoRALinear, AutocastLayerNorm)):
            for p in (module.weight, module.bias):
                if p is not None:
                    seen.setdefault(id(p), p)
    return list(seen.values())
