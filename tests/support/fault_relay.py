"""A fault-injecting HTTP relay between ferry and a real S3 server, or the OCI
Object Storage double (loopback only).

    python3 fault_relay.py LISTEN_PORT TARGET_PORT CONTROL_JSON [CERT_PEM KEY_PEM]

With CERT_PEM and KEY_PEM it serves HTTPS with that certificate (the target
stays plain HTTP): an endpoint whose certificate a private CA signed.

It forwards HTTP/1.1 requests one by one and, as CONTROL_JSON says (re-read on
every request, so a test can change it while ferry runs), injects faults that
the real server cannot be made to produce on demand:

  {"part_error_every": 10, "error_status": 503}  answer every 10th part upload
      (PUT ...?partNumber= for S3, ?uploadPartNum= for OCI) with the status (503 SlowDown, 500, ...)
  {"part_reset_every": 10}     close the connection in the middle of every 10th part body
  {"flip_bit_in_parts": 1}     flip one bit in the body of the next N part uploads
  {"refuse": true}             refuse new connections (and drop open ones)
  {"part_bytes_per_sec": N}    take part bodies from ferry at N bytes/s, a slow link;
      each part forwarded is logged as "slow <bytes>"
  {"log_requests": true}       log every request line as "req <METHOD> <PATH> HTTP/1.1"
  {"flip_bit_in_gets": 1}      flip one random bit in the body of the next N answers 206
      (Partial Content: object reads by range) with a body, each logged as
      "flipget <request line>". A chunked response is never flipped (nor counted towards N)
  {"flip_min_bytes": M}        with flip_bit_in_gets: only bodies of at least M bytes
      (a part, not an inspection's small read) are flipped
  {"log_parts": true}          log every part body taken from ferry as "part <unix time> <bytes>",
      when its last byte arrived, so a test can measure the rate on the wire
  {"count_gets": true}         log every GET response with status 200 or 206 as
      "get <status> <body bytes> <request line>", so a test can add up what the server
      served; a chunked body counts its raw bytes, chunk framing included

It appends one line per injected fault to CONTROL_JSON + ".log", so a test can
show that faults really happened. Everything else is passed through unchanged.
"""
import json
import os
import random
import socket
import sys
import threading
import time

LISTEN, TARGET, CONTROL = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
TLS = None
if len(sys.argv) == 6:
    import ssl
    TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    TLS.load_cert_chain(sys.argv[4], sys.argv[5])
lock = threading.Lock()
flips_done = 0
get_flips_done = 0
parts_seen = 0


def control():
    try:
        with open(CONTROL) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def note(what):
    with lock, open(CONTROL + ".log", "a") as f:
        f.write(what + "\n")


def read_head(sock, buf):
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None, buf
        buf += chunk
        if len(buf) > 1 << 20:
            return None, buf
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head, rest


def content_length(head):
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return int(v.strip())
    return 0


def read_body(sock, rest, n, rate=0):
    """N body bytes (some already in REST); at most RATE bytes/s if RATE is set."""
    body = bytearray(rest[:n])
    extra = rest[n:]
    start = time.monotonic()
    while len(body) < n:
        chunk = sock.recv(min(64 << 10 if rate else 1 << 20, n - len(body)))
        if not chunk:
            return None, b""
        body += chunk
        if rate:
            time.sleep(max(0.0, len(body) / rate - (time.monotonic() - start)))
    return body, extra


def status_of(head):
    """The status code on a response's first line, or 0 if it has none."""
    words = head.split(b"\r\n", 1)[0].split(b" ", 2)
    return int(words[1]) if len(words) > 1 and words[1].isdigit() else 0


def respond(sock, status, reason, code):
    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
           f'<Message>injected by the test relay</Message></Error>').encode()
    sock.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n\r\n"
                 % (status, reason.encode(), len(xml)) + xml)


def serve(client):
    global flips_done, get_flips_done
    upstream = None
    buf = b""
    try:
        if TLS is not None:
            # A client that refuses the certificate ends the handshake here.
            client.settimeout(10)
            client = TLS.wrap_socket(client, server_side=True)
            client.settimeout(None)
        while True:
            head, rest = read_head(client, buf)
            if head is None:
                return
            c = control()
            if c.get("refuse"):
                return
            global parts_seen
            first = head.split(b"\r\n", 1)[0]
            if c.get("log_requests"):
                note("req " + first.decode(errors="replace"))
            # S3's UploadPart (partNumber=) and OCI's (uploadPartNum=).
            is_part = first.startswith(b"PUT ") and (
                b"partNumber=" in first or b"uploadPartNum=" in first
            )
            n = content_length(head)
            nth = 0
            if is_part:
                with lock:
                    parts_seen += 1
                    nth = parts_seen
            every = lambda k: int(c.get(k, 0)) > 0 and nth % int(c[k]) == 0
            if is_part and every("part_reset_every"):
                # Half of the body arrives, then the connection drops.
                read_body(client, rest, n // 2)
                note("reset " + first.decode(errors="replace"))
                client.shutdown(socket.SHUT_RDWR)
                return
            rate = int(c.get("part_bytes_per_sec", 0)) if is_part else 0
            body, buf = read_body(client, rest, n, rate)
            if body is None:
                return
            if is_part and c.get("log_parts"):
                note(f"part {time.time():.3f} {n}")
            if is_part and every("part_error_every"):
                status = int(c.get("error_status", 503))
                reason, code = {503: ("Slow Down", "SlowDown"), 500: ("Internal Server Error", "InternalError")}.get(status, ("Error", "InternalError"))
                note(f"{status} " + first.decode(errors="replace"))
                respond(client, status, reason, code)
                continue
            if is_part and n > 0:
                with lock:
                    flip = flips_done < int(c.get("flip_bit_in_parts", 0))
                    if flip:
                        flips_done += 1
                if flip:
                    i = random.randrange(n)
                    body[i] ^= 1 << random.randrange(8)
                    note("flip " + first.decode(errors="replace"))
            if upstream is None:
                upstream = socket.create_connection(("127.0.0.1", TARGET))
            upstream.sendall(head + b"\r\n\r\n" + bytes(body))
            # Relay the response: head, then its body by Content-Length.
            uhead, urest = read_head(upstream, b"")
            if uhead is None:
                return
            chunked = b"transfer-encoding: chunked" in uhead.lower()
            if chunked:
                ubody = bytearray(urest)
                while not ubody.endswith(b"0\r\n\r\n"):
                    chunk = upstream.recv(65536)
                    if not chunk:
                        return
                    ubody += chunk
            else:
                un = 0 if first.startswith(b"HEAD ") else content_length(uhead)
                ubody, _ = read_body(upstream, urest, un)
                if ubody is None:
                    return
            status = status_of(uhead)
            if first.startswith(b"GET ") and status in (200, 206):
                # Logged before ferry has the bytes, so the log is complete
                # once its read is.
                if c.get("count_gets"):
                    note(f"get {status} {len(ubody)} " + first.decode(errors="replace"))
                big = len(ubody) >= max(1, int(c.get("flip_min_bytes", 1)))
                if status == 206 and big and not chunked:
                    with lock:
                        flip = get_flips_done < int(c.get("flip_bit_in_gets", 0))
                        if flip:
                            get_flips_done += 1
                    if flip:
                        ubody[random.randrange(len(ubody))] ^= 1 << random.randrange(8)
                        note("flipget " + first.decode(errors="replace"))
            client.sendall(uhead + b"\r\n\r\n" + bytes(ubody))
            if rate:
                note(f"slow {n}")
            if b"connection: close" in uhead.lower():
                return
    except OSError:
        pass
    finally:
        client.close()
        if upstream is not None:
            upstream.close()


def main():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", LISTEN))
    srv.listen(128)
    while True:
        client, _ = srv.accept()
        if control().get("refuse"):
            client.close()
            continue
        threading.Thread(target=serve, args=(client,), daemon=True).start()


if __name__ == "__main__":
    main()
