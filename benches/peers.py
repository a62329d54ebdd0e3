"""ferry against its peers on the same S3 server, in the same run.

Called by benches/peers.sh, which installs the tools and starts SeaweedFS.
Prints (and writes to OUT/peers.md) one table per case with the median of RUNS
runs: wall seconds, MB/s, client CPU seconds per GiB (user+sys of the client's
own process tree, from wait4), peak RSS, each figure's ratio to ferry's, and
the server's CPU seconds per GiB in the same runs (from /proc; not the client's).

Every measurement uploads into buckets made for it and deleted after it (not
timed): SeaweedFS gives a deleted bucket's space back at once, while deleted
objects stay on its volumes until they are compacted.
"""
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.environ["ROOT"]
OUT = os.environ["OUT"]
FERRY = os.path.join(ROOT, "target/release/ferry")
BENCH_BIN = os.path.join(ROOT, ".venv-bench/bin")
PY = os.path.join(BENCH_BIN, "python")
S3_PORT = int(os.environ["S3_PORT"])
ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
BUCKETS = os.environ["BUCKETS"].split(",")
WEED_PID = int(os.environ["WEED_PID"])
SEAWEEDFS_SH = os.path.join(ROOT, "tests/support/seaweedfs.sh")
RUNS = int(os.environ.get("RUNS", "3"))
# Runs of the three-region and WAN cases (each run moves three times the bytes).
RUNS_MULTI = int(os.environ.get("RUNS_MULTI", str(RUNS)))
IMAGE = os.environ["IMAGE"]
WAN_IMAGE = os.environ["WAN_IMAGE"]
WAN_LINKS = [(int(p), float(rtt), float(mbit)) for p, rtt, mbit in
             (x.split(":") for x in os.environ["WAN_LINKS"].split(","))]
PART_MIB = 64
CONC = 8
MEMORY_LIMIT_MIB = 512
TOOLS = ["ferry", "s5cmd", "rclone", "aws", "crt"]
# The sink (benches/sink): one over plain HTTP, three over HTTPS (one per
# region), their pids, and the bundle of the CAs that signed their certificates.
SINK_HTTP = os.environ.get("SINK_HTTP", "")
SINK_HTTPS = [e for e in os.environ.get("SINK_HTTPS", "").split(",") if e]
SINK_CA = os.environ.get("SINK_CA", "")
SINK_PIDS = [int(p) for p in os.environ.get("SINK_PIDS", "").split(",") if p]

ENV = dict(os.environ)
for k in ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
    ENV.pop(k, None)
ENV.update({
    "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
    "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
    "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"],
    "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.path.join(OUT, "aws-config"),
    "FERRY_LOG": "warn",
})
with open(ENV["AWS_CONFIG_FILE"], "w") as f:
    f.write(f"[default]\nregion = us-east-1\ns3 =\n  max_concurrent_requests = {CONC}\n"
            f"  multipart_chunksize = {PART_MIB}MB\n  multipart_threshold = {PART_MIB}MB\n")


def ferry_config(name, endpoints):
    path = os.path.join(OUT, f"ferry-{name}.toml")
    with open(path, "w") as f:
        # ferry's defaults (the mmap reader among them), with every tool's part size and concurrency.
        f.write(f'[transfer]\npart_size = "{PART_MIB}MiB"\nparallel_parts = {CONC}\n'
                f'memory_limit = "{MEMORY_LIMIT_MIB}MiB"\n')
        for i, (bucket, endpoint) in enumerate(endpoints):
            f.write(f'[destinations.r{i}]\nurl = "s3://{bucket}/ferry/"\nendpoint = "{endpoint}"\n')
            if endpoint.startswith("https:"):
                f.write(f'ca_file = "{SINK_CA}"\n')
    return path


def peer_cmd(tool, image, bucket, endpoint):
    key = f"{tool}/{os.path.basename(image)}"
    hostport = endpoint.split("//", 1)[1]
    # HTTPS: each tool told to trust the sink's CAs its own way (s5cmd has
    # no flag for a CA file: it skips verification).
    tls = endpoint.startswith("https:")
    if tool == "s5cmd":
        return [f"{BENCH_BIN}/s5cmd", *(["--no-verify-ssl"] if tls else []),
                "--endpoint-url", endpoint, "cp", "-c", str(CONC),
                "-p", str(PART_MIB), image, f"s3://{bucket}/{key}"]
    if tool == "rclone":
        return [f"{BENCH_BIN}/rclone", "copyto", image, f"bench:{bucket}/{key}",
                "--s3-endpoint", endpoint, "--s3-upload-concurrency", str(CONC),
                "--s3-chunk-size", f"{PART_MIB}M", "--s3-disable-checksum",
                *(["--ca-cert", SINK_CA] if tls else [])]
    if tool == "aws":
        return ["aws", "s3", "cp", image, f"s3://{bucket}/{key}", "--endpoint-url", endpoint,
                "--only-show-errors", *(["--ca-bundle", SINK_CA] if tls else [])]
    if tool == "crt":
        return [PY, os.path.join(ROOT, "benches/crt_put.py"), image, bucket, key, hostport,
                str(PART_MIB), *([SINK_CA] if tls else [])]
    raise ValueError(tool)


_serial = [0]


def fresh_buckets():
    """Three new, empty buckets (one per region) for one measurement."""
    _serial[0] += 1
    names = [f"{b}-{_serial[0]}" for b in BUCKETS]
    subprocess.run([SEAWEEDFS_SH, "bucket", str(S3_PORT), *names], env=ENV, check=True)
    return names


def drop_buckets(names):
    """Deletes the buckets and what is in them; SeaweedFS frees their volumes."""
    for b in names:
        subprocess.run([f"{BENCH_BIN}/s5cmd", "--endpoint-url", ENDPOINT, "rm", f"s3://{b}/*"],
                       env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        subprocess.run(["curl", "-s", "-o", "/dev/null", "-X", "DELETE", "--aws-sigv4",
                        "aws:amz:us-east-1:s3", "--user",
                        f"{ENV['AWS_ACCESS_KEY_ID']}:{ENV['AWS_SECRET_ACCESS_KEY']}",
                        f"{ENDPOINT}/{b}"], env=ENV, timeout=120)


def pid_cpu(pid):
    """CPU seconds process `pid` has used so far (user + system)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu():
    """CPU seconds the SeaweedFS process has used so far."""
    return pid_cpu(WEED_PID)


def sink_cpu():
    """CPU seconds the sinks have used so far, all of them."""
    return sum(pid_cpu(p) for p in SINK_PIDS)


def measure(make):
    """`make(buckets)` gives the commands to run at once against fresh buckets.
    Returns wall, client CPU (sum), peak RSS (sum, MiB), ok, server CPU."""
    buckets = fresh_buckets()
    try:
        return _measure(make(buckets))
    finally:
        drop_buckets(buckets)


# Blocks the clients of the last measurement read from the disk (their
# process trees: wait4's rusage counts the children they waited for), in bytes.
_last_read = [0]


def warm(path):
    """The file's pages into the page cache: ferry releases an image's pages
    once it has shipped it (daemon.keep_cache), so without this the tool
    measured after ferry would read the image from the disk."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


def _measure(cmds, server_cpu=server_cpu, cold=False):
    """`cold`: the caller dropped the image's pages; otherwise every image
    the commands name is in the page cache when the clock starts."""
    if not cold:
        for path in {IMAGE, WAN_IMAGE} & {arg for c in cmds for arg in c}:
            warm(path)
    s0 = server_cpu()
    _last_read[0] = 0
    start = time.monotonic()
    procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for c in cmds]
    cpu, rss, ok = 0.0, 0.0, True
    for p in procs:
        _, status, ru = os.wait4(p.pid, 0)
        err = p.stderr.read().decode(errors="replace")
        p.stderr.close()
        cpu += ru.ru_utime + ru.ru_stime
        rss += ru.ru_maxrss / 1024.0
        _last_read[0] += ru.ru_inblock * 512
        if os.waitstatus_to_exitcode(status) != 0:
            ok = False
            sys.stderr.write(f"FAILED: {' '.join(cmds[0][:3])}...: {err.strip()[-400:]}\n")
    return time.monotonic() - start, cpu, rss, ok, server_cpu() - s0


def table(title, rows, gib_moved, note=""):
    f = rows.get("ferry")
    lines = [f"### {title}", "", note, "",
             "| tool | wall s | MB/s | CPU s/GiB | peak RSS MiB | wall vs ferry | CPU vs ferry | RSS vs ferry | server CPU s/GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for tool, (wall, cpu, rss, ok, scpu, how) in rows.items():
        mbs = gib_moved * 1073.741824 / wall
        cpg = cpu / gib_moved
        ratio = lambda a, b: f"{a / b:.2f}x" if f and b > 0 else "-"
        label = tool + (f" ({how})" if how else "") + ("" if ok else " FAILED")
        lines.append(f"| {label} | {wall:.2f} | {mbs:.0f} | {cpg:.2f} | {rss:.0f} | "
                     f"{ratio(wall, f[0])} | {ratio(cpu, f[1])} | {ratio(rss, f[2])} | "
                     f"{scpu / gib_moved:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    with open(os.path.join(OUT, "peers.md"), "a") as fh:
        fh.write(text + "\n")
    return rows


def med(results):
    ok = all(r[3] for r in results)
    return (statistics.median(r[0] for r in results), statistics.median(r[1] for r in results),
            statistics.median(r[2] for r in results), ok,
            statistics.median(r[4] for r in results))


def ferry_cmd(name, targets, image):
    """`targets`: (bucket, endpoint) pairs, one per region."""
    return [FERRY, "push", "--force", "--config", ferry_config(name, targets), image]


def alternating(runs, measure_tool):
    """Every tool measured `runs` times by `measure_tool(tool)`, the order
    turning by one tool each run. Returns {tool: [results]}, in TOOLS order."""
    res = {t: [] for t in TOOLS}
    for run in range(runs):
        for t in TOOLS[run % len(TOOLS):] + TOOLS[:run % len(TOOLS)]:
            res[t].append(measure_tool(t))
    return res


def cmds_to(tool, name, targets):
    """The commands that send IMAGE to every (bucket, endpoint) of `targets`:
    ferry's one push, or a peer's process per target, run at once."""
    if tool == "ferry":
        return [ferry_cmd(name, targets, IMAGE)]
    return [peer_cmd(tool, IMAGE, b, e) for b, e in targets]


def faster_way(res, single):
    """Rows of a three-region case: ferry's medians, and each peer's faster
    way, three at once (measured) or in sequence (three times `single`)."""
    rows = {}
    for t, r in res.items():
        par = med(r)
        if t == "ferry":
            rows[t] = (*par, "")
            continue
        s = single.get(t)
        seq = (3 * s[0], 3 * s[1], s[2], s[3], 3 * s[4]) if s else None
        rows[t] = (*seq, "in sequence") if seq and seq[0] < par[0] else (*par, "3 at once")
    return rows


def one_region():
    gib = os.path.getsize(IMAGE) / 2**30
    res = alternating(RUNS, lambda t: measure(lambda b: cmds_to(t, "one", [(b[0], ENDPOINT)])))
    rows = {t: (*med(r), "") for t, r in res.items()}
    return table(f"One region: {gib:.0f} GiB image to one bucket", rows, gib,
                 f"Median of {RUNS} runs, tools alternating. Part size {PART_MIB} MiB, "
                 f"{CONC} parts in flight for every tool.")


def three_regions(single):
    """`single`: the one-region medians; three uploads in sequence take three
    times as long and as much CPU, so that way is taken from them, not re-run."""
    gib = os.path.getsize(IMAGE) / 2**30
    res = alternating(RUNS_MULTI, lambda t: measure(
        lambda b: cmds_to(t, "three", [(x, ENDPOINT) for x in b])))
    rows = faster_way(res, single)
    return table(f"Three regions: {gib:.0f} GiB image to three buckets ({RUNS_MULTI} run(s))", rows, gib * 3,
                 "ferry reads once and fans out to three buckets; each peer does the three uploads its "
                 "faster way: three processes at once (measured), or one after another (three times "
                 "its one-region median). MB/s and CPU/GiB count the bytes delivered to all three.")


def sink_one(endpoint, title):
    """One region, to a sink: the client's own ceiling, the server costing
    next to nothing. No fresh buckets: the sink keeps no data."""
    gib = os.path.getsize(IMAGE) / 2**30
    res = alternating(RUNS, lambda t: _measure(
        cmds_to(t, "sink-one", [(BUCKETS[0], endpoint)]), sink_cpu))
    rows = {t: (*med(r), "") for t, r in res.items()}
    return table(f"{title}: {gib:.0f} GiB image to one bucket", rows, gib,
                 f"Median of {RUNS} runs, tools alternating; the sink (benches/sink) counts "
                 f"and discards the bytes. Part size {PART_MIB} MiB, {CONC} parts in flight.")


def sink_three(single):
    """Three regions over HTTPS, a sink each; each peer its faster way."""
    gib = os.path.getsize(IMAGE) / 2**30
    targets = list(zip(BUCKETS, SINK_HTTPS))
    res = alternating(RUNS_MULTI, lambda t: _measure(cmds_to(t, "sink-three", targets), sink_cpu))
    rows = faster_way(res, single)
    return table(f"Sink over HTTPS, three regions: {gib:.0f} GiB image to three sinks "
                 f"({RUNS_MULTI} run(s))", rows, gib * 3,
                 "A sink per region, each with its own certificate. Each peer does the three "
                 "uploads its faster way: three processes at once (measured), or one after "
                 "another (three times its one-region HTTPS median).")


BUSY_CGROUP = "/sys/fs/cgroup/cpu/ferry-bench-busy"


def busy_host(share_pct=25):
    """Three regions over HTTPS with every client held to `share_pct`% of one
    core (a cgroup v1 CPU quota; its children inherit it), as on a host
    whose cores belong to its VMs. Each client's commands run at once."""
    gib = os.path.getsize(IMAGE) / 2**30
    os.makedirs(BUSY_CGROUP, exist_ok=True)
    with open(f"{BUSY_CGROUP}/cpu.cfs_period_us", "w") as f:
        f.write("100000")
    with open(f"{BUSY_CGROUP}/cpu.cfs_quota_us", "w") as f:
        f.write(str(1000 * share_pct))
    held = lambda cmd: ["sh", "-c", f'echo $$ > {BUSY_CGROUP}/tasks && exec "$@"', "held", *cmd]
    targets = list(zip(BUCKETS, SINK_HTTPS))
    res = alternating(RUNS_MULTI, lambda t: _measure(
        [held(c) for c in cmds_to(t, "busy", targets)], sink_cpu))
    rows = {t: (*med(r), "" if t == "ferry" else "3 at once") for t, r in res.items()}
    return table(f"Busy host: every client held to {share_pct}% of one core, {gib:.0f} GiB image "
                 f"to three sinks over HTTPS ({RUNS_MULTI} run(s))", rows, gib * 3,
                 f"A cgroup v1 quota of {share_pct} ms of CPU per 100 ms holds each client's whole "
                 "process tree. MB/s is the throughput delivered to the three regions together.")


def drop_cache(path):
    """The file's pages leave the page cache (they are clean: it was written long ago)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_cache():
    """Three regions over HTTPS, the image's pages dropped before every run;
    beside the usual figures, what each client read from the disk."""
    gib = os.path.getsize(IMAGE) / 2**30
    targets = list(zip(BUCKETS, SINK_HTTPS))
    read = {t: [] for t in TOOLS}

    def cold_run(t):
        drop_cache(IMAGE)
        r = _measure(cmds_to(t, "cold", targets), sink_cpu, cold=True)
        read[t].append(_last_read[0])
        return r

    res = alternating(RUNS_MULTI, cold_run)
    rows = {t: (*med(r), "" if t == "ferry" else "3 at once") for t, r in res.items()}
    table(f"Cold cache: {gib:.0f} GiB image to three sinks over HTTPS, its pages dropped "
          f"before every run ({RUNS_MULTI} run(s))", rows, gib * 3,
          "Each peer's three uploads at once (they share what one of them reads into the cache).")
    size = os.path.getsize(IMAGE)
    lines = ["| tool | read from disk MiB (median) | x the image's size |", "|---|---|---|"]
    for t, r in read.items():
        m = statistics.median(r)
        lines.append(f"| {t} | {m / 2**20:.0f} | {m / size:.2f}x |")
    text = ("Bytes read from the disk by each client's process tree (`wait4`'s `ru_inblock`), "
            "median of the runs:\n\n" + "\n".join(lines) + "\n")
    print(text, flush=True)
    with open(os.path.join(OUT, "peers.md"), "a") as fh:
        fh.write(text + "\n")


def manifest_finished(bucket, image):
    """When ferry's manifest says the object in `bucket` was verified (epoch s)."""
    out = subprocess.run([f"{BENCH_BIN}/s5cmd", "--endpoint-url", ENDPOINT, "cat",
                          f"s3://{bucket}/ferry/{os.path.basename(image)}.manifest.json"],
                         env=ENV, capture_output=True, timeout=60)
    finished = json.loads(out.stdout)["finished_at"].replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(finished).timestamp()


def wan_run(tool, endpoints, image):
    """One WAN run into fresh buckets. Returns the usual figures and, per link,
    the seconds from the start until that region's copy was complete: a peer
    process's exit, or the finish time in ferry's manifest for that region."""
    buckets = fresh_buckets()
    try:
        if tool == "ferry":
            cmds = [ferry_cmd("wan", list(zip(buckets, endpoints)), image)]
        else:
            cmds = [peer_cmd(tool, image, b, e) for b, e in zip(buckets, endpoints)]
        warm(image)
        s0, t0, start = server_cpu(), time.time(), time.monotonic()
        procs = {subprocess.Popen(c, env=ENV, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL).pid: n for n, c in enumerate(cmds)}
        ended, cpu, rss, ok = {}, 0.0, 0.0, True
        while procs:
            pid, status, ru = os.wait4(-1, 0)
            n = procs.pop(pid, None)
            if n is None:
                continue
            ended[n] = time.time() - t0
            cpu += ru.ru_utime + ru.ru_stime
            rss += ru.ru_maxrss / 1024.0
            ok = ok and os.waitstatus_to_exitcode(status) == 0
        wall = time.monotonic() - start
        if tool == "ferry":
            links = [manifest_finished(b, image) - t0 for b in buckets]
        else:
            links = [ended[n] for n in range(len(cmds))]
        return (wall, cpu, rss, ok, server_cpu() - s0), links
    finally:
        drop_buckets(buckets)


def wan():
    gib = os.path.getsize(WAN_IMAGE) / 2**30
    mb = gib * 1073.741824
    endpoints = [f"http://127.0.0.1:{p}" for p, _, _ in WAN_LINKS]
    caps = [m / 8 for _, _, m in WAN_LINKS]
    res, per_link = {"ferry": [], "s5cmd": []}, {"ferry": [], "s5cmd": []}
    for _ in range(RUNS_MULTI):
        for t in res:
            figures, links = wan_run(t, endpoints, WAN_IMAGE)
            res[t].append(figures)
            per_link[t].append(links)
    rows = {t: (*med(r), "" if t == "ferry" else "3 at once") for t, r in res.items()}
    desc = ", ".join(f"{rtt:.0f} ms / {m:.0f} Mbit/s" for _, rtt, m in WAN_LINKS)
    table(f"WAN: {gib:.0f} GiB image to three regions behind link emulators ({RUNS_MULTI} run(s))",
          rows, gib * 3, f"Links (round trip / cap): {desc}; the caps sum to {sum(caps):.1f} MB/s. "
          "Wall time is set by the slowest link.")
    lines = ["| tool | " + " | ".join(f"link {i + 1} MB/s (cap {c:.0f})" for i, c in enumerate(caps))
             + " | sum MB/s | % of summed caps | each run |",
             "|---" * (len(caps) + 4) + "|"]
    pct = lambda secs: 100 * sum(mb / x for x in secs) / sum(caps)
    for t, runs in per_link.items():
        secs = [statistics.median(r[i] for r in runs) for i in range(len(caps))]
        rates = [mb / x for x in secs]
        lines.append(f"| {t} | " + " | ".join(f"{r:.1f}" for r in rates)
                     + f" | {sum(rates):.1f} | {pct(secs):.0f}% | "
                     + ", ".join(f"{pct(r):.1f}%" for r in runs) + " |")
    text = ("Per link: the image's size over the time until that region's copy was complete "
            "(median of the runs), against the link's cap; then the sum's share of the caps "
            "in each run, in order.\n\n" + "\n".join(lines) + "\n")
    print(text, flush=True)
    with open(os.path.join(OUT, "peers.md"), "a") as fh:
        fh.write(text + "\n")


if __name__ == "__main__":
    which = sys.argv[1:] or ["one", "three", "wan", "sink", "sink3", "busy", "cold"]
    open(os.path.join(OUT, "peers.md"), "w").close()
    single = {}
    if "one" in which or "three" in which:
        single = one_region()
    if "three" in which:
        three_regions(single)
    if "wan" in which:
        wan()
    if "sink" in which:
        sink_one(SINK_HTTP, "Sink over HTTP, one region")
    if "sink" in which or "sink3" in which:
        single_tls = sink_one(SINK_HTTPS[0], "Sink over HTTPS, one region")
    if "sink3" in which:
        sink_three(single_tls)
    if "busy" in which:
        busy_host()
    if "cold" in which:
        cold_cache()
