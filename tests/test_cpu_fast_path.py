"""The CPU side of the fast path: rand-drawn dropout, malloc keeping freed memory, and the switches."""

import resource

import pytest
import torch
from omegaconf import OmegaConf

from seqcls.build import build_trainer, use_combo_kernels, use_step_graphs
from seqcls.distributed import DistInfo
from seqcls.env import keep_freed_memory
from seqcls.models import RandDropout, from_config, rand_dropout
from seqcls.trainer import clip_and_update
from tests.conftest import compose_cfg, synthetic_overrides


def test_rand_dropout_keeps_1_minus_p_scales_the_rest_and_is_identity_in_eval():
    torch.manual_seed(0)
    drop = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(4, 4), torch.nn.Dropout(0.3))
    assert rand_dropout(drop) == 2 and all(isinstance(drop[i], RandDropout) for i in (0, 2))
    x = torch.ones(400_000, requires_grad=True)
    y = drop[2](x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.005)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()  # the gradient flows through kept elements only, with the same scale
    assert torch.equal(x.grad, y.detach())
    drop.eval()
    assert torch.equal(drop[0](x), x)


def test_keep_freed_memory_stops_the_page_faults_of_a_fresh_embedding_gradient_each_step():
    # A 64 MB embedding: its dense gradient is allocated anew every step and, above glibc's 32 MiB mmap
    # ceiling, is mapped and unmapped each time: ~16k page faults a step unless freed memory is kept.
    torch.manual_seed(0)
    model = from_config("bert", num_labels=2, config_overrides=dict(
        vocab_size=65536, hidden_size=256, num_hidden_layers=1, num_attention_heads=4, intermediate_size=256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids, labels = torch.randint(0, 65536, (8, 16)), torch.randint(0, 2, (8,))

    def faults_per_step(steps=3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(steps):
            torch.nn.functional.cross_entropy(model(input_ids=ids).logits, labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps

    assert keep_freed_memory()
    faults_per_step()  # the first steps grow the heap
    # The best of three windows: the heap may still grow in one (what earlier tests left behind decides
    # when, ~5k faults a step once); without kept memory every window faults ~16k times a step.
    assert min(faults_per_step() for _ in range(3)) < 4000


def test_cpu_training_takes_the_fast_path_and_each_switch_turns_its_part_off(tmp_path, synthetic_dir):
    base = synthetic_overrides(synthetic_dir, tmp_path / "a") + ["model.config_overrides.hidden_dropout_prob=0.1"]
    fast = build_trainer(compose_cfg(base), tmp_path / "a")
    assert fast.optimizer.defaults["fused"] is True
    assert any(isinstance(m, RandDropout) for m in fast.model.modules())
    assert fast.model.bert.encoder.layer[-1].forward.__func__.__name__ == "_first_token_forward"

    plain = build_trainer(compose_cfg([o.replace("/a", "/b") for o in base] + ["model.first_token_last_layer=false"]),
                          tmp_path / "b")
    assert "forward" not in vars(plain.model.bert.encoder.layer[-1])


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compile_scope_picks_what_is_compiled(tmp_path, synthetic_dir, scope):
    cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path) + ["compile.enabled=true", f"compile.scope={scope}"])
    model = build_trainer(cfg, tmp_path).model
    blocks = list(model.bert.encoder.layer)
    assert len(blocks) >= 2
    # nn.Module.compile sets the compiled call on the module it is called on (compilation waits for a call)
    assert (model._compiled_call_impl is not None) == (scope == "model")
    assert all((b._compiled_call_impl is not None) == (scope == "blocks") for b in blocks)
    assert model.bert.embeddings._compiled_call_impl is None


@pytest.mark.parametrize("combo,mode", [(True, "default"), (True, "max-autotune-no-cudagraphs"), (False, "default"),
                                        (None, "default")])  # null: on for CUDA only, and this is a CPU run
def test_compile_takes_combo_kernels_with_the_modes_own_options(tmp_path, synthetic_dir, monkeypatch, combo, mode):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(kw))
    build_trainer(compose_cfg(synthetic_overrides(synthetic_dir, tmp_path) + [
        "compile.enabled=true", f"compile.combo_kernels={'null' if combo is None else combo}",
        f"compile.mode={mode}"]), tmp_path)
    assert len(calls) >= 2  # one call a block
    for kw in calls:
        if combo:  # torch.compile refuses a mode beside options: the mode goes in as its options
            assert "mode" not in kw and kw["options"]["combo_kernels"] is True
            assert kw["options"].get("max_autotune", False) == (mode != "default")
        else:
            assert kw["mode"] == mode and "options" not in kw


@pytest.mark.parametrize("setting,cuda,cpu", [("null", True, False), ("true", True, True), ("false", False, False)])
def test_combo_kernels_default_to_cuda_only(synthetic_dir, tmp_path, setting, cuda, cpu):
    cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path) + [f"compile.combo_kernels={setting}"])
    assert use_combo_kernels(cfg, torch.device("cuda")) is cuda
    assert use_combo_kernels(cfg, torch.device("cpu")) is cpu


@pytest.mark.parametrize("opt_kind", ["fused-adamw", "fused-adam", "sgd"])
@pytest.mark.parametrize("grad_size", [0.01, 30.0])  # below and above the clipping threshold
def test_clip_and_update_matches_clip_grad_norm_then_step(opt_kind, grad_size):
    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(7, 5), (5,), (3, 3, 2)]]
        if opt_kind == "sgd":
            return params, torch.optim.SGD(params, lr=0.1, momentum=0.9)
        cls = torch.optim.AdamW if opt_kind == "fused-adamw" else torch.optim.Adam
        return params, cls(params, lr=0.1, weight_decay=0.01, fused=True)

    def fresh_grads(params, step):
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * grad_size

    ref, ref_opt = make()
    for step in range(2):
        fresh_grads(ref, step)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0, foreach=True)
        ref_opt.step()
    got, opt = make()
    for step in range(2):
        fresh_grads(got, step)
        norm = clip_and_update(opt, got, 1.0)
    assert not hasattr(opt, "grad_scale")  # nothing left to scale a later, unclipped update
    assert torch.allclose(norm, ref_norm, rtol=1e-6)
    assert (norm > 1.0) == (grad_size > 1.0)
    for r, g in zip(ref, got):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-7)
        assert torch.allclose(g.grad, r.grad, rtol=1e-5, atol=1e-8)  # the gradients end clipped, as clip_grad_norm_ leaves them
    # no gradients at all (the second warm-up pass of a one-graph step): a zero norm, nothing moves
    before = [p.detach().clone() for p in got]
    opt.zero_grad(set_to_none=True)
    assert clip_and_update(opt, got, 1.0).item() == 0.0
    assert all(torch.equal(p, b) for p, b in zip(got, before))
    # no clipping: a plain step
    fresh_grads(got, 5)
    assert clip_and_update(opt, got, None).item() == 0.0
    assert any(not torch.equal(b, p) for b, p in zip(before, got))


def test_attn_implementation_reaches_the_model_and_computes_the_same_logits(tmp_path, synthetic_dir, attn="eager"):
    models = {}
    for attn in (attn, "sdpa"):
        cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path / attn) + [f"model.attn_implementation={attn}"])
        models[attn] = build_trainer(cfg, tmp_path / attn).model.eval()
        assert models[attn].config._attn_implementation == attn
    other, sdpa = models
    models[sdpa].load_state_dict(models[other].state_dict())
    ids = torch.randint(5, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding: the mask takes each kernel's own form (additive for eager, boolean for sdpa)
    with torch.no_grad():
        got, ref = (models[a](input_ids=ids, attention_mask=mask).logits for a in (other, sdpa))
    assert torch.allclose(got, ref, atol=1e-5) and not torch.allclose(got, torch.zeros_like(got))


@pytest.mark.parametrize("attn,graphs", [(None, True), ("sdpa", True), ("eager", False)])
def test_step_graphs_are_left_out_for_hf_eager_attention_only(tmp_path, synthetic_dir, attn, graphs):
    extra = [] if attn is None else [f"model.attn_implementation={attn}"]
    cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path) + extra)
    model = build_trainer(cfg, tmp_path).model  # the kernel the model ended up with decides
    assert model.config._attn_implementation == (attn or "sdpa")
    # the decision only, for a CUDA device: no GPU needed
    assert use_step_graphs(cfg, torch.device("cuda"), DistInfo(), model.config._attn_implementation) == graphs


@pytest.mark.parametrize("extra,why", [(["precision=fp16"], "fp16's loss scaling"),
                                       (["distributed.activation_checkpointing=true"], "activation checkpointing")])
def test_step_graphs_are_left_out_under_fp16_and_activation_checkpointing(tmp_path, synthetic_dir, caplog, extra, why):
    cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path) + extra)
    amp = torch.float16 if "precision=fp16" in extra else torch.bfloat16
    with caplog.at_level("INFO", logger="seqcls"):
        assert not use_step_graphs(cfg, torch.device("cuda"), DistInfo(), "sdpa", amp)
    assert why in caplog.text
    assert use_step_graphs(compose_cfg(synthetic_overrides(synthetic_dir, tmp_path)), torch.device("cuda"), DistInfo(),
                           "sdpa", torch.bfloat16)


@pytest.mark.parametrize("combo", [True, False])
def test_inductor_options_reach_torch_compile_on_top_of_the_mode_and_combo_kernels(tmp_path, synthetic_dir,
                                                                                   monkeypatch, combo):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(kw))
    build_trainer(compose_cfg(synthetic_overrides(synthetic_dir, tmp_path) + [
        "compile.enabled=true", f"compile.combo_kernels={combo}", "compile.mode=max-autotune-no-cudagraphs",
        "+compile.inductor_options.max_autotune_pointwise=true", "+compile.inductor_options.triton.max_tiles=2"]),
        tmp_path)
    assert len(calls) >= 2  # one call a block
    for kw in calls:
        assert "mode" not in kw
        assert kw["options"]["max_autotune_pointwise"] is True and kw["options"]["triton.max_tiles"] == 2
        assert kw["options"]["max_autotune"] is True  # the mode's own settings stay
        assert kw["options"].get("combo_kernels", False) is combo


def test_a_compiled_run_trains_with_an_inductor_option(tmp_path, synthetic_dir):
    cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path) + [
        "compile.enabled=true", "step_scheduler.max_steps=2", "+compile.inductor_options.fallback_random=true",
        "+compile.inductor_options.triton.max_tiles=2"])  # torch.compile takes the dotted name, not a nested dict
    trainer = build_trainer(cfg, tmp_path)
    assert trainer.fit()["steps"] == 2


def test_an_unknown_inductor_option_or_cuda_graphs_inside_step_graphs_is_one_clear_error(tmp_path, synthetic_dir):
    from seqcls.config import ConfigError
    base = synthetic_overrides(synthetic_dir, tmp_path) + ["compile.enabled=true"]
    with pytest.raises(ConfigError, match="compile.inductor_options: max_autotune_pointwize is not an inductor setting"):
        build_trainer(compose_cfg(base + ["+compile.inductor_options.max_autotune_pointwize=true"]), tmp_path)
    with pytest.raises(ConfigError, match="triton.cudagraphs=true captures CUDA graphs of its own"):
        OmegaConf.to_object(compose_cfg(base + ["+compile.inductor_options.triton.cudagraphs=true"]))
    OmegaConf.to_object(compose_cfg(base + ["+compile.inductor_options.triton.cudagraphs=true",
                                            "compile.cuda_graphs=none"]))


def test_inductor_options_without_compilation_say_they_do_not_apply(tmp_path, synthetic_dir, caplog):
    cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path) + ["+compile.inductor_options.fallback_random=true"])
    with caplog.at_level("WARNING", logger="seqcls"):
        build_trainer(cfg, tmp_path)  # CPU: compile.enabled null resolves to off
    assert "compile.inductor_options is set but nothing is compiled" in caplog.text
