"""Count the memsets cuBLAS(Lt) puts before its GEMM kernels, and time the GEMMs as a CUDA graph.

    python scripts/bench_gemm_memsets.py                      # torch's cuBLAS workspaces
    CUBLASLT_WORKSPACE_SIZE=0 CUBLAS_WORKSPACE_CONFIG=:0:0 python scripts/bench_gemm_memsets.py
    python scripts/bench_gemm_memsets.py --blas cublas        # torch.backends.cuda.preferred_blas_library

The four Linear shapes of a roberta-large block (q/k/v fused, attention output, MLP up and down) on
--tokens rows in bf16, forward and the input's backward (as under LoRA's frozen base). Prints one JSON
line: the milliseconds a block as ten blocks replayed from one CUDA graph (bench.cuda_graph_ms), and from
one profiled block the memsets, the kernel time and the GEMM kernels cuBLAS chose. With a workspace,
cuBLAS picks `coop` kernels that zero a counter before each launch: a memset on the stream, which a
captured graph holds as a memset node (a step's profile shows the idle around them: `bench.py
--profile-dir`).
"""

import argparse
import json

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from bench import cuda_graph_ms  # scripts/ is on sys.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=14336, help="rows (LoRA b256 on MRPC packs ~13.6k tokens)")
    ap.add_argument("--blas", choices=("cublas", "cublaslt"), help="torch's preferred BLAS library")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    dev, dt = "cuda", torch.bfloat16
    shapes = [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)]  # (in, out)
    layers = [(torch.randn(t, n, device=dev, dtype=dt) * 0.02, torch.zeros(t, device=dev, dtype=dt),
               torch.randn(args.tokens, n, device=dev, dtype=dt, requires_grad=True),
               torch.randn(args.tokens, t, device=dev, dtype=dt)) for n, t in shapes]

    def block():
        for w, b, x, g in layers:
            F.linear(x, w, b).backward(g)
            x.grad = None

    ms, _, _ = cuda_graph_ms(lambda: [block() for _ in range(10)], args.reps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        block()
        torch.cuda.synchronize()
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels: dict[str, int] = {}
    for e in gpu:
        if "Memset" not in e.name:
            kernels[e.name[:60]] = kernels.get(e.name[:60], 0) + 1
    print(json.dumps({"ms_per_block": round(ms / 10, 4), "memsets_per_block": sum("Memset" in e.name for e in gpu),
                      "kernel_ms_per_block": round(sum(e.device_time for e in gpu) / 1e3, 4),
                      "kernels": sorted(kernels.items(), key=lambda kv: -kv[1])}))


if __name__ == "__main__":
    main()
