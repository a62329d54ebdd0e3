"""ferry against its peers on the same S3 server, in the same run.

Called by benches/peers.sh, which installs the tools and starts SeaweedFS.
Prints (and writes to OUT/peers.md) one table per case with the median of RUNS
runs: wall seconds, MB/s, client CPU seconds per GiB (user+sys of the client's
own process tree, from wait4), peak RSS, and each figure's ratio to ferry's.
"""
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
        # ferry's best settings here: the mmap reader (no copy into buffers).
        f.write(f'[transfer]\npart_size = "{PART_MIB}MiB"\nparallel_parts = {CONC}\n'
                f'memory_limit = "{MEMORY_LIMIT_MIB}MiB"\nreader = "mmap"\n')
        for i, (bucket, endpoint) in enumerate(endpoints):
            f.write(f'[destinations.r{i}]\nurl = "s3://{bucket}/ferry/"\nendpoint = "{endpoint}"\n')
    return path


def peer_cmd(tool, image, bucket, endpoint):
    key = f"{tool}/{os.path.basename(image)}"
    hostport = endpoint.split("//", 1)[1]
    if tool == "s5cmd":
        return [f"{BENCH_BIN}/s5cmd", "--endpoint-url", endpoint, "cp", "-c", str(CONC),
                "-p", str(PART_MIB), image, f"s3://{bucket}/{key}"]
    if tool == "rclone":
        return [f"{BENCH_BIN}/rclone", "copyto", image, f"bench:{bucket}/{key}",
                "--s3-endpoint", endpoint, "--s3-upload-concurrency", str(CONC),
                "--s3-chunk-size", f"{PART_MIB}M", "--s3-disable-checksum"]
    if tool == "aws":
        return ["aws", "s3", "cp", image, f"s3://{bucket}/{key}", "--endpoint-url", endpoint,
                "--only-show-errors"]
    if tool == "crt":
        return [PY, os.path.join(ROOT, "benches/crt_put.py"), image, bucket, key, hostport,
                str(PART_MIB)]
    raise ValueError(tool)


def cleanup():
    """Deletes every uploaded object and compacts the volumes, so the server's
    disk does not fill over 40-odd multi-GiB uploads (not timed)."""
    for b in BUCKETS:
        subprocess.run([f"{BENCH_BIN}/s5cmd", "--endpoint-url", ENDPOINT, "rm", f"s3://{b}/*"],
                       env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([os.path.join(ROOT, ".venv-test/bin/weed"), "shell",
                    f"-master=127.0.0.1:{S3_PORT + 1}"],
                   input=b"volume.vacuum -garbageThreshold=0.0001\n", env=ENV,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)


def measure(cmds):
    """Runs commands at once; returns wall, CPU (sum), peak RSS (sum, MiB), ok."""
    cleanup()
    return _measure(cmds)


def _measure(cmds):
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
        if os.waitstatus_to_exitcode(status) != 0:
            ok = False
            sys.stderr.write(f"FAILED: {' '.join(cmds[0][:3])}...: {err.strip()[-400:]}\n")
    return time.monotonic() - start, cpu, rss, ok


def sequence(cmds):
    walls, cpu, rss, ok = 0.0, 0.0, 0.0, True
    for c in cmds:
        w, u, r, k = measure([c])
        walls, cpu, rss, ok = walls + w, cpu + u, max(rss, r), ok and k
    return walls, cpu, rss, ok


def table(title, rows, gib_moved, note=""):
    f = rows.get("ferry")
    lines = [f"### {title}", "", note, "",
             "| tool | wall s | MB/s | CPU s/GiB | peak RSS MiB | wall vs ferry | CPU vs ferry | RSS vs ferry |",
             "|---|---|---|---|---|---|---|---|"]
    for tool, (wall, cpu, rss, ok, how) in rows.items():
        mbs = gib_moved * 1073.741824 / wall
        cpg = cpu / gib_moved
        ratio = lambda a, b: f"{a / b:.2f}x" if f and b > 0 else "-"
        label = tool + (f" ({how})" if how else "") + ("" if ok else " FAILED")
        lines.append(f"| {label} | {wall:.2f} | {mbs:.0f} | {cpg:.2f} | {rss:.0f} | "
                     f"{ratio(wall, f[0])} | {ratio(cpu, f[1])} | {ratio(rss, f[2])} |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    with open(os.path.join(OUT, "peers.md"), "a") as fh:
        fh.write(text + "\n")
    return rows


def med(results):
    ok = all(r[3] for r in results)
    return (statistics.median(r[0] for r in results), statistics.median(r[1] for r in results),
            statistics.median(r[2] for r in results), ok)


def one_region():
    gib = os.path.getsize(IMAGE) / 2**30
    cfg = ferry_config("one", [(BUCKETS[0], ENDPOINT)])
    res = {t: [] for t in TOOLS}
    for run in range(RUNS):
        order = TOOLS[run % len(TOOLS):] + TOOLS[:run % len(TOOLS)]
        for t in order:
            if t == "ferry":
                cmd = [FERRY, "push", "--force", "--config", cfg, IMAGE]
            else:
                cmd = peer_cmd(t, IMAGE, BUCKETS[0], ENDPOINT)
            res[t].append(measure([cmd]))
    rows = {t: (*med(r), "") for t, r in res.items()}
    return table(f"One region: {gib:.0f} GiB image to one bucket", rows, gib,
                 f"Median of {RUNS} runs, tools alternating. Part size {PART_MIB} MiB, "
                 f"{CONC} parts in flight for every tool.")


def three_regions(single):
    """`single`: the one-region medians; three uploads in sequence take three
    times as long and as much CPU, so that way is taken from them, not re-run."""
    gib = os.path.getsize(IMAGE) / 2**30
    cfg = ferry_config("three", [(b, ENDPOINT) for b in BUCKETS[:3]])
    res = {}
    for run in range(RUNS_MULTI):
        order = TOOLS[run % len(TOOLS):] + TOOLS[:run % len(TOOLS)]
        for t in order:
            if t == "ferry":
                cmd = [[FERRY, "push", "--force", "--config", cfg, IMAGE]]
            else:
                cmd = [peer_cmd(t, IMAGE, b, ENDPOINT) for b in BUCKETS[:3]]
            res.setdefault(t, []).append(measure(cmd))
    rows = {}
    for t, r in res.items():
        par = med(r)
        if t == "ferry":
            rows[t] = (*par, "")
            continue
        s = single.get(t)
        seq = (3 * s[0], 3 * s[1], s[2], s[3]) if s else None
        rows[t] = (*seq, "in sequence") if seq and seq[0] < par[0] else (*par, "3 at once")
    return table(f"Three regions: {gib:.0f} GiB image to three buckets ({RUNS_MULTI} run(s))", rows, gib * 3,
                 "ferry reads once and fans out to three buckets; each peer does the three uploads its "
                 "faster way: three processes at once (measured), or one after another (three times "
                 "its one-region median). MB/s and CPU/GiB count the bytes delivered to all three.")


def wan():
    gib = os.path.getsize(WAN_IMAGE) / 2**30
    endpoints = [f"http://127.0.0.1:{p}" for p, _, _ in WAN_LINKS]
    cfg = ferry_config("wan", list(zip(BUCKETS[:3], endpoints)))
    cap_mbs = sum(m for _, _, m in WAN_LINKS) / 8
    res = {"ferry": [], "s5cmd": []}
    for _ in range(RUNS_MULTI):
        res["ferry"].append(measure([[FERRY, "push", "--force", "--config", cfg, WAN_IMAGE]]))
        res["s5cmd"].append(measure([peer_cmd("s5cmd", WAN_IMAGE, b, e)
                                     for b, e in zip(BUCKETS[:3], endpoints)]))
    rows = {t: (*med(r), "" if t == "ferry" else "3 at once") for t, r in res.items()}
    links = ", ".join(f"{rtt:.0f} ms / {m:.0f} Mbit/s" for _, rtt, m in WAN_LINKS)
    table(f"WAN: {gib:.0f} GiB image to three regions behind link emulators ({RUNS_MULTI} run(s))", rows, gib * 3,
          f"Links (round trip / cap): {links}; the caps sum to {cap_mbs:.1f} MB/s.")
    f = rows["ferry"]
    total = gib * 3 * 1073.741824 / f[0]
    line = (f"WAN: ferry moved {total:.1f} MB/s in total = {100 * total / cap_mbs:.0f}% "
            f"of the links' summed caps ({cap_mbs:.1f} MB/s)\n")
    print(line)
    with open(os.path.join(OUT, "peers.md"), "a") as fh:
        fh.write(line + "\n")


if __name__ == "__main__":
    which = sys.argv[1:] or ["one", "three", "wan"]
    open(os.path.join(OUT, "peers.md"), "w").close()
    single = {}
    if "one" in which or "three" in which:
        single = one_region()
    if "three" in which:
        three_regions(single)
    if "wan" in which:
        wan()
