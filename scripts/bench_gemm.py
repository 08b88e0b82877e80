"""Time torch's matmul against every algorithm cuBLASLt's heuristic lists, for roberta-large's GEMMs.

The eight matrix multiplies of one layer's forward and backward under LoRA (the query/key/value one with
LoRA's merged [x | u], 1,040 columns), and with --weight-grads the four weight gradients of full
fine-tuning, at each --tokens row count; each candidate timed on the GPU alone as seqcls.gemm times it
when tuning (compile.tuned_gemm). Prints per shape torch's time, the heuristic's first algorithm's and the
fastest's, and per row count the sums. With --gelu also the feed-forward's first multiply with its GELU
and the second's input gradient with GELU's gradient: torch's matmul and GELU kernels against cuBLASLt's
epilogues (compile.gelu_epilogue). With --bgrad also the four weight gradients with their bias's: torch's
matmul and column sum against cuBLASLt's BGRADB epilogue (gemm.mm_bgrad).

    python scripts/bench_gemm.py --tokens 13600,14080,12672
"""

from __future__ import annotations

import argparse
import sys

import torch

from seqcls import gemm


def shapes(m: int, weight_grads: bool):
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, xu, h, g3 = (torch.randn(m, k, **bf) for k in (1024, 1040, 4096, 3072))
    w_qkv, w_o = torch.randn(3072, 1040, **bf) * 0.03, torch.randn(1024, 1024, **bf) * 0.03
    w_1, w_2 = torch.randn(4096, 1024, **bf) * 0.03, torch.randn(1024, 4096, **bf) * 0.03
    yield from (("fwd qkv [x|u]", xu, w_qkv.t()), ("fwd out", x, w_o.t()), ("fwd ffn1", x, w_1.t()),
                ("fwd ffn2", h, w_2.t()), ("bwd qkv d[x|u]", g3, w_qkv), ("bwd out dx", x, w_o),
                ("bwd ffn1 dx", h, w_1), ("bwd ffn2 dx", x, w_2))
    if weight_grads:
        yield from (("dW qkv", g3.t(), x), ("dW out", x.t(), x), ("dW ffn1", h.t(), x), ("dW ffn2", x.t(), h))


def cases(m: int, weight_grads: bool, gelu: bool, bgrad: bool):
    """(name, a, b, mode, bias, aux): the plain shapes, then the GELU epilogues' (the GELU input written,
    or read)."""
    for name, a, b in shapes(m, weight_grads):
        yield name, a, b, "", None, None
    if gelu:
        bf = dict(device="cuda", dtype=torch.bfloat16)
        x, bias, pre = torch.randn(m, 1024, **bf), torch.randn(4096, **bf), torch.randn(m, 4096, **bf)
        w_1, w_2 = torch.randn(4096, 1024, **bf) * 0.03, torch.randn(1024, 4096, **bf) * 0.03
        yield "fwd ffn1+gelu", x, w_1.t(), "gelu", bias, torch.empty_like(pre)
        yield "bwd ffn2 dgelu", x, w_2, "dgelu", None, pre
    if bgrad:
        for name, a, b in shapes(m, True):
            if name.startswith("dW"):
                yield name + "+db", a, b, "bgrad", None, torch.empty(a.shape[0], dtype=a.dtype, device=a.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="13600", help="comma list of row counts (LoRA b256 on MRPC: ~13,600)")
    ap.add_argument("--weight-grads", action="store_true", help="also full fine-tuning's weight gradients")
    ap.add_argument("--gelu", action="store_true", help="also the feed-forward's GELU epilogues")
    ap.add_argument("--bgrad", action="store_true", help="also the weight gradients with the bias's (BGRADB)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not gemm.supported(torch.device("cuda")):
        sys.exit("bench_gemm.py needs an NVIDIA GPU with cuBLASLt")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True  # torch's default, stated
    print(torch.cuda.get_device_name(), torch.__version__)
    workspace = torch.empty(gemm.WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    for m in (int(t) for t in args.tokens.split(",")):
        total_torch = total_best = 0.0
        for name, a, b, mode, bias, aux in cases(m, args.weight_grads, args.gelu, args.bgrad):
            plan = gemm._Plan(a, b, bias, mode)
            out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device="cuda")
            if mode:
                runs = [lambda: gemm._torch_run(a, b, bias, mode, aux)]
            else:
                runs = [lambda: torch.mm(a, b, out=out)]
            runs += [lambda i=i: plan.run(i, a, b, bias, out, aux, workspace) for i in range(plan.count)]
            times = [t * 1e3 for t in gemm.fastest(runs, gemm._gpu_ms, rounds=3)]
            best = min(range(len(times)), key=times.__getitem__)
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
            print(f"{name:15s} {a.shape[0]:6d} x {a.shape[1]:5d} x {b.shape[1]:5d}: torch {times[0]:7.1f} us "
                  f"({flops / times[0] / 1e6:4.0f} TFLOP/s), heuristic's first {times[min(1, plan.count)]:7.1f}, fastest "
                  f"{times[best]:7.1f} ({'torch' if best == 0 else f'#{best - 1} of {plan.count}'}, "
                  f"{flops / times[best] / 1e6:4.0f} TFLOP/s)", flush=True)
            total_torch, total_best = total_torch + times[0], total_best + times[best]
        print(f"{m} rows: torch {total_torch:.1f} us, the fastest {total_best:.1f} us "
              f"({100 * (1 - total_best / total_torch):.1f}% less)\n", flush=True)


if __name__ == "__main__":
    main()
