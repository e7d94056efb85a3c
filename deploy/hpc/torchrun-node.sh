#!/usr/bin/env bash
# torchrun on one node of a multi-node job: started once per node (mpirun -npernode 1 on PBS),
# it takes its node rank from the launcher and starts GPUS_PER_NODE ranks of a training module.
#
#   torchrun-node.sh MODULE [ARG...]     e.g. torchrun-node.sh training.pretrain --config ...
#
# Needs NNODES, MASTER_ADDR (the host of node rank 0, i.e. the first host of the job), and
# optionally GPUS_PER_NODE (8) and MASTER_PORT (29500) in the environment. Node rank: OpenMPI's
# OMPI_COMM_WORLD_RANK, else PMI_RANK (MPICH / Intel MPI / PALS), else SLURM_NODEID.
set -euo pipefail

node_rank=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${SLURM_NODEID:-0}}}
module=${1:?usage: torchrun-node.sh MODULE [ARG...]}
shift

exec torchrun --nnodes "${NNODES:?set NNODES}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --node_rank "$node_rank" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" \
  --master_port "${MASTER_PORT:-29500}" -m "$module" "$@"
