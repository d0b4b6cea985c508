#!/usr/bin/env bash
# GPU check (one CUDA device, offline, at most ~8 minutes): pretrain full in bf16 on a
# from-scratch TTL-160m-shaped model, kill + resume, LoRA stage 2, export parity, packed SFT,
# eval, the eval prefix cache; one line per check with tokens/s, MFU and peak GPU memory.
# The lines also go to $OUT/gpu_check.txt when OUT is set (the device tool's output folder).
#
# The GPU machine has torch, transformers, peft, accelerate, sentencepiece, typer, ... but
# no pydantic and no network: prepare its wheels here once and carry them:
#   .venv/bin/pip download --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d vendor/wheels pydantic
# then run (device tool): carry ["vendor"], command "bash scripts/gpu_check.sh".
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
  if [ -d vendor/wheels ]; then
    "$PYTHON" -m pip install -q --no-index --find-links vendor/wheels pydantic
  else
    echo "pydantic is missing and vendor/wheels is absent: see the top of $0"; exit 1
  fi
fi
date -u +"date: %Y-%m-%dT%H:%M:%SZ"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PYTHON" scripts/gpu_check.py "$@"
