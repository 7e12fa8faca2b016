#!/usr/bin/env bash
# Builds the Debian package tenantd_<version>_<arch>.deb and prints its path last.
#
#   ./scripts/package.sh [--binary <path>] [--out <dir>]
#
# It builds the release binary (or takes --binary's), stages the package's tree under <dir>
# (default target/debian) and builds it with `dpkg-deb`, which every Debian system has. In it:
# /usr/bin/tenantd, the systemd unit, the commented env file /etc/tenantd/tenantd.env (a
# conffile: an upgrade never overwrites an edited one), the maintainer scripts, the README and
# the documents it links to.
# Needs dpkg-dev (dpkg-shlibdeps computes the libraries it depends on).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'package: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

binary=
out=target/debian
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
for tool in dpkg-deb dpkg-shlibdeps strip; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing: apt install dpkg-dev"
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
[ -n "$version" ] || die "no version in Cargo.toml"
if [ -z "$binary" ]; then
  say "building the release binary"
  cargo build --release --locked --bin tenantd >&2
  binary=target/release/tenantd
fi
[ -x "$binary" ] || die "$binary is not an executable"

name=tenantd_${version}_${arch}
stage=$out/$name
say "staging $stage"
rm -rf "$stage"
mkdir -p "$stage/DEBIAN"
install -D -m 0755 "$binary" "$stage/usr/bin/tenantd"
# As dh_strip does: debugging sections out (a debug build shrinks ~10x), symbols kept.
strip --strip-debug "$stage/usr/bin/tenantd"
install -D -m 0644 scripts/debian/tenantd.service "$stage/usr/lib/systemd/system/tenantd.service"
install -D -m 0600 scripts/debian/tenantd.env "$stage/etc/tenantd/tenantd.env"
install -D -m 0644 README.md "$stage/usr/share/doc/tenantd/README.md"
# What the README links to, at the same relative paths.
install -D -m 0644 ARCHITECTURE.md "$stage/usr/share/doc/tenantd/ARCHITECTURE.md"
install -D -m 0644 -t "$stage/usr/share/doc/tenantd/docs" docs/*.md
license=$(sed -n 's/^license = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
printf 'tenantd\nLicense: %s\n' "$license" >"$stage/usr/share/doc/tenantd/copyright"
for script in postinst prerm postrm; do
  install -m 0755 "scripts/debian/$script" "$stage/DEBIAN/$script"
done
echo /etc/tenantd/tenantd.env >"$stage/DEBIAN/conffiles"

# The libraries the binary links, as Debian package versions (libc6, libgcc-s1).
shlibs=$(mktemp -d)
trap 'rm -rf "$shlibs"' EXIT
mkdir "$shlibs/debian"
printf 'Source: tenantd\n\nPackage: tenantd\nArchitecture: any\n' >"$shlibs/debian/control"
binary_path=$(realpath "$stage/usr/bin/tenantd")
depends=$(cd "$shlibs" && dpkg-shlibdeps -O "$binary_path" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$depends" ] || die "dpkg-shlibdeps found no dependencies for $binary"

size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
maintainer=${TENANTD_DEB_MAINTAINER:-tenantd maintainers <tenantd@localhost>}
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@SIZE@|$size|" \
  -e "s|@DEPENDS@|$depends|" -e "s|@MAINTAINER@|$maintainer|" \
  scripts/debian/control >"$stage/DEBIAN/control"

deb=$out/$name.deb
# xz, dpkg-deb's default; DPKG_DEB_COMPRESSOR_TYPE=gzip makes a quick one (the tests do).
dpkg-deb --root-owner-group --build "$stage" "$deb" >&2
say "built $deb"
realpath "$deb"
