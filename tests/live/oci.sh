#!/usr/bin/env bash
# A live smoke test of ferry's oci:// destination, for people who have an OCI
# tenancy. Nothing in `bash tests/run.sh` reaches OCI: the suite runs against a
# test double built from Oracle's API reference (tests/support/oci_double.py).
# This script is what settles the rest against the real service.
#
# It makes a small bootable QCOW2 (the README quick start's recipe, plus 40 MiB
# of random data so that the upload has three parts), pushes it with ferry to
# oci://$OCI_BUCKET/ferry-live-<time>-<pid>/, and then checks with the OCI CLI,
# not with ferry, what landed: the manifest says the server verified the whole
# object's CRC32C; the stored object's CRC32C (`opc-content-crc32c`, computed
# by OCI) is the manifest's; the stored bytes are the file's. The last two
# together show that the manifest's CRC32C is the file's. It deletes every
# object it made when it exits, after a failed check too, and aborts any upload
# left open under its prefix.
#
#   OCI_PROFILE=DEFAULT OCI_BUCKET=scratch OCI_REGION=us-ashburn-1 bash tests/live/oci.sh
#
# Required: OCI_PROFILE (a profile of the OCI CLI's config file, with an API
# key), OCI_BUCKET (an existing bucket), OCI_REGION (an OCI region id).
# Optional: OCI_CONFIG_FILE (default: the OCI CLI's own, ~/.oci/config);
# OCI_NAMESPACE (default: asked with `oci os ns get`; ferry then looks it up
# itself too); FERRY (a ferry binary; default: cargo build --release here).
# Tools: the oci CLI, qemu-img, and jq or python3.
# The profile's user needs `read buckets` and `manage objects` on the bucket's
# compartment (README, "Shipping to Oracle Cloud").
#
# Exit status: 0 every check passed, or skipped because the variables are not
# set; 1 a check failed; 2 a tool or a setting is missing or wrong.
set -euo pipefail

if [[ -z "${OCI_PROFILE:-}" || -z "${OCI_BUCKET:-}" || -z "${OCI_REGION:-}" ]]; then
    echo "skipped: set OCI_PROFILE, OCI_BUCKET and OCI_REGION to run against a real tenancy"
    exit 0
fi

# Random data written into the disk, in MiB, and the part size ferry uses:
# three parts, 16 MiB or more each (OCI documents no minimum part size; 10 MiB
# has been reported, so 16 MiB stays clear of it).
DATA_MIB=40
PART_SIZE=16MiB
# The most objects or open uploads the cleanup handles (it makes two objects).
CLEANUP_MAX=100

die() { # status, message
    echo "oci.sh: $2" >&2
    exit "$1"
}

if ! command -v oci >/dev/null 2>&1; then
    die 2 "the OCI CLI (oci) is not on PATH: install it (pip install oci-cli), set up the profile (oci setup config), and run again"
fi
command -v qemu-img >/dev/null 2>&1 || die 2 "qemu-img is not on PATH: apt-get install qemu-utils"
command -v cmp >/dev/null 2>&1 || die 2 "cmp is not on PATH: apt-get install diffutils"
if command -v jq >/dev/null 2>&1; then
    JSON=jq
elif command -v python3 >/dev/null 2>&1; then
    JSON=python3
else
    die 2 "neither jq nor python3 is on PATH: apt-get install jq"
fi
# OCI's rule for bucket names; anything else would change the URL's meaning.
[[ "$OCI_BUCKET" =~ ^[A-Za-z0-9._-]{1,256}$ ]] ||
    die 2 "OCI_BUCKET=$OCI_BUCKET is not a bucket name (1 to 256 of letters, digits, '-', '_', '.')"
if [[ -n "${OCI_CONFIG_FILE:-}" && ! -r "$OCI_CONFIG_FILE" ]]; then
    die 2 "OCI_CONFIG_FILE=$OCI_CONFIG_FILE cannot be read"
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# The OCI CLI as ferry will sign: the same config file, profile and region,
# and the API key even if OCI_CLI_AUTH says otherwise.
OCI=(oci --auth api_key --profile "$OCI_PROFILE" --region "$OCI_REGION")
if [[ -n "${OCI_CONFIG_FILE:-}" ]]; then
    OCI+=(--config-file "$OCI_CONFIG_FILE")
fi

# json_get FILE PATH: the value at PATH (keys joined by '.') of the JSON in
# FILE, a string as it is and anything else as JSON; nothing when absent, or
# when FILE is empty (the OCI CLI prints nothing for an empty list).
json_get() {
    if [[ $JSON == jq ]]; then
        jq -r --arg p "$2" \
            'getpath($p | split(".")) // empty | if type == "string" then . else tojson end' \
            "$1" 2>/dev/null || true
    else
        python3 - "$1" "$2" <<'PY'
import json, sys
try:
    with open(sys.argv[1]) as f:
        text = f.read()
    v = json.loads(text) if text.strip() else None
    for k in sys.argv[2].split("."):
        v = v.get(k) if isinstance(v, dict) else None
except (OSError, ValueError):
    v = None
if v is not None:
    print(v if isinstance(v, str) else json.dumps(v))
PY
    fi
}

# json_rows FILE FIELD [FIELD2]: one line per element of the JSON's `data`
# list, its FIELD (and FIELD2, after a tab).
json_rows() {
    if [[ $JSON == jq ]]; then
        jq -r --arg a "$2" --arg b "${3:-}" \
            '(.data // [])[] | [.[$a], (if $b == "" then empty else .[$b] end)] | map(tostring) | join("\t")' \
            "$1" 2>/dev/null || true
    else
        python3 - "$1" "$2" "${3:-}" <<'PY'
import json, sys
try:
    with open(sys.argv[1]) as f:
        text = f.read()
    rows = (json.loads(text) if text.strip() else {}).get("data") or []
except (OSError, ValueError, AttributeError):
    rows = []
fields = [a for a in sys.argv[2:] if a]
for r in rows:
    print("\t".join(str(r.get(k)) for k in fields))
PY
    fi
}

# A TOML basic string.
toml_str() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

PASSED=0
FAILED=0
ok() {
    PASSED=$((PASSED + 1))
    echo "ok    $*"
}
fail() {
    FAILED=$((FAILED + 1))
    echo "FAIL  $*"
}

NS=${OCI_NAMESPACE:-}
if [[ -z "$NS" ]]; then
    NS=$("${OCI[@]}" os ns get --query data --raw-output) ||
        die 2 "the OCI CLI could not ask Object Storage for the namespace with profile [$OCI_PROFILE] in $OCI_REGION; fix the profile until \`oci os ns get --profile $OCI_PROFILE\` answers, then run again"
fi

PREFIX="ferry-live-$(date -u +%Y%m%dT%H%M%SZ)-$$"
KEY="$PREFIX/disk.qcow2"
MANIFEST_KEY="$KEY.manifest.json"
WHERE="oci://$OCI_BUCKET/$PREFIX/"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ferry-live-oci.XXXXXX")
SENT=""

# Deletes what this run made under its prefix (objects, and uploads left
# open), whatever happened before; a run that leaves something behind fails.
cleanup() {
    local status=$? rows row name id left
    set +e
    if [[ -n "$SENT" ]]; then
        "${OCI[@]}" os multipart list -ns "$NS" -bn "$OCI_BUCKET" --all >"$WORK/uploads.json" 2>"$WORK/cleanup.err"
        json_rows "$WORK/uploads.json" object upload-id >"$WORK/uploads.txt"
        mapfile -t rows < <(head -n "$CLEANUP_MAX" "$WORK/uploads.txt")
        for row in "${rows[@]}"; do
            name=${row%%$'\t'*}
            id=${row#*$'\t'}
            [[ "$name" == "$PREFIX/"* ]] || continue
            "${OCI[@]}" os multipart abort -ns "$NS" -bn "$OCI_BUCKET" \
                --object-name "$name" --upload-id "$id" --force >/dev/null 2>>"$WORK/cleanup.err"
            echo "      aborted an upload left open: $name"
        done
        "${OCI[@]}" os object list -ns "$NS" -bn "$OCI_BUCKET" --prefix "$PREFIX/" --all \
            >"$WORK/objects.json" 2>>"$WORK/cleanup.err"
        json_rows "$WORK/objects.json" name >"$WORK/objects.txt"
        mapfile -t rows < <(head -n "$CLEANUP_MAX" "$WORK/objects.txt")
        for name in "${rows[@]}"; do
            [[ "$name" == "$PREFIX/"* ]] || continue
            "${OCI[@]}" os object delete -ns "$NS" -bn "$OCI_BUCKET" --name "$name" --force \
                >/dev/null 2>>"$WORK/cleanup.err"
        done
        "${OCI[@]}" os object list -ns "$NS" -bn "$OCI_BUCKET" --prefix "$PREFIX/" --all \
            >"$WORK/objects.json" 2>>"$WORK/cleanup.err"
        left=$(json_rows "$WORK/objects.json" name | head -n "$CLEANUP_MAX")
        if [[ -z "$left" && -s "$WORK/objects.txt" ]]; then
            ok "cleanup: deleted $(wc -l <"$WORK/objects.txt") object(s) under $WHERE"
        elif [[ -z "$left" ]]; then
            ok "cleanup: nothing was left under $WHERE"
        else
            fail "cleanup: still under $WHERE: $(echo "$left" | tr '\n' ' ')(oci os object bulk-delete -ns $NS -bn $OCI_BUCKET --prefix $PREFIX/ removes them)"
            sed 's/^/      | /' "$WORK/cleanup.err" | tail -n 5
        fi
    fi
    rm -rf "$WORK"
    if [[ -n "$SENT" ]]; then
        echo "live oci: $PASSED passed, $FAILED failed"
    fi
    if ((status == 0 && FAILED > 0)); then
        status=1
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ferry: the one given, or built here.
if [[ -n "${FERRY:-}" ]]; then
    [[ -x "$FERRY" ]] || die 2 "FERRY=$FERRY is not an executable file"
else
    command -v cargo >/dev/null 2>&1 || die 2 "cargo is not on PATH: set FERRY to a ferry binary, or install Rust"
    echo "      building ferry (cargo build --release) in $ROOT"
    (cd "$ROOT" && cargo build --release --quiet) || die 1 "cargo build --release failed"
    FERRY="$ROOT/target/release/ferry"
fi

# The image: the quick start's recipe (a boot signature, or ferry refuses the
# disk as OCI would), with random data after the first MiB so that the QCOW2
# holds more than one part.
truncate -s 64M "$WORK/disk.raw"
printf '\125\252' | dd of="$WORK/disk.raw" bs=1 seek=510 conv=notrunc status=none
dd if=/dev/urandom of="$WORK/disk.raw" bs=1M seek=1 count="$DATA_MIB" conv=notrunc status=none
qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$WORK/disk.qcow2"
rm -f "$WORK/disk.raw"
SIZE=$(stat -c %s "$WORK/disk.qcow2")

{
    echo "# Written by tests/live/oci.sh for one run; deleted with it."
    echo "[destinations.live]"
    echo "url = $(toml_str "$WHERE")"
    echo "region = $(toml_str "$OCI_REGION")"
    echo "profile = $(toml_str "$OCI_PROFILE")"
    if [[ -n "${OCI_CONFIG_FILE:-}" ]]; then
        echo "config_file = $(toml_str "$OCI_CONFIG_FILE")"
    fi
    if [[ -n "${OCI_NAMESPACE:-}" ]]; then
        echo "namespace = $(toml_str "$OCI_NAMESPACE")"
    fi
} >"$WORK/ferry.toml"

echo "      pushing disk.qcow2 ($SIZE bytes, $PART_SIZE parts) to $WHERE (namespace $NS, profile [$OCI_PROFILE], $OCI_REGION)"
SENT=1
if (cd "$WORK" && "$FERRY" push "$WORK/disk.qcow2" --config "$WORK/ferry.toml" --to live \
    --part-size "$PART_SIZE" --verify readback --progress-secs 30) >"$WORK/push.log" 2>&1; then
    ok "push: ferry push exited 0 (verify = readback)"
else
    rc=$?
    fail "push: ferry push exited $rc; its last lines:"
    tail -n 20 "$WORK/push.log" | sed 's/^/      | /'
    exit 1
fi

if "${OCI[@]}" os object get -ns "$NS" -bn "$OCI_BUCKET" --name "$MANIFEST_KEY" \
    --file "$WORK/manifest.json" >/dev/null 2>"$WORK/get.err"; then
    ok "manifest: oci os object get fetched $MANIFEST_KEY"
else
    fail "manifest: oci os object get could not fetch $MANIFEST_KEY: $(tail -n 3 "$WORK/get.err" | tr '\n' ' ')"
    exit 1
fi

m_key=$(json_get "$WORK/manifest.json" destination.key)
m_size=$(json_get "$WORK/manifest.json" file_size_bytes)
if [[ "$m_key" == "$KEY" && "$m_size" == "$SIZE" ]]; then
    ok "manifest: names key $KEY and $SIZE bytes"
else
    fail "manifest: names key '$m_key' and '$m_size' bytes; the push was $KEY, $SIZE bytes"
fi

verified=$(json_get "$WORK/manifest.json" server_verified)
case "$verified" in
crc32c-whole-object)
    ok "server_verified: crc32c-whole-object (OCI answered the whole object's CRC32C on commit, and it was ferry's)"
    ;;
crc32c-per-part)
    fail "server_verified: crc32c-per-part: OCI's commit answered no whole-object CRC32C (opc-content-crc32c), against what ferry was built for"
    ;;
*)
    fail "server_verified: '$verified', not crc32c-whole-object"
    ;;
esac

m_crc=$(json_get "$WORK/manifest.json" crc32c_base64)
if "${OCI[@]}" os object head -ns "$NS" -bn "$OCI_BUCKET" --name "$KEY" >"$WORK/head.json" 2>"$WORK/head.err"; then
    s_crc=$(json_get "$WORK/head.json" opc-content-crc32c)
    s_len=$(json_get "$WORK/head.json" content-length)
    if [[ -n "$s_crc" && "$s_crc" == "$m_crc" ]]; then
        ok "stored CRC32C: oci os object head answers opc-content-crc32c $s_crc, the manifest's crc32c_base64"
    elif [[ -z "$s_crc" ]]; then
        fail "stored CRC32C: oci os object head answered no opc-content-crc32c (the manifest says $m_crc)"
    else
        fail "stored CRC32C: oci os object head answers $s_crc, the manifest says $m_crc"
    fi
    if [[ "$s_len" == "$SIZE" ]]; then
        ok "stored size: content-length $s_len, the file's"
    else
        fail "stored size: content-length '$s_len', the file has $SIZE bytes"
    fi
else
    fail "stored CRC32C: oci os object head $KEY failed: $(tail -n 3 "$WORK/head.err" | tr '\n' ' ')"
fi

if "${OCI[@]}" os object get -ns "$NS" -bn "$OCI_BUCKET" --name "$KEY" \
    --file "$WORK/copy.qcow2" >/dev/null 2>"$WORK/get.err"; then
    if cmp -s "$WORK/disk.qcow2" "$WORK/copy.qcow2"; then
        ok "stored bytes: the object, fetched with oci os object get, is the file byte for byte"
    else
        fail "stored bytes: the object fetched with oci os object get differs from the file ($(cmp "$WORK/disk.qcow2" "$WORK/copy.qcow2" 2>&1 | head -n 1))"
    fi
else
    fail "stored bytes: oci os object get $KEY failed: $(tail -n 3 "$WORK/get.err" | tr '\n' ' ')"
fi
rm -f "$WORK/copy.qcow2"

uri=$(json_get "$WORK/manifest.json" oci_create_image.imageSourceDetails.sourceUri)
want="https://objectstorage.$OCI_REGION.oraclecloud.com/n/$NS/b/$OCI_BUCKET/o/"
if [[ "$uri" == "$want"* && "$uri" == */disk.qcow2 ]]; then
    ok "oci_create_image: sourceUri $uri"
else
    fail "oci_create_image: sourceUri '$uri', not under $want"
fi

((FAILED == 0)) || exit 1
