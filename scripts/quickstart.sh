#!/usr/bin/env bash
# Set up everything, then run the main job on the embedded default: sklearn digits, a small CNN,
# the Hessian analysis on a local Ray cluster, allocation, block-wise QAT, evaluation, export, report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN_DIR=${RUN_DIR:-runs/quickstart}
.venv/bin/hawq run configs/quickstart.yaml --run-dir "$RUN_DIR" "$@"
.venv/bin/hawq report "$RUN_DIR"
