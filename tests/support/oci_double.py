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
  `opc-checksum-algorithm`), UploadPart (part numbers 1..10000),
  ListMultipartUploadParts and ListMultipartUploads (paged: `limit`, `page`,
  `opc-next-page`; a small `page_size` in the config makes a client cross
  pages), CommitMultipartUpload (every uploaded part in `partsToCommit` or
  `partsToExclude`, not both, as the API reference says), and
  AbortMultipartUpload.
- At commit every part but the last must have `min_part_bytes` (5 MiB by
  default). OCI documents no minimum: this is S3's, and unconfirmed for
  OCI (the project's OCI notes, section 1.3, report 10 MiB seen once); set
  it in the config to try a stricter one.
- `Content-MD5` and `opc-content-crc32c` on a part or object are checked
  (400 "Unmatched Content MD5" / "Unmatched Content CRC32C"); a commit of an
  upload created with CRC32C answers the whole object's CRC32C in
  `opc-content-crc32c`, and `opc-multipart-md5` in OCI's `BASE64-N` form.
  An object keeps one ETag, answered by PUT, commit, HEAD and GET alike.
- A PUT or POST without Content-Length is refused (411), as is chunked
  transfer encoding, which Object Storage does not take.
- Every answer carries an `opc-request-id`; errors are OCI's JSON
  `{"code": ..., "message": ...}`.

Usage: oci_double.py PORT CONFIG.json, where CONFIG is
  {"namespace": "ns", "buckets": ["images"],
   "keys": {"TENANCY/USER/FINGERPRINT": "/path/to/public.pem"},
   "page_size": 1000, "min_part_bytes": 5242880}   (the last two optional)
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
        self.page_size = int(cfg.get("page_size", 1000))
        self.min_part = int(cfg.get("min_part_bytes", MIN_PART))
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
        self.close_connection = True
        self.answer(status, body, {"Connection": "close"})

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
        date = self.headers.get("x-date") or self.headers.get("date")
        if not (date or "").endswith(" GMT"):
            return "date is not an HTTP date in GMT"
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
            if self.command in ("PUT", "POST"):
                return None, "Content-Length is required"
            return None, None
        return self.rfile.read(int(n)), None

    def digests_match(self, body):
        """None, or the error answered when a digest sent is not the body's."""
        md5 = self.headers.get("content-md5")
        if md5 is not None and md5 != base64.b64encode(hashlib.md5(body).digest()).decode():
            return "Unmatched Content MD5"
        crc = self.headers.get("opc-content-crc32c")
        if crc is not None and crc != crc_b64(crc32c(body)):
            return "Unmatched Content CRC32C"
        return None

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
            bad = self.digests_match(body)
            if bad:
                return self.error(400, "InvalidParameter", bad)
            sent = self.headers.get("opc-content-crc32c")
            crc = crc_b64(crc32c(body)) if sent else None
            etag = uuid.uuid4().hex
            objects[name] = {"data": body, "crc32c": crc, "multipart_md5": None, "etag": etag}
            return self.answer(200, headers={"ETag": etag, **({"opc-content-crc32c": crc} if crc else {})})
        obj = objects.get(name)
        if obj is None:
            return self.error(404, "ObjectNotFound", f"The object '{name}' was not found")
        if self.command == "DELETE":
            del objects[name]
            return self.answer(204)
        data = obj["data"]
        headers = {"ETag": obj["etag"], "Accept-Ranges": "bytes"}
        if obj["crc32c"]:
            headers["opc-content-crc32c"] = obj["crc32c"]
        if obj["multipart_md5"]:
            headers["opc-multipart-md5"] = obj["multipart_md5"]
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
                   for k, u in sorted(s.uploads.items()) if u["bucket"] == bucket]
            return self.paged(ups, query, lambda u: u["uploadId"])
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
            bad = self.digests_match(body)
            if bad:
                return self.error(400, "InvalidParameter", bad)
            crc = crc32c(body)
            etag = hashlib.md5(body).hexdigest()
            up["parts"][num] = {"data": body, "etag": etag, "crc": crc}
            headers = {"ETag": etag}
            if up["algorithm"] == "CRC32C":
                headers["opc-content-crc32c"] = crc_b64(crc)
            return self.answer(200, headers=headers)
        if self.command == "GET":
            items = [{"partNumber": n, "etag": p["etag"], "size": len(p["data"])}
                     for n, p in sorted(up["parts"].items())]
            return self.paged(items, query, lambda i: str(i["partNumber"]))
        if self.command == "DELETE":
            del s.uploads[uid]
            return self.answer(204)
        if self.command == "POST":
            try:
                details = json.loads(body or b"")
                commit = details["partsToCommit"]
                exclude = details.get("partsToExclude") or []
            except (ValueError, KeyError, TypeError):
                return self.error(400, "InvalidParameter", "CommitMultipartUploadDetails needs partsToCommit")
            nums = [p.get("partNum") for p in commit]
            if not nums or nums != sorted(nums) or len(set(nums)) != len(nums):
                return self.error(400, "InvalidParameter", "partsToCommit must name each part once, in order")
            if set(nums) & set(exclude) or set(nums) | set(exclude) != set(up["parts"]):
                return self.error(400, "InvalidParameter", "Each part created for this upload must be in either partsToExclude or partsToCommit, but cannot be in both")
            data = bytearray()
            for i, p in enumerate(commit):
                part = up["parts"].get(p.get("partNum"))
                if part is None or part["etag"] != p.get("etag"):
                    return self.error(400, "InvalidParameter", f"part {p.get('partNum')}: no such part or wrong etag")
                if i + 1 < len(commit) and len(part["data"]) < s.min_part:
                    return self.error(400, "InvalidParameter", f"part {p.get('partNum')} is smaller than {s.min_part} bytes and not the last")
                data += part["data"]
            crc = crc32c(bytes(data))
            digests = b"".join(hashlib.md5(up["parts"][n]["data"]).digest() for n in nums)
            multipart_md5 = f"{base64.b64encode(hashlib.md5(digests).digest()).decode()}-{len(commit)}"
            etag = uuid.uuid4().hex
            del s.uploads[uid]
            objects[name] = {
                "data": bytes(data),
                "crc32c": crc_b64(crc) if up["algorithm"] == "CRC32C" else None,
                "multipart_md5": multipart_md5,
                "etag": etag,
            }
            headers = {"ETag": etag, "opc-multipart-md5": multipart_md5}
            if up["algorithm"] == "CRC32C":
                headers["opc-content-crc32c"] = crc_b64(crc)
            return self.answer(200, headers=headers)
        return self.error(405, "MethodNotAllowed", self.command)

    def paged(self, items, query, token):
        """One page of `items`, from the one whose token is `page` on, at
        most `limit` (the config's page_size by default); `opc-next-page`
        names the next page's first item."""
        try:
            limit = min(int(query.get("limit", self.store.page_size)), self.store.page_size)
        except ValueError:
            return self.error(400, "InvalidParameter", "limit")
        start = 0
        if "page" in query:
            tokens = [token(i) for i in items]
            if query["page"] not in tokens:
                return self.error(400, "InvalidParameter", "page")
            start = tokens.index(query["page"])
        page = items[start : start + max(limit, 1)]
        headers = {}
        if start + len(page) < len(items):
            headers["opc-next-page"] = token(items[start + len(page)])
        return self.answer(200, json.dumps(page).encode(), headers)

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
