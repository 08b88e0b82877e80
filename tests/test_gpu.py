"""The GPU fast path (torch.compile + the training step as CUDA graphs): same training as eager.

These need a CUDA GPU; on a machine without one they are deselected (conftest), not skipped.
Run them on a GPU machine with:  python -m pytest -m gpu tests/test_gpu.py
"""

import json
import os
import random
from types import SimpleNamespace

import pytest
import torch

from seqcls.build import build_trainer
from tests.conftest import compose_cfg, synthetic_overrides, write_synthetic

pytestmark = pytest.mark.gpu

SMALL = ["model=tiny_roberta", "model.config_overrides.hidden_size=64", "model.config_overrides.intermediate_size=128",
         "peft=none", "device=cuda", "dataset.max_length=40", "compile.length_bucket=8",
         "compile.dynamic=true",  # one compilation for all lengths: the tests spend less time compiling
         "step_scheduler.global_batch_size=16", "step_scheduler.local_batch_size=8",  # 2 micro-batches a step
         "step_scheduler.max_steps=12", "step_scheduler.log_every_steps=1", "optimizer.lr=1e-3",
         "lr_scheduler=linear", "lr_scheduler.warmup_ratio=0.25",
         "compile.tuned_gemm_cache=none"]  # each test times its own shapes; nothing left in the home folder
if os.environ.get("SEQCLS_TEST_TOKENIZER"):  # a GPU machine without the MiniLM package: its tokenizer files
    SMALL.append(f"model.tokenizer_name_or_path={os.environ['SEQCLS_TEST_TOKENIZER']}")
NO_DROPOUT = ["+model.config_overrides.hidden_dropout_prob=0.0", "+model.config_overrides.attention_probs_dropout_prob=0.0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic task with texts of 3 to 30 words: batches pad to several lengths."""
    folder = write_synthetic(tmp_path_factory.mktemp("gpu") / "data", n_train=256, n_val=16)
    rng = random.Random(1)
    for name in ("train", "dev"):
        lines = (folder / f"{name}.csv").read_text().splitlines()
        out = [lines[0]] + [f"{' '.join(['so'] * rng.randint(0, 25))} {text},{label}"
                            for text, label in (l.rsplit(",", 1) for l in lines[1:])]
        (folder / f"{name}.csv").write_text("\n".join(out) + "\n")
    return folder


def overrides(data, run_dir, extra):
    base = [o for o in synthetic_overrides(data, run_dir) if not o.startswith(("model=", "peft=", "+model", "step_", "optimizer.lr", "dataset.max_length"))]
    return base + SMALL + list(extra)


def train(data, run_dir, extra, *, stop_after=None):
    trainer = build_trainer(compose_cfg(overrides(data, run_dir, extra)), run_dir)
    if stop_after is not None:  # what a SIGTERM does: checkpoint at the next step boundary, then return
        flag = SimpleNamespace(requested=False)
        trainer.stop_signal, inner = flag, trainer.train_step

        def step(micro):
            out = inner(micro)
            flag.requested = trainer.step + 1 >= stop_after
            return out
        trainer.train_step = step
    trainer.fit()
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
    params = {n: p.detach().float().cpu().clone() for n, p in trainer.model.named_parameters()}
    return trainer, losses, params


ONE_MICRO_BATCH = ["step_scheduler.local_batch_size=16"]  # the one-graph step: forward, backward, update


@pytest.mark.parametrize("scope,extra", [("model", []), ("blocks", []), ("blocks", ONE_MICRO_BATCH),
                                         ("blocks", ONE_MICRO_BATCH + ["compile.combo_kernels=false"]),
                                         ("blocks", ONE_MICRO_BATCH + ["compile.update_kernel=triton"])],
                         ids=["model-accumulate", "blocks-accumulate", "blocks-one-graph", "blocks-one-graph-no-combo",
                              "blocks-one-graph-triton-update"])
def test_step_graphs_train_like_eager_across_shapes_and_accumulation(data, tmp_path, scope, extra):
    graphs, g_loss, g_par = train(data, tmp_path / "g", NO_DROPOUT + extra + [
        "compile.enabled=true", "checkpoint.enabled=false", f"compile.scope={scope}"])
    extra = [o for o in extra if not o.startswith("compile.update_kernel")]  # a setting of the graphs' update
    eager, e_loss, e_par = train(data, tmp_path / "e", NO_DROPOUT + extra + [
        "compile.enabled=false", "checkpoint.enabled=false"])
    assert graphs.step_graphs is not None and eager.step_graphs is None
    one_graph = ONE_MICRO_BATCH[0] in extra
    assert graphs.step_graphs.one_graph == one_graph
    assert len(graphs.step_graphs.micro) >= 2  # several padded lengths, each its own graph
    if one_graph:  # no gradient memory between steps, as in eager training
        assert all(p.grad is None for p in graphs.model.parameters())
    assert list(g_loss) == list(range(1, 13))
    for step in g_loss:  # bf16 autocast in both; compiled kernels round differently
        assert g_loss[step] == pytest.approx(e_loss[step], rel=2e-2, abs=2e-3), step
    start = build_trainer(compose_cfg(overrides(data, tmp_path / "s", NO_DROPOUT + extra + [
                                                    "checkpoint.enabled=false", "compile.enabled=false"])),
                          tmp_path / "s").model
    moved = 0
    for name, p in start.named_parameters():
        if name.endswith("key.bias"):
            # Softmax ignores a shift shared by all scores of a row: the key bias's true gradient is 0, so
            # what moves it is rounding noise, which Adam scales up to ~lr a step in either run.
            continue
        delta_g, delta_e = g_par[name] - p.detach().float().cpu(), e_par[name] - p.detach().float().cpu()
        # Adam moves every weight by up to ~lr a step whatever the gradient's size, so single weights with
        # tiny gradients that round differently move differently (rare tokens' embedding rows): compare
        # each tensor's whole move. A missed, doubled or mis-scaled update is off by its own size (ratio 1).
        moved_by = delta_e.norm()
        if moved_by > 0:
            assert (delta_g - delta_e).norm() < 0.5 * moved_by, name
        moved += int(delta_e.abs().max() > 3e-3)
    assert moved > len(g_par) // 2  # the comparison is over parameters that trained
    # The LR schedule reached the graphs: warm-up then linear decay, as eager logs it.
    rows = [json.loads(l) for l in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    erows = [json.loads(l) for l in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["split"] == "train"] == pytest.approx(
        [r["lr"] for r in erows if r["split"] == "train"], rel=1e-6)


@pytest.mark.parametrize("micro", [[], ONE_MICRO_BATCH, ONE_MICRO_BATCH + ["peft=lora", "optimizer.lr=5e-3"]],
                         ids=["accumulate", "one-graph", "lora-one-graph"])  # LoRA: bf16 adapters, fp32 masters
def test_step_graphs_resume_with_the_same_dropout_and_optimizer_state(data, tmp_path, micro):
    extra = ["compile.enabled=true", "step_scheduler.ckpt_every_steps=100"] + micro
    _, ref_loss, ref_par = train(data, tmp_path / "ref", extra)
    first, loss_a, _ = train(data, tmp_path / "run", extra, stop_after=5)
    assert first.step == 5 and max(loss_a) == 5
    _, loss_b, par_b = train(data, tmp_path / "run", extra)  # resumes from step 5's checkpoint
    assert sorted(loss_b) == list(range(1, 13))
    for step in range(1, 13):  # dropout masks and Adam moments carried over: the same curve
        assert loss_b[step] == pytest.approx(ref_loss[step], rel=1e-3, abs=1e-4), step
    for name in ref_par:  # atomics in the backward make GPU runs differ in the last bits; Adam amplifies that
        assert (par_b[name] - ref_par[name]).abs().max() < 2e-3, name


def test_lazy_embedding_update_trains_as_the_dense_update_under_step_graphs(data, tmp_path):
    """compile.lazy_embedding_update: the word embeddings' rows updated when touched (caught up before each
    forward reads them), all of them before each validation (every 5 steps) and at the end: the same losses,
    validation and weights as torch's dense fused AdamW, up to float rounding order."""
    common = NO_DROPOUT + ONE_MICRO_BATCH + ["compile.enabled=true", "checkpoint.enabled=false",
                                             "step_scheduler.val_every_steps=5"]
    lazy, lazy_loss, lazy_par = train(data, tmp_path / "lazy", common + ["compile.lazy_embedding_update=true"])
    dense, dense_loss, dense_par = train(data, tmp_path / "dense", common)
    assert lazy.step_graphs is not None and lazy.optimizer._lazy and not dense.optimizer._lazy
    rows = next(iter(lazy.optimizer._lazy.values()))
    assert rows.last.min().item() == 12  # the end of the run brought every row up to date
    assert list(lazy_loss) == list(range(1, 13))
    for step in lazy_loss:
        assert lazy_loss[step] == pytest.approx(dense_loss[step], rel=1e-3, abs=1e-4), step
    for name in dense_par:  # atomics in the backward make GPU runs differ in the last bits; Adam amplifies that
        assert (lazy_par[name] - dense_par[name]).abs().max() < 2e-3, name
    val = {run: [r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                 if r["split"] == "validation"] for run in ("lazy", "dense")}
    assert len(val["lazy"]) == 3 and val["lazy"] == pytest.approx(val["dense"], rel=1e-3, abs=1e-4)


def test_lora_under_step_graphs_trains_only_adapters_and_head_like_eager(data, tmp_path):
    lora = NO_DROPOUT + ["peft=lora", "peft.dropout=0.0", "optimizer.lr=5e-3", "checkpoint.enabled=false"]
    trainer, losses, params = train(data, tmp_path / "l", lora + ["compile.enabled=true"])
    assert trainer.step_graphs is not None
    eager, e_losses, _ = train(data, tmp_path / "e", lora + ["compile.enabled=false"])
    assert eager.step_graphs is None
    assert list(losses) == list(range(1, 13))
    for step in losses:  # bf16 adapters and autocast in both; compiled kernels round differently
        assert losses[step] == pytest.approx(e_losses[step], rel=2e-2, abs=2e-3), step
    start = build_trainer(compose_cfg(overrides(data, tmp_path / "s", lora + ["compile.enabled=false"])),
                          tmp_path / "s").model
    for name, p in start.named_parameters():
        changed = not torch.equal(params[name], p.detach().float().cpu())
        assert changed == p.requires_grad, name


@pytest.mark.parametrize("in_place", [False, True, "triton"], ids=["end-to-end", "grads-in-place", "triton-kernel"])
def test_compiled_master_weight_update_matches_eager_and_replays_in_a_cuda_graph(in_place):
    from seqcls.optim import MasterWeightAdamW, use_bf16_weights
    from seqcls.trainer import clip_and_update

    def make(compiled):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.LayerNorm(256), torch.nn.Linear(256, 8)).cuda()
        opt = MasterWeightAdamW(model.parameters(), lr=torch.tensor(1e-2, device="cuda"), weight_decay=0.1,
                                capturable=True, compiled=compiled, masters=use_bf16_weights(model),
                                grads_in_place=compiled and in_place is True,
                                kernel="triton" if in_place == "triton" else "inductor")
        return list(model.parameters()), opt

    def grads(params, step):
        gen = torch.Generator(device="cuda").manual_seed(step)
        return [torch.randn(p.shape, generator=gen, device="cuda").to(p.dtype) * (0.01 + step) for p in params]

    ref, ref_opt = make(compiled=False)
    for step in range(4):
        for p, g in zip(ref, grads(ref, step)):
            p.grad = g
        clip_and_update(ref_opt, ref, 1.0)  # steps 1-3 clip, step 0 does not
    got, opt = make(compiled=True)
    for p, g in zip(got, grads(got, 0)):
        p.grad = g
    clip_and_update(opt, got, 1.0)  # compiles, outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        clip_and_update(opt, got, 1.0)
    for step in range(1, 4):
        for p, g in zip(got, grads(got, step)):
            p.grad.copy_(g)
        graph.replay()
    torch.cuda.synchronize()
    assert got[0].dtype == torch.bfloat16
    for r, g in zip(ref, got):
        state, ref_state = opt.state[g], ref_opt.state[r]
        assert state["step"].item() == 4
        for key in ref_state:
            assert torch.allclose(state[key], ref_state[key], rtol=1e-5, atol=1e-7), key
        if "master" in state:
            assert torch.equal(g, state["master"].to(torch.bfloat16))


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_fsdp2_on_one_gpu_with_compiled_blocks_trains_like_unsharded_eager(data, tmp_path, monkeypatch, peft):
    """FSDP2 over a one-rank NCCL group, each block compiled on its own with combo kernels (CUDA's default),
    against eager training without FSDP: the same loss curve. (The parameters FSDP2 leaves in the modules
    after the last forward are its bf16 compute copies, so the comparison is on the losses.)"""
    from seqcls.distributed import shutdown_distributed
    calls, real_compile = [], torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: (calls.append(kw), real_compile(self, **kw))[1])
    extra = NO_DROPOUT + [f"peft={peft}", "checkpoint.enabled=false"] + (["optimizer.lr=5e-3"] if peft == "lora" else [])
    sharded = build_trainer(compose_cfg(overrides(data, tmp_path / "f", extra + ["distributed=fsdp2", "compile.enabled=true"])),
                            tmp_path / "f")
    try:
        sharded.fit()
    finally:
        shutdown_distributed(sharded.dist)
    assert sharded.step_graphs is None  # no CUDA graphs under FSDP2
    assert len(calls) >= 2 and all(kw["options"]["combo_kernels"] for kw in calls)  # one call a block
    rows = [json.loads(l) for l in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    f_loss = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
    _, e_loss, _ = train(data, tmp_path / "e", extra + ["compile.enabled=false"])
    assert list(f_loss) == list(range(1, 13))
    for step in f_loss:  # bf16 autocast in both; the compiled kernels round differently
        assert f_loss[step] == pytest.approx(e_loss[step], rel=3e-2, abs=3e-3), step


@pytest.mark.parametrize("kernel", ["flash", "efficient", "short"])
def test_varlen_attention_kernels_match_the_reference_forward_and_backward(kernel):
    from seqcls.models import varlen_attention, varlen_self_attention
    torch.manual_seed(0)
    dev = torch.device("cuda")
    cu = torch.tensor([0, 37, 38, 101, 128], dtype=torch.int32, device=dev)
    cu_first = torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32, device=dev)  # one query a sequence, none for the filler
    for cu_q, rows, max_q in ((cu, torch.arange(128, device=dev), 63), (cu_first, cu[:-2].long(), 1)):
        x = [torch.randn(128, 4, 64, device=dev) for _ in range(3)]
        grad = torch.randn(len(rows), 4, 64, device=dev)
        outs, grads = [], []
        for dtype in (torch.bfloat16, torch.float32):  # bf16: the GPU kernel; fp32: the reference
            q, k, v = (t.to(dtype).requires_grad_() for t in (x[0][rows], x[1], x[2]))
            out = varlen_attention(q, k, v, cu_q, cu, max_q, 63, dropout=0.0, scale=0.125, kernel=kernel)
            out.backward(grad.to(dtype))
            outs.append(out.float())
            grads.append([t.grad.float() for t in (q, k, v)])
        torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
        for g_kernel, g_ref in zip(*grads):
            torch.testing.assert_close(g_kernel, g_ref, rtol=5e-2, atol=5e-2)
    # Query, key and value as the thirds of one tensor (a fused projection): the gradient of that tensor.
    qkv_grads, grad = [], torch.randn(128, 4, 64, device=dev)
    for dtype in (torch.bfloat16, torch.float32):
        qkv = torch.cat([t.detach().reshape(128, -1) for t in x], dim=-1).to(dtype).requires_grad_()
        varlen_self_attention(qkv, 64, cu, 63, dropout=0.0, scale=0.125, kernel=kernel).backward(grad.to(dtype))
        qkv_grads.append(qkv.grad.float())
    torch.testing.assert_close(qkv_grads[0], qkv_grads[1], rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_short_attention_one_block_backward_gives_the_loops_gradients(dropout):
    """seqcls.short_attention.BWD_ONE_BLOCK (the 32- and 64-row key tiles' backward without a loop or
    accumulators) compiled for the GPU: the fused projection's gradient equal to the loop's, bit for bit."""
    import seqcls.short_attention as sa
    torch.manual_seed(0)
    dev = torch.device("cuda")
    cu = torch.tensor([0, 37, 38, 101, 128, 131, 242], dtype=torch.int32, device=dev)  # tiles 64, 32, 64, 32, 32, 128
    qkv = torch.randn(242, 3 * 16 * 64, device=dev, dtype=torch.bfloat16)
    grad = torch.randn(242, 16, 64, device=dev, dtype=torch.bfloat16)
    grads, setting = [], sa.BWD_ONE_BLOCK
    try:
        for one in (False, True):
            sa.BWD_ONE_BLOCK = one
            torch.cuda.manual_seed(0)  # the same dropout seed for both
            x = qkv.clone().requires_grad_()
            sa.short_self_attention(x, 64, cu, 111, dropout=dropout, scale=0.125).backward(grad)
            grads.append(x.grad)
    finally:
        sa.BWD_ONE_BLOCK = setting
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])


def test_short_attention_tails_give_the_128_row_tiles_values():
    """seqcls.short_attention.TAILS (lengths 65-96 in a 64-row key tile and a tail of 16 or 32 rows)
    compiled for the GPU: the output and the fused projection's gradient of the 128-row tile, up to the
    order of bf16 sums, and not the same kernels' results (the tails ran)."""
    import seqcls.short_attention as sa
    torch.manual_seed(0)
    dev = torch.device("cuda")
    lens = [70, 1, 90, 37, 81, 100, 65, 96]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    qkv = torch.randn(sum(lens), 3 * 16 * 64, device=dev, dtype=torch.bfloat16)
    grad = torch.randn(sum(lens), 16, 64, device=dev, dtype=torch.bfloat16)
    results = []
    try:
        for tails in (False, True):
            sa.TAILS = tails
            x = qkv.clone().requires_grad_()
            out = sa.short_self_attention(x, 64, cu, max(lens), dropout=0.0, scale=0.125)
            out.backward(grad)
            results.append((out.float(), x.grad.float()))
    finally:
        sa.TAILS = False
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert not torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("kernel", ["flash", "efficient", "short"])
def test_varlen_attention_dropout_backward_replays_the_forward_mask_in_cuda_graphs(kernel):
    """With value rows one-hot (v[j] = e_j within a sequence) the output is the dropped-out attention
    matrix P itself, and the value gradient must be P^T @ grad: the backward drew the forward's mask.
    Each graph replay draws a new mask. kernel=efficient asks for the memory-efficient kernel, whose
    backward fails this (it draws another mask, and its forward one mask for all heads); with dropout
    FlashAttention's must run instead."""
    from seqcls.models import varlen_attention
    torch.manual_seed(0)
    dev, heads, dim, p = torch.device("cuda"), 2, 64, 0.5
    lens = [37, 1, 63, 27]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    T = sum(lens)
    seq = torch.repeat_interleave(torch.arange(len(lens), device=dev), torch.tensor(lens, device=dev))
    pos = torch.arange(T, device=dev) - cu[:-1].long()[seq]
    q = torch.randn(T, heads, dim, device=dev, dtype=torch.bfloat16)
    k = torch.randn(T, heads, dim, device=dev, dtype=torch.bfloat16)
    v = torch.nn.functional.one_hot(pos, dim).to(torch.bfloat16)[:, None].expand(T, heads, dim).contiguous()
    v.requires_grad_()
    grad = torch.randn(T, heads, dim, device=dev, dtype=torch.bfloat16)
    out = torch.empty(T, heads, dim, device=dev, dtype=torch.bfloat16)
    dv = torch.empty_like(out)

    def step():
        v.grad = None
        o = varlen_attention(q, k, v, cu, cu, 63, 63, dropout=p, scale=0.125, kernel=kernel)
        o.backward(grad)
        out.copy_(o.detach())
        dv.copy_(v.grad)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    masks = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        # P[i, j] for j in i's sequence: out[i, :, pos(j)]; zero across sequences.
        same = seq[:, None] == seq[None, :]
        P = out.float()[:, :, pos].permute(1, 0, 2) * same  # P[h, i, j] = out[i, h, pos(j)]
        expect = torch.einsum("hij,ihd->jhd", P, grad.float())
        torch.testing.assert_close(dv.float(), expect, rtol=3e-2, atol=3e-2)
        dropped = (P == 0)[:, same].float().mean().item()
        assert 0.4 < dropped < 0.6, dropped  # p of the weights dropped
        masks.append(P != 0)
    assert not torch.equal(masks[0], masks[1])  # each replay draws a new mask


@pytest.mark.parametrize("peft,kernel", [("none", "auto"), ("lora", "flash"), ("lora", "efficient"),
                                         ("none", "short"), ("lora", "short")])
def test_packed_sequences_under_step_graphs_train_like_padded_eager(data, tmp_path, peft, kernel):
    extra = NO_DROPOUT + ONE_MICRO_BATCH + ["checkpoint.enabled=false", "dataloader.group_by_length=false",
                                            f"peft={peft}", f"compile.varlen_kernel={kernel}"] + (
        ["optimizer.lr=5e-3"] if peft == "lora" else [])
    packed, p_loss, _ = train(data, tmp_path / "p", extra + ["compile.enabled=true"])
    padded, e_loss, _ = train(data, tmp_path / "e", extra + ["compile.enabled=false", "compile.pack_sequences=false"])
    assert "cu_seq_lens" in next(iter(packed.train_loader)) and "cu_seq_lens" not in next(iter(padded.train_loader))
    assert packed.step_graphs is not None and len(packed.step_graphs.micro) >= 2  # several packed lengths
    assert list(p_loss) == list(range(1, 13))
    for step in p_loss:  # the same batches; bf16 autocast in both, other kernels round differently
        assert p_loss[step] == pytest.approx(e_loss[step], rel=2e-2, abs=2e-3), step


def test_capture_ahead_captures_every_shape_before_the_first_step_and_trains_the_same(data, tmp_path):
    from seqcls.step_graph import shape_key
    extra = ONE_MICRO_BATCH + ["compile.enabled=true", "checkpoint.enabled=false"]  # dropout on: masks must match
    trainer = build_trainer(compose_cfg(overrides(data, tmp_path / "a", extra + ["compile.capture_ahead=true"])),
                            tmp_path / "a")
    shapes = {shape_key(b) for b in trainer.upcoming_shapes()}
    at, inner = [], trainer.step_graphs._capture_micro
    trainer.step_graphs._capture_micro = lambda batch: (at.append(trainer.step), inner(batch))[1]
    trainer.fit()
    assert len(shapes) >= 2 and set(trainer.step_graphs.micro) == shapes and at == [0] * len(shapes)
    rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    ahead = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
    lazy_run, lazy, _ = train(data, tmp_path / "l", extra + ["compile.capture_ahead=false"])  # at first use
    assert set(lazy_run.step_graphs.micro) == shapes
    assert list(ahead) == list(lazy) == list(range(1, 13))
    for step in ahead:  # the RNG is forked around every capture: the same dropout masks whenever it happens
        assert ahead[step] == pytest.approx(lazy[step], rel=1e-3, abs=1e-4), step


def test_capturing_more_shapes_holds_no_more_gpu_memory(data, tmp_path):
    """Graphs share one memory pool, and warm-ups and captures one side stream: cuBLAS keeps a workspace
    (8-32 MiB) for every stream it ever ran on, so a stream per shape would grow memory with each shape."""
    extra = ONE_MICRO_BATCH + ["compile.enabled=true", "checkpoint.enabled=false", "compile.capture_ahead=true"]
    trainer = build_trainer(compose_cfg(overrides(data, tmp_path / "m", extra)), tmp_path / "m")
    allocated, inner = [], trainer.step_graphs._capture_micro

    def capture(batch):
        out = inner(batch)
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
        return out
    trainer.step_graphs._capture_micro = capture
    trainer.fit()
    assert len(allocated) >= 2
    # What a shape may add: its static input buffers and outputs, a few KiB for this model.
    assert allocated[-1] - allocated[0] < 2**20, [f"{(a - allocated[0]) / 2**20:.1f} MiB" for a in allocated]


@pytest.mark.parametrize("setting", ["triton", "triton_bits"])
def test_triton_dropout_masks_draw_anew_each_graph_replay_and_train(data, tmp_path, setting):
    """compile.dropout_masks=triton (and triton_bits, masks 8 entries a byte): the mask kernel inside a CUDA
    graph gives each replay a new mask at the rate asked; a LoRA run with dropout, packed, under step
    graphs, trains (its loss falls)."""
    from seqcls.dropout import MaskDropout
    drop, x = MaskDropout(0.1).train(), torch.ones(4096, 256, device="cuda", dtype=torch.bfloat16)
    drop.packed_mask = setting == "triton_bits"
    out = torch.empty_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out.copy_(drop(x))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(drop(x))
    masks = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        masks.append(out != 0)
        assert abs(masks[-1].float().mean().item() - 0.9) < 0.005
        assert torch.equal(out[masks[-1]], torch.full_like(out[masks[-1]], 1 / 0.9))
    assert not torch.equal(masks[0], masks[1])
    extra = ONE_MICRO_BATCH + ["checkpoint.enabled=false", "peft=lora", "optimizer.lr=5e-3",
                               f"compile.dropout_masks={setting}", "step_scheduler.max_steps=30"]
    trainer, losses, _ = train(data, tmp_path, extra)
    assert "cu_seq_lens" in next(iter(trainer.train_loader)) and trainer.step_graphs is not None
    masked = [m for m in trainer.model.modules() if isinstance(m, MaskDropout) and m.p > 0]
    assert len(masked) >= 4 and all(m.packed_mask == (setting == "triton_bits") for m in masked)  # hidden and LoRA
    assert sum(losses[s] for s in range(21, 31)) < sum(losses[s] for s in range(1, 11)), losses


def test_log_values_are_the_log_steps_and_their_read_does_not_wait_for_the_next_step():
    """trainer.LogValues on a GPU: the values the log step held (the next step overwrites its buffers), read
    while work queued after them still runs (the GPU is not left idle at a log step). The first pass loads
    every kernel the sequence launches: a kernel's first launch in a process can wait for the GPU to go idle
    (lazy module loading), as no step of a training run past its first does; the second pass is the check."""
    from seqcls.trainer import LogValues
    dev = torch.device("cuda")
    for check in (False, True):
        loss, norm, bad = torch.tensor(6.5, device=dev), torch.tensor(0.25, device=dev), torch.tensor(7, device=dev)
        lr = torch.tensor(1e-4, dtype=torch.float64, device=dev)
        torch.cuda.synchronize()
        values = LogValues(loss, norm, lr, bad)
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued after the copy: the next step
        for t in (loss, norm, lr, bad):
            t.fill_(-1)
        later = torch.cuda.Event()
        later.record()
        assert values.read() == (6.5, 0.25, 1e-4, 7)
        if check:
            assert not later.query()
        torch.cuda.synchronize()


def test_tuned_gemm_matches_torch_eagerly_in_captures_and_compiled(tmp_path, monkeypatch):
    """seqcls.gemm on the GPU: each shape's tuned product (bias or not, a transposed operand, a slice
    whose rows lie wider apart than its columns) equals torch's within bf16 rounding; a graph captured
    after tuning replays it; a shape first met inside a capture runs torch's matmul and is not recorded;
    a later run takes every choice from the cache folder without timing; tuned_linear's gradients match
    F.linear's, compiled with a dynamic row count too."""
    from seqcls import gemm
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    gemm.enable(True, cache_dir=tmp_path / "cache")
    try:
        earlier = set(gemm.choices())  # shapes the suite's training runs tuned
        x, wide = torch.randn(1000, 256, **bf), torch.randn(1000, 264, **bf)
        w, bias, g = torch.randn(384, 256, **bf) / 16, torch.randn(384, **bf), torch.randn(1000, 384, **bf)
        cases = [(x, w.t(), bias), (x, w.t(), None), (g, w, None), (g.t(), x, None), (wide[:, :256], w.t(), bias)]
        for a, b, c in cases:
            ref = (a.float() @ b.float() + (0 if c is None else c.float())).to(torch.bfloat16)
            for _ in range(2):  # tunes, then runs the choice
                out = gemm.mm(a, b, c)
                assert (out.float() - ref.float()).abs().max().item() <= 0.02 * ref.abs().max().item()
        mine = {k: v for k, v in gemm.choices().items() if k not in earlier}
        assert len(mine) == len(cases) == len(list((tmp_path / "cache").glob("*.json")))
        for key in mine:  # a new run: nothing in memory, the folder kept
            del gemm._choices[key], gemm._timings[key]
        monkeypatch.setattr(gemm, "_gpu_ms", lambda run: pytest.fail("a cached shape was timed again"))
        for a, b, c in cases:
            ref = (a.float() @ b.float() + (0 if c is None else c.float())).to(torch.bfloat16)
            assert (gemm.mm(a, b, c).float() - ref.float()).abs().max().item() <= 0.02 * ref.abs().max().item()
        assert {k: v for k, v in gemm.choices().items() if k in mine} == mine and set(mine) <= gemm._cached
        monkeypatch.undo()
        static = torch.empty(1000, 384, **bf)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            gemm.mm(x, w.t(), bias)  # this stream's workspace, before the capture
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph, stream=side):
            static.copy_(gemm.mm(x, w.t(), bias))
            unseen = gemm.mm(x[:999], w.t(), bias)  # first met inside the capture: torch's matmul
        x.normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.allclose(static.float(), (x.float() @ w.float().t() + bias.float()), atol=0.1, rtol=0.02)
        assert unseen.shape == (999, 384) and set(gemm.choices()) == earlier | set(mine)

        def loss(f, x, w, b):
            return f(x, w, b).float().square().mean()
        compiled = torch.compile(lambda x, w, b: loss(gemm.linear, x, w, b), dynamic=True)
        for rows in (1000, 1200):
            xs, ws, bs = (t.detach().clone().requires_grad_() for t in (torch.randn(rows, 256, **bf), w, bias))
            got = torch.autograd.grad(compiled(xs, ws, bs), (xs, ws, bs))
            want = torch.autograd.grad(loss(torch.nn.functional.linear, xs, ws, bs), (xs, ws, bs))
            for a, b in zip(got, want):
                assert (a.float() - b.float()).abs().max().item() <= 0.02 * b.abs().max().item() + 1e-6
    finally:
        gemm.enable(False)


def test_epilogues_match_torch_and_train_as_the_unfused_block():
    """cuBLASLt's GELU epilogues (compile.gelu_epilogue): gelu(a @ b + bias) with its input written beside
    it, and GELU's gradient from a @ b and that input; a weight's gradient with its bias's (BGRADB), whose
    algorithms cuBLASLt lists and computes right; each within bf16 rounding of torch's kernels, tuned then
    run from the choice; gelu_mlp compiled with a dynamic row count gives the gradients of F.linear, tanh
    GELU, F.linear."""
    from seqcls import gemm
    import torch.nn.functional as F
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    gemm.enable(True)
    try:
        x, w1, b1 = torch.randn(1000, 256, **bf), torch.randn(1024, 256, **bf) / 16, torch.randn(1024, **bf)
        w2, grad = torch.randn(256, 1024, **bf) / 32, torch.randn(1000, 256, **bf)
        pre_ref = x.float() @ w1.float().t() + b1.float()
        for _ in range(2):
            act, pre = gemm.mm_gelu(x, w1.t(), b1)
            assert (pre.float() - pre_ref).abs().max().item() <= 0.02 * pre_ref.abs().max().item()
            want = F.gelu(pre_ref, approximate="tanh")
            assert (act.float() - want).abs().max().item() <= 0.02 * want.abs().max().item()
            dpre = gemm.mm_dgelu(grad, w2, pre)
            want = torch.ops.aten.gelu_backward(grad.float() @ w2.float(), pre.float(), approximate="tanh")
            assert (dpre.float() - want).abs().max().item() <= 0.02 * want.abs().max().item()
            dw, db = gemm.mm_bgrad(grad.t(), x)
            want = grad.float().t() @ x.float()
            assert (dw.float() - want).abs().max().item() <= 0.02 * want.abs().max().item()
            want = grad.float().sum(0)
            assert db.shape == (256,) and (db.float() - want).abs().max().item() <= 0.02 * want.abs().max().item()
        modes = {k[gemm.KEY_MODE] for k in gemm.choices()}
        assert {"gelu", "dgelu", "bgrad"} <= modes
        plan = gemm._Plan(grad.t(), x, None, "bgrad")
        refs, workspace = gemm._torch_run(grad.t(), x, None, "bgrad"), gemm._workspace(x.device)
        right = 0
        for i in range(plan.count):
            dw, db = gemm._outputs(grad.t(), x, "bgrad")
            plan.run(i, grad.t(), x, None, dw, db, workspace)
            right += gemm._close(dw, refs[0]) and gemm._close(db, refs[1])
        assert right > 0, f"none of the {plan.count} BGRADB algorithms listed gives torch's outputs"

        def loss(f, *ts):
            return f(*ts).float().square().mean()

        def unfused(x, w1, b1, w2, b2):
            return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)
        compiled = torch.compile(lambda *ts: loss(gemm.gelu_mlp, *ts), dynamic=True)
        for rows in (1000, 1200):
            ts = [t.detach().clone().requires_grad_() for t in (torch.randn(rows, 256, **bf), w1, b1, w2, b1[:256])]
            got = torch.autograd.grad(compiled(*ts), ts)
            want = torch.autograd.grad(loss(unfused, *ts), ts)
            for a, b in zip(got, want):
                assert (a.float() - b.float()).abs().max().item() <= 0.03 * b.abs().max().item() + 1e-6
    finally:
        gemm.enable(False)


def test_activation_checkpointing_on_the_compiled_blocks_trains_as_without_it_with_less_memory(data, tmp_path):
    """Compiled blocks without step graphs (which activation checkpointing turns off), bf16, dropout on: the
    recompute in the backward draws the forward's masks again, so the losses follow the same run without it;
    what training adds to the memory at its peak (a model wide and deep enough for its activations to count,
    the longest batches of 40 tokens) is smaller."""
    import gc
    extra = ["compile.enabled=true", "checkpoint.enabled=false", "compile.scope=blocks", "compile.cuda_graphs=none",
             "model.config_overrides.num_hidden_layers=8", "model.config_overrides.hidden_size=256",
             "model.config_overrides.intermediate_size=1024", "model.config_overrides.num_attention_heads=4"]
    losses, peaks = {}, {}
    for name, ac in (("plain", "false"), ("checkpointed", "true")):
        gc.collect()
        torch.cuda.empty_cache()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer, losses[name], _ = train(data, tmp_path / name, extra + [f"distributed.activation_checkpointing={ac}"])
        peaks[name] = torch.cuda.max_memory_allocated() - start
        assert trainer.step_graphs is None
        del trainer
    for step in losses["plain"]:
        assert losses["checkpointed"][step] == pytest.approx(losses["plain"][step], rel=1e-2, abs=1e-3), step
    assert peaks["checkpointed"] < peaks["plain"]


def test_fp16_with_loss_scaling_on_the_compiled_blocks_follows_bf16(data, tmp_path):
    """precision=fp16 (what auto picks on GPUs without bf16): compiled blocks, no step graphs, the loss scaled;
    its losses follow the bf16 run's."""
    extra = NO_DROPOUT + ["compile.enabled=true", "checkpoint.enabled=false", "compile.scope=blocks"]
    fp16, h_loss, _ = train(data, tmp_path / "h", extra + ["precision=fp16"])
    _, b_loss, _ = train(data, tmp_path / "b", extra + ["precision=bf16", "compile.cuda_graphs=none"])
    assert fp16.scaler is not None and fp16.step_graphs is None
    for step in b_loss:
        assert h_loss[step] == pytest.approx(b_loss[step], rel=2e-2, abs=2e-3), step


def test_multi_label_under_step_graphs_and_packing_trains_like_eager(tmp_path):
    """dataset.task=multi_label on the default GPU path (packed rows, compiled blocks, step graphs): its float
    label rows go through the graphs' static inputs; the losses follow eager training's."""
    from tests.test_multi_label import overrides as ml_overrides, write_multi_label
    data = write_multi_label(tmp_path / "data", n_train=128, n_val=16)
    extra = ["device=cuda", "step_scheduler.max_steps=8", "step_scheduler.log_every_steps=1",  # dropout 0 (TINY)
             "checkpoint.enabled=false", "compile.tuned_gemm_cache=none"] + [o for o in SMALL if "tokenizer" in o]
    losses = {}
    for name, fast in (("graphs", ["compile.enabled=true"]), ("eager", ["compile.enabled=false"])):
        run_dir = tmp_path / name
        trainer = build_trainer(compose_cfg(ml_overrides(data, run_dir) + extra + fast), run_dir)
        trainer.fit()
        assert (trainer.step_graphs is not None) == (name == "graphs")
        assert type(trainer.train_loader.collate_fn).__name__ == "PackCollator"  # packed rows on both sides
        losses[name] = [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
                        if json.loads(l)["split"] == "train"]
    assert losses["graphs"] == pytest.approx(losses["eager"], rel=2e-2, abs=2e-3)
