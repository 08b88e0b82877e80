"""seqcls.gemm on CPU: the tuned linear's autograd, the choice of the fastest candidate, the operand
layouts cuBLASLt is given, and which Linears are routed. The cuBLASLt path itself runs on a GPU
(tests/test_gpu.py -k tuned_gemm)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from seqcls import gemm
from seqcls.build import build_trainer
from seqcls.config import ConfigError
from seqcls.lora import LoRALinear
from tests.conftest import compose_cfg, synthetic_overrides, write_synthetic


@pytest.mark.parametrize("trains", ["all", "frozen weight", "no bias", "input only"])
def test_tuned_linear_gradients_are_f_linears(trains):
    torch.manual_seed(0)
    x = torch.randn(7, 5, requires_grad=True)
    w = torch.randn(4, 5, requires_grad=trains in ("all", "no bias"))
    b = None if trains == "no bias" else torch.randn(4, requires_grad=trains == "all")
    grad = torch.randn(7, 4)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    got = torch.autograd.grad(torch.ops.seqcls.tuned_linear(x, w, b), inputs, grad)
    want = torch.autograd.grad(F.linear(x, w, b), inputs, grad)
    assert len(got) == len(want)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def test_tuned_linear_compiles_with_a_dynamic_row_count():
    w, b = torch.randn(4, 5), torch.randn(4)
    f = torch.compile(lambda x: torch.ops.seqcls.tuned_linear(x, w, b).relu(), dynamic=True, backend="aot_eager")
    for rows in (6, 9):
        x = torch.randn(rows, 5)
        torch.testing.assert_close(f(x), F.linear(x, w, b).relu())


def test_fastest_takes_each_runs_best_round_and_skips_one_that_fails():
    clock = iter([5.0, 3.0, 4.0,   # round 1: torch, a, b
                  6.0, 2.5, 1.0])  # round 2
    runs = [lambda: None, lambda: None, lambda: None, lambda: (_ for _ in ()).throw(RuntimeError("bad"))]

    def time_ms(run):
        run()
        return next(clock)
    times = gemm.fastest(runs, time_ms)
    assert times[:3] == [5.0, 2.5, 1.0] and times[3] == float("inf")
    assert min(range(4), key=times.__getitem__) == 2


def test_layouts_cublas_is_given():
    a = torch.empty(6, 4)
    assert gemm._layout(a) == (4, 6, 4, 0)  # row-major a is column-major a^T, op N
    assert gemm._layout(a.t()) == (4, 6, 4, 1)  # a transposed view (4, 6): column-major as it lies, op T
    assert gemm._layout(torch.empty(6, 10)[:, :4]) == (4, 6, 10, 0)  # rows 10 apart
    assert gemm._layout(torch.empty(6, 4, 2)[:, :, 0]) is None  # neither dimension unit-stride


def test_disabled_and_cpu_calls_are_torchs_own():
    x, w, b = torch.randn(6, 5), torch.randn(4, 5), torch.randn(4)
    gemm.enable(True)
    try:  # on CPU every path is torch's, bit for bit
        assert torch.equal(gemm.linear(x, w, b), F.linear(x, w, b))
        assert torch.equal(gemm.mm(x, w.t(), b), torch.addmm(b, x, w.t()))
        assert gemm.choices() == {}  # nothing tuned on CPU
    finally:
        gemm.enable(False)


def test_tune_linears_routes_plain_linears_but_loras_a_and_b():
    layers = torch.nn.ModuleList([torch.nn.ModuleDict({
        "dense": torch.nn.Linear(8, 8),
        "query": LoRALinear.from_linear(torch.nn.Linear(8, 8), dim=2, alpha=4, dropout=0.0),
        "norm": torch.nn.LayerNorm(8)})])
    before = {k: v.clone() for k, v in layers.state_dict().items()}
    assert gemm.tune_linears(layers) == 1
    assert type(layers[0]["dense"]) is gemm.TunedLinear
    assert type(layers[0]["query"].lora_A) is torch.nn.Linear and type(layers[0]["query"].lora_B) is torch.nn.Linear
    after = layers.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    x = torch.randn(3, 2, 8)
    torch.testing.assert_close(layers[0]["dense"](x), F.linear(x, layers[0]["dense"].weight, layers[0]["dense"].bias))


def test_tuned_gemm_asked_for_on_cpu_is_one_clear_error(tmp_path):
    data = write_synthetic(tmp_path / "data", n_train=16, n_val=8)
    cfg = compose_cfg(synthetic_overrides(data, tmp_path / "run") + ["compile.tuned_gemm=true"])
    with pytest.raises(ConfigError, match=r"compile.tuned_gemm=true needs cuBLASLt .* use compile.tuned_gemm=null"):
        build_trainer(cfg, tmp_path / "run")


def test_summary_sums_the_tuned_shapes_times(monkeypatch):
    monkeypatch.setattr(gemm, "_timings", {})
    monkeypatch.setattr(gemm, "_choices", {})
    assert gemm.summary() == "tuned matmul: no shape tuned"
    x, w = torch.randn(6, 5), torch.randn(5, 4)
    a, b = gemm._key(x, w, None, "", None), gemm._key(x[:4], w, None, "", None)
    gemm._timings.update({a: (0.2, 0.15), b: (0.1, 0.1)})
    gemm._choices.update({a: (object(), 3), b: gemm._TORCH})
    line = gemm.summary()
    assert "2 shapes, 1 on a cuBLASLt algorithm;" in line and "torch's picks 0.30 ms" in line
    assert "the choices 0.25 ms (16.7% less)" in line
    gelu, dgelu = gemm._key(x, w, None, "gelu", None), gemm._key(x, w, None, "dgelu", x)
    gemm._timings.update({gelu: (0.3, 0.2), dgelu: (0.3, 0.3)})
    gemm._choices.update({gelu: (object(), 0), dgelu: gemm._TORCH})
    assert "4 shapes, 2 on a cuBLASLt algorithm (1 of 2 GELU shapes with cuBLASLt's epilogue);" in gemm.summary()
    bgrad = gemm._key(x.t(), x, None, "bgrad", None)
    gemm._timings[bgrad] = (0.1, 0.05)
    gemm._choices[bgrad] = (object(), 1)
    assert ("5 shapes, 3 on a cuBLASLt algorithm (1 of 2 GELU shapes and 1 of 1 bias-gradient shapes with "
            "cuBLASLt's epilogue);") in gemm.summary()


@pytest.mark.parametrize("trains", ["all", "frozen weights", "no biases"])
def test_gelu_mlp_gradients_are_the_unfused_blocks(trains):
    """gelu_mlp's hand-written backward (GELU's gradient where the second matrix multiply's backward
    writes it, the bias gradient beside it) against autograd through F.linear, tanh GELU, F.linear."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(9, 6, **f64, requires_grad=True)
    w1, w2 = torch.randn(16, 6, **f64), torch.randn(6, 16, **f64)
    b1, b2 = (None, None) if trains == "no biases" else (torch.randn(16, **f64), torch.randn(6, **f64))
    for t in (w1, b1, w2, b2):
        if t is not None:
            t.requires_grad_(trains != "frozen weights")
    inputs = [t for t in (x, w1, b1, w2, b2) if t is not None and t.requires_grad]
    grad = torch.randn(9, 6, **f64)
    got = torch.autograd.grad(gemm.gelu_mlp(x, w1, b1, w2, b2), inputs, grad)
    want = torch.autograd.grad(F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2), inputs, grad)
    assert len(got) == len(want) == (5 if trains == "all" else 3 if trains == "no biases" else 1)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


def test_gelu_mlp_under_autocast_computes_in_its_dtype():
    x, w1, b1, w2, b2 = torch.randn(5, 8), torch.randn(12, 8), torch.randn(12), torch.randn(8, 12), torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gemm.gelu_mlp(x, w1, b1, w2, b2)
        ref = F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_gelu_epilogue_mlps_keep_the_models_outputs_and_skip_adapted_or_trained_feed_forwards(act):
    from seqcls.models import first_token_last_layer, from_config, gelu_epilogue_mlps
    torch.manual_seed(0)
    model = from_config("roberta", num_labels=2, config_overrides=dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=40, hidden_act=act)).eval()
    ids = torch.randint(3, 100, (4, 12))
    before = model(input_ids=ids).logits
    layer = model.roberta.encoder.layer
    layer[1].intermediate.dense = LoRALinear.from_linear(layer[1].intermediate.dense, dim=2, alpha=4, dropout=0.0)
    assert gelu_epilogue_mlps(model) == 2  # the layer whose feed-forward has an adapter keeps HF's
    assert "feed_forward_chunk" in vars(layer[0]) and "feed_forward_chunk" not in vars(layer[1])
    after = model(input_ids=ids).logits
    if act == "gelu_pytorch_tanh":  # the same function: equal up to the order of float sums
        torch.testing.assert_close(after, before)
    else:  # erf's GELU against the tanh form: close, not equal
        assert 0 < (after - before).abs().max() < 1e-3
    assert first_token_last_layer(model)  # its feed-forward on one row a sequence goes through the patch too
    torch.testing.assert_close(model(input_ids=ids).logits, after)
    for p in layer[0].output.dense.parameters():
        p.requires_grad_(False)
    for i in (0, 2):
        del layer[i].feed_forward_chunk
    assert gelu_epilogue_mlps(model, trained=False) == 0  # layer 0's intermediate dense still trains
    for p in layer[0].intermediate.dense.parameters():
        p.requires_grad_(False)
    assert gelu_epilogue_mlps(model, trained=False) == 1 and "feed_forward_chunk" in vars(layer[0])
    assert "feed_forward_chunk" not in vars(layer[2])
    assert gelu_epilogue_mlps(from_config("roberta", num_labels=2, config_overrides=dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        hidden_act="relu"))) == 0


def test_gelu_epilogue_asked_for_without_tuned_gemm_is_one_clear_error(tmp_path):
    data = write_synthetic(tmp_path / "data", n_train=16, n_val=8)
    cfg = compose_cfg(synthetic_overrides(data, tmp_path / "run") + ["compile.gelu_epilogue=true"])
    with pytest.raises(ConfigError, match=r"compile.gelu_epilogue=true needs the tuned matrix multiplies .* "
                                          r"use compile.gelu_epilogue=null"):
        build_trainer(cfg, tmp_path / "run")


def test_close_checks_every_row_block_against_the_largest_reference_value():
    torch.manual_seed(0)
    ref = torch.randn(2500, 16, dtype=torch.bfloat16)
    ok = ref + (ref.abs().max() * 5e-3).to(torch.bfloat16)
    assert gemm._close(ok, ref, rows=1024)
    for row in (0, 1023, 1024, 2499):  # the first, a block's last, the next block's first, the short last block
        bad = ref.clone()
        bad[row, 3] += ref.abs().max() * 0.05
        assert not gemm._close(bad, ref, rows=1024), row
    assert gemm._close(ok[:7], ref[:7])  # fewer rows than a block


class _FakePlan:
    """Stands in for cuBLASLt's plan on CPU: ``count`` algorithms, each torch's product except those in
    ``wrong`` (which give a wrong one); ``listed`` changes what the heuristic lists."""
    count, wrong, listed, last = 3, set(), 0, None
    wrong_sums = set()  # algorithms whose bias-gradient sums (mode "bgrad") are wrong

    def __init__(self, a, b, bias, mode=""):
        import ctypes
        self.mode = mode
        self.results = [type("R", (), {"algo": (ctypes.c_uint64 * 8)(i + 1, _FakePlan.listed)})()
                        for i in range(self.count)]

    def run(self, i, a, b, bias, out, aux, workspace):
        _FakePlan.last = i
        out.copy_(gemm._torch_mm(a, b, bias) + (100.0 if i in _FakePlan.wrong else 0.0))
        if self.mode == "bgrad":
            aux.copy_(a.sum(1) + (100.0 if i in _FakePlan.wrong_sums else 0.0))


@pytest.fixture
def fake_tuning(monkeypatch, tmp_path):
    """gemm._tune on CPU: a fake plan, and a clock under which the heuristic's algorithm #1 is fastest.
    Returns the list of timed calls (one entry a timing) and the cache folder."""
    timed = []
    clock = {None: 5.0, 0: 4.0, 1: 1.0, 2: 3.0}  # the algorithm run (None: torch's matmul) -> ms

    def gpu_ms(run):
        _FakePlan.last = None
        run()
        timed.append(_FakePlan.last)
        return clock[_FakePlan.last]
    for name, value in [("_Plan", _FakePlan), ("_workspace", lambda device: None), ("_gpu_ms", gpu_ms),
                        ("_gpu_name", lambda device: "Fake GPU"), ("_lt_version", lambda: 120000),
                        ("_choices", {}), ("_timings", {}), ("_cached", set()), ("_unwritable", set())]:
        monkeypatch.setattr(gemm, name, value)
    monkeypatch.setattr(_FakePlan, "wrong", set())
    monkeypatch.setattr(_FakePlan, "listed", 0)
    monkeypatch.setattr(_FakePlan, "wrong_sums", set())
    folder = tmp_path / "cache"
    gemm.enable(False, cache_dir=folder)
    yield timed, folder
    gemm.enable(False)


def _tune_fresh(a, b):
    """The choice for a @ b as a new process would make it (nothing in memory)."""
    gemm._choices.clear()
    gemm._timings.clear()
    key = gemm._key(a, b, None, "", None)
    return key, gemm._tune(key, a, b, None, "", None)


def test_tuned_choices_are_kept_on_disk_and_taken_from_there_by_later_runs(fake_tuning):
    timed, folder = fake_tuning
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    key, choice = _tune_fresh(a, b)
    assert choice[1] == 1 and len(timed) == 8  # torch and 3 algorithms, 2 rounds; #1 (1.0 ms) kept
    files = list(folder.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["choice"] == 1
    assert "from the cache" not in gemm.summary()
    key2, again = _tune_fresh(a, b)
    assert key2 == key and again[1] == 1 and len(timed) == 8  # nothing timed the second time
    assert key in gemm._cached and gemm._timings[key] == (5.0, 1.0)
    assert "1 shapes, 1 of them from the cache" in gemm.summary()
    _tune_fresh(torch.randn(64, 32), torch.randn(32, 24))  # another shape: its own file, timed
    assert len(list(folder.glob("*.json"))) == 2 and len(timed) == 16


@pytest.mark.parametrize("change", ["wrong product", "other algorithms", "corrupt file", "another GPU",
                                    "torch's pick kept"])
def test_a_cache_entry_that_no_longer_holds_is_timed_again_and_rewritten(fake_tuning, monkeypatch, change):
    timed, folder = fake_tuning
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    _tune_fresh(a, b)
    (path,) = folder.glob("*.json")
    if change == "wrong product":  # the kept algorithm now differs from torch's product: never run it
        _FakePlan.wrong = {1}
    elif change == "other algorithms":  # a driver update: index 1 may be another algorithm now
        _FakePlan.listed = 7
    elif change == "corrupt file":
        path.write_text('{"choice": 1, "algor')
    elif change == "another GPU":
        monkeypatch.setattr(gemm, "_gpu_name", lambda device: "Other GPU")
    else:  # an entry keeping torch's matmul needs no check of a cuBLASLt product
        entry = json.loads(path.read_text())
        path.write_text(json.dumps({**entry, "choice": "torch"}))
        _, choice = _tune_fresh(a, b)
        assert choice is gemm._TORCH and len(timed) == 8
        return
    _, choice = _tune_fresh(a, b)
    assert len(timed) == (14 if change == "wrong product" else 16)  # timed anew (without #1 where it is wrong)
    if change == "wrong product":
        assert choice[1] == 2  # #1 is no longer a candidate: the next fastest (3.0 ms)
        assert json.loads(path.read_text())["choice"] == 2
    elif change == "another GPU":
        assert len(list(folder.glob("*.json"))) == 2  # its own entry beside the first GPU's
    else:
        assert choice[1] == 1 and json.loads(path.read_text())["choice"] == 1


def test_an_unwritable_cache_folder_warns_once_and_tuning_goes_on(fake_tuning, tmp_path, caplog):
    timed, _ = fake_tuning
    blocker = tmp_path / "a file"
    blocker.write_text("")
    gemm.enable(False, cache_dir=blocker / "cache")  # a folder that cannot be made
    with caplog.at_level("WARNING", logger="seqcls"):
        _, choice = _tune_fresh(torch.randn(64, 32), torch.randn(32, 16))
        _tune_fresh(torch.randn(64, 32), torch.randn(32, 24))
    assert choice[1] == 1 and len(timed) == 16
    warnings = [r.getMessage() for r in caplog.records if "tuned_gemm_cache" in r.getMessage()]
    assert len(warnings) == 1 and "cannot write" in warnings[0]


@pytest.mark.parametrize("setting,want", [(None, "default"), ("none", None), ("/shared/gemm", "path")])
def test_tuned_gemm_cache_setting_names_the_folder(tmp_path, monkeypatch, setting, want):
    from seqcls.build import tuned_gemm_cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = compose_cfg(["compile.tuned_gemm_cache=" + ("null" if setting is None else setting)])
    got = tuned_gemm_cache(cfg)
    if want == "default":
        assert got == tmp_path / "xdg" / "seqcls" / "tuned_gemm"
    elif want == "path":
        assert got == Path("/shared/gemm")
    else:
        assert got is None


def test_a_bias_gradient_candidate_is_kept_only_where_both_its_outputs_are_torchs(fake_tuning):
    """mode "bgrad" (a weight's gradient and its bias's in one call): an algorithm whose product is right
    but whose row sums are wrong is never chosen, however fast."""
    timed, _ = fake_tuning
    grad, x = torch.randn(40, 12), torch.randn(40, 8)
    a = grad.t()
    _FakePlan.wrong_sums = {1}  # the fastest (1.0 ms) sums wrongly: #2 (3.0 ms) beats torch (5.0 ms)
    key = gemm._key(a, x, None, "bgrad", None)
    plan, index = gemm._tune(key, a, x, None, "bgrad", None)
    assert index == 2 and 1 not in timed
    out, sums = gemm._outputs(a, x, "bgrad")
    plan.run(index, a, x, None, out, sums, None)
    torch.testing.assert_close(out, grad.t() @ x)
    torch.testing.assert_close(sums, grad.sum(0))
    _FakePlan.wrong_sums = {0, 1, 2}
    gemm.enable(False)  # no cache: timed anew
    assert gemm._tune(gemm._key(a[:, :39], x[:39], None, "bgrad", None), a[:, :39], x[:39], None, "bgrad",
                      None) is gemm._TORCH


def test_mm_bgrad_off_the_tuned_path_is_torchs_product_and_column_sum():
    grad, x = torch.randn(9, 4), torch.randn(9, 6)
    dw, db = gemm.mm_bgrad(grad.t(), x)
    torch.testing.assert_close(dw, grad.t() @ x)
    torch.testing.assert_close(db, grad.sum(0))
