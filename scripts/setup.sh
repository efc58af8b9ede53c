#!/usr/bin/env bash
# make setup: install what mosix needs on a Debian 12 machine, idempotently.
#
# - Debian packages: protoc (tonic build), iproute2 (local cluster), CRIU build deps.
# - CRIU >= 4.2: use the system criu if it is new enough and `criu check` passes,
#   otherwise build 4.2.1 from Debian's source archive into .cache/criu (project-local,
#   never installed over system files). The sha256 of the upstream tarball is verified.
#   The patches in scripts/criu-patches are applied to it (each one says why); a cached
#   build made with other patches is rebuilt. A system CRIU is used as it is.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="$ROOT/.cache/criu"
CRIU_VERSION=4.2.1
CRIU_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
LOCAL_CRIU="$CACHE/criu-$CRIU_VERSION/criu/criu"
PATCH_DIR="$ROOT/scripts/criu-patches"
# What the cached build must have been made with: the patches' digest.
PATCH_STAMP="$CACHE/criu-$CRIU_VERSION/.mosix-patches"
patches_sum() { cat "$PATCH_DIR"/*.patch 2>/dev/null | sha256sum | cut -d' ' -f1; }

say() { echo "[setup] $*"; }

if [ "$(id -u)" != 0 ]; then
  echo "[setup] must run as root (it installs packages and CRIU needs root)" >&2
  exit 1
fi

PKGS=(protobuf-compiler iproute2 build-essential pkg-config make gcc patch
      libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler python3-protobuf
      libnl-3-dev libnet1-dev libcap-dev libaio-dev libgnutls28-dev libbsd-dev
      uuid-dev libnftables-dev util-linux procps xz-utils dpkg-dev
      sshfs openssh-server
      # etcd 3.4 (Debian 12): leases, ownership and fencing (src/coord);
      # `mosctl local up` starts it; etcdctl is for people.
      etcd-server etcd-client
      # Jobs with their own address (issue 18): nft to check that no CRIU
      # network lock is left behind; redis for its migration test.
      nftables redis-server redis-tools)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  say "packages already installed"
fi

# Older versions of this script left a sid deb-src entry in the system's sources:
# remove it, and refresh the lists so that its index files go too.
OLD_SRC_LIST=/etc/apt/sources.list.d/mosix-criu-src.sources
if [ -f "$OLD_SRC_LIST" ] && grep -q '^Suites: sid' "$OLD_SRC_LIST"; then
  say "removing $OLD_SRC_LIST (left by an older make setup)"
  rm -f "$OLD_SRC_LIST"
  apt-get update -qq || true
fi

criu_ok() {
  local bin="$1"
  [ -x "$bin" ] || return 1
  local v
  v="$("$bin" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -1)"
  [ -n "$v" ] || return 1
  local major minor
  major="${v%%.*}"; minor="$(echo "$v" | cut -d. -f2)"
  if [ "$major" -lt 4 ] || { [ "$major" -eq 4 ] && [ "$minor" -lt 2 ]; }; then return 1; fi
  "$bin" check >/dev/null 2>&1
}

# Which criu the project uses is recorded in .cache/criu/path so the Makefile,
# tests and local cluster agree.
mkdir -p "$CACHE"
if criu_ok "$LOCAL_CRIU" && [ "$(cat "$PATCH_STAMP" 2>/dev/null)" = "$(patches_sum)" ]; then
  say "using cached CRIU $CRIU_VERSION at $LOCAL_CRIU"
  echo "$LOCAL_CRIU" > "$CACHE/path"
  exit 0
fi
SYS_CRIU="$(command -v criu || true)"
# A cached build with other patches is rebuilt rather than swapped for the system's.
if [ ! -x "$LOCAL_CRIU" ] && [ -n "$SYS_CRIU" ] && criu_ok "$SYS_CRIU"; then
  say "using system CRIU at $SYS_CRIU"
  echo "$SYS_CRIU" > "$CACHE/path"
  exit 0
fi

say "building CRIU $CRIU_VERSION from Debian's source archive (about 20 s)"
TARBALL="$CACHE/criu_$CRIU_VERSION.orig.tar.xz"
if [ ! -f "$TARBALL" ] || ! echo "$CRIU_SHA256  $TARBALL" | sha256sum -c --quiet - 2>/dev/null; then
  # Fetch the source through a private apt configuration: a deb-src entry for sid
  # using the machine's own Debian mirror (read from its sources, so no registry
  # host is written into this repository), with its own lists and cache under a
  # temporary directory. The system's package sources and lists are never touched.
  URI=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    URI="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
  fi
  if [ -z "$URI" ] && [ -f /etc/apt/sources.list ]; then
    URI="$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list)"
  fi
  [ -n "$URI" ] || { echo "[setup] cannot find the machine's Debian mirror" >&2; exit 1; }
  apt_tmp="$(mktemp -d)"
  trap 'rm -rf "$apt_tmp"' EXIT
  mkdir -p "$apt_tmp/sources.list.d" "$apt_tmp/lists/partial" "$apt_tmp/cache/archives/partial" "$apt_tmp/dl"
  printf 'Types: deb-src\nURIs: %s\nSuites: sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$URI" \
    > "$apt_tmp/sources.list.d/mosix-criu-src.sources"
  APT_PRIVATE=(-o Dir::Etc::sourcelist=/dev/null -o "Dir::Etc::sourceparts=$apt_tmp/sources.list.d"
               -o "Dir::State::lists=$apt_tmp/lists" -o "Dir::Cache=$apt_tmp/cache"
               -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o APT::Sandbox::User=root)
  apt-get "${APT_PRIVATE[@]}" update -qq
  dl="$apt_tmp/dl"
  ( cd "$dl" && apt-get "${APT_PRIVATE[@]}" source --download-only "criu=$CRIU_VERSION-1" >/dev/null 2>&1 || true )
  [ -f "$dl/criu_$CRIU_VERSION.orig.tar.xz" ] || { echo "[setup] could not download criu_$CRIU_VERSION.orig.tar.xz" >&2; exit 1; }
  mv "$dl/criu_$CRIU_VERSION.orig.tar.xz" "$TARBALL"
fi
echo "$CRIU_SHA256  $TARBALL" | sha256sum -c --quiet - || { echo "[setup] sha256 mismatch for $TARBALL" >&2; rm -f "$TARBALL"; exit 1; }
rm -rf "$CACHE/criu-$CRIU_VERSION"
tar -C "$CACHE" -xf "$TARBALL"
for p in "$PATCH_DIR"/*.patch; do
  [ -f "$p" ] || continue
  say "applying $(basename "$p")"
  patch -p1 -s -d "$CACHE/criu-$CRIU_VERSION" <"$p" || { echo "[setup] $p does not apply to CRIU $CRIU_VERSION" >&2; exit 1; }
done
make -C "$CACHE/criu-$CRIU_VERSION" -j"$(nproc)" criu >"$CACHE/build.log" 2>&1 || { tail -30 "$CACHE/build.log"; exit 1; }
criu_ok "$LOCAL_CRIU" || { echo "[setup] built CRIU fails 'criu check'" >&2; "$LOCAL_CRIU" check || true; exit 1; }
patches_sum >"$PATCH_STAMP"
echo "$LOCAL_CRIU" > "$CACHE/path"
say "CRIU $CRIU_VERSION ready at $LOCAL_CRIU"
