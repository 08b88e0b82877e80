#!/usr/bin/env python
"""Attention alone: seqcls's short-sequence kernel against torch's SDPA back-ends, forward and backward.

    python scripts/bench_attention.py --batch 32,256 --length 64,128
    TRITON_INTERPRET=1 python scripts/bench_attention.py --device cpu --batch 2 --length 16 --heads 2 --iters 1

Shapes are roberta-large's (16 heads of 64) in the layout HF hands over ((batch, heads, length, dim) views
of the projections' (batch, length, hidden) outputs), bf16 on CUDA, with a padding mask whose real lengths
are drawn between half the length and all of it, and dropout 0.1 in training mode. Each line is the median
over --iters timed calls (CUDA events) after 3 warm-up calls.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def timed(fn, iters: int, device: str) -> float:
    """Median milliseconds of fn()."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch", default="32,256")
    ap.add_argument("--length", default="64,128")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    from seqcls.attention import short_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    layer = torch.nn.Module().train()
    impls = {"seqcls_short": None}
    if args.device == "cuda":
        impls.update({"sdpa (default)": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                         SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
                      "sdpa cuDNN": [SDPBackend.CUDNN_ATTENTION], "sdpa mem-efficient": [SDPBackend.EFFICIENT_ATTENTION]})
    else:
        impls["sdpa"] = [SDPBackend.MATH]
    print(f"| batch | length | impl | forward ms | forward + backward ms |\n|---|---|---|---|---|")
    for batch in map(int, args.batch.split(",")):
        for length in map(int, args.length.split(",")):
            gen = torch.Generator(device=args.device).manual_seed(0)
            q, k, v = (torch.randn(batch, length, args.heads * args.dim, device=args.device, dtype=dtype, generator=gen)
                       .view(batch, length, args.heads, args.dim).transpose(1, 2).requires_grad_() for _ in range(3))
            real = torch.randint(length // 2, length + 1, (batch, 1), device=args.device, generator=gen)
            mask = (torch.arange(length, device=args.device)[None, :] < real)[:, None, None, :]
            mask = mask.expand(batch, 1, length, length)
            grad = torch.randn(batch, length, args.heads, args.dim, device=args.device, dtype=dtype, generator=gen)
            for name, backends in impls.items():
                def forward():
                    if backends is None:
                        return short_attention(layer, q, k, v, mask, dropout=args.dropout)[0]
                    with sdpa_kernel(backends):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=args.dropout
                                                              ).transpose(1, 2)

                def both():
                    torch.autograd.grad(forward(), (q, k, v), grad)
                try:
                    fwd, fb = timed(forward, args.iters, args.device), timed(both, args.iters, args.device)
                except RuntimeError as e:  # a back-end that does not take these shapes or this mask
                    print(f"| {batch} | {length} | {name} | {str(e).splitlines()[0][:60]} | |")
                    continue
                print(f"| {batch} | {length} | {name} | {fwd:.3f} | {fb:.3f} |")


if __name__ == "__main__":
    main()
