#!/usr/bin/env bash
# Launch launchers/train.py with the DeepSpeed launcher: one node, or several via a hostfile.
#
#   launchers/run_deepspeed.sh [options] [--] TRAIN_ARGS...
#
# Options:
#   --num-gpus N             ranks on this node (single node; default: every visible GPU)
#   --hostfile FILE          multi-node: lines "HOSTNAME slots=N" (validated before launch)
#   --launcher pdsh|openmpi  how DeepSpeed reaches the other nodes (default: pdsh, over ssh)
#   --node-rank R            no ssh: start only node R's ranks (run once on every node)
#   --master-addr ADDR       rendezvous host (default: $MASTER_ADDR, else the hostfile's first)
#   --master-port PORT       rendezvous port (default: $MASTER_PORT, else 29500)
#   --dry-run                print the command instead of running it
# Over ssh (a hostfile without --node-rank), every node is first waited for until it accepts
# ssh, up to SSH_WAIT seconds (default 60).
# TRAIN_ARGS go to launchers/train.py unchanged, e.g.
#   --deepspeed ds_configs/zero2.json --config configs/paper_qwen2_1.5b.yaml train.lr=1e-4
set -euo pipefail
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

num_gpus="" hostfile="" launcher="pdsh" node_rank=""
master_addr="${MASTER_ADDR:-}" master_port="${MASTER_PORT:-29500}"
while (($#)); do
  case "$1" in
    --num-gpus) num_gpus="${2:?--num-gpus needs a value}"; shift 2 ;;
    --hostfile) hostfile="${2:?--hostfile needs a value}"; shift 2 ;;
    --launcher) launcher="${2:?--launcher needs a value}"; shift 2 ;;
    --node-rank) node_rank="${2:?--node-rank needs a value}"; shift 2 ;;
    --master-addr) master_addr="${2:?--master-addr needs a value}"; shift 2 ;;
    --master-port) master_port="${2:?--master-port needs a value}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
require_int --master-port "$master_port"
case "$launcher" in pdsh | openmpi) ;; *) die "--launcher must be pdsh or openmpi, got '$launcher'" ;; esac

cmd=(deepspeed --master_port "$master_port")
if [[ -n "$hostfile" ]]; then
  read -r hosts slots host_list < <(validate_hostfile "$hostfile") || exit 2
  read -r -a names <<<"$host_list"
  [[ -n "$master_addr" ]] || master_addr="${names[0]}"
  cmd+=(--hostfile "$hostfile" --master_addr "$master_addr")
  if [[ -n "$node_rank" ]]; then
    require_int --node-rank "$node_rank"
    ((node_rank < hosts)) || die "--node-rank $node_rank but the hostfile lists $hosts node(s)"
    cmd+=(--no_ssh --node_rank "$node_rank")
  else
    cmd+=(--launcher "$launcher")
  fi
  echo "hostfile $hostfile: $hosts node(s), $slots rank(s), master $master_addr:$master_port" >&2
  if [[ -z "$node_rank" && "${DRY_RUN:-0}" != 1 ]]; then
    require_int SSH_WAIT "${SSH_WAIT:-60}"
    wait_for_ssh "${SSH_WAIT:-60}" "${names[@]}"
  fi
else
  [[ -z "$node_rank" ]] || die "--node-rank needs --hostfile (it names the nodes)"
  if [[ -n "$num_gpus" ]]; then
    require_int --num-gpus "$num_gpus"
    cmd+=(--num_gpus "$num_gpus")
  fi
  [[ -z "$master_addr" ]] || cmd+=(--master_addr "$master_addr")
fi
run_or_print "${cmd[@]}" "$TRAIN_PY" "$@"
