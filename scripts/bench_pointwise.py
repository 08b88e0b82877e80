#!/usr/bin/env python
"""The pointwise kernels of a large-batch step, alone: GELU forward and backward (inductor's kernels
against a plain Triton kernel of the same arithmetic, libdevice's erf, over its block and warps), dropout
(inductor's masks against seqcls.dropout's Triton kernel, with that kernel's block, warps and Philox
rounds swept), and a copy as the memory bandwidth to compare with.

    python scripts/bench_pointwise.py                # roberta-large at batch 256: 13,632 tokens

Each row is compiled with torch.compile, captured in a CUDA graph and replayed (bench.cuda_graph_ms);
GB/s counts the bytes each kernel must read and write once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench import cuda_graph_ms  # noqa: E402  (scripts/ is on sys.path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=13632, help="rows (real tokens of a packed step)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--p", type=float, default=0.1, help="dropout probability")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    import triton
    import triton.language as tl
    from seqcls import dropout
    from seqcls.short_attention import SEED_BOUND

    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    h = torch.randn(args.tokens, args.intermediate, **bf16) * 2
    g = torch.randn_like(h)
    x = torch.randn(args.tokens, args.hidden, **bf16)
    rows = []

    def row(name, fn, nbytes):
        ms, _, out = cuda_graph_ms(torch.compile(fn, dynamic=False), args.reps)
        rows.append((name, ms * 1e3, nbytes / ms / 1e6))
        return out

    hb = h.numel() * 2
    row("copy (tokens, intermediate), 2x", lambda: h * 2, 2 * hb)
    fwd = row("GELU forward, inductor", lambda: F.gelu(h), 2 * hb)
    bwd = row("GELU backward, inductor", lambda: torch.ops.aten.gelu_backward(g, h), 3 * hb)

    @triton.jit
    def gelu_fwd(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n).to(tl.float32)
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=offs < n)

    @triton.jit
    def gelu_bwd(g_ptr, x_ptr, dx_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=offs < n).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        tl.store(dx_ptr + offs, (g * (cdf + x * pdf)).to(dx_ptr.dtype.element_ty), mask=offs < n)

    y, dx, nh = torch.empty_like(h), torch.empty_like(h), h.numel()
    sweep = []
    for block in (512, 1024, 2048, 4096):
        for warps in (2, 4, 8, 16):
            if block // (32 * warps) < 2:
                continue
            grid = (triton.cdiv(nh, block),)
            f_ms, _, _ = cuda_graph_ms(lambda: gelu_fwd[grid](h, y, nh, BLOCK=block, num_warps=warps), args.reps)
            b_ms, _, _ = cuda_graph_ms(lambda: gelu_bwd[grid](g, h, dx, nh, BLOCK=block, num_warps=warps), args.reps)
            sweep.append((block, warps, f_ms * 1e3, b_ms * 1e3, (y != fwd).sum().item(), (dx != bwd).sum().item()))

    xb = x.numel() * 2
    row("dropout, inductor (x, mask out)", lambda: F.dropout(x, args.p, True), 2 * xb + x.numel())
    scale = 1.0 / (1.0 - args.p)
    row("dropout, Triton mask kernel + multiply",
        lambda: x * dropout.keep_mask(list(x.shape), args.p, x.device) * scale, 2 * xb + x.numel())
    row("dropout, Triton packed mask (8 a byte) + multiply",
        lambda: x * dropout.keep_mask(list(x.shape), args.p, x.device, packed=True) * scale, 2 * xb + x.numel() // 4)

    print(f"\n{args.tokens} tokens\n")
    print("| kernel | µs | GB/s |\n|---|---|---|")
    for name, us, gbs in rows:
        print(f"| {name} | {us:.1f} | {gbs:.0f} |")

    print("\n| Triton GELU BLOCK | warps | forward µs | GB/s | backward µs | GB/s | entries != inductor's (fwd, bwd) |")
    print("|---|---|---|---|---|---|---|")
    for block, warps, f_us, b_us, f_ne, b_ne in sweep:
        print(f"| {block} | {warps} | {f_us:.1f} | {2 * hb / f_us / 1e3:.0f} | {b_us:.1f} | {3 * hb / b_us / 1e3:.0f} "
              f"| {f_ne}, {b_ne} |")

    # The mask kernel alone, over its launch settings.
    seed = torch.randint(0, SEED_BOUND, (1,), dtype=torch.int64, device="cuda")
    out = torch.empty(x.shape, dtype=torch.bool, device="cuda")
    n, threshold = out.numel(), round(args.p * 65536)
    print("\n| mask kernel BLOCK | warps | Philox rounds | µs | GB/s written |\n|---|---|---|---|---|")
    for block in (1024, 2048, 4096, 8192):
        for warps in (2, 4, 8):
            for rounds in (7, 10):
                def launch():
                    dropout._mask_kernel[(triton.cdiv(n, block),)](out, seed, n, threshold, BLOCK=block,
                                                                   ROUNDS=rounds, num_warps=warps)
                ms, _, _ = cuda_graph_ms(launch, args.reps)
                print(f"| {block} | {warps} | {rounds} | {ms * 1e3:.1f} | {n / ms / 1e6:.0f} |")


if __name__ == "__main__":
    main()
