#!/usr/bin/env bash
# Submit segvit_jax training to a SLURM GPU cluster: N nodes x G GPUs, one process per node.
#
#   launch/gpu_slurm.sh --nodes=2 --gpus_per_node=8 --config=configs/ade20k_large.py \
#       --workdir=/shared/runs/ade20k_large --data_dir=/shared/tfds [--config.key=value ...]
#
# Add --dry-run to print the commands (one a line, quoted for bash) instead of running them.
set -euo pipefail

PROG=gpu_slurm.sh

usage() {
  cat <<EOF
Usage: launch/${PROG} --nodes=N --gpus_per_node=G --config=FILE --workdir=DIR [flags]
                      [--config.KEY=VALUE ...]

Submits launch/gpu_slurm.sbatch with sbatch; the job starts segvit_jax.main once per node
(jax.distributed over all nodes) and writes its output to LOG_DIR/JOB_NAME-JOBID.out.

Flags:
  --nodes=N              number of nodes (required)
  --gpus_per_node=G      GPUs per node, all used by the node's one process (required)
  --config=FILE          config file relative to the repository, e.g. configs/ade20k_large.py
                         (required)
  --workdir=DIR          checkpoints and metrics, on storage every node sees (required)
  --data_dir=DIR         TFDS data directory (passed as --config.dataset.data_dir)
  --python=PYTHON        interpreter with the requirements installed, on every node
                         (default .venv/bin/python, relative to the repository)
  --port=PORT            coordinator port (default 20000 + job id % 20000)
  --partition=P          sbatch --partition
  --account=A            sbatch --account
  --time=T               sbatch --time, e.g. 2-00:00:00
  --cpus_per_task=C      sbatch --cpus-per-task (input pipeline threads)
  --job_name=NAME        sbatch --job-name (default segvit_jax)
  --log_dir=DIR          where the job's output goes (default REPO/logs)
  --config.KEY=VALUE     config overrides, passed through to segvit_jax.main
  --dry-run              print the commands instead of running them
  -h, --help             this message
EOF
}

# Builtins only from here on (no dirname/realpath): --dry-run must work with an empty PATH.
LAUNCH_DIR=${BASH_SOURCE[0]}
[[ "${LAUNCH_DIR}" == */* ]] || LAUNCH_DIR=./${LAUNCH_DIR}
LAUNCH_DIR=$(CDPATH='' cd -- "${LAUNCH_DIR%/*}" && pwd)
REPO_ROOT=$(CDPATH='' cd -- "${LAUNCH_DIR}/.." && pwd)
readonly LAUNCH_DIR REPO_ROOT
# shellcheck source=launch/lib.sh
source "${LAUNCH_DIR}/lib.sh"

DRY_RUN=0
NODES=''
GPUS_PER_NODE=''
CONFIG=''
WORKDIR=''
DATA_DIR=''
PYTHON=''
PORT=''
PARTITION=''
ACCOUNT=''
TIME_LIMIT=''
CPUS_PER_TASK=''
JOB_NAME=segvit_jax
LOG_DIR=${REPO_ROOT}/logs
CONFIG_OVERRIDES=()

set_flag() {
  case "$1" in
    --nodes) NODES=$2 ;;
    --gpus_per_node) GPUS_PER_NODE=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --data_dir) DATA_DIR=$2 ;;
    --python) PYTHON=$2 ;;
    --port) PORT=$2 ;;
    --partition) PARTITION=$2 ;;
    --account) ACCOUNT=$2 ;;
    --time) TIME_LIMIT=$2 ;;
    --cpus_per_task) CPUS_PER_TASK=$2 ;;
    --job_name) JOB_NAME=$2 ;;
    --log_dir) LOG_DIR=$2 ;;
    *) usage_error "unknown flag $1" ;;
  esac
}

parse_flags() {
  while (( $# )); do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --dry-run|--dry_run) DRY_RUN=1 ;;
      --config.*=*) CONFIG_OVERRIDES+=("$1") ;;
      --config.*)
        [[ $# -ge 2 && "$2" != --* ]] || usage_error "flag $1 needs a value"
        CONFIG_OVERRIDES+=("$1=$2")
        shift ;;
      --*=*) set_flag "${1%%=*}" "${1#*=}" ;;
      --*)
        [[ $# -ge 2 && "$2" != --* ]] || usage_error "flag $1 needs a value"
        set_flag "$1" "$2"
        shift ;;
      *) usage_error "unexpected argument '$1'" ;;
    esac
    shift
  done
}

main() {
  parse_flags "$@"
  require_positive_int nodes "${NODES}"
  require_positive_int gpus_per_node "${GPUS_PER_NODE}"
  require_flag config "${CONFIG}"
  require_flag workdir "${WORKDIR}"
  require_repo_config "${CONFIG}" "${REPO_ROOT}"

  local sbatch=(sbatch --job-name="${JOB_NAME}" --nodes="${NODES}" --ntasks-per-node=1
    --gpus-per-node="${GPUS_PER_NODE}" --chdir="${REPO_ROOT}" --output="${LOG_DIR}/%x-%j.out")
  [[ -z "${PARTITION}" ]] || sbatch+=(--partition="${PARTITION}")
  [[ -z "${ACCOUNT}" ]] || sbatch+=(--account="${ACCOUNT}")
  [[ -z "${TIME_LIMIT}" ]] || sbatch+=(--time="${TIME_LIMIT}")
  [[ -z "${CPUS_PER_TASK}" ]] || sbatch+=(--cpus-per-task="${CPUS_PER_TASK}")

  local job_args=(--config="${CONFIG}" --workdir="${WORKDIR}")
  [[ -z "${DATA_DIR}" ]] || job_args+=(--data_dir="${DATA_DIR}")
  [[ -z "${PYTHON}" ]] || job_args+=(--python="${PYTHON}")
  [[ -z "${PORT}" ]] || job_args+=(--port="${PORT}")
  job_args+=("${CONFIG_OVERRIDES[@]}")

  # SLURM does not create the output directory; without it the job fails without a word.
  run_cmd mkdir -p "${LOG_DIR}"
  run_cmd "${sbatch[@]}" "${LAUNCH_DIR}/gpu_slurm.sbatch" "${job_args[@]}"
}

main "$@"
