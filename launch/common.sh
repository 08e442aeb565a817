# Shared by the launch scripts (sourced, not run): argument parsing, dry-run aware command execution,
# retries, remote environment.
# shellcheck shell=bash

# parse_args "$@": DRY_RUN (1 when --dry-run is given, before or after the verb), VERB (the first word that
# is not an option) and ARGS (the other words; after `--`, everything as given, `--` included). -h/--help
# prints the script's header comment and exits 0; any other option before `--` is a usage error (exit 2), so
# a mistyped flag never reaches gcloud.
# shellcheck disable=SC2034  # VERB and ARGS are read by the sourcing script
parse_args() {
  DRY_RUN=0
  VERB=""
  ARGS=()
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p;}' "$0"
        exit 0
        ;;
      --)
        ARGS+=("$@")
        break
        ;;
      -*) usage_error "unknown option $1 (see $0 --help)" ;;
      *)
        if [[ -z "$VERB" ]]; then VERB="$1"; else ARGS+=("$1"); fi
        ;;
    esac
    shift
  done
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

# Errors worth retrying: no capacity, quota, or a transient service error (gcloud's wording). Anything else
# (a bad flag, a permission, a name already taken) fails at once.
RETRYABLE='RESOURCE_EXHAUSTED|RESOURCE_POOL_EXHAUSTED|resource pool exhausted|[Nn]o more capacity|capacity|stockout|does not have enough resources|currently unavailable|[Qq]uota|UNAVAILABLE|INTERNAL|[Ii]nternal error|[Tt]ry again|timed out|DEADLINE_EXCEEDED|503|429'

# retry ATTEMPTS SECONDS WHAT COMMAND...: runs COMMAND until it succeeds, at most ATTEMPTS times, SECONDS
# apart, while its error output says the failure can pass (RETRYABLE); fails naming WHAT.
retry() {
  local attempts="$1" seconds="$2" what="$3" attempt errors status
  shift 3
  errors="$(mktemp)"
  # shellcheck disable=SC2064  # the file's name now, on any way out of this function
  trap "rm -f '$errors'; trap - RETURN" RETURN
  for ((attempt = 1; attempt <= attempts; attempt++)); do
    status=0
    "$@" 2> "$errors" || status=$?
    cat "$errors" >&2
    if ((status == 0)); then
      return 0
    fi
    if ! grep -Eq "$RETRYABLE" "$errors"; then
      echo "could not $what: the error is not one that passes with time (capacity, quota, transient); not retried" >&2
      return "$status"
    fi
    if ((attempt < attempts)); then
      echo "$what failed (attempt $attempt of $attempts, can pass); retrying in $seconds s" >&2
      sleep "$seconds"
    fi
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
