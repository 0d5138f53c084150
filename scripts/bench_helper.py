#!/usr/bin/env python3
"""Helpers for scripts/bench.sh: the small-file test, an O_DIRECT probe, fio result parsing,
and the Markdown report built from the raw results (one `backing round fs metric value` per line).

Subcommands:
  smallfiles DIR COUNT SIZE   create COUNT files of SIZE bytes in DIR, fsync after each; prints seconds
  odirect-probe DIR           exit 0 if O_DIRECT open + aligned pread/pwrite works in DIR, else 1
  fio-iops JSON               prints the IOPS of the (single) job in a fio JSON output file
  status-requests             reads `encfsd status --json` (one mount) on stdin; prints the FUSE
                              requests it has had, forgets included
  report RESULTS META OUT     prints the Markdown tables and writes header + tables to OUT
                              (META: tab-separated lines, see load_meta)
  scale DIR COUNT [PID]       a COUNT-file tree in DIR (1,000 per directory, 4 clients at once):
                              create, stat every entry, read every file, rename, remove; prints
                              one "phase seconds" line per phase, and the most descriptors PID
                              (the daemon) held
"""
import json
import mmap
import os
import statistics
import sys
import time

FS_ORDER = ["plain", "floor", "encfsd", "baseline", "gocryptfs", "securefs", "cryfs"]
PEERS = ["gocryptfs", "securefs", "cryfs"]
# Columns where a ratio to the floor (passthrough_hp, no crypto, no state) says nothing.
NOT_AGAINST_FLOOR = {"rss_mib"}

# key, header, higher_is_better, format
COLUMNS = [
    ("write_mbs", "stream write MB/s", True, "{:.0f}"),
    ("read_mbs", "stream read MB/s", True, "{:.0f}"),
    ("untar_s", "untar s", False, "{:.2f}"),
    ("lslr_s", "ls -lR s", False, "{:.2f}"),
    ("cat_s", "read all files s", False, "{:.2f}"),
    ("rm_s", "rm -rf s", False, "{:.2f}"),
    ("rr1", "randread qd1 IOPS", True, "{:,.0f}"),
    ("rw1", "randwrite qd1 IOPS", True, "{:,.0f}"),
    ("rr16", "randread qd16 IOPS", True, "{:,.0f}"),
    ("rw16", "randwrite qd16 IOPS", True, "{:,.0f}"),
    ("small_fps", "create+fsync 4K files/s", True, "{:,.0f}"),
    ("rss_mib", "daemon peak RSS MiB", False, "{:.0f}"),
]


def smallfiles(d, count, size):
    data = os.urandom(size)
    t0 = time.monotonic()
    for i in range(count):
        fd = os.open(os.path.join(d, "f%05d" % i), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    print("%.6f" % (time.monotonic() - t0))


def scale(d, count, pid=None):
    from concurrent.futures import ThreadPoolExecutor
    per_dir = 1000
    dirs = [os.path.join(d, "d%05d" % k) for k in range((count + per_dir - 1) // per_dir)]
    most = [0]

    def names(k):
        return [(os.path.join(dirs[k], "f%07d" % i), i) for i in range(k * per_dir, min(count, (k + 1) * per_dir))]

    def create(k):
        os.mkdir(dirs[k])
        for p, i in names(k):
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, b"%d\n" % i)
            os.close(fd)

    def stat_all(k):
        with os.scandir(dirs[k]) as it:
            for e in it:
                e.stat(follow_symlinks=False)

    def read_all(k):
        for p, i in names(k):
            with open(p, "rb") as f:
                if f.read() != b"%d\n" % i:
                    raise SystemExit("wrong contents in " + p)

    def rename_all(k):
        for p, i in names(k):
            os.rename(p, p + ".r")

    def remove_all(k):
        for p, i in names(k):
            os.unlink(p + ".r")
        os.rmdir(dirs[k])

    def descriptors():
        if pid:
            most[0] = max(most[0], len(os.listdir("/proc/%s/fd" % pid)))

    with ThreadPoolExecutor(max_workers=4) as pool:
        for name, step in (("create", create), ("stat", stat_all), ("read", read_all),
                           ("rename", rename_all), ("remove", remove_all)):
            if name in ("stat", "read"):
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3")
            t0 = time.monotonic()
            for future in [pool.submit(step, k) for k in range(len(dirs))]:
                future.result()
                descriptors()
            print("%s %.6f" % (name, time.monotonic() - t0))
    print("descriptors %d" % most[0])


def odirect_probe(d):
    path = os.path.join(d, ".odirect-probe")
    try:
        with open(path, "wb") as f:
            f.write(os.urandom(8192))
        buf = mmap.mmap(-1, 4096)  # page-aligned
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            if os.preadv(fd, [buf], 4096) != 4096:
                return 1
            if os.pwritev(fd, [buf], 0) != 4096:
                return 1
        finally:
            os.close(fd)
        return 0
    except OSError as e:
        print("O_DIRECT refused: %s" % (e.strerror or e), file=sys.stderr)
        return 1
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


# FUSE requests per operation (key, what one operation is); encfsd and the floor only.
REQUEST_COLUMNS = [
    ("untar_req", "untar, per file"),
    ("lslr_req", "ls -lR, per entry"),
    ("cat_req", "read all files, per file"),
    ("rm_req", "rm -rf, per entry"),
    ("write_req", "stream write, per MiB"),
]


def status_requests():
    reports = json.load(sys.stdin)
    if len(reports) != 1 or reports[0].get("requests") is None:
        raise SystemExit("expected one mount with a request count, got %r" % reports)
    print(reports[0]["requests"] + reports[0].get("forget_requests", 0))


def fio_iops(path):
    with open(path) as f:
        text = f.read()
    # fio may print warnings before the JSON document
    d = json.loads(text[text.index("{"):])
    job = d["jobs"][0]
    if job.get("error"):
        raise SystemExit("fio job error %s" % job["error"])
    iops = job["read"]["iops"] + job["write"]["iops"]
    print("%.1f" % iops)


def load_results(path):
    """-> {backing: {fs: {metric: [values]}}}; non-numeric values (ERR) are kept as failures."""
    res = {}
    fails = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 5:
                continue
            backing, _rnd, fs, metric, value = parts
            try:
                v = float(value)
            except ValueError:
                fails.setdefault(backing, {}).setdefault(fs, {}).setdefault(metric, 0)
                fails[backing][fs][metric] += 1
                continue
            res.setdefault(backing, {}).setdefault(fs, {}).setdefault(metric, []).append(v)
    return res, fails


def ratio_row(cells, excluded, against):
    """cells: {fs: {metric: median}} -> list of strings (encfsd / the best of `against`, >1 =
    encfsd better). excluded: {(fs, metric)} cells that are not comparable (e.g. buffered
    instead of direct I/O)."""
    out = []
    for key, _h, higher, _fmt in COLUMNS:
        e = cells.get("encfsd", {}).get(key)
        peers = [cells[p][key] for p in against
                 if p in cells and key in cells[p] and (p, key) not in excluded]
        if e is None or not peers or e == 0:
            out.append("–")
            continue
        best = max(peers) if higher else min(peers)
        r = (e / best) if higher else (best / e)
        out.append("**%.2f**" % r)
    return out


def tables(res, fails, meta):
    md = []
    for backing in meta["backings"]:
        data = res.get(backing, {})
        f = fails.get(backing, {})
        fss = [fs for fs in FS_ORDER if fs in meta["filesystems"]]
        md.append("### Backing: %s (medians of %d round%s)" % (
            backing, meta["rounds"], "" if meta["rounds"] == 1 else "s"))
        md.append("")
        md.append("Higher is better for MB/s, IOPS and files/s; lower is better for seconds and RSS. "
                  "In the last row, **> 1 means encfsd is better** than the best peer "
                  "(gocryptfs, securefs, CryFS) in that column: rate columns are encfsd / best, "
                  "time and memory columns are best / encfsd.")
        md.append("")
        md.append("| filesystem | " + " | ".join(h for _k, h, _hb, _f in COLUMNS) + " |")
        md.append("|---|" + "---:|" * len(COLUMNS))
        medians = {}
        for fs in fss:
            row = []
            for key, _h, _hb, fmt in COLUMNS:
                vals = data.get(fs, {}).get(key, [])
                nfail = f.get(fs, {}).get(key, 0)
                if vals:
                    m = statistics.median(vals)
                    medians.setdefault(fs, {})[key] = m
                    cell = fmt.format(m)
                    if nfail:
                        cell += " (%d failed)" % nfail
                elif nfail:
                    cell = "FAIL"
                else:
                    cell = "–"
                note = meta.get("cell_notes", {}).get("%s/%s/%s" % (backing, fs, key))
                if note:
                    cell += note
                row.append(cell)
            md.append("| %s | %s |" % (fs, " | ".join(row)))
        excluded = {(fs, key) for fs in fss for key, _h, _hb, _f in COLUMNS
                    if "%s/%s/%s" % (backing, fs, key) in meta.get("cell_notes", {})}
        md.append("| encfsd / best peer | %s |" % " | ".join(ratio_row(medians, excluded, PEERS)))
        if "baseline" in fss:
            md.append("| encfsd / baseline | %s |" % " | ".join(ratio_row(medians, excluded, ["baseline"])))
        if "floor" in fss:
            floor_excluded = excluded | {("floor", k) for k in NOT_AGAINST_FLOOR}
            md.append("| encfsd / floor | %s |" % " | ".join(ratio_row(medians, floor_excluded, ["floor"])))
        if excluded:
            md.append("")
            md.append("† not comparable (see notes), left out of the best-peer ratio.")
        md.append("")
        counted = [fs for fs in ("floor", "encfsd", "baseline") if fs in fss and any(
            data.get(fs, {}).get(k) for k, _h in REQUEST_COLUMNS)]
        if counted:
            md.append("FUSE requests per operation (medians; encfsd from `encfsd status`, the floor "
                      "from its counting build; forgets included, the counter reads themselves not):")
            md.append("")
            md.append("| filesystem | " + " | ".join(h for _k, h in REQUEST_COLUMNS) + " |")
            md.append("|---|" + "---:|" * len(REQUEST_COLUMNS))
            for fs in counted:
                for suffix, label, fmt in (("_req", "", "%.2f"), ("_usreq", " (µs per request)", "%.1f")):
                    row = []
                    for key, _h in REQUEST_COLUMNS:
                        vals = data.get(fs, {}).get(key[:-len("_req")] + suffix, [])
                        row.append(fmt % statistics.median(vals) if vals else "–")
                    md.append("| %s%s | %s |" % (fs, label, " | ".join(row)))
            md.append("")
            md.append("µs per request: the workload's time over its requests (requests overlap, so "
                      "this is the time the workload spends per round trip, not one request's latency).")
            md.append("")
        if meta["rounds"] > 1:
            md.append("Spread over rounds, (max − min) / median, per cell:")
            md.append("")
            md.append("| filesystem | " + " | ".join(h for _k, h, _hb, _f in COLUMNS) + " |")
            md.append("|---|" + "---:|" * len(COLUMNS))
            for fs in fss:
                row = []
                for key, _h, _hb, _fmt in COLUMNS:
                    vals = data.get(fs, {}).get(key, [])
                    if len(vals) > 1 and statistics.median(vals):
                        row.append("%.0f%%" % (100 * (max(vals) - min(vals)) / statistics.median(vals)))
                    else:
                        row.append("–")
                md.append("| %s | %s |" % (fs, " | ".join(row)))
            md.append("")
    return md


def load_meta(path):
    """Tab-separated lines: rounds N | backings a b | filesystems a b | date D |
    header KEY VALUE | note TEXT | cellnote BACKING/FS/METRIC TEXT."""
    meta = {"header": [], "notes": [], "cell_notes": {}, "rounds": 1,
            "backings": [], "filesystems": [], "date": ""}
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            k = parts[0]
            if k == "rounds":
                meta["rounds"] = int(parts[1])
            elif k in ("backings", "filesystems"):
                meta[k] = parts[1].split()
            elif k == "date":
                meta["date"] = parts[1]
            elif k == "header":
                meta["header"].append((parts[1], parts[2]))
            elif k == "note":
                if parts[1] not in meta["notes"]:
                    meta["notes"].append(parts[1])
            elif k == "cellnote":
                meta["cell_notes"][parts[1]] = parts[2]
    return meta


def report(results_path, meta_path, out_path):
    meta = load_meta(meta_path)
    res, fails = load_results(results_path)
    body = tables(res, fails, meta)
    tail = []
    if meta.get("notes"):
        tail += ["## Notes", ""] + ["- " + n for n in meta["notes"]] + [""]
    print("\n".join(body + tail))
    head = ["# encfsd side-by-side benchmark, %s" % meta["date"], ""]
    head += ["| | |", "|---|---|"]
    for k, v in meta["header"]:
        head.append("| %s | %s |" % (k, v))
    head.append("")
    with open(out_path, "w") as f:
        f.write("\n".join(head + ["## Results", ""] + body + tail))


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    cmd = argv[1]
    if cmd == "smallfiles":
        smallfiles(argv[2], int(argv[3]), int(argv[4]))
    elif cmd == "odirect-probe":
        sys.exit(odirect_probe(argv[2]))
    elif cmd == "fio-iops":
        fio_iops(argv[2])
    elif cmd == "status-requests":
        status_requests()
    elif cmd == "report":
        report(argv[2], argv[3], argv[4])
    elif cmd == "scale":
        scale(argv[2], int(argv[3]), argv[4] if len(argv) > 4 else None)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
