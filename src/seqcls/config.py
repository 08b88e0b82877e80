"""Typed schemas for the run config, registered in Hydra's ConfigStore.

conf/train.yaml puts ``train_schema`` first in its defaults list, so every group option is
merged into these dataclasses: an unknown key or a wrong type fails at composition time with
the key's name in the message, and the checks in ``__post_init__`` reject impossible values.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from seqcls.errors import ConfigError  # noqa: F401  (re-exported: seqcls.config.ConfigError)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def flat_options(options: Any, prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted names: {triton: {max_tiles: 2}} -> {"triton.max_tiles": 2} (what a
    command-line ``+compile.inductor_options.triton.max_tiles=2`` composes to, as torch.compile names it)."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        if hasattr(value, "items"):
            flat.update(flat_options(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass
class StepSchedulerConfig:
    global_batch_size: int = 32
    """Samples per optimizer step, across all data-parallel ranks and accumulation steps."""
    local_batch_size: int = 32
    """Samples per forward pass on one rank."""
    num_epochs: int = 1
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides num_epochs when set)."""
    val_every_steps: Optional[int] = None
    """Validate every N optimizer steps; validation always runs at the end."""
    ckpt_every_steps: Optional[int] = None
    """Checkpoint every N optimizer steps; a checkpoint is always written at the end."""
    log_every_steps: int = 10
    """How often a train row goes to metrics.jsonl."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this value (null: no clipping)."""
    early_stopping_patience: Optional[int] = None
    """Stop once this many validations in a row have not improved checkpoint.best_metric (by more than
    early_stopping_threshold), after saving a checkpoint; needs val_every_steps. Each validation that sets a
    new best is checkpointed too, so BEST holds the best model. null: train to the end."""
    early_stopping_threshold: float = 0.0
    """How much a validation must improve on the best so far to count as an improvement."""

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "local_batch_size", "num_epochs", "log_every_steps"):
            _check(getattr(self, name) > 0, f"step_scheduler.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_steps", "val_every_steps", "ckpt_every_steps"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"step_scheduler.{name} must be > 0 or null, got {v}")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0,
               f"step_scheduler.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        _check(self.early_stopping_patience is None or self.early_stopping_patience > 0,
               f"step_scheduler.early_stopping_patience must be > 0 or null, got {self.early_stopping_patience}")
        _check(self.early_stopping_threshold >= 0,
               f"step_scheduler.early_stopping_threshold must be >= 0, got {self.early_stopping_threshold}")
        _check(self.early_stopping_patience is None or self.val_every_steps is not None,
               "step_scheduler.early_stopping_patience counts validations: set step_scheduler.val_every_steps too")


@dataclass
class ModelConfig:
    _target_: str = "seqcls.models.from_pretrained"
    pretrained_model_name_or_path: Optional[str] = None
    """Hub id or local directory of a Hugging Face model."""
    tokenizer_name_or_path: Optional[str] = None
    """Defaults to pretrained_model_name_or_path."""
    model_type: Optional[str] = None
    """For seqcls.models.from_config: the architecture (bert, roberta, ...)."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of the HF model config to set (tiny models for tests)."""
    num_labels: int = 2
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you trust the model's author."""
    first_token_last_layer: bool = True
    """BERT-family encoders (bert, roberta, xlm-roberta, electra, camembert), whose head reads the first
    token only: compute the last layer for that token alone (same logits, less arithmetic)."""
    attn_implementation: Optional[str] = None
    """Hugging Face's attention kernel: null (HF's default, sdpa), sdpa, eager, or another that HF knows
    (flash_attention_2 needs its package). Under CUDA graphs, eager leaves the graphs out (its mask is
    built with a host-to-GPU copy)."""
    fuse_frozen_qkv: bool = True
    """The same encoders, where query/key/value weights are frozen (LoRA on attention, or a frozen
    base), one process: one matrix multiply for all three instead of three (same values; LoRA terms
    still added, their adapters merged per peft.merge_qkv)."""

    def __post_init__(self) -> None:
        _check(self.num_labels >= 1, f"model.num_labels must be >= 1, got {self.num_labels}")


TASKS = ("classification", "multi_label", "regression", "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli",
         "rte", "wnli")
"""What dataset.task may name: the metric family (and, multi_label, the loss and the label format)."""


@dataclass
class DatasetConfig:
    _target_: str = "seqcls.data.load_glue"
    task: str = "classification"
    """Metric family: a GLUE task name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli),
    'classification' (accuracy, + macro-F1 when num_labels > 2), 'regression', or 'multi_label' (any
    number of the num_labels labels an example, each a yes/no: sigmoid outputs, binary cross-entropy;
    micro-F1, macro-F1 and exact-match accuracy)."""
    label_separator: str = ","
    """multi_label: what joins an example's labels in a csv/tsv cell ("sports,politics"; JSON lines and
    parquet may hold a list instead)."""
    num_labels: int = 2
    labels: Optional[list[str]] = None
    """Label names in class-index order; needed when the data holds string labels."""
    text_fields: list[str] = field(default_factory=lambda: ["sentence"])
    label_field: str = "label"
    max_length: int = 128
    """Truncate tokenised inputs to this many tokens (batches are padded to their longest)."""
    path: Optional[str] = None
    """Hub dataset id for datasets.load_dataset (e.g. nyu-mll/glue)."""
    name: Optional[str] = None
    """Hub dataset config name (e.g. mrpc)."""
    data_dir: Optional[str] = None
    """Local folder with GLUE's TSV files (train.tsv, dev.tsv, test.tsv): the offline path."""
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    column_names: Optional[list[str]] = None
    """Column names for headerless csv/tsv files."""
    train_split: str = "train"
    validation_splits: list[str] = field(default_factory=lambda: ["validation"])
    """Evaluated at every validation; the first one decides the best checkpoint."""
    test_split: Optional[str] = "test"
    limit_train_samples: Optional[int] = None
    """Use only the first N training examples (quick runs)."""

    def __post_init__(self) -> None:
        _check(self.num_labels >= 1, f"dataset.num_labels must be >= 1, got {self.num_labels}")
        _check(1 <= len(self.text_fields) <= 2,
               f"dataset.text_fields takes one or two column names, got {list(self.text_fields)}")
        _check(self.max_length > 0, f"dataset.max_length must be > 0, got {self.max_length}")
        _check(len(self.validation_splits) >= 1, "dataset.validation_splits needs at least one split name")
        _check(self.task in TASKS, f"dataset.task={self.task!r} is not a task seqcls knows; use one of {', '.join(TASKS)}")
        _check(self.task not in ("regression", "stsb") or self.num_labels == 1,
               f"dataset.task={self.task} predicts one number a text: set dataset.num_labels=1")
        _check(self.labels is None or len(self.labels) == self.num_labels,
               f"dataset.labels has {len(self.labels or [])} names for dataset.num_labels={self.num_labels}; "
               f"make them agree")
        _check(self.task != "multi_label" or self.num_labels >= 2,
               f"dataset.task=multi_label needs dataset.num_labels >= 2 (one output a label), got {self.num_labels}")
        _check(self.task != "multi_label" or len(self.label_separator) > 0, "dataset.label_separator is empty")


@dataclass
class DataloaderConfig:
    _target_: str = "torchdata.stateful_dataloader.StatefulDataLoader"
    collate_fn: Any = field(default_factory=lambda: {"_target_": "seqcls.data.PadCollator", "_partial_": True})
    num_workers: int = 0
    pin_memory: Optional[bool] = None
    """null: pinned host memory when training on CUDA (asynchronous copies to the GPU)."""
    persistent_workers: bool = False
    group_by_length: Optional[bool] = None
    """Training batches hold examples of similar length (less padding); validation ignores it. null: on,
    unless sequences are packed (compile.pack_sequences), where there is no padding to save and
    batches of mixed lengths give packed rows of similar size (few shapes)."""


@dataclass
class OptimizerConfig:
    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 2e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optimizer.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class LRSchedulerConfig:
    _target_: str = "seqcls.trainer.warmup_decay_lambda"
    _partial_: bool = True
    decay: str = "linear"
    """linear, cosine or constant after warm-up."""
    warmup_ratio: float = 0.0
    """Fraction of the total steps spent warming up linearly from 0."""
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check(self.decay in ("linear", "cosine", "constant"),
               f"lr_scheduler.decay must be linear, cosine or constant, got {self.decay!r}")
        _check(0 <= self.warmup_ratio < 1, f"lr_scheduler.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class PeftConfig:
    enabled: bool = False
    target_modules: list[str] = field(default_factory=list)
    """Globs over module names, e.g. ['*.query', '*.value']."""
    exclude_modules: list[str] = field(default_factory=list)
    match_all_linear: bool = False
    dim: int = 8
    alpha: float = 16
    dropout: float = 0.0
    modules_to_save: list[str] = field(default_factory=lambda: ["classifier", "score"])
    merge_qkv: bool = True
    """Where query/key/value are one matmul (model.fuse_frozen_qkv), their adapters share one input
    dropout mask, one A matmul and one B matmul, as in the original LoRA code's MergedLinear (fewer
    kernels); false: each adapter draws its own mask, as peft does. Without dropout the two give the same
    values."""

    def __post_init__(self) -> None:
        _check(self.dim > 0, f"peft.dim must be > 0, got {self.dim}")
        _check(0 <= self.dropout < 1, f"peft.dropout must be in [0, 1), got {self.dropout}")
        if self.enabled:
            _check(bool(self.target_modules) or self.match_all_linear,
                   "peft.target_modules is empty: set globs such as ['*.query','*.value'] or peft.match_all_linear=true")


@dataclass
class DistEnvConfig:
    backend: str = "auto"
    """auto (nccl on CUDA, gloo on CPU), nccl or gloo."""
    timeout_minutes: int = 10


@dataclass
class DistributedConfig:
    strategy: str = "none"
    """none (one process, no sharding) or fsdp2."""
    dp_size: Optional[int] = None
    """Shard group size; null: world size / dp_replicate_size."""
    dp_replicate_size: int = 1
    """> 1 is HSDP: replicate across groups of dp_size ranks."""
    tp_size: int = 1
    cp_size: int = 1
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    """Keep only each transformer block's input for the backward, which recomputes the block: activation
    memory of one block instead of all, for about one more forward's compute a step. With or without FSDP2."""
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward (re-gathered in backward): less memory,
    one more all-gather per block. false keeps them until backward."""
    param_dtype: Optional[str] = "bfloat16"
    """FSDP2 mixed-precision parameter dtype on GPU (fp32 on CPU); null: the parameters' own (fp32)."""
    reduce_dtype: Optional[str] = "float32"
    """Dtype of the gradient reduce-scatter/all-reduce on GPU (fp32 on CPU); null: param_dtype."""

    def __post_init__(self) -> None:
        _check(self.strategy in ("none", "fsdp2"),
               f"distributed.strategy must be none or fsdp2, got {self.strategy!r}")
        _check(self.tp_size == 1, f"distributed.tp_size={self.tp_size}: tensor parallelism is not built yet; set tp_size=1")
        _check(self.cp_size == 1, f"distributed.cp_size={self.cp_size}: context parallelism is not built yet; set cp_size=1")
        _check(self.dp_replicate_size >= 1, f"distributed.dp_replicate_size must be >= 1, got {self.dp_replicate_size}")
        _check(self.dp_size is None or self.dp_size >= 1, f"distributed.dp_size must be >= 1 or null, got {self.dp_size}")
        for name in ("param_dtype", "reduce_dtype"):
            _check(getattr(self, name) in (None, "bfloat16", "float16", "float32"),
                   f"distributed.{name} must be bfloat16, float16, float32 or null, got {getattr(self, name)!r}")


@dataclass
class CheckpointConfig:
    enabled: bool = True
    checkpoint_dir: Optional[str] = None
    """Defaults to <run_dir>/checkpoints."""
    model_save_format: str = "safetensors"
    save_consolidated: bool = True
    """Write a Hugging Face directory (config, tokenizer, model.safetensors) at each checkpoint."""
    restore_from: Optional[str] = "latest"
    """latest (resume if the run dir has a checkpoint), a checkpoint path, or none."""
    keep_last_k: Optional[int] = 2
    best_metric: Optional[str] = None
    """Validation metric that picks BEST (and that early stopping watches): one of the task's metrics, or
    loss (lower is better); null: the task's main metric."""

    def __post_init__(self) -> None:
        _check(self.model_save_format == "safetensors",
               f"checkpoint.model_save_format={self.model_save_format!r}: only safetensors is supported")
        _check(self.keep_last_k is None or self.keep_last_k >= 1,
               f"checkpoint.keep_last_k must be >= 1 or null, got {self.keep_last_k}")


@dataclass
class LossConfig:
    class_weights: Any = None
    """Cross-entropy weight of each class: null (all 1), balanced (n / (num_labels x the class's count) over
    the training split, as scikit-learn's class_weight='balanced'), or a list of num_labels weights in label
    order. Under dataset.task=multi_label, each label's weight of its positive examples (pos_weight);
    balanced is then negatives / positives of each label. The training loss is the weighted sum over examples divided by their number; the validation
    loss stays plain cross-entropy (comparable between runs with other weights)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing of the training loss, in [0, 1)."""

    def __post_init__(self) -> None:
        w = self.class_weights
        _check(w is None or w == "balanced" or (isinstance(w, (list, tuple)) and len(w) > 0 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in w) and any(x > 0 for x in w)),
               f"loss.class_weights must be null, balanced or a list of weights >= 0 (not all 0), got {w!r}")
        _check(0.0 <= self.label_smoothing < 1.0,
               f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class LoggerConfig:
    backend: str = "none"
    """Where metrics rows go besides metrics.jsonl and TensorBoard (which every run writes):
    none, wandb or mlflow. The package is needed only when chosen."""
    project: Optional[str] = None
    """W&B project or MLflow experiment name; null: the tool's default."""
    entity: Optional[str] = None
    """W&B team or user; null: your default entity."""
    tracking_uri: Optional[str] = None
    """MLflow tracking server or folder; null: MLFLOW_TRACKING_URI, else ./mlruns."""
    run_name: Optional[str] = None
    """The run's name in the tracker; null: the run dir's name."""

    def __post_init__(self) -> None:
        _check(self.backend in ("none", "wandb", "mlflow"),
               f"logger.backend must be none, wandb or mlflow, got {self.backend!r}")


@dataclass
class CompileConfig:
    """The fast path on GPU: torch.compile over the model, the whole training step replayed as CUDA
    graphs, fed a few static sequence lengths (batches padded up to a multiple of length_bucket)."""
    enabled: Optional[bool] = None
    """null: on for CUDA, off on CPU (compilation there costs more than it saves on short runs)."""
    mode: str = "default"
    """torch.compile mode for the model. reduce-overhead and max-autotune capture CUDA graphs of their
    own: use them with cuda_graphs=none."""
    cuda_graphs: str = "step"
    """step: forward, backward, clipping and the optimizer update run as replayed CUDA graphs, one per
    batch shape (CUDA, one process, AdamW/Adam; elsewhere the step runs as it is). none: no graphs."""
    dynamic: Optional[bool] = None
    """null: torch.compile makes the changing length symbolic after the second shape, so a run compiles
    twice whatever its lengths (CUDA graphs are still one per shape); false: one compilation per shape
    (roberta-large: about a minute each); true: symbolic from the start."""
    scope: str = "blocks"
    """blocks: each transformer block is compiled on its own; the blocks share one compiled code, so a
    24-layer model compiles in a fraction of the time (roberta-large on an H200: 83 s for a whole
    benchmark run against 187 s), and under step graphs it trained faster too (docs/benchmarks.md).
    model: one graph for the whole model. Under FSDP2 blocks are always compiled on their own."""
    length_bucket: int = 8
    """Pad each batch to a multiple of this when compiled: few shapes, few graphs."""
    pack_sequences: Optional[bool] = None
    """Train on packed sequences: each batch's examples laid end to end with no padding, attention kept
    within each example by variable-length attention kernels (varlen_kernel), so every matrix multiply runs on
    real tokens only (seqcls.models.pack_sequences). For BERT-family encoders with
    model.first_token_last_layer. null: on under bf16/fp16 autocast on GPUs that run FlashAttention
    (NVIDIA, compute capability 8.0 or newer) with HF's sdpa attention, where the model qualifies;
    true elsewhere runs a reference attention whose memory grows with the square of the batch's tokens.
    Evaluation and prediction stay padded."""
    pack_bucket: int = 16
    """A packed batch is filled up to a multiple of this many tokens (few shapes, few graphs; less filler
    the smaller it is). On an H200, roberta-large b32 on MRPC: 16 ran LoRA 2.4-2.7% and full FT 1.5% faster
    than 64 at the same peak memory, since the graphs of all shapes share one memory pool and one
    side stream (docs/benchmarks.md)."""
    varlen_kernel: str = "auto"
    """The attention kernel of packed sequences (seqcls.models.varlen_attention). auto: seqcls's Triton
    kernel for short sequences (seqcls.short_attention: one program per sequence and head, up to 256
    tokens) where Triton runs (CUDA) and dataset.max_length <= 256; otherwise the memory-efficient kernel's
    varlen mode where the model has no attention dropout, FlashAttention's where it has. On an H200,
    roberta-large LoRA b256 on MRPC: 5,618 samples/s against 4,907 with FlashAttention's (docs/benchmarks.md).
    short: the Triton kernel (an error without Triton or above 256 tokens). efficient: the memory-efficient
    kernel (a model with attention dropout is an error: on packed sequences its forward draws one dropout
    mask for every head and every sequence of a length, and its backward another). flash: FlashAttention's."""
    capture_ahead: bool = True
    """With step graphs: capture the step of every batch shape the run will meet before its first step
    (the sampler's order is seeded, so the shapes are known), instead of at each shape's first use, where
    a capture stalls training for a moment (~0.2-0.3 s for roberta-large). The same training and the same
    graphs either way; false spreads the captures over the run. On an H200 (roberta-large b32, packed) the
    rate over a bench's timed steps then equals its median 10-step window (docs/benchmarks.md)."""
    combo_kernels: Optional[bool] = None
    """Inductor launches independent small kernels of a compiled block as one (its combo_kernels option),
    so a step launches fewer kernels. null: on for CUDA, off on CPU (where inductor's C++ kernels gain
    nothing from it). On an H200, roberta-large b32: LoRA +1.8%, full FT +1.1%, the same loss curve
    (docs/benchmarks.md)."""
    bf16_frozen_weights: bool = True
    """Under LoRA with bf16 autocast (one process), keep the frozen parameters that autocast reads only as
    bf16 in bf16: Linear weights and biases, and the LayerNorms of bf16_residual. The same training bit
    for bit, half the memory traffic, and no cast kernels each step. Embeddings stay fp32."""
    bf16_master_weights: bool = True
    """Training with bf16 autocast, one process, AdamW/Adam: keep the trainable Linear weights and biases
    (and the LayerNorms of bf16_residual) in bf16 with fp32 masters in the optimizer (seqcls.optim),
    instead of casting them to bf16 every forward and their gradients to fp32 every backward. Full
    fine-tuning: the whole model but the embeddings; LoRA: the adapters and the head. Same training up to
    float rounding order; the saved model and adapter hold the fp32 masters."""
    bf16_residual: bool = True
    """Under bf16 autocast: LayerNorms read and write bf16 (normalising in fp32 inside the kernel), so the
    residual stream between blocks is bf16 rather than fp32, as in a model loaded in bf16. Halves the
    memory traffic of the dropout + residual + LayerNorm passes. false: autocast's fp32 LayerNorms."""
    dropout_masks: str = "auto"
    """Where the hidden and LoRA dropouts' masks come from. inductor: the compiled code draws them itself
    (one Philox call per element, the integer work of which sets the time of the b256 kernels that hold
    those dropouts). triton: seqcls.dropout's Triton kernel writes each mask (8 entries a Philox call) and
    the compiled code multiplies it in (needs Triton on an NVIDIA GPU). auto: triton where the model is
    compiled on an NVIDIA GPU with Triton, else inductor. On an H200 (roberta-large LoRA b256): +3.6%
    samples/s (docs/benchmarks.md). triton_bits: the kernel packs 8 entries a byte and the compiled code
    unpacks them where it multiplies them in (an eighth of the mask traffic and memory: 0.26 GiB less at
    LoRA b256, but 2.6% slower on an H100, so not the default)."""
    update_reads_grads: Optional[bool] = None
    """With step graphs and bf16_master_weights: each bucket's compiled update reads the gradients where
    autograd left them (inductor's pointwise concatenation: a masked load per tensor in the update kernel)
    instead of copying them end to end first. The same arithmetic, one pass over the gradients less.
    null: in buckets of at most 32 tensors (roberta-large's full fine-tuning buckets, two blocks each),
    not in larger ones (LoRA's one bucket of ~100 small adapter tensors). On an H100 (roberta-large b32):
    full FT +1.3% (2,116 against 2,089 samples/s, two same-machine pairs), LoRA -0.25% when on
    (docs/benchmarks.md)."""
    update_kernel: str = "inductor"
    """With step graphs and bf16_master_weights, the kernel of each bucket's master-weight AdamW update.
    inductor: the compiled update (compile.update_reads_grads says where it reads the gradients). triton:
    seqcls.update_kernel, one program a block of one tensor reading the gradients where they lie through a
    table of their addresses (as torch's multi-tensor kernels do), with no copy of them and no masked load
    per tensor; the same arithmetic in the same order (masters and moments within one float rounding of
    the eager update's). Written to take full fine-tuning's buckets from ~2.5 TB/s (in place) to the
    ~2.95 TB/s inductor's kernel reaches on a flat copy, on an H100; there full FT b32 trained 1.2% slower
    with it (2,125 against 2,150-2,153 samples/s, one machine; docs/benchmarks.md), so it is not the default."""
    lazy_embedding_update: Optional[bool] = None
    """Full fine-tuning with bf16_master_weights on a CUDA GPU (Triton): the word embeddings' AdamW runs row
    by row, lazily (seqcls.update_kernel.LazyRows): a step updates only the rows its batch touched (a non-zero
    gradient), each first replaying the zero-gradient steps it skipped with their own step sizes; validation,
    checkpoints and the end of the run bring every row up to date first. The same training up to float
    rounding order (seqcls's fp32 AdamW arithmetic rather than torch's fused kernel's). On an H100 the
    embeddings' update went from 647 us to 132 us alone, and full FT b32 from 2,149 to 2,183-2,187 samples/s
    (+1.6%, docs/benchmarks.md). null: on where it applies and the step runs as CUDA graphs (the setting
    measured); true: wherever it applies (elsewhere an error); false: the dense fused AdamW."""
    tuned_gemm: Optional[bool] = None
    """The encoder's matrix multiplies (its Linears, the fused query/key/value and LoRA's merged one)
    through cuBLASLt with the algorithm picked by timing once per shape (seqcls.gemm) instead of torch's
    matmul, which takes the first algorithm of cuBLAS's heuristic. null: on where the training step is
    replayed as CUDA graphs (compile.cuda_graphs=step on an NVIDIA GPU), which hide the host time of each
    call through ctypes; true also elsewhere in one process. On an H100 (roberta-large LoRA b256, ~13,600 tokens) the
    fastest candidates ran a layer's eight forward and backward matrix multiplies in 8.7% less time than
    torch's picks, and LoRA b256 trained 0.7-0.85% faster (full FT b32 -0.3%); the timing is paid once per
    shape (a LoRA b256 bench run, every batch shape captured up front: 84-95 s against 62-67 s;
    docs/benchmarks.md)."""
    tuned_gemm_cache: Optional[str] = None
    """Where compile.tuned_gemm keeps each shape's choice for later runs (one small file a shape, named for
    the shape, the GPU model and cuBLASLt's and torch's versions): a later run takes it from there instead of
    timing the shape again, once it has checked the algorithm is still listed and still gives torch's
    product. null: $XDG_CACHE_HOME/seqcls/tuned_gemm (~/.cache/seqcls/tuned_gemm); none: keep nothing, time
    every shape in every run; a path: there (a folder on a shared file system serves a whole sweep). Delete
    the folder to time every shape again (after other jobs shared the GPU while it was timed, say)."""
    gelu_epilogue: Optional[bool] = None
    """With compile.tuned_gemm on and a GELU encoder (hidden_act gelu, gelu_new or gelu_pytorch_tanh): each
    layer's feed-forward runs its GELU in the first matrix multiply's cuBLASLt epilogue and the GELU's
    gradient in the second's backward one (seqcls.gemm.gelu_mlp), instead of passes of their own over the
    (tokens, 4 x hidden) activations. cuBLASLt's GELU is the tanh form: for hidden_act=gelu (erf) the
    outputs differ by at most 4.7e-4, a sixteenth of bf16's rounding there. Each shape still times torch's
    unfused kernels against the epilogue's algorithms and keeps the faster. null: with compile.tuned_gemm,
    in layers whose feed-forward is frozen (LoRA); true: also where it trains; false: HF's own
    feed-forward. On an H100: LoRA b256 +5.5% (40.4% MFU against 38.3%), full FT b32 -2.3% when on
    (docs/benchmarks.md)."""
    inductor_options: dict[str, Any] = field(default_factory=dict)
    """Inductor settings for the compiled model or blocks, on top of compile.mode's and combo_kernels
    (torch.compile's ``options``, named as torch._inductor.list_options() names them; nested keys join
    with dots), e.g. ``+compile.inductor_options.max_autotune_pointwise=true``. That setting, given to the
    whole process on an H200 (roberta-large b32), ran full FT 1.6-1.9% faster and LoRA 1.1% slower, with
    ~20 s more compilation (docs/benchmarks.md)."""

    def __post_init__(self) -> None:
        _check(self.mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
               f"compile.mode must be default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs, "
               f"got {self.mode!r}")
        _check(self.cuda_graphs in ("step", "none"), f"compile.cuda_graphs must be step or none, got {self.cuda_graphs!r}")
        _check(not (self.cuda_graphs == "step" and self.mode in ("reduce-overhead", "max-autotune")),
               f"compile.mode={self.mode} captures CUDA graphs of its own, which cannot sit inside the step's "
               f"graphs; add compile.cuda_graphs=none, or use mode default or max-autotune-no-cudagraphs")
        _check(self.scope in ("model", "blocks"), f"compile.scope must be model or blocks, got {self.scope!r}")
        _check(self.update_kernel in ("inductor", "triton"),
               f"compile.update_kernel must be inductor or triton, got {self.update_kernel!r}")
        _check(self.dropout_masks in ("auto", "inductor", "triton", "triton_bits"),
               f"compile.dropout_masks must be auto, inductor, triton or triton_bits, got {self.dropout_masks!r}")
        _check(self.length_bucket >= 1, f"compile.length_bucket must be >= 1, got {self.length_bucket}")
        _check(self.pack_bucket >= 1, f"compile.pack_bucket must be >= 1, got {self.pack_bucket}")
        _check(self.varlen_kernel in ("auto", "flash", "efficient", "short"),
               f"compile.varlen_kernel must be auto, flash, efficient or short, got {self.varlen_kernel!r}")
        _check(not (self.cuda_graphs == "step" and flat_options(self.inductor_options).get("triton.cudagraphs")),
               "compile.inductor_options.triton.cudagraphs=true captures CUDA graphs of its own, which cannot sit "
               "inside the step's graphs; add compile.cuda_graphs=none, or drop that option")


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    peft: PeftConfig = MISSING
    distributed: DistributedConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    lr_scheduler: LRSchedulerConfig = MISSING
    step_scheduler: StepSchedulerConfig = field(default_factory=StepSchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dataloader: DataloaderConfig = field(default_factory=DataloaderConfig)
    validation_dataloader: DataloaderConfig = field(default_factory=DataloaderConfig)
    dist_env: DistEnvConfig = field(default_factory=DistEnvConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    # A default rather than MISSING: config.yaml of runs from before the group still loads (seqcls.runs).
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 42
    """One seed for data order, initialisation and dropout."""
    cpu_keep_freed_memory: bool = True
    """Training on CPU: glibc keeps freed memory for reuse (no fresh page faults on big tensors each step)."""
    run_dir: Optional[str] = None
    """Where the run writes; null: Hydra's output dir."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA GPUs that have it, fp16 on older ones, fp32 on CPU), bf16, fp16 (autocast
    with dynamic loss scaling: a step whose gradients overflow is skipped and the scale halved) or fp32."""
    device: str = "auto"
    """auto, cpu or cuda."""
    allowed_target_prefixes: list[str] = field(default_factory=list)
    """Extra module prefixes that `_target_` values may name, beyond the built-in allowlist."""

    def __post_init__(self) -> None:
        _check(self.precision in ("auto", "bf16", "fp16", "fp32"),
               f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        _check(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        _check(not (self.precision == "fp16" and self.distributed.strategy == "fsdp2"),
               "precision=fp16 is not built for distributed=fsdp2, whose gradients would need a sharded loss scaler; "
               "use precision=bf16 (or auto) with FSDP2")
        _check(self.dataset.task != "multi_label" or self.loss.label_smoothing == 0.0,
               "loss.label_smoothing applies to single-label classification; dataset.task=multi_label trains each "
               "label's yes/no with binary cross-entropy: leave it at 0")
        if self.dataset.num_labels == 1:
            _check(self.loss.class_weights is None and self.loss.label_smoothing == 0.0,
                   "loss.class_weights and loss.label_smoothing apply to classification; a regression "
                   "(dataset.num_labels=1) trains on the squared error: leave them at null and 0")
        elif isinstance(self.loss.class_weights, (list, tuple)):
            _check(len(self.loss.class_weights) == self.dataset.num_labels,
                   f"loss.class_weights has {len(self.loss.class_weights)} weights for "
                   f"dataset.num_labels={self.dataset.num_labels}; give one a class, in label order")
        from seqcls.metrics import metric_names
        names = metric_names(self.dataset.task, self.dataset.num_labels)
        _check(self.checkpoint.best_metric in (None, *names),
               f"checkpoint.best_metric={self.checkpoint.best_metric!r} is not a validation metric of "
               f"dataset.task={self.dataset.task!r}; use one of {', '.join(names)}")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    # conf/hydra/launcher/submitit_{slurm,local}.yaml share their names with hydra-submitit-launcher's
    # schemas, so the usual `hydra/launcher=submitit_slurm` picks them, and Hydra validates them against
    # those schemas (a misspelt field fails) but calls that deprecated on every launch: silence only that.
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_(slurm|local)' is validated against "
                                              r"ConfigStore schema with the same name")
