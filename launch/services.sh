#!/usr/bin/env bash
# The retriever and generator services on named hosts: start them (each on its own GPUs), wait until their
# Health answers, read their logs, stop them. A host is a GPU VM name (reached with gcloud compute ssh, its
# checkout set up by launch/gpu_vm.sh copy + setup) or `local` (this checkout).
#
#   launch/services.sh [--dry-run] start|wait|logs|stop [retriever|generator]   (default: both configured)
#   launch/services.sh [--dry-run] push-token   # $S3_JAX_AUTH_TOKEN -> ~/.s3_jax_env on the service hosts
#                                                 # and CLIENT_HOSTS (the training VMs, comma-separated)
#
# Settings come from the environment (no secrets in this file):
#   RETRIEVER_HOST, GENERATOR_HOST  where each service runs (a VM name or `local`; unset: not managed)
#   ZONE (required for VM hosts), PROJECT (default: gcloud's), REMOTE_DIR (s3_jax: the checkout on a VM)
#   RETRIEVER_INDEX  index folder on the retriever host (python -m s3_jax.index build); a dense index is
#                    sharded over the visible GPUs by FAISS when faiss-gpu is installed
#   RETRIEVER_PORT (50051), RETRIEVER_GPUS (e.g. 0,1: CUDA_VISIBLE_DEVICES of the retriever; empty: all)
#   GENERATOR_MODEL  HF folder or asset:NAME on the generator host (e.g. a Qwen2.5-14B-Instruct-GPTQ folder)
#   GENERATOR_BACKEND (vllm), GENERATOR_PORT (50052), GENERATOR_GPUS (e.g. 2,3,4,5), GENERATOR_TP (tensor
#   parallel size; default: the number of GENERATOR_GPUS, else 1), GENERATOR_DTYPE (bfloat16),
#   GPU_MEMORY_UTILIZATION (0.85), MAX_MODEL_LEN (8192), MAX_TOKENS (64)
#   BIND (0.0.0.0 on VMs, 127.0.0.1 on local), WAIT_SECONDS (1800), SERVICES_DIR (services: logs and pid
#   files, relative to the checkout), PYTHON (.venv/bin/python)
# A service bound beyond loopback requires S3_JAX_AUTH_TOKEN on its host and on every client host:
# `push-token` writes it to ~/.s3_jax_env there (read by every remote command of these scripts); locally it
# is taken from your environment.
# --dry-run prints every command (one per line, shell-quoted) instead of running it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"
parse_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}

USAGE="$0 [--dry-run] start|wait|logs|stop [retriever|generator] | push-token"
REMOTE_DIR="${REMOTE_DIR:-s3_jax}"
RETRIEVER_PORT="${RETRIEVER_PORT:-50051}"
GENERATOR_PORT="${GENERATOR_PORT:-50052}"
GENERATOR_BACKEND="${GENERATOR_BACKEND:-vllm}"
GENERATOR_DTYPE="${GENERATOR_DTYPE:-bfloat16}"
GPU_MEMORY_UTILIZATION="${GPU_MEMORY_UTILIZATION:-0.85}"
MAX_MODEL_LEN="${MAX_MODEL_LEN:-8192}"
MAX_TOKENS="${MAX_TOKENS:-64}"
WAIT_SECONDS="${WAIT_SECONDS:-1800}"
SERVICES_DIR="${SERVICES_DIR:-services}"
PYTHON="${PYTHON:-.venv/bin/python}"

# on_host HOST COMMAND: runs a shell command in the checkout on HOST (in the home folder with IN_HOME=1).
on_host() {
  local folder="$REMOTE_DIR"
  if [[ "$1" == "local" ]]; then folder="$(quoted "$ROOT")"; fi
  if ((${IN_HOME:-0})); then folder="~"; fi
  if [[ "$1" == "local" ]]; then
    run bash -c "cd $folder && $2"
  else
    : "${ZONE:?set ZONE (the zone of the VM $1)}"
    local project=()
    if [[ -n "${PROJECT:-}" ]]; then project=(--project="$PROJECT"); fi
    run gcloud compute ssh "$1" --zone="$ZONE" ${project[@]+"${project[@]}"} \
      --command="${REMOTE_ENV}cd $folder && $2"
  fi
}

host_of() {
  if [[ "$1" == "retriever" ]]; then printf '%s' "${RETRIEVER_HOST:-}"; else printf '%s' "${GENERATOR_HOST:-}"; fi
}

port_of() {
  if [[ "$1" == "retriever" ]]; then printf '%s' "$RETRIEVER_PORT"; else printf '%s' "$GENERATOR_PORT"; fi
}

# The serve command of a service, its words shell-quoted (run in a subshell: `start` checks its settings).
serve_command() {
  local host bind
  host="$(host_of "$1")"
  if [[ "$host" == "local" ]]; then bind="${BIND:-127.0.0.1}"; else bind="${BIND:-0.0.0.0}"; fi
  if [[ "$1" == "retriever" ]]; then
    quoted "$PYTHON" -m s3_jax.serve retriever --index "$RETRIEVER_INDEX" --host "$bind" --port "$RETRIEVER_PORT"
  else
    local engine=()
    if [[ "$GENERATOR_BACKEND" == "vllm" ]]; then
      local gpu_list=() tp="${GENERATOR_TP:-}"
      if [[ -z "$tp" ]]; then
        read -r -a gpu_list <<< "${GENERATOR_GPUS//,/ }"
        tp="${#gpu_list[@]}"
        if ((tp == 0)); then tp=1; fi
      fi
      engine=(--tensor-parallel "$tp" --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION"
              --max-model-len "$MAX_MODEL_LEN")
    fi
    quoted "$PYTHON" -m s3_jax.serve generator --backend "$GENERATOR_BACKEND" --model "$GENERATOR_MODEL" \
      --dtype "$GENERATOR_DTYPE" --max-tokens "$MAX_TOKENS" --host "$bind" --port "$GENERATOR_PORT" \
      ${engine[@]+"${engine[@]}"}
  fi
}

start() {
  local host gpus="" log="$SERVICES_DIR/$1.log" pid="$SERVICES_DIR/$1.pid"
  host="$(host_of "$1")"
  if [[ "$1" == "retriever" ]]; then : "${RETRIEVER_INDEX:?set RETRIEVER_INDEX (the index folder on $host)}"; fi
  if [[ "$1" == "generator" ]]; then : "${GENERATOR_MODEL:?set GENERATOR_MODEL (the model folder on $host)}"; fi
  if [[ "$1" == "retriever" && -n "${RETRIEVER_GPUS:-}" ]]; then gpus="CUDA_VISIBLE_DEVICES=$RETRIEVER_GPUS "; fi
  if [[ "$1" == "generator" && -n "${GENERATOR_GPUS:-}" ]]; then gpus="CUDA_VISIBLE_DEVICES=$GENERATOR_GPUS "; fi
  on_host "$host" "mkdir -p $(quoted "$SERVICES_DIR") && if [ -f $(quoted "$pid") ] && kill -0 \"\$(cat $(quoted "$pid"))\" 2>/dev/null; then echo '$1 already running on $host'; else ${gpus}nohup $(serve_command "$1") > $(quoted "$log") 2>&1 < /dev/null & echo \$! > $(quoted "$pid"); fi"
}

wait_for() {
  on_host "$(host_of "$1")" "$(quoted "$PYTHON") -m s3_jax.serve wait --$1 127.0.0.1:$(port_of "$1") --timeout $WAIT_SECONDS"
}

stop() {
  local pid="$SERVICES_DIR/$1.pid"
  on_host "$(host_of "$1")" "if [ -f $(quoted "$pid") ]; then kill \"\$(cat $(quoted "$pid"))\" 2>/dev/null || true; rm -f $(quoted "$pid"); fi"
}

logs() {
  on_host "$(host_of "$1")" "tail -n ${LINES:-100} $(quoted "$SERVICES_DIR/$1.log")"
}

# The services a verb acts on: the one named, else every one with a host.
SERVICES=()
case "${1:-}" in
  retriever | generator) SERVICES=("$1") ;;
  "")
    if [[ -n "${RETRIEVER_HOST:-}" ]]; then SERVICES+=(retriever); fi
    if [[ -n "${GENERATOR_HOST:-}" ]]; then SERVICES+=(generator); fi
    ;;
  *) usage_error "$USAGE" ;;
esac
if [[ "$VERB" != "push-token" ]]; then
  if ((${#SERVICES[@]} == 0)); then
    echo "set RETRIEVER_HOST and/or GENERATOR_HOST (a VM name or local)" >&2
    exit 2
  fi
  for service in "${SERVICES[@]}"; do
    if [[ -z "$(host_of "$service")" ]]; then
      echo "set ${service^^}_HOST (a VM name or local) to manage the $service" >&2
      exit 2
    fi
  done
fi

case "$VERB" in
  start)
    for service in "${SERVICES[@]}"; do start "$service"; done
    for service in "${SERVICES[@]}"; do wait_for "$service"; done
    for service in "${SERVICES[@]}"; do
      host="$(host_of "$service")"
      if [[ "$host" == "local" ]]; then host=127.0.0.1; fi
      echo "$service ready: --config.$service.address=$host:$(port_of "$service")"
    done
    ;;
  wait)
    for service in "${SERVICES[@]}"; do wait_for "$service"; done
    ;;
  logs)
    for service in "${SERVICES[@]}"; do logs "$service"; done
    ;;
  stop)
    for service in "${SERVICES[@]}"; do stop "$service"; done
    ;;
  push-token)
    : "${S3_JAX_AUTH_TOKEN:?set S3_JAX_AUTH_TOKEN (it is written to ~/.s3_jax_env on the hosts, never here)}"
    clients="${CLIENT_HOSTS:-}"
    read -r -a hosts <<< "${RETRIEVER_HOST:-} ${GENERATOR_HOST:-} ${clients//,/ }"
    for host in $(printf '%s\n' "${hosts[@]}" | sort -u); do
      if [[ "$host" == "local" ]]; then continue; fi
      # The token travels on ssh's stdin: it never appears in a command line.
      printf 'export S3_JAX_AUTH_TOKEN=%q\n' "$S3_JAX_AUTH_TOKEN" | IN_HOME=1 on_host "$host" "umask 077 && cat > .s3_jax_env"
    done
    ;;
  *)
    usage_error "$USAGE"
    ;;
esac
