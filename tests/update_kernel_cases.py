"""Cases for tests/test_master_weights.py run under Triton's CPU interpreter (TRITON_INTERPRET=1 must be
set before triton is imported, so they run in a process of their own); prints one JSON line."""

import copy
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


def dense_adam(state: dict, grad, scale, step_size, bc2, decay, decoupled: bool, wd: float, b1=0.9, b2=0.999,
               eps=1e-8) -> None:
    """Every row's step, in LazyRows's arithmetic (seqcls.optim._master_update's, in fp32)."""
    g = grad / scale
    p, m, v = state["p"], state["m"], state["v"]
    if decoupled:
        p = p * decay
    else:
        g = g + wd * p
    m = m + (1 - b1) * (g - m)
    v = v * b2 + (1 - b2) * g * g
    state.update(p=p - m / (v.sqrt() / bc2 + eps) * step_size, m=m, v=v)


def lazy(decoupled: bool) -> dict:
    """LazyRows over 12 steps of a schedule, each touching ~30% of the rows at random, against every row
    stepped every step: the rows a forward is about to read (caught up before the step, except at steps 3
    and 8, where the step's own kernel replays what they owe), the touched rows after each step, every row
    after each flush (steps 6 and 12)."""
    torch.manual_seed(0)
    rows, width, wd = 22, 40, 0.1  # 40 columns: a block of 64 with a masked tail; 22 rows: a program of 2 of 4
    ref = {"p": torch.randn(rows, width), "m": torch.zeros(rows, width), "v": torch.zeros(rows, width)}
    got = {k: v.clone() for k, v in ref.items()}
    lazy_rows = update_kernel.LazyRows(got["p"], capacity=16)
    step = torch.zeros(())
    gen = torch.Generator().manual_seed(1)
    err = {"caught_up": 0.0, "touched": 0.0, "flush": 0.0}
    stale_rows, untouched_kept = 0, True
    hyper = (0.9, 0.999, 1e-8, wd, decoupled)  # beta1, beta2, eps, weight decay, decoupled

    def max_err(which):
        return max((got[k][which] - ref[k][which]).abs().max().item() if which.any() else 0.0 for k in got)
    for t in range(1, 13):
        lr, scale = torch.tensor(1e-2 * (1 - t / 20)), torch.tensor(1.0 + 0.1 * t)
        touched = torch.rand(rows, generator=gen) < 0.3
        grad = torch.randn(rows, width, generator=gen) * touched[:, None]
        if t not in (3, 8):
            ids = touched.nonzero().reshape(-1).repeat(2)  # ids repeat, as tokens do
            lazy_rows.catch_up(ids[torch.randperm(ids.numel(), generator=gen)], got["p"], got["m"], got["v"], step,
                               hyper)
            err["caught_up"] = max(err["caught_up"], max_err(touched))
        step += 1
        step_size, bc2 = optim._adam_scalars(step, lr, 0.9, 0.999)
        decay = 1 - lr * wd
        dense_adam(ref, grad, scale, step_size, bc2, decay, decoupled, wd)
        before = {k: v.clone() for k, v in got.items()}
        lazy_rows.record(step, step_size, bc2, decay)
        lazy_rows.step(got["p"], grad, got["m"], got["v"], step, scale, hyper)
        err["touched"] = max(err["touched"], max_err(touched))
        untouched_kept &= all(torch.equal(got[k][~touched], before[k][~touched]) for k in got)
        stale_rows += int((got["p"] != ref["p"]).any(1).sum())
        if t in (6, 12):
            lazy_rows.flush(got["p"], got["m"], got["v"], step, hyper)
            err["flush"] = max(err["flush"], max_err(torch.ones(rows, dtype=torch.bool)))
    return {"err": err, "stale_rows": stale_rows, "untouched_kept": untouched_kept,
            "last": lazy_rows.last.tolist(), "wanted_cleared": not lazy_rows.wanted.any().item(),
            "moved": (got["p"] - torch.randn(rows, width, generator=torch.Generator().manual_seed(0))).abs().max().item()}


def optimizer_lazy(decoupled: bool) -> dict:
    """MasterWeightAdamW(lazy_rows=...) against the same optimizer updating the embedding densely (torch's
    fused AdamW): embedding rows looked up by random ids, a bf16 Linear with its master, clipped steps;
    state_dict() flushes; a fresh optimizer loading that state goes on as the first does."""
    from seqcls.optim import MasterWeightAdamW, use_bf16_weights

    def model():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({"emb": torch.nn.Embedding(30, 40), "lin": torch.nn.Linear(40, 3)})
    models = [model(), model(), model()]
    opts = []
    for i, m in enumerate(models):
        opts.append(MasterWeightAdamW(m.parameters(), lr=torch.tensor(1e-2), weight_decay=0.1,
                                      decoupled_weight_decay=decoupled, masters=use_bf16_weights(m),
                                      lazy_rows={m["emb"].weight: 16} if i != 1 else None))
        if i != 1:
            m["emb"].register_forward_pre_hook(opts[-1].catch_up_hook(m["emb"].weight))

    def step(m, opt, t):
        gen = torch.Generator().manual_seed(t)
        ids = torch.randint(0, 30, (4, 5), generator=gen)
        out = m["lin"](m["emb"](ids).to(torch.bfloat16)).float()
        out.square().mean().backward()
        opt.grad_scale = torch.tensor(1.0 + 0.2 * t)
        opt.step()
        del opt.grad_scale
        opt.zero_grad(set_to_none=True)
    for t in range(1, 7):
        for i in (0, 1):
            step(models[i], opts[i], t)
    stale = not torch.allclose(models[0]["emb"].weight, models[1]["emb"].weight, rtol=1e-5, atol=1e-7)
    saved = copy.deepcopy(opts[0].state_dict())  # flushes (a copy: torch.load would give new tensors)
    emb_err = (models[0]["emb"].weight - models[1]["emb"].weight).abs().max().item()
    moment_err = max((opts[0].state[a][k] - opts[1].state[b][k]).abs().max().item()
                     for a, b in zip(models[0].parameters(), models[1].parameters()) for k in ("exp_avg", "exp_avg_sq"))
    lin_equal = all(torch.equal(a, b) for a, b in zip(models[0]["lin"].parameters(), models[1]["lin"].parameters()))
    models[2].load_state_dict(models[0].state_dict())
    opts[2].load_state_dict(saved)
    synced = opts[2]._lazy[models[2]["emb"].weight].last.tolist() == [6] * 30
    for t in range(7, 10):
        for i in (0, 2):
            step(models[i], opts[i], t)
    opts[0].flush()
    opts[2].flush()
    resumed_equal = all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[2].parameters()))
    return {"stale_before_flush": stale, "emb_err": emb_err, "moment_err": moment_err, "lin_equal": lin_equal,
            "synced": synced, "resumed_equal": resumed_equal}


def trainer_lazy(folder: str) -> dict:
    """Two CPU runs of the tiny model (bf16 autocast, master weights, eager), the word embeddings updated
    lazily (the build's forward hook, the trainer's flushes) in one and by torch's dense fused AdamW in the
    other, validating every 3 of 6 steps: their train and validation losses and final weights."""
    from pathlib import Path

    from seqcls.build import build_trainer
    from tests.conftest import compose_cfg, synthetic_overrides, write_synthetic
    data = write_synthetic(Path(folder) / "data", n_train=96, n_val=16)
    # A word-level vocabulary of the synthetic task's words: an embedding of ~30 rows, not MiniLM's 30,522,
    # which Triton's interpreter would take minutes a run to go through
    words = {w for line in (data / "train.csv").read_text().splitlines()[1:] + (data / "dev.csv").read_text(
    ).splitlines()[1:] for w in line.rsplit(",", 1)[0].split()}
    tok = Path(folder) / "tokenizer"
    tok.mkdir()
    (tok / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]) + "\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    out = {}
    for lazy in (True, False):
        run_dir = Path(folder) / f"lazy_{lazy}"
        trainer = build_trainer(compose_cfg(synthetic_overrides(data, run_dir) + [
            "precision=bf16", "compile.enabled=false", "checkpoint.enabled=false", "step_scheduler.max_steps=6",
            "step_scheduler.log_every_steps=1", "step_scheduler.val_every_steps=3", "optimizer.weight_decay=0.01",
            f"compile.lazy_embedding_update={str(lazy).lower()}", f"model.tokenizer_name_or_path={tok}"]), run_dir)
        behind = []  # rows behind the optimizer's step at each flush: the laziness the comparison covers
        if trainer.optimizer._lazy:
            flush, lazy_rows = trainer.optimizer.flush, next(iter(trainer.optimizer._lazy.values()))

            def counted_flush(flush=flush, lazy_rows=lazy_rows, trainer=trainer):
                behind.append(int((lazy_rows.last < trainer.step).sum()))
                return flush()
            trainer.optimizer.flush = counted_flush
        trainer.fit()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        out[lazy] = {"train": [r["loss"] for r in rows if r["split"] == "train"],
                     "validation": [r["loss"] for r in rows if r["split"] == "validation"],
                     "params": {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()},
                     "lazy": bool(trainer.optimizer._lazy), "behind_at_flushes": behind,
                     "behind_at_end": (int((next(iter(trainer.optimizer._lazy.values())).last < 6).sum())
                                       if trainer.optimizer._lazy else None)}
    a, b = out[True], out[False]
    train_err = max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a["train"], b["train"]))
    val_err = max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a["validation"], b["validation"]))
    param_err = max((a["params"][n] - b["params"][n]).abs().max().item() for n in b["params"])
    return {"lazy": [a["lazy"], b["lazy"]], "steps": [len(a["train"]), len(b["train"])],
            "validations": [len(a["validation"]), len(b["validation"])], "train_err": train_err,
            "rows": a["params"]["bert.embeddings.word_embeddings.weight"].shape[0],
            "val_err": val_err, "param_err": param_err, "behind_at_flushes": a["behind_at_flushes"],
            "behind_at_end": a["behind_at_end"]}


if __name__ == "__main__":
    if sys.argv[1] == "trainer_lazy":
        print(json.dumps(trainer_lazy(sys.argv[2])))
    elif sys.argv[1] == "optimizer_lazy":
        print(json.dumps(optimizer_lazy(sys.argv[2] == "adamw")))
    elif sys.argv[1] == "lazy":
        print(json.dumps(lazy(sys.argv[2] == "adamw")))
    elif sys.argv[1] == "optimizer":
        print(json.dumps(optimizer(sys.argv[2] == "adamw")))
    else:
        print(json.dumps(main(sys.argv[1] == "adamw", float(sys.argv[2]))))
