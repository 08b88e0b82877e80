#!/usr/bin/env bash
# The main job on an embedded default: fine-tune all-MiniLM-L6-v2 (real pretrained weights that
# install with the package) on GLUE MRPC and print dev accuracy and F1.
# Offline it reads MRPC from ../shared/data/mrpc when that folder exists; otherwise it loads
# nyu-mll/glue from the hub. Extra arguments are Hydra overrides, e.g. `bash scripts/demo.sh peft=lora`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
data_args=()
if [ -d ../shared/data/mrpc ]; then data_args=(dataset.data_dir="$(cd ../shared/data/mrpc && pwd)"); fi
run_dir="outputs/demo/$(date +%Y-%m-%d_%H-%M-%S)"
python -m seqcls.train model=minilm_l6 dataset=glue_mrpc peft=none \
  optimizer.lr=1e-4 optimizer.weight_decay=0.01 step_scheduler.num_epochs=3 \
  step_scheduler.global_batch_size=32 step_scheduler.local_batch_size=32 \
  step_scheduler.log_every_steps=20 run_dir="$run_dir" "${data_args[@]}" "$@"
python - "$run_dir" <<'PY'
import json, sys
r = json.load(open(f"{sys.argv[1]}/results.json"))
f = r["final"]
print(f"\nMRPC dev (408 pairs): accuracy {f['accuracy']:.3f}  F1 {f['f1']:.3f}   "
      f"(majority-class baseline: accuracy 0.684, F1 0.812)")
print(f"{r['steps']} steps in {r['wall_time_s'] / 60:.1f} min; run dir: {sys.argv[1]}")
PY
