"""LoRA for Hugging Face sequence classifiers, written out by hand.

`LoRALinear` replaces an `nn.Linear` and keeps its `weight`/`bias` names, so base checkpoints load
unchanged and the extra keys are only `<path>.lora_A.weight` / `<path>.lora_B.weight`. Everything
that works on weights after training (merge, conversion to and from peft's adapter naming) is a
pure function over a state dict, so it works the same on a state dict gathered from an FSDP2 model.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from seqcls import gemm

HEAD_MODULE_NAMES = ("classifier", "score")
PEFT_PREFIX = "base_model.model."  # what peft puts before every key of a saved adapter
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_VARIANT_FLAGS = ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out")  # peft options this LoRA does not do


class LoRALinear(nn.Module):
    """`y = x W^T + b + (alpha / dim) * B(A(dropout(x)))`, with W and b frozen by `mark_trainable`.

    Not a subclass of nn.Linear on purpose: `isinstance(m, nn.Linear)` then finds only plain layers
    (so a second injection cannot wrap a wrapped layer), and whole-model initialisers that re-init
    every nn.Linear leave W alone; they do reach lora_A/lora_B, so call `reset_lora_parameters()`
    after any such init (and after materialising a meta-device model).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, *, dim: int, alpha: float, dropout: float):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"LoRA dim must be positive, got {dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.out_features, self.in_features = weight.shape
        self.dim, self.alpha, self.scale = dim, alpha, alpha / dim
        # The base layer's own Parameter objects: no copy, and FSDP2 sees plain parameters.
        self.weight = weight
        self.register_parameter("bias", bias)  # as nn.Linear does, also when it is None
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(self.in_features, dim, bias=False, **factory)
        self.lora_B = nn.Linear(dim, self.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, dim: int, alpha: float, dropout: float) -> LoRALinear:
        return cls(linear.weight, linear.bias, dim=dim, alpha=alpha, dropout=dropout)

    def reset_lora_parameters(self) -> None:
        # As peft (and the original LoRA code): A like nn.Linear's default init, B zero, so the
        # adapted layer starts out equal to the base layer.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        # base + B(A(dropout(x)) * scale) as one matrix multiply (lora_linear); scaling A's rank-sized
        # output is out/dim times cheaper than B's.
        rows = x.reshape(-1, self.in_features)
        u = self.lora_A(self.lora_dropout(rows)) * self.scale
        return lora_linear(rows, self.weight, self.bias, u, self.lora_B.weight).view(*x.shape[:-1], self.out_features)

    def lora_delta(self, x: Tensor) -> Tensor:
        """The adapter's term alone: (alpha / dim) * B(A(dropout(x)))."""
        return self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dim={self.dim}, alpha={self.alpha}"


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, u: Tensor, lora_b: Tensor,
                blocks: tuple[tuple[int, int, int, int], ...] | None = None) -> Tensor:
    """``x W^T + b + u B^T`` for rows x (n, in) and a LoRA term's A side u (n, dim), B (out, dim): one matrix
    multiply of [x | u] by [W | B]. Adding the term after the base multiply instead reads and writes the
    (n, out) result once more (torch's addmm with a matrix to add first copies it, then multiplies into
    the copy: on roberta-large's fused query/key/value at batch 256, ~0.1 ms a layer). The backward gives
    the gradients of x and u from one multiply by [W | B], and W's only where W trains. ``blocks`` (rows
    start, end, columns start, end) name B's only nonzero blocks where it is laid out block-wise
    (merged_lora_linear): B's gradient is then computed in those alone, each from its rows' slice of the
    output's gradient (a fused query/key/value with adapters on two of three reads two thirds of it).
    Under autocast it computes in autocast's dtype, as F.linear would. [x | u] is joined outside the
    autograd function, in the compiled graph."""
    return gemm.in_autocast_dtype(
        lambda x, weight, bias, u, lora_b: _LoRALinear.apply(torch.cat([x, u], dim=1), weight, bias, lora_b, u, blocks),
        x, weight, bias, u, lora_b)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xu, weight, bias, lora_b, u, blocks):
        # xu = [x | u]; u, also apart, is kept for B's gradient (no copy of xu's last columns).
        ctx.save_for_backward(xu[:, :weight.shape[1]] if ctx.needs_input_grad[1] else None, weight, u, lora_b)
        ctx.blocks = blocks
        return gemm.mm(xu, torch.cat([weight, lora_b], dim=1).t(), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, u, lora_b = ctx.saved_tensors
        dxu = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dxu = gemm.mm(grad, torch.cat([weight, lora_b], dim=1))
        if ctx.needs_input_grad[1]:
            dweight = gemm.mm(grad.t(), x)
        if ctx.needs_input_grad[2]:
            dbias = grad.sum(0)
        return dxu, dweight, dbias, _lora_b_grad(grad, u, ctx.blocks) if ctx.needs_input_grad[3] else None, None, None


def _lora_b_grad(grad: Tensor, u: Tensor, blocks) -> Tensor:
    """grad^T u, computed only in ``blocks`` (zeros elsewhere) where they are given."""
    if blocks is None:
        return grad.t() @ u
    out = grad.new_zeros(grad.shape[1], u.shape[1])
    for r0, r1, c0, c1 in blocks:
        out[r0:r1, c0:c1] = grad[:, r0:r1].t() @ u[:, c0:c1]
    return out


def _in_modules(path: str, module_names: Iterable[str]) -> bool:
    """True when the dotted `path` (a module or parameter name) is one of `module_names` or lies inside one.

    `classifier`, `classifier.dense`, `roberta.x.classifier.weight` are all in `["classifier"]`; the
    same dotted-boundary rule peft uses to keep LoRA off its modules_to_save.
    """
    return any(f".{m}." in f".{path}." for m in module_names)


def _unmatched_glob_error(kind: str, glob: str, linear_names: Sequence[str]) -> ValueError:
    # One line: the glob, one example per distinct layer position (digits folded, so that query, key,
    # value, the dense layers... all show up rather than eight copies of layer 0), and the fix.
    by_position: dict[str, str] = {}
    for name in linear_names:
        by_position.setdefault(re.sub(r"\.\d+\.", ".N.", name), name)
    examples = list(by_position.values())[:8]
    hint = f" (did you mean '*.{glob}'?)" if any(fnmatch.fnmatchcase(n, f"*.{glob}") for n in linear_names) else ""
    return ValueError(
        f"LoRA {kind} glob '{glob}' matches no module{hint}; globs match full dotted module names, outside the "
        f"classification head and exclude_modules. Some of the {len(linear_names)} nn.Linear modules here: "
        f"{', '.join(examples)}. Fix: use a glob such as '*.<leaf>' for one of these, or drop it."
    )


def inject_lora(
    model: nn.Module,
    *,
    target_modules: Sequence[str] | None,
    dim: int,
    alpha: float,
    dropout: float,
    exclude_modules: Sequence[str] = (),
    match_all_linear: bool = False,
) -> list[str]:
    """Replace the selected nn.Linear modules of `model` by `LoRALinear`, in place.

    Args:
        target_modules: fnmatch globs over full module names, e.g. `["*.query", "*.value"]`.
        exclude_modules: globs of modules (with everything inside them) never wrapped; each must
            match some module.
        match_all_linear: target every nn.Linear (any `target_modules` globs are still checked).
        The classification head (`classifier`/`score` and their sub-modules) is never wrapped.

    Returns:
        The sorted names of the replaced modules.

    Raises:
        ValueError: a glob matching nothing, a glob matching a non-Linear module, or a model
            that already holds LoRA layers.
    """
    modules = dict(model.named_modules())
    if any(isinstance(m, LoRALinear) for m in modules.values()):
        raise ValueError("inject_lora: the model already holds LoRALinear layers; inject once, on the base model")
    target_modules = list(target_modules or ())
    if not (target_modules or match_all_linear):
        raise ValueError(
            "inject_lora: no target: give target_modules globs (e.g. ['*.query', '*.value']) or match_all_linear=True"
        )
    candidates = [n for n in modules if n and not _in_modules(n, HEAD_MODULE_NAMES)]
    linear_names = [n for n in candidates if isinstance(modules[n], nn.Linear)]

    excluded: set[str] = set()
    for glob in exclude_modules:
        hits = {n for n in modules if n and fnmatch.fnmatchcase(n, glob)}
        if not hits:
            raise _unmatched_glob_error("exclude_modules", glob, linear_names)
        excluded |= hits
    # Excluding a module excludes what is inside it too ('*.layer.0' keeps LoRA out of that block).
    candidates = [n for n in candidates if not _in_modules(n, excluded)]
    linear_names = [n for n in candidates if isinstance(modules[n], nn.Linear)]

    # Globs are checked even with match_all_linear (whose set holds theirs), so a typo still fails.
    selected = set(linear_names) if match_all_linear else set()
    for glob in target_modules:
        hits = {n for n in candidates if fnmatch.fnmatchcase(n, glob)}
        if not hits:
            raise _unmatched_glob_error("target_modules", glob, linear_names)
        not_linear = sorted(f"{n} ({type(modules[n]).__name__})" for n in hits if not isinstance(modules[n], nn.Linear))
        if not_linear:
            raise ValueError(
                f"LoRA target_modules glob '{glob}' matches modules that are not nn.Linear: "
                f"{', '.join(not_linear[:8])}; only nn.Linear can carry LoRA, narrow the glob (e.g. '*.query')."
            )
        selected |= hits
    if not selected:
        raise ValueError("inject_lora: nothing to wrap (every nn.Linear is in the head or excluded)")

    for name in sorted(selected):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear.from_linear(modules[name], dim=dim, alpha=alpha, dropout=dropout)
        setattr(parent, child_name, layer.train(modules[name].training))  # an eval-mode model stays in eval mode
    return sorted(selected)


def mark_trainable(model: nn.Module, modules_to_save: Sequence[str] = HEAD_MODULE_NAMES) -> tuple[int, int]:
    """Freeze everything except the LoRA A/B matrices and the head modules that exist (peft's modules_to_save).

    Returns:
        (trainable, total) parameter counts.
    """
    if modules_to_save and not any(_in_modules(n, modules_to_save) for n, _ in model.named_modules()):
        raise ValueError(
            f"mark_trainable: none of modules_to_save {list(modules_to_save)} is a module of this model, "
            "so the classification head would stay frozen; name the head module"
        )
    for name, param in model.named_parameters():
        param.requires_grad_(_in_modules(name.rpartition(".")[0], modules_to_save))
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.weight.requires_grad_(True)
            module.lora_B.weight.requires_grad_(True)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _lora_module_names(state_dict: dict[str, Tensor]) -> list[str]:
    return sorted({k.removesuffix(s) for k in state_dict for s in _LORA_SUFFIXES if k.endswith(s)})


def merge_lora_weights(state_dict: dict[str, Tensor], *, scale: float) -> dict[str, Tensor]:
    """Fold every LoRA pair into its base weight, `X.weight = W + scale * B @ A`, and drop the lora keys.

    Pure: the input is not modified (untouched tensors are shared, not copied). The result has the
    key set of the un-injected model, so it loads there with `strict=True`.
    """
    merged = {k: v for k, v in state_dict.items() if not k.endswith(_LORA_SUFFIXES)}
    for name in _lora_module_names(state_dict):
        keys = (f"{name}.weight", f"{name}.lora_A.weight", f"{name}.lora_B.weight")
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise KeyError(f"merge_lora_weights: LoRA module '{name}' lacks {missing} in the state dict")
        weight, lora_a, lora_b = (state_dict[k] for k in keys)
        # Accumulate in fp32 so that a bf16 base weight is rounded once, not twice.
        merged[f"{name}.weight"] = (weight.float() + scale * (lora_b.float() @ lora_a.float())).to(weight.dtype)
    return merged


def to_peft_state_dict(state_dict: dict[str, Tensor], *, modules_to_save: Sequence[str]) -> dict[str, Tensor]:
    """Our keys → the keys peft writes in adapter_model.safetensors: the LoRA pairs and the head, nothing else.

    `X.lora_A.weight` → `base_model.model.X.lora_A.weight`; a head key such as `classifier.weight`
    → `base_model.model.classifier.weight` (peft drops its `modules_to_save.default.` when saving).
    """
    out = {
        PEFT_PREFIX + k: v
        for k, v in state_dict.items()
        if k.endswith(_LORA_SUFFIXES) or _in_modules(k.rpartition(".")[0], modules_to_save)
    }
    if not any(k.endswith(_LORA_SUFFIXES) for k in out):
        raise ValueError("to_peft_state_dict: the state dict holds no '*.lora_A.weight' / '*.lora_B.weight' keys")
    if modules_to_save and all(k.endswith(_LORA_SUFFIXES) for k in out):
        raise ValueError(
            f"to_peft_state_dict: no key lies in modules_to_save {list(modules_to_save)}; "
            "the trained head would be lost"
        )
    return out


def from_peft_state_dict(peft_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The keys of a peft LoRA adapter file → our keys (the inverse of `to_peft_state_dict`)."""
    out = {}
    for key, value in peft_state_dict.items():
        ours = key.removeprefix(PEFT_PREFIX)
        if ours == key:
            raise ValueError(f"from_peft_state_dict: key '{key}' lacks the '{PEFT_PREFIX}' prefix of peft's files")
        if ".lora_" in ours and not ours.endswith(_LORA_SUFFIXES):
            raise ValueError(f"from_peft_state_dict: '{key}' is of a LoRA variant not done here (plain A/B only)")
        out[ours] = value
    return out


def save_peft_adapter(
    state_dict: dict[str, Tensor],
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None,
    dim: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
    modules_to_save: Sequence[str],
) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` that `peft.PeftModel.from_pretrained` loads.

    Args:
        state_dict: the full (gathered, not sharded) state dict of an injected model.
        target_modules: the globs given to `inject_lora` or the names it returned; each must match a
            LoRA module of the state dict. The config lists the concrete LoRA module names found in the
            state dict, which peft matches exactly, so it re-targets the very same modules.
        modules_to_save: the head modules trained in full, as given to `mark_trainable`.

    Returns:
        The adapter directory.
    """
    peft_sd = to_peft_state_dict(state_dict, modules_to_save=modules_to_save)
    lora_names = _lora_module_names(state_dict)
    unused = [t for t in target_modules if not any(fnmatch.fnmatchcase(n, t) for n in lora_names)]
    if unused:
        raise ValueError(
            f"save_peft_adapter: target_modules {unused[:4]} match no LoRA module of the state dict "
            f"(it has {len(lora_names)}, e.g. {lora_names[:2]}); pass the globs or names used to inject"
        )
    tensors = {}
    for key, value in peft_sd.items():
        if isinstance(value, DTensor):
            raise TypeError(f"save_peft_adapter: '{key}' is a sharded DTensor; gather a full state dict first "
                            "(torch.distributed.checkpoint.state_dict.get_model_state_dict with full_state_dict=True)")
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_model_name_or_path,
        "r": dim,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        # Full module names: peft wraps a module when its name is in this list, so it wraps the same set.
        "target_modules": lora_names,
        "modules_to_save": list(modules_to_save),
        "bias": "none",
        "inference_mode": True,
        # Written out rather than left to peft's defaults: each one changes the maths if it differs.
        **dict.fromkeys(_VARIANT_FLAGS, False),
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Write-then-rename, so that a crash never leaves a half-written file under the final name.
    tmp = out_dir / f"{ADAPTER_WEIGHTS_NAME}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / ADAPTER_WEIGHTS_NAME)
    tmp = out_dir / f"{ADAPTER_CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / ADAPTER_CONFIG_NAME)
    return out_dir


def load_peft_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Load a peft LoRA adapter directory (ours or peft's) into a model already injected with `inject_lora`.

    Every LoRA pair and every head parameter must be in the file, and nothing else: any difference
    is a one-line error. On an FSDP2-sharded model, call it on every rank (each reads the small file).
    """
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
    bad = {k: config[k] for k in (*_VARIANT_FLAGS, "rank_pattern", "alpha_pattern") if config.get(k)}
    if config.get("peft_type") != "LORA" or bad:
        raise ValueError(
            f"load_peft_adapter: {adapter_dir} is not a plain LoRA adapter (peft_type={config.get('peft_type')}, {bad})"
        )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    scale = config["lora_alpha"] / config["r"]
    wrong = [n for n, m in layers.items() if (m.dim, m.scale) != (config["r"], scale)]
    if wrong:
        m = layers[wrong[0]]
        raise ValueError(
            f"load_peft_adapter: the adapter has r={config['r']}, alpha/r={scale} but {wrong[0]} has "
            f"dim={m.dim}, scale={m.scale}; inject with the adapter's r and lora_alpha"
        )

    state_dict = from_peft_state_dict(load_file(str(adapter_dir / ADAPTER_WEIGHTS_NAME)))
    # peft adds the usual head names itself for SEQ_CLS, so an adapter of peft's may leave them out.
    default_heads = HEAD_MODULE_NAMES if config.get("task_type") == "SEQ_CLS" else ()
    modules_to_save = config.get("modules_to_save") or default_heads
    expected = {f"{n}.{ab}.weight" for n in layers for ab in ("lora_A", "lora_B")}
    expected |= {n for n, _ in model.named_parameters() if _in_modules(n.rpartition(".")[0], modules_to_save)}
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"load_peft_adapter: {adapter_dir} does not fit this model: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}; inject the modules its adapter_config.json targets"
        )
    if any(isinstance(p, DTensor) for p in model.parameters()):
        set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(state_dict, strict=False)
