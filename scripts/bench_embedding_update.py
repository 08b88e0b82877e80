#!/usr/bin/env python
"""The word embeddings' AdamW step alone: torch's dense fused AdamW over the whole matrix against
seqcls.update_kernel.LazyRows (compile.lazy_embedding_update) for one batch's token ids: the forward's
catch-up of the batch's rows, the step's scalars, and the step kernel.

    python scripts/bench_embedding_update.py                 # roberta-large, a b32 MRPC batch's ~1,700 tokens
    python scripts/bench_embedding_update.py --owed 100      # each touched row 100 steps behind

Each row is captured in a CUDA graph and replayed (bench.cuda_graph_ms). ``--owed K``: before each replay the
batch's rows are set K steps behind, so the catch-up replays K zero-gradient steps a row (0: rows the
previous step touched too). GB/s counts the bytes the dense update must move (fp32 weight, moments, gradient).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench import cuda_graph_ms  # noqa: E402  (scripts/ is on sys.path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=50265)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=1700, help="token ids in the batch (drawn uniformly)")
    ap.add_argument("--owed", type=int, default=0, help="zero-gradient steps each of the batch's rows owes")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()

    import torch
    if not torch.cuda.is_available():
        sys.exit("bench_embedding_update.py times CUDA kernels: run it on a machine with an NVIDIA GPU")
    from seqcls.optim import _adam_scalars
    from seqcls.update_kernel import LazyRows

    torch.manual_seed(0)
    dev = torch.device("cuda")
    shape = (args.vocab, args.hidden)
    ids = torch.randint(0, args.vocab, (args.tokens,), device=dev)
    grad = torch.zeros(shape, device=dev)
    grad.index_add_(0, ids, torch.randn(args.tokens, args.hidden, device=dev))
    lr, scale = torch.tensor(1e-5, device=dev), torch.ones((), device=dev)
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    rows = []

    def state():
        return torch.randn(shape, device=dev), torch.randn(shape, device=dev) * 1e-3, torch.rand(shape, device=dev) * 1e-6

    p, m, v = state()
    step = torch.full((), 1000.0, device=dev)

    def dense():
        torch._fused_adamw_([p], [grad], [m], [v], [], [step], lr=lr, amsgrad=False, maximize=False,
                            grad_scale=scale, found_inf=None, **hyper)
    ms, _, _ = cuda_graph_ms(dense, args.reps)
    rows.append(("dense fused AdamW, every row", ms * 1e3, 7 * p.numel() * 4 / ms / 1e6))

    p, m, v = state()
    lazy = LazyRows(p, capacity=1 << 16)
    t = torch.full((), 1000.0, device=dev)
    unique = torch.unique(ids)
    rest = (hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["weight_decay"], True)

    def lazy_step():
        lazy.last.index_put_((unique,), (t.to(torch.int32) - args.owed).expand(unique.numel()))
        lazy.catch_up(ids, p, m, v, t, rest)
        t.add_(1)
        step_size, bc2 = _adam_scalars(t, lr, hyper["beta1"], hyper["beta2"])
        lazy.record(t, step_size, bc2, 1 - lr * hyper["weight_decay"])
        lazy.step(p, grad, m, v, t, scale, rest)
    ms, _, _ = cuda_graph_ms(lazy_step, args.reps)
    rows.append((f"lazy rows: catch-up ({args.owed} owed steps a row) + step, {unique.numel()} rows",
                 ms * 1e3, 7 * p.numel() * 4 / ms / 1e6))

    print(f"{'':64} {'µs':>9} {'dense GB/s equiv.':>18}")
    for name, us, gbs in rows:
        print(f"{name:64} {us:9.1f} {gbs:18.0f}")


if __name__ == "__main__":
    main()
