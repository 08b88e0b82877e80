"""The bf16 weights' update deferred to the next forward (seqcls.optim, compile.overlap_update): the same
training bit for bit, applied exactly once, before anything reads the weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from seqcls.optim import MasterWeightAdamW, use_bf16_weights, weight_buckets
from seqcls.trainer import clip_and_update
from tests.conftest import compose_cfg, synthetic_overrides


class Blocks(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Linear(6, 8)
        self.layer = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()) for _ in range(3))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.layer:
            x = block(x)
        return self.head(x)


def optimizer(model, defer, decoupled=True, lr=1e-2):
    masters = use_bf16_weights(model)
    # a bucket a block (and the rest): max_numel below two blocks' size
    return MasterWeightAdamW(model.parameters(), lr=lr, weight_decay=0.1, decoupled_weight_decay=decoupled,
                             masters=masters, buckets=weight_buckets(model, list(masters), max_numel=80), defer=defer)


def train_step(model, opt, step, max_norm):
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    if opt.defer:
        opt.launch_deferred()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    torch.nn.functional.cross_entropy(out.float(), y).backward()
    norm = clip_and_update(opt, list(model.parameters()), max_norm)
    opt.zero_grad(set_to_none=True)
    return norm


def same_state(ref_model, ref, got_model, got):
    for r, g in zip(ref_model.parameters(), got_model.parameters()):
        assert torch.equal(r, g)
        for key, value in ref.state[r].items():
            assert torch.equal(got.state[g][key], value), key


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("max_norm", [None, 0.05])  # 0.05: every step clipped (the update's grad_scale)
def test_a_deferred_update_trains_bit_for_bit_like_the_update_inside_the_step(decoupled, max_norm):
    ref_model, got_model = Blocks(), Blocks()
    ref, got = optimizer(ref_model, False, decoupled), optimizer(got_model, True, decoupled)
    assert len(got._buckets[0]) == 5  # embed, three blocks, head
    # The learning rate as a device tensor that the scheduler refills in place after each step, as under
    # step graphs: the deferred update must use its own step's rate.
    for opt in (ref, got):
        opt.param_groups[0]["lr"] = torch.tensor(1e-2)
    for step in range(5):
        before = [p.detach().clone() for p in got_model.parameters()]
        ref_norm = train_step(ref_model, ref, step, max_norm)
        norm = train_step(got_model, got, step, max_norm)
        assert torch.equal(norm, ref_norm)
        for opt in (ref, got):
            opt.param_groups[0]["lr"].mul_(0.5)
        # After the step the weights (all bf16 here) have not moved yet
        assert all(torch.equal(b, p) for b, p in zip(before, got_model.parameters()))
        got.launch_deferred()  # what the next forward starts with
        same_state(ref_model, ref, got_model, got)
        got.discard_deferred()  # nothing pending any more: this changes nothing
        got.flush()
        same_state(ref_model, ref, got_model, got)


def test_a_pending_update_applies_once_and_a_discarded_one_never():
    model = Blocks()
    opt = optimizer(model, True)
    train_step(model, opt, 0, None)
    opt.flush()
    after = {(i, k): v.clone() for i, b in enumerate(opt._all_buckets()) for k, v in b.flat.items()}
    weights = [p.detach().clone() for p in model.parameters()]
    opt.flush()
    opt.launch_deferred()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(torch.equal(v, after[i, k]) for i, b in enumerate(opt._all_buckets()) for k, v in b.flat.items())
    train_step(model, opt, 1, None)
    opt.discard_deferred()
    opt.flush()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    # a state dict loaded over a pending update replaces it
    train_step(model, opt, 2, None)
    opt.load_state_dict(opt.state_dict())
    opt.flush()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_wait_hooks_sit_on_each_buckets_first_module_or_its_compiled_block_and_keep_its_output():
    model = Blocks()
    opt = optimizer(model, True)
    for block in model.layer[1:]:
        block.compile(backend="eager")  # dynamo traces the block's call, hooks included
    x = torch.randn(4, 6)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)
    want = forward()
    waited = []
    opt.wait_bucket = waited.append
    handles = opt.wait_hooks(model)
    hooked = [name for name, m in model.named_modules() if m._forward_pre_hooks]
    # the uncompiled block's first Linear; the compiled blocks themselves, not the Linears inside them
    assert hooked == ["embed", "layer.0.0", "layer.1", "layer.2", "head"]
    assert torch.equal(forward(), want)
    assert waited == [0, 1, 2, 3, 4]  # each bucket waited for once, in forward order
    for h in handles:
        h.remove()


def run_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]


def test_a_run_with_the_update_deferred_trains_validates_and_resumes_as_one_without(tmp_path, synthetic_dir):
    from seqcls.build import build_trainer

    class StopAt:  # a SIGTERM after step 3: a checkpoint there, then the run stops
        def __init__(self, trainer, step):
            self.trainer, self.step = trainer, step

        @property
        def requested(self):
            return self.trainer.step >= self.step

    def cfg(run_dir, overlap):
        return compose_cfg(synthetic_overrides(synthetic_dir, run_dir) + [
            "precision=bf16", "step_scheduler.max_steps=6", "step_scheduler.log_every_steps=1",
            "step_scheduler.val_every_steps=2", "step_scheduler.ckpt_every_steps=100",
            "optimizer.weight_decay=0.01", f"compile.overlap_update={overlap}"])

    ref = build_trainer(cfg(tmp_path / "ref", "false"), tmp_path / "ref")
    assert not ref.optimizer.defer
    ref.fit()
    first = build_trainer(cfg(tmp_path / "run", "true"), tmp_path / "run")
    assert first.optimizer.defer
    first.stop_signal = StopAt(first, 3)
    assert first.fit()["stopped_early"]
    second = build_trainer(cfg(tmp_path / "run", "true"), tmp_path / "run")
    assert second.step == 3
    second.fit()
    got, want = run_rows(tmp_path / "run"), run_rows(tmp_path / "ref")
    assert len([r for r in want if r["split"] == "validation"]) == 3
    assert got == want  # losses, grad norms and validation metrics (read after the weights were synced)
    a, b = (load_file(str(tmp_path / name / "checkpoints" / "step_00000006" / "model" / "model.safetensors"))
            for name in ("ref", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
