"""compile.bf16_residual: LayerNorms read and write bf16 under autocast, so the residual stream between
blocks is bf16; outside autocast, and with the switch off, LayerNorm is PyTorch's."""

import json

import pytest
import torch
import torch.nn.functional as F

from seqcls.models import AutocastLayerNorm, autocast_layernorms
from tests.conftest import compose_cfg, synthetic_overrides


def pair(seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.LayerNorm(24)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.2, 0.2)
    got = torch.nn.Sequential(torch.nn.LayerNorm(24))
    got.load_state_dict(torch.nn.Sequential(ref).state_dict())
    assert autocast_layernorms(got) == 1 and type(got[0]) is AutocastLayerNorm
    return ref, got[0]


def test_outside_autocast_it_is_layernorm_bit_for_bit():
    ref, got = pair()
    x = torch.randn(5, 7, 24)
    assert torch.equal(got(x), ref(x))


def test_under_autocast_it_returns_bf16_normalised_in_fp32_and_trains_fp32_parameters():
    ref, got = pair()
    x = (torch.randn(6, 24) * 3 + 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = got(x)
        y_ref = ref(x_ref)
    assert y.dtype == torch.bfloat16 and y_ref.dtype == torch.float32  # autocast alone keeps fp32
    # The value is the bf16 input normalised with bf16 weights, rounded once at the end.
    expected = F.layer_norm(x.detach().bfloat16().float(), (24,), ref.weight.detach().bfloat16().float(),
                            ref.bias.detach().bfloat16().float(), ref.eps)
    assert torch.allclose(y.float(), expected, rtol=1e-2, atol=1e-2)
    assert torch.allclose(y.float(), y_ref.detach(), rtol=0, atol=0.05)
    grad = torch.randn(6, 24)
    y.backward(grad.bfloat16())
    y_ref.backward(grad)
    assert got.weight.dtype == got.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    for a, b in ((got.weight.grad, ref.weight.grad), (got.bias.grad, ref.bias.grad), (x.grad, x_ref.grad)):
        assert torch.allclose(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())


def block_output_dtypes(model, batch):
    dtypes = []
    hooks = [layer.register_forward_hook(lambda m, i, o: dtypes.append((o[0] if isinstance(o, tuple) else o).dtype))
             for layer in model.base_model.encoder.layer]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch)
    for h in hooks:
        h.remove()
    return dtypes


@pytest.mark.parametrize("flag", ["true", "false"])
def test_a_bf16_run_keeps_the_residual_stream_in_bf16_only_when_asked(tmp_path, synthetic_dir, flag):
    from seqcls.build import build_trainer
    run_dir = tmp_path / flag
    cfg = compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + [
        "precision=bf16", "step_scheduler.max_steps=6", "step_scheduler.log_every_steps=2",
        f"compile.bf16_residual={flag}"])
    trainer = build_trainer(cfg, run_dir)
    model = trainer.model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all((type(m) is AutocastLayerNorm) == (flag == "true") for m in norms)
    batch = {"input_ids": torch.randint(5, 50, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    expected = torch.bfloat16 if flag == "true" else torch.float32
    assert block_output_dtypes(model, batch) == [expected] * len(model.base_model.encoder.layer)
    trainer.fit()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 3 and all(l == l and l < 5 for l in losses)
    # The class swap leaves names alone, and the saved model is an ordinary fp32 HF model (with master
    # weights, the LayerNorms are trained in bf16 with fp32 masters, and the masters are saved).
    from safetensors.torch import load_file
    saved = load_file(str(run_dir / "checkpoints" / "step_00000006" / "model" / "model.safetensors"))
    assert saved.keys() == model.state_dict().keys()
    norms = {k: v for k, v in saved.items() if "LayerNorm" in k}
    assert norms and all(v.dtype == torch.float32 for v in norms.values())
    if flag == "true":  # full-precision masters, not bf16 values written as fp32
        assert any(not torch.equal(v.bfloat16().float(), v) for v in norms.values())


def test_fsdp2_in_one_process_keeps_the_bf16_residual_and_trains_like_unsharded(tmp_path, synthetic_dir,
                                                                             monkeypatch):
    import torch.distributed as dist

    import seqcls.models
    from seqcls.train import run
    swapped = []

    def recording(model):  # the build's call, on the model as FSDP2 wrapped it
        swapped.append(autocast_layernorms(model))
        return swapped[-1]

    monkeypatch.setattr(seqcls.models, "autocast_layernorms", recording)
    losses = {}
    for name, extra in (("plain", []), ("fsdp2", ["distributed=fsdp2"])):
        run_dir = tmp_path / name
        run(compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + [
            "device=cpu", "precision=bf16", "step_scheduler.max_steps=4", "step_scheduler.log_every_steps=1"] + extra))
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows if r["split"] == "train"]
    assert not dist.is_initialized()
    assert len(swapped) == 2 and swapped[0] == swapped[1] > 0  # every LayerNorm, sharded or not
    assert len(losses["fsdp2"]) == 4
    assert losses["fsdp2"] == pytest.approx(losses["plain"], rel=1e-2)
