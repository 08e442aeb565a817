# Shared by the launch scripts (sourced, not run): argument parsing, dry-run aware command execution,
# retries, remote environment.
# shellcheck shell=bash

# parse_args "$@": DRY_RUN (1 after a leading --dry-run, else 0), VERB (the next word) and ARGS (the rest).
# shellcheck disable=SC2034  # VERB and ARGS are read by the sourcing script
parse_args() {
  DRY_RUN=0
  if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
  fi
  VERB="${1:-}"
  if (($#)); then shift; fi
  ARGS=("$@")
}

# Runs a command, or with DRY_RUN=1 prints it (one line, shell-quoted) instead.
run() {
  if ((DRY_RUN)); then
    printf '%q ' "$@" | sed 's/ $//'
    printf '\n'
  else
    "$@"
  fi
}

# retry ATTEMPTS SECONDS WHAT COMMAND...: runs COMMAND until it succeeds, at most ATTEMPTS times, SECONDS
# apart; fails naming WHAT.
retry() {
  local attempts="$1" seconds="$2" what="$3" attempt
  shift 3
  for ((attempt = 1; attempt <= attempts; attempt++)); do
    if "$@"; then
      return 0
    fi
    echo "$what failed (attempt $attempt of $attempts); retrying in $seconds s" >&2
    sleep "$seconds"
  done
  echo "could not $what after $attempts attempts" >&2
  return 1
}

# The words of a command as one shell-quoted string (to run inside a remote shell).
quoted() {
  local words
  words="$(printf '%q ' "$@")"
  printf '%s' "${words% }"
}

# Prefix of every remote command: loads ~/.s3_jax_env when present (launch/services.sh push-token writes
# S3_JAX_AUTH_TOKEN there), so secrets reach the hosts without appearing in any command line or file here.
# shellcheck disable=SC2034  # used by the sourcing scripts
REMOTE_ENV='if [ -f ~/.s3_jax_env ]; then . ~/.s3_jax_env; fi; '

usage_error() {
  echo "usage: $*" >&2
  exit 2
}
