# Sourced by scripts/demo-kernel.sh and scripts/bench-kernel.sh: the Linux
# source for the article's experiment, and running a command "on" a node of
# a local cluster.
#
# The source is Debian 12's linux-source-6.1 (a 139 MB .deb holding
# /usr/src/linux-source-6.1.tar.xz), fetched once with `apt-get download` and
# kept in .cache/linux-source/ (git-ignored, like CRIU in .cache/criu); the
# tarball is taken out of the .deb there, so later runs only unpack it.

KERNEL_PKG=linux-source-6.1
KERNEL_CACHE="$ROOT/.cache/linux-source"
KERNEL_TARBALL="$KERNEL_CACHE/$KERNEL_PKG.tar.xz"

# Build dependencies of a kernel beyond gcc/make (NOTES.md: flex bison libelf-dev bc).
kernel_deps() {
  local missing=() p
  for p in flex bison libelf-dev bc xz-utils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[kernel] installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# Make sure $KERNEL_TARBALL exists (download the .deb through apt if needed).
kernel_tarball() {
  if [ -s "$KERNEL_TARBALL" ]; then return 0; fi
  mkdir -p "$KERNEL_CACHE"
  local deb
  deb=$(ls "$KERNEL_CACHE"/${KERNEL_PKG}_*_all.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    echo "[kernel] apt-get download $KERNEL_PKG (about 139 MB) into .cache/linux-source/"
    (cd "$KERNEL_CACHE" && apt-get download "$KERNEL_PKG" 2>&1 | grep -v "unsandboxed" || true)
    deb=$(ls "$KERNEL_CACHE"/${KERNEL_PKG}_*_all.deb 2>/dev/null | head -1 || true)
    [ -n "$deb" ] || { echo "[kernel] could not download $KERNEL_PKG" >&2; return 1; }
  fi
  echo "[kernel] taking $KERNEL_PKG.tar.xz out of $(basename "$deb")"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -O "./usr/src/$KERNEL_PKG.tar.xz" >"$KERNEL_TARBALL.part"
  mv "$KERNEL_TARBALL.part" "$KERNEL_TARBALL"
}

# kernel_unpack DIR: put a clean source tree at DIR/$KERNEL_PKG. A tree kept
# by kernel_stash is moved back (a rename) and cleaned with `make mrproper`;
# otherwise the tarball is unpacked (about 15-25 s).
kernel_unpack() {
  mkdir -p "$1"
  if [ -d "$KERNEL_CACHE/tree/$KERNEL_PKG" ] && mv "$KERNEL_CACHE/tree/$KERNEL_PKG" "$1/"; then
    make -C "$1/$KERNEL_PKG" -s mrproper
  else
    tar -C "$1" -xf "$KERNEL_TARBALL"
  fi
}

# kernel_stash DIR: move DIR/$KERNEL_PKG out of a cluster's shared path into
# the cache before `local down` deletes that path: deleting 1.2 GB of small
# files takes minutes on a busy disk, a rename takes nothing, and the next run
# starts from it (kernel_unpack cleans it).
kernel_stash() {
  [ -d "$1/$KERNEL_PKG" ] || return 0
  mkdir -p "$KERNEL_CACHE/tree"
  rm -rf "${KERNEL_CACHE:?}/tree/$KERNEL_PKG"
  mv "$1/$KERNEL_PKG" "$KERNEL_CACHE/tree/" || true
}

# in_node CLUSTER NODE CMD...: become CMD inside the node's network namespace
# and its cpu/cpuacct cgroups, so the node's CPU cap governs it (and mosrun
# finds the node's agent as its home). It moves the current process and
# execs, so call it in a subshell: `(in_node c node1 make)`, or with `&`
# (then $! is CMD's own pid).
in_node() {
  local cluster=$1 node=$2 c
  shift 2
  for c in cpu cpuacct; do
    echo "$BASHPID" >"/sys/fs/cgroup/$c/mosix/$cluster/$node/cgroup.procs"
  done
  exec nsenter --net="/run/netns/mos-$cluster-$node" "$@"
}
