"""Runs seqcls's Triton kernels (seqcls.short_attention, seqcls.dropout) in Triton's CPU interpreter and
prints what the tests check, as JSON. A separate process: the interpreter must be on before the kernels are defined (at import), and the
rest of the suite must not see it. Half precision (the interpreter's bfloat16 is not usable)."""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from seqcls.short_attention import short_attention, short_self_attention  # noqa: E402


def packed(lens: list[int]) -> tuple[torch.Tensor, int]:
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return cu, int(cu[-1])


def reference(q, k, v, cu, scale):
    """Attention within each packed sequence, fp32, through a block-diagonal mask."""
    seq = torch.searchsorted(cu[1:], torch.arange(q.shape[0], dtype=cu.dtype), right=True)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=seq[:, None] == seq[None, :], scale=scale)
    return out.transpose(0, 1)


def match(lens=(5, 33, 1, 70, 17, 200, 64, 65, 32, 128, 129)) -> dict:
    """Forward and gradients against fp32, lengths in every key tile (32, 64, 128, 256) and at their edges."""
    torch.manual_seed(0)
    heads, dim = 2, 16
    cu, tokens = packed(lens)
    qkv = torch.randn(tokens, 3 * heads * dim)
    grad = torch.randn(tokens, heads, dim)
    ref_in = qkv.half().float().requires_grad_()
    ref = reference(*(t.view(tokens, heads, dim) for t in ref_in.chunk(3, dim=-1)), cu, dim ** -0.5)
    ref.backward(grad.half().float())
    fused = qkv.half().requires_grad_()
    out_fused = short_self_attention(fused, dim, cu, 256, dropout=0.0, scale=dim ** -0.5)
    out_fused.backward(grad.half())
    parts = [t.reshape(tokens, heads, dim).contiguous().half().requires_grad_() for t in qkv.chunk(3, dim=-1)]
    out_parts = short_attention(*parts, cu, cu, 256, dropout=0.0, scale=dim ** -0.5)
    out_parts.backward(grad.half())
    grad_parts = torch.cat([p.grad.reshape(tokens, -1) for p in parts], dim=-1)
    err = lambda a, b: (a.float() - b).abs().max().item()  # noqa: E731
    return {"fwd_fused": err(out_fused, ref), "fwd_parts": err(out_parts, ref), "grad_fused": err(fused.grad, ref_in.grad),
            "grad_parts": err(grad_parts, ref_in.grad), "ref_out": ref.abs().max().item(),
            "ref_grad": ref_in.grad.abs().max().item()}


def cross() -> dict:
    """Queries apart from the keys (the first-token last layer: one query a sequence; here also several,
    and none for the last sequence, as the packing's filler): forward and the three gradients against
    fp32 attention of each sequence's queries on its keys; keys no query reads get zero gradients."""
    torch.manual_seed(0)
    heads, dim = 2, 16
    lens, queries = [5, 33, 1, 70, 130, 7], [1, 3, 1, 40, 1, 0]
    cu_k, tk = packed(lens)
    cu_q, tq = packed(queries)
    q, k, v = torch.randn(tq, heads, dim), torch.randn(tk, heads, dim), torch.randn(tk, heads, dim)
    grad = torch.randn(tq, heads, dim)
    ref_in = [t.half().float().requires_grad_() for t in (q, k, v)]
    outs = []
    for i in range(len(lens)):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        scores = torch.einsum("ihd,jhd->hij", ref_in[0][qs], ref_in[1][ks]) * dim ** -0.5
        outs.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1), ref_in[2][ks]))
    ref = torch.cat(outs)
    ref.backward(grad.half().float())
    leaves = [t.half().requires_grad_() for t in (q, k, v)]
    out = short_attention(*leaves, cu_q, cu_k, 256, dropout=0.0, scale=dim ** -0.5)
    out.backward(grad.half())
    filler = slice(cu_k[-2], cu_k[-1])
    return {"fwd": (out.float() - ref).abs().max().item(), "ref_out": ref.abs().max().item(),
            "grads": [(t.grad.float() - r.grad).abs().max().item() for t, r in zip(leaves, ref_in)],
            "ref_grads": [r.grad.abs().max().item() for r in ref_in],
            "filler_grads_zero": all(torch.equal(t.grad[filler], torch.zeros_like(t.grad[filler])) for t in leaves[1:])}


def dropout(lens=(37, 1, 63, 37, 5), dim=64) -> dict:
    """Value rows one-hot within each sequence: the output is the dropped-out attention matrix, whose
    zeros are the mask. The gradients must be those of attention under that mask."""
    torch.manual_seed(0)
    heads, p = 2, 0.3
    cu, tokens = packed(lens)
    q, k = torch.randn(tokens, heads, dim).half(), torch.randn(tokens, heads, dim).half()
    v = torch.zeros(tokens, heads, dim)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        v[a:b, :, :b - a] = torch.eye(b - a)[:, None, :]
    v = v.half()
    grad = torch.randn(tokens, heads, dim).half()

    def run(seed):
        torch.manual_seed(seed)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = short_attention(*leaves, cu, cu, max(lens), dropout=p, scale=dim ** -0.5)
        out.backward(grad)
        return out.detach(), [t.grad for t in leaves]

    out, grads = run(1)
    again, _ = run(1)
    other, _ = run(2)
    ref_in = [t.float().requires_grad_() for t in (q, k, v)]
    outs, masks = [], []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        scores = torch.einsum("ihd,jhd->hij", ref_in[0][a:b], ref_in[1][a:b]) * dim ** -0.5
        mask = (out[a:b, :, :b - a].float().permute(1, 0, 2) != 0).float()  # (heads, query, key)
        masks.append(mask)
        outs.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1) * mask / (1 - p), ref_in[2][a:b]))
    ref = torch.cat(outs)
    ref.backward(grad.float())
    kept = torch.cat([m.flatten() for m in masks])
    return {"fwd": (out.float() - ref).abs().max().item(),
            "grads": [(g.float() - r.grad).abs().max().item() for g, r in zip(grads, ref_in)],
            "ref_grads": [r.grad.abs().max().item() for r in ref_in],
            "dropped": 1 - kept.mean().item(), "entries": kept.numel(),
            "same_across_heads": [torch.equal(m[0], m[1]) for m in masks if m.shape[1] > 1],
            "same_across_equal_lengths": torch.equal(masks[0], masks[3]),
            "same_seed_same_output": torch.equal(out, again), "other_seed_same_output": torch.equal(out, other)}


def tails() -> dict:
    """With short_attention.TAILS (lengths 65-96 in a 64-row key tile and a tail of 16 or 32 rows): which
    launches run, match's check with lengths at the tails' edges, and dropout's with lengths in both
    tails (values one-hot over 128 dimensions)."""
    import seqcls.short_attention as sa
    sa.TAILS = True
    try:
        return {"launches": sa._launches(256),
                "match": match((5, 64, 65, 80, 81, 96, 97)),  # the other launches: match's own case
                "dropout": dropout((70, 1, 90, 70), dim=128)}
    finally:
        sa.TAILS = False


def one_block() -> dict:
    """The backward's one-block path (short_attention.BWD_ONE_BLOCK) against the loop over query blocks,
    with and without dropout, fused and not: the same gradients bit for bit, and which launches took it
    (the key tiles of 32 and 64 rows, whose query block covers the tile, under self-attention only)."""
    import seqcls.short_attention as sa
    torch.manual_seed(0)
    heads, dim = 2, 16
    lens = [5, 33, 1, 70, 17, 64, 40]
    cu, tokens = packed(lens)
    qkv = torch.randn(tokens, 3 * heads * dim).half()
    grad = torch.randn(tokens, heads, dim).half()
    launches, kernel, setting = [], sa._bwd_kernel, sa.BWD_ONE_BLOCK

    class Recorder:  # records each backward launch's key tile and path
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((kw["BN"], kw["ONE_BLOCK"]))
                return kernel[grid](*args, **kw)
            return launch

    def grads(one, p, fused):
        sa.BWD_ONE_BLOCK = one
        torch.manual_seed(3)  # the dropout seed is drawn on the device from torch's generator
        if fused:
            x = qkv.clone().requires_grad_()
            sa.short_self_attention(x, dim, cu, 128, dropout=p, scale=dim ** -0.5).backward(grad)
            return x.grad
        parts = [t.reshape(tokens, heads, dim).contiguous().requires_grad_() for t in qkv.chunk(3, dim=-1)]
        sa.short_attention(*parts, cu, cu, 128, dropout=p, scale=dim ** -0.5).backward(grad)
        return torch.cat([t.grad.reshape(tokens, -1) for t in parts], dim=-1)

    out = {"same": {}, "paths": {}}
    sa._bwd_kernel = Recorder()
    try:
        for p in (0.0, 0.2):
            for fused in (True, False):
                name = f"p{p}_{'fused' if fused else 'parts'}"
                loop = grads(False, p, fused)
                launches.clear()
                one = grads(True, p, fused)
                out["paths"][name] = sorted(set(launches))
                out["same"][name] = torch.equal(loop, one)
                out["nonzero_" + name] = bool(one.abs().sum() > 0)
        # queries apart from the keys (the first-token layer): the loop, whatever the setting
        cu_q = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7], dtype=torch.int32)
        first = qkv[cu[:-1].long(), : heads * dim].reshape(len(lens), heads, dim).contiguous().requires_grad_()
        k, v = (t.reshape(tokens, heads, dim).contiguous() for t in qkv[:, heads * dim:].chunk(2, dim=-1))
        launches.clear()
        sa.BWD_ONE_BLOCK = True
        sa.short_attention(first, k, v, cu_q, cu, 128, dropout=0.0, scale=dim ** -0.5).backward(grad[: len(lens)])
        out["paths"]["cross"] = sorted(set(launches))
    finally:
        sa._bwd_kernel, sa.BWD_ONE_BLOCK = kernel, setting
    return out


def opcheck() -> dict:
    """torch.library.opcheck of both ops without dropout (schema, fake implementations against the
    kernels' outputs, autograd registration, tracing by AOTAutograd): a list of failures, empty if none."""
    from seqcls.short_attention import _attention_bwd, _attention_fwd
    torch.manual_seed(0)
    heads, dim = 2, 16
    cu, tokens = packed([5, 40, 1])
    qkv = torch.randn(tokens, 3 * heads * dim).half()
    q, k, v = (t.view(tokens, heads, dim) for t in qkv.chunk(3, dim=-1))
    out, lse, seed = _attention_fwd(q, k, v, cu, cu, 64, 0.0, 0.25)
    cu_q = torch.tensor([0, 1, 2, 2], dtype=torch.int32)  # one query for two sequences, none for the third
    first = q[cu[:-2].long()].contiguous()  # the first tokens of the first two sequences
    out1, lse1, seed1 = _attention_fwd(first, k, v, cu_q, cu, 64, 0.0, 0.25)
    failures = []
    for op, args in ((_attention_fwd, (q.contiguous().requires_grad_(), k.contiguous(), v.contiguous(), cu, cu, 64, 0.0, 0.25)),
                     (_attention_fwd, (q, k, v, cu, cu, 64, 0.0, 0.25)),
                     (_attention_fwd, (first.requires_grad_(), k.contiguous(), v.contiguous(), cu_q, cu, 64, 0.0, 0.25)),
                     (_attention_bwd, (out, q, k, v, lse, seed, cu, cu, 64, 0.0, 0.25, True)),
                     (_attention_bwd, (out, q, k, v, lse, seed, cu, cu, 64, 0.0, 0.25, False)),
                     (_attention_bwd, (out1, first.detach(), k, v, lse1, seed1, cu_q, cu, 64, 0.0, 0.25, False))):
        for name, result in torch.library.opcheck(op, args).items():
            if result != "SUCCESS":
                failures.append(f"{op}: {name}: {result}")
    return {"failures": failures}


def masks() -> dict:
    """seqcls.dropout: the keep-mask's rate overall and in each of the 8 lanes a Philox call fills, its
    neighbours' correlation, seeds, a length that is no multiple of the kernel's block; MaskDropout's
    output and gradient; the op under torch.compile (dynamo, AOT autograd) and opcheck."""
    from seqcls.dropout import MaskDropout, dropout_keep
    n, out = 100_003, {}
    for p in (0.1, 0.5):
        keep = dropout_keep(torch.tensor([7]), [n], p)
        f = keep.float()
        lanes = f[: n - n % 8].view(-1, 8).mean(0)
        a, b = f[:-1] - f.mean(), f[1:] - f.mean()
        out[str(p)] = {"shape": list(keep.shape), "dtype": str(keep.dtype), "kept": f.mean().item(),
                       "lanes": [lanes.min().item(), lanes.max().item()],
                       "neighbour_corr": ((a * b).mean() / (a * a).mean()).item(),
                       "tail_kept": f[-1000:].mean().item()}  # the last, partial block is written too
    one = dropout_keep(torch.tensor([7]), [n], 0.1)
    out["same_seed_same"] = torch.equal(one, dropout_keep(torch.tensor([7]), [n], 0.1))
    out["other_seed_same"] = torch.equal(one, dropout_keep(torch.tensor([8]), [n], 0.1))
    out["high_bits_seed_same"] = torch.equal(one, dropout_keep(torch.tensor([7 + 2**40]), [n], 0.1))  # a 64-bit key
    out["halves_same"] = torch.equal(one[:50_000], one[50_000:100_000])
    drop = MaskDropout(0.25).train()
    x = torch.randn(64, 33, requires_grad=True)
    y = drop(x)
    y.backward(torch.ones_like(y))
    kept = y != 0
    out["module"] = {"kept": kept.float().mean().item(),
                     "values": (y[kept] - x[kept] / 0.75).abs().max().item(),
                     "grad": (x.grad - kept.float() / 0.75).abs().max().item(),
                     "eval_identity": torch.equal(drop.eval()(x), x)}
    drop.train()
    compiled = torch.compile(lambda t: drop(t) * 2, backend="aot_eager", fullgraph=True)
    z = compiled(x)
    out["compiled_kept"] = (z != 0).float().mean().item()
    out["compiled_values"] = (z[z != 0] - 2 * x[z != 0] / 0.75).abs().max().item()
    out["opcheck"] = [f"{k}: {v}" for k, v in torch.library.opcheck(dropout_keep, (torch.tensor([3]), [1000], 0.2)).items()
                      if v != "SUCCESS"]
    return out


def mask_bits() -> dict:
    """seqcls.dropout's packed masks: the byte layout against numpy's little-endian unpacking, the rate
    overall, in each bit position and in the last partial byte, seeds; MaskDropout with packed masks
    (output, gradient, compiled) and opcheck."""
    import numpy as np
    from seqcls.dropout import MaskDropout, dropout_keep, dropout_keep_bits, unpack_keep
    n, out = 100_003, {}
    packed = dropout_keep_bits(torch.tensor([7]), n, 0.1)
    keep = unpack_keep(packed, [n])
    reference = np.unpackbits(packed.numpy(), bitorder="little")[:n]
    out["layout"] = {"shape": list(packed.shape), "dtype": str(packed.dtype),
                     "matches_numpy": bool((keep.numpy() == reference).all()),
                     "is_the_bool_mask": torch.equal(keep.bool(), dropout_keep(torch.tensor([7]), [n], 0.1)),
                     "as_2d": torch.equal(unpack_keep(packed[:12], [8, 12]), keep[:96].view(8, 12))}
    for p in (0.1, 0.5):
        f = unpack_keep(dropout_keep_bits(torch.tensor([7]), n, p), [n]).float()
        bits = f[: n - n % 8].view(-1, 8).mean(0)
        a, b = f[:-1] - f.mean(), f[1:] - f.mean()
        out[str(p)] = {"kept": f.mean().item(), "bits": [bits.min().item(), bits.max().item()],
                       "neighbour_corr": ((a * b).mean() / (a * a).mean()).item(),
                       "tail_kept": f[-1000:].mean().item()}
    out["same_seed_same"] = torch.equal(packed, dropout_keep_bits(torch.tensor([7]), n, 0.1))
    out["other_seed_same"] = torch.equal(packed, dropout_keep_bits(torch.tensor([8]), n, 0.1))
    out["high_bits_seed_same"] = torch.equal(packed, dropout_keep_bits(torch.tensor([7 + 2**40]), n, 0.1))
    drop = MaskDropout(0.25).train()
    drop.packed_mask = True
    x = torch.randn(64, 33, requires_grad=True)
    y = drop(x)
    y.backward(torch.ones_like(y))
    kept = y != 0
    out["module"] = {"kept": kept.float().mean().item(), "values": (y[kept] - x[kept] / 0.75).abs().max().item(),
                     "grad": (x.grad - kept.float() / 0.75).abs().max().item()}
    compiled = torch.compile(lambda t: drop(t) * 2, backend="aot_eager", fullgraph=True)
    z = compiled(x)
    out["compiled_kept"] = (z != 0).float().mean().item()
    out["compiled_values"] = (z[z != 0] - 2 * x[z != 0] / 0.75).abs().max().item()
    out["opcheck"] = [f"{k}: {v}" for k, v in torch.library.opcheck(dropout_keep_bits, (torch.tensor([3]), 1001, 0.2)).items()
                      if v != "SUCCESS"]
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    out["saved"] = {}  # what the compiled forward keeps for the backward, besides float tensors
    for packed_mask in (False, True):
        def forward_outputs(gm, inputs, packed_mask=packed_mask):
            outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
            out["saved"][str(packed_mask)] = sorted([str(o.meta["val"].dtype), list(o.meta["val"].shape)] for o in outputs
                                                    if not o.meta["val"].dtype.is_floating_point)
            return make_boxed_func(gm)

        torch._dynamo.reset()
        drop.packed_mask = packed_mask
        residual = torch.randn(64, 32)
        block = torch.compile(lambda t: torch.nn.functional.layer_norm(drop(t) + residual, (32,)),
                              backend=aot_autograd(fw_compiler=forward_outputs, bw_compiler=lambda gm, _: make_boxed_func(gm),
                                                   partition_fn=min_cut_rematerialization_partition))
        block(torch.randn(64, 32, requires_grad=True)).sum().backward()
    return out


if __name__ == "__main__":
    print(json.dumps({"match": match, "cross": cross, "dropout": dropout, "opcheck": opcheck, "masks": masks,
                      "mask_bits": mask_bits, "one_block": one_block, "tails": tails}[sys.argv[1]]()))
