# shellcheck shell=bash
# Container engine helpers, sourced by docker/build.sh and tests/test_image.py.
#
# IMAGE_ENGINE=docker|buildah|podman picks the engine; otherwise: docker when its engine answers,
# else buildah (building) / podman (running), Debian's packages, as root. buildah and podman
# share one image store, so an image built by one is run by the other.

die() {
  echo "error: $*" >&2
  exit 1
}

# The engine that builds images.
build_engine() {
  if [[ -n "${IMAGE_ENGINE:-}" ]]; then
    echo "$IMAGE_ENGINE"
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    echo docker
  elif command -v buildah >/dev/null 2>&1; then
    echo buildah
  elif command -v podman >/dev/null 2>&1; then
    echo podman
  else
    die "no image builder: install Docker, or (Debian, as root) apt-get install buildah podman \
runc debootstrap (make image-cpu does this itself when run as root)"
  fi
}

# The engine that runs containers (buildah builds but does not run images with an entry point).
run_engine() {
  if [[ -n "${IMAGE_ENGINE:-}" && "${IMAGE_ENGINE}" != buildah ]]; then
    echo "$IMAGE_ENGINE"
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    echo docker
  elif command -v podman >/dev/null 2>&1; then
    echo podman
  else
    die "no container runtime: install Docker, or (Debian, as root) apt-get install podman runc \
(make image-test does this itself when run as root)"
  fi
}

image_exists() { # ENGINE IMAGE
  case "$1" in
    docker) docker image inspect "$2" >/dev/null 2>&1 ;;
    buildah) buildah inspect --type image "$2" >/dev/null 2>&1 ;;
    podman) podman image exists "$2" ;;
  esac
}

image_size() { # ENGINE IMAGE -> bytes
  case "$1" in
    docker) docker image inspect --format '{{.Size}}' "$2" ;;
    *) podman image inspect --format '{{.Size}}' "$2" 2>/dev/null \
      || buildah inspect --type image --format '{{.ImageSize}}' "$2" 2>/dev/null || echo 0 ;;
  esac
}

# Flags podman needs on this host, printed as "GLOBAL_FLAGS|RUN_FLAGS". A root podman inside a
# VM or a sandbox can lack CAP_SYS_RESOURCE (podman's default rlimits cannot be set) or sit on a
# hybrid cgroup tree that crun refuses; runc with cgroupfs and the host's own limits works
# there. Each candidate starts `true` from IMAGE once; the first that works is printed.
podman_flags() { # IMAGE
  local nofile nproc runc ulimits candidate
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  [[ "$nproc" == unlimited || "$nproc" -gt 32768 ]] && nproc=32768
  runc="--runtime runc --cgroup-manager cgroupfs"
  ulimits="--ulimit nofile=${nofile}:${nofile} --ulimit nproc=${nproc}:${nproc}"
  for candidate in "|" "${runc}|" "${runc}|${ulimits}"; do
    # shellcheck disable=SC2086
    if podman ${candidate%%|*} run --rm ${candidate#*|} --entrypoint true "$1" >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  die "podman cannot start a container from $1 here (tried: default, runc + cgroupfs, + the \
host's ulimits); run \`podman run --rm --entrypoint true $1\` to see why"
}
