"""Cases for tests/test_master_weights.py run under Triton's CPU interpreter (TRITON_INTERPRET=1 must be
set before triton is imported, so they run in a process of their own); prints one JSON line."""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from seqcls import optim, update_kernel  # noqa: E402


def main(decoupled: bool, weight_decay: float) -> dict:
    torch.manual_seed(0)
    numels = [100, 64, 7, 300]  # blocks of 64: a tensor of one block, partial blocks, several blocks
    total = sum(numels)
    master = torch.randn(total)
    state = {"master": master, "exp_avg": torch.randn(total) * 0.1, "exp_avg_sq": torch.rand(total) * 0.01}
    grads = [torch.randn(n).to(torch.bfloat16) for n in numels]
    lr, scale = torch.tensor(1e-3), torch.tensor(1.7)
    step_size, bc2 = optim._adam_scalars(torch.tensor(3.0), lr, 0.9, 0.999)
    args = (step_size, bc2, lr, scale, 0.9, 0.999, 1e-8, weight_decay, decoupled)
    ref = {k: v.clone() for k, v in state.items()}
    ref_weight = torch.empty(total, dtype=torch.bfloat16)
    optim._master_update(ref_weight, ref["master"], torch.cat(grads).float(), ref["exp_avg"], ref["exp_avg_sq"], *args)
    got = {k: v.clone() for k, v in state.items()}
    weight = torch.empty(total, dtype=torch.bfloat16)
    table = update_kernel.BlockTable(numels, torch.device("cpu"), block=64)
    update_kernel.multi_tensor_update(table, weight, got["master"], grads, got["exp_avg"], got["exp_avg_sq"], *args)
    err = {k: ((got[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in state}
    return {"err": err, "weight_equal": torch.equal(weight, ref_weight),
            "weight_is_rounded_master": torch.equal(weight, got["master"].to(torch.bfloat16)),
            "moved": (got["master"] - master).abs().max().item(), "blocks": table.block_tensor.numel()}


def optimizer(decoupled: bool) -> dict:
    """MasterWeightAdamW(compiled=True, kernel="triton") against the eager update over three steps of
    clipped gradients, with buckets of several tensors and a bucket cut across blocks of the kernel."""
    from seqcls.optim import MasterWeightAdamW, use_bf16_weights

    def stack():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 3), torch.nn.Linear(3, 2))
    models, opts = [stack(), stack()], []
    for model, compiled in zip(models, (False, True)):
        ls = list(model)
        opts.append(MasterWeightAdamW(model.parameters(), lr=torch.tensor(1e-2), weight_decay=0.1,
                                      masters=use_bf16_weights(model), compiled=compiled, kernel="triton",
                                      decoupled_weight_decay=decoupled,
                                      buckets=[list(ls[0].parameters()) + list(ls[1].parameters())]))
    update_kernel.BLOCK = 64  # several blocks a tensor, partial ones at the tensors' ends (interpreter's speed)
    for step in range(3):
        for model, opt in zip(models, opts):
            gen = torch.Generator().manual_seed(step)
            for p in model.parameters():
                p.grad = (torch.randn(p.shape, generator=gen) * 0.1 * (step + 1)).to(torch.bfloat16)
            opt.grad_scale = torch.tensor(1.0 + step)
            opt.step()
    errs, equal, rounded = {}, True, True
    for ref, got in zip(models[0].parameters(), models[1].parameters()):
        for key, value in opts[0].state[ref].items():
            if key != "step":
                err = ((opts[1].state[got][key] - value).abs().max() / value.abs().max()).item()
                errs[key] = max(errs.get(key, 0.0), err)
        equal &= torch.equal(got, ref)
        rounded &= torch.equal(got, opts[1].state[got]["master"].to(torch.bfloat16))
    tables = [b.table is not None for b in opts[1]._buckets[0]]
    return {"err": errs, "weights_equal": equal, "weight_is_rounded_master": rounded, "tables": tables}


if __name__ == "__main__":
    if sys.argv[1] == "optimizer":
        print(json.dumps(optimizer(sys.argv[2] == "adamw")))
    else:
        print(json.dumps(main(sys.argv[1] == "adamw", float(sys.argv[2]))))
