#!/usr/bin/env bash
# The generalist recipe as measured (README, "What the default run reaches"): 400 steps on single digits, then the
# full mix (configs/tiny_generalist.yaml) in three runs of 1100, 4400 and 4400 steps, each starting from the last
# one's weights (train.init_from: a fresh optimizer and lr schedule each time). ~29 minutes on 2 free CPU cores.
#   bash scripts/train_generalist.sh [RUNS_DIR]   (default runs/); then: python eval.py --run RUNS_DIR/tiny_generalist
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUNS=${1:-runs}
export HF_HUB_OFFLINE=1
"$PY" train.py --config configs/tiny_generalist_singles.yaml run.dir="$RUNS/tiny_generalist_singles"
prev="$RUNS/tiny_generalist_singles"
for part in "mix1 1100" "mix2 4400" "tiny_generalist 4400"; do
  set -- $part
  name=$1
  [ "$name" = tiny_generalist ] || name="tiny_generalist_$1"
  "$PY" train.py --config configs/tiny_generalist.yaml run.dir="$RUNS/$name" train.max_steps="$2" \
    train.init_from="$prev"
  prev="$RUNS/$name"
done
echo "done: $prev (evaluate with: $PY eval.py --run $prev)"
