"""The builder: the one place that calls hydra.utils.instantiate, in a fixed, visible order.

    seed → process group → tokenizer → data → model → inject LoRA → freeze → shard → device
    → optimizer over trainable parameters → LR schedule → trainer
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from seqcls import data as data_lib
from seqcls.checkpoint import Checkpointer, read_pointer
from seqcls.config import ConfigError, flat_options
from seqcls.distributed import DistInfo, broadcast_object, init_distributed, shutdown_distributed
from seqcls.loggers import build_loggers
from seqcls.metrics import main_metric
from seqcls.models import load_tokenizer
from seqcls.trainer import Trainer

log = logging.getLogger("seqcls")

ALLOWED_TARGET_PREFIXES = ("seqcls.", "torch.optim.", "transformers.", "torchdata.", "datasets.")
ADAM_TARGETS = ("torch.optim.AdamW", "torch.optim.Adam")  # fused (and capturable) updates


def check_targets(cfg: DictConfig, extra_prefixes: list[str]) -> None:
    """Refuse any ``_target_`` outside the allowlist before anything is instantiated."""
    allowed = ALLOWED_TARGET_PREFIXES + tuple(extra_prefixes)

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            if target is not None and not str(target).startswith(allowed):
                raise ConfigError(f"{path}._target_={target!r} is outside the allowed module prefixes "
                                  f"{list(allowed)}; add its prefix to allowed_target_prefixes if you trust it")
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(OmegaConf.to_container(cfg, resolve=False), "")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device):
    """The autocast dtype of ``precision`` (None: fp32). auto: bf16 on CUDA GPUs that run it natively
    (compute capability >= 8.0), fp16 with loss scaling on older ones (T4, V100), fp32 on CPU."""
    if precision == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def _call_reader(reader, split: str, dcfg: DictConfig):
    """Pass a reader only the source fields it takes (path, data_dir, train_file, ...)."""
    params = inspect.signature(reader).parameters
    kwargs = {k: dcfg[k] for k in params if k != "split" and k in dcfg}
    for k in ("column_names",):
        if k in kwargs and kwargs[k] is not None:
            kwargs[k] = list(kwargs[k])
    return reader(split, **kwargs)


def build_datasets(dcfg: DictConfig, tokenizer, *, with_test: bool = False) -> dict[str, Any]:
    reader = get_method(dcfg._target_)
    common = label_options(dcfg)
    splits = {"train": dcfg.train_split, **{s: s for s in dcfg.validation_splits}}
    if with_test and dcfg.test_split:
        splits["test"] = dcfg.test_split
    out = {}
    for key, split in splits.items():
        raw = _call_reader(reader, split, dcfg)
        out[key] = data_lib.prepare_split(
            raw, tokenizer, where=f"dataset split {split!r}", require_labels=key != "test",
            limit=dcfg.limit_train_samples if key == "train" else None, **common)
    data_lib.check_train_labels(out["train"], num_labels=dcfg.num_labels, where=f"dataset split {splits['train']!r}")
    return out


def build_split(dcfg: DictConfig, tokenizer, split: str) -> Any:
    """One split, tokenised as in training, for seqcls.evaluate: ``train``, ``validation`` (the first of
    dataset.validation_splits) and ``test`` name the run's splits; any other name goes to the reader.
    Labels are kept when the split has them (check for a ``labels`` column)."""
    reader = get_method(dcfg._target_)
    named = {"train": dcfg.train_split, "validation": dcfg.validation_splits[0], "test": dcfg.test_split}
    source = named.get(split, split)
    if source is None:
        raise ConfigError(f"the run's dataset has no {split} split (dataset.test_split is null); "
                          f"name the split, or set dataset.test_split")
    return data_lib.prepare_split(
        _call_reader(reader, source, dcfg), tokenizer, where=f"dataset split {source!r}", require_labels=False,
        limit=dcfg.limit_train_samples if source == dcfg.train_split else None, **label_options(dcfg))


def label_options(dcfg: DictConfig) -> dict[str, Any]:
    """prepare_split's settings from the dataset config."""
    return dict(text_fields=list(dcfg.text_fields), label_field=dcfg.label_field, num_labels=dcfg.num_labels,
                labels=list(dcfg.labels) if dcfg.labels else None, max_length=dcfg.max_length,
                multi_label=dcfg.task == "multi_label", label_separator=dcfg.label_separator)


def build_model(cfg: DictConfig, tokenizer) -> torch.nn.Module:
    """Instantiate the model group; LoRA is injected and everything else frozen when peft is on."""
    mcfg = cfg.model
    if mcfg.num_labels != cfg.dataset.num_labels:
        raise ConfigError(f"model.num_labels={mcfg.num_labels} disagrees with dataset.num_labels={cfg.dataset.num_labels}; "
                          f"leave model.num_labels at its default ${{dataset.num_labels}}")
    kwargs = dict(num_labels=mcfg.num_labels, labels=list(cfg.dataset.labels) if cfg.dataset.labels else None,
                  trust_remote_code=mcfg.trust_remote_code, attn_implementation=mcfg.attn_implementation)
    if cfg.dataset.task == "multi_label":
        kwargs["multi_label"] = True
    if mcfg._target_ == "seqcls.models.from_config":
        kwargs.update(model_type=mcfg.model_type, tokenizer=tokenizer,
                      config_overrides=OmegaConf.to_container(mcfg.config_overrides))
    else:
        kwargs.update(pretrained_model_name_or_path=mcfg.pretrained_model_name_or_path)
    model = get_method(mcfg._target_)(**kwargs)
    if mcfg.first_token_last_layer:
        from seqcls.models import first_token_last_layer
        if first_token_last_layer(model):
            log.info("last encoder layer computed for the first token only (the head reads no other)")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.dataset.max_length > max_pos - 2 and model.config.model_type in ("roberta", "xlm-roberta"):
        raise ConfigError(f"dataset.max_length={cfg.dataset.max_length} exceeds what the model's position "
                          f"embeddings hold ({max_pos - 2}); lower dataset.max_length")
    if max_pos is not None and cfg.dataset.max_length > max_pos:
        raise ConfigError(f"dataset.max_length={cfg.dataset.max_length} exceeds the model's "
                          f"max_position_embeddings={max_pos}; lower dataset.max_length")
    if cfg.peft.enabled:
        from seqcls.lora import inject_lora, mark_trainable
        try:
            inject_lora(model, target_modules=list(cfg.peft.target_modules), dim=cfg.peft.dim,
                        alpha=cfg.peft.alpha, dropout=cfg.peft.dropout,
                        exclude_modules=list(cfg.peft.exclude_modules), match_all_linear=cfg.peft.match_all_linear)
        except ValueError as e:  # a glob that matches nothing, or a non-Linear target: the user's config
            raise ConfigError(f"peft: {e}") from None
        trainable, total = mark_trainable(model, modules_to_save=tuple(cfg.peft.modules_to_save))
    else:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("parameters: %s trainable / %s total (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def loader_kwargs_of(lcfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """The data-loader block as StatefulDataLoader keyword arguments (pinned memory on CUDA unless set)."""
    kwargs = {k: v for k, v in OmegaConf.to_container(lcfg).items()
              if k not in ("_target_", "collate_fn", "group_by_length")}
    if not kwargs.get("num_workers"):
        kwargs.pop("persistent_workers", None)
    if kwargs.get("pin_memory") is None:
        kwargs["pin_memory"] = device.type == "cuda"
    return kwargs


def _cuda_default(setting: Optional[bool], device: torch.device) -> bool:
    """A compile switch whose null means: on for CUDA, off elsewhere."""
    return device.type == "cuda" if setting is None else bool(setting)


def use_compile(cfg: DictConfig, device: torch.device) -> bool:
    return _cuda_default(cfg.compile.enabled, device)


def use_combo_kernels(cfg: DictConfig, device: torch.device) -> bool:
    return _cuda_default(cfg.compile.combo_kernels, device)


def use_triton_masks(cfg: DictConfig, device: torch.device, compiled: bool) -> bool:
    """compile.dropout_masks: whether the dropout masks come from seqcls's Triton kernel. auto: where the
    model is compiled on an NVIDIA GPU with Triton; asked for where Triton cannot run: ConfigError."""
    from seqcls import dropout
    setting = cfg.compile.dropout_masks
    if setting == "auto":
        return compiled and device.type == "cuda" and dropout.supported(device)
    if setting in ("triton", "triton_bits") and not dropout.supported(device):
        raise ConfigError(f"compile.dropout_masks={setting} needs Triton on an NVIDIA GPU; "
                          f"use compile.dropout_masks=inductor")
    return setting in ("triton", "triton_bits")


def use_tuned_gemm(cfg: DictConfig, device: torch.device, graphs: bool) -> bool:
    """compile.tuned_gemm: null means where the training step is replayed as CUDA graphs (each tuned
    matmul's call costs host time, which only a graph hides) and cuBLASLt loads; asked for where it cannot
    run: ConfigError."""
    from seqcls import gemm
    setting = cfg.compile.tuned_gemm
    if setting is None:
        return graphs and gemm.supported(device)
    if setting and (cfg.distributed.strategy != "none" or not gemm.supported(device)):
        raise ConfigError("compile.tuned_gemm=true needs cuBLASLt on an NVIDIA GPU in one process (no FSDP2); "
                          "use compile.tuned_gemm=null")
    return bool(setting)


def tuned_gemm_cache(cfg: DictConfig) -> Optional[Path]:
    """compile.tuned_gemm_cache as a folder, or None for none."""
    from seqcls import gemm
    setting = cfg.compile.tuned_gemm_cache
    if setting is None:
        return gemm.default_cache_dir()
    return None if setting.strip().lower() == "none" else Path(setting)  # gemm.enable expands a ~


def use_packing(cfg: DictConfig, device: torch.device, amp_dtype: Optional[torch.dtype],
                model: torch.nn.Module) -> Optional[int]:
    """compile.pack_sequences: packs the model's training sequences (seqcls.models.pack_sequences) and
    returns the position id of a sequence's first token for the PackCollator, or None when batches stay
    padded. null: on under bf16/fp16 autocast on a GPU that runs FlashAttention's kernels, with the
    default collator and HF's sdpa attention (model.attn_implementation=eager asks for eager attention),
    where the model qualifies."""
    from seqcls.models import flash_varlen_supported, pack_sequences, packed_position_offset
    setting = cfg.compile.pack_sequences
    default_collator = cfg.dataloader.collate_fn.get("_target_") == "seqcls.data.PadCollator"
    if setting is None:
        config = getattr(model, "config", None)
        head_dim = getattr(config, "hidden_size", 0) // max(1, getattr(config, "num_attention_heads", 1))
        if not (amp_dtype in (torch.bfloat16, torch.float16) and default_collator
                and getattr(config, "_attn_implementation", None) == "sdpa" and flash_varlen_supported(device, head_dim)):
            return None
    elif not setting:
        return None
    elif not default_collator:
        raise ConfigError("compile.pack_sequences=true replaces the training collator, and dataloader.collate_fn "
                          "names another; drop one of the two")
    # The longest packed sequence: an example (truncated to dataset.max_length) or the filler (at most pack_bucket).
    longest = max(cfg.dataset.max_length, cfg.compile.pack_bucket)
    if not pack_sequences(model, longest, cfg.compile.varlen_kernel):
        if setting:
            raise ConfigError("compile.pack_sequences=true needs a BERT-family encoder (bert, roberta, xlm-roberta, "
                              "electra, camembert) with sdpa or eager attention and model.first_token_last_layer=true; "
                              "set compile.pack_sequences=null")
        return None
    dropout = getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0.0)
    if cfg.compile.varlen_kernel == "efficient" and dropout:
        raise ConfigError(f"compile.varlen_kernel=efficient needs a model without attention dropout (it has "
                          f"{dropout}): on packed sequences that kernel draws one dropout mask for all heads and "
                          f"its backward another; "
                          f"use compile.varlen_kernel=auto, or +model.config_overrides.attention_probs_dropout_prob=0")
    if cfg.compile.varlen_kernel == "short":
        from seqcls import short_attention
        if not short_attention.available():
            raise ConfigError("compile.varlen_kernel=short needs Triton, which is not installed; "
                              "pip install triton, or use compile.varlen_kernel=auto")
        if longest > max(short_attention.TILES):
            raise ConfigError(f"compile.varlen_kernel=short takes sequences of up to {max(short_attention.TILES)} "
                              f"tokens, and dataset.max_length is {cfg.dataset.max_length} (compile.pack_bucket "
                              f"{cfg.compile.pack_bucket}); lower them or use compile.varlen_kernel=auto")
    log.info("training on packed sequences (no padding; attention within each sequence)")
    return packed_position_offset(model)


def use_step_graphs(cfg: DictConfig, device: torch.device, dist_info: DistInfo,
                    attn_implementation: Optional[str], amp_dtype: Optional[torch.dtype] = None) -> bool:
    """compile.cuda_graphs=step applies to one CUDA process training with AdamW or Adam, and a model
    whose attention kernel (``model.config._attn_implementation``: HF picks eager itself for models
    without sdpa) can be captured."""
    if cfg.compile.cuda_graphs != "step" or device.type != "cuda":
        return False
    why = None
    if cfg.distributed.strategy != "none" or dist_info.world_size > 1:
        why = "FSDP2 and several processes run their collectives outside graphs"
    elif cfg.optimizer._target_ not in ADAM_TARGETS:
        why = f"{cfg.optimizer._target_} has no capturable fused update"
    elif amp_dtype == torch.float16:
        why = "fp16's loss scaling decides on the host whether a step is taken"
    elif cfg.distributed.activation_checkpointing:
        why = "the step graphs are not built for activation checkpointing's recompute in the backward"
    elif attn_implementation == "eager":
        why = "HF's eager attention builds its mask with a host-to-GPU copy, which a graph cannot hold (use sdpa)"
    if why:
        log.info("compile.cuda_graphs=step left out: %s", why)
        return False
    return True


def use_lazy_rows(cfg: DictConfig, model, device: torch.device, master_weights: bool,
                  plan: dict[str, int], graphs: bool = False) -> Optional[dict]:
    """compile.lazy_embedding_update: the trained fp32 word embeddings -> the most steps between flushes (the
    run's), for MasterWeightAdamW. null: where it applies under the step graphs; true where it cannot apply:
    one clear error."""
    setting = cfg.compile.lazy_embedding_update
    if setting is False or (setting is None and not graphs):
        return None
    from seqcls.dropout import supported as dropout_kernel_supported  # Triton's reach: NVIDIA GPUs
    weight = model.get_input_embeddings().weight
    why = None
    if not master_weights:
        why = "the master-weight optimizer (compile.bf16_master_weights with bf16 autocast, one process, AdamW/Adam)"
    elif not dropout_kernel_supported(device):
        why = "Triton on an NVIDIA GPU"
    elif not weight.requires_grad or weight.dtype != torch.float32:
        why = "trained fp32 word embeddings (full fine-tuning)"
    elif cfg.compile.enabled and cfg.compile.scope != "blocks":
        why = "compile.scope=blocks (the embedding's forward hook runs outside the compiled blocks)"
    if why:
        if setting is None:
            return None
        raise ConfigError(f"compile.lazy_embedding_update=true needs {why}; use compile.lazy_embedding_update=false")
    log.info("the word embeddings' AdamW updates the rows each step touches, the rest lazily "
             "(compile.lazy_embedding_update)")
    return {weight: plan["total_steps"] + 1}


def compile_model(model: torch.nn.Module, *, mode: str, per_block: bool, dynamic: Optional[bool],
                  combo_kernels: bool = False, options: Optional[dict] = None) -> torch.nn.Module:
    """Compile in place (nn.Module.compile): parameters, state-dict keys and .config stay as they are.

    ``per_block``: each transformer block is compiled on its own (under FSDP2, between the all-gathers
    its hooks issue; CUDA graphs are left out there: collectives inside a graph need more care than this).
    The blocks run one code object, so it is compiled once for all of them, not once per block.
    ``options``: inductor settings on top of the mode's (compile.inductor_options).
    """
    # One graph per (length bucket, train/eval) and, per block, all blocks share one code object:
    # the default limit of 8 compiled variants would send the rest back to eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    blocks = []
    if per_block:
        from seqcls.distributed import find_transformer_blocks
        blocks = find_transformer_blocks(model)
    # torch.compile takes a mode or inductor options, not both: the mode's own options, plus ours.
    extra = {"combo_kernels": True} if combo_kernels else {}
    if options:
        from torch._inductor import list_options
        unknown = sorted(set(options) - set(list_options()))
        if unknown:
            raise ConfigError(f"compile.inductor_options: {', '.join(unknown)} "
                              f"{'is not an inductor setting' if len(unknown) == 1 else 'are not inductor settings'} "
                              f"of torch {torch.__version__} (torch._inductor.list_options() lists them); fix or drop "
                              f"{'it' if len(unknown) == 1 else 'them'}")
        extra.update(options)
    if extra:
        from torch._inductor import list_mode_options
        how = {"options": {**list_mode_options(mode, dynamic), **extra}}
    else:
        how = {"mode": mode}
    for module in blocks or [model]:
        module.compile(dynamic=dynamic, **how)
    return model


def step_plan(cfg: DictConfig, num_train: int, dist_info: DistInfo) -> dict[str, int]:
    """Accumulation and step counts; a non-divisible batch combination is an error."""
    sc = cfg.step_scheduler
    dp = dist_info.world_size
    if sc.global_batch_size % (sc.local_batch_size * dp) != 0:
        raise ConfigError(f"step_scheduler.global_batch_size={sc.global_batch_size} is not divisible by "
                          f"local_batch_size={sc.local_batch_size} x data-parallel size={dp}; pick sizes that divide")
    accum = sc.global_batch_size // (sc.local_batch_size * dp)
    batches_per_rank = (num_train // dp) // sc.local_batch_size
    steps_per_epoch = batches_per_rank // accum
    if steps_per_epoch == 0:
        raise ConfigError(f"the training split has {num_train} examples, fewer than one global batch of "
                          f"{sc.global_batch_size}; lower step_scheduler.global_batch_size")
    total = sc.max_steps if sc.max_steps is not None else steps_per_epoch * sc.num_epochs
    return {"grad_accum_steps": accum, "steps_per_epoch": steps_per_epoch, "total_steps": total}


def build_trainer(cfg: DictConfig, run_dir: Path) -> Trainer:
    check_targets(cfg, list(cfg.allowed_target_prefixes))
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cpu" and cfg.cpu_keep_freed_memory:
        from seqcls.env import keep_freed_memory
        if keep_freed_memory():
            log.info("malloc keeps freed memory for reuse (cpu_keep_freed_memory)")
    # fsdp2 in one process without a launcher still shards (over a one-rank group), so that a
    # single-GPU run takes the same code path as a multi-GPU one.
    dist_info = init_distributed(backend=cfg.dist_env.backend, timeout_minutes=cfg.dist_env.timeout_minutes,
                                 device=device, single_process_group=cfg.distributed.strategy == "fsdp2")
    try:
        return _assemble(cfg, run_dir, device, dist_info)
    except BaseException:
        shutdown_distributed(dist_info)  # a failed build leaves no process group behind
        raise


def _assemble(cfg: DictConfig, run_dir: Path, device: torch.device, dist_info: DistInfo) -> Trainer:
    # Hydra's time-stamped output dir can differ between ranks started a second apart: rank 0's wins.
    run_dir = Path(broadcast_object(str(run_dir), dist_info))
    if cfg.distributed.strategy == "none" and dist_info.world_size > 1:
        raise ConfigError(f"{dist_info.world_size} processes were launched but distributed=none; "
                          f"add distributed=fsdp2")
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)

    tokenizer = load_tokenizer(cfg.model.tokenizer_name_or_path or cfg.model.pretrained_model_name_or_path,
                               trust_remote_code=cfg.model.trust_remote_code)
    splits = build_datasets(cfg.dataset, tokenizer)
    plan = step_plan(cfg, len(splits["train"]), dist_info)

    # Same seed, same initialisation: the head is drawn after the data, independent of its size.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tokenizer)
    if cfg.distributed.activation_checkpointing:  # before FSDP2, whose hooks then run inside the checkpoint
        from seqcls.distributed import checkpoint_blocks
        if not (n := checkpoint_blocks(model)):
            raise ConfigError("distributed.activation_checkpointing=true: found no list of transformer blocks in "
                              "this model to checkpoint; set it to false")
        log.info("activation checkpointing: %d transformer blocks recompute their forward in the backward", n)
    if cfg.distributed.strategy == "fsdp2":  # after LoRA and freezing, before the optimizer sees the parameters
        from seqcls.distributed import apply_fsdp2
        model = apply_fsdp2(model, cfg.distributed, dist_info=dist_info, device=device)
    else:
        model.to(device)
    amp_dtype = autocast_dtype(cfg.precision, device)
    if amp_dtype == torch.float16 and cfg.distributed.strategy == "fsdp2":
        if cfg.precision != "auto":  # the schema refuses it too; this is for callers that skip its checks
            raise ConfigError("precision=fp16 is not built for distributed=fsdp2, whose gradients would need a "
                              "sharded loss scaler; use precision=bf16 (or auto) with FSDP2")
        log.info("precision=auto under FSDP2 autocasts to bf16 (fp16's loss scaling is not built for sharded "
                 "gradients), which this GPU runs without its own bf16 units")
        amp_dtype = torch.bfloat16
    if cfg.distributed.strategy == "fsdp2" and cfg.distributed.param_dtype == "float16" and device.type == "cuda":
        log.warning("distributed.param_dtype=float16 computes in fp16 without loss scaling: small gradients may "
                    "flush to zero; bfloat16 does not need it")
    compiled = use_compile(cfg, device)
    if device.type == "cpu" and not compiled:  # compiled code draws its own dropout masks
        from seqcls.models import rand_dropout
        rand_dropout(model)
    if use_triton_masks(cfg, device, compiled):
        from seqcls import dropout
        packed = cfg.compile.dropout_masks == "triton_bits"
        log.info("%d dropouts draw their masks from seqcls's Triton kernel%s",
                 dropout.mask_dropout(model, packed=packed), " (8 entries a byte)" if packed else "")
    if cfg.compile.bf16_residual and amp_dtype == torch.bfloat16:
        from seqcls.models import autocast_layernorms
        log.info("%d LayerNorms return bf16 under autocast (a bf16 residual stream)", autocast_layernorms(model))
    if cfg.peft.enabled and cfg.compile.bf16_frozen_weights and amp_dtype == torch.bfloat16 \
            and cfg.distributed.strategy == "none":
        # Autocast runs the Linear matmuls (and the LayerNorms above) in bf16 anyway: frozen fp32 copies of
        # their weights and biases only cost memory, bandwidth and a cast kernel each per step.
        # Embeddings, which autocast keeps in fp32, stay fp32.
        from seqcls.models import bf16_read_parameters
        for p in bf16_read_parameters(model):
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if cfg.model.fuse_frozen_qkv and cfg.distributed.strategy == "none":  # after the last .to() and dtype change
        from seqcls.models import fuse_frozen_qkv
        if fused := fuse_frozen_qkv(model, merge_adapters=cfg.peft.enabled and cfg.peft.merge_qkv):
            log.info("query/key/value computed by one matrix multiply in %d attention blocks", fused)
    pack_offset = use_packing(cfg, device, amp_dtype, model)  # None: batches stay padded
    # MasterWeightAdamW takes AdamW's and Adam's usual hyperparameters, not amsgrad, foreach and the like.
    # Under LoRA the trainable Linears are the adapters and the head: for roberta-large ~100 small tensors,
    # whose casts were ~190 kernels a step.
    master_weights = (cfg.compile.bf16_master_weights and amp_dtype == torch.bfloat16
                      and cfg.distributed.strategy == "none" and cfg.optimizer._target_ in ADAM_TARGETS
                      and set(cfg.optimizer) <= {"_target_", "_partial_", "lr", "betas", "eps", "weight_decay"})
    masters = None
    if master_weights:  # before the optimizer, which takes the fp32 weights as its masters
        from seqcls.optim import use_bf16_weights
        masters = use_bf16_weights(model)
        log.info("%d trainable Linear/LayerNorm tensors trained in bf16 with fp32 masters in the optimizer",
                 len(masters))
    params = [p for p in model.parameters() if p.requires_grad]
    opt_kwargs = {}
    if cfg.optimizer._target_ in ADAM_TARGETS and cfg.distributed.strategy == "none":
        # One kernel for the whole update instead of several per tensor: on 2 CPU cores MiniLM's AdamW
        # step takes 20 ms fused against 156 ms in the default loop (docs/benchmarks.md).
        opt_kwargs["fused"] = True
    graphs = compiled and use_step_graphs(cfg, device, dist_info,
                                          getattr(model.config, "_attn_implementation", None), amp_dtype)
    if graphs:  # the update inside a CUDA graph: step counts and the learning rate live on the device
        opt_kwargs.update(capturable=True, lr=torch.tensor(float(cfg.optimizer.lr), device=device))
    from seqcls import gemm
    gemm.enable(use_tuned_gemm(cfg, device, graphs), cache_dir=tuned_gemm_cache(cfg))
    if gemm.ENABLED:
        from seqcls.models import tuned_linears
        log.info("%d encoder Linears (and any fused query/key/value) multiply through cuBLASLt's algorithm "
                 "timed fastest per shape", tuned_linears(model))
    if cfg.compile.gelu_epilogue and not gemm.ENABLED:
        raise ConfigError("compile.gelu_epilogue=true needs the tuned matrix multiplies (compile.tuned_gemm on, "
                          "a CUDA GPU); use compile.gelu_epilogue=null")
    if gemm.ENABLED and cfg.compile.gelu_epilogue is not False:
        from seqcls.models import gelu_epilogue_mlps
        # null: where the feed-forward is frozen (LoRA): on an H100 LoRA b256 trained 5.5% faster, full FT b32
        # 2.3% slower (the unfused backward sums the bias gradient in GELU's own pass), 1.1% with that sum in
        # the weight gradient's epilogue (gemm.mm_bgrad)
        log.info("%d encoder feed-forwards run GELU (tanh form) in cuBLASLt's matrix multiply epilogues",
                 gelu_epilogue_mlps(model, trained=cfg.compile.gelu_epilogue is True))
    if cfg.compile.update_kernel == "triton" and not (master_weights and graphs and device.type == "cuda"):
        raise ConfigError("compile.update_kernel=triton needs the master-weight update inside the step graphs "
                          "(bf16 autocast on an NVIDIA GPU, compile.cuda_graphs=step, one process); "
                          "use compile.update_kernel=inductor")
    lazy_rows = use_lazy_rows(cfg, model, device, master_weights, plan, graphs)
    if master_weights:
        from seqcls.optim import MasterWeightAdamW, weight_buckets
        opt_kwargs.pop("fused")
        hyper = {k: v for k, v in cfg.optimizer.items() if k not in ("_target_", "_partial_")}
        optimizer = MasterWeightAdamW(params, **{**hyper, **opt_kwargs}, masters=masters, compiled=graphs,
                                      lazy_rows=lazy_rows,
                                      buckets=weight_buckets(model, list(masters)),
                                      grads_in_place=cfg.compile.update_reads_grads if graphs else False,
                                      kernel=cfg.compile.update_kernel if graphs else "inductor",
                                      decoupled_weight_decay=cfg.optimizer._target_ == "torch.optim.AdamW")
        if lazy_rows:  # the rows a batch looks up take the steps they owe before its forward reads them
            embedding = model.get_input_embeddings()
            embedding.register_forward_pre_hook(optimizer.catch_up_hook(embedding.weight))
    else:
        optimizer = instantiate(cfg.optimizer)(params, **opt_kwargs)
    if compiled:
        sharded = cfg.distributed.strategy == "fsdp2"
        mode = cfg.compile.mode
        if sharded and mode in ("reduce-overhead", "max-autotune"):
            mode = "max-autotune-no-cudagraphs" if "autotune" in mode else "default"
        model = compile_model(model, mode=mode, per_block=sharded or cfg.compile.scope == "blocks",
                              dynamic=cfg.compile.dynamic, combo_kernels=use_combo_kernels(cfg, device),
                              options=flat_options(cfg.compile.inductor_options))
    elif cfg.compile.inductor_options:
        log.warning("compile.inductor_options is set but nothing is compiled (compile.enabled resolved to false "
                    "on %s): add compile.enabled=true for it to apply", device.type)
    lr_lambda = instantiate(cfg.lr_scheduler)(plan["total_steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    bucket = cfg.compile.length_bucket if compiled else None
    if pack_offset is not None:
        collate = data_lib.PackCollator(tokenizer.pad_token_id, position_offset=pack_offset,
                                        pad_to_multiple_of=cfg.compile.pack_bucket)
    else:
        collate = instantiate(cfg.dataloader.collate_fn)(pad_token_id=tokenizer.pad_token_id,
                                                         pad_to_multiple_of=bucket)
    group_by_length = cfg.dataloader.group_by_length
    batch_sampler = data_lib.GlobalBatchSampler(
        [len(x) for x in splits["train"]["input_ids"]], local_batch_size=cfg.step_scheduler.local_batch_size,
        grad_accum_steps=plan["grad_accum_steps"], rank=dist_info.rank, world_size=dist_info.world_size,
        seed=cfg.seed, group_by_length=pack_offset is None if group_by_length is None else group_by_length)
    loader_kwargs, vkwargs = (loader_kwargs_of(c, device) for c in (cfg.dataloader, cfg.validation_dataloader))
    train_loader = get_method(cfg.dataloader._target_)(
        # Plain Python rows: indexing an Arrow-backed dataset row by row costs more than the GPU step.
        splits["train"].to_list(), batch_sampler=batch_sampler, collate_fn=collate,
        # Its own generator: creating an iterator draws a worker seed, which must not move the global
        # RNG that dropout uses (a resumed run creates its iterator at another point than the original).
        generator=torch.Generator().manual_seed(cfg.seed), **loader_kwargs)
    vcollate = instantiate(cfg.validation_dataloader.collate_fn)(pad_token_id=tokenizer.pad_token_id,
                                                                 pad_to_multiple_of=bucket)
    val_loaders = {
        name: get_method(cfg.validation_dataloader._target_)(
            splits[name].to_list(), batch_size=cfg.step_scheduler.local_batch_size,
            sampler=data_lib.ShardSampler(len(splits[name]), dist_info.rank, dist_info.world_size),
            collate_fn=vcollate, **vkwargs)
        for name in cfg.dataset.validation_splits}

    best_metric = cfg.checkpoint.best_metric or main_metric(cfg.dataset.task, cfg.dataset.num_labels)
    weights, multi_label = None, cfg.dataset.task == "multi_label"
    if cfg.dataset.num_labels > 1:
        from seqcls.trainer import class_weights
        weights = class_weights(cfg.loss.class_weights, splits["train"]["labels"], cfg.dataset.num_labels,
                                multi_label=multi_label)
        if weights is not None and dist_info.is_writer:
            log.info("class weights in the loss: %s", ", ".join(f"{w:.4g}" for w in weights))
    checkpointer = None
    if cfg.checkpoint.enabled:
        lora = None
        if cfg.peft.enabled:
            lora = {"scale": cfg.peft.alpha / cfg.peft.dim,
                    "adapter": dict(base_model_name_or_path=cfg.model.pretrained_model_name_or_path,
                                    dim=cfg.peft.dim, alpha=cfg.peft.alpha, dropout=cfg.peft.dropout,
                                    target_modules=list(cfg.peft.target_modules),
                                    modules_to_save=list(cfg.peft.modules_to_save))}
        checkpointer = Checkpointer(
            Path(cfg.checkpoint.checkpoint_dir or run_dir / "checkpoints"), dist_info=dist_info, tokenizer=tokenizer,
            save_consolidated=cfg.checkpoint.save_consolidated, keep_last_k=cfg.checkpoint.keep_last_k, lora=lora,
            fingerprint=fingerprint(cfg))
    trainer = Trainer(
        model=model, train_loader=train_loader, val_loaders=val_loaders, optimizer=optimizer, scheduler=scheduler,
        device=device, dist_info=dist_info, run_dir=run_dir, task=cfg.dataset.task, num_labels=cfg.dataset.num_labels,
        grad_accum_steps=plan["grad_accum_steps"], local_batch_size=cfg.step_scheduler.local_batch_size,
        steps_per_epoch=plan["steps_per_epoch"], total_steps=plan["total_steps"],
        num_epochs=cfg.step_scheduler.num_epochs, log_every_steps=cfg.step_scheduler.log_every_steps,
        val_every_steps=cfg.step_scheduler.val_every_steps, ckpt_every_steps=cfg.step_scheduler.ckpt_every_steps,
        max_grad_norm=cfg.step_scheduler.max_grad_norm, autocast_dtype=amp_dtype,
        best_metric=best_metric, checkpointer=checkpointer, cuda_graphs=graphs,
        capture_ahead=cfg.compile.capture_ahead,
        early_stopping_patience=cfg.step_scheduler.early_stopping_patience,
        early_stopping_threshold=cfg.step_scheduler.early_stopping_threshold,
        class_weights=weights, label_smoothing=cfg.loss.label_smoothing, multi_label=multi_label,
        loggers=build_loggers(cfg, run_dir=run_dir, is_writer=dist_info.is_writer))
    if checkpointer is not None:
        resume(trainer, checkpointer, cfg.checkpoint.restore_from, run_dir)
    return trainer


def resume(trainer: Trainer, checkpointer: Checkpointer, restore_from: Optional[str], run_dir: Path) -> None:
    """Continue from a checkpoint; never start a fresh run over one that exists."""
    path = checkpointer.find(restore_from)
    if path is None:
        if restore_from in (None, "none", "null") and read_pointer(checkpointer.root, "LATEST") is not None:
            raise ConfigError(f"{checkpointer.root} already holds checkpoints and checkpoint.restore_from=none; "
                              f"pass a new run_dir, or checkpoint.restore_from=latest to resume")
        if trainer.dist.is_writer and (run_dir / "metrics.jsonl").exists():
            # A run that died before its first checkpoint: keep its rows aside, start clean.
            set_aside_metrics(run_dir, after_step=-1)
        return
    checkpointer.load(trainer, path)
    if trainer.dist.is_writer:
        set_aside_metrics(run_dir, after_step=trainer.step)


def set_aside_metrics(run_dir: Path, *, after_step: int) -> None:
    """Move metrics.jsonl rows past the resumed step to metrics.discarded.jsonl (they are redone)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep, drop = [], []
    for line in path.read_text().splitlines():
        (keep if json.loads(line)["step"] <= after_step else drop).append(line + "\n")
    if drop:
        with open(run_dir / "metrics.discarded.jsonl", "a") as f:
            f.writelines(drop)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: the model and its label space (for a checkpoint from
    before a key was kept, seqcls.checkpoint.saved_fingerprint fills it in where the checkpoint tells)."""
    return {"model": cfg.model.pretrained_model_name_or_path or cfg.model.model_type,
            "num_labels": cfg.dataset.num_labels, "peft": bool(cfg.peft.enabled),
            "lora_dim": cfg.peft.dim if cfg.peft.enabled else None,
            "multi_label": cfg.dataset.task == "multi_label"}
