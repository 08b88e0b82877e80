"""Dropout whose keep-mask comes from a Triton kernel: 8 entries of 16 random bits from each Philox call.

``compile.dropout_masks`` (auto: where the model is compiled on an NVIDIA GPU). Inside compiled code,
inductor draws a dropout mask with one Philox4x32-10 call per element and keeps one of its four 32-bit
words (Triton's ``tl.rand``); on roberta-large at batch 256 that integer work, not memory, sets the time
of the kernels that hold the hidden and LoRA dropouts (+3.6% samples/s with this module on an H200).
Here one call gives 8 entries (16 bits each: an entry is dropped with probability round(p * 65536) /
65536, within 7.7e-6 of p), written as a bool mask that the compiled code multiplies in, so its
pointwise kernels only read it. The seed is drawn on the device at each call (a CUDA-graph replay
draws a new one). The masks' memory is what inductor's own dropout keeps for the backward (a bool a value).
``compile.dropout_masks=triton_bits`` packs a mask 8 entries a byte instead (the 8 entries of one
Philox call), and the compiled code unpacks them where it multiplies them in: an eighth of the mask's
bytes written, kept for the backward and read by the forward and backward passes.
"""

from __future__ import annotations

import math
import os

import torch

from seqcls.short_attention import _PHILOX_ROUNDS, SEED_BOUND, available

if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _philox16(seed_ptr, first, CALLS: tl.constexpr, ROUNDS: tl.constexpr):
        """16-bit random values, 8 from each of Philox calls first .. first + CALLS - 1: (CALLS, 8)."""
        r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), first + tl.arange(0, CALLS), ROUNDS)
        r = tl.join(tl.join(r0, r1), tl.join(r2, r3))
        r = tl.join(r & 0xFFFF, (r >> 16) & 0xFFFF)
        return tl.reshape(r, (CALLS, 8))

    @triton.jit
    def _mask_kernel(out_ptr, seed_ptr, n, threshold, BLOCK: tl.constexpr, ROUNDS: tl.constexpr):
        pid = tl.program_id(0)
        r = _philox16(seed_ptr, pid * (BLOCK // 8), BLOCK // 8, ROUNDS)
        index = pid * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + index, tl.reshape(r, (BLOCK,)) >= threshold, mask=index < n)

    @triton.jit
    def _mask_bits_kernel(out_ptr, seed_ptr, n_bytes, threshold, BYTES: tl.constexpr, ROUNDS: tl.constexpr):
        """Byte j holds _mask_kernel's entries 8j .. 8j + 7 for the same seed (Philox call j's), entry 8j + k
        as bit k."""
        pid = tl.program_id(0)
        keep = (_philox16(seed_ptr, pid * BYTES, BYTES, ROUNDS) >= threshold).to(tl.uint8)
        byte = tl.sum(keep << tl.arange(0, 8).to(tl.uint8)[None, :], axis=1).to(tl.uint8)
        index = pid * BYTES + tl.arange(0, BYTES)
        tl.store(out_ptr + index, byte, mask=index < n_bytes)

_BLOCK = 2048


def supported(device: torch.device) -> bool:
    """Whether the kernel runs on ``device``: Triton on an NVIDIA GPU (on CPU only under TRITON_INTERPRET=1)."""
    return available() and ((device.type == "cuda" and torch.version.hip is None)
                            or os.environ.get("TRITON_INTERPRET") == "1")


@torch.library.custom_op("seqcls::dropout_keep", mutates_args=())
def dropout_keep(seed: torch.Tensor, shape: list[int], p: float) -> torch.Tensor:
    """A bool keep-mask of ``shape``, each entry kept with probability 1 - round(p * 65536) / 65536, from
    Philox keyed by ``seed`` (a one-element int64 tensor on the mask's device)."""
    out = torch.empty(shape, dtype=torch.bool, device=seed.device)
    n = out.numel()
    if n:
        _mask_kernel[(triton.cdiv(n, _BLOCK),)](out, seed, n, round(p * 65536), BLOCK=_BLOCK, ROUNDS=_PHILOX_ROUNDS)
    return out


@dropout_keep.register_fake
def _(seed, shape, p):
    return torch.empty(shape, dtype=torch.bool, device=seed.device)


@torch.library.custom_op("seqcls::dropout_keep_bits", mutates_args=())
def dropout_keep_bits(seed: torch.Tensor, n: int, p: float) -> torch.Tensor:
    """dropout_keep's mask of ``n`` entries for the same seed, packed 8 a byte (uint8, ceil(n / 8) bytes):
    entry i is bit i % 8 of byte i // 8 (unpack_keep reads it)."""
    n_bytes = -(-n // 8)
    out = torch.empty(n_bytes, dtype=torch.uint8, device=seed.device)
    if n_bytes:
        _mask_bits_kernel[(triton.cdiv(n_bytes, _BLOCK // 8),)](out, seed, n_bytes, round(p * 65536),
                                                                 BYTES=_BLOCK // 8, ROUNDS=_PHILOX_ROUNDS)
    return out


@dropout_keep_bits.register_fake
def _(seed, n, p):
    return torch.empty(-(-n // 8), dtype=torch.uint8, device=seed.device)


def unpack_keep(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The 0/1 (uint8) keep-mask of ``shape`` from dropout_keep_bits's bytes; plain tensor ops, so that
    inductor computes it inside the kernel that multiplies it in."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:math.prod(shape)].view(shape)


def keep_mask(shape: list[int], p: float, device: torch.device, packed: bool = False) -> torch.Tensor:
    """dropout_keep (or, packed, dropout_keep_bits unpacked) with a seed drawn on the device at each call
    (a CUDA-graph replay draws a new one)."""
    seed = torch.randint(0, SEED_BOUND, (1,), dtype=torch.int64, device=device)
    if packed:
        return unpack_keep(dropout_keep_bits(seed, math.prod(shape), p), shape)
    return dropout_keep(seed, shape, p)


class MaskDropout(torch.nn.Dropout):
    """nn.Dropout with its keep-mask from dropout_keep (state dict, names and ``p`` unchanged); with
    ``packed_mask``, from dropout_keep_bits."""

    packed_mask = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        if x.numel() >= 2**31:  # the kernel's indices are 32-bit
            return super().forward(x)
        return x * keep_mask(list(x.shape), self.p, x.device, self.packed_mask) * (1.0 / (1.0 - self.p))


def mask_dropout(model: torch.nn.Module, packed: bool = False) -> int:
    """Make every plain nn.Dropout of ``model`` a MaskDropout (``packed``: with masks 8 entries a byte),
    in place. Returns how many."""
    from seqcls.models import _swap_class
    n = _swap_class(model, torch.nn.Dropout, MaskDropout)
    if packed:
        for module in model.modules():
            if isinstance(module, MaskDropout):
                module.packed_mask = True
    return n
