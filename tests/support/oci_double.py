#!/usr/bin/env python3
"""A test double of OCI Object Storage's native API, for ferry's tests.

No OCI tenancy is reachable from the machines ferry is built on, so this
stands in for it. It is written from the API reference and the request and
response models of Oracle's SDKs, as ../OCI.md in the project's notes
summarises them (section 2 for the calls, section 3 for signing), and it is
meant to be as strict as the service:

- Every request must carry an HTTP signature (draft-cavage, rsa-sha256) by a
  key it knows, verified with that key's public half: the signed headers must
  include `date (request-target) host`, and, for a request with a body other
  than PutObject and UploadPart, `content-length content-type
  x-content-sha256`, whose value must be the body's SHA-256. A date more than
  5 minutes off is refused. Each refusal is OCI's 401 NotAuthenticated.
- GET /n/ (the namespace), PutObject, HeadObject, GetObject (with Range),
  DeleteObject, and the multipart API: CreateMultipartUpload (with
  `opc-checksum-algorithm`), UploadPart (part numbers 1..10000; every part
  but the last at least 5 MiB at commit), ListMultipartUploadParts,
  CommitMultipartUpload, AbortMultipartUpload, ListMultipartUploads.
- `opc-content-crc32c` on a part or object is checked (400 "Unmatched
  Content CRC32C"); a commit of an upload created with CRC32C answers the
  whole object's CRC32C in `opc-content-crc32c`.
- Every answer carries an `opc-request-id`; errors are OCI's JSON
  `{"code": ..., "message": ...}`.

Usage: oci_double.py PORT CONFIG.json, where CONFIG is
  {"namespace": "ns", "buckets": ["images"],
   "keys": {"TENANCY/USER/FINGERPRINT": "/path/to/public.pem"}}
It listens on 127.0.0.1 only and prints "ready" once it does.
"""

import base64
import email.utils
import hashlib
import json
import os
import re
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

MIN_PART = 5 << 20
MAX_PARTS = 10000
SKEW_SECS = 300

CRC32C_POLY = 0x82F63B78
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ CRC32C_POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data, crc=0):
    """CRC32C (Castagnoli), table-driven: plain, and about 10 MB/s, which
    is enough for the parts of these tests."""
    crc ^= 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc_b64(value):
    return base64.b64encode(value.to_bytes(4, "big")).decode()


class Store:
    def __init__(self, cfg):
        self.namespace = cfg["namespace"]
        self.buckets = {b: {} for b in cfg.get("buckets", [])}
        self.keys = {}
        for key_id, path in cfg.get("keys", {}).items():
            with open(path, "rb") as f:
                self.keys[key_id] = serialization.load_pem_public_key(f.read())
        self.uploads = {}  # upload id -> {bucket, object, algorithm, parts{n: bytes}}
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store = None

    def log_message(self, fmt, *args):  # quiet; the tests read answers
        pass

    # --- answers -------------------------------------------------------
    def answer(self, status, body=b"", headers=None, content_type="application/json"):
        self.send_response(status)
        self.send_header("opc-request-id", uuid.uuid4().hex.upper())
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body or status not in (204, 304):
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, status, code, message):
        body = json.dumps({"code": code, "message": message}).encode()
        self.answer(status, body)

    # --- signing ---------------------------------------------------------
    def authenticate(self, body, object_body):
        auth = self.headers.get("authorization", "")
        if not auth.startswith("Signature "):
            return "no Signature authorization header"
        fields = dict(re.findall(r'(\w+)="([^"]*)"', auth))
        if fields.get("version") != "1" or fields.get("algorithm") != "rsa-sha256":
            return "version must be 1 and algorithm rsa-sha256"
        key = self.store.keys.get(fields.get("keyId", ""))
        if key is None:
            return "unknown keyId"
        names = fields.get("headers", "date").split()
        need = ["(request-target)", "host"]
        need.append("x-date" if "x-date" in names else "date")
        if body is not None and not object_body:
            need += ["content-length", "content-type", "x-content-sha256"]
        missing = [n for n in need if n not in names]
        if missing:
            return "headers not signed: " + " ".join(missing)
        lines = []
        for n in names:
            if n == "(request-target)":
                lines.append(f"(request-target): {self.command.lower()} {self.path}")
            else:
                v = self.headers.get(n)
                if v is None:
                    return f"signed header {n} not sent"
                lines.append(f"{n}: {v}")
        if "x-content-sha256" in names:
            want = base64.b64encode(hashlib.sha256(body or b"").digest()).decode()
            if self.headers.get("x-content-sha256") != want:
                return "x-content-sha256 is not the body's SHA-256"
        if "content-length" in names and int(self.headers.get("content-length", "-1")) != len(body or b""):
            return "content-length is not the body's length"
        date = self.headers.get("x-date") or self.headers.get("date")
        try:
            when = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return "date is not an HTTP date"
        if abs(when - time.time()) > SKEW_SECS:
            return "date is more than 5 minutes off"
        try:
            key.verify(
                base64.b64decode(fields.get("signature", "")),
                "\n".join(lines).encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (InvalidSignature, ValueError):
            return "signature does not verify"
        return None

    # --- dispatch ----------------------------------------------------------
    def read_body(self):
        if self.headers.get("transfer-encoding"):
            return None, "Transfer-Encoding is not supported; send Content-Length"
        n = self.headers.get("content-length")
        if n is None:
            return None, None
        return self.rfile.read(int(n)), None

    def handle_any(self):
        body, bad = self.read_body()
        if bad:
            return self.error(411, "MissingContentLength", bad)
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = [urllib.parse.unquote(p) for p in url.path.split("/")]
        # parts: ["", "n", ns, "b", bucket, "o"|"u", object...]
        object_body = (
            self.command == "PUT"
            and len(parts) >= 7
            and parts[5] in ("o", "u")
        )
        why = self.authenticate(body if self.command in ("PUT", "POST") else None, object_body)
        if why:
            return self.error(401, "NotAuthenticated", f"The required information to complete authentication was not provided or was incorrect: {why}")
        s = self.store
        if url.path in ("/n", "/n/") and self.command == "GET":
            return self.answer(200, json.dumps(s.namespace).encode())
        if len(parts) < 5 or parts[1] != "n" or parts[3] != "b":
            return self.error(404, "NotFound", "no such API")
        ns, bucket = parts[2], parts[4]
        if ns != s.namespace or bucket not in s.buckets:
            return self.error(404, "BucketNotFound", f"Either the bucket named '{bucket}' does not exist in the namespace '{ns}' or you are not authorized to access it")
        objects = s.buckets[bucket]
        kind = parts[5] if len(parts) > 5 else ""
        name = "/".join(parts[6:])
        with s.lock:
            if kind == "" and self.command == "GET":
                return self.answer(200, json.dumps({"name": bucket, "namespace": ns}).encode())
            if kind == "o":
                return self.object_call(objects, name, body)
            if kind == "u":
                return self.multipart_call(bucket, objects, name, query, body)
        return self.error(404, "NotFound", "no such API")

    def object_call(self, objects, name, body):
        if self.command == "PUT":
            crc = crc32c(body)
            sent = self.headers.get("opc-content-crc32c")
            if sent is not None and sent != crc_b64(crc):
                return self.error(400, "InvalidParameter", "Unmatched Content CRC32C")
            objects[name] = {"data": body, "crc32c": crc_b64(crc) if sent else None, "parts": None}
            return self.answer(200, headers={"ETag": uuid.uuid4().hex, **({"opc-content-crc32c": crc_b64(crc)} if sent else {})})
        obj = objects.get(name)
        if obj is None:
            return self.error(404, "ObjectNotFound", f"The object '{name}' was not found")
        if self.command == "DELETE":
            del objects[name]
            return self.answer(204)
        data = obj["data"]
        headers = {"ETag": "e", "Accept-Ranges": "bytes"}
        if obj["crc32c"]:
            headers["opc-content-crc32c"] = obj["crc32c"]
        if obj["parts"]:
            headers["opc-multipart-md5"] = f"x-{obj['parts']}"
        if self.command == "HEAD":
            self.send_response(200)
            self.send_header("opc-request-id", uuid.uuid4().hex.upper())
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        rng = self.headers.get("range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            if not m:
                return self.error(416, "InvalidRange", rng)
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            if start >= len(data):
                return self.error(416, "InvalidRange", rng)
            end = min(end, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self.answer(206, data[start : end + 1], headers, "application/octet-stream")
        return self.answer(200, data, headers, "application/octet-stream")

    def multipart_call(self, bucket, objects, name, query, body):
        s = self.store
        if self.command == "POST" and not name:
            try:
                details = json.loads(body or b"")
                obj = details["object"]
            except (ValueError, KeyError, TypeError):
                return self.error(400, "InvalidParameter", "CreateMultipartUploadDetails needs object")
            algorithm = self.headers.get("opc-checksum-algorithm")
            if algorithm not in (None, "CRC32C", "SHA256", "SHA384"):
                return self.error(400, "InvalidParameter", f"opc-checksum-algorithm {algorithm}")
            uid = uuid.uuid4().hex
            s.uploads[uid] = {"bucket": bucket, "object": obj, "algorithm": algorithm, "parts": {}}
            return self.answer(200, json.dumps({
                "namespace": s.namespace, "bucket": bucket, "object": obj,
                "uploadId": uid, "timeCreated": "2026-11-27T00:00:00Z",
            }).encode())
        if self.command == "GET" and not name:
            ups = [{"namespace": s.namespace, "bucket": bucket, "object": u["object"], "uploadId": k}
                   for k, u in s.uploads.items() if u["bucket"] == bucket]
            return self.answer(200, json.dumps(ups).encode())
        uid = query.get("uploadId")
        up = s.uploads.get(uid)
        if up is None or up["bucket"] != bucket or up["object"] != name:
            return self.error(404, "NoSuchUpload", f"No such upload: {uid}")
        if self.command == "PUT":
            try:
                num = int(query.get("uploadPartNum", ""))
            except ValueError:
                num = 0
            if not 1 <= num <= MAX_PARTS:
                return self.error(400, "InvalidParameter", "uploadPartNum must be 1..10000")
            crc = crc32c(body)
            sent = self.headers.get("opc-content-crc32c")
            if sent is not None and sent != crc_b64(crc):
                return self.error(400, "InvalidParameter", "Unmatched Content CRC32C")
            etag = hashlib.md5(body).hexdigest()
            up["parts"][num] = {"data": body, "etag": etag, "crc": crc}
            headers = {"ETag": etag}
            if up["algorithm"] == "CRC32C":
                headers["opc-content-crc32c"] = crc_b64(crc)
            return self.answer(200, headers=headers)
        if self.command == "GET":
            items = [{"partNumber": n, "etag": p["etag"], "size": len(p["data"])}
                     for n, p in sorted(up["parts"].items())]
            return self.answer(200, json.dumps(items).encode())
        if self.command == "DELETE":
            del s.uploads[uid]
            return self.answer(204)
        if self.command == "POST":
            try:
                commit = json.loads(body or b"")["partsToCommit"]
            except (ValueError, KeyError, TypeError):
                return self.error(400, "InvalidParameter", "CommitMultipartUploadDetails needs partsToCommit")
            nums = [p.get("partNum") for p in commit]
            if not nums or nums != sorted(nums) or len(set(nums)) != len(nums):
                return self.error(400, "InvalidParameter", "partsToCommit must name each part once, in order")
            data = bytearray()
            for i, p in enumerate(commit):
                part = up["parts"].get(p.get("partNum"))
                if part is None or part["etag"] != p.get("etag"):
                    return self.error(400, "InvalidParameter", f"part {p.get('partNum')}: no such part or wrong etag")
                if i + 1 < len(commit) and len(part["data"]) < MIN_PART:
                    return self.error(400, "InvalidParameter", f"part {p.get('partNum')} is smaller than 5 MiB and not the last")
                data += part["data"]
            crc = crc32c(bytes(data))
            del s.uploads[uid]
            objects[name] = {
                "data": bytes(data),
                "crc32c": crc_b64(crc) if up["algorithm"] == "CRC32C" else None,
                "parts": len(commit),
            }
            headers = {"ETag": uuid.uuid4().hex, "opc-multipart-md5": f"x-{len(commit)}"}
            if up["algorithm"] == "CRC32C":
                headers["opc-content-crc32c"] = crc_b64(crc)
            return self.answer(200, headers=headers)
        return self.error(405, "MethodNotAllowed", self.command)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any


def main():
    port = int(sys.argv[1])
    with open(sys.argv[2]) as f:
        cfg = json.load(f)
    Handler.store = Store(cfg)
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
