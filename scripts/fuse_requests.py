#!/usr/bin/env python3
"""FUSE requests of one mount, by opcode, from the kernel's own tracepoints.

  fuse_requests.py record MNT OUT.json -- CMD...   runs CMD; writes, per opcode of MNT's
                                                   connection, the count and the summed time
                                                   from send to answer
  fuse_requests.py report OUT_DIR                  one markdown table per workload from the
                                                   FS.WORKLOAD.json files there

The tracepoints fuse:fuse_request_send and fuse:fuse_request_end (Linux 6.16 and later) see
every request of every FUSE filesystem alike, so peers that expose no counter of their own are
counted the same way as encfsd and the floor. The time per request is the kernel's: from the
request being queued to its answer arriving, so it includes the wait for a free daemon thread;
the mean is over the requests answered while tracing (FORGET has no answer). The trace clock is
`mono`, one clock for the send and the answer whichever CPUs stamp them.
Needs root (tracefs). Each run uses a trace instance of its own and removes it.
"""
import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

TRACEFS = "/sys/kernel/tracing"
RUN_ORDER = ["untar", "ls-lR", "read-all", "rm-rf", "create-fsync"]
SEND = re.compile(r"\s(\d+\.\d+): fuse_request_send: connection \d+ req (\d+) opcode \d+ \((\w+)\)")
END = re.compile(r"\s(\d+\.\d+): fuse_request_end: connection \d+ req (\d+) ")


def available():
    if os.geteuid() != 0:
        sys.exit("fuse_requests: needs root (tracefs)")
    if not os.path.isdir(TRACEFS + "/events"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return os.path.isdir(TRACEFS + "/events/fuse/fuse_request_send")


def record(mnt, out, cmd):
    if not available():
        sys.exit("fuse_requests: this kernel has no fuse:fuse_request_send tracepoint (Linux 6.16 or later)")
    # The connection number is the minor of the mount's anonymous device.
    connection = os.minor(os.stat(mnt).st_dev)
    inst = "%s/instances/encfsd-requests-%d" % (TRACEFS, os.getpid())
    # A timeout's SIGTERM must still remove the instance (its buffers are kernel memory).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.mkdir(inst)

    def put(path, value):
        with open(inst + "/" + path, "w") as f:
            f.write(value)
    try:
        # Two events per request, about 100 bytes each: room for a million requests in all
        # (the size is per CPU).
        put("trace_clock", "mono")
        put("buffer_size_kb", str(max(4096, 262144 // (os.cpu_count() or 1))))
        for event in ("fuse_request_send", "fuse_request_end"):
            put("events/fuse/%s/filter" % event, "connection == %d" % connection)
            put("events/fuse/%s/enable" % event, "1")
        t0 = time.monotonic()
        rc = subprocess.call(cmd, stdout=subprocess.DEVNULL)
        wall = time.monotonic() - t0
        put("tracing_on", "0")
        pending, count, answered, seconds = {}, collections.Counter(), collections.Counter(), collections.defaultdict(float)
        with open(inst + "/trace") as f:
            for line in f:
                m = SEND.search(line)
                if m:
                    op = m.group(3).removeprefix("FUSE_")
                    pending[m.group(2)] = (float(m.group(1)), op)
                    count[op] += 1
                    continue
                m = END.search(line)
                if m and m.group(2) in pending:
                    sent, op = pending.pop(m.group(2))
                    seconds[op] += float(m.group(1)) - sent
                    answered[op] += 1
        overrun = sum(int(line.split(":")[1]) for cpu in os.listdir(inst + "/per_cpu")
                      for line in open("%s/per_cpu/%s/stats" % (inst, cpu)) if line.startswith("overrun:"))
    finally:
        for event in ("fuse_request_send", "fuse_request_end"):
            try:
                put("events/fuse/%s/enable" % event, "0")
            except OSError:
                pass
        os.rmdir(inst)
    json.dump({"wall": wall, "rc": rc, "overrun": overrun,
               "ops": {op: [n, seconds[op], answered[op]] for op, n in count.items()}}, open(out, "w"))
    return rc


def report(directory):
    runs = collections.defaultdict(dict)  # workload -> fs -> data
    order = []
    for name in sorted(os.listdir(directory)):
        m = re.fullmatch(r"(\d+)-([\w-]+)\.([\w-]+)\.json", name)
        if m:
            fs, workload = m.group(2), m.group(3)
            runs[workload][fs] = json.load(open(os.path.join(directory, name)))
            if fs not in order:
                order.append(fs)
    for workload, per_fs in sorted(runs.items(), key=lambda w: RUN_ORDER.index(w[0]) if w[0] in RUN_ORDER else 99):
        fss = [fs for fs in order if fs in per_fs]
        ops = sorted({op for d in per_fs.values() for op in d["ops"]},
                     key=lambda op: -max(d["ops"].get(op, [0, 0])[1] for d in per_fs.values()))
        print("#### %s: requests, and mean µs from send to answer\n" % workload)
        print("| opcode | " + " | ".join(fss) + " |")
        print("|---|" + "---:|" * len(fss))
        for op in ops:
            cells = []
            for fs in fss:
                n, s, answered = (per_fs[fs]["ops"].get(op, [0, 0.0, 0]) + [None])[:3]
                answered = n if answered is None else answered  # forgets are never answered
                cells.append("%s × %.1f" % (format(n, ","), s / answered * 1e6) if answered else
                             ("%s × –" % format(n, ",") if n else "–"))
            print("| %s | %s |" % (op, " | ".join(cells)))
        total = lambda d: (sum(v[0] for v in d["ops"].values()), sum(v[1] for v in d["ops"].values()))
        print("| **all** | " + " | ".join("%s, %.0f ms" % (format(total(per_fs[fs])[0], ","), total(per_fs[fs])[1] * 1e3) for fs in fss) + " |")
        print("| wall | " + " | ".join("%.2f s%s" % (per_fs[fs]["wall"], "" if per_fs[fs]["rc"] == 0 else " (exit %d)" % per_fs[fs]["rc"]) for fs in fss) + " |")
        if any(per_fs[fs]["overrun"] for fs in fss):
            print("\n(the trace buffer overran for some runs: their counts are low)")
        print()


def main(argv):
    if len(argv) >= 5 and argv[1] == "record" and argv[4] == "--":
        return record(argv[2], argv[3], argv[5:])
    if len(argv) == 3 and argv[1] == "report":
        report(argv[2])
        return 0
    if len(argv) == 2 and argv[1] == "available":
        return 0 if available() else 1
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
