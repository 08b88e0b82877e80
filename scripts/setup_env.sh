# Sourced by scripts/test.sh and scripts/demo.sh: create or reuse .venv and install seqcls into it.
# On a machine without an NVIDIA GPU, torch comes as the CPU build (pip install torch==2.13.0 takes
# the one on this disk); with a GPU, pip's default torch build (CUDA) is used. Set SEQCLS_TORCH to
# pin another torch requirement.
VENV=${SEQCLS_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.seqcls-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  if ! python -c "import torch" 2>/dev/null; then
    if [ -n "${SEQCLS_TORCH:-}" ]; then torch_req=$SEQCLS_TORCH
    elif command -v nvidia-smi >/dev/null 2>&1; then torch_req="torch>=2.6"
    else torch_req="torch==2.13.0"   # CPU build; pip's default torch on Linux is a multi-GB CUDA build
    fi
    python -m pip install -q "$torch_req" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  python -m pip install -q -e ".[test,sweep]" 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import seqcls, torch, peft" && touch "$stamp"
fi
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
