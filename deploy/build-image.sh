#!/usr/bin/env bash
# Build the mnist-edge container image with podman on a Debian host with no image registry.
#
#   deploy/build-image.sh [TAG]                 (default TAG: localhost/mnist-edge:latest)
#
# 1. The base image, localhost/mnist-edge-base:bookworm: a Debian bookworm root made by
#    `debootstrap --variant=minbase --include=python3,python3-venv` (Python 3.11), trimmed of
#    documentation, manual pages, locales and apt's package lists, and imported with
#    `podman import`. The root is kept as a tar in $MNIST_EDGE_IMAGE_CACHE (default
#    ~/.cache/mnist-edge/image), so a later run (or a machine whose podman storage was wiped)
#    imports it in seconds instead of running debootstrap again.
# 2. The wheelhouse, built on the host: `pip wheel` of this checkout (the project and its base
#    dependencies, no extras) and pip's wheel. The image build has no network: it installs with
#    --no-index, the dependencies in one layer (reused while they do not change) and the
#    project in the next.
# 3. `podman build --format docker` (podman keeps HEALTHCHECK only in the docker format) of
#    deploy/Dockerfile with BASE=the local base and WHEELS=host-wheels, from a context holding
#    only the wheelhouse and the health check script. OCI labels carry the git revision.
#
# Needs root (debootstrap), podman, runc and debootstrap (`apt-get install podman runc
# debootstrap`), and network to deb.debian.org and PyPI the first time.
# Environment: MNIST_EDGE_IMAGE_CACHE, DEBIAN_MIRROR (default http://deb.debian.org/debian),
# PYTHON (host Python with pip for the wheelhouse; default .venv/bin/python, else python3),
# PODMAN (default: `podman --runtime runc`), MNIST_EDGE_REBUILD_BASE=1 (ignore the cache).
# Prints the image's size (`podman image inspect --format '{{.Size}}'`) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
TAG=${1:-localhost/mnist-edge:latest}
BASE=localhost/mnist-edge-base:bookworm
ARCH=$(dpkg --print-architecture 2>/dev/null || echo amd64)
CACHE=${MNIST_EDGE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mnist-edge/image}
BASE_TAR=$CACHE/bookworm-minbase-python3-$ARCH.tar
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY=${PYTHON:-}
[ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
read -r -a PODMAN <<<"${PODMAN:-podman --runtime runc}"
say() { printf '== %s\n' "$*" >&2; }
die() { printf 'build-image.sh: %s\n' "$*" >&2; exit 2; }
started=$(date +%s)

command -v podman >/dev/null || die "podman is missing: apt-get install podman runc debootstrap"

# -- 1. base image ----------------------------------------------------------------------
if [ "${MNIST_EDGE_REBUILD_BASE:-0}" = 1 ]; then
  rm -f "$BASE_TAR"
  "${PODMAN[@]}" image rm -f "$BASE" >/dev/null 2>&1 || true
fi
if ! "${PODMAN[@]}" image exists "$BASE"; then
  if [ ! -s "$BASE_TAR" ]; then
    [ "$(id -u)" = 0 ] || die "building the base image needs root (debootstrap): run as root, or put a cached $BASE_TAR in place"
    command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
    mkdir -p "$CACHE"
    root=$(mktemp -d "$CACHE/root.XXXXXX")
    trap 'rm -rf "$root" "$BASE_TAR.tmp"' EXIT
    say "debootstrap: Debian bookworm minbase + python3, python3-venv ($MIRROR; log: $CACHE/debootstrap.log)"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$MIRROR" \
      >"$CACHE/debootstrap.log" 2>&1 || die "debootstrap failed: see $CACHE/debootstrap.log"
    # What a server image never reads. apt and dpkg stay (a derived image can still install
    # packages after `apt-get update`); their downloaded lists and archives go.
    rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
      "$root"/usr/share/locale/* "$root"/usr/share/lintian "$root"/usr/share/common-licenses \
      "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/cache/debconf/*-old \
      "$root"/var/log/* "$root"/debootstrap
    # Fixed timestamps: the same packages give the same tar.
    tar --numeric-owner --sort=name --mtime=@0 -C "$root" -cf "$BASE_TAR.tmp" .
    mv "$BASE_TAR.tmp" "$BASE_TAR"
    rm -rf "$root"
    trap - EXIT
  fi
  say "podman import $BASE_TAR -> $BASE"
  "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' "$BASE_TAR" "$BASE" >/dev/null
fi

# -- 2. wheelhouse (on the host) --------------------------------------------------------------
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/deploy" "$ctx/wheelhouse/deps" "$ctx/wheelhouse/project" "$ctx/wheelhouse/tools"
cp deploy/mnist-edge-healthcheck "$ctx/deploy/"
say "wheelhouse: $PY -m pip wheel . (the project and its base dependencies) and pip's own wheel"
# A fresh build/ : setuptools would package stale files left there by earlier builds.
rm -rf build
quiet() { { grep -v "^WARNING: Location 'file:" || true; } >&2; }
"$PY" -m pip wheel -q --disable-pip-version-check --wheel-dir "$ctx/wheelhouse/deps" . 2>&1 | quiet
# pip runs from its wheel inside the build and never enters the image; the wheel is kept in the
# cache, so later builds need PyPI only for the dependencies (pip's own cache has those).
if ! ls "$CACHE"/pip/pip-*.whl >/dev/null 2>&1; then
  mkdir -p "$CACHE/pip"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --dest "$CACHE/pip" pip 2>&1 | quiet
fi
cp "$(ls "$CACHE"/pip/pip-*.whl | tail -1)" "$ctx/wheelhouse/tools/"
rm -rf build
mv "$ctx"/wheelhouse/deps/mnist_edge-*.whl "$ctx/wheelhouse/project/"
# The image build cannot see what a bind mount holds: these digests (RUN arguments) make a
# changed wheel rebuild its layer, and an unchanged dependency set reuse its layer.
digest() { (cd "$1" && sha256sum ./*.whl | sha256sum | cut -c1-64); }
deps_sha=$(digest "$ctx/wheelhouse/deps")
project_sha=$(digest "$ctx/wheelhouse/project")

# -- 3. the image -----------------------------------------------------------------------
revision=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$revision" != unknown ] && [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  revision="$revision-dirty"
fi
source_url=$(git -C "$REPO" config --get remote.origin.url 2>/dev/null || echo "file://$REPO")
version=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
say "podman build $TAG (base $BASE, revision $revision)"
previous=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)
"${PODMAN[@]}" build --format docker --network none --pull-never \
  --build-arg BASE="$BASE" --build-arg WHEELS=host-wheels \
  --build-arg DEPS_SHA256="$deps_sha" --build-arg PROJECT_SHA256="$project_sha" \
  --build-arg REVISION="$revision" --build-arg VERSION="$version" \
  --build-arg SOURCE="$source_url" \
  -f "$REPO/deploy/Dockerfile" -t "$TAG" "$ctx" >&2
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$TAG")
# The image this one replaced, now untagged: its own layers go (shared ones stay as the cache).
current=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$TAG")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  "${PODMAN[@]}" image rm "$previous" >/dev/null 2>&1 || true
fi
# The host-wheels stages (one layer: the wheelhouse COPY'd to /wheels/) are no cache worth keeping.
for id in $("${PODMAN[@]}" image ls --filter dangling=true --format '{{.ID}}'); do
  history=$("${PODMAN[@]}" image inspect --format '{{len .RootFS.Layers}}|{{range .History}}{{.CreatedBy}}{{end}}' "$id" 2>/dev/null || true)
  case $history in
    "1|/bin/sh -c #(nop) COPY dir:"*" in /wheels/ ") "${PODMAN[@]}" image rm "$id" >/dev/null 2>&1 || true ;;
  esac
done
say "built $TAG in $(( $(date +%s) - started )) s: .Size $size bytes"
echo "$TAG"
