#!/usr/bin/env bash
# Launch launchers/train.py with torchrun: one node (--standalone) or one call per node.
#
#   launchers/run_torchrun.sh [options] [--] TRAIN_ARGS...
#
# Options:
#   --nproc-per-node N   ranks on this node (default: 1)
#   --nnodes M           nodes in the job (default: 1 = --standalone, a free local port)
#   --node-rank R        this node's index in [0, M) (multi-node; run once on every node)
#   --master-addr ADDR   node 0's address (multi-node; default: $MASTER_ADDR)
#   --master-port PORT   rendezvous port (default: $MASTER_PORT, else 29500)
#   --dry-run            print the command instead of running it
set -euo pipefail
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

nproc=1 nnodes=1 node_rank="${NODE_RANK:-}"
master_addr="${MASTER_ADDR:-}" master_port="${MASTER_PORT:-29500}"
while (($#)); do
  case "$1" in
    --nproc-per-node) nproc="${2:?--nproc-per-node needs a value}"; shift 2 ;;
    --nnodes) nnodes="${2:?--nnodes needs a value}"; shift 2 ;;
    --node-rank) node_rank="${2:?--node-rank needs a value}"; shift 2 ;;
    --master-addr) master_addr="${2:?--master-addr needs a value}"; shift 2 ;;
    --master-port) master_port="${2:?--master-port needs a value}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) sed -n '2,13p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
require_int --nproc-per-node "$nproc"
require_int --nnodes "$nnodes"
require_int --master-port "$master_port"

cmd=(torchrun --nproc_per_node "$nproc")
if ((nnodes == 1)); then
  cmd+=(--standalone)
else
  [[ -n "$node_rank" ]] || die "--nnodes $nnodes needs --node-rank (or NODE_RANK)"
  [[ -n "$master_addr" ]] || die "--nnodes $nnodes needs --master-addr (or MASTER_ADDR)"
  require_int --node-rank "$node_rank"
  ((node_rank < nnodes)) || die "--node-rank $node_rank is not in [0, $nnodes)"
  cmd+=(--nnodes "$nnodes" --node_rank "$node_rank"
    --master_addr "$master_addr" --master_port "$master_port")
fi
run_or_print "${cmd[@]}" "$TRAIN_PY" "$@"
