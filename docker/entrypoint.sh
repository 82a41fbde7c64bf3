#!/usr/bin/env bash
# Container entry point.
#   <train.py arguments>    run launchers/train.py (the default: `docker run IMAGE --config ...`)
#   sshd                    run an ssh server for pdsh / mpirun from another container (foreground)
#   plan ARGS               python -m hmora_ds.plan ARGS
#   any command on PATH     run it (bash, make, deepspeed, torchrun, mpirun, launchers/*.sh ...)
# HMORA_SSHD=1 also starts the ssh server in the background before the command (node 0 of a
# pdsh job must accept ssh from itself). Keys: mount a directory holding id_ed25519 and
# id_ed25519.pub at /run/hmora-ssh (docker/compose.yaml does); it becomes ~/.ssh. Commands run
# over ssh see the container's environment (~/.ssh/environment, PermitUserEnvironment).
set -euo pipefail
cd /workspace/hmora-ds

setup_ssh() {
  local dir="${HOME}/.ssh"
  mkdir -p "$dir" && chmod 700 "$dir"
  if [[ -f /run/hmora-ssh/id_ed25519 ]]; then
    install -m 600 /run/hmora-ssh/id_ed25519 "$dir/id_ed25519"
    install -m 644 /run/hmora-ssh/id_ed25519.pub "$dir/id_ed25519.pub"
    install -m 600 /run/hmora-ssh/id_ed25519.pub "$dir/authorized_keys"
  fi
  [[ -f "$dir/ssh_host_ed25519_key" ]] || ssh-keygen -q -t ed25519 -N '' -f "$dir/ssh_host_ed25519_key"
  cat >"$dir/sshd_config" <<CONF
Port ${SSH_PORT:-2222}
HostKey $dir/ssh_host_ed25519_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PasswordAuthentication no
UsePAM no
PermitUserEnvironment yes
CONF
  cat >"$dir/config" <<CONF
Host *
  Port ${SSH_PORT:-2222}
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
CONF
  chmod 600 "$dir/config"
  # Commands that arrive over ssh (pdsh, mpirun) start with sshd's bare environment: give them
  # the container's own (venv PATH, cache, accelerator, HF / NCCL / DeepSpeed settings).
  env | grep -E '^(PATH|VIRTUAL_ENV|LANG|PYTHONUNBUFFERED|PDSH_RCMD_TYPE)=|^(HMORA_CACHE|DS_|HF_|NCCL_|TORCH_|OMP_|CUDA_|NVIDIA_|TRANSFORMERS_|PIP_)' \
    >"$dir/environment" || true
  chmod 600 "$dir/environment"
}

case "${1:-}" in
  sshd)
    setup_ssh
    exec /usr/sbin/sshd -D -e -f "${HOME}/.ssh/sshd_config"
    ;;
  plan)
    shift
    exec python -m hmora_ds.plan "$@"
    ;;
esac
if [[ "${HMORA_SSHD:-0}" == 1 ]]; then
  setup_ssh
  /usr/sbin/sshd -f "${HOME}/.ssh/sshd_config"
fi
if [[ $# -gt 0 && "$1" != -* ]] && command -v "$1" >/dev/null 2>&1; then
  exec "$@"
fi
exec python launchers/train.py "$@"
