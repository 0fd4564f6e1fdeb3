#!/usr/bin/env bash
# Train segvit_jax on a Cloud TPU VM slice (one host or a pod slice of many), one step per
# subcommand:
#
#   launch/tpu_vm.sh create --project=P --zone=Z --name=N --accelerator_type=v4-32 [--spot]
#   launch/tpu_vm.sh setup  --project=P --zone=Z --name=N [--pretrained=FILE.npz]
#   launch/tpu_vm.sh run    --project=P --zone=Z --name=N --config=configs/ade20k_large.py \
#       --workdir=gs://BUCKET/runs/ade20k_large --data_dir=gs://BUCKET/tfds [--config.key=value ...]
#   launch/tpu_vm.sh logs   --project=P --zone=Z --name=N
#   launch/tpu_vm.sh delete --project=P --zone=Z --name=N
#
# Add --dry-run to any of them to print the commands (one a line, quoted for bash) instead of
# running them. Run with --help for every flag.
set -euo pipefail

PROG=tpu_vm.sh
readonly REMOTE_ARCHIVE=segvit_jax_code.tar.gz

usage() {
  cat <<EOF
Usage: launch/${PROG} COMMAND --project=PROJECT --zone=ZONE --name=NAME [flags]

Commands (run in this order):
  create   request the slice as a queued resource and wait until it is ACTIVE
           (needs --accelerator_type; --runtime_version, --spot optional)
  status   print the queued resource (its state.state is ACTIVE once the slice is up)
  setup    copy the code to every worker, create a Python venv there and install
           requirements.txt and requirements-tpu.txt (libtpu) into it (run again after
           changing the code); --pretrained copies ImageNet ViT weights to every worker
  run      start segvit_jax.main in the background on every worker (needs --config, --workdir;
           --data_dir and --config.key=value overrides optional); one log file per worker
  logs     follow the log of worker 0 (or --worker=N); Ctrl-C stops following, not training
  stop     send SIGTERM to segvit_jax.main on every worker (it saves a checkpoint and exits)
  delete   delete the queued resource and its TPU VMs (billing stops)

Flags:
  --project=PROJECT            Google Cloud project (required)
  --zone=ZONE                  zone of the slice, e.g. us-central2-b (required)
  --name=NAME                  name of the queued resource and of its TPU node (required)
  --accelerator_type=TYPE      e.g. v4-32, v5litepod-16, v5p-32, v6e-16 (required by create)
  --runtime_version=VERSION    TPU software version; default from the accelerator type:
                               v2/v3/v4: tpu-ubuntu2204-base, v5e: v2-alpha-tpuv5-lite,
                               v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e
  --spot                       request Spot VMs (cheaper, can be preempted)
  --poll_seconds=S             create: seconds between state checks (default 30)
  --python=PYTHON              setup: interpreter for the venv (default python3.11)
  --remote_dir=DIR             directory on the workers, relative to the home (default segvit_jax)
  --pretrained=FILE            setup: a pretrained backbone (.npz or .pth) to put on every worker
                               as REMOTE_DIR/pretrained/BASENAME; a local file is copied from
                               here, a gs:// file is fetched by each worker. Repeatable. Then run
                               with --config.pretrained_backbone=pretrained/BASENAME
  --config=FILE                run: config file relative to the repository, e.g. configs/X.py
  --workdir=DIR                run: checkpoints and metrics; use gs://BUCKET/... on a multi-host
                               slice (every worker must see the same directory)
  --data_dir=DIR               run: TFDS data directory, e.g. gs://BUCKET/tfds
                               (passed as --config.dataset.data_dir)
  --config.KEY=VALUE           run: config overrides, passed through to segvit_jax.main
  --worker=N                   logs: which worker's log to follow (default 0)
  --dry-run                    print the commands instead of running them
  -h, --help                   this message
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

# Flag values (set by parse_flags).
DRY_RUN=0
PROJECT=''
ZONE=''
NAME=''
ACCELERATOR_TYPE=''
RUNTIME_VERSION=''
SPOT=0
POLL_SECONDS=30
PYTHON=python3.11
REMOTE_DIR=segvit_jax
CONFIG=''
WORKDIR=''
DATA_DIR=''
WORKER=0
CONFIG_OVERRIDES=()
PRETRAINED=()

# set_flag NAME VALUE: one --NAME=VALUE flag.
set_flag() {
  case "$1" in
    --project) PROJECT=$2 ;;
    --zone) ZONE=$2 ;;
    --name) NAME=$2 ;;
    --accelerator_type) ACCELERATOR_TYPE=$2 ;;
    --runtime_version) RUNTIME_VERSION=$2 ;;
    --poll_seconds) POLL_SECONDS=$2 ;;
    --python) PYTHON=$2 ;;
    --remote_dir) REMOTE_DIR=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --data_dir) DATA_DIR=$2 ;;
    --worker) WORKER=$2 ;;
    --pretrained) PRETRAINED+=("$2") ;;
    *) usage_error "unknown flag $1" ;;
  esac
}

# parse_flags ARGS...: accepts --flag=value and --flag value.
parse_flags() {
  while (( $# )); do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --dry-run|--dry_run) DRY_RUN=1 ;;
      --spot) SPOT=1 ;;
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

# The project and zone flags of every gcloud command.
gcloud_location() {
  GCLOUD_LOCATION=(--project="${PROJECT}" --zone="${ZONE}")
}

# default_runtime_version ACCELERATOR_TYPE: the TPU software version for JAX on that TPU family.
default_runtime_version() {
  case "$1" in
    v2-*|v3-*|v4-*) printf 'tpu-ubuntu2204-base' ;;
    v5litepod-*|v5e-*) printf 'v2-alpha-tpuv5-lite' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    *) return 1 ;;
  esac
}

# ssh_workers WORKERS REMOTE_COMMAND: run a shell command on the workers ("all", or an index);
# gcloud runs it on all of them at once.
ssh_workers() {
  local workers=$1 remote_command=$2
  run_cmd gcloud compute tpus tpu-vm ssh "${NAME}" "${GCLOUD_LOCATION[@]}" \
    --worker="${workers}" --command="${remote_command}"
}

cmd_create() {
  require_flag accelerator_type "${ACCELERATOR_TYPE}"
  require_positive_int poll_seconds "${POLL_SECONDS}"
  local runtime_version=${RUNTIME_VERSION}
  if [[ -z "${runtime_version}" ]]; then
    runtime_version=$(default_runtime_version "${ACCELERATOR_TYPE}") || usage_error \
      "no default TPU software version for --accelerator_type=${ACCELERATOR_TYPE}:" \
      "pass --runtime_version"
  fi
  local create=(gcloud compute tpus queued-resources create "${NAME}" --node-id="${NAME}"
    "${GCLOUD_LOCATION[@]}" --accelerator-type="${ACCELERATOR_TYPE}"
    --runtime-version="${runtime_version}")
  if (( SPOT )); then
    create+=(--spot)
  fi
  run_cmd "${create[@]}"
  wait_until_active
}

# wait_until_active: poll the queued resource's state; fail on a state it cannot leave.
wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "${NAME}" "${GCLOUD_LOCATION[@]}"
    --format='value(state.state)')
  if (( DRY_RUN )); then
    printf '# every %s s until it prints ACTIVE:\n' "${POLL_SECONDS}"
    run_cmd "${describe[@]}"
    return
  fi
  local state='' previous=''
  while true; do
    state=$("${describe[@]}")
    if [[ "${state}" != "${previous}" ]]; then
      info "queued resource ${NAME}: ${state}"
      previous=${state}
    fi
    case "${state}" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDING|SUSPENDED|DELETING)
        fail "queued resource ${NAME} is ${state}: see 'launch/${PROG} status', then delete it" ;;
      *) ;;  # CREATING, ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING: still on its way
    esac
    sleep "${POLL_SECONDS}"
  done
}

cmd_status() {
  run_cmd gcloud compute tpus queued-resources describe "${NAME}" "${GCLOUD_LOCATION[@]}"
}

# The files setup copies to the workers (relative to the repository).
readonly CODE_MEMBERS=(segvit_jax configs requirements.txt requirements-tpu.txt)

cmd_setup() {
  local member file
  for member in "${CODE_MEMBERS[@]}"; do
    [[ -e "${REPO_ROOT}/${member}" ]] || fail "${REPO_ROOT}/${member} not found"
  done
  for file in "${PRETRAINED[@]}"; do
    [[ "${file}" == gs://* || -f "${file}" ]] \
      || usage_error "--pretrained=${file}: no such file (give a local file or gs://BUCKET/FILE)"
  done
  local archive="${TMPDIR:-/tmp}/segvit_jax_code_${NAME}.tar.gz"
  local dir
  dir=$(shell_quote "${REMOTE_DIR}")
  # The old code goes first so that deleted files do not linger; the venv, logs and pretrained/
  # stay.
  local remote="mkdir -p ${dir}/pretrained && rm -rf ${dir}/segvit_jax ${dir}/configs"
  remote+=" && tar -xzf ${REMOTE_ARCHIVE} -C ${dir} && rm -f ${REMOTE_ARCHIVE} && cd ${dir}"
  remote+=" && if ! command -v ${PYTHON} > /dev/null; then sudo apt-get update -qq"
  remote+=" && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
  remote+=" ${PYTHON} ${PYTHON}-venv; fi"
  remote+=" && if [ ! -x .venv/bin/python ]; then ${PYTHON} -m venv .venv; fi"
  remote+=" && .venv/bin/pip install -q --upgrade pip"
  # requirements-tpu.txt holds the libtpu that the pinned jax's [tpu] extra names.
  remote+=" && .venv/bin/pip install -q -r requirements.txt -r requirements-tpu.txt"
  remote+=" && .venv/bin/python -c"
  remote+=" \"import jax, flax, optax, orbax.checkpoint, tensorflow_datasets\""
  for file in "${PRETRAINED[@]}"; do
    if [[ "${file}" == gs://* ]]; then  # each worker reads the bucket itself
      remote+=" && gcloud storage cp $(shell_quote "${file}") $(shell_quote "pretrained/${file##*/}")"
    fi
  done
  remote+=" && echo \"segvit_jax environment ready on \$(hostname)\""

  run_cmd tar -czf "${archive}" -C "${REPO_ROOT}" --exclude=__pycache__ --exclude='*.pyc' \
    "${CODE_MEMBERS[@]}"
  run_cmd gcloud compute tpus tpu-vm scp "${archive}" "${NAME}:${REMOTE_ARCHIVE}" \
    "${GCLOUD_LOCATION[@]}" --worker=all
  ssh_workers all "${remote}"
  for file in "${PRETRAINED[@]}"; do
    if [[ "${file}" != gs://* ]]; then
      run_cmd gcloud compute tpus tpu-vm scp "${file}" \
        "${NAME}:${REMOTE_DIR}/pretrained/${file##*/}" "${GCLOUD_LOCATION[@]}" --worker=all
    fi
  done
  for file in "${PRETRAINED[@]}"; do
    info "run with --config.pretrained_backbone=pretrained/${file##*/} to start from ${file}"
  done
}

cmd_run() {
  require_flag config "${CONFIG}"
  require_flag workdir "${WORKDIR}"
  # Only the repository travels to the workers, so the config must be one of its files.
  require_repo_config "${CONFIG}" "${REPO_ROOT}"
  if [[ "${WORKDIR}" != gs://* ]]; then
    info "warning: --workdir=${WORKDIR} is not on GCS; on a multi-host slice every worker must" \
      "read and write the same workdir (checkpoints), so use gs://BUCKET/..."
  fi
  local main=(.venv/bin/python -m segvit_jax.main --config="${CONFIG}" --workdir="${WORKDIR}")
  if [[ -n "${DATA_DIR}" ]]; then
    main+=(--config.dataset.data_dir="${DATA_DIR}")
  fi
  main+=("${CONFIG_OVERRIDES[@]}")

  local dir
  dir=$(shell_quote "${REMOTE_DIR}")
  # $(hostname), $(cat ...) and $! are for the worker's shell, not this one.
  # shellcheck disable=SC2016
  local log='"logs/main-$(hostname).log"'
  # shellcheck disable=SC2016
  local running='[ -f logs/main.pid ] && kill -0 "$(cat logs/main.pid)" 2> /dev/null'
  local remote="cd ${dir} && mkdir -p logs && if ${running}; then"
  # shellcheck disable=SC2016
  remote+=' echo "segvit_jax.main is already running on $(hostname): stop it first" >&2; exit 1; fi'
  remote+=" && { nohup $(join_quoted "${main[@]}") >> ${log} 2>&1 < /dev/null &"
  # shellcheck disable=SC2016
  remote+=' echo $! > logs/main.pid; }'
  ssh_workers all "${remote}"
  if (( ! DRY_RUN )); then
    info "started on every worker; follow worker 0 with: launch/${PROG} logs" \
      "--project=${PROJECT} --zone=${ZONE} --name=${NAME}"
  fi
}

cmd_logs() {
  [[ "${WORKER}" =~ ^[0-9]+$ ]] \
    || usage_error "--worker must be a worker index (0, 1, ...), got '${WORKER}'"
  local dir
  dir=$(shell_quote "${REMOTE_DIR}")
  # shellcheck disable=SC2016
  ssh_workers "${WORKER}" "tail -n 200 -F ${dir}/\"logs/main-\$(hostname).log\""
}

cmd_stop() {
  local dir
  dir=$(shell_quote "${REMOTE_DIR}")
  # shellcheck disable=SC2016
  # shellcheck disable=SC2016
  local kill_main='kill "$(cat logs/main.pid)" 2> /dev/null || true'
  ssh_workers all "cd ${dir} && if [ -f logs/main.pid ]; then ${kill_main}; fi"
}

cmd_delete() {
  # --force also deletes the TPU VMs of the queued resource; --quiet skips the confirmation.
  run_cmd gcloud compute tpus queued-resources delete "${NAME}" "${GCLOUD_LOCATION[@]}" \
    --force --quiet
}

main() {
  if (( $# == 0 )); then
    usage >&2
    exit 2
  fi
  local command=$1
  shift
  case "${command}" in
    -h|--help|help) usage; exit 0 ;;
    create|status|setup|run|logs|stop|delete) ;;
    *) usage_error "unknown command '${command}'" \
      "(expected create, status, setup, run, logs, stop or delete)" ;;
  esac
  parse_flags "$@"
  require_flag project "${PROJECT}"
  require_flag zone "${ZONE}"
  require_flag name "${NAME}"
  if (( ${#CONFIG_OVERRIDES[@]} )) && [[ "${command}" != run ]]; then
    usage_error "--config.* overrides only apply to 'run', got ${CONFIG_OVERRIDES[0]}"
  fi
  if (( ${#PRETRAINED[@]} )) && [[ "${command}" != setup ]]; then
    usage_error "--pretrained only applies to 'setup' (then run with" \
      "--config.pretrained_backbone=pretrained/FILE)"
  fi
  gcloud_location
  "cmd_${command}"
}

main "$@"
