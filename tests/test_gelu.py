"""seqcls.gelu: the exact GELU through erfc's Chebyshev fit (compile.gelu=erfc)."""

import math

import torch
import torch.nn.functional as F

from seqcls.dropout import supported as dropout_supported
from seqcls.gelu import erfc_gelu, gelu, gelu_backward, normal_cdf
from seqcls.models import from_config


def _exact_gelu(x64):
    return x64 * 0.5 * torch.special.erfc(-x64 / math.sqrt(2.0))


def _bf16_values():
    """Every finite bfloat16."""
    b = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return b[torch.isfinite(b)]


def test_normal_cdf_keeps_its_relative_accuracy_into_both_tails():
    x = torch.linspace(-9.0, 9.0, 400_001).double()  # float32 points: the reference at the same inputs
    ref = 0.5 * torch.special.erfc(-x / math.sqrt(2.0))
    rel = ((normal_cdf(x.float()).double() - ref).abs() / ref)
    assert rel.max() < 1e-5, (x[rel.argmax()], rel.max())  # at Φ(-9) ~ 1e-19 too: no 1 + erf cancellation
    assert rel[(x.abs() <= 5)].max() < 3e-6  # float32's own erfc: 1.3e-6 (x / √2 rounds)


def test_gelu_on_every_bf16_input_is_the_correctly_rounded_exact_value_or_one_unit_off():
    b = _bf16_values()
    ours, exact = gelu(b), _exact_gelu(b.double())
    rounded = exact.to(torch.bfloat16)
    off = ours != rounded
    assert off.float().mean() < 1e-3, off.sum()
    # where it differs, by at most one unit in the last place of the result
    ulp = (torch.nextafter(rounded[off].float().abs(), torch.tensor(math.inf)) - rounded[off].float().abs())
    assert ((ours[off].float() - rounded[off].float()).abs() <= ulp.to(torch.bfloat16).float() * 1.01).all()
    assert ours.dtype == torch.bfloat16


def test_gradient_is_the_exact_derivative_and_matches_torch_gelu():
    x = torch.linspace(-8.0, 8.0, 20_001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    exact = 0.5 * torch.special.erfc(-x / math.sqrt(2.0)) + x * pdf
    xf = x.float().requires_grad_()
    gelu(xf).backward(torch.ones_like(xf))
    assert torch.allclose(xf.grad.double(), exact, rtol=1e-5, atol=1e-7)
    assert torch.equal(xf.grad, gelu_backward(torch.ones_like(xf), xf.detach()))
    b = _bf16_values()[::7].float().clamp(-20, 20).requires_grad_()
    c = b.detach().clone().requires_grad_()
    grad = torch.randn_like(b)
    gelu(b).backward(grad)
    F.gelu(c).backward(grad)
    assert torch.allclose(b.grad, c.grad, rtol=1e-5, atol=1e-6)


def test_dynamo_traces_it_whole_and_the_compiled_graph_agrees():
    x = (torch.randn(64, 32) * 3).requires_grad_()
    compiled = torch.compile(gelu, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.backward(torch.ones_like(y))
    ref = x.detach().clone().requires_grad_()
    gelu(ref).backward(torch.ones_like(ref))
    assert torch.equal(y, gelu(x.detach())) and torch.equal(x.grad, ref.grad)


def test_erfc_gelu_swaps_only_exact_gelus_and_keeps_the_model_output():
    model = from_config("roberta", num_labels=2, config_overrides=dict(
        vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    extra = torch.nn.ModuleList([torch.nn.GELU(), torch.nn.GELU(approximate="tanh")])
    ids = torch.randint(3, 120, (2, 9))
    before = model(input_ids=ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert erfc_gelu(model) == 3 and erfc_gelu(extra) == 1
    assert type(extra[0]).forward is not torch.nn.GELU.forward
    assert type(extra[1]) is torch.nn.GELU  # the tanh approximation is left alone
    acts = [layer.intermediate.intermediate_act_fn for layer in model.roberta.encoder.layer]
    assert all(type(a).forward is type(extra[0]).forward for a in acts)
    after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_auto_settings_pick_the_gpu_kernels_only_where_the_model_is_compiled_on_a_gpu(tmp_path, synthetic_dir):
    from omegaconf import OmegaConf
    from seqcls.build import build_trainer, use_triton_masks
    from seqcls.gelu import _ErfcGELUActivation
    from tests.conftest import compose_cfg, synthetic_overrides
    cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_triton_masks(cfg, cuda, compiled=True) == dropout_supported(cuda)
    assert not use_triton_masks(cfg, cuda, compiled=False) and not use_triton_masks(cfg, cpu, compiled=True)
    OmegaConf.update(cfg, "compile.dropout_masks", "inductor")
    assert not use_triton_masks(cfg, cuda, compiled=True)
    # on CPU, auto leaves torch's GELU; erfc swaps it, and the run trains
    OmegaConf.update(cfg, "step_scheduler.max_steps", 2)
    for setting, swapped in (("auto", 0), ("erfc", 2)):
        OmegaConf.update(cfg, "compile.gelu", setting)
        OmegaConf.update(cfg, "run_dir", str(tmp_path / setting))
        trainer = build_trainer(cfg, tmp_path / setting)
        assert sum(isinstance(m, _ErfcGELUActivation) for m in trainer.model.modules()) == swapped
        assert trainer.fit()["steps"] == 2
