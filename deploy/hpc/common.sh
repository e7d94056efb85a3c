# shellcheck shell=bash
# Shared set-up of the sarcube HPC job scripts (sourced by them, not run on its own):
# the Python environment, the S3 credentials, and the run's resume state.
#
# SARCUBE_HOME   the sarcube checkout (on a filesystem every node sees); its .venv is made by
#                tools/bootstrap.sh, i.e. `make test`, once on a login node
# SARCUBE_S3_ENV a private file (chmod 600) with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
#                AWS_ENDPOINT_URL lines, read when present (default ~/.config/sarcube/s3.env);
#                variables already in the job's environment work as well. Never put them in a
#                job script or on a qsub/sbatch command line (both are visible to other users).

SARCUBE_HOME=${SARCUBE_HOME:?set SARCUBE_HOME to the sarcube checkout}
if [ -z "${VIRTUAL_ENV:-}" ]; then
  # shellcheck source=/dev/null
  source "$SARCUBE_HOME/.venv/bin/activate"
fi

SARCUBE_S3_ENV=${SARCUBE_S3_ENV:-$HOME/.config/sarcube/s3.env}
if [ -f "$SARCUBE_S3_ENV" ]; then
  set -a
  # shellcheck source=/dev/null
  source "$SARCUBE_S3_ENV"
  set +a
fi
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
export AWS_EC2_METADATA_DISABLED=${AWS_EC2_METADATA_DISABLED:-true}
export PYTHONUNBUFFERED=1

# --storage-option for the endpoint, when one is set (sarcube also reads AWS_ENDPOINT_URL itself);
# used by the scripts that source this file
# shellcheck disable=SC2034
storage_opts=()
if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
  # shellcheck disable=SC2034
  storage_opts=(--storage-option "endpoint_url=$AWS_ENDPOINT_URL")
fi

# has_checkpoint OUT: true when OUT (local or s3://) already holds checkpoint.pt, i.e. the job
# was requeued or resubmitted: the scripts then pass --resume and the run continues exactly.
has_checkpoint() {
  python - "$1/checkpoint.pt" <<'PY'
import sys

from sarcube.storage import url_to_fs

fs, path = url_to_fs(sys.argv[1])
sys.exit(0 if fs.exists(path) else 1)
PY
}

# mpi_env_args: `-x NAME` for each exported variable the ranks on other nodes need (names only:
# mpirun copies the values from this environment, so no secret appears on a command line)
mpi_env_args() {
  local v
  for v in PATH LD_LIBRARY_PATH VIRTUAL_ENV PYTHONUNBUFFERED MASTER_ADDR MASTER_PORT NNODES \
    GPUS_PER_NODE AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_ENDPOINT_URL \
    AWS_DEFAULT_REGION AWS_EC2_METADATA_DISABLED NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_HCA; do
    if printenv "$v" >/dev/null; then
      printf -- '-x\n%s\n' "$v"
    fi
  done
}
