"""Matrix multiplies with cuBLASLt's algorithm picked by timing, once per shape (``compile.tuned_gemm``).

torch's matmul takes the first algorithm cuBLAS's heuristic offers for a problem size, and that pick is
not always the heuristic's fastest: on an H100, at roberta-large's LoRA b256 shapes (~13,600 packed
tokens), the fastest of the algorithms cuBLASLt's heuristic lists ran a layer's eight forward and backward
matrix multiplies in 8.7% less time than torch's picks, two of them 20% less (docs/benchmarks.md,
twenty-ninth session). Here the first call of each shape outside a CUDA-graph capture times torch's own
matmul and each algorithm the heuristic lists for that shape on the GPU alone (queued behind a spin
kernel, so host time does not count), checks each against torch's product, and keeps the fastest; later
calls, captures included, run it. A shape first met inside a capture runs torch's matmul there and is
timed at its next call outside one; the step graphs warm each shape up before capturing it.

Each choice is also kept on disk (``enable(cache_dir=...)``, compile.tuned_gemm_cache): one small file a
shape, named for the shape and for what the timing held for (the GPU model, cuBLASLt's and torch's versions).
A later run that meets the shape takes the choice from there instead of timing it again (a roberta-large run
times a few hundred shapes, ~25 s of its start-up on an H100), after checking that the heuristic still lists
the same algorithms and that the kept one's product still matches torch's; else the shape is timed anew and
its file rewritten. Runs of a sweep sharing a cache folder time each shape once.

Every candidate accumulates in fp32; they may sum in another order than torch's pick (other tiles,
split-K), as torch's own picks do from one shape to the next.

gelu_mlp (compile.gelu_epilogue) asks cuBLASLt for GELU in a matrix multiply's epilogue: forward, the
feed-forward's first multiply writes GELU's output and its input; backward, the second's input gradient
comes out multiplied by GELU's derivative. Those shapes are timed the same way, against torch's matmul
followed by its GELU kernel.

A weight's gradient and its bias's are taken in one call (mm_bgrad): cuBLASLt's BGRADB epilogue sums the
output gradient over the rows as the multiply reads it, where the shape's timing finds that faster than
torch's matmul and a column sum after it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("seqcls")

ENABLED = False
"""Whether linear() and mm() route CUDA bf16/fp16 matrix multiplies here (seqcls.build sets it per run)."""
WORKSPACE_BYTES = 32 * 2**20  # cuBLASLt's scratch per stream, as torch gives it on Hopper
MAX_ALGOS = 16  # the heuristic's candidates asked for
REPS = 5  # timed runs of a candidate, in each of two rounds
SPIN_CYCLES = 2_000_000  # ~1 ms of GPU spin ahead of the timed runs, so the host queues them all in time
_DTYPES = {torch.bfloat16: 14, torch.float16: 2}  # cudaDataType_t
_TORCH = "torch"  # the choice of torch's own matmul

_lt = None  # (library, handle) once loaded, False when it cannot be
_choices: dict[tuple, object] = {}  # shape key -> _TORCH or (plan, algorithm index)
_timings: dict[tuple, tuple[float, float]] = {}  # shape key -> (torch's ms, the choice's ms) when tuned
_workspaces: dict[tuple, Tensor] = {}  # (device, stream) -> workspace
_cached: set[tuple] = set()  # shape keys whose choice came from the cache folder
CACHE_DIR: Optional[Path] = None
"""Where choices are kept across runs (None: nowhere); set with enable()."""
CACHE_FORMAT = 1  # bumped when a cache entry's meaning changes


def enable(on: bool, cache_dir: Optional[str | Path] = None) -> None:
    global ENABLED, CACHE_DIR
    ENABLED = bool(on)
    CACHE_DIR = Path(cache_dir).expanduser() if cache_dir is not None else None


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/seqcls/tuned_gemm (~/.cache/seqcls/tuned_gemm where it is unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seqcls" / "tuned_gemm"


def supported(device: torch.device) -> bool:
    """Whether cuBLASLt can be reached on this device (CUDA on Linux, torch's own libcublasLt)."""
    return device.type == "cuda" and torch.version.cuda is not None and _library() is not None


def choices() -> dict[tuple, str]:
    """Each shape tuned so far -> "torch" or "cublaslt #i" (i: the heuristic's rank of the algorithm kept)."""
    return {k: v if v is _TORCH else f"cublaslt #{v[1]}" for k, v in _choices.items()}


def summary() -> str:
    """One line on the shapes tuned so far: how many kept a cuBLASLt algorithm, and the time of one call
    of each shape with torch's pick against the choice, as timed when tuning."""
    if not _timings:
        return "tuned matmul: no shape tuned"
    torch_ms, best_ms = (sum(t[i] for t in _timings.values()) for i in (0, 1))
    kept = sum(v is not _TORCH for v in _choices.values())
    parts = []
    for what, modes in (("GELU", ("gelu", "dgelu")), ("bias-gradient", ("bgrad",))):
        fused = [v for k, v in _choices.items() if k[KEY_MODE] in modes]
        if fused:
            parts.append(f"{sum(v is not _TORCH for v in fused)} of {len(fused)} {what} shapes")
    epilogues = f" ({' and '.join(parts)} with cuBLASLt's epilogue)" if parts else ""
    cached = f", {len(_cached & _timings.keys())} of them from the cache" if _cached else ""
    return (f"tuned matmul: {len(_timings)} shapes{cached}, {kept} on a cuBLASLt algorithm{epilogues}; one call of "
            f"each: torch's picks {torch_ms:.2f} ms, the choices {best_ms:.2f} ms ({100 * (1 - best_ms / torch_ms):.1f}% "
            f"less)")


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear of rows x (n, in), through the tuned matmul where ENABLED and x is a CUDA tensor
    (under autocast in autocast's dtype, as F.linear computes); otherwise F.linear itself."""
    if not (ENABLED and x.is_cuda and x.dim() == 2):
        return F.linear(x, weight, bias)
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if x.dtype not in _DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return F.linear(x, weight, bias)
    return torch.ops.seqcls.tuned_linear(x, weight, bias)


def mm(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """a @ b (+ bias over the columns), tuned where ENABLED; no autograd of its own (for backward passes
    and autograd functions)."""
    if _routed(a, b, bias):
        return torch.ops.seqcls.tuned_mm(a, b, bias)
    return _torch_mm(a, b, bias)


def _routed(a: Tensor, b: Tensor, *others: Optional[Tensor]) -> bool:
    return ENABLED and a.is_cuda and a.dtype in _DTYPES and all(t is None or t.dtype == a.dtype for t in (b, *others))


def mm_gelu(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(gelu(a @ b + bias), a @ b + bias) with GELU's tanh form, as cuBLASLt's epilogue computes it where
    ENABLED (the GELU in the matrix multiply's last stage, its input written beside it); no autograd."""
    if _routed(a, b, bias):
        return torch.ops.seqcls.tuned_mm_gelu(a, b, bias)
    return _torch_run(a, b, bias, "gelu")


def mm_dgelu(a: Tensor, b: Tensor, pre: Tensor) -> Tensor:
    """gelu'(pre) * (a @ b): the gradient of a GELU's input (tanh form) from that of its output, a @ b, and
    the input ``pre``; through cuBLASLt's epilogue where ENABLED. (cuBLASLt's epilogue that also sums the
    bias gradient ran slower on an H100 at roberta-large's sizes than this one and a separate sum.)"""
    if _routed(a, b, pre):
        return torch.ops.seqcls.tuned_mm_dgelu(a, b, pre)
    return _torch_run(a, b, None, "dgelu", pre)[0]


def mm_bgrad(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(a @ b, a.sum(1)): a weight's gradient (a: the output gradient transposed, b: the input) and its bias's,
    in one call through cuBLASLt's BGRADB epilogue where ENABLED and the timing finds it faster; no autograd."""
    if _routed(a, b):
        return torch.ops.seqcls.tuned_mm_bgrad(a, b)
    return _torch_run(a, b, None, "bgrad")


def gelu_mlp(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor]) -> Tensor:
    """A transformer block's feed-forward on rows x (n, in): gelu(x W1^T + b1) W2^T + b2, GELU in its tanh
    form. Where ENABLED the GELU runs in the first matrix multiply's epilogue and its gradient in that of
    the second's backward (no pass of its own over the (n, 4 * hidden) activations either way). Under
    autocast it computes in autocast's dtype, as F.linear would."""
    return in_autocast_dtype(_GeluMLP.apply, x, w1, b1, w2, b2)


def in_autocast_dtype(function: Callable[..., Tensor], x: Tensor, *others: Optional[Tensor]) -> Tensor:
    """function(x, *others), where autocast is on for x's device with every tensor cast to autocast's dtype
    and autocast off inside (as F.linear computes under autocast): for autograd functions whose matrix
    multiplies bypass autocast."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return function(x, *others)
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return function(x.to(dtype), *(None if t is None else t.to(dtype) for t in others))


class _GeluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        act, pre = mm_gelu(x, w1.t(), b1)
        need = ctx.needs_input_grad
        # the block's input only where W1 trains, its activation where W2 does, W1 where x needs a gradient
        ctx.save_for_backward(x if need[1] else None, w1 if need[0] else None, pre, act if need[3] else None, w2)
        return mm(act, w2.t(), b2)

    @staticmethod
    def backward(ctx, grad):
        x, w1, pre, act, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = dw1 = db1 = None
        if need[0] or need[1] or need[2]:
            dpre = mm_dgelu(grad, w2, pre)
            dx = mm(dpre, w1) if need[0] else None
            dw1, db1 = _weight_grads(dpre, x, need[1], need[2])
        dw2, db2 = _weight_grads(grad, act, need[3], need[4])
        return dx, dw1, db1, dw2, db2


def _weight_grads(grad: Tensor, x: Tensor, weight: bool, bias: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """A linear layer's weight and bias gradients, each where asked for, from its output gradient and input."""
    if weight and bias:
        return mm_bgrad(grad.t(), x)
    return mm(grad.t(), x) if weight else None, grad.sum(0) if bias else None


class TunedLinear(torch.nn.Linear):
    """nn.Linear whose matrix multiply goes through linear() (the same parameters and state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x.reshape(-1, self.in_features), self.weight, self.bias).view(*x.shape[:-1], self.out_features)


def tune_linears(layers: torch.nn.Module) -> int:
    """Make every plain nn.Linear under ``layers`` (an encoder's layers) a TunedLinear, but LoRA's A and B
    matrices (too narrow to gain); returns how many."""
    n = 0
    for name, module in layers.named_modules():
        if type(module) is torch.nn.Linear and not name.rsplit(".", 1)[-1].startswith("lora_"):
            module.__class__ = TunedLinear
            n += 1
    return n


# ---------------------------------------------------------------------------------------------- the ops
@torch.library.custom_op("seqcls::tuned_mm", mutates_args=())
def _mm_op(a: Tensor, b: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _tuned(a, b, bias)[0]


@_mm_op.register_fake
def _(a, b, bias):
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.custom_op("seqcls::tuned_mm_gelu", mutates_args=())
def _mm_gelu_op(a: Tensor, b: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _tuned(a, b, bias, "gelu")  # its second output, the GELU input, is never None


@_mm_gelu_op.register_fake
def _(a, b, bias):
    return a.new_empty((a.shape[0], b.shape[1])), a.new_empty((a.shape[0], b.shape[1]))


@torch.library.custom_op("seqcls::tuned_mm_dgelu", mutates_args=())
def _mm_dgelu_op(a: Tensor, b: Tensor, pre: Tensor) -> Tensor:
    return _tuned(a, b, None, "dgelu", pre)[0]


@_mm_dgelu_op.register_fake
def _(a, b, pre):
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.custom_op("seqcls::tuned_mm_bgrad", mutates_args=())
def _mm_bgrad_op(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    return _tuned(a, b, None, "bgrad")  # its second output, the row sums of a, is never None


@_mm_bgrad_op.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[1])), a.new_empty((a.shape[0],))


@torch.library.custom_op("seqcls::tuned_linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _tuned(x, weight.t(), bias)[0]


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    # x only where the weight trains, the weight only where x needs its gradient (frozen LoRA bases keep no x)
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx = _mm_op(grad, weight, None) if ctx.needs_input_grad[0] else None
    dweight, dbias = _weight_grads(grad, x, ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
    return dx, dweight, dbias


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# ------------------------------------------------------------------------------------------ the tuning
# A matrix multiply's mode: "" (a @ b, + bias), "gelu" (gelu(a @ b + bias) and a @ b + bias, its input),
# "dgelu" (gelu'(pre) * (a @ b), GELU's input gradient), "bgrad" (a @ b and a's row sums: a weight's gradient
# and its bias's). GELU is the tanh form, cuBLASLt's.
def _torch_mm(a: Tensor, b: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def _torch_run(a: Tensor, b: Tensor, bias: Optional[Tensor], mode: str = "",
               pre: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """A mode's two outputs as torch computes them (the second None where there is none)."""
    if mode == "gelu":
        pre = _torch_mm(a, b, bias)
        return F.gelu(pre, approximate="tanh"), pre
    if mode == "dgelu":
        return torch.ops.aten.gelu_backward(torch.mm(a, b), pre, approximate="tanh"), None
    if mode == "bgrad":
        return torch.mm(a, b), a.sum(1)
    return _torch_mm(a, b, bias), None


def _layout(t: Tensor) -> Optional[tuple[int, int, int, int]]:
    """(rows, cols, leading dimension, op) of a 2-D tensor read as cuBLAS's column-major operand whose
    op gives t transposed, or None for strides it cannot take."""
    r, c = t.shape
    s0, s1 = t.stride()
    if s1 == 1 and s0 >= c:
        return c, r, s0, 0  # row-major t is column-major t^T: op N
    if s0 == 1 and s1 >= r:
        return r, c, s1, 1  # a transposed view: column-major t, op T
    return None


def _alignment(t: Tensor) -> int:
    ptr = t.data_ptr()
    return 256 if ptr % 256 == 0 else ptr & -ptr


KEY_MODE, _KEY_DEVICE = 10, 6  # where a shape key holds its mode, its device index


def _key(a: Tensor, b: Tensor, bias: Optional[Tensor], mode: str, pre: Optional[Tensor]) -> tuple:
    return (tuple(a.shape), a.stride(), tuple(b.shape), b.stride(), a.dtype, bias is not None, a.device.index,
            _alignment(a), _alignment(b), 0 if bias is None else _alignment(bias), mode,
            0 if pre is None else _alignment(pre))


def _tuned(a: Tensor, b: Tensor, bias: Optional[Tensor], mode: str = "",
           pre: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """A mode's outputs (see _torch_run) from the shape's chosen algorithm, tuning it at its first call."""
    if (not a.is_cuda or min(a.shape[0], a.shape[1], b.shape[1]) < 2 or _layout(a) is None or _layout(b) is None
            or (bias is not None and not bias.is_contiguous())  # cuBLASLt's bias epilogue reads a packed vector
            or (pre is not None and (not pre.is_contiguous() or pre.dtype != a.dtype))):
        return _torch_run(a, b, bias, mode, pre)
    key = _key(a, b, bias, mode, pre)
    choice = _choices.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing() or _library() is None:
            return _torch_run(a, b, bias, mode, pre)
        choice = _choices[key] = _tune(key, a, b, bias, mode, pre)
    if choice is _TORCH:
        return _torch_run(a, b, bias, mode, pre)
    workspace = _workspace(a.device)
    if workspace is None:
        return _torch_run(a, b, bias, mode, pre)
    plan, index = choice
    out, second = _outputs(a, b, mode)
    plan.run(index, a, b, bias, out, pre if mode == "dgelu" else second, workspace)
    return out, second


def _outputs(a: Tensor, b: Tensor, mode: str) -> tuple[Tensor, Optional[Tensor]]:
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    if mode == "gelu":
        return out, torch.empty_like(out)
    if mode == "bgrad":
        return out, torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    return out, None


def _workspace(device: torch.device) -> Optional[Tensor]:
    """The device's current stream's cuBLASLt workspace; made outside captures only (one made inside a
    capture would come from the graph's memory pool)."""
    stream = torch.cuda.current_stream(device)
    key = (stream.device_index, stream.cuda_stream)
    if key not in _workspaces:
        if torch.cuda.is_current_stream_capturing():
            return None
        _workspaces[key] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _workspaces[key]


def _tune(key: tuple, a: Tensor, b: Tensor, bias: Optional[Tensor], mode: str, pre: Optional[Tensor]):
    """The fastest of torch's matmul (and, for an epilogue's mode, torch's kernels after it) and the
    heuristic's algorithms for this shape, each checked against torch's outputs first; or the choice kept
    in the cache folder, where it still holds."""
    workspace = _workspace(a.device)
    plan = _Plan(a, b, bias, mode)
    refs = _torch_run(a, b, bias, mode, pre)
    out, second = _outputs(a, b, mode)
    aux = pre if mode == "dgelu" else second  # the GELU input read, or written; the row sums written

    def run(i: int) -> None:
        plan.run(i, a, b, bias, out, aux, workspace)

    def matches(i: int) -> bool:
        try:
            run(i)
            return all(_close(got, ref) for got, ref in zip((out, second), refs) if ref is not None)
        except RuntimeError:
            return False
    path = _cache_path(key, a.device)
    entry = _read_entry(path, plan)
    if entry is not None and (entry["choice"] == _TORCH or matches(entry["choice"])):
        _timings[key] = (entry["torch_ms"], entry["best_ms"])
        _cached.add(key)
        return _TORCH if entry["choice"] == _TORCH else (plan, entry["choice"])
    candidates, runs = [_TORCH], [lambda: _torch_run(a, b, bias, mode, pre)]
    for i in range(plan.count):
        if matches(i):
            candidates.append((plan, i))
            runs.append(lambda i=i: run(i))
    times = fastest(runs, _gpu_ms)
    best = min(range(len(runs)), key=times.__getitem__)
    _timings[key] = (times[0], times[best])
    _write_entry(path, plan, _TORCH if best == 0 else candidates[best][1], times[0], times[best])
    log.debug("tuned matmul %s @ %s%s%s: %s (%.1f us; torch's %.1f us; %d candidates)", tuple(a.shape),
              tuple(b.shape), " + bias" if bias is not None else "", f" ({mode})" if mode else "",
              "torch" if best == 0 else f"cublaslt #{candidates[best][1]}", times[best] * 1e3, times[0] * 1e3, len(runs))
    return candidates[best]


# ------------------------------------------------------------------------------------- the cache folder
def _cache_path(key: tuple, device: torch.device) -> Optional[Path]:
    """The file of a shape's choice in CACHE_DIR: its name hashes the shape key (less the device index)
    with what a timing holds for: the GPU model, cuBLASLt's and torch's versions, the candidates asked for."""
    if CACHE_DIR is None:
        return None
    what = (CACHE_FORMAT, _gpu_name(device), _lt_version(), torch.__version__, MAX_ALGOS, WORKSPACE_BYTES,
            key[:_KEY_DEVICE] + key[_KEY_DEVICE + 1:])
    return CACHE_DIR / (hashlib.sha256(repr(what).encode()).hexdigest()[:40] + ".json")


def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _lt_version() -> int:
    lib, _ = _library()
    lib.cublasLtGetVersion.restype = ctypes.c_size_t
    return int(lib.cublasLtGetVersion())


def _algorithms_digest(plan) -> str:
    """A digest of the algorithms the heuristic listed, in order: a kept index means the same algorithm
    only while this is unchanged."""
    return hashlib.sha256(b"".join(bytes(plan.results[i].algo) for i in range(plan.count))).hexdigest()[:32]


def _read_entry(path: Optional[Path], plan) -> Optional[dict]:
    """A cache entry that still fits the plan (the same algorithms listed), or None."""
    if path is None:
        return None
    try:
        entry = json.loads(path.read_text())
        choice = entry["choice"]
        fits = (entry["algorithms"] == _algorithms_digest(plan)
                and (choice == _TORCH or (type(choice) is int and 0 <= choice < plan.count)))
        entry["torch_ms"], entry["best_ms"] = float(entry["torch_ms"]), float(entry["best_ms"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.debug("tuned matmul: ignoring the cache entry %s (%s)", path, e)
        return None
    return entry if fits else None


_unwritable: set[Path] = set()  # cache folders already warned about


def _write_entry(path: Optional[Path], plan, choice, torch_ms: float, best_ms: float) -> None:
    """Keep a shape's choice, written whole or not at all (a temporary file renamed into place), so runs
    sharing the folder never read half an entry."""
    if path is None or path.parent in _unwritable:
        return
    entry = {"choice": choice, "algorithms": _algorithms_digest(plan), "torch_ms": torch_ms, "best_ms": best_ms}
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # one a writer
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, path)
    except OSError as e:
        _unwritable.add(path.parent)
        log.warning("compile.tuned_gemm_cache: cannot write to %s (%s); tuned choices are not kept for later runs",
                    path.parent, e)


def _close(got: Tensor, ref: Tensor, rows: int = 1024) -> bool:
    """max |got - ref| <= 1e-2 max |ref| + 1e-3, over blocks of rows: a shape is tuned at its first call,
    often deep in a backward where memory peaks, and fp32 copies of a whole (13,600, 4,096) product and
    its difference would add ~0.7 GiB there."""
    err = top = torch.zeros((), device=ref.device)
    for g, r in zip(got.split(rows), ref.split(rows)):
        r = r.float()
        err, top = torch.maximum(err, (g.float() - r).abs().max()), torch.maximum(top, r.abs().max())
    return bool(err <= 1e-2 * top + 1e-3)


def fastest(runs: list[Callable[[], object]], time_ms: Callable[[Callable[[], object]], float],
            rounds: int = 2) -> list[float]:
    """Each run's best time over ``rounds`` rounds, the runs taken in turn within a round (so a drift of the
    GPU's clock falls on all of them alike); a run that raises gets inf."""
    times = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            try:
                times[i] = min(times[i], time_ms(run))
            except RuntimeError:
                pass
    return times


def _gpu_ms(run: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(SPIN_CYCLES)
    start.record()
    for _ in range(REPS):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / REPS


# ------------------------------------------------------------------------------------------ cuBLASLt
class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _library():
    """cuBLASLt as torch loaded it (its path from the process's memory map), with a handle; None if absent."""
    global _lt
    if _lt is None:
        _lt = False
        try:
            with open("/proc/self/maps") as maps:
                path = next((line.split()[-1] for line in maps if "libcublasLt.so" in line), "libcublasLt.so")
            lib = ctypes.CDLL(path)
            handle = ctypes.c_void_p()
            _check(lib.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
            _lt = (lib, handle)
        except (OSError, RuntimeError) as e:
            log.warning("compile.tuned_gemm: cuBLASLt could not be loaded (%s); torch's matmul runs", e)
    return _lt or None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


_COMPUTE_32F, _SCALE_32F = 68, 0  # cublasComputeType_t, cudaDataType_t
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8  # cublasLtMatmulDescAttributes_t
_DESC_AUX_POINTER, _DESC_AUX_LD = 11, 12
# cublasLtEpilogue_t (mode, bias): bias; GELU writing its input (aux), without or with a bias; GELU's gradient
# reading it; the sums of cuBLAS's B operand (a) over the shared dimension written to the bias pointer (BGRADB)
_EPILOGUES = {("", True): 4, ("gelu", False): 160, ("gelu", True): 164, ("dgelu", False): 192, ("bgrad", False): 512}
_STATUS_NOT_SUPPORTED = 15
_PREF_MAX_WORKSPACE, _PREF_ALIGN_A, _PREF_ALIGN_B, _PREF_ALIGN_C, _PREF_ALIGN_D = 1, 5, 6, 7, 8


class _Plan:
    """One shape's cuBLASLt descriptors and the heuristic's algorithms. C = a @ b (row-major) is computed
    as cuBLAS's column-major C^T = b^T a^T: its A operand is b, its B operand a."""

    def __init__(self, a: Tensor, b: Tensor, bias: Optional[Tensor], mode: str = ""):
        self.lib, self.handle = _library()
        lib = self.lib
        dtype = _DTYPES[a.dtype]
        (br, bc, bld, op_b), (ar, ac, ald, op_a) = _layout(b), _layout(a)
        m, n = b.shape[1], a.shape[0]
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _SCALE_32F), "MatmulDescCreate")
        self._set(_DESC_TRANSA, ctypes.c_int32(op_b))
        self._set(_DESC_TRANSB, ctypes.c_int32(op_a))
        self.bias = bias is not None
        self.aux = mode in ("gelu", "dgelu")
        self.bgrad = mode == "bgrad"
        epilogue = _EPILOGUES.get((mode, self.bias))
        if epilogue is not None:
            self._set(_DESC_EPILOGUE, ctypes.c_int32(epilogue))
        if self.aux:  # the GELU input: laid out as the output
            self._set(_DESC_AUX_LD, ctypes.c_int64(m))
        self.layout_a, self.layout_b, self.layout_c = (self._layout(dtype, *shape) for shape in
                                                        ((br, bc, bld), (ar, ac, ald), (m, n, m)))
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
        for attr, value in ((_PREF_MAX_WORKSPACE, ctypes.c_uint64(WORKSPACE_BYTES)),
                            (_PREF_ALIGN_A, ctypes.c_uint32(_alignment(b))),
                            (_PREF_ALIGN_B, ctypes.c_uint32(_alignment(a))),
                            (_PREF_ALIGN_C, ctypes.c_uint32(256)), (_PREF_ALIGN_D, ctypes.c_uint32(256))):
            _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, attr, ctypes.byref(value), ctypes.sizeof(value)),
                   "MatmulPreferenceSetAttribute")
        self.results = (_HeuristicResult * MAX_ALGOS)()
        count = ctypes.c_int()
        status = lib.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.layout_a, self.layout_b,
                                                    self.layout_c, self.layout_c, pref, MAX_ALGOS, self.results,
                                                    ctypes.byref(count))
        if status == _STATUS_NOT_SUPPORTED:  # no algorithm for this epilogue and layout: torch's kernels run
            count.value = 0
        else:
            _check(status, "MatmulAlgoGetHeuristic")
        lib.cublasLtMatmulPreferenceDestroy(pref)
        self.count = count.value
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def _set(self, attr: int, value) -> None:
        _check(self.lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(value), ctypes.sizeof(value)),
               "MatmulDescSetAttribute")

    def _layout(self, dtype: int, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
        layout = ctypes.c_void_p()
        _check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, ctypes.c_uint64(rows),
                                                   ctypes.c_uint64(cols), ctypes.c_int64(ld)), "MatrixLayoutCreate")
        return layout

    def run(self, index: int, a: Tensor, b: Tensor, bias: Optional[Tensor], out: Tensor, aux: Optional[Tensor],
            workspace: Tensor) -> None:
        """out = the mode's product; ``aux``: the GELU input written (gelu) or read (dgelu), the row sums
        written (bgrad)."""
        if self.bias or self.bgrad:
            self._set(_DESC_BIAS_POINTER, ctypes.c_void_p((aux if self.bgrad else bias).data_ptr()))
        if self.aux:
            self._set(_DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))
        c = ctypes.c_void_p(out.data_ptr())
        stream = ctypes.c_void_p(torch.cuda.current_stream(a.device).cuda_stream)
        _check(self.lib.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(self.alpha), ctypes.c_void_p(b.data_ptr()), self.layout_a,
            ctypes.c_void_p(a.data_ptr()), self.layout_b, ctypes.byref(self.beta), c, self.layout_c, c, self.layout_c,
            ctypes.byref(self.results[index].algo), ctypes.c_void_p(workspace.data_ptr()),
            ctypes.c_size_t(WORKSPACE_BYTES), stream), "Matmul")
