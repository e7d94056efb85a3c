#!/bin/bash
# Multi-node pretraining on PBS (ABCI style): 2 nodes x 8 GPUs, torchrun on every node.
#
#   cd /path/to/sarcube          # the checkout with .venv (make test); the job runs from here
#   qsub -P <group> deploy/hpc/pbs_torchrun.sh
#   qsub -P <group> -l select=4:ngpus=8 -v CONFIG=mixmae_paper,OUT=s3://sarcube/runs/mixmae \
#     deploy/hpc/pbs_torchrun.sh
#
# mpirun -npernode 1 starts deploy/hpc/torchrun-node.sh once per node; its node rank is its MPI
# rank, so node rank 0 runs on the first host of $PBS_NODEFILE, which is MASTER_ADDR. torchrun
# then starts GPUS_PER_NODE ranks per node and sets RANK / WORLD_SIZE / LOCAL_RANK for sarcube.
# Settings (qsub -v): CONFIG, MANIFEST, OUT, OVERRIDES ("section.key=value ..."), GPUS_PER_NODE.
# Credentials: see deploy/hpc/common.sh (~/.config/sarcube/s3.env). A requeued or resubmitted
# job finds OUT/checkpoint.pt and continues exactly (--resume).
#PBS -N sarcube-pretrain
#PBS -q rt_HF
#PBS -l select=2:ngpus=8
#PBS -l walltime=24:00:00
#PBS -j oe
set -euo pipefail

export SARCUBE_HOME=${SARCUBE_HOME:-${PBS_O_WORKDIR:-$PWD}}
cd "$SARCUBE_HOME"
# ABCI: OpenMPI for mpirun (any site: load the module that provides mpirun)
if command -v module >/dev/null 2>&1; then module load hpcx 2>/dev/null || true; fi
# shellcheck source=deploy/hpc/common.sh
source deploy/hpc/common.sh

hosts=$(mktemp)
trap 'rm -f "$hosts"' EXIT
sort -u "$PBS_NODEFILE" >"$hosts"
NNODES=$(wc -l <"$hosts")
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=$(head -n 1 "$PBS_NODEFILE")
MASTER_PORT=${MASTER_PORT:-29500}
export NNODES GPUS_PER_NODE MASTER_ADDR MASTER_PORT

CONFIG=${CONFIG:-simmim_paper}
MANIFEST=${MANIFEST:-s3://sarcube/shards/manifest.json}
OUT=${OUT:-s3://sarcube/runs/simmim-paper}
read -r -a overrides <<<"${OVERRIDES:-}"
resume=()
if has_checkpoint "$OUT"; then resume=(--resume); fi
mapfile -t xenv < <(mpi_env_args)

echo "sarcube: $NNODES nodes x $GPUS_PER_NODE GPUs, master $MASTER_ADDR:$MASTER_PORT, out $OUT ${resume[*]}"
mpirun -np "$NNODES" -npernode 1 --hostfile "$hosts" --bind-to none "${xenv[@]}" \
  bash deploy/hpc/torchrun-node.sh training.pretrain --config "$CONFIG" --manifest "$MANIFEST" \
  --out "$OUT" "${storage_opts[@]}" "${resume[@]}" "${overrides[@]}"
