"""compile.overlap_update's algorithm (seqcls.step_graph._Overlap) on CPU: each step applies the previous
step's update (in parts, each block's forward waiting for its own part) before its forward, keeps its
gradients, clipping factor and learning rate for the next, and ``flush`` applies what is pending. CUDA's
streams, events and graphs are stubbed so that work runs at once, in program order; the waits are logged.
What this cannot show (the two streams running at once inside a captured graph) is tests/test_gpu.py's."""

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch

from seqcls import step_graph
from seqcls.optim import MasterWeightAdamW, use_bf16_weights, weight_buckets
from seqcls.trainer import clip_and_update


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.lin = torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)

    def forward(self, x):
        return x + torch.nn.functional.gelu(self.lin(self.norm(x)))


class Net(torch.nn.Module):
    def __init__(self, by_index=False):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 3)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(4))
        self.by_index = by_index

    def forward(self, ids):
        x = self.emb(ids)
        blocks = [self.blocks[i] for i in range(len(self.blocks))] if self.by_index else self.blocks
        for block in blocks:
            x = block(x)
        return self.head(x.mean(1))


class FakeEvent:
    def __init__(self, *args, **kwargs):
        self.recorded = 0

    def record(self, stream=None):
        self.recorded += 1


class FakeStream:
    waits: list = []

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        assert event.recorded  # program order: the update's part ran before anything waits for it
        FakeStream.waits.append(event)


@pytest.fixture
def stubbed_cuda(monkeypatch):
    FakeStream.waits = []
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    # A "graph" runs its function at each replay (and not at capture).
    monkeypatch.setattr(step_graph._Overlap, "_capture",
                        lambda self, fn: (SimpleNamespace(replay=fn), (None, None)))


def setup(seed, max_norm, by_index=False):
    torch.manual_seed(seed)
    model = Net(by_index)
    masters = use_bf16_weights(model)  # the Linears in bf16; LayerNorms and the embedding stay fp32
    opt = MasterWeightAdamW(model.parameters(), lr=torch.tensor(1e-2), weight_decay=0.1, masters=masters,
                            buckets=weight_buckets(model, list(masters), max_numel=300))  # a bucket a block

    def forward_loss(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch["ids"])
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    params = list(model.parameters())
    graphs = SimpleNamespace(optimizer=opt, device=torch.device("cpu"), params=params, forward_loss=forward_loss,
                             denom=8, max_grad_norm=max_norm, pool=None, side_stream=None,
                             _warm_up=lambda fn: [fn() for _ in range(2)],
                             _drop_grads=lambda: [setattr(p, "grad", None) for p in params])
    return model, opt, graphs


def batch(step):
    gen = torch.Generator().manual_seed(step)
    return {"ids": torch.randint(0, 50, (8, 5 + step % 3), generator=gen),
            "labels": torch.randint(0, 3, (8,), generator=gen)}


def ref_step(graphs, b):
    loss = graphs.forward_loss(b)
    (loss / graphs.denom).backward()
    norm = clip_and_update(graphs.optimizer, graphs.params, graphs.max_grad_norm)
    graphs.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), norm


def lr_at(step):
    return 1e-2 * (1 - step / 20)  # a schedule: each step's update must use its own step's rate


@pytest.mark.parametrize("max_norm", [1e3, 0.05], ids=["unclipped", "clipped"])
def test_the_overlapped_update_trains_as_the_update_at_the_end_of_each_step(stubbed_cuda, max_norm):
    ref_model, ref_opt, ref = setup(0, max_norm)
    model, opt, graphs = setup(0, max_norm)
    overlap = step_graph._Overlap(graphs, model)
    overlap.setup()
    # the update's parts: the fp32 tensors (embedding, LayerNorms) by the fused kernel, then a bucket a block, the head
    assert [len(u) for u in overlap.units] == [1 + 2 * 4, 2, 2, 2, 2, 2]
    assert overlap.hooked == {0, 1, 2, 3, 4, 5}  # the embedding, each block, the head
    same = torch.equal if max_norm == 1e3 else (lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-6))
    block_waits = []
    for i, block in enumerate(model.blocks):  # after the list's wait: which part had the block waited for?
        block.register_forward_pre_hook(lambda m, a, i=i: block_waits.append(
            (i, overlap.events.index(FakeStream.waits[-1]))))

    def check_against_ref():
        for a, b in zip(ref_model.parameters(), model.parameters()):
            assert same(a, b)
        for a, b in zip(ref_opt.state.values(), opt.state.values()):
            assert all(same(a[k], b[k]) for k in a)

    for step in range(1, 10):
        for o in (ref_opt, opt):
            o.param_groups[0]["lr"].fill_(lr_at(step))
        if step == 6:  # a new shape's capture mid-run: it applies step 5's update, and its warm-ups move nothing
            graph, _, _ = overlap.capture(batch(step))
            check_against_ref()
            loss, norm = graph.replay()
        else:
            loss, norm = overlap.body(batch(step))
        ref_loss, ref_norm = ref_step(ref, batch(step))
        assert torch.equal(loss, ref_loss) and torch.allclose(norm, ref_norm, rtol=1e-5)
        overlap.pending = True
        if step == 1:  # the first step's graph applied nothing; its update waits
            assert all(s["step"].item() == 0 for s in opt.state.values())
        if step in (3, 9):
            overlap.flush()
            assert not overlap.pending and overlap.apply.item() == 0
            check_against_ref()
            overlap.flush()  # nothing pending: nothing moves
            check_against_ref()
    assert all(s["step"].item() == 9 for s in opt.state.values())
    # each block waited for its own part of the update: the bucket of its Linear (the fused part, first,
    # holds its LayerNorm; the head's bucket comes before the blocks', as the model registers it)
    own = [overlap.unit_of[b.lin.weight] for b in model.blocks]
    assert own == [2, 3, 4, 5] and block_waits[:4] == list(enumerate(own))
    assert all(p.grad is None for p in model.parameters())


def test_a_model_that_skips_its_block_lists_loop_is_one_clear_error(stubbed_cuda):
    model, _, graphs = setup(0, 1.0, by_index=True)  # blocks taken by index: the list's loop never waits
    overlap = step_graph._Overlap(graphs, model)
    overlap.setup()
    with pytest.raises(RuntimeError, match="did not wait for every part of the update .* compile.overlap_update=false"):
        overlap.body(batch(1))
