"""Attention for short sequences: one Triton program per (sequence, head) holds the whole score matrix.

``model.attn_implementation=seqcls_short``. Fused attention kernels (cuDNN, flash) tile long sequences
and keep a running softmax across key blocks; for GLUE-length inputs (MRPC: ~53 tokens) their tiles are
mostly empty and their backward runs three kernels. Here a sequence's scores (at most 128 x 128) fit in
one program, so the forward is scores -> mask -> softmax -> dropout -> mixing in one pass, and the
backward recomputes the probabilities from the saved log-sum-exp and regenerates the dropout mask from
the saved seed, in one kernel that writes dq, dk and dv.

Same signature as Hugging Face's attention kernels (AttentionInterface), with sdpa's boolean mask
(True: attend); a row with no key to attend to gives zeros. CPU tensors (unless Triton's interpreter is on),
longer sequences, a query length other than the key length, or a non-boolean mask go to
``F.scaled_dot_product_attention``. Outputs are written in (batch, length, heads, dim) order, the order
HF reshapes them to next, and gradients in the order of the projections that made q, k and v.
"""

import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_LEN = 128
"""Longest sequence this kernel takes: its score matrix is one program's registers."""


@triton.jit
def _scores(q, k, b, h, m_ptr, smb, smh, smq, smk, rows, cols, L, scale, HAS_MASK: tl.constexpr,
            PREC: tl.constexpr):
    """Scaled scores with masked and out-of-range keys at -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * scale
    keep = (cols < L)[None, :] & (rows < L)[:, None]
    if HAS_MASK:
        m = tl.load(m_ptr + b * smb + h * smh + rows[:, None] * smq + cols[None, :] * smk,
                    mask=keep, other=0)
        keep = keep & (m != 0)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _keep_mask(seed_ptr, bh, rows, cols, p_drop, BL: tl.constexpr):
    """Dropout's keep mask for one (sequence, head): the same numbers in forward and backward."""
    seed = tl.load(seed_ptr)
    return tl.rand(seed, (bh * BL + rows[:, None]) * BL + cols[None, :]) >= p_drop


@triton.jit
def _tile(ptr, b, h, sb, sh, sl, rows, dims, inside):
    """One (sequence, head)'s (BL, D) rows of a (batch, heads, length, dim)-strided tensor; zeros past its end."""
    return tl.load(ptr + b * sb + h * sh + rows[:, None] * sl + dims[None, :], mask=inside, other=0.0)


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, lse_ptr, seed_ptr,
                sqb, sqh, sql, skb, skh, skl, svb, svh, svl, smb, smh, smq, smk, sob, soh, sol,
                H, L, scale, p_drop,
                D: tl.constexpr, BL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                PREC: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    rows, dims = tl.arange(0, BL), tl.arange(0, D)
    inside = (rows < L)[:, None]
    q = _tile(q_ptr, b, h, sqb, sqh, sql, rows, dims, inside)
    k = _tile(k_ptr, b, h, skb, skh, skl, rows, dims, inside)
    v = _tile(v_ptr, b, h, svb, svh, svl, rows, dims, inside)
    s = _scores(q, k, b, h, m_ptr, smb, smh, smq, smk, rows, rows, L, scale, HAS_MASK, PREC)
    top = tl.max(s, 1)
    top = tl.where(top == float("-inf"), 0.0, top)  # a row with no key to attend to: all zeros
    e = tl.exp(s - top[:, None])
    total = tl.sum(e, 1)
    total = tl.where(total == 0.0, 1.0, total)
    p = e / total[:, None]
    tl.store(lse_ptr + bh * L + rows, top + tl.log(total), mask=rows < L)
    if DROPOUT:
        p = tl.where(_keep_mask(seed_ptr, bh, rows, rows, p_drop, BL), p / (1.0 - p_drop), 0.0)
    o = tl.dot(p.to(v.dtype), v, input_precision=PREC)
    tl.store(o_ptr + b * sob + h * soh + rows[:, None] * sol + dims[None, :], o.to(o_ptr.dtype.element_ty),
             mask=inside)


@triton.jit
def _bwd_kernel(q_ptr, k_ptr, v_ptr, m_ptr, do_ptr, lse_ptr, seed_ptr, dq_ptr, dk_ptr, dv_ptr,
                sqb, sqh, sql, skb, skh, skl, svb, svh, svl, smb, smh, smq, smk, sob, soh, sol, sgb, sgh, sgl,
                H, L, scale, p_drop,
                D: tl.constexpr, BL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                PREC: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    rows, dims = tl.arange(0, BL), tl.arange(0, D)
    inside = (rows < L)[:, None]
    q = _tile(q_ptr, b, h, sqb, sqh, sql, rows, dims, inside)
    k = _tile(k_ptr, b, h, skb, skh, skl, rows, dims, inside)
    v = _tile(v_ptr, b, h, svb, svh, svl, rows, dims, inside)
    do = _tile(do_ptr, b, h, sob, soh, sol, rows, dims, inside)
    s = _scores(q, k, b, h, m_ptr, smb, smh, smq, smk, rows, rows, L, scale, HAS_MASK, PREC)
    lse = tl.load(lse_ptr + bh * L + rows, mask=rows < L, other=0.0)
    p = tl.exp(s - lse[:, None])  # the forward's probabilities; masked entries exp(-inf) = 0
    dpd = tl.dot(do, tl.trans(v), input_precision=PREC).to(tl.float32)  # gradient of the dropped-out probabilities
    if DROPOUT:
        keep = _keep_mask(seed_ptr, bh, rows, rows, p_drop, BL)
        pd = tl.where(keep, p / (1.0 - p_drop), 0.0)
        dp = tl.where(keep, dpd / (1.0 - p_drop), 0.0)
    else:
        pd = p
        dp = dpd
    dv = tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PREC)
    ds = p * (dp - tl.sum(p * dp, 1)[:, None])  # softmax backward; sum_j p*dp = rowsum(dO * O)
    ds = ds.to(q.dtype)
    dq = tl.dot(ds, k, input_precision=PREC) * scale
    dk = tl.dot(tl.trans(ds), q, input_precision=PREC) * scale
    out = b * sgb + h * sgh + rows[:, None] * sgl + dims[None, :]
    tl.store(dq_ptr + out, dq.to(dq_ptr.dtype.element_ty), mask=inside)
    tl.store(dk_ptr + out, dk.to(dk_ptr.dtype.element_ty), mask=inside)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=inside)


def _block(length: int) -> int:
    return max(16, triton.next_power_of_2(length))  # tl.dot takes tiles of 16 and more


def _mask_args(mask: Optional[torch.Tensor], b: int, h: int, length: int, like: torch.Tensor):
    if mask is None:
        return like, (0, 0, 0, 0), False
    mask = mask.expand(b, h, length, length)  # broadcast dimensions get stride 0
    return mask, mask.stride(), True


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 inputs stay fp32 (tf32 only touches fp32)


def _warps(block: int, backward: bool = False) -> int:
    """Warps per program: the score matrix and, in the backward, four more of its size live in registers.
    A first guess, to be tuned on the GPU."""
    return {16: 4, 32: 4, 64: 8 if backward else 4, 128: 16 if backward else 8}[block]


@torch.library.custom_op("seqcls::short_attention_fwd", mutates_args=())
def short_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                        p_drop: float, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, heads, length, dim) q, k, v -> output (batch, length, heads, dim), log-sum-exp, dropout seed."""
    b, h, length, d = q.shape
    block = _block(length)
    out = torch.empty(b, length, h, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b * h, length, dtype=torch.float32, device=q.device)
    # Drawn on the device, so a CUDA graph replay draws a new one (a Python int would be baked in).
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=q.device)
    m, ms, has_mask = _mask_args(mask, b, h, length, q)
    _fwd_kernel[(b * h,)](q, k, v, m, out, lse, seed, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *ms,
                          out.stride(0), out.stride(2), out.stride(1), h, length, scale, p_drop,
                          D=d, BL=block, HAS_MASK=has_mask, DROPOUT=p_drop > 0, PREC=_precision(q),
                          num_warps=_warps(block))
    return out, lse, seed


@short_attention_fwd.register_fake
def _(q, k, v, mask, p_drop, scale):
    b, h, length, d = q.shape
    return (q.new_empty(b, length, h, d), q.new_empty(b * h, length, dtype=torch.float32),
            q.new_empty(1, dtype=torch.int64))


@torch.library.custom_op("seqcls::short_attention_bwd", mutates_args=())
def short_attention_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: Optional[torch.Tensor], lse: torch.Tensor, seed: torch.Tensor, p_drop: float,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv as (batch, heads, length, dim) views of (batch, length, heads, dim) buffers."""
    b, h, length, d = q.shape
    block = _block(length)
    grads = [torch.empty(b, length, h, d, dtype=q.dtype, device=q.device) for _ in range(3)]
    m, ms, has_mask = _mask_args(mask, b, h, length, q)
    g = grads[0]
    _bwd_kernel[(b * h,)](q, k, v, m, grad, lse, seed, *grads, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                          *ms, grad.stride(0), grad.stride(2), grad.stride(1), g.stride(0), g.stride(2), g.stride(1),
                          h, length, scale, p_drop,
                          D=d, BL=block, HAS_MASK=has_mask, DROPOUT=p_drop > 0, PREC=_precision(q),
                          num_warps=_warps(block, backward=True))
    return tuple(x.transpose(1, 2) for x in grads)


@short_attention_bwd.register_fake
def _(grad, q, k, v, mask, lse, seed, p_drop, scale):
    b, h, length, d = q.shape
    return tuple(q.new_empty(b, length, h, d).transpose(1, 2) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, p_drop, scale = inputs
    _, lse, seed = output
    ctx.save_for_backward(q, k, v, mask, lse, seed)
    ctx.p_drop, ctx.scale = p_drop, scale


def _backward(ctx, grad_out, _grad_lse, _grad_seed):
    q, k, v, mask, lse, seed = ctx.saved_tensors
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    dq, dk, dv = short_attention_bwd(grad_out, q, k, v, mask, lse, seed, ctx.p_drop, ctx.scale)
    return dq, dk, dv, None, None, None


short_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def short_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                    scaling: Optional[float] = None, **_: Any) -> tuple[torch.Tensor, None]:
    """HF attention kernel: (batch, heads, length, dim) in, ((batch, length, heads, dim), None) out."""
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    p_drop = float(dropout) if module.training else 0.0
    length = query.shape[2]
    usable = ((query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")  # Triton's CPU interpreter: tests
              and length <= MAX_LEN and key.shape[2] == length and query.shape[-1] in (16, 32, 64, 128)
              and (attention_mask is None or attention_mask.dtype == torch.bool)
              and query.dtype == key.dtype == value.dtype)
    if not usable:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=p_drop,
                                             scale=scale)
        return out.transpose(1, 2), None
    query, key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key, value))
    return short_attention_fwd(query, key, value, attention_mask, p_drop, scale)[0], None


def register() -> None:
    """Make ``attn_implementation="seqcls_short"`` known to Hugging Face, with sdpa's boolean mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register("seqcls_short", short_attention)
    AttentionMaskInterface.register("seqcls_short", sdpa_mask)
