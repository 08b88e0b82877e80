"""compile.capture_ahead, the part that runs anywhere: the batch shapes a run will train on, found
before its first step from the sampler's seeded order and the examples' lengths."""

import random

import pytest

from seqcls.build import build_trainer
from tests.conftest import compose_cfg, synthetic_overrides


def vary_lengths(data_dir):
    """The synthetic texts with 0 to 12 filler words in front: batches of several lengths."""
    rng = random.Random(0)
    path = data_dir / "train.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0]] + [" ".join(["so"] * rng.randint(0, 12) + [l]) for l in lines[1:]]) + "\n")


def shapes_trained_on(trainer, *, epoch, skip, steps):
    """What fit() would feed the step from (epoch, skip) on for ``steps`` steps: each micro-batch's shape."""
    out, left = [], steps * trainer.grad_accum_steps
    sampler = trainer.train_loader.batch_sampler
    while left > 0:
        sampler.set_epoch(epoch)
        sampler.yielded = skip
        batches = list(trainer.train_loader)[:trainer.steps_per_epoch * trainer.grad_accum_steps - skip][:left]
        out += [tuple(b["input_ids"].shape) for b in batches]
        left -= len(batches)
        epoch, skip = epoch + 1, 0
    return out


@pytest.mark.parametrize("pack", ["true", "false"])
def test_upcoming_shapes_are_the_shapes_the_rest_of_the_run_trains_on(tmp_path, synthetic_dir, pack):
    vary_lengths(synthetic_dir)
    cfg = compose_cfg(synthetic_overrides(synthetic_dir, tmp_path) + [
        f"compile.pack_sequences={pack}", "compile.pack_bucket=4", "step_scheduler.max_steps=40",
        "step_scheduler.global_batch_size=16", "step_scheduler.local_batch_size=8"])  # 2 micro-batches a step
    trainer = build_trainer(cfg, tmp_path)
    assert trainer.steps_per_epoch == 16 and trainer.grad_accum_steps == 2  # 40 steps: two and a half epochs
    for epoch, skip, step in ((0, 0, 0), (1, 6, 19)):  # from the start, and resumed inside the second epoch
        trainer.epoch, trainer.batches_into_epoch, trainer.step = epoch, skip, step
        expected = list(dict.fromkeys(shapes_trained_on(trainer, epoch=epoch, skip=skip, steps=40 - step)))
        upcoming = trainer.upcoming_shapes()
        assert [tuple(b["input_ids"].shape) for b in upcoming] == expected
        assert len(expected) >= 3
        assert all(("cu_seq_lens" in b) == (pack == "true") and len(b["labels"]) == 8 for b in upcoming)
    trainer.step = 40
    assert trainer.upcoming_shapes() == []


def test_a_collator_that_cannot_tell_its_lengths_gives_no_shapes(tmp_path, synthetic_dir):
    trainer = build_trainer(compose_cfg(synthetic_overrides(synthetic_dir, tmp_path)), tmp_path)
    trainer.train_loader.collate_fn = lambda examples: examples  # a user's collate_fn, no padded_length
    assert trainer.upcoming_shapes() == []
