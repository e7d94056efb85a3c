#!/bin/bash
# Multi-node pretraining on Slurm: 2 nodes x 8 GPUs, one torchrun per node started by srun, ranks
# joined by torchrun's c10d rendezvous on the first node of the allocation.
#
#   cd /path/to/sarcube          # the checkout with .venv (make test); the job runs from here
#   sbatch deploy/hpc/slurm_torchrun.sh
#   sbatch --nodes=4 --export=ALL,CONFIG=mixmae_paper,OUT=s3://sarcube/runs/mixmae \
#     deploy/hpc/slurm_torchrun.sh
#
# torchrun sets RANK / WORLD_SIZE / LOCAL_RANK for sarcube. Settings: CONFIG, MANIFEST, OUT,
# OVERRIDES, GPUS_PER_NODE. Credentials: deploy/hpc/common.sh. A requeued or resubmitted job
# continues exactly (--resume).
#SBATCH --job-name=sarcube-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

export SARCUBE_HOME=${SARCUBE_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$SARCUBE_HOME"
# shellcheck source=deploy/hpc/common.sh
source deploy/hpc/common.sh

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# first host; sed reads the whole list (head would close the pipe early: SIGPIPE under pipefail)
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MASTER_PORT=${MASTER_PORT:-29500}
export MASTER_ADDR MASTER_PORT

CONFIG=${CONFIG:-simmim_paper}
MANIFEST=${MANIFEST:-s3://sarcube/shards/manifest.json}
OUT=${OUT:-s3://sarcube/runs/simmim-paper}
read -r -a overrides <<<"${OVERRIDES:-}"
resume=()
if has_checkpoint "$OUT"; then resume=(--resume); fi

srun --kill-on-bad-exit=1 torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  -m training.pretrain --config "$CONFIG" --manifest "$MANIFEST" --out "$OUT" \
  "${storage_opts[@]}" "${resume[@]}" "${overrides[@]}"
