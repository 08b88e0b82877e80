"""Runs seqcls's Triton kernels (seqcls.short_attention, seqcls.dropout, seqcls.lora_input) in Triton's CPU interpreter and
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


def match() -> dict:
    """Forward and gradients against fp32, lengths in every key tile (32, 64, 128, 256) and at their edges."""
    torch.manual_seed(0)
    heads, dim = 2, 16
    lens = [5, 33, 1, 70, 17, 200, 64, 65, 32, 128, 129]
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


def dropout() -> dict:
    """Value rows one-hot within each sequence: the output is the dropped-out attention matrix, whose
    zeros are the mask. The gradients must be those of attention under that mask."""
    torch.manual_seed(0)
    heads, dim, p = 2, 64, 0.3
    lens = [37, 1, 63, 37, 5]
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
        out = short_attention(*leaves, cu, cu, 64, dropout=p, scale=dim ** -0.5)
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


def lora_input() -> dict:
    """seqcls.lora_input: [x | c (m ⊙ x) A^T] and the gradients of x and A against fp32 torch on the same
    fp16 inputs, with and without a mask, ranks below and at the kernel's padded 16, a row count that is no
    multiple of its block; opcheck; a LoRALinear and merged query/key/value adapters with the joined input
    against the torch ops (no dropout: the same values)."""
    from seqcls.lora import LoRALinear
    from seqcls.lora_input import lora_input as op, lora_input_backward
    from seqcls.models import merged_lora_linear
    torch.manual_seed(0)
    out = {}
    for rank in (8, 16):
        for masked in (False, True):
            n, width, c = 130, 128, 0.7
            x = torch.randn(n, width).half()
            a = (torch.randn(rank, width) * 0.1).half()
            keep = torch.rand(n, width) > 0.3 if masked else None
            g = torch.randn(n, width + rank).half()
            xk, ak = x.clone().requires_grad_(), a.clone().requires_grad_()
            xu = op(xk, keep, ak, c)
            xu.backward(g)
            xr, ar = x.float().requires_grad_(), a.float().requires_grad_()
            dropped = xr * keep if masked else xr
            ref = torch.cat([xr, c * dropped @ ar.t()], dim=1)
            ref.backward(g.float())
            err = lambda p, q: (p.float() - q).abs().max().item() / max(1e-6, q.abs().max().item())  # noqa: E731
            out[f"{rank}-{masked}"] = {"x_exact": torch.equal(xu[:, :width], x), "u": err(xu[:, width:], ref[:, width:]),
                                       "dx": err(xk.grad, xr.grad), "da": err(ak.grad, ar.grad),
                                       "shape": list(xu.shape), "dtypes": [str(xk.grad.dtype), str(ak.grad.dtype)]}
    x, a = torch.randn(70, 64).half(), torch.randn(8, 64).half()
    keep = torch.rand(70, 64) > 0.5
    fails = []
    for args in ((x.requires_grad_(), keep, a.requires_grad_(), 0.5), (x, None, a, 2.0)):
        fails += [f"lora_input: {k}: {v}" for k, v in torch.library.opcheck(op, args).items() if v != "SUCCESS"]
    dxu = torch.randn(70, 72).half()
    fails += [f"backward: {k}: {v}" for k, v in torch.library.opcheck(
        lora_input_backward, (dxu, x.detach(), keep, a.detach(), 0.5)).items() if v != "SUCCESS"]
    out["opcheck"] = fails
    # A layer and the merged adapters, joined input against torch's ops (no dropout: equal up to rounding).
    layer = LoRALinear(torch.nn.Parameter(torch.randn(48, 64) * 0.1), torch.nn.Parameter(torch.zeros(48)),
                       dim=8, alpha=16, dropout=0.0).half()
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    rows = torch.randn(3, 37, 64).half()
    results = []
    for joined in (False, True):
        layer.joined_input = joined
        layer.zero_grad()
        r = rows.clone().requires_grad_()
        y = layer(r)
        y.backward(torch.ones_like(y))
        results.append((y.float(), r.grad.float(), layer.lora_A.weight.grad.float(), layer.lora_B.weight.grad.float()))
    out["layer"] = [(p - q).abs().max().item() / max(1e-6, q.abs().max().item()) for p, q in zip(*results)]
    adapters = [LoRALinear(torch.nn.Parameter(torch.randn(32, 64) * 0.1), None, dim=8, alpha=8, dropout=0.0).half()
                if i != 1 else None for i in range(3)]
    for ad in adapters[::2]:
        torch.nn.init.normal_(ad.lora_B.weight, std=0.1)
    weight = torch.randn(96, 64).half() * 0.1
    merged = []
    for joined in (False, True):
        for ad in adapters[::2]:
            ad.joined_input = joined
            ad.zero_grad()
        r = rows.reshape(-1, 64).clone().requires_grad_()
        y = merged_lora_linear(r, weight, torch.zeros(96).half(), adapters)
        y.backward(torch.ones_like(y))
        merged.append((y.float(), r.grad.float(), adapters[0].lora_A.weight.grad.float(), adapters[2].lora_B.weight.grad.float()))
    out["merged"] = [(p - q).abs().max().item() / max(1e-6, q.abs().max().item()) for p, q in zip(*merged)]
    return out


if __name__ == "__main__":
    print(json.dumps({"match": match, "cross": cross, "dropout": dropout, "opcheck": opcheck, "masks": masks,
                      "lora_input": lora_input}[sys.argv[1]]()))
