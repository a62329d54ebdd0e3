#!/usr/bin/env bash
# Builds ferry's Debian package and prints its path (the last line):
# target/debian/ferry_VERSION-1_ARCH.deb. Needs cargo-deb (`cargo install
# cargo-deb`), gzip and sed; run it from anywhere, as yourself.
#
# cargo-deb packages what Cargo.toml's [package.metadata.deb] lists. What comes
# from the code or from config/ferry.toml, rather than being kept by hand, is
# made here first, under target/deb-assets/:
#   man/*.1.gz, completions/  by `ferry assets` (clap_mangen, clap_complete), the
#                             pages gzipped as Debian wants them (-9, no name or time)
#   ferry.toml                config/ferry.toml with the spool, the state and the
#                             example file:// destinations under /var
#   changelog                 one entry for Cargo.toml's version (Debian wants one)
#
# CARGO names the cargo to run (default: cargo), e.g. a wrapper that takes a lock.
set -euo pipefail

cd "$(dirname "$0")/.."
cargo=${CARGO:-cargo}
target_dir=${CARGO_TARGET_DIR:-target}
# Cargo.toml names these paths relative to the crate, whatever the target dir.
assets=target/deb-assets

if ! "$cargo" deb --version >/dev/null 2>&1; then
    echo "build-deb: cargo-deb is missing: cargo install cargo-deb" >&2
    exit 1
fi

"$cargo" build --release --locked --bin ferry
ferry="$target_dir/release/ferry"

rm -rf "$assets"
mkdir -p "$assets"
"$ferry" assets "$assets"
[ -s "$assets/man/ferry.1" ] || { echo "build-deb: ferry assets wrote no man/ferry.1" >&2; exit 1; }
gzip -9n "$assets"/man/*.1

# The packaged config: config/ferry.toml with absolute paths the unit may write
# (ReadWritePaths=/var/spool/ferry /var/lib/ferry), and a header that says so.
# Each path must have been replaced, so that a change to config/ferry.toml cannot
# leave a relative path in /etc/ferry/ferry.toml unnoticed.
packaged="$assets/ferry.toml"
sed -e 's|^spool_dir = "\./spool"|spool_dir = "/var/spool/ferry"|' \
    -e 's|^state_dir = "\./var/state"|state_dir = "/var/lib/ferry"|' \
    -e 's|"file://\./var/regions/|"file:///var/lib/ferry/regions/|' \
    -e 's|^# ferry.s configuration\. This file is also the embedded default:.*|# ferry'"'"'s configuration, installed by the ferry package: config/ferry.toml of the|' \
    -e 's|^# and .ferry push. without --config behave exactly as if this file were given\.$|# source, with the spool, the state and the example destinations under /var.|' \
    config/ferry.toml >"$packaged"
for want in '^spool_dir = "/var/spool/ferry"' '^state_dir = "/var/lib/ferry"' '"file:///var/lib/ferry/regions/'; do
    grep -q "$want" "$packaged" || { echo "build-deb: config/ferry.toml changed: no $want in $packaged" >&2; exit 1; }
done
if grep -nE '^[a-z_]+ = "\./|"file://\.' "$packaged" >&2; then
    echo "build-deb: $packaged keeps a relative path (above)" >&2
    exit 1
fi

# The changelog: the version cargo-deb gives the package (Cargo.toml's, revision
# 1), dated by the commit built so that two builds of it are the same.
version=$(sed -n '/^\[package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
maintainer=$(sed -n '/^\[package\.metadata\.deb\]/,/^\[/s/^maintainer = "\(.*\)"$/\1/p' Cargo.toml)
if [ -z "$version" ] || [ -z "$maintainer" ]; then
    echo "build-deb: no version or maintainer in Cargo.toml" >&2
    exit 1
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
cat >"$assets/changelog" <<EOF
ferry ($version-1) unstable; urgency=medium

  * Built from commit $commit; the changes are in the git history.

 -- $maintainer  $(LC_ALL=C date -u -R -d "@$epoch")
EOF

# Older packages go, so that the README's `apt install ./target/debian/ferry_*.deb`
# takes this one alone. --strip: the release profile keeps line tables for
# backtraces in development; the package ships a stripped binary, as Debian wants.
rm -f "$target_dir"/debian/ferry_*.deb
deb=$("$cargo" deb --no-build --locked --strip | tail -n 1)
[ -f "$deb" ] || { echo "build-deb: cargo deb printed no package path (got: $deb)" >&2; exit 1; }
echo "$deb"
