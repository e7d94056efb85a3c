#!/bin/bash
# Multi-node pretraining on PBS with mpirun alone (the launch AIST uses on ABCI): one MPI rank per
# GPU, 2 nodes x 8 GPUs = 16 ranks. sarcube reads its rank, world size and local rank from
# OpenMPI's OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK (training/distributed.py); MASTER_ADDR
# (the first host of $PBS_NODEFILE) and MASTER_PORT are exported to every rank.
#
#   cd /path/to/sarcube          # the checkout with .venv (make test); the job runs from here
#   qsub -P <group> deploy/hpc/pbs_mpirun.sh
#   qsub -P <group> -v CONFIG=finetune_paper,TASK=lulc,PRETRAINED=s3://sarcube/runs/simmim-paper/encoder.pth,OUT=s3://sarcube/runs/lulc \
#     deploy/hpc/pbs_mpirun.sh
#
# Settings (qsub -v): CONFIG, MANIFEST, OUT, OVERRIDES, GPUS_PER_NODE; with TASK (lulc | water)
# and PRETRAINED (encoder.pth or none) the job fine-tunes instead of pretraining. Credentials:
# deploy/hpc/common.sh. A requeued or resubmitted job continues exactly (--resume).
#PBS -N sarcube-mpirun
#PBS -q rt_HF
#PBS -l select=2:ngpus=8
#PBS -l walltime=24:00:00
#PBS -j oe
set -euo pipefail

export SARCUBE_HOME=${SARCUBE_HOME:-${PBS_O_WORKDIR:-$PWD}}
cd "$SARCUBE_HOME"
if command -v module >/dev/null 2>&1; then module load hpcx 2>/dev/null || true; fi
# shellcheck source=deploy/hpc/common.sh
source deploy/hpc/common.sh

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
hosts=$(mktemp)
trap 'rm -f "$hosts"' EXIT
sort -u "$PBS_NODEFILE" | sed "s/\$/ slots=$GPUS_PER_NODE/" >"$hosts"
NNODES=$(wc -l <"$hosts")
NP=$((NNODES * GPUS_PER_NODE))
MASTER_ADDR=$(head -n 1 "$PBS_NODEFILE")
MASTER_PORT=${MASTER_PORT:-29500}
export MASTER_ADDR MASTER_PORT

MANIFEST=${MANIFEST:-s3://sarcube/shards/manifest.json}
read -r -a overrides <<<"${OVERRIDES:-}"
mapfile -t xenv < <(mpi_env_args)

if [ -n "${TASK:-}" ]; then
  CONFIG=${CONFIG:-finetune_paper}
  OUT=${OUT:-s3://sarcube/runs/$TASK}
  resume=()
  if has_checkpoint "$OUT"; then resume=(--resume); fi
  mpirun -np "$NP" -npernode "$GPUS_PER_NODE" --hostfile "$hosts" --bind-to none "${xenv[@]}" \
    python -m training.finetune --task "$TASK" --config "$CONFIG" --manifest "$MANIFEST" \
    --pretrained "${PRETRAINED:?set PRETRAINED (encoder.pth or none)}" --out "$OUT" \
    "${storage_opts[@]}" "${resume[@]}" "${overrides[@]}"
else
  CONFIG=${CONFIG:-simmim_paper}
  OUT=${OUT:-s3://sarcube/runs/simmim-paper}
  resume=()
  if has_checkpoint "$OUT"; then resume=(--resume); fi
  mpirun -np "$NP" -npernode "$GPUS_PER_NODE" --hostfile "$hosts" --bind-to none "${xenv[@]}" \
    python -m training.pretrain --config "$CONFIG" --manifest "$MANIFEST" --out "$OUT" \
    "${storage_opts[@]}" "${resume[@]}" "${overrides[@]}"
fi
