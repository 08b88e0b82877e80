"""Registers, spilled stack and shared memory of seqcls.short_attention's kernels, compiled ahead of time
for an NVIDIA GPU (sm_90 by default) with the installed Triton: no GPU needed. A configuration that spills
(stack > 0) keeps part of its tiles in local memory; one that needs many registers fits few programs on an
SM; "loads issued ahead" counts the loads Triton's pipeliner turned into asynchronous copies. Pointers and
row strides are declared divisible by 16, as Triton's launcher declares the real ones (without that no
load is vectorised or issued ahead, and the counts are not the GPU's). Triton versions allocate
differently: the GPU machine's own may not give the same numbers.

    python scripts/attention_registers.py                    # every launch's configuration as set
    python scripts/attention_registers.py --tile 64 --block 64 --warps 8 --stages 1 --one-block
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

_COMMON = {"cuq_ptr": "*i32", "cuk_ptr": "*i32", "seed_ptr": "*i64", "H": "i32", "scale_log2": "fp32",
           "threshold": "i32", "inv_keep": "fp32"}
_FWD = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "lse_ptr": "*fp32", **_COMMON,
        "sq": "i32", "sk": "i32", "sv": "i32", "so": "i32"}
_BWD = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "g_ptr": "*bf16", "lse_ptr": "*fp32", **_COMMON,
        "dq_ptr": "*bf16", "dk_ptr": "*bf16", "dv_ptr": "*bf16", "sq": "i32", "sk": "i32", "sv": "i32",
        "sg": "i32", "sdq": "i32", "sdk": "i32", "sdv": "i32", "scale": "fp32"}
_STRIDES = {"sq", "sk", "sv", "so", "sg", "sdq", "sdk", "sdv"}


def resources(kernel, signature: dict, constants: dict, warps: int, stages: int, arch: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: signature[name] if name in signature else "constexpr" for name in kernel.arg_names}
    # what Triton's launcher tells the compiler of real arguments: pointers and row strides (3 * 1024 and
    # 1024 elements) divisible by 16; without it no load is vectorised or issued ahead by the pipeliner
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if signature.get(name, "").startswith("*") or name in _STRIDES}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constants, attrs=aligned),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    fields = dict(f.split(":") for line in usage.splitlines() if "REG:" in line for f in line.split())
    ahead = compiled.asm["ttgir"].count("async_copy_global_to_local")
    return (f"registers {fields['REG']:>3}, spilled stack {fields['STACK']:>4} B, shared {compiled.metadata.shared} B, "
            f"{ahead} loads issued ahead")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100, H200)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tile", type=int, help="one configuration: key tile (with --tail, the launch's)")
    ap.add_argument("--tail", type=int, default=0)
    ap.add_argument("--block", type=int, help="query block")
    ap.add_argument("--warps", type=int)
    ap.add_argument("--stages", type=int)
    ap.add_argument("--one-block", action="store_true", help="the backward's one-block path")
    ap.add_argument("--tails", action="store_true", help="the launches as with short_attention.TAILS")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from seqcls import short_attention as sa

    sa.TAILS = args.tails
    if args.tile:
        launches = [(args.tile // 2 if not args.tail else args.tile, args.tile, args.tail)]
    else:
        launches = sa._launches(max(sa.TILES))
    for low, tile, tail in launches:
        for name, kernel, signature, configs in (("forward", sa._fwd_kernel, _FWD, sa._FWD_CONFIG),
                                                 ("backward", sa._bwd_kernel, _BWD, sa._BWD_CONFIG)):
            block, warps, stages = configs.get(tile + tail, (None, None, None))
            block, warps, stages = args.block or block, args.warps or warps, args.stages or stages
            constants = {"LO": low, "BN": tile, "BT": tail, "BM": block, "D": args.head_dim, "DROPOUT": True,
                         "OFFSETS": sa._OFFSETS_PER_PROGRAM, "ROUNDS": sa._PHILOX_ROUNDS}
            one = ""
            if name == "backward":
                constants["ONE_BLOCK"] = bool(args.one_block or sa.BWD_ONE_BLOCK) and block >= tile and not tail
                one = ", one block" if constants["ONE_BLOCK"] else ""
            print(f"{name:8} lengths {low + 1:>3}-{tile + tail:<3} (tile {tile}, tail {tail}), query block {block}, "
                  f"{warps} warps, {stages} stages{one}: "
                  f"{resources(kernel, signature, constants, warps, stages, args.arch)}", flush=True)


if __name__ == "__main__":
    main()
