#!/usr/bin/env bash
# Shared helpers of the hmora-ds launch scripts (sourced, never run).

# The repository root, whatever the caller's working directory.
HMORA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TRAIN_PY="${HMORA_ROOT}/launchers/train.py"
PYTHON="${PYTHON:-python}"

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

# validate_hostfile FILE: every non-blank, non-comment line must read "HOSTNAME slots=N" (the
# format DeepSpeed, pdsh and OpenMPI share); hosts must be unique. Prints "HOSTS SLOTS NAME..."
# (host count, total slots, the host names in file order) on success; exits 2 naming the bad
# line otherwise.
validate_hostfile() {
  local file="$1" line n=0 hosts=0 slots=0 host count
  local -a names=()
  local -A seen=()
  [[ -f "$file" ]] || die "hostfile '$file' does not exist"
  while IFS= read -r line || [[ -n "$line" ]]; do
    n=$((n + 1))
    line="${line%%#*}"                        # strip comments
    line="${line#"${line%%[![:space:]]*}"}"   # trim leading blanks
    line="${line%"${line##*[![:space:]]}"}"   # trim trailing blanks
    [[ -z "$line" ]] && continue
    if [[ ! "$line" =~ ^([A-Za-z0-9][A-Za-z0-9._-]*)[[:space:]]+slots=([1-9][0-9]*)$ ]]; then
      die "hostfile '$file' line $n: '$line' is malformed; expected 'HOSTNAME slots=N' (N >= 1)"
    fi
    host="${BASH_REMATCH[1]}"
    count="${BASH_REMATCH[2]}"
    [[ -n "${seen[$host]:-}" ]] && die "hostfile '$file' line $n: host '$host' is listed twice"
    seen[$host]=1
    names+=("$host")
    hosts=$((hosts + 1))
    slots=$((slots + count))
  done <"$file"
  ((hosts > 0)) || die "hostfile '$file' names no host; expected lines 'HOSTNAME slots=N'"
  printf '%s %s %s\n' "$hosts" "$slots" "${names[*]}"
}

# wait_for_ssh SECONDS HOST...: wait until every host accepts ssh (key only, no prompt), up to
# SECONDS in all; a node whose sshd is still starting (a container, a node just booted) is
# waited for instead of failing DeepSpeed's one-shot reachability check. Exits 2 naming the
# host that never answered.
wait_for_ssh() {
  local limit="$1" host waited=0 said=""
  shift
  for host in "$@"; do
    until ssh -o BatchMode=yes -o ConnectTimeout=5 "$host" true >/dev/null 2>&1; do
      if ((waited >= limit)); then
        die "node '$host' is not reachable over ssh after ${limit} s (try: ssh $host true); \
SSH_WAIT=N waits longer"
      fi
      [[ -n "$said" ]] || { echo "waiting for ssh on $host (up to ${limit} s)" >&2; said=1; }
      sleep 2
      waited=$((waited + 2))
    done
  done
}

# require_int NAME VALUE: VALUE must be a non-negative integer.
require_int() {
  [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"
}

# run_or_print CMD...: print the command (shell-quoted, to stderr); run it unless DRY_RUN=1.
run_or_print() {
  {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  } >&2
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    return 0
  fi
  exec "$@"
}
