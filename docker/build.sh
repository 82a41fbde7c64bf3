#!/usr/bin/env bash
# Build an hmora-ds image with what this machine has (make image-cpu / make image-cuda).
#
#   docker/build.sh cpu  [--tag hmora-ds:cpu]     docker/Dockerfile.cpu
#   docker/build.sh cuda [--tag hmora-ds:cuda]    docker/Dockerfile
#
# Engine: docker when its engine answers, else buildah (IMAGE_ENGINE=docker|buildah|podman
# chooses). Base: BASE_IMAGE when set; else the Dockerfile's default (python:3.11-slim-bookworm,
# nvidia/cuda:...) when it can be pulled; else a Debian bookworm base bootstrapped here from
# Debian's packages (debootstrap + buildah, python3 3.11 from Debian), tagged
# localhost/hmora-ds-base:bookworm and reused by later builds (BASE_REBUILD=1 makes it again).
# NO_CACHE=1 rebuilds every layer (a cold build).
# Proxies: PIP_CERT (or SSL_CERT_FILE), when set, is mounted for pip inside the build.
# Local wheels: when PIP_FIND_LINKS names a directory holding torch's 2.13.0 CPU wheel, the CPU
# build mounts it and installs torch from it (buildah/podman only).
# Prints the image's size and the build time; nothing is baked in but code and packages
# (weights and data are fetched at run time into the cache volume).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=docker/engine.sh
source docker/engine.sh

usage() { echo "usage: docker/build.sh cpu|cuda [--tag NAME]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
flavour=$1
shift
case "$flavour" in
  cpu) dockerfile=docker/Dockerfile.cpu ;;
  cuda) dockerfile=docker/Dockerfile ;;
  *) usage ;;
esac
tag="hmora-ds:${flavour}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tag) tag=${2:?--tag needs a name}; shift 2 ;;
    *) usage ;;
  esac
done

LOCAL_BASE=localhost/hmora-ds-base:bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
engine=$(build_engine)
default_base=$(sed -n 's/^ARG BASE_IMAGE=//p' "$dockerfile")
[[ -n "$default_base" ]] || die "$dockerfile has no 'ARG BASE_IMAGE=<default>' line"

# Debian bookworm (minbase + python3, python3-venv, ca-certificates) as an image.
bootstrap_base() {
  [[ "$(id -u)" == 0 ]] || die "bootstrapping a base image needs root (debootstrap, buildah \
mount); or set BASE_IMAGE to an image with python3 and python3-venv"
  command -v buildah >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 \
    || die "bootstrapping a base image needs buildah and debootstrap: apt-get install buildah \
debootstrap"
  local started ctr mnt
  started=$SECONDS
  echo "build: ${default_base} cannot be pulled; bootstrapping ${LOCAL_BASE} from ${DEBIAN_MIRROR}"
  ctr=$(buildah from scratch)
  # shellcheck disable=SC2064
  trap "buildah rm $ctr >/dev/null 2>&1 || true" EXIT
  mnt=$(buildah mount "$ctr")
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$mnt" "$DEBIAN_MIRROR" >/tmp/hmora-debootstrap.log 2>&1 \
    || die "debootstrap failed (log: /tmp/hmora-debootstrap.log)"
  cat >"$mnt/etc/apt/sources.list" <<SOURCES
deb ${DEBIAN_MIRROR} bookworm main
deb ${DEBIAN_MIRROR} bookworm-updates main
deb ${DEBIAN_SECURITY_MIRROR} bookworm-security main
SOURCES
  rm -rf "$mnt"/var/lib/apt/lists/* "$mnt"/var/cache/apt/archives/*.deb
  buildah umount "$ctr" >/dev/null
  buildah config --env LANG=C.UTF-8 --cmd /bin/bash \
    --label org.opencontainers.image.description="Debian bookworm minbase + python3 (hmora-ds)" \
    "$ctr"
  buildah commit --quiet --rm "$ctr" "$LOCAL_BASE" >/dev/null
  trap - EXIT
  echo "build: ${LOCAL_BASE} bootstrapped in $((SECONDS - started)) s"
}

pick_base() {
  if [[ -n "${BASE_IMAGE:-}" ]]; then
    echo "$BASE_IMAGE"
  elif image_exists "$engine" "$default_base" \
    || timeout 600 "$engine" pull -q "$default_base" >/dev/null 2>&1; then
    echo "$default_base"
  else
    if [[ "${BASE_REBUILD:-0}" == 1 ]] || ! image_exists "$engine" "$LOCAL_BASE"; then
      bootstrap_base >&2
    fi
    echo "$LOCAL_BASE"
  fi
}

base=$(pick_base)
args=(--build-arg "BASE_IMAGE=${base}" -f "$dockerfile" -t "$tag")
if [[ "$flavour" == cpu && "$engine" != docker && -n "${PIP_FIND_LINKS:-}" ]] \
  && compgen -G "${PIP_FIND_LINKS}/torch-2.13.0+cpu-*.whl" >/dev/null; then
  echo "build: torch's CPU wheel from ${PIP_FIND_LINKS} (mounted read-only)"
  args+=(--volume "${PIP_FIND_LINKS}:${PIP_FIND_LINKS}:ro" --build-arg "PIP_FIND_LINKS=${PIP_FIND_LINKS}"
    --build-arg "TORCH_INDEX_URL=https://pypi.org/simple")
fi
# A TLS-intercepting proxy's CA (PIP_CERT / SSL_CERT_FILE on this machine): pip inside the build
# needs it too. Mounted for the build only; the image does not keep it.
ca_bundle=${PIP_CERT:-${SSL_CERT_FILE:-}}
if [[ "$engine" != docker && -n "$ca_bundle" && -f "$ca_bundle" ]]; then
  echo "build: pip trusts ${ca_bundle} during the build (mounted read-only)"
  args+=(--volume "${ca_bundle}:/run/hmora-build-ca.crt:ro" --build-arg PIP_CERT=/run/hmora-build-ca.crt)
fi
[[ "${NO_CACHE:-0}" == 1 ]] && args+=(--no-cache)
case "$engine" in
  # chroot isolation: builds as root inside VMs and sandboxes where runc/crun cannot start
  # containers; --layers keeps the dependency layer across code changes.
  buildah) cmd=(buildah bud --isolation chroot --layers "${args[@]}" .) ;;
  podman) cmd=(podman build --isolation chroot --layers "${args[@]}" .) ;;
  docker) cmd=(docker build "${args[@]}" .) ;;
  *) die "IMAGE_ENGINE=${engine}: expected docker, buildah or podman" ;;
esac
echo "build: ${tag} from ${dockerfile} on ${base} with ${engine}"
started=$SECONDS
"${cmd[@]}"
elapsed=$((SECONDS - started))
size=$(image_size "$engine" "$tag")
awk -v t="$tag" -v e="$elapsed" -v s="$size" -v b="$base" \
  'BEGIN { printf "build: %s built in %d s, %.2f GB (%.0f bytes), base %s\n", t, e, s / 1e9, s, b }'
