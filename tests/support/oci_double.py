#!/usr/bin/env python3
"""A test double of OCI Object Storage's native API, and of the Compute
calls that import an object as a custom image, for ferry's tests.

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
  DeleteObject, ListObjects, and the multipart API: CreateMultipartUpload
  (with `opc-checksum-algorithm`), UploadPart (part numbers 1..10000),
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
  An object keeps one ETag, answered by PUT, commit, HEAD, GET and
  ListObjects alike.
- Conditional requests, the `if-match` and `if-none-match` headers of the
  SDKs' PutObjectRequest, GetObjectRequest and HeadObjectRequest (an ETag
  is compared as sent, quotes and all): PutObject with `if-none-match: *`
  on an existing object, or with an `if-match` that is not the current
  ETag (or no object), is 412; GetObject and HeadObject with an `if-match`
  that is not the current ETag are 412, and with `if-none-match` equal to
  it 304 Not Modified, no body (an absent object stays 404). A PUT's body
  is received first; its check and its rename into place are one step
  under the lock, so of two conditional creates exactly one wins. The
  semantics are the SDKs' field documentation ("the only valid value is
  '*'" for a PUT, "wildcards ('*') are not allowed" for a read); the codes
  IfNoneMatchFailed and IfMatchFailed are not in the API reference but
  are what others report a live service answering a PUT; that a GET or
  HEAD fails with IfMatchFailed too, and the 400 InvalidParameter for
  an if-none-match other than `*` on a PUT or `*` on a read, are
  unconfirmed. DeleteObject, CreateMultipartUpload,
  CommitMultipartUpload and UploadPart ignore both headers (the service
  honours them): not implemented here.
- ListObjects, GET /n/{ns}/b/{bucket}/o (no object name; a name, even
  with a query, is GetObject): `prefix`, `start` (names >= it),
  `startAfter` (names > it), `end` (names < it), `limit` (the config's
  page_size, 1000 unless set, by default and at most) and `fields` (a
  comma-separated, case-insensitive list of name, size, etag,
  timeCreated, timeModified, storageTier, archivalState, as the API
  reference has them; name always comes). The answer is ListObjects
  `{"objects": [{"name": ..., "size": ..., ...}], "nextStartWith": ...}`,
  names in order, each summary with only the fields asked,
  `nextStartWith` (the next name, for `start`) only when more remain.
  Not implemented, and refused (400 InvalidParameter, unlike the
  service): `delimiter` (and so `prefixes`), any other parameter, and
  the `md5` field (the double keeps an object's MD5 only when it was
  sent). timeModified is timeCreated (every write makes a new object),
  storageTier is Standard and archivalState never appears (it is only
  set in the Archive tier).
- A PUT or POST without Content-Length is refused (411), as is chunked
  transfer encoding, which Object Storage does not take.
- Every answer carries an `opc-request-id`; errors are OCI's JSON
  `{"code": ..., "message": ...}`. A body other than an object's bytes
  (a small JSON document) over 4 MiB is refused (400).
- Bytes live on disk, never whole in memory, so that multi-GiB images and
  several parts in flight fit: a body is read from the socket in 8 MiB
  chunks into a file while its digests are updated, a part is a file, an
  object is a file, a commit streams the committed parts into the object's
  file (computing the whole CRC32C on the way), and GET sends from the file.
  The one lock guards the maps of names, never a digest or a file's bytes,
  so parallel parts proceed in parallel. An overwritten object is replaced
  by a rename; a deleted object or aborted upload takes its files along.
- CRC32C is the C one of PyPI's `crc32c` (pure Python ran at 3 MiB/s): run
  the double with `.venv-test/bin/python3`, which `tests/support/seaweedfs.sh
  install` provides with `crc32c` and `cryptography`. Without them it exits
  at once, saying so.

Pre-authenticated requests and the image import are written from the API
reference and the Oracle SDKs' models (CreatePreauthenticatedRequestDetails,
PreauthenticatedRequest, CreateImageDetails, ImageSourceDetails, Image,
WorkRequest, WorkRequestError), as ../OCI.md sections 4 and 4.4 summarise
them, and are as strict as those say the service is:

- PARs: POST /n/{ns}/b/{bucket}/p/ (name, accessType, timeExpires required,
  RFC 3339 and in the future; objectName required for the Object* types)
  answers the PreauthenticatedRequest with a random token in its accessUri
  and fullPath; DELETE /n/{ns}/b/{bucket}/p/{parId} (204) ends it. An object
  is reached through GET/HEAD (read types) or PUT (write types) of
  /p/{token}/n/{ns}/b/{bucket}/o/{object}, UNSIGNED: the token is the
  credential. A deleted, expired or mismatched PAR is a 404
  NotAuthorizedOrNotFound; a method its type does not grant, a 405.
- Compute, on the same port under /20160918 (point both endpoints here),
  signed like any other call: POST /images (CreateImage) checks
  compartmentId (a compartment or tenancy OCID), displayName, launchMode
  (NATIVE|EMULATED|PARAVIRTUALIZED|CUSTOM), freeformTags (string to string),
  definedTags, and imageSourceDetails: objectStorageUri with a sourceUri
  that is a PAR this double issued and that still grants reading the
  object, or a native .../n/{ns}/b/{bucket}/o/{object} URL; or
  objectStorageTuple (namespaceName, bucketName, objectName); the object
  must exist; sourceImageType is QCOW2|VMDK or absent. Any other field is
  refused. Refusals are 400 MissingParameter / InvalidParameter naming the
  field. `opc-retry-token`: the same token and body within 24 h answer
  the same image (200, no new image); the same token with another body is
  409 Conflict. The answer is the Image (lifecycleState IMPORTING) with
  `opc-work-request-id`.
- The import is a function of time: `import_secs` after the create the
  image is AVAILABLE, or DISABLED if the object's first bytes were no
  QCOW2 (QFI\xfb), VMDK (KDMV, or "# Disk DescriptorFile") or .oci (a tar,
  "ustar" at offset 257); the work request then FAILED with one error,
  code ImageImportFailed. GET /images/{id}, GET /workRequests/{id} and GET
  /workRequests/{id}/errors answer the state of the moment; an unknown id
  is 404 NotAuthorizedOrNotFound.
- Test-only and unsigned: GET /_double/images answers {"created": N,
  "bodies": [...]}, the number of images created and every CreateImage
  body received after its signature checked (refused and replayed ones too).

Usage: oci_double.py PORT CONFIG.json, where CONFIG is
  {"namespace": "ns", "buckets": ["images"],
   "keys": {"TENANCY/USER/FINGERPRINT": "/path/to/public.pem"},
   "data_dir": "/path/to/dir", "page_size": 1000,
   "min_part_bytes": 5242880, "clock_offset_secs": 0, "import_secs": 2}
and every key from "data_dir" on is optional:
- data_dir: where parts and objects are kept; by default a new directory
  `oci-double-*` beside CONFIG (left behind: put CONFIG in a temporary
  directory).
- page_size: the most items a list answers at once.
- min_part_bytes: the smallest part but the last that a commit takes.
- clock_offset_secs: added to the double's clock, for the 5-minute skew
  check and the Date header of its answers: 600 makes a client with a true
  clock look 10 minutes slow (and -600 fast) without touching the system
  clock.
- import_secs: how long an image stays IMPORTING.
It listens on 127.0.0.1 only (a socket idle for 120 s is closed; at most
128 connections are served at once) and prints "ready" once it does.
"""

import base64
import datetime
import email.utils
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    import crc32c as _crc32c
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding
except ImportError as e:
    sys.exit(
        f"oci_double.py: {e}: the double needs PyPI's crc32c and cryptography; "
        "run tests/support/seaweedfs.sh install and start it with .venv-test/bin/python3"
    )

MIN_PART = 5 << 20
MAX_PARTS = 10000
SKEW_SECS = 300
CHUNK = 8 << 20  # bytes read, digested and written at a time
MAX_DOC_BYTES = 4 << 20  # the largest body that is not an object's bytes (a
# commit naming 10000 parts is about 600 KB)
IDLE_SECS = 120  # a socket silent this long is closed
MAX_CONNECTIONS = 128


def crc32c(data, crc=0):
    """CRC32C (Castagnoli), in C, releasing the GIL on large buffers."""
    return _crc32c.crc32c(data, value=crc)


def crc_b64(value):
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def rfc3339(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text):
    """Seconds since the epoch, or None unless `text` is an RFC 3339 time
    with a zone."""
    if not isinstance(text, str) or not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", text):
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def image_format(head):
    """What the first bytes of an object say it is, or None if nothing
    Compute imports (a QCOW2, a VMDK sparse extent or descriptor, a tar as
    an .oci export is)."""
    if head.startswith(b"QFI\xfb"):
        return "QCOW2"
    if head.startswith(b"KDMV") or head.startswith(b"# Disk DescriptorFile"):
        return "VMDK"
    if head[257:262] == b"ustar":
        return "OCI"
    return None


def unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Store:
    """What the service knows. `lock` guards the dicts and the renames
    that install a file under a name, nothing slower: bytes are read,
    digested and copied outside it."""

    def __init__(self, cfg, cfg_dir):
        self.namespace = cfg["namespace"]
        # bucket -> object name -> {path, size, crc32c, multipart_md5, etag, created}
        self.buckets = {b: {} for b in cfg.get("buckets", [])}
        self.keys = {}
        for key_id, path in cfg.get("keys", {}).items():
            with open(path, "rb") as f:
                self.keys[key_id] = serialization.load_pem_public_key(f.read())
        # upload id -> {bucket, object, algorithm, dir, parts{n: {path, size, etag, md5, crc}}}
        self.uploads = {}
        self.page_size = int(cfg.get("page_size", 1000))
        self.min_part = int(cfg.get("min_part_bytes", MIN_PART))
        self.clock_offset = float(cfg.get("clock_offset_secs", 0))
        data_dir = cfg.get("data_dir") or tempfile.mkdtemp(prefix="oci-double-", dir=cfg_dir)
        self.tmp_dir = os.path.join(data_dir, "tmp")
        self.objects_dir = os.path.join(data_dir, "objects")
        self.parts_dir = os.path.join(data_dir, "parts")
        for d in (self.tmp_dir, self.objects_dir, self.parts_dir):
            os.makedirs(d, exist_ok=True)
        self.lock = threading.Lock()
        # PAR token -> {id, bucket, name, accessType, objectName, expires,
        # timeCreated, timeExpires}; PAR id -> token
        self.pars = {}
        self.par_ids = {}
        self.import_secs = float(cfg.get("import_secs", 2))
        # image id -> {image (the Image as created), created_at, size,
        # supported, work_request}; work request id -> image id
        self.images = {}
        self.work_requests = {}
        # opc-retry-token -> (canonical body, image id, when)
        self.retry_tokens = {}
        # every CreateImage body received (after its signature), in order
        self.image_bodies = []

    def now(self):
        return time.time() + self.clock_offset

    def images_record(self):
        with self.lock:
            return {"created": len(self.images), "bodies": list(self.image_bodies)}

    def par_for(self, token, now):
        """The PAR whose token this is, if it is neither deleted nor
        expired; called under the lock."""
        par = self.pars.get(token)
        if par is None or par["expires"] <= now:
            return None
        return par

    def image_view(self, image_id, now):
        """(Image, work request, errors) as they are at `now`; called under
        the lock. The import is a function of time: IMPORTING until
        import_secs after the create, then AVAILABLE, or DISABLED when the
        object's bytes are no image format the service imports."""
        img = self.images[image_id]
        image = dict(img["image"])
        elapsed = now - img["created_at"]
        done = elapsed >= self.import_secs
        wr = {
            "id": img["work_request"],
            "operationType": "CreateImage",
            "compartmentId": image["compartmentId"],
            "timeAccepted": image["timeCreated"],
            "timeStarted": image["timeCreated"],
            "timeFinished": None,
            "resources": [{
                "entityType": "image",
                "actionType": "CREATED" if done and img["supported"] else "IN_PROGRESS",
                "identifier": image_id,
                "entityUri": f"/20160918/images/{image_id}",
            }],
        }
        errors = []
        if not done:
            image["lifecycleState"] = "IMPORTING"
            wr["status"] = "IN_PROGRESS"
            wr["percentComplete"] = round(100.0 * max(elapsed, 0) / max(self.import_secs, 1e-9), 1)
        else:
            wr["percentComplete"] = 100.0
            wr["timeFinished"] = rfc3339(img["created_at"] + self.import_secs)
            if img["supported"]:
                image["lifecycleState"] = "AVAILABLE"
                image["sizeInMBs"] = max(1, -(-img["size"] // (1 << 20)))
                wr["status"] = "SUCCEEDED"
            else:
                image["lifecycleState"] = "DISABLED"
                wr["status"] = "FAILED"
                errors.append({
                    "code": "ImageImportFailed",
                    "message": "The image import failed: the object's format is not supported; "
                               "import a QCOW2, a VMDK (monolithicSparse or streamOptimized) or an .oci export",
                    "timestamp": wr["timeFinished"],
                })
        return image, wr, errors

    def temp_file(self):
        """A new file for bytes on their way in: (open binary file, path).
        Under data_dir, so that installing it is a rename."""
        fd, path = tempfile.mkstemp(dir=self.tmp_dir)
        return os.fdopen(fd, "wb"), path

    def object_path(self, bucket, name):
        key = hashlib.sha256(f"{bucket}\0{name}".encode()).hexdigest()
        return os.path.join(self.objects_dir, key)


class Incoming:
    """A body streamed into a temporary file, with the digests asked of it."""

    def __init__(self, path, size, crc, md5, sha256):
        self.path, self.size, self.crc, self.md5, self.sha256 = path, size, crc, md5, sha256


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store = None
    timeout = IDLE_SECS

    def log_message(self, fmt, *args):  # quiet; the tests read answers
        pass

    def date_time_string(self, timestamp=None):
        """The Date header, by the double's clock (as the service's, by its own)."""
        return email.utils.formatdate(self.store.now(), usegmt=True)

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
        # The client is still sending a body nobody read: take it, so that
        # it reads this answer rather than a reset connection.
        self.drain()
        body = json.dumps({"code": code, "message": message}).encode()
        self.close_connection = True
        self.answer(status, body, {"Connection": "close"})

    def send_file(self, status, f, start, length, headers, content_type):
        """Answers `length` bytes of `f` from `start`, sent by the kernel."""
        self.send_response(status)
        self.send_header("opc-request-id", uuid.uuid4().hex.upper())
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if length:
            try:
                self.connection.sendfile(f, offset=start, count=length)
            except OSError:  # the client went away; nothing to answer
                self.close_connection = True

    # --- bodies ----------------------------------------------------------
    def drain(self):
        """Reads and drops what is left of the body (bounded by its length)."""
        while self.unread > 0:  # each turn takes at least one byte, or stops
            try:
                got = self.rfile.read(min(self.unread, CHUNK))
            except OSError:  # reset, or silent for IDLE_SECS
                got = b""
            if not got:
                self.unread = 0
                self.close_connection = True
                break
            self.unread -= len(got)

    def read_document(self):
        """The whole (small) body, or None if it is over MAX_DOC_BYTES."""
        if self.unread > MAX_DOC_BYTES:
            return None
        body = self.rfile.read(self.unread)
        self.unread = 0
        return body

    def receive(self, crc_wanted, md5_wanted, sha256_wanted):
        """Streams the body into a temporary file, CHUNK at a time, updating
        the digests asked for. None if the client stopped sending early
        (the connection is then closed without an answer)."""
        out, path = self.store.temp_file()
        crc = 0 if crc_wanted else None
        md5 = hashlib.md5() if md5_wanted else None
        sha = hashlib.sha256() if sha256_wanted else None
        buf = bytearray(min(CHUNK, max(self.unread, 1)))
        view = memoryview(buf)
        size = 0
        try:
            with out:
                while self.unread > 0:  # each turn takes at least one byte, or stops
                    try:
                        n = self.rfile.readinto(view[: min(len(buf), self.unread)])
                    except OSError:  # reset, or silent for IDLE_SECS
                        n = 0
                    if not n:
                        break
                    chunk = view[:n]
                    if crc is not None:
                        crc = crc32c(chunk, crc)
                    if md5 is not None:
                        md5.update(chunk)
                    if sha is not None:
                        sha.update(chunk)
                    out.write(chunk)
                    self.unread -= n
                    size += n
        except BaseException:
            unlink(path)
            raise
        if self.unread > 0:
            unlink(path)
            self.close_connection = True
            return None
        return Incoming(
            path,
            size,
            crc,
            md5.digest() if md5 else None,
            base64.b64encode(sha.digest()).decode() if sha else None,
        )

    def received_ok(self, got):
        """None, or the error answered when a digest sent or signed is not
        the body's (the file is then removed)."""
        why = None
        md5 = self.headers.get("content-md5")
        crc = self.headers.get("opc-content-crc32c")
        if self.sha256_to_check is not None and got.sha256 != self.sha256_to_check:
            why = (401, "NotAuthenticated", "The required information to complete authentication was not provided or was incorrect: x-content-sha256 is not the body's SHA-256")
        elif md5 is not None and md5 != base64.b64encode(got.md5).decode():
            why = (400, "InvalidParameter", "Unmatched Content MD5")
        elif crc is not None and crc != crc_b64(got.crc):
            why = (400, "InvalidParameter", "Unmatched Content CRC32C")
        if why:
            unlink(got.path)
        return why

    def receive_checked(self, crc_wanted, md5_wanted):
        """The body, received and checked; or None once an answer was sent."""
        got = self.receive(
            crc_wanted or self.headers.get("opc-content-crc32c") is not None,
            md5_wanted or self.headers.get("content-md5") is not None,
            self.sha256_to_check is not None,
        )
        if got is None:
            return None
        bad = self.received_ok(got)
        if bad:
            self.error(*bad)
            return None
        return got

    # --- signing ---------------------------------------------------------
    def authenticate(self, body, object_body):
        """None, or why the signature is refused. `body` is a document's
        bytes; an object's bytes are not read yet, so a signed
        x-content-sha256 on them is left in `sha256_to_check`."""
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
            if object_body:
                self.sha256_to_check = self.headers.get("x-content-sha256")
            else:
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
        if abs(when - self.store.now()) > SKEW_SECS:
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
    def body_length(self):
        """(length or None, None) or (None, (status, code, message))."""
        if self.headers.get("transfer-encoding"):
            return None, (411, "MissingContentLength", "Transfer-Encoding is not supported; send Content-Length")
        n = self.headers.get("content-length")
        if n is None:
            if self.command in ("PUT", "POST"):
                return None, (411, "MissingContentLength", "Content-Length is required")
            return None, None
        if not n.isdigit():
            return None, (400, "InvalidParameter", "Content-Length is not a number")
        return int(n), None

    def handle_any(self):
        self.unread = 0
        self.sha256_to_check = None
        length, bad = self.body_length()
        if bad:
            return self.error(*bad)  # and close: the body, if any, cannot be delimited
        self.unread = length or 0
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = [urllib.parse.unquote(p) for p in url.path.split("/")]
        # The two unsigned doors: a PAR (its token is the credential) and
        # the test-only /_double/ calls.
        if url.path.startswith("/p/"):
            return self.par_object_call(parts)
        if url.path == "/_double/images" and self.command == "GET":
            return self.answer(200, json.dumps(self.store.images_record()).encode())
        # parts: ["", "n", ns, "b", bucket, "o"|"u", object...]
        object_body = (
            self.command == "PUT"
            and len(parts) >= 7
            and parts[5] in ("o", "u")
        )
        body = None
        if not object_body and length is not None:
            body = self.read_document()
            if body is None:
                return self.error(400, "InvalidParameter", f"a request body other than an object's bytes is at most {MAX_DOC_BYTES} bytes")
        why = self.authenticate(body if self.command in ("PUT", "POST") else None, object_body)
        if why:
            return self.error(401, "NotAuthenticated", f"The required information to complete authentication was not provided or was incorrect: {why}")
        s = self.store
        if url.path in ("/n", "/n/") and self.command == "GET":
            return self.answer(200, json.dumps(s.namespace).encode())
        if len(parts) > 1 and parts[1] == "20160918":
            return self.compute_call(parts[2:], body)
        if len(parts) < 5 or parts[1] != "n" or parts[3] != "b":
            return self.error(404, "NotFound", "no such API")
        ns, bucket = parts[2], parts[4]
        if ns != s.namespace or bucket not in s.buckets:
            return self.error(404, "BucketNotFound", f"Either the bucket named '{bucket}' does not exist in the namespace '{ns}' or you are not authorized to access it")
        kind = parts[5] if len(parts) > 5 else ""
        name = "/".join(parts[6:])
        if kind == "" and self.command == "GET":
            return self.answer(200, json.dumps({"name": bucket, "namespace": ns}).encode())
        if kind == "o" and not name and self.command == "GET":
            return self.list_objects(bucket, query)
        if kind == "o":
            return self.object_call(bucket, name)
        if kind == "u":
            return self.multipart_call(bucket, name, query, body)
        if kind == "p":
            return self.par_call(bucket, name, body)
        return self.error(404, "NotFound", "no such API")

    def object_call(self, bucket, name):
        s = self.store
        objects = s.buckets[bucket]
        if self.command == "PUT":
            if self.headers.get("if-none-match") not in (None, "*"):
                return self.error(400, "InvalidParameter", "The only valid value of if-none-match on PutObject is '*'")
            got = self.receive_checked(False, False)
            if got is None:
                return
            crc = crc_b64(got.crc) if self.headers.get("opc-content-crc32c") else None
            etag = uuid.uuid4().hex
            path = s.object_path(bucket, name)
            with s.lock:  # the check, the rename and the entry change together
                bad = self.precondition(objects.get(name))
                if bad is None:
                    os.replace(got.path, path)
                    objects[name] = {"path": path, "size": got.size, "crc32c": crc, "multipart_md5": None,
                                     "etag": etag, "created": s.now()}
            if bad is not None:
                unlink(got.path)
                return self.error(*bad)
            return self.answer(200, headers={"ETag": etag, **({"opc-content-crc32c": crc} if crc else {})})
        if self.command in ("GET", "HEAD") and self.headers.get("if-none-match") == "*":
            return self.error(400, "InvalidParameter", "Wildcards ('*') are not allowed in if-none-match on GetObject and HeadObject")
        bad = None
        with s.lock:
            obj = objects.get(name)
            if obj is not None and self.command in ("GET", "HEAD"):
                bad = self.precondition(obj)
            if obj is not None and self.command == "DELETE":
                del objects[name]
                unlink(obj["path"])
            elif obj is not None and self.command == "GET" and bad is None:
                # Opened under the lock: the bytes that go with this entry,
                # even if the object is replaced while they are sent.
                f = open(obj["path"], "rb")
        if obj is None:
            return self.error(404, "ObjectNotFound", f"The object '{name}' was not found")
        if self.command == "DELETE":
            return self.answer(204)
        if bad is not None and bad[0] == 304:
            return self.answer(304, headers={"ETag": obj["etag"]})
        if bad is not None:
            return self.error(*bad)
        size = obj["size"]
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
            self.send_header("Content-Length", str(size))
            self.end_headers()
            return
        if self.command != "GET":
            return self.error(405, "MethodNotAllowed", self.command)
        with f:
            rng = self.headers.get("range")
            if rng:
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
                if not m:
                    return self.error(416, "InvalidRange", rng)
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else size - 1
                if start >= size:
                    return self.error(416, "InvalidRange", rng)
                end = min(end, size - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                return self.send_file(206, f, start, end + 1 - start, headers, "application/octet-stream")
            return self.send_file(200, f, 0, size, headers, "application/octet-stream")

    def precondition(self, obj):
        """None, or what a conditional PutObject, GetObject or HeadObject
        earns against `obj` (None when absent): (412, IfMatchFailed) when
        if-match is not its ETag, (412, IfNoneMatchFailed) when a PUT's
        if-none-match is `*` and it exists, (304,) when a read's
        if-none-match is its ETag. Called under the lock, so that a PUT's
        check and its rename are one step."""
        if_match = self.headers.get("if-match")
        if_none = self.headers.get("if-none-match")
        if if_match is not None and (obj is None or obj["etag"] != if_match):
            return (412, "IfMatchFailed", f"The if-match header '{if_match}' does not match the object's current ETag")
        if self.command == "PUT" and if_none == "*" and obj is not None:
            return (412, "IfNoneMatchFailed", "The if-none-match header is '*' and the object already exists")
        if self.command != "PUT" and if_none is not None and obj is not None and obj["etag"] == if_none:
            return (304,)
        return None

    LIST_PARAMS = ("prefix", "start", "end", "startAfter", "limit", "fields")
    # fields= names (case-insensitive) -> the ObjectSummary key; md5 is
    # refused: the double keeps an object's MD5 only when it was sent.
    LIST_FIELDS = {"name": "name", "size": "size", "etag": "etag", "timecreated": "timeCreated",
                   "timemodified": "timeModified", "storagetier": "storageTier",
                   "archivalstate": "archivalState"}

    def list_objects(self, bucket, query):
        """ListObjects: GET /n/{ns}/b/{bucket}/o, names in order, from
        `start` on (or after `startAfter`), below `end`, beginning with
        `prefix`; at most `limit` (the config's page_size by default, and
        at most that), `nextStartWith` naming the next one when more remain."""
        s = self.store
        for k in query:
            if k not in self.LIST_PARAMS:
                return self.error(400, "InvalidParameter", f"{k}: this double's ListObjects takes only {', '.join(self.LIST_PARAMS)}")
        try:
            limit = int(query.get("limit", s.page_size))
        except ValueError:
            limit = 0
        if limit < 1:
            return self.error(400, "InvalidParameter", "limit must be a positive integer")
        limit = min(limit, s.page_size)
        fields = [f.strip().lower() for f in query.get("fields", "name").split(",") if f.strip()]
        for f in fields:
            if f not in self.LIST_FIELDS:
                return self.error(400, "InvalidParameter", f"fields: {f} is not a field this double lists (name, size, etag, timeCreated, timeModified, storageTier, archivalState)")
        prefix, start, end, after = (query.get(k) for k in ("prefix", "start", "end", "startAfter"))
        with s.lock:
            objects = s.buckets[bucket]
            names = sorted(n for n in objects
                           if n.startswith(prefix or "") and (start is None or n >= start)
                           and (end is None or n < end) and (after is None or n > after))
            rows = []
            for n in names[:limit]:
                obj = objects[n]
                known = {"name": n, "size": obj["size"], "etag": obj["etag"],
                         "timeCreated": rfc3339(obj["created"]), "timeModified": rfc3339(obj["created"]),
                         "storageTier": "Standard"}  # archivalState: only in the Archive tier
                rows.append({self.LIST_FIELDS[f]: known[self.LIST_FIELDS[f]]
                             for f in ["name"] + fields if self.LIST_FIELDS[f] in known})
        listing = {"objects": rows}
        if len(names) > limit:
            listing["nextStartWith"] = names[limit]
        return self.answer(200, json.dumps(listing).encode())

    def multipart_call(self, bucket, name, query, body):
        s = self.store
        objects = s.buckets[bucket]
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
            updir = os.path.join(s.parts_dir, uid)
            os.mkdir(updir)
            with s.lock:
                s.uploads[uid] = {"bucket": bucket, "object": obj, "algorithm": algorithm, "dir": updir, "parts": {}}
            return self.answer(200, json.dumps({
                "namespace": s.namespace, "bucket": bucket, "object": obj,
                "uploadId": uid, "timeCreated": "2026-11-27T00:00:00Z",
            }).encode())
        if self.command == "GET" and not name:
            with s.lock:
                ups = [{"namespace": s.namespace, "bucket": bucket, "object": u["object"], "uploadId": k}
                       for k, u in sorted(s.uploads.items()) if u["bucket"] == bucket]
            return self.paged(ups, query, lambda u: u["uploadId"])
        uid = query.get("uploadId")

        def upload():
            """The upload named, or None; called under the lock."""
            up = s.uploads.get(uid)
            if up is None or up["bucket"] != bucket or up["object"] != name:
                return None
            return up

        def no_upload():
            return self.error(404, "NoSuchUpload", f"No such upload: {uid}")

        with s.lock:
            up = upload()
        if up is None:
            return no_upload()
        if self.command == "PUT":
            try:
                num = int(query.get("uploadPartNum", ""))
            except ValueError:
                num = 0
            if not 1 <= num <= MAX_PARTS:
                return self.error(400, "InvalidParameter", "uploadPartNum must be 1..10000")
            got = self.receive_checked(True, True)
            if got is None:
                return
            etag = got.md5.hex()
            path = os.path.join(up["dir"], str(num))
            with s.lock:  # still there? (it may have been aborted or committed meanwhile)
                up = upload()
                if up is not None:
                    os.replace(got.path, path)
                    up["parts"][num] = {"path": path, "size": got.size, "etag": etag, "md5": got.md5, "crc": got.crc}
            if up is None:
                unlink(got.path)
                return no_upload()
            headers = {"ETag": etag}
            if up["algorithm"] == "CRC32C":
                headers["opc-content-crc32c"] = crc_b64(got.crc)
            return self.answer(200, headers=headers)
        if self.command == "GET":
            with s.lock:
                items = [{"partNumber": n, "etag": p["etag"], "size": p["size"]}
                         for n, p in sorted(up["parts"].items())]
            return self.paged(items, query, lambda i: str(i["partNumber"]))
        if self.command == "DELETE":
            with s.lock:
                up = upload()
                if up is not None:
                    del s.uploads[uid]
            if up is None:
                return no_upload()
            shutil.rmtree(up["dir"], ignore_errors=True)
            return self.answer(204)
        if self.command == "POST":
            return self.commit(bucket, objects, name, body, upload, no_upload, uid)
        return self.error(405, "MethodNotAllowed", self.command)

    def commit(self, bucket, objects, name, body, upload, no_upload, uid):
        s = self.store
        try:
            details = json.loads(body or b"")
            commit = details["partsToCommit"]
            exclude = details.get("partsToExclude") or []
            nums = [p.get("partNum") for p in commit]
            etags = [p.get("etag") for p in commit]
        except (ValueError, KeyError, TypeError, AttributeError):
            return self.error(400, "InvalidParameter", "CommitMultipartUploadDetails needs partsToCommit")
        try:
            nums_in_order = nums == sorted(nums)
        except TypeError:
            nums_in_order = False
        if not nums or not nums_in_order or len(set(nums)) != len(nums):
            return self.error(400, "InvalidParameter", "partsToCommit must name each part once, in order")
        # Checked and taken out of the uploads under the lock: from here on
        # no part can change and no other commit or abort can start.
        try:
            exclude = set(exclude)
        except TypeError:
            return self.error(400, "InvalidParameter", "partsToExclude must be part numbers")
        with s.lock:
            up = upload()
            if up is None:
                return no_upload()
            if set(nums) & exclude or set(nums) | exclude != set(up["parts"]):
                return self.error(400, "InvalidParameter", "Each part created for this upload must be in either partsToExclude or partsToCommit, but cannot be in both")
            chosen = []
            for i, (num, etag) in enumerate(zip(nums, etags)):
                part = up["parts"].get(num)
                if part is None or part["etag"] != etag:
                    return self.error(400, "InvalidParameter", f"part {num}: no such part or wrong etag")
                if i + 1 < len(commit) and part["size"] < s.min_part:
                    return self.error(400, "InvalidParameter", f"part {num} is smaller than {s.min_part} bytes and not the last")
                chosen.append(part)
            del s.uploads[uid]
        # The parts, streamed into the object's new file; each part's file
        # goes as soon as it is copied, so the disk holds the object about once.
        out, tmp = s.temp_file()
        crc = 0
        size = 0
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            with out:
                for part in chosen:  # at most MAX_PARTS
                    with open(part["path"], "rb") as f:
                        left = part["size"]
                        while left > 0:  # each turn takes at least one byte, or fails
                            n = f.readinto(view[: min(CHUNK, left)])
                            if not n:
                                raise OSError(f"part file {part['path']} is shorter than {part['size']} bytes")
                            crc = crc32c(view[:n], crc)
                            out.write(view[:n])
                            left -= n
                            size += n
                    unlink(part["path"])
        except OSError as e:  # the upload is gone either way, as after a failed commit
            unlink(tmp)
            shutil.rmtree(up["dir"], ignore_errors=True)
            return self.error(500, "InternalServerError", f"commit failed: {e}")
        shutil.rmtree(up["dir"], ignore_errors=True)
        digests = b"".join(part["md5"] for part in chosen)
        multipart_md5 = f"{base64.b64encode(hashlib.md5(digests).digest()).decode()}-{len(chosen)}"
        etag = uuid.uuid4().hex
        stored_crc = crc_b64(crc) if up["algorithm"] == "CRC32C" else None
        path = s.object_path(bucket, name)
        with s.lock:
            os.replace(tmp, path)
            objects[name] = {
                "path": path,
                "size": size,
                "crc32c": stored_crc,
                "multipart_md5": multipart_md5,
                "etag": etag,
                "created": s.now(),
            }
        headers = {"ETag": etag, "opc-multipart-md5": multipart_md5}
        if stored_crc:
            headers["opc-content-crc32c"] = stored_crc
        return self.answer(200, headers=headers)

    # --- pre-authenticated requests ----------------------------------------
    PAR_TYPES = ("ObjectRead", "ObjectWrite", "ObjectReadWrite",
                 "AnyObjectWrite", "AnyObjectRead", "AnyObjectReadWrite")

    def par_call(self, bucket, par_id, body):
        """CreatePreauthenticatedRequest (POST .../p/) and
        DeletePreauthenticatedRequest (DELETE .../p/{parId})."""
        s = self.store
        if self.command == "DELETE" and par_id:
            with s.lock:
                token = s.par_ids.get(par_id)
                par = s.pars.get(token)
                if par is not None and par["bucket"] == bucket:
                    del s.pars[token]
                    del s.par_ids[par_id]
                else:
                    par = None
            if par is None:
                return self.error(404, "NotFound", f"No pre-authenticated request {par_id} in bucket {bucket}")
            return self.answer(204)
        if self.command != "POST" or par_id:
            return self.error(405, "MethodNotAllowed", self.command)
        try:
            d = json.loads(body or b"")
        except ValueError:
            return self.error(400, "InvalidParameter", "CreatePreauthenticatedRequestDetails is not JSON")
        if not isinstance(d, dict):
            return self.error(400, "InvalidParameter", "CreatePreauthenticatedRequestDetails is not an object")
        for field in ("name", "accessType", "timeExpires"):
            if d.get(field) is None:
                return self.error(400, "MissingParameter", f"{field} is required")
        if not isinstance(d["name"], str) or not d["name"]:
            return self.error(400, "InvalidParameter", "name must be a non-empty string")
        access = d["accessType"]
        if access not in self.PAR_TYPES:
            return self.error(400, "InvalidParameter", f"accessType must be one of {', '.join(self.PAR_TYPES)}")
        expires = parse_rfc3339(d["timeExpires"])
        if expires is None:
            return self.error(400, "InvalidParameter", "timeExpires must be an RFC 3339 date-time")
        now = s.now()
        if expires <= now:
            return self.error(400, "InvalidParameter", "timeExpires must be in the future")
        obj = d.get("objectName")
        if access.startswith("Object"):
            if obj is None:
                return self.error(400, "MissingParameter", f"objectName is required for accessType {access}")
            if not isinstance(obj, str) or not obj:
                return self.error(400, "InvalidParameter", "objectName must be a non-empty string")
        elif obj is not None and not isinstance(obj, str):
            return self.error(400, "InvalidParameter", "objectName must be a string")
        listing = d.get("bucketListingAction")
        if listing not in (None, "Deny", "ListObjects"):
            return self.error(400, "InvalidParameter", "bucketListingAction must be Deny or ListObjects")
        token = base64.urlsafe_b64encode(os.urandom(48)).decode().rstrip("=")
        par_id = uuid.uuid4().hex
        access_uri = f"/p/{token}/n/{s.namespace}/b/{bucket}/o/"
        if access.startswith("Object"):
            access_uri += urllib.parse.quote(obj, safe="/")
        par = {
            "id": par_id,
            "name": d["name"],
            "accessUri": access_uri,
            "fullPath": f"http://{self.headers.get('host', '127.0.0.1')}{access_uri}",
            "objectName": obj,
            "bucketListingAction": listing,
            "accessType": access,
            "timeExpires": rfc3339(expires),
            "timeCreated": rfc3339(now),
        }
        with s.lock:
            s.pars[token] = {**par, "bucket": bucket, "expires": expires}
            s.par_ids[par_id] = token
        return self.answer(200, json.dumps(par).encode())

    def par_object_call(self, parts):
        """An object reached through a PAR: /p/{token}/n/{ns}/b/{bucket}/o/{object},
        unsigned. Refused (404, as the service does not say which) when the
        PAR is unknown, deleted or expired, or names another bucket or
        object; 405 when its access type does not allow the method."""
        s = self.store
        # parts: ["", "p", token, "n", ns, "b", bucket, "o", object...]
        if len(parts) < 9 or parts[3] != "n" or parts[5] != "b" or parts[7] != "o":
            return self.error(404, "NotFound", "no such API")
        token, ns, bucket = parts[2], parts[4], parts[6]
        name = "/".join(parts[8:])
        with s.lock:
            par = s.par_for(token, s.now())
        if (par is None or ns != s.namespace or bucket != par["bucket"] or bucket not in s.buckets
                or not name or (par["accessType"].startswith("Object") and name != par["objectName"])):
            return self.error(404, "NotAuthorizedOrNotFound", "The pre-authenticated request does not exist, has expired, or does not grant access to this object")
        reads = par["accessType"].endswith("Read") or par["accessType"].endswith("ReadWrite")
        writes = par["accessType"].endswith("Write")
        if not ((self.command in ("GET", "HEAD") and reads) or (self.command == "PUT" and writes)):
            return self.error(405, "MethodNotAllowed", f"{self.command} is not allowed by a {par['accessType']} pre-authenticated request")
        return self.object_call(bucket, name)

    # --- Compute (Core API) ------------------------------------------------
    LAUNCH_MODES = ("NATIVE", "EMULATED", "PARAVIRTUALIZED", "CUSTOM")
    SOURCE_IMAGE_TYPES = ("QCOW2", "VMDK")
    CREATE_IMAGE_FIELDS = ("compartmentId", "definedTags", "displayName", "freeformTags",
                           "imageSourceDetails", "instanceId", "launchMode")
    RETRY_TOKEN_SECS = 24 * 3600

    def compute_call(self, rest, body):
        """rest: the path after /20160918/, split."""
        s = self.store
        if rest == ["images"] and self.command == "POST":
            return self.create_image(body)
        if self.command != "GET" or len(rest) < 2:
            return self.error(404, "NotFound", "no such API")
        with s.lock:
            now = s.now()
            if len(rest) == 2 and rest[0] == "images" and rest[1] in s.images:
                return self.answer(200, json.dumps(s.image_view(rest[1], now)[0]).encode())
            if rest[0] == "workRequests" and rest[1] in s.work_requests and len(rest) in (2, 3):
                _, wr, errors = s.image_view(s.work_requests[rest[1]], now)
                if len(rest) == 2:
                    return self.answer(200, json.dumps(wr).encode())
                if rest[2] == "errors":
                    return self.answer(200, json.dumps(errors).encode())
        return self.error(404, "NotAuthorizedOrNotFound", "Authorization failed or requested resource not found.")

    def image_source(self, src, now):
        """(bucket, object entry) the source names, or (None, (status, code,
        message)); called under the lock."""
        s = self.store
        if not isinstance(src, dict):
            return None, (400, "InvalidParameter", "imageSourceDetails must be an object")
        kind = src.get("sourceType")
        if kind is None:
            return None, (400, "MissingParameter", "imageSourceDetails.sourceType is required")
        fields = {"objectStorageUri": ("sourceUri",),
                  "objectStorageTuple": ("namespaceName", "bucketName", "objectName")}.get(kind)
        if fields is None:
            return None, (400, "InvalidParameter", "imageSourceDetails.sourceType must be objectStorageUri or objectStorageTuple")
        allowed = set(fields) | {"sourceType", "sourceImageType", "operatingSystem", "operatingSystemVersion"}
        for k in src:
            if k not in allowed:
                return None, (400, "InvalidParameter", f"imageSourceDetails.{k} is not a field of {kind}")
        for k in fields:
            if src.get(k) is None:
                return None, (400, "MissingParameter", f"imageSourceDetails.{k} is required")
            if not isinstance(src[k], str) or not src[k]:
                return None, (400, "InvalidParameter", f"imageSourceDetails.{k} must be a non-empty string")
        if src.get("sourceImageType") not in (None,) + self.SOURCE_IMAGE_TYPES:
            return None, (400, "InvalidParameter", "imageSourceDetails.sourceImageType must be QCOW2 or VMDK")
        for k in ("operatingSystem", "operatingSystemVersion"):
            if src.get(k) is not None and not isinstance(src[k], str):
                return None, (400, "InvalidParameter", f"imageSourceDetails.{k} must be a string")
        if kind == "objectStorageTuple":
            ns, bucket, name = src["namespaceName"], src["bucketName"], src["objectName"]
        else:
            url = urllib.parse.urlsplit(src["sourceUri"])
            path = [urllib.parse.unquote(p) for p in url.path.split("/")]
            bad = (400, "InvalidParameter", "imageSourceDetails.sourceUri must be an Object Storage object URL or a pre-authenticated request URL for one")
            if url.scheme not in ("http", "https") or not url.netloc:
                return None, bad
            if len(path) >= 9 and path[1] == "p" and path[3] == "n" and path[5] == "b" and path[7] == "o":
                par = s.par_for(path[2], now)
                ns, bucket, name = path[4], path[6], "/".join(path[8:])
                if (par is None or par["bucket"] != bucket or not par["accessType"].endswith(("Read", "ReadWrite"))
                        or (par["accessType"].startswith("Object") and par["objectName"] != name)):
                    return None, (400, "InvalidParameter", "imageSourceDetails.sourceUri: the pre-authenticated request does not exist, has expired, or does not grant read access to the object")
            elif len(path) >= 7 and path[1] == "n" and path[3] == "b" and path[5] == "o":
                ns, bucket, name = path[2], path[4], "/".join(path[6:])
            else:
                return None, bad
        obj = s.buckets.get(bucket, {}).get(name) if ns == s.namespace else None
        if obj is None:
            return None, (400, "InvalidParameter", f"imageSourceDetails: the object '{name}' in bucket '{bucket}' of namespace '{ns}' was not found")
        return (bucket, obj), None

    def create_image(self, body):
        s = self.store
        try:
            d = json.loads(body or b"")
        except ValueError:
            d = None
        with s.lock:
            s.image_bodies.append(d if d is not None else (body or b"").decode("utf-8", "replace"))
        if not isinstance(d, dict):
            return self.error(400, "InvalidParameter", "CreateImageDetails is not a JSON object")
        for k in d:
            if k not in self.CREATE_IMAGE_FIELDS:
                return self.error(400, "InvalidParameter", f"{k} is not a field of CreateImageDetails")
        comp = d.get("compartmentId")
        if comp is None:
            return self.error(400, "MissingParameter", "compartmentId is required")
        if not isinstance(comp, str) or not comp.startswith(("ocid1.compartment.", "ocid1.tenancy.")):
            return self.error(400, "InvalidParameter", "compartmentId must be a compartment or tenancy OCID")
        if d.get("displayName") is not None and (not isinstance(d["displayName"], str) or not 1 <= len(d["displayName"]) <= 255):
            return self.error(400, "InvalidParameter", "displayName must be a string of 1 to 255 characters")
        if d.get("launchMode") is not None and d["launchMode"] not in self.LAUNCH_MODES:
            return self.error(400, "InvalidParameter", f"launchMode must be one of {', '.join(self.LAUNCH_MODES)}")
        tags = d.get("freeformTags")
        if tags is not None and not (isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values())):
            return self.error(400, "InvalidParameter", "freeformTags must map strings to strings")
        defined = d.get("definedTags")
        if defined is not None and not (isinstance(defined, dict) and all(isinstance(v, dict) for v in defined.values())):
            return self.error(400, "InvalidParameter", "definedTags must map namespaces to maps")
        if d.get("instanceId") is not None:
            return self.error(400, "InvalidParameter", "instanceId: this double imports from Object Storage only (imageSourceDetails)")
        if d.get("imageSourceDetails") is None:
            return self.error(400, "MissingParameter", "imageSourceDetails is required")
        token = self.headers.get("opc-retry-token")
        canonical = json.dumps(d, sort_keys=True)
        with s.lock:
            now = s.now()
            if token is not None:
                seen = s.retry_tokens.get(token)
                if seen is not None and now - seen[2] < self.RETRY_TOKEN_SECS:
                    if seen[0] != canonical:
                        return self.error(409, "Conflict", "The opc-retry-token was used before with a different request body")
                    image, _, _ = s.image_view(seen[1], now)
                    wr = s.images[seen[1]]["work_request"]
                    return self.answer(200, json.dumps(image).encode(), {"opc-work-request-id": wr})
            found, bad = self.image_source(d["imageSourceDetails"], now)
            if bad:
                return self.error(*bad)
            bucket, obj = found
            with open(obj["path"], "rb") as f:  # 512 bytes, under the lock: the entry's own file
                head = f.read(512)
            src = d["imageSourceDetails"]
            image_id = "ocid1.image.oc1.." + base64.b32encode(os.urandom(35)).decode().lower()
            wr_id = "ocid1.coreservicesworkrequest.oc1.." + base64.b32encode(os.urandom(35)).decode().lower()
            image = {
                "id": image_id,
                "compartmentId": comp,
                "displayName": d.get("displayName") or f"image-{time.strftime('%Y%m%d-%H%M', time.gmtime(now))}",
                "launchMode": d.get("launchMode") or "PARAVIRTUALIZED",
                "lifecycleState": "IMPORTING",
                "timeCreated": rfc3339(now),
                "operatingSystem": src.get("operatingSystem") or "Custom",
                "operatingSystemVersion": src.get("operatingSystemVersion") or "Custom",
                "freeformTags": tags or {},
                "definedTags": defined or {},
                "baseImageId": None,
                "createImageAllowed": True,
                "sizeInMBs": None,
            }
            s.images[image_id] = {"image": image, "created_at": now, "size": obj["size"],
                                  "supported": image_format(head) is not None, "work_request": wr_id}
            s.work_requests[wr_id] = image_id
            if token is not None:
                s.retry_tokens[token] = (canonical, image_id, now)
        return self.answer(200, json.dumps(image).encode(), {"opc-work-request-id": wr_id})

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


class Server(ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS at once: past that
    the accept loop waits for one to end."""

    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address):
        self.slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def main():
    port = int(sys.argv[1])
    with open(sys.argv[2]) as f:
        cfg = json.load(f)
    Handler.store = Store(cfg, os.path.dirname(os.path.abspath(sys.argv[2])))
    server = Server(("127.0.0.1", port), Handler)
    # One write, and no more: a test reads these bytes and may close the
    # pipe at once (print, unbuffered, would write the newline after).
    try:
        os.write(sys.stdout.fileno(), b"ready\n")
    except BrokenPipeError:
        pass
    server.serve_forever()


if __name__ == "__main__":
    main()
