#!/usr/bin/env bash
# make package: build mosix_<version>_<arch>.deb with dpkg-deb (no network, no
# packaging tool beyond dpkg itself).
#
# It holds the binaries, the CRIU >= 4.2 that `make setup` built (as
# /usr/lib/mosix/criu: Debian 12's own criu fails on current kernels), the
# systemd units for mosixd and mos-balance, a commented /etc/mosix/mosixd.toml
# and man pages generated from each command's --help. Maintainer scripts:
# packaging/debian/ (postinst makes the state directory; postrm purge removes
# everything the package or mosix created).
#
# usage: scripts/package.sh [--debug] [--no-build] [--out DIR]
#   --debug     package target/debug (the integration test does, to save a release build)
#   --no-build  package the binaries already built
#   --out DIR   where the .deb goes [target/debian]
# Prints the .deb's path on its last line.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PROFILE=release
BUILD=1
OUT="$ROOT/target/debian"
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) PROFILE=debug ;;
    --no-build) BUILD=0 ;;
    --out) OUT="$2"; shift ;;
    *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
say() { echo "[package] $*" >&2; }

# The commands a node needs (mosjob and mosbench are test and benchmark tools).
BINS=(mosixd mosix-init mosix-watchdog mosctl mosrun mosmake mosmake-sh mos-balance mosmon mosgw)

cd "$ROOT"
if [ "$BUILD" = 1 ]; then
  flag=(); [ "$PROFILE" = release ] && flag=(--release)
  say "cargo build ${flag[*]} --bins"
  cargo build "${flag[@]}" --bins >&2
fi
BIN_DIR="$ROOT/target/$PROFILE"
for b in "${BINS[@]}"; do
  [ -x "$BIN_DIR/$b" ] || { echo "package.sh: $BIN_DIR/$b is missing (build first)" >&2; exit 1; }
done

CRIU="$(cat "$ROOT/.cache/criu/path" 2>/dev/null || true)"
[ -n "$CRIU" ] && [ -x "$CRIU" ] || { echo "package.sh: no CRIU recorded in .cache/criu/path: run make setup" >&2; exit 1; }
criu_version="$("$CRIU" --version | sed -n 's/^Version: *//p' | head -1)"
case "$criu_version" in
  4.[2-9]*|4.[1-9][0-9]*|[5-9].*) ;;
  *) echo "package.sh: $CRIU is version $criu_version; mosix needs >= 4.2" >&2; exit 1 ;;
esac

VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
ARCH="$(dpkg --print-architecture)"
NAME="mosix_${VERSION}_${ARCH}"
STAGE="$OUT/$NAME"
rm -rf "$STAGE"
mkdir -p "$STAGE/DEBIAN" "$STAGE/usr/bin" "$STAGE/usr/lib/mosix" "$STAGE/lib/systemd/system" \
         "$STAGE/etc/mosix" "$STAGE/usr/share/man/man1" "$STAGE/usr/share/doc/mosix"

for b in "${BINS[@]}"; do
  install -m 0755 -s "$BIN_DIR/$b" "$STAGE/usr/bin/$b"
done
install -m 0755 "$CRIU" "$STAGE/usr/lib/mosix/criu"
install -m 0644 packaging/mosixd.service packaging/mos-balance.service "$STAGE/lib/systemd/system/"
install -m 0644 packaging/mosixd.toml "$STAGE/etc/mosix/mosixd.toml"
install -m 0644 README.md ARCHITECTURE.md "$STAGE/usr/share/doc/mosix/"
cat > "$STAGE/usr/share/doc/mosix/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: mosix

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.

Files: usr/lib/mosix/criu
Copyright: CRIU authors (criu $criu_version, built from Debian's source archive with mosix's scripts/criu-patches)
License: GPL-2
 On Debian systems the full text is in /usr/share/common-licenses/GPL-2.
COPYRIGHT

# Man pages from --help: the help text is the documentation, kept verbatim.
roff_escape() { sed -e 's/\\/\\e/g' -e "s/^\([.']\)/\\\\\&\1/"; }
manpage() {
  local b="$1" upper about
  upper="$(echo "$b" | tr '[:lower:]' '[:upper:]')"
  about="$("$BIN_DIR/$b" --help 2>/dev/null | head -1 || true)"
  {
    echo ".TH \"$upper\" 1 \"\" \"mosix $VERSION\" \"mosix\""
    echo ".SH NAME"
    echo "$b \\- $(echo "${about:-part of mosix}" | roff_escape)"
    echo ".SH DESCRIPTION"
    echo ".nf"
    "$BIN_DIR/$b" --help 2>&1 | roff_escape || true
    # Subcommands (mosctl, mos-balance): each one's --help too.
    local subs
    subs="$("$BIN_DIR/$b" --help 2>/dev/null | awk '/^Commands:/{on=1;next} on&&/^$/{on=0} on{print $1}' | grep -v '^help$' || true)"
    for s in $subs; do
      echo ".fi"
      echo ".SH \"$upper $(echo "$s" | tr '[:lower:]' '[:upper:]')\""
      echo ".nf"
      "$BIN_DIR/$b" "$s" --help 2>&1 | roff_escape || true
    done
    echo ".fi"
    echo ".SH SEE ALSO"
    echo "/usr/share/doc/mosix/README.md"
  } | gzip -9n > "$STAGE/usr/share/man/man1/$b.1.gz"
}
for b in "${BINS[@]}"; do manpage "$b"; done

# Depends: the packages that hold the shared libraries the binaries and CRIU use.
deps="$(for f in "$STAGE"/usr/bin/* "$STAGE/usr/lib/mosix/criu"; do ldd "$f" 2>/dev/null; done \
  | awk '$2=="=>" && $3 ~ /^\// {print $3}' | sort -u \
  | while read -r lib; do
      dpkg -S "$lib" 2>/dev/null || dpkg -S "$(readlink -f "$lib")" 2>/dev/null || true
    done | cut -d: -f1 | sort -u | paste -sd, | sed 's/,/, /g')"

SIZE="$(du -sk "$STAGE" | cut -f1)"
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: mosix
Version: $VERSION
Architecture: $ARCH
Maintainer: mosix developers <mosix@localhost>
Installed-Size: $SIZE
Depends: ${deps}, iproute2, util-linux
Section: admin
Priority: optional
Description: MOSIX for today's Linux: process migration across a cluster, no kernel patch
 A set of Linux machines behaves like one big machine for long-running work:
 the mosixd agent on every node runs jobs, measures load and moves jobs
 between nodes with CRIU (live migration: memory, open files, listening
 sockets); mos-balance spreads the load. Includes mosrun, mosctl, mosmon,
 mosmake, mosgw, and CRIU $criu_version as /usr/lib/mosix/criu.
CONTROL
echo /etc/mosix/mosixd.toml > "$STAGE/DEBIAN/conffiles"
install -m 0755 packaging/debian/postinst packaging/debian/postrm packaging/debian/prerm "$STAGE/DEBIAN/"
( cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | LC_ALL=C sort | xargs md5sum > DEBIAN/md5sums )

DEB="$OUT/$NAME.deb"
dpkg-deb --root-owner-group -Zgzip -z6 --build "$STAGE" "$DEB" >&2
rm -rf "$STAGE"
say "built $DEB ($(du -h "$DEB" | cut -f1)); install with: apt-get install $DEB"
echo "$DEB"
