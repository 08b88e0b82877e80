#!/usr/bin/env python
"""Attention kernels on short sequences: forward + backward of one layer's attention, as CUDA graphs.

    python scripts/bench_attention.py --data-dir ../shared/data/mrpc --batch 32,256

The batches are the ones training would see: MRPC train tokenised, grouped by length by seqcls's
sampler, padded to a multiple of --bucket (``--random-batches``: not grouped by length, as packed
training draws them). Per batch, each variant is captured in a CUDA graph (as the
training step is) and replayed; the table gives the mean milliseconds per layer over --batches batches.

Variants (roberta-large's 16 heads of 64; query/key/value as views of one fused projection):
- sdpa cudnn / efficient + mask: what training runs, with the boolean padding mask;
- sdpa cudnn / flash, no mask: the same padded shapes without a mask; wrong on padded batches, shown
  as the price of the mask;
- flash varlen, packed: FlashAttention's variable-length kernel on the real tokens only (cu_seqlens),
  what packed training runs;
- efficient varlen, packed: the memory-efficient (CUTLASS) kernel's variable-length mode on the same
  packed tokens; its tiles are 64 rows where FlashAttention's backward uses 128, and MRPC's examples are
  ~53 tokens long. With dropout its backward does not replay the forward's mask (tests/test_gpu.py), so
  its dropout rows time a wrong computation and seqcls runs it only without attention dropout;
- efficient varlen, packed, one q/k/v gradient: the same writing the gradient of the fused projection
  as one tensor (seqcls.models._EfficientVarlenQKV), what packed training runs without attention dropout;
- short (Triton), packed, one q/k/v gradient: seqcls's short-sequence kernel (seqcls.short_attention:
  one program per sequence and head), what packed training runs by default where Triton runs;
- flash varlen, gather/scatter: the same, taking the real tokens out of the padded projection and
  putting the output back (what it would cost inside a padded model).

``--tune-short`` times seqcls's short-sequence kernel's (query block, warps) choices per key tile on each
--batch's first random batch and prints the fastest (seqcls.short_attention._FWD_CONFIG, _BWD_CONFIG).

``--check-dropout`` instead checks each variable-length kernel's attention dropout, eagerly, on four packed
sequences whose value rows are one-hot within each sequence (so the output is the dropped-out attention
matrix P): whether the backward replays the forward's mask (the value gradient against P^T @ grad), the
fraction dropped, and whether the mask repeats across heads or across two sequences of one length. The
kernels are FlashAttention's, the memory-efficient kernel's, seqcls's short-sequence kernel and cuDNN's ragged mode (query/key/value
packed as for the others, cumulative sequence lengths). Then each one's forward + backward time on the
last --batch's first random batch of MRPC: as CUDA graphs, but cuDNN's ragged mode eagerly, and last an
attempt to capture it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench import cuda_graph_ms, default_paths, load_examples  # noqa: E402  (scripts/ is on sys.path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="32,256", help="comma list of batch sizes")
    ap.add_argument("--batches", type=int, default=6, help="batches per batch size")
    ap.add_argument("--bucket", type=int, default=8, help="pad to a multiple of this (compile.length_bucket)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=24, help="for the per-step column")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--random-batches", action="store_true",
                    help="batches not grouped by length (what packed training draws)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--tune-short", action="store_true",
                    help="time the short-sequence kernel's (query block, warps) choices per key tile instead of the table")
    ap.add_argument("--one-block", action="store_true",
                    help="time the short-sequence kernel's backward with and without its one-block path instead of the table")
    ap.add_argument("--check-dropout", action="store_true",
                    help="check the varlen kernels' attention dropout and time them, instead of the table")
    ap.add_argument("--data-dir", default=None, help="GLUE MRPC TSV folder (default ../shared/data/mrpc)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the MiniLM package's)")
    args = ap.parse_args()

    import torch
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py times CUDA attention kernels: run it on a machine with a CUDA GPU")
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoTokenizer
    from seqcls.data import GlobalBatchSampler
    from seqcls.models import _EfficientVarlen, _EfficientVarlenQKV, _FlashVarlen

    short = _short_kernel()
    data, tok = default_paths(args)
    lengths = [len(e["input_ids"]) for e in load_examples(data, AutoTokenizer.from_pretrained(tok), args.max_length)]
    H, D, dev = args.heads, args.head_dim, torch.device("cuda")
    scale = D ** -0.5
    if args.check_dropout:
        return check_dropout(args, lengths)
    if args.tune_short:
        return tune_short(args, lengths)
    if args.one_block:
        return one_block(args, lengths)

    def variants(lens: list[int], p: float) -> dict:
        B, T = len(lens), sum(lens)
        L = -(-max(lens) // args.bucket) * args.bucket
        lt = torch.tensor(lens, device=dev)
        keep = torch.arange(L, device=dev)[None] < lt[:, None]
        idx = keep.flatten().nonzero().squeeze(1)
        cu = F.pad(lt.cumsum(0), (1, 0)).to(torch.int32)
        mask = keep[:, None, None, :].expand(B, 1, L, L)
        bf = dict(device=dev, dtype=torch.bfloat16)
        qkv = torch.randn(B, L, 3, H, D, **bf, requires_grad=True)  # the fused projection's output
        packed = torch.randn(T, 3, H, D, **bf, requires_grad=True)
        g_pad, g_packed, g_ctx = (torch.randn(B, H, L, D, **bf), torch.randn(T, H, D, **bf),
                                  torch.randn(B, L, H * D, **bf))

        def sdpa(backend, masked):
            def step():
                q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if masked else None, dropout_p=p)
                return torch.autograd.grad(out, qkv, g_pad)
            return step

        def varlen_packed(kernel=_FlashVarlen):
            def step():
                out = kernel.apply(packed[:, 0], packed[:, 1], packed[:, 2], cu, cu, L, L, p, scale)
                return torch.autograd.grad(out, packed, g_packed)
            return step

        def varlen_one_gradient():
            out = _EfficientVarlenQKV.apply(packed.view(T, 3 * H * D), D, cu, L, p, scale)
            return torch.autograd.grad(out, packed, g_packed)

        def short_one_gradient():
            from seqcls.short_attention import short_self_attention
            out = short_self_attention(packed.view(T, 3 * H * D), D, cu, L, dropout=p, scale=scale)
            return torch.autograd.grad(out, packed, g_packed)

        def varlen_gather():
            x = qkv.reshape(B * L, 3, H, D).index_select(0, idx)
            out = _FlashVarlen.apply(x[:, 0], x[:, 1], x[:, 2], cu, cu, L, L, p, scale).reshape(T, H * D)
            ctx = out.new_zeros(B * L, H * D).index_copy(0, idx, out).view(B, L, H * D)
            return torch.autograd.grad(ctx, qkv, g_ctx)

        return {"sdpa cudnn + mask": sdpa(SDPBackend.CUDNN_ATTENTION, True),
                "sdpa efficient + mask": sdpa(SDPBackend.EFFICIENT_ATTENTION, True),
                "sdpa cudnn, no mask": sdpa(SDPBackend.CUDNN_ATTENTION, False),
                "sdpa flash, no mask": sdpa(SDPBackend.FLASH_ATTENTION, False),
                "flash varlen, packed": varlen_packed(),
                "efficient varlen, packed": varlen_packed(_EfficientVarlen),
                "efficient varlen, packed, one q/k/v gradient": varlen_one_gradient,
                **({"short (Triton), packed, one q/k/v gradient": short_one_gradient} if short else {}),
                "flash varlen, gather/scatter": varlen_gather}, (qkv, keep, idx, cu, L)

    # The varlen kernel computes what the masked kernel computes (no dropout): compare on real tokens.
    lens = [lengths[i] for i in next(iter(GlobalBatchSampler(lengths, local_batch_size=32, grad_accum_steps=1)))]
    _, (qkv, keep, idx, cu, L) = variants(lens, 0.0)
    with torch.no_grad():
        B = len(lens)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        ref = ref.transpose(1, 2).reshape(B * L, H, D)[idx]
        x = qkv.reshape(B * L, 3, H, D)[idx]
        diff = {k.__name__: (k.apply(x[:, 0], x[:, 1], x[:, 2], cu, cu, L, L, 0.0, scale).float() - ref.float()
                             ).abs().max().item() for k in (_FlashVarlen, _EfficientVarlen, short) if k}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; varlen kernels vs masked sdpa on real tokens, "
          f"no dropout, max abs diff: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))

    print(f"| batch | variant | dropout | ms a layer (fwd+bwd) | x{args.layers} layers |")
    print("|---|---|---|---|---|")
    for batch in (int(b) for b in args.batch.split(",")):
        sampler = GlobalBatchSampler(lengths, local_batch_size=batch, grad_accum_steps=1,
                                     group_by_length=not args.random_batches)
        batches = [[lengths[i] for i in b] for b in list(sampler)[:args.batches]]
        for p in sorted({args.dropout, 0.0}, reverse=True):
            total: dict[str, float] = {}
            for lens in batches:
                steps, _ = variants(lens, p)
                for name, step in steps.items():
                    try:
                        total[name] = total.get(name, 0.0) + cuda_graph_ms(step, args.reps)[0]
                    except RuntimeError as e:  # a kernel this GPU or torch build lacks: report it, time the rest
                        print(f"{name} failed: {str(e).splitlines()[0][:200]}", file=sys.stderr)
                        total[name] = float("nan")
                torch.cuda.empty_cache()
            for name, ms in total.items():
                ms /= len(batches)
                print(f"| {batch} | {name} | {p} | {ms:.3f} | {ms * args.layers:.2f} |")


class _ShortAdapter:
    """seqcls.short_attention with the other kernels' apply(query, key, value, cu_q, cu_k, max_q, max_k,
    dropout, scale)."""

    @staticmethod
    def apply(query, key, value, cu_q, cu_k, max_q, max_k, dropout, scale):
        from seqcls.short_attention import short_attention
        return short_attention(query, key, value, cu_q, cu_k, max(max_q, max_k), dropout=dropout, scale=scale)


def _short_kernel():
    """The short-sequence Triton kernel where Triton is installed, else None (and a note)."""
    from seqcls.short_attention import available
    if not available():
        print("Triton is not installed: the short-sequence kernel is left out", file=sys.stderr)
        return None
    return _ShortAdapter


def _first_random_batch(args, lengths: list[int], batch: int):
    """The lengths of the sampler's first random batch of ``batch`` examples, their packed boundaries, and
    random bf16 (tokens, 3 * heads * dim) projections and (tokens, heads, dim) output gradients."""
    import torch
    import torch.nn.functional as F
    from seqcls.data import GlobalBatchSampler

    H, D, dev = args.heads, args.head_dim, torch.device("cuda")
    sampler = GlobalBatchSampler(lengths, local_batch_size=batch, grad_accum_steps=1, group_by_length=False)
    lens = [lengths[i] for i in next(iter(sampler))]
    cu = F.pad(torch.tensor(lens, device=dev).cumsum(0), (1, 0)).to(torch.int32)
    qkv = torch.randn(sum(lens), 3 * H * D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    return lens, cu, qkv, torch.randn(sum(lens), H, D, device=dev, dtype=torch.bfloat16)


def one_block(args, lengths: list[int]) -> None:
    """seqcls.short_attention's backward with and without its one-block path (BWD_ONE_BLOCK), the
    one-block path with other (query block, warps) per key tile (a 128-row query block takes the 128-row
    tile in one block too), and lengths 65-96 in a 64-row tile with a tail (TAILS): forward + backward of
    one layer on each --batch's first random batch, each variant three times in turn. First whether each
    gives the loop's gradients for one dropout seed (bit for bit; with tails, whose masks differ, without
    dropout and up to the order of sums)."""
    import torch
    from seqcls import short_attention as sa

    D, p = args.head_dim, args.dropout
    default, settings = dict(sa._BWD_CONFIG), (sa.BWD_ONE_BLOCK, sa.TAILS)
    variants = {"loop": (False, False, {}), "one block": (True, False, {}),
                "one block, 64-tile 8 warps": (True, False, {64: (64, 8, 1)}),
                "one block, 128-tile query block 32, 4 warps (the loop: the default until 2026-12-07)":
                    (True, False, {128: (32, 4, 2)}),
                "one block, 128-tile query block 32, 8 warps": (True, False, {128: (32, 8, 2)}),
                "tails": (False, True, {}), "tails + one block": (True, True, {}),
                "tails + one block, 64-tile 8 warps": (True, True, {64: (64, 8, 1)})}

    def use(name):
        sa.BWD_ONE_BLOCK, sa.TAILS, config = variants[name]
        sa._BWD_CONFIG.clear()
        sa._BWD_CONFIG.update({**default, **config})

    try:
        for batch in (int(b) for b in args.batch.split(",")):
            lens, cu, qkv, grad = _first_random_batch(args, lengths, batch)

            def both(dropout=p):
                out = sa.short_self_attention(qkv, D, cu, max(lens), dropout=dropout, scale=D ** -0.5)
                return torch.autograd.grad(out, qkv, grad)

            grads = {}
            for name, (_, tails, _) in variants.items():  # each variant's gradients for the same dropout seed
                use(name)
                torch.cuda.manual_seed(0)
                grads[name] = both(0.0 if tails else p)[0]
            use("loop")
            grads["loop, no dropout"] = both(0.0)[0]
            for name, (_, tails, _) in list(variants.items())[1:]:
                ref = grads["loop, no dropout" if tails else "loop"]
                diff = (grads[name].float() - ref.float()).abs().max().item()
                print(f"batch {batch}: {name}: gradients {'equal to' if torch.equal(grads[name], ref) else 'not equal to'} "
                      f"the loop's{' without dropout' if tails else ''} (max abs difference {diff:.3g})")
            times = {name: [] for name in variants}
            for _ in range(3):
                for name in times:
                    use(name)
                    try:
                        times[name].append(cuda_graph_ms(both, args.reps)[0])
                    except Exception as e:  # noqa: BLE001  (a choice Triton cannot compile: report it, go on)
                        print(f"{name}: failed: {str(e).splitlines()[0][:100]}")
                        times[name].append(float("inf"))
            for name, t in times.items():
                print(f"batch {batch}, dropout {p}, {name}: ms fwd+bwd a layer " + ", ".join(f"{x:.3f}" for x in t)
                      + f" (median {sorted(t)[1]:.3f})")
    finally:
        use("loop")
        sa.BWD_ONE_BLOCK, sa.TAILS = settings


def tune_short(args, lengths: list[int]) -> None:
    """Per key tile, seqcls.short_attention's forward choices (query block, warps, pipeline stages) timed on
    the forward alone, then its backward choices timed forward + backward (fused q/k/v gradient), on the
    first random batch of each --batch; the other tiles keep their setting, and each tile keeps its fastest
    before the next is tried. Prints the choices to put in _FWD_CONFIG and _BWD_CONFIG, and the time with
    Philox's 7 rounds against its 10."""
    import torch
    from seqcls import short_attention as sa

    if not sa.available():
        sys.exit("--tune-short needs Triton")
    D, p = args.head_dim, args.dropout
    shapes = {32: [(32, 1), (32, 2), (32, 4), (16, 1)], 64: [(64, 2), (64, 4), (64, 8), (32, 2), (32, 4), (16, 2)],
              80: [(16, 4), (16, 8), (32, 4), (32, 8)], 96: [(16, 4), (16, 8), (32, 4), (32, 8)],
              128: [(32, 2), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)], 256: [(16, 4), (32, 4), (32, 8), (64, 8)]}
    choices = {tile: [(b, w, s) for b, w in bw for s in (1, 2, 3)] for tile, bw in shapes.items()}
    for batch in (int(b) for b in args.batch.split(",")):
        lens, cu, qkv, grad = _first_random_batch(args, lengths, batch)
        L = max(lens)

        def both():
            out = sa.short_self_attention(qkv, D, cu, L, dropout=p, scale=D ** -0.5)
            return torch.autograd.grad(out, qkv, grad)

        def forward():
            with torch.no_grad():
                return sa.short_self_attention(qkv, D, cu, L, dropout=p, scale=D ** -0.5)

        def timed(config, tile, choice, step):
            config[tile] = choice
            try:
                return cuda_graph_ms(step, args.reps)[0]
            except Exception as e:  # noqa: BLE001  (a choice Triton cannot compile: report it, go on)
                print(f"| {tile} | {choice} | failed: {str(e).splitlines()[0][:100]} |")
                return float("inf")

        tiles = [(low, tile + tail) for low, tile, tail in sa._launches(L)]
        counts = {tile: sum(low < n <= tile for n in lens) for low, tile in tiles}
        print(f"\nbatch {batch}, dropout {p}: sequences per key tile {counts}; as is "
              f"{cuda_graph_ms(both, args.reps)[0]:.3f} ms fwd+bwd, {cuda_graph_ms(forward, args.reps)[0]:.3f} fwd")
        for name, config, step in (("forward", sa._FWD_CONFIG, forward), ("fwd+bwd", sa._BWD_CONFIG, both)):
            print(f"| key tile | {name} (query block, warps, stages) | ms {name} |\n|---|---|---|")
            for _, tile in tiles:
                times = {c: timed(config, tile, c, step) for c in choices[tile]}
                for c, ms in times.items():
                    print(f"| {tile} | {c} | {ms:.3f} |")
                config[tile] = min(times, key=times.get)
        print(f"fastest: _FWD_CONFIG = {dict(sorted(sa._FWD_CONFIG.items()))}\n"
              f"         _BWD_CONFIG = {dict(sorted(sa._BWD_CONFIG.items()))}\n"
              f"         {cuda_graph_ms(both, args.reps)[0]:.3f} ms fwd+bwd, {cuda_graph_ms(forward, args.reps)[0]:.3f} fwd")
        rounds = sa._PHILOX_ROUNDS
        for r in (7, rounds):
            sa._PHILOX_ROUNDS = r
            print(f"Philox {r} rounds: {cuda_graph_ms(both, args.reps)[0]:.3f} ms fwd+bwd, "
                  f"{cuda_graph_ms(forward, args.reps)[0]:.3f} fwd")


def _cudnn_ragged():
    """cuDNN's attention in its ragged (variable-length) mode, as an autograd function like seqcls.models'
    kernels. It wants query, key and value contiguous: the ragged offsets assume (tokens, heads, dim) rows."""
    import torch

    class CudnnRagged(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value, cu_q, cu_k, max_q, max_k, dropout, scale):
            query, key, value = (t.contiguous() for t in (query, key, value))
            out, lse, *_, seed, offset, _ = torch.ops.aten._cudnn_attention_forward(
                query, key, value, None, cu_q, cu_k, max_q, max_k, True, dropout, False, False, scale=scale)
            ctx.save_for_backward(query, key, value, out, lse, cu_q, cu_k, seed, offset)
            ctx.args = max_q, max_k, dropout, scale
            return out

        @staticmethod
        def backward(ctx, grad):
            query, key, value, out, lse, cu_q, cu_k, seed, offset = ctx.saved_tensors
            max_q, max_k, dropout, scale = ctx.args
            grads = torch.ops.aten._cudnn_attention_backward(
                grad.contiguous(), query, key, value, out, lse, seed, offset, None, cu_q, cu_k, max_q, max_k, dropout,
                False, scale=scale)
            return *grads, None, None, None, None, None, None

    return CudnnRagged


def check_dropout(args, lengths: list[int]) -> None:
    import torch
    import torch.nn.functional as F
    from seqcls.data import GlobalBatchSampler
    from seqcls.models import _EfficientVarlen, _FlashVarlen

    dev, p, heads, dim = torch.device("cuda"), 0.5, 2, 64
    short = _short_kernel()
    kernels = {"flash varlen": _FlashVarlen, "efficient varlen": _EfficientVarlen,
               **({"short (Triton)": short} if short else {}), "cudnn ragged": _cudnn_ragged()}
    lens = [37, 1, 63, 37]  # two sequences of one length
    cu = F.pad(torch.tensor(lens, device=dev).cumsum(0), (1, 0)).to(torch.int32)
    T = sum(lens)
    seq = torch.repeat_interleave(torch.arange(len(lens), device=dev), torch.tensor(lens, device=dev))
    pos = torch.arange(T, device=dev) - cu[:-1].long()[seq]
    same = seq[:, None] == seq[None, :]
    first, last = slice(0, lens[0]), slice(T - lens[-1], T)
    torch.manual_seed(0)
    q, k = (torch.randn(T, heads, dim, device=dev, dtype=torch.bfloat16) for _ in range(2))
    grad = torch.randn(T, heads, dim, device=dev, dtype=torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; "
          f"attention dropout {p} on sequences of {lens} tokens, {heads} heads, value rows one-hot")
    print("| kernel | value gradient vs P^T @ grad, max abs error | dropped | mask repeats across heads "
          "| across the two 37-token sequences |")
    print("|---|---|---|---|---|")
    for name, kernel in kernels.items():
        v = F.one_hot(pos, dim).to(torch.bfloat16)[:, None].expand(T, heads, dim).contiguous().requires_grad_()
        out = kernel.apply(q, k, v, cu, cu, max(lens), max(lens), p, 0.125)
        out.backward(grad)
        P = out.detach().float()[:, :, pos].permute(1, 0, 2) * same  # P[h, i, j] = out[i, h, pos(j)]
        error = (v.grad.float() - torch.einsum("hij,ihd->jhd", P, grad.float())).abs().max().item()
        dropped = P == 0
        print(f"| {name} | {error:.4f} | {dropped[:, same].float().mean().item():.3f} "
              f"| {torch.equal(dropped[0], dropped[1])} | {torch.equal(dropped[0][first, first], dropped[0][last, last])} |")

    batch = int(args.batch.split(",")[-1])
    sampler = GlobalBatchSampler(lengths, local_batch_size=batch, grad_accum_steps=1, group_by_length=False)
    lens = [lengths[i] for i in next(iter(sampler))]
    cu = F.pad(torch.tensor(lens, device=dev).cumsum(0), (1, 0)).to(torch.int32)
    packed = torch.randn(sum(lens), 3, args.heads, args.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(sum(lens), args.heads, args.head_dim, device=dev, dtype=torch.bfloat16)
    print(f"\n| kernel | dropout | ms a layer (fwd+bwd), batch {batch} | x{args.layers} layers | timed |\n|---|---|---|---|---|")
    ragged = kernels["cudnn ragged"]
    for dropout in (args.dropout, 0.0):
        for name, kernel in kernels.items():
            def step():
                out = kernel.apply(*packed.unbind(1), cu, cu, max(lens), max(lens), dropout, args.head_dim ** -0.5)
                return torch.autograd.grad(out, packed, grad)
            if kernel is not ragged:
                ms, how = cuda_graph_ms(step, args.reps)[0], "CUDA graph"
            else:  # one call at a time: its capture fails (below)
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.reps):
                    step()
                torch.cuda.synchronize()
                ms, how = (time.perf_counter() - start) / args.reps * 1e3, "eager"
            print(f"| {name} | {dropout} | {ms:.3f} | {ms * args.layers:.2f} | {how} |")
    try:  # last: a failed capture leaves the CUDA generator unusable for the rest of the process
        cuda_graph_ms(lambda: torch.autograd.grad(ragged.apply(*packed.unbind(1), cu, cu, max(lens), max(lens), 0.0,
                                                               args.head_dim ** -0.5), packed, grad), 1)
        print("cudnn ragged: captured in a CUDA graph")
    except Exception as e:  # noqa: BLE001  (any CUDA error is the answer being reported)
        print(f"cudnn ragged: CUDA graph capture failed: {str(e).splitlines()[0][:160]}")

if __name__ == "__main__":
    main()
