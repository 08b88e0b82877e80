"""A LoRA layer's input side as one Triton kernel: [x | c (m ⊙ x) A^T], ``compile.lora_input=triton``.

``seqcls.lora.lora_linear`` multiplies [x | u] by [W | B], u = scale * A(dropout(x)). Built from torch ops
that input costs, per layer and step, a dropout multiply that writes the dropped x, a GEMM of K = in and
N = rank that reads it back, and a copy of x and u into [x | u]: on roberta-large at batch 256 (13.6k
tokens) 0.39 + 0.23 + 0.33 ms a step over the 24 layers. Here one kernel reads x and the keep-mask once,
writes x into [x | u] and accumulates u = c (m ⊙ x) A^T in registers (c = scale / (1 - p)); its backward
reads the gradient of [x | u], x and the mask once and writes x's gradient (the base part plus
c ((du A) ⊙ m)) and per block of rows a partial of A's, c du^T (m ⊙ x), summed after (no atomics: the
same sums every run). The mask comes from seqcls.dropout's kernel and is kept for the backward (one byte
an entry, where the torch ops kept the dropped x, two).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqcls.short_attention import available

if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _forward_kernel(x_ptr, keep_ptr, a_ptr, xu_ptr, n_rows, c, IN: tl.constexpr, R: tl.constexpr,
                        R_PAD: tl.constexpr, HAS_KEEP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        live = (rows < n_rows)[:, None]
        r = tl.arange(0, R_PAD)
        acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
        for k in range(0, IN, BK):
            cols = k + tl.arange(0, BK)
            x = tl.load(x_ptr + rows[:, None] * IN + cols[None, :], mask=live, other=0.0)
            tl.store(xu_ptr + rows[:, None] * (IN + R) + cols[None, :], x, mask=live)
            if HAS_KEEP:
                keep = tl.load(keep_ptr + rows[:, None] * IN + cols[None, :], mask=live, other=0)
                x = tl.where(keep != 0, x, tl.zeros_like(x))
            a = tl.load(a_ptr + r[:, None] * IN + cols[None, :], mask=(r < R)[:, None], other=0.0)
            acc += tl.dot(x, tl.trans(a))
        tl.store(xu_ptr + rows[:, None] * (IN + R) + IN + r[None, :], (acc * c).to(xu_ptr.dtype.element_ty),
                 mask=live & (r < R)[None, :])

    @triton.jit
    def _backward_kernel(dxu_ptr, x_ptr, keep_ptr, a_ptr, dx_ptr, part_ptr, n_rows, c, IN: tl.constexpr,
                         R: tl.constexpr, R_PAD: tl.constexpr, HAS_KEEP: tl.constexpr, BM: tl.constexpr,
                         BK: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BM + tl.arange(0, BM)
        live = (rows < n_rows)[:, None]
        r = tl.arange(0, R_PAD)
        du = tl.load(dxu_ptr + rows[:, None] * (IN + R) + IN + r[None, :], mask=live & (r < R)[None, :], other=0.0)
        du = (du.to(tl.float32) * c).to(du.dtype)
        for k in range(0, IN, BK):
            cols = k + tl.arange(0, BK)
            a = tl.load(a_ptr + r[:, None] * IN + cols[None, :], mask=(r < R)[:, None], other=0.0)
            lora = tl.dot(du, a)
            x = tl.load(x_ptr + rows[:, None] * IN + cols[None, :], mask=live, other=0.0)
            if HAS_KEEP:
                keep = tl.load(keep_ptr + rows[:, None] * IN + cols[None, :], mask=live, other=0) != 0
                lora = tl.where(keep, lora, 0.0)
                x = tl.where(keep, x, tl.zeros_like(x))
            g = tl.load(dxu_ptr + rows[:, None] * (IN + R) + cols[None, :], mask=live, other=0.0)
            tl.store(dx_ptr + rows[:, None] * IN + cols[None, :], (g.to(tl.float32) + lora).to(dx_ptr.dtype.element_ty),
                     mask=live)
            part = tl.dot(tl.trans(du), x)
            tl.store(part_ptr + (pid * R_PAD + r[:, None]) * IN + cols[None, :], part)

_BM, _BK, _WARPS = 64, 64, 4  # rows and columns a program's tile holds; its warps


def takes(x: Tensor) -> bool:
    """Whether the kernels take rows ``x``: fp16/bf16, a width that is a multiple of their column block.
    (Whether Triton runs on x's device is the builder's check: compile.lora_input=triton.)"""
    return x.dtype in (torch.float16, torch.bfloat16) and x.shape[-1] % _BK == 0


def _launch_shape(a: Tensor, n_rows: int) -> tuple[int, int, int]:
    rank = a.shape[0]
    return rank, max(16, triton.next_power_of_2(rank)), triton.cdiv(n_rows, _BM)


@torch.library.custom_op("seqcls::lora_input", mutates_args=())
def lora_input(x: Tensor, keep: Optional[Tensor], a: Tensor, c: float) -> Tensor:
    """[x | c (keep ⊙ x) A^T] for rows x (n, in), a bool keep-mask like x (None: no dropout) and A (rank, in)
    of x's dtype."""
    n, width = x.shape
    rank, r_pad, blocks = _launch_shape(a, n)
    xu = torch.empty(n, width + rank, dtype=x.dtype, device=x.device)
    if n:
        _forward_kernel[(blocks,)](x, keep, a, xu, n, c, IN=width, R=rank, R_PAD=r_pad, HAS_KEEP=keep is not None,
                                   BM=_BM, BK=_BK, num_warps=_WARPS)
    return xu


@lora_input.register_fake
def _(x, keep, a, c):
    return x.new_empty(x.shape[0], x.shape[1] + a.shape[0])


@torch.library.custom_op("seqcls::lora_input_backward", mutates_args=())
def lora_input_backward(dxu: Tensor, x: Tensor, keep: Optional[Tensor], a: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """The gradients of x and A from that of [x | u]."""
    n, width = x.shape
    rank, r_pad, blocks = _launch_shape(a, n)
    dx = torch.empty_like(x)
    part = torch.empty(max(blocks, 1), r_pad, width, dtype=torch.float32, device=x.device)
    if n:
        _backward_kernel[(blocks,)](dxu.contiguous(), x, keep, a, dx, part, n, c, IN=width, R=rank, R_PAD=r_pad,
                                    HAS_KEEP=keep is not None, BM=_BM, BK=_BK, num_warps=_WARPS)
    else:
        part.zero_()
    return dx, part.sum(0)[:rank].to(a.dtype)


@lora_input_backward.register_fake
def _(dxu, x, keep, a, c):
    return torch.empty_like(x), torch.empty_like(a)


def _setup_context(ctx, inputs, output):
    x, keep, a, c = inputs
    ctx.save_for_backward(x, keep, a)
    ctx.c = c


def _backward(ctx, dxu):
    x, keep, a = ctx.saved_tensors
    dx, da = lora_input_backward(dxu, x, keep, a, ctx.c)
    return dx, None, da, None


lora_input.register_autograd(_backward, setup_context=_setup_context)


def joined_input(rows: Tensor, dropout: torch.nn.Module, a: Tensor, scale: float) -> Tensor:
    """[rows | scale A(dropout(rows))] through lora_input, the mask drawn by seqcls.dropout's kernel
    (``dropout``: the adapter's nn.Dropout or nn.Identity). Rows and A in rows' dtype."""
    from seqcls.dropout import keep_mask
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    keep = keep_mask(list(rows.shape), p, rows.device) if p > 0.0 else None
    return lora_input(rows.contiguous(), keep, a.to(rows.dtype).contiguous(), scale / (1.0 - p))
