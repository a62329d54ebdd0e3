"""Top functions of a Go CPU profile (the server's side of a benchmark).

    python3 benches/pprof_top.py PROFILE.pb.gz [N] [FUNCTION]

Prints the N functions with the most samples of their own (flat) and with the
most samples under them (cumulative), and, given FUNCTION, who calls it. The
profile is what SeaweedFS serves when started with `-debug` (see
tests/support/seaweedfs.sh, WEED_EXTRA): `curl -o cpu.pb.gz
'http://127.0.0.1:16060/debug/pprof/profile?seconds=10'` during an upload.

Written by hand because the usual reader, `go tool pprof`, needs a Go toolchain
that these machines do not have, and the profile is a small gzipped protobuf
(github.com/google/pprof, proto/profile.proto) of which this reads only samples,
locations, functions and the string table.
"""
import collections
import gzip
import sys


def varint(b, i):
    value = shift = 0
    while True:
        c = b[i]
        i += 1
        value |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return value, i


def fields(b):
    """(field number, wire type, value) of one protobuf message."""
    i = 0
    while i < len(b):
        key, i = varint(b, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(b, i)
        elif wire == 2:
            n, i = varint(b, i)
            value, i = b[i:i + n], i + n
        elif wire == 1:
            value, i = b[i:i + 8], i + 8
        elif wire == 5:
            value, i = b[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def ints(wire, value):
    """A repeated integer field, packed or not."""
    if wire == 0:
        return [value]
    out, i = [], 0
    while i < len(value):
        x, i = varint(value, i)
        out.append(x)
    return out


def load(path):
    """Samples as (stack of function names, leaf first; CPU nanoseconds)."""
    data = gzip.decompress(open(path, "rb").read())
    strings, raw, locations, functions = [], [], {}, {}
    for number, wire, value in fields(data):
        if number == 2:  # Sample: location ids, values
            ids, values = [], []
            for n, w, v in fields(value):
                if n == 1:
                    ids += ints(w, v)
                elif n == 2:
                    values += ints(w, v)
            raw.append((ids, values[-1] if values else 0))
        elif number == 4:  # Location: id, lines (function id per inlined frame)
            lid, funcs = 0, []
            for n, _, v in fields(value):
                if n == 1:
                    lid = v
                elif n == 4:
                    funcs += [x for m, _, x in fields(v) if m == 1]
            locations[lid] = funcs
        elif number == 5:  # Function: id, name (string index)
            fid, name = 0, 0
            for n, _, v in fields(value):
                if n == 1:
                    fid = v
                elif n == 2:
                    name = v
            functions[fid] = name
        elif number == 6:
            strings.append(value.decode(errors="replace"))
    return [([strings[functions[f]] for loc in ids for f in locations.get(loc, [])], v)
            for ids, v in raw]


def main():
    samples = load(sys.argv[1])
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    total = sum(v for _, v in samples) or 1
    flat, cum, callers = collections.Counter(), collections.Counter(), collections.Counter()
    for stack, v in samples:
        if stack:
            flat[stack[0]] += v
        for name in set(stack):
            cum[name] += v
        if len(sys.argv) > 3 and sys.argv[3] in stack:
            j = stack.index(sys.argv[3])
            callers[" <- ".join(stack[j + 1:j + 4])] += v
    print(f"{total / 1e9:.2f} CPU s in the profile")
    for title, counts in (("flat", flat), ("cumulative", cum), (f"callers of {sys.argv[3] if len(sys.argv) > 3 else ''}", callers)):
        if counts:
            print(f"--- {title}")
            for name, v in counts.most_common(top):
                print(f"{v / total * 100:5.1f}%  {name}")


if __name__ == "__main__":
    main()
