#!/usr/bin/env bash
# Multi-node training under Slurm: one torchrun per node, rendezvous from Slurm's environment.
#
#   sbatch --nodes=4 --gpus-per-node=8 scripts/launch_slurm.sh --config configs/janusflow_stage2.yaml [key=value ...]
#
# Every attempt runs `train.py --resume auto`: the newest complete checkpoint if there is one, else a fresh
# start, so a requeued or restarted job reruns the same command line. Checkpoints are written by every rank
# into run.dir: it must be on a filesystem all nodes share. Environment knobs: PYTHON (default .venv/bin/python),
# GPUS_PER_NODE (default: Slurm's count), MASTER_PORT (29500), MAX_RESTARTS (torchrun's in-job restarts, 0).
#SBATCH --job-name=unified-mm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

: "${SLURM_JOB_NODELIST:?run me with sbatch (or set the SLURM_* variables)}"
PYTHON=${PYTHON:-.venv/bin/python}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-$GPUS_PER_NODE} / GPUS_PER_NODE ))}
export HF_HUB_OFFLINE=1  # weights come from local paths only

echo "nodes=$NNODES gpus/node=$GPUS_PER_NODE rendezvous=$MASTER_ADDR:$MASTER_PORT job=$SLURM_JOB_ID args: $*"
# --kill-on-bad-exit: one failed node ends the step instead of leaving the others waiting in a collective.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \
  --max_restarts="${MAX_RESTARTS:-0}" \
  train.py --resume auto "$@"
