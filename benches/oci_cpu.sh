#!/usr/bin/env bash
# CPU per GiB of ferry's oci:// path against its s3:// path, in one run: a
# push of the same image to the OCI Object Storage double
# (tests/support/oci_double.py) and to SeaweedFS, both on 127.0.0.1, each
# timed with /usr/bin/time (ferry's own user + system CPU; the servers'
# is not counted), the image in the page cache before every run. The
# oci:// path is measured with the default reader (mmap) and with pread;
# the s3:// path with its default CRC64NVME header, and with the SHA-256
# signed payload that OCI's S3-compatible endpoint gets by default. Runs
# alternate, so a noisy neighbour hits every path alike.
#
#   bash benches/oci_cpu.sh                 # 4 GiB, 2 runs of each
#   SIZE_GIB=1 RUNS=3 bash benches/oci_cpu.sh
#
# Data goes under bench-out/oci (the image, the double's and SeaweedFS's
# stores: three copies of the image at most). Prints a table; it also goes
# to bench-out/oci/cpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
out="$root/bench-out/oci"
size_gib="${SIZE_GIB:-4}"
runs="${RUNS:-2}"
s3_port="${S3_PORT:-18833}"
mkdir -p "$out"

tests/support/seaweedfs.sh install
[ -x /usr/bin/time ] || { apt-get update -qq && apt-get install -y -qq time; }
cargo build --release --quiet
ferry="$root/target/release/ferry"

image="$out/image-${size_gib}g.img"
if [ "$(stat -c %s "$image" 2>/dev/null || echo 0)" != "$((size_gib << 30))" ]; then
  echo "making $image ($size_gib GiB of random bytes)"
  head -c "$((size_gib << 30))" /dev/urandom > "$image"
fi
sync "$image"   # its pages written back before the first run (ferry writes back before it releases)

export AWS_ACCESS_KEY_ID=ferrybench AWS_SECRET_ACCESS_KEY=ferrybenchsecret AWS_REGION=us-east-1
weed_dir="$out/weed"
double_pid=""
cleanup() {
  [ -n "$double_pid" ] && kill "$double_pid" 2>/dev/null || true
  tests/support/seaweedfs.sh stop "$weed_dir" 2>/dev/null || true
}
trap cleanup EXIT
tests/support/seaweedfs.sh stop "$weed_dir" 2>/dev/null || true
rm -rf "$weed_dir" "$out/double-data"
mkdir -p "$weed_dir" "$out/double-data"
tests/support/seaweedfs.sh start "$weed_dir" "$s3_port"
tests/support/seaweedfs.sh bucket "$s3_port" ferry-bench

# An API key, a profile holding it, and the double knowing its public half.
key="$out/oci_api_key.pem"
[ -f "$key" ] || openssl genrsa -out "$key" 2048 2>/dev/null
chmod 600 "$key"
openssl rsa -in "$key" -pubout -out "$out/oci_api_key.pub.pem" 2>/dev/null
tenancy=ocid1.tenancy.oc1..aaaaaaaabench user=ocid1.user.oc1..aaaaaaaabench fp=12:34:56:78:9a:bc:de:f0:12:34:56:78:9a:bc:de:f0
cat > "$out/oci-config" <<EOF
[DEFAULT]
user=$user
fingerprint=$fp
key_file=$key
tenancy=$tenancy
region=us-ashburn-1
EOF
cat > "$out/double.json" <<EOF
{"namespace": "benchns", "buckets": ["images"], "data_dir": "$out/double-data",
 "keys": {"$tenancy/$user/$fp": "$out/oci_api_key.pub.pem"}}
EOF
oci_port=$((s3_port + 100))
.venv-test/bin/python3 tests/support/oci_double.py "$oci_port" "$out/double.json" > "$out/double.out" &
double_pid=$!
for _ in $(seq 1 100); do grep -q ready "$out/double.out" 2>/dev/null && break; sleep 0.1; done
grep -q ready "$out/double.out" || { echo "the OCI double did not start" >&2; exit 1; }

config() { # $1: extra [transfer] lines
  cat <<EOF
[transfer]
part_size = "64MiB"
$1
[destinations.oci]
url = "oci://images/bench/"
region = "us-ashburn-1"
endpoint = "http://127.0.0.1:$oci_port"
config_file = "$out/oci-config"

[destinations.s3]
url = "s3://ferry-bench/bench/"
endpoint = "http://127.0.0.1:$s3_port"
EOF
}
config "" > "$out/ferry.toml"
config 'reader = "pread"' > "$out/ferry-pread.toml"
config 'payload_checksum = "sha256"' > "$out/ferry-sha256.toml"

results="$out/results.tsv"
: > "$results"
measure() { # $1: label, $2: config, $3: destination
  local t="$out/time.txt"
  # In the page cache for every run: ferry releases an image's pages once
  # shipped (daemon.keep_cache), and a read from the disk is not the path's.
  cat "$image" > /dev/null
  /usr/bin/time -f "%U %S %e" -o "$t" "$ferry" push --force "$image" --config "$2" --to "$3" \
    > "$out/push.log" 2>&1 || { cat "$out/push.log" >&2; exit 1; }
  read -r user sys wall < "$t"
  printf '%s\t%s\t%s\t%s\n' "$1" "$user" "$sys" "$wall" >> "$results"
  printf '%-22s user %6ss  sys %6ss  wall %6ss\n' "$1" "$user" "$sys" "$wall"
}
for run in $(seq 1 "$runs"); do
  echo "run $run of $runs"
  measure "oci:// (CRC32C)" "$out/ferry.toml" oci
  measure "oci:// (CRC32C, pread)" "$out/ferry-pread.toml" oci
  measure "s3:// (CRC64NVME)" "$out/ferry.toml" s3
  measure "s3:// (SHA-256)" "$out/ferry-sha256.toml" s3
done

python3 - "$results" "$size_gib" "$runs" <<'EOF' | tee "$out/cpu.md"
import sys, statistics
rows, gib, runs = sys.argv[1], float(sys.argv[2]), sys.argv[3]
by = {}
for line in open(rows):
    label, user, sys_, wall = line.rstrip("\n").split("\t")
    by.setdefault(label, []).append((float(user), float(sys_), float(wall)))
med = lambda v, i: statistics.median(x[i] for x in v) / gib
cpu = lambda v: statistics.median(u + s for u, s, _ in v) / gib
base = cpu(by["oci:// (CRC32C)"])
print(f"\n{gib:g} GiB push, median of {runs} run(s); ferry's CPU (the servers' not counted)\n")
print("| path | user s/GiB | system s/GiB | CPU s/GiB | CPU vs oci:// | wall s/GiB |")
print("|---|---|---|---|---|---|")
for label, v in by.items():
    print(f"| {label} | {med(v, 0):.2f} | {med(v, 1):.2f} | {cpu(v):.2f} | {cpu(v) / base:.2f}x | {med(v, 2):.2f} |")
EOF
