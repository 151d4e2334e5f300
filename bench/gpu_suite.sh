#!/usr/bin/env bash
# One-shot GPU benchmark: every bench on CUDA with bf16 autocast and torch.compile at 480x640, batch 4.
# Prints one JSON document on stdout (progress on stderr); budget 8 minutes (timeout 480 s).
#   bash bench/gpu_suite.sh > gpu_suite.json
# Without CUDA it prints {"error": ...} and exits 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo '{"error": "bench/gpu_suite.sh: CUDA is not available (torch.cuda.is_available() is False); run it on a CUDA machine"}'
    exit 2
fi
exec timeout --signal=INT 480 "$PY" bench/gpu_suite.py --device cuda "$@"
