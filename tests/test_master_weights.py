"""bf16 working weights with fp32 masters (seqcls.optim): the same training as fp32 weights under
autocast, the masters survive a checkpoint, and the saved model holds them."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from seqcls.optim import MasterWeightAdamW, use_bf16_weights
from seqcls.trainer import clip_and_update
from tests.conftest import compose_cfg, run_interpreted, synthetic_overrides, write_synthetic


def linear_stack(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))


def autocast_step(model, x, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    torch.nn.functional.cross_entropy(out.float(), y).backward()


@pytest.mark.parametrize("decoupled", [True, False])  # AdamW, Adam with L2 decay
@pytest.mark.parametrize("max_norm", [None, 0.05])  # 0.05: every step clipped
def test_master_weights_train_as_fp32_weights_under_autocast(decoupled, max_norm):
    ref = linear_stack()
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref_opt = cls(ref.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    got = copy.deepcopy(ref)
    masters = use_bf16_weights(got)
    # Linear weights and biases (autocast reads both as bf16); a plain LayerNorm, which autocast runs in fp32, stays
    assert len(masters) == 4 and got[0].weight.dtype == got[0].bias.dtype == torch.bfloat16
    assert got[1].weight.dtype == torch.float32
    opt = MasterWeightAdamW(got.parameters(), lr=1e-2, weight_decay=0.1, decoupled_weight_decay=decoupled,
                            masters=masters)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(32, 12, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        autocast_step(ref, x, y)
        autocast_step(got, x, y)
        # The forward and backward see the same bf16 weights: the gradients are the same numbers.
        for r, g in zip(ref.parameters(), got.parameters()):
            assert torch.equal(r.grad.to(g.grad.dtype), g.grad)
        ref_norm = clip_and_update(ref_opt, list(ref.parameters()), max_norm)
        norm = clip_and_update(opt, list(got.parameters()), max_norm)
        assert torch.allclose(norm, ref_norm, rtol=1e-6)
        ref_opt.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
    assert not hasattr(opt, "grad_scale") or opt.grad_scale is None
    for r, g in zip(ref.parameters(), got.parameters()):
        state = opt.state[g]
        if g.dtype == torch.bfloat16:
            # the master follows the fp32 weight; the weight is the master rounded to bf16
            assert torch.allclose(state["master"], r, rtol=1e-5, atol=1e-7)
            assert torch.equal(g, state["master"].to(torch.bfloat16))
            assert state["exp_avg"].dtype == torch.float32
        else:
            assert torch.allclose(g, r, rtol=1e-5, atol=1e-7)
        assert torch.allclose(state["exp_avg_sq"], ref_opt.state[r]["exp_avg_sq"], rtol=1e-5, atol=1e-12)
        assert state["step"].item() == 4


def test_master_weights_start_from_the_fp32_weights_not_their_bf16_rounding():
    model = linear_stack()
    fp32 = model[0].weight.detach().clone()
    opt = MasterWeightAdamW(model.parameters(), lr=0.0, masters=use_bf16_weights(model))
    autocast_step(model, torch.randn(4, 12), torch.tensor([0, 1, 2, 0]))
    opt.step()
    assert torch.equal(opt.state[model[0].weight]["master"], fp32)
    assert not torch.equal(fp32.to(torch.bfloat16).float(), fp32)  # the test would see a rounding


def test_load_state_dict_keeps_masters_and_moments_in_fp32():
    model = linear_stack()
    opt = MasterWeightAdamW(model.parameters(), lr=1e-2, masters=use_bf16_weights(model))
    autocast_step(model, torch.randn(4, 12), torch.tensor([0, 1, 2, 0]))
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    fresh = MasterWeightAdamW(model.parameters(), lr=1e-2)
    fresh.load_state_dict(saved)
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert fresh.state[p][key].dtype == value.dtype
            assert torch.equal(fresh.state[p][key], value)
    # The loaded values are the ones the next update works on (the flat buffers, not loose copies).
    twin = linear_stack(seed=1)
    use_bf16_weights(twin)
    twin.load_state_dict(model.state_dict())
    again = MasterWeightAdamW(twin.parameters(), lr=1e-2)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m in (model, twin):
        for p, g in zip(m.parameters(), bf16_grads(list(m.parameters()), 5)):
            p.grad = g
    opt.step()
    again.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(again.state[b].get("master", b), opt.state[a].get("master", a))


def test_a_bf16_run_with_master_weights_matches_fp32_weights_and_saves_the_masters(tmp_path, synthetic_dir):
    from seqcls.train import run
    losses, saved = {}, {}
    for flag in ("true", "false"):
        run_dir = tmp_path / flag
        run(compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + [
            "precision=bf16", "step_scheduler.max_steps=8", "step_scheduler.log_every_steps=2",
            "optimizer.weight_decay=0.01", f"compile.bf16_master_weights={flag}"]))
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [r["loss"] for r in rows if r["split"] == "train"]
        saved[flag] = load_file(str(run_dir / "checkpoints" / "step_00000008" / "model" / "model.safetensors"))
    assert len(losses["true"]) == 4
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-3)
    got, ref = saved["true"], saved["false"]
    assert got.keys() == ref.keys()
    weight = next(k for k in got if k.endswith("attention.self.query.weight"))
    assert got[weight].dtype == torch.float32
    # Full-precision masters, not bf16 weights written as fp32: the low mantissa bits are in use.
    assert not torch.equal(got[weight].to(torch.bfloat16).float(), got[weight])
    for k in got:
        assert torch.allclose(got[k].float(), ref[k].float(), rtol=1e-3, atol=1e-5), k


def test_lora_adapters_and_head_train_in_bf16_with_masters_and_the_adapter_holds_the_masters(tmp_path, synthetic_dir):
    """Under LoRA the trainable Linears (adapters, head) get bf16 weights and fp32 masters too: no cast
    kernels a step for ~100 small tensors. Same training as fp32 adapters; the saved adapter is fp32."""
    from seqcls.build import build_trainer
    losses, adapters = {}, {}
    for flag in ("true", "false"):
        run_dir = tmp_path / flag
        trainer = build_trainer(compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + [
            "precision=bf16", "peft=lora", "step_scheduler.max_steps=8", "step_scheduler.log_every_steps=2",
            "optimizer.lr=1e-2", f"compile.bf16_master_weights={flag}"]), run_dir)
        trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
        want = torch.bfloat16 if flag == "true" else torch.float32
        assert all(p.dtype == want for p in trainable.values()), {n: p.dtype for n, p in trainable.items()}
        assert isinstance(trainer.optimizer, MasterWeightAdamW) == (flag == "true")
        trainer.fit()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [r["loss"] for r in rows if r["split"] == "train"]
        adapters[flag] = load_file(str(run_dir / "checkpoints" / "step_00000008" / "adapter" / "adapter_model.safetensors"))
    assert len(losses["true"]) == 4 and losses["true"] == pytest.approx(losses["false"], rel=1e-3)
    got, ref = adapters["true"], adapters["false"]
    assert got.keys() == ref.keys()
    lora_b = [k for k in got if "lora_B" in k]
    assert lora_b and all(got[k].abs().max() > 0 for k in lora_b)  # B starts at zero: these trained
    for k in got:
        assert got[k].dtype == torch.float32, k
        torch.testing.assert_close(got[k], ref[k], rtol=2e-2, atol=1e-4)
    # the masters, not bf16 weights written as fp32
    assert any(not torch.equal(got[k].to(torch.bfloat16).float(), got[k]) for k in lora_b)


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_a_run_stopped_and_resumed_continues_from_the_fp32_masters_exactly(tmp_path, synthetic_dir, peft):
    from seqcls.build import build_trainer

    class StopAt:  # what a SIGTERM after step 4 does: a checkpoint there, then the run stops
        def __init__(self, trainer, step):
            self.trainer, self.step = trainer, step

        @property
        def requested(self):
            return self.trainer.step >= self.step

    def cfg(run_dir):
        return compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + [
            "precision=bf16", "step_scheduler.max_steps=8", "step_scheduler.log_every_steps=1",
            "step_scheduler.ckpt_every_steps=100", "optimizer.weight_decay=0.01", f"peft={peft}"])

    build_trainer(cfg(tmp_path / "ref"), tmp_path / "ref").fit()
    first = build_trainer(cfg(tmp_path / "run"), tmp_path / "run")
    first.stop_signal = StopAt(first, 4)
    assert first.fit()["preempted"]
    second = build_trainer(cfg(tmp_path / "run"), tmp_path / "run")
    assert second.step == 4
    second.fit()
    rows = {name: [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text()
                                                          .splitlines()) if r["split"] == "train"]
            for name in ("ref", "run")}
    assert len(rows["ref"]) == 8 and rows["run"] == rows["ref"]
    a, b = (load_file(str(tmp_path / name / "checkpoints" / "step_00000008" / "model" / "model.safetensors"))
            for name in ("ref", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_state_exists_from_construction_so_a_step_graph_warm_up_can_save_and_restore_it():
    # seqcls.step_graph warms the update up at lr 0, then copies the saved state back and zeroes state
    # that did not exist before: a master created lazily there would be zeroed, and the weights with it.
    model = linear_stack()
    fp32 = model[0].weight.detach().clone()
    opt = MasterWeightAdamW(model.parameters(), lr=1e-2, masters=use_bf16_weights(model))
    assert set(opt.state) == set(model.parameters())
    assert torch.equal(opt.state[model[0].weight]["master"], fp32)
    assert "master" not in opt.state[model[1].weight] and opt.state[model[1].weight]["step"].item() == 0


def deep_stack(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])


def bf16_grads(params, step):
    gen = torch.Generator().manual_seed(step)
    return [(torch.randn(p.shape, generator=gen) * 0.1).bfloat16().to(p.dtype) for p in params]


def test_buckets_hold_parameters_and_state_as_views_of_flat_buffers_and_update_as_one_tensor_at_a_time():
    ref_model, got_model = deep_stack(), deep_stack()
    ref = MasterWeightAdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1, masters=use_bf16_weights(ref_model),
                            buckets=[[m.weight] for m in ref_model])  # a bucket a tensor
    got = MasterWeightAdamW(got_model.parameters(), lr=1e-2, weight_decay=0.1, masters=use_bf16_weights(got_model),
                            buckets=[[got_model[0].weight, got_model[1].weight], [got_model[2].weight]])
    flat = got._buckets[0]
    assert [len(b.params) for b in flat] == [2, 1, 5]  # what no bucket names (the biases, the last weight) forms one more
    first = flat[0]
    base = first.weight.untyped_storage().data_ptr()
    assert got_model[1].weight.untyped_storage().data_ptr() == base
    assert got_model[1].weight.data_ptr() == base + 64 * 2  # after the first weight's 64 bf16 values
    for key in ("master", "exp_avg", "exp_avg_sq"):
        assert got.state[got_model[1].weight][key].untyped_storage().data_ptr() == first.flat[key].data_ptr()
    for step in range(3):
        for model in (ref_model, got_model):
            for p, g in zip(model.parameters(), bf16_grads(list(model.parameters()), step)):
                p.grad = g
        ref.step()
        got.step()
    for r, g in zip(ref_model.parameters(), got_model.parameters()):
        assert torch.equal(r, g)  # the same arithmetic element by element, bucketed or not
        for key, value in ref.state[r].items():
            assert torch.equal(got.state[g][key], value), key


def test_a_bucket_member_without_a_gradient_takes_no_step_as_in_torch_adamw():
    ref_model, got_model = deep_stack(), deep_stack()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1)
    got = MasterWeightAdamW(got_model.parameters(), lr=1e-2, weight_decay=0.1, masters=use_bf16_weights(got_model))
    for step in range(4):
        for model in (ref_model, got_model):
            params = list(model.parameters())
            for i, (p, g) in enumerate(zip(params, bf16_grads(params, step))):
                p.grad = None if (step == 1 and i == 4) else g  # step 1: the third Linear's weight has none
        ref.step()
        got.step()
    assert got._buckets[0][0].split
    for r, g in zip(ref_model.parameters(), got_model.parameters()):
        state = got.state[g]
        assert state["step"].item() == ref.state[r]["step"].item()
        master = state.get("master", g)
        assert torch.allclose(master, r, rtol=1e-5, atol=1e-7)
    assert got.state[got_model[2].weight]["step"].item() == 3


def test_a_replaced_parameter_tensor_is_put_back_into_its_bucket():
    model = deep_stack()
    opt = MasterWeightAdamW(model.parameters(), lr=1e-2, masters=use_bf16_weights(model))
    model[1].weight.data = model[1].weight.data.clone()  # what a load with assign=True does
    for p, g in zip(model.parameters(), bf16_grads(list(model.parameters()), 0)):
        p.grad = g
    opt.step()
    bucket = opt._buckets[0][0]
    assert model[1].weight.untyped_storage().data_ptr() == bucket.weight.data_ptr()
    assert torch.equal(model[1].weight, opt.state[model[1].weight]["master"].to(torch.bfloat16))


def test_weight_buckets_are_whole_blocks_joined_up_to_the_size_limit():
    from transformers import BertConfig, BertForSequenceClassification
    from seqcls.optim import weight_buckets
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=5,
                                                     num_attention_heads=2, intermediate_size=32))
    masters = use_bf16_weights(model)
    block = sum(p.numel() for n, p in model.named_parameters() if n.startswith("bert.encoder.layer.0.") and p in masters)
    assert block == 4 * (16 * 16 + 16) + (16 * 32 + 32) + (32 * 16 + 16)  # Linear weights and biases
    buckets = weight_buckets(model, list(masters), max_numel=2 * block)
    names = {p: n for n, p in model.named_parameters()}
    layer_of = [sorted({names[p].split(".")[3] for p in b if ".layer." in names[p]}) for b in buckets]
    assert layer_of == [["0", "1"], ["2", "3"], ["4"]]
    assert {names[p] for p in buckets[-1]} >= {"bert.pooler.dense.weight", "classifier.weight"}
    assert [sum(p.numel() for p in b) for b in buckets[:2]] == [2 * block] * 2
    assert [p for b in buckets for p in b] == list(masters)  # every weight once, in the model's order
    assert len(weight_buckets(model, list(masters), max_numel=1)) == 5 + 2  # a block is never cut


@pytest.mark.parametrize("setting,in_place", [(True, [True, True]), (None, [False, True])])
def test_the_update_reading_gradients_in_place_matches_the_end_to_end_copy(setting, in_place):
    """compile.update_reads_grads: the compiled bucket update with its gradients read where they lie (one
    kernel, inductor's pointwise concatenation) steps as the update over the gradients copied end to end;
    null reads them in place only in buckets of at most IN_PLACE_MAX_TENSORS tensors."""
    from seqcls.optim import IN_PLACE_MAX_TENSORS

    def stack():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(IN_PLACE_MAX_TENSORS // 2 + 3)])

    models = [stack(), stack()]
    opts = []
    for model, compiled in zip(models, (False, True)):
        linears = list(model)
        big = [p for m in linears[:-2] for p in m.parameters()]  # more tensors than the limit
        opts.append(MasterWeightAdamW(model.parameters(), lr=torch.tensor(1e-2), weight_decay=0.1,
                                      masters=use_bf16_weights(model), compiled=compiled,
                                      grads_in_place=setting if compiled else False,
                                      buckets=[big, [p for m in linears[-2:] for p in m.parameters()]]))
    assert [len(b.params) for b in opts[1]._buckets[0]] == [IN_PLACE_MAX_TENSORS + 2, 4]
    assert [opts[1].reads_grads_in_place(b) for b in opts[1]._buckets[0]] == in_place
    assert not any(opts[0].reads_grads_in_place(b) for b in opts[0]._buckets[0])
    start = {p: s["master"].clone() for p, s in opts[1].state.items()}
    for step in range(3):
        for model, opt in zip(models, opts):
            params = list(model.parameters())
            for p, g in zip(params, bf16_grads(params, step)):
                p.grad = g * (step + 1)
            opt.grad_scale = torch.tensor(1.0 + step)  # a clipping factor, as clip_and_update hands it
            opt.step()
    for ref, got in zip(models[0].parameters(), models[1].parameters()):
        assert got.dtype == torch.bfloat16
        for key, value in opts[0].state[ref].items():
            assert torch.allclose(opts[1].state[got][key], value, rtol=1e-6, atol=1e-8), key
        assert torch.equal(got, opts[1].state[got]["master"].to(torch.bfloat16))
        assert not torch.equal(opts[1].state[got]["master"], start[got])  # it took the steps


@pytest.mark.parametrize("form,weight_decay", [("adamw", 0.01), ("adam", 0.01), ("adamw", 0.0)])
def test_the_triton_update_kernel_steps_as_the_update_over_the_gradients_end_to_end(form, weight_decay):
    """compile.update_kernel=triton (seqcls.update_kernel), in Triton's interpreter: the bucket's gradients
    read in place through their address table, tensors of one, several and part of a block, give the eager
    update's masters and moments, and the weight is the master rounded to nearest even."""
    r = run_interpreted("update_kernel_cases", form, str(weight_decay))
    assert r["blocks"] == 2 + 1 + 1 + 5  # blocks of 64 over tensors of 100, 64, 7 and 300
    assert r["err"]["master"] <= 1e-6 and r["err"]["exp_avg"] <= 1e-6 and r["err"]["exp_avg_sq"] <= 1e-6, r
    assert r["weight_is_rounded_master"], r


@pytest.mark.parametrize("form", ["adamw", "adam"])
def test_master_weight_adamw_with_the_triton_kernel_trains_as_the_eager_update(form):
    r = run_interpreted("update_kernel_cases", "optimizer", form)
    assert max(r["err"].values()) <= 1e-6 and r["weights_equal"] and r["weight_is_rounded_master"], r
    assert r["tables"] == [True, True]  # both buckets (one named, the rest) went through the kernel


@pytest.mark.parametrize("form", ["adamw", "adam"])
def test_lazy_embedding_rows_step_as_every_row_stepped_every_step(form):
    """compile.lazy_embedding_update (seqcls.update_kernel.LazyRows), in Triton's interpreter, against every
    row stepped every step in the same arithmetic: rows caught up before a forward reads them, touched rows
    after each step (also where the step's own kernel replays what they owe), every row after a flush;
    untouched rows are left alone by a step and are behind until then."""
    r = run_interpreted("update_kernel_cases", "lazy", form)
    assert max(r["err"].values()) <= 1e-6, r
    assert r["untouched_kept"] and r["stale_rows"] > 50 and r["wanted_cleared"], r
    assert r["last"] == [12] * 22 and r["moved"] > 1e-2, r


@pytest.mark.parametrize("form", ["adamw", "adam"])
def test_master_weight_adamw_with_lazy_embedding_rows_trains_as_the_dense_update_and_resumes(form):
    r = run_interpreted("update_kernel_cases", "optimizer_lazy", form)
    assert r["stale_before_flush"], r  # the comparison below sees the flush's work
    assert r["emb_err"] <= 1e-6 and r["moment_err"] <= 1e-6 and r["lin_equal"], r
    assert r["synced"] and r["resumed_equal"], r


@pytest.mark.parametrize("setting,message", [
    ("compile.update_kernel=triton", r"compile.update_kernel=triton needs .* use compile.update_kernel=inductor"),
    ("compile.lazy_embedding_update=true",
     r"compile.lazy_embedding_update=true needs .* use compile.lazy_embedding_update=false")],
    ids=["triton-update-without-step-graphs", "lazy-embedding-update-where-it-cannot-apply"])
def test_an_update_option_where_it_cannot_apply_is_one_clear_error(tmp_path, setting, message):
    from seqcls.build import build_trainer
    from seqcls.config import ConfigError
    data = write_synthetic(tmp_path / "data", n_train=16, n_val=8)
    cfg = compose_cfg(synthetic_overrides(data, tmp_path / "run") + [setting])
    with pytest.raises(ConfigError, match=message):
        build_trainer(cfg, tmp_path / "run")


def test_the_trainer_flushes_the_optimizer_before_each_validation_checkpoint_and_the_end(tmp_path, synthetic_dir,
                                                                                         monkeypatch):
    """What compile.lazy_embedding_update relies on (rows behind until a flush): the trainer flushes the
    optimizer before anything reads the weights or the state, at the step where it reads them."""
    from seqcls.build import build_trainer
    events = []
    flush = MasterWeightAdamW.flush

    def logged_flush(self):
        events.append(("flush", trainer.step))
        return flush(self)
    monkeypatch.setattr(MasterWeightAdamW, "flush", logged_flush)
    trainer = build_trainer(compose_cfg(synthetic_overrides(synthetic_dir, tmp_path / "run") + [
        "precision=bf16", "step_scheduler.max_steps=7", "step_scheduler.val_every_steps=3",
        "step_scheduler.ckpt_every_steps=2"]), tmp_path / "run")
    assert isinstance(trainer.optimizer, MasterWeightAdamW)
    validate, save = trainer.validate, trainer.checkpointer.save
    trainer.validate = lambda: (events.append(("validate", trainer.step)), validate())[1]
    trainer.checkpointer.save = lambda t: (events.append(("save", trainer.step)), save(t))[1]
    trainer.fit()
    reads = [e for e in events if e[0] != "flush"]
    assert reads == [("save", 2), ("validate", 3), ("save", 4), ("validate", 6), ("save", 6), ("validate", 7),
                     ("save", 7)]
    for i, (kind, step) in enumerate(events):
        if kind != "flush":  # a flush at the same step came before it
            assert ("flush", step) in events[:i], (kind, step, events)


def test_a_run_with_lazy_embedding_rows_trains_as_the_dense_update(tmp_path):
    """The whole path on CPU in Triton's interpreter (the build's forward hook, the trainer's flushes): six
    steps of the tiny model with a word-level vocabulary, validating at 3 and 6, against torch's dense fused
    AdamW. Without the hook (a forward reading rows a step behind) the weights differ by ~5e-4."""
    r = run_interpreted("update_kernel_cases", "trainer_lazy", str(tmp_path))
    assert r["lazy"] == [True, False] and r["steps"] == [6, 6] and r["validations"] == [2, 2], r
    assert r["behind_at_flushes"][0] > 0 and r["behind_at_end"] == 0, r  # rows were behind until a flush
    assert r["train_err"] <= 1e-6 and r["val_err"] <= 1e-6 and r["param_err"] <= 1e-6, r


@pytest.mark.parametrize("setting,graphs,master,peft,expected", [
    ("null", True, True, "none", True), ("null", False, True, "none", False), ("null", True, False, "none", False),
    ("null", True, True, "lora", False), ("false", True, True, "none", False), ("true", False, True, "none", True)])
def test_lazy_embedding_rows_by_default_where_they_apply_under_the_step_graphs(tmp_path, synthetic_dir, setting,
                                                                               graphs, master, peft, expected):
    """The decision alone, for a CUDA device (Triton's reach): null turns the lazy rows on for full fine-tuning
    with the master weights under the step graphs, and stays quiet elsewhere."""
    import torch
    from seqcls.build import build_model, use_lazy_rows
    from seqcls.models import load_tokenizer
    cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path) + [
        f"compile.lazy_embedding_update={setting}", f"peft={peft}"])
    model = build_model(cfg, load_tokenizer(cfg.model.tokenizer_name_or_path))
    rows = use_lazy_rows(cfg, model, torch.device("cuda"), master, {"total_steps": 7}, graphs)
    assert (rows is not None) == expected
    if expected:
        assert rows == {model.get_input_embeddings().weight: 8}
