#!/usr/bin/env bash
# Launch launchers/train.py with OpenMPI's mpirun; ranks find each other through mpi4py
# (rank, world size, local rank from MPI; rank 0's address broadcast as MASTER_ADDR).
#
#   launchers/run_mpirun.sh [options] [--] TRAIN_ARGS...
#
# Options:
#   --np N             total ranks (default: the hostfile's slots, else 1)
#   --hostfile FILE    lines "HOSTNAME slots=N" (validated; the same file DeepSpeed reads)
#   --master-port PORT rendezvous port exported to every rank (default: $MASTER_PORT or 29500)
#   --dry-run          print the command instead of running it
# Needs: OpenMPI (mpirun) and mpi4py (pip install -c constraints.txt '.[mpi]').
# Exported to every rank: MASTER_PORT, DS_ACCELERATOR, PYTHONPATH, HMORA_CACHE, NCCL_*, and
# anything listed in MPI_EXPORT (space-separated names).
set -euo pipefail
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

np="" hostfile="" master_port="${MASTER_PORT:-29500}"
while (($#)); do
  case "$1" in
    --np) np="${2:?--np needs a value}"; shift 2 ;;
    --hostfile) hostfile="${2:?--hostfile needs a value}"; shift 2 ;;
    --master-port) master_port="${2:?--master-port needs a value}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) sed -n '2,16p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
require_int --master-port "$master_port"
command -v mpirun >/dev/null || [[ "${DRY_RUN:-0}" == 1 ]] ||
  die "mpirun not found: install OpenMPI (apt-get install openmpi-bin libopenmpi-dev)"

cmd=(mpirun --bind-to none --map-by slot)
((EUID == 0)) && cmd+=(--allow-run-as-root)
if [[ -n "$hostfile" ]]; then
  read -r _hosts slots _names < <(validate_hostfile "$hostfile") || exit 2
  cmd+=(--hostfile "$hostfile")
  [[ -n "$np" ]] || np="$slots"
fi
np="${np:-1}"
require_int --np "$np"
export MASTER_PORT="$master_port"
cmd+=(-np "$np" -x MASTER_PORT)
names=(DS_ACCELERATOR PYTHONPATH HMORA_CACHE CUDA_VISIBLE_DEVICES ${MPI_EXPORT:-})
for name in "${names[@]}" $(compgen -e | grep '^NCCL_' || true); do
  [[ -n "${!name+x}" ]] && cmd+=(-x "$name")
done
run_or_print "${cmd[@]}" "$PYTHON" "$TRAIN_PY" "$@"
