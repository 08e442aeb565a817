#!/usr/bin/env bash
# Cloud TPU VM launcher: create a TPU VM (slice), copy this checkout to every worker, install the TPU
# requirements, run a command on all workers at once (multi-host JAX), read the logs, delete the VM.
#
#   launch/tpu_vm.sh [--dry-run] create|copy|setup|logs|delete
#   launch/tpu_vm.sh [--dry-run] run -- python -m s3_jax.train --config configs/s3_qwen7b.py:8-3-3 --workdir DIR
#
# Settings come from the environment (no secrets in this file; gcloud uses its own login):
#   TPU_NAME (required), ZONE (required), PROJECT (default: gcloud's), ACCELERATOR (v5litepod-16),
#   TPU_VERSION (v2-alpha-tpuv5-lite), REMOTE_DIR (s3_jax), CREATE_RETRIES (5), RETRY_SECONDS (60),
#   SPOT=1 for a spot VM. The run's log is REMOTE_DIR/run.log on every worker.
# --dry-run prints every command (one per line, shell-quoted) instead of running it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"
parse_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v5litepod-16}"
TPU_VERSION="${TPU_VERSION:-v2-alpha-tpuv5-lite}"
REMOTE_DIR="${REMOTE_DIR:-s3_jax}"
CREATE_RETRIES="${CREATE_RETRIES:-5}"
RETRY_SECONDS="${RETRY_SECONDS:-60}"

tpu() {
  local verb="$1"
  shift
  local project=()
  if [[ -n "${PROJECT:-}" ]]; then project=(--project="$PROJECT"); fi
  run gcloud compute tpus tpu-vm "$verb" "$@" --zone="$ZONE" ${project[@]+"${project[@]}"}
}

on_all_workers() {
  tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

case "$VERB" in
  create)
    spot=()
    if [[ "${SPOT:-0}" == "1" ]]; then spot=(--spot); fi
    retry "$CREATE_RETRIES" "$RETRY_SECONDS" "create $TPU_NAME" \
      tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$TPU_VERSION" ${spot[@]+"${spot[@]}"}
    ;;
  copy)
    archive="${TMPDIR:-/tmp}/s3_jax_checkout.tar.gz"
    run git -C "$ROOT" archive --format=tar.gz --output="$archive" HEAD
    tpu scp "$archive" "$TPU_NAME:s3_jax_checkout.tar.gz" --worker=all
    on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf s3_jax_checkout.tar.gz -C $REMOTE_DIR"
    ;;
  setup)
    on_all_workers "cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install --quiet -r requirements-tpu.txt && .venv/bin/pip install --quiet --no-deps -r requirements-assets.txt && .venv/bin/pip install --quiet --no-deps -e ."
    ;;
  run)
    if [[ "${1:-}" == "--" ]]; then shift; fi
    if (($# == 0)); then usage_error "$0 run -- COMMAND..."; fi
    command="$(quoted "$@")"
    on_all_workers "cd $REMOTE_DIR && ${REMOTE_ENV}source .venv/bin/activate && S3_JAX_DIST=1 nohup ${command} > run.log 2>&1 &"
    ;;
  logs)
    tpu ssh "$TPU_NAME" --worker="${WORKER:-0}" --command="tail -n ${LINES:-100} $REMOTE_DIR/run.log"
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    usage_error "$0 [--dry-run] create|copy|setup|run -- CMD...|logs|delete"
    ;;
esac
