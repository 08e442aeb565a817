#!/usr/bin/env bash
# GPU VM launcher (Compute Engine, one or several hosts): create the VMs, copy this checkout to each, install
# the GPU requirements, run a command on every host at once (multi-host JAX: host 0 coordinates), read the
# logs, delete the VMs.
#
#   launch/gpu_vm.sh [--dry-run] create|copy|setup|logs|delete
#   launch/gpu_vm.sh [--dry-run] run -- python -m s3_jax.train --config configs/s3_qwen7b.py:8-3-3 --workdir DIR
#
# Settings come from the environment (no secrets in this file; gcloud uses its own login):
#   GPU_HOSTS (required: VM names, space- or comma-separated; the first coordinates), ZONE (required),
#   PROJECT (default: gcloud's), MACHINE_TYPE (a3-highgpu-8g), ACCELERATOR (type=nvidia-h100-80gb,count=8),
#   IMAGE_FAMILY (common-cu124-debian-11), IMAGE_PROJECT (deeplearning-platform-release), DISK_GB (500),
#   REMOTE_DIR (s3_jax), COORDINATOR_PORT (8476), CREATE_RETRIES (5), RETRY_SECONDS (60).
# With several hosts, `run` sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID on each
# (s3_jax.sharding.maybe_initialize_distributed passes them to jax.distributed.initialize).
# --dry-run prints every command (one per line, shell-quoted) instead of running it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"
parse_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}

: "${GPU_HOSTS:?set GPU_HOSTS (VM names, the first coordinates)}"
: "${ZONE:?set ZONE}"
read -r -a HOSTS <<< "${GPU_HOSTS//,/ }"
MACHINE_TYPE="${MACHINE_TYPE:-a3-highgpu-8g}"
ACCELERATOR="${ACCELERATOR:-type=nvidia-h100-80gb,count=8}"
IMAGE_FAMILY="${IMAGE_FAMILY:-common-cu124-debian-11}"
IMAGE_PROJECT="${IMAGE_PROJECT:-deeplearning-platform-release}"
DISK_GB="${DISK_GB:-500}"
REMOTE_DIR="${REMOTE_DIR:-s3_jax}"
COORDINATOR_PORT="${COORDINATOR_PORT:-8476}"
CREATE_RETRIES="${CREATE_RETRIES:-5}"
RETRY_SECONDS="${RETRY_SECONDS:-60}"

compute() {
  local project=()
  if [[ -n "${PROJECT:-}" ]]; then project=(--project="$PROJECT"); fi
  run gcloud compute "$@" --zone="$ZONE" ${project[@]+"${project[@]}"}
}

on_host() {
  compute ssh "$1" --command="$2"
}

case "$VERB" in
  create)
    for host in "${HOSTS[@]}"; do
      retry "$CREATE_RETRIES" "$RETRY_SECONDS" "create $host" \
        compute instances create "$host" --machine-type="$MACHINE_TYPE" --accelerator="$ACCELERATOR" \
        --image-family="$IMAGE_FAMILY" --image-project="$IMAGE_PROJECT" --boot-disk-size="${DISK_GB}GB" \
        --maintenance-policy=TERMINATE --metadata=install-nvidia-driver=True
    done
    ;;
  copy)
    archive="${TMPDIR:-/tmp}/s3_jax_checkout.tar.gz"
    run git -C "$ROOT" archive --format=tar.gz --output="$archive" HEAD
    for host in "${HOSTS[@]}"; do
      compute scp "$archive" "$host:s3_jax_checkout.tar.gz"
      on_host "$host" "mkdir -p $REMOTE_DIR && tar -xzf s3_jax_checkout.tar.gz -C $REMOTE_DIR"
    done
    ;;
  setup)
    for host in "${HOSTS[@]}"; do
      on_host "$host" "cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install --quiet -r requirements-gpu.txt && .venv/bin/pip install --quiet --no-deps -r requirements-assets.txt && .venv/bin/pip install --quiet --no-deps -e ."
    done
    ;;
  run)
    if [[ "${1:-}" == "--" ]]; then shift; fi
    if (($# == 0)); then usage_error "$0 run -- COMMAND..."; fi
    command="$(quoted "$@")"
    for i in "${!HOSTS[@]}"; do
      env_vars=""
      if ((${#HOSTS[@]} > 1)); then
        env_vars="JAX_COORDINATOR_ADDRESS=${HOSTS[0]}:$COORDINATOR_PORT JAX_NUM_PROCESSES=${#HOSTS[@]} JAX_PROCESS_ID=$i "
      fi
      on_host "${HOSTS[$i]}" "cd $REMOTE_DIR && ${REMOTE_ENV}source .venv/bin/activate && ${env_vars}nohup ${command} > run.log 2>&1 &"
    done
    ;;
  logs)
    on_host "${HOSTS[${HOST_INDEX:-0}]}" "tail -n ${LINES:-100} $REMOTE_DIR/run.log"
    ;;
  delete)
    compute instances delete "${HOSTS[@]}" --quiet
    ;;
  *)
    usage_error "$0 [--dry-run] create|copy|setup|run -- CMD...|logs|delete"
    ;;
esac
