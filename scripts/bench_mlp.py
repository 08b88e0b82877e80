"""Time a transformer MLP block (Linear -> GELU -> Linear) as cuBLAS + a GELU pass against inductor's kernels.

    PYTHONPATH=src python scripts/bench_mlp.py --tokens 13600            # LoRA b256's packed tokens
    PYTHONPATH=src python scripts/bench_mlp.py --tokens 1700 --weight-grads  # full fine-tune at b32

The question it answers: would a GEMM with GELU in its epilogue (inductor's Triton templates under
`max_autotune_gemm`; `triton` leaves cuBLAS out of the choice; `tma` and `tma_triton` add Hopper's
persistent TMA templates and benchmark each fused epilogue against the unfused kernels) beat cuBLAS
followed by a separate GELU kernel? Each variant runs forward and
backward (the input's gradient, as under LoRA's frozen base; `--weight-grads` adds the weights'
gradients, as in full fine-tuning) in bf16, captured as one CUDA graph and replayed, so launch
overhead is off the table. The first call of each variant (compilation, autotuning, warm-up) is
timed apart. Sizes default to roberta-large's (1024 -> 4096 -> 1024).
"""

import argparse

import torch
import torch.nn.functional as F

from bench import cuda_graph_ms  # scripts/ is on sys.path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=13600, help="rows of the activations (packed real tokens)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--weight-grads", action="store_true", help="also compute the weights' gradients")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--variants", nargs="+", default=["default", "autotune", "dynamic", "triton"],
                   help="what to time beside eager: default autotune dynamic triton tma tma_triton")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_mlp.py times CUDA graphs: run it on a machine with a CUDA GPU")

    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    h, i = args.hidden, args.intermediate
    w1 = (torch.randn(i, h, device=dev, dtype=dt) * 0.02).requires_grad_(args.weight_grads)
    w2 = (torch.randn(h, i, device=dev, dtype=dt) * 0.02).requires_grad_(args.weight_grads)
    b1 = torch.zeros(i, device=dev, dtype=dt, requires_grad=args.weight_grads)
    b2 = torch.zeros(h, device=dev, dtype=dt, requires_grad=args.weight_grads)
    x = torch.randn(args.tokens, h, device=dev, dtype=dt, requires_grad=True)
    grad_out = torch.randn(args.tokens, h, device=dev, dtype=dt)
    inputs = [x] + ([w1, b1, w2, b2] if args.weight_grads else [])
    # two GEMMs forward, two input-gradient GEMMs backward, and two weight-gradient GEMMs if asked for
    flops = 2 * args.tokens * h * i * (6 if args.weight_grads else 4)

    def mlp(x):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    def timed(fn):
        def step():
            return torch.autograd.grad(fn(x), inputs, grad_out)

        ms, first, out = cuda_graph_ms(step, args.reps)
        return ms, first, [o.clone() for o in out]

    autotune = {"max_autotune_gemm": True}
    # Hopper's persistent GEMM templates (TMA loads, one program per SM walking output tiles), with the
    # fused epilogue benchmarked against the unfused kernels
    tma = {"triton.enable_persistent_tma_matmul": True, "benchmark_epilogue_fusion": True}
    variants = {
        "eager": ("eager (cuBLAS + GELU kernels)", mlp),
        "default": ("compiled, default", torch.compile(mlp, dynamic=False)),
        "autotune": ("compiled, max_autotune_gemm", torch.compile(mlp, dynamic=False, options=autotune)),
        "dynamic": ("compiled dynamic, max_autotune_gemm", torch.compile(mlp, dynamic=True, options=autotune)),
        "triton": ("compiled, Triton GEMMs only", torch.compile(
            mlp, dynamic=False, options={**autotune, "max_autotune_gemm_backends": "TRITON"})),
        "tma": ("compiled, max_autotune_gemm + persistent TMA templates", torch.compile(
            mlp, dynamic=False, options={**autotune, **tma})),
        "tma_triton": ("compiled, Triton GEMMs only, persistent TMA templates", torch.compile(
            mlp, dynamic=False, options={**autotune, **tma, "max_autotune_gemm_backends": "TRITON"})),
    }
    unknown = set(args.variants) - set(variants)
    if unknown:
        raise SystemExit(f"unknown --variants {sorted(unknown)}: pick from {', '.join(variants)}")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.tokens} x {h} -> {i} -> {h}, "
          f"{'input and weight' if args.weight_grads else 'input'} gradients")
    print("| variant | ms | TFLOP/s | first call s | max abs diff vs eager |")
    print("|---|---|---|---|---|")
    ref = None
    for name, fn in (variants[k] for k in ["eager"] + [v for v in args.variants if v != "eager"]):
        ms, first, out = timed(fn)
        diff = "-" if ref is None else f"{max((a - b).abs().max().item() for a, b in zip(out, ref)):.3g}"
        if ref is None:
            ref = out
        print(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {first:.1f} | {diff} |", flush=True)


if __name__ == "__main__":
    main()
