"""Dropout whose keep-mask comes from a Triton kernel: 8 entries of 16 random bits from each Philox call.

``compile.dropout_masks`` (auto: where the model is compiled on an NVIDIA GPU). Inside compiled code,
inductor draws a dropout mask with one Philox4x32-10 call per element and keeps one of its four 32-bit
words (Triton's ``tl.rand``); on roberta-large at batch 256 that integer work, not memory, sets the time
of the kernels that hold the hidden and LoRA dropouts (+3.6% samples/s with this module on an H200).
Here one call gives 8 entries (16 bits each: an entry is dropped with probability round(p * 65536) /
65536, within 7.7e-6 of p), written as a bool mask that the compiled code multiplies in, so its
pointwise kernels only read it. The seed is drawn on the device at each call (a CUDA-graph replay
draws a new one). The masks' memory is what inductor's own dropout keeps for the backward (a bool a value).
"""

from __future__ import annotations

import os

import torch

from seqcls.short_attention import _PHILOX_ROUNDS, SEED_BOUND, available

if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _mask_kernel(out_ptr, seed_ptr, n, threshold, BLOCK: tl.constexpr, ROUNDS: tl.constexpr):
        W: tl.constexpr = BLOCK // 8
        pid = tl.program_id(0)
        r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), pid * W + tl.arange(0, W), ROUNDS)
        r = tl.join(tl.join(r0, r1), tl.join(r2, r3))
        r = tl.join(r & 0xFFFF, (r >> 16) & 0xFFFF)
        index = pid * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + index, tl.reshape(r, (BLOCK,)) >= threshold, mask=index < n)

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


def keep_mask(shape: list[int], p: float, device: torch.device) -> torch.Tensor:
    """dropout_keep with a seed drawn on the device at each call (a CUDA-graph replay draws a new one)."""
    seed = torch.randint(0, SEED_BOUND, (1,), dtype=torch.int64, device=device)
    return dropout_keep(seed, shape, p)


class MaskDropout(torch.nn.Dropout):
    """nn.Dropout with its keep-mask from dropout_keep (state dict, names and ``p`` unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        if x.numel() >= 2**31:  # the kernel's indices are 32-bit
            return super().forward(x)
        return x * keep_mask(list(x.shape), self.p, x.device) * (1.0 / (1.0 - self.p))


def mask_dropout(model: torch.nn.Module) -> int:
    """Make every plain nn.Dropout of ``model`` a MaskDropout, in place. Returns how many."""
    from seqcls.models import _swap_class
    return _swap_class(model, torch.nn.Dropout, MaskDropout)
