"""Upload one file with the AWS Common Runtime's own S3 client (PyPI awscrt).

    python crt_put.py FILE BUCKET KEY HOST:PORT PART_MIB [CA_FILE]

Multipart, CRC32C in a header (a trailer halves the CRT's throughput), plain
http (or HTTPS trusting the CAs in CA_FILE), path-style addressing, static credentials from AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY. Exits non-zero on any error.
"""
import os
import sys
import threading

from awscrt import auth, http, io, s3


def main():
    path, bucket, key, hostport, part_mib = sys.argv[1:6]
    ca_file = sys.argv[6] if len(sys.argv) > 6 else None
    size = os.path.getsize(path)
    elg = io.EventLoopGroup()
    bootstrap = io.ClientBootstrap(elg, io.DefaultHostResolver(elg))
    creds = auth.AwsCredentialsProvider.new_static(
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
    tls = {"tls_mode": s3.S3RequestTlsMode.DISABLED}
    if ca_file:
        opts = io.TlsContextOptions()
        opts.override_default_trust_store_from_path(None, ca_file)
        conn = io.ClientTlsContext(opts).new_connection_options()
        conn.set_server_name(hostport.rsplit(":", 1)[0])
        tls = {"tls_mode": s3.S3RequestTlsMode.ENABLED, "tls_connection_options": conn}
    client = s3.S3Client(
        bootstrap=bootstrap, region="us-east-1", credential_provider=creds,
        part_size=int(part_mib) * 1024 * 1024, throughput_target_gbps=20.0, **tls)
    headers = http.HttpHeaders([("Host", hostport), ("Content-Length", str(size)),
                                ("Content-Type", "application/octet-stream")])
    req = http.HttpRequest("PUT", f"/{bucket}/{key}", headers)
    done = threading.Event()
    result = {}

    def on_done(error=None, status_code=None, **_):
        result["error"], result["status"] = error, status_code
        done.set()

    client.make_request(
        type=s3.S3RequestType.PUT_OBJECT, request=req, send_filepath=path,
        checksum_config=s3.S3ChecksumConfig(
            algorithm=s3.S3ChecksumAlgorithm.CRC32C, location=s3.S3ChecksumLocation.HEADER),
        on_done=on_done)
    if not done.wait(3600):
        sys.exit("timed out")
    if result.get("error") is not None:
        sys.exit(f"upload failed: {result['error']} (HTTP {result.get('status')})")


if __name__ == "__main__":
    main()
