"""What distributed.activation_checkpointing costs and saves: the bytes of activations one forward keeps for
the backward (parameters left out), and the median seconds a training step, with and without it, alternating.

    python scripts/bench_checkpointing.py                       # MiniLM, MRPC from ../shared/data/mrpc, CPU
    python scripts/bench_checkpointing.py --model roberta_large --device cuda --batch 32

Each run builds the trainer from the real config (seqcls.build), so what is timed is what training runs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from seqcls.build import build_trainer
from seqcls.train import CONF_DIR

REPO = Path(__file__).resolve().parents[1]


def measure(overrides: list[str], steps: int) -> tuple[float, float, tuple[int, ...]]:
    run_dir = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides + [
                f"run_dir={run_dir}", "checkpoint.enabled=false", f"step_scheduler.max_steps={steps}",
                f"step_scheduler.log_every_steps={steps}"])
        trainer = build_trainer(cfg, run_dir)
        loader = trainer.train_loader
        batch = loader.collate_fn([loader.dataset[i] for i in loader.batch_sampler.micro_batches(0)[0]])
        batch = {k: v.to(trainer.device) for k, v in batch.items()}
        params = {p.data_ptr() for p in trainer.model.parameters()}
        saved = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.data_ptr() not in params:
                saved.append(t.numel() * t.element_size())
            return t
        trainer.model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer._forward_loss(batch)
        trainer.model.zero_grad(set_to_none=True)
        times, step = [], trainer.train_step

        def timed(micro):
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = step(micro)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            return out
        trainer.train_step = timed
        trainer.fit()
        return sum(saved), statistics.median(times[2:]), tuple(batch["input_ids"].shape)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm_l6", help="a conf/model option")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "mrpc"), help="GLUE MRPC TSV folder")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12, help="steps a run (the first two are not timed)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternating")
    args = ap.parse_args()
    if not Path(args.data_dir).is_dir():
        raise SystemExit(f"error: --data-dir {args.data_dir} is not a folder with GLUE MRPC's TSV files")
    base = [f"model={args.model}", "peft=none", "dataset=glue_mrpc", f"dataset.data_dir={args.data_dir}",
            f"device={args.device}", f"step_scheduler.global_batch_size={args.batch}",
            f"step_scheduler.local_batch_size={args.batch}", "optimizer.lr=1e-4"]
    for _ in range(args.repeats):
        for checkpointing in (False, True):
            saved, step_s, shape = measure(base + [f"distributed.activation_checkpointing={checkpointing}"],
                                           args.steps)
            print(f"activation_checkpointing={str(checkpointing).lower():5}  first batch {shape}: "
                  f"{saved / 2**20:7.1f} MiB of activations kept for the backward; median step {step_s:.3f} s",
                  flush=True)


if __name__ == "__main__":
    main()
