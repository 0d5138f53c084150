#!/usr/bin/env python3
"""Workload and checker for scripts/crash-test.sh (docs: crash-safety.md, item 3).

One invocation per round:

    crash_workload.py round --mnt M --work W --round R --seed S [--run] [--keep-going]
    crash_workload.py stats --work W        (the counts so far, as key=value lines)

1. Check. If W/log.<R-1>.jsonl exists (the previous round's workload, whose daemon was killed),
   replay it onto the model in W/state.json, read every file under M in full, and check that
   what is on disk is exactly one of the allowed states (see "The model" below). Any read error,
   missing or unexpected file, content matching no allowed state, or a file whose size as
   looked up, as read to EOF and as fstat reports it after the read disagree, is a violation: it
   is printed naming the round and the file, every file is read a second time to tell a stale
   first view from a wrong stored state, and the exit status is 1 (with --keep-going the
   violation is counted, the model is taken from the disk, and the round goes on).
2. Run (with --run). Take the checked disk contents as the model, touch W/ready.<R>, and run a
   mixed workload on M until an operation fails. The killer writes W/killed.<R> before it sends
   SIGKILL, so a failure with that file present is the expected end of the round (exit 0); a
   failure without it means the live daemon failed an operation (a violation, exit 1).

The model. The daemon buffers write(2)s in memory and commits them as one journaled
transaction at each flush point: close (FUSE flush), fsync/fdatasync, ftruncate/truncate
(setattr commits the buffer and the new size), and open with O_TRUNC. Unflushed writes may be lost
when the daemon dies (P1 allows it). Renames, exchanges, unlinks and creates are single backing
operations that take effect when they return. So the workload logs, to W/log.<R>.jsonl (outside
the mount), an intent record before every such operation (the file's name and, for flush points,
the sha256 and length of the content the flush will commit) and an ack record after it returns;
an ack of fsync/fdatasync is fsynced to the log before the workload goes on. The checker replays
the acked records; at the kill at most one record is un-acked (the operation in flight), so the
disk must equal either the state before it (every file at its last completed flush, every name as
of the last completed rename/unlink/create) or the state after it. Since an fsync ack moves the
file's last completed flush to the fsynced state, "never older than the last fsync" is implied;
a mismatch is reported as lost fsynced data when the file's expected state was fsync-acknowledged.

The daemon also commits files left dirty for 2 s (the timer flush). Every write is therefore
logged too (the buffer's sha256 and length after it, and the time); for a file that had been dirty
for TIMER_MARGIN or more when the daemon died, its buffer state at any write boundary from then on
is allowed as well. Sessions are short, so this applies only in the rounds that deliberately leave
a file dirty (IDLE_ROUNDS), where the timer-flushed state is what should be found.
"""
import argparse
import ctypes
import errno
import hashlib
import json
import os
import random
import stat
import time
import sys

DIRS = ["", "d0", "d1", "d1/sub"]
NAMES = [os.path.join(d, f"f{i}") for d in DIRS for i in range(6)]
MAX_SIZE = 200 * 1024
EXTENT = 16 * 1024
MIN_FILES, MAX_FILES = 8, 16
EMPTY = hashlib.sha256(b"").hexdigest()
# A file dirty (written since its last flush) for at least this long when the daemon died may
# have been committed by a timer flush (one that commits files dirty for 2 s): its buffer state at
# any write boundary after this much dirty time is then allowed as well. Sessions are short, so
# this rarely applies; without a timer flush in the daemon such states never appear.
TIMER_MARGIN = 1.0
# In this share of rounds the workload writes a file and leaves it dirty and open for
# IDLE_SECONDS (the daemon's timer flush commits files dirty for 2 s, checking every second), then
# reports ready and goes on writing it without a flush until the kill: the file must then read
# back as the timer-flushed state (or, without a timer flush in the daemon, its last flush).
IDLE_ROUNDS, IDLE_SECONDS = 0.1, 3.2

libc = ctypes.CDLL(None, use_errno=True)
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def sha(data):
    return hashlib.sha256(data).hexdigest()


def short(h):
    return h[:12]


def errname(code):
    return errno.errorcode.get(code, str(code))


class Violation(Exception):
    pass


# ------------------------------------------------------------------------------------ checker

def new_obj(state, h=EMPTY, n=0):
    state["next_id"] += 1
    return {"id": state["next_id"], "h": h, "n": n, "sh": None, "sn": None, "hist": []}


def apply(state, names, rec, acked, dirty=None):
    """Applies one logged operation to `names` (name -> object); `acked`: it returned. `dirty`
    (object id -> [(time, sha, len)]) collects the buffer states of writes since the last flush."""
    op = rec["op"]
    if op == "write":
        if dirty is not None and rec["name"] is not None:
            dirty.setdefault(names[rec["name"]]["id"], []).append((rec["t"], rec["h"], rec["n"]))
    elif op == "flush":
        if rec["name"] is None:  # flush of an open, unlinked file: no name to check
            return
        obj = names[rec["name"]]
        if dirty is not None and acked:
            dirty.pop(obj["id"], None)
        if (obj["h"], obj["n"]) != (rec["h"], rec["n"]):
            obj["hist"] = (obj["hist"] + [[obj["h"], obj["n"]]])[-16:]
        obj["h"], obj["n"] = rec["h"], rec["n"]
        if rec.get("sync") and acked:
            obj["sh"], obj["sn"] = rec["h"], rec["n"]
    elif op == "create":
        names[rec["name"]] = new_obj(state)
    elif op == "rename":
        names[rec["dst"]] = names.pop(rec["src"])
    elif op == "exchange":
        a, b = rec["a"], rec["b"]
        names[a], names[b] = names[b], names[a]
    elif op == "unlink":
        del names[rec["name"]]
    elif op == "mkdir":
        pass
    else:
        raise ValueError(f"unknown op {op}")


def copy_names(names):
    return {k: dict(v, hist=list(v["hist"])) for k, v in names.items()}


def world(names):
    return {k: (v["h"], v["n"]) for k, v in names.items()}


def observe(mnt, rnd):
    """Reads every file under mnt in full, as an application would (lstat, open, read to EOF).
    Returns ({name: (sha, len, bytes)}, {name or path: error message})."""
    seen, errors = {}, {}

    def onerror(e):
        errors[os.path.relpath(e.filename, mnt)] = f"listing failed: {e.strerror} ({errname(e.errno)})"

    for root, dirs, files in os.walk(mnt, onerror=onerror):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(root, f)
            name = os.path.relpath(path, mnt)
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode):
                    errors[name] = f"unexpected file type {oct(st.st_mode)}"
                    continue
                fd = os.open(path, os.O_RDONLY)
                try:
                    chunks = []
                    while True:
                        b = os.read(fd, 1 << 20)
                        if not b:
                            break
                        chunks.append(b)
                    size = os.fstat(fd).st_size
                finally:
                    os.close(fd)
                data = b"".join(chunks)
                seen[name] = (sha(data), len(data), data)
                if not (len(data) == size == st.st_size):
                    errors[name] = (f"lstat said {st.st_size} bytes, reading to EOF gave {len(data)} bytes "
                                    f"(sha {short(seen[name][0])}), fstat after the read says {size}")
            except OSError as e:
                errors[name] = f"reading failed: {e.strerror} ({errname(e.errno)})"
    return seen, errors


def describe_mismatch(rnd, worlds, observed, pending, skip=frozenset()):
    """Per-file explanation of why the disk matches none of the allowed worlds."""
    msgs = []
    pre, post = worlds[0][1], {k: v for w in worlds[1:] for k, v in w[1].items()}
    pend = "; in flight: " + ", ".join(json.dumps({k: v for k, v in p.items() if k != "seq"}) for p in pending) \
        if pending else "; no operation in flight"
    for name in sorted(set(observed) | set(pre) | set(post)):
        if name in skip:
            continue
        allowed = {w[1].get(name) for w in worlds}
        got = observed.get(name)
        got_key = (got[0], got[1]) if got else None
        if got_key in allowed:
            continue
        objs = [w[0][name] for w in worlds if name in w[0]]
        if got is None:
            obj = objs[0]
            kind = "lost fsynced data: " if obj["sh"] is not None else ""
            msgs.append(f"round {rnd}: {name}: {kind}file is missing (expected length {obj['n']} "
                        f"sha {short(obj['h'])}){pend}")
            continue
        if not objs:
            msgs.append(f"round {rnd}: {name}: file exists (length {got[1]} sha {short(got[0])}) "
                        f"but no allowed state has it{pend}")
            continue
        desc = " or ".join(dict.fromkeys(f"length {o['n']} sha {short(o['h'])}" for o in objs))
        if len(objs) < len(worlds):
            desc += " or absent"
        obj = objs[0]
        older = [i for i, hn in enumerate(reversed(obj["hist"])) if tuple(hn) == got_key]
        if older:
            what = f"rolled back to the state of {older[0] + 1} flush(es) earlier"
        else:
            what = "torn or unknown content (matches no state this file ever flushed)"
        if obj["sh"] is not None and (obj["sh"], obj["sn"]) in {(o["h"], o["n"]) for o in objs}:
            what = "lost fsynced data: " + what
        msgs.append(f"round {rnd}: {name}: {what}: read length {got[1]} sha {short(got[0])}, "
                    f"allowed {desc}{pend}")
    if not msgs and not skip:
        msgs.append(f"round {rnd}: every file matches some allowed state, but the directory tree as a "
                    f"whole matches neither the state before nor after the operation in flight{pend}")
    return msgs


def check(args, state):
    stats = state["stats"]
    prev = os.path.join(args.work, f"log.{args.round - 1}.jsonl")
    names = state["names"]
    pending, stop, dirty = [], None, {}
    if os.path.exists(prev):
        with open(prev) as f:
            records = [json.loads(line) for line in f if line.strip()]
        intents, acked = {}, set()
        order = []
        for r in records:
            if "ack" in r:
                acked.add(r["ack"])
            elif "stop" in r:
                stop = r
            else:
                intents[r["seq"]] = r
                order.append(r["seq"])
                if r["op"] == "write":  # logged after it returned
                    acked.add(r["seq"])
        for s in order:
            r = intents[s]
            if s in acked:
                if pending:
                    raise Violation(f"round {args.round - 1}: log has an acked record after an un-acked one")
                apply(state, names, r, True, dirty)
                if r["op"] == "write":
                    continue
                stats["ops_acked"] += 1
                if r.get("sync"):
                    stats["fsyncs_acked"] += 1
            else:
                pending.append(r)
        if stop:
            stats["writes"] += stop.get("writes", 0)
            stats["bytes_written"] += stop.get("bytes", 0)
            key = errname(stop["stop"])
            stats["stop_errnos"][key] = stats["stop_errnos"].get(key, 0) + 1
    # The allowed worlds: before the operation in flight, and after it.
    worlds = [(names, world(names), "before")]
    cur = names
    for r in pending:
        cur = copy_names(cur)
        apply(state, cur, r, False)
        worlds.append((cur, world(cur), "after"))
    # A file left dirty (written, not flushed) for a while may have been committed by a timer
    # flush at any write boundary: such buffer states are allowed too (see TIMER_MARGIN).
    killed = os.path.join(args.work, f"killed.{args.round - 1}")
    t_kill = os.stat(killed).st_mtime if os.path.exists(killed) else None
    timer_states = {}
    for oid, writes in dirty.items():
        if t_kill is None:
            break
        t_first = writes[0][0]
        for k, (t, h, n) in enumerate(writes):
            end = writes[k + 1][0] if k + 1 < len(writes) else t_kill
            if end >= t_first + TIMER_MARGIN:
                timer_states.setdefault(oid, []).append((h, n))
    if timer_states:
        stats["kills_timer_eligible"] += 1
        for base in list(worlds):
            for name, obj in base[0].items():
                for h, n in timer_states.get(obj["id"], []):
                    variant = copy_names(base[0])
                    variant[name]["h"], variant[name]["n"] = h, n
                    worlds.append((variant, world(variant), f"{base[2]} (with a timer flush of {name})"))

    rnd = args.round - 1
    seen, errors = observe(args.mnt, rnd)
    observed = {k: (v[0], v[1]) for k, v in seen.items()}
    match = next((i for i, w in enumerate(worlds) if w[1] == observed), None)
    if errors or match is None:
        # Report what the first read after the remount found, then read everything again: a
        # second read tells a stale or inconsistent first view from a wrong stored state.
        msgs = []
        for name, msg in sorted(errors.items()):
            if name in seen:
                got = seen[name][:2]
                which = [w[2] for w in worlds if w[1].get(name) == got]
                msg += (f"; those bytes are the file's allowed state {' and '.join(dict.fromkeys(which))} the operation "
                        f"in flight" if which else "; those bytes are no allowed state of the file (torn)")
            msgs.append(f"round {rnd}: {name}: {msg}")
        if match is None:
            msgs += describe_mismatch(rnd, worlds, {k: v for k, v in seen.items() if k not in errors},
                                      pending, skip=set(errors))
        seen, errors2 = observe(args.mnt, rnd)
        observed = {k: (v[0], v[1]) for k, v in seen.items()}
        match = next((i for i, w in enumerate(worlds) if w[1] == observed), None)
        if errors2:
            msgs += [f"round {rnd}: {name}: second read: {msg}" for name, msg in sorted(errors2.items())]
        elif match is None:
            msgs.append(f"round {rnd}: a second read still matches no allowed state")
        else:
            msgs.append(f"round {rnd}: a second read of every file matches the allowed state "
                        f"{worlds[match][2]} the operation in flight"
                        f"{'' if pending else ' (none was in flight)'}")
        if not args.keep_going:
            raise Violation("\n".join(msgs))
        stats["violations"] += 1
        print("VIOLATION (going on)\n" + "\n".join(msgs), file=sys.stderr)
        with open(os.path.join(args.work, "violations.txt"), "a") as f:
            f.write("\n".join(msgs) + "\n")
        if match is None:  # go on from what is on disk
            names = {}
            for k, v in seen.items():
                old = next((w[0][k] for w in worlds if k in w[0] and w[1][k] == (v[0], v[1])), None)
                names[k] = old or new_obj(state, v[0], v[1])
            worlds.append((names, world(names), "resynced"))
            match = len(worlds) - 1
    else:
        if "timer" in worlds[match][2]:
            stats["timer_state_found"] += 1
        if pending:
            stats["kills_in_flight"] += 1
            if worlds[0][1] == worlds[1][1]:
                stats["in_flight_same"] += 1
            elif worlds[match][2].startswith("before"):
                stats["in_flight_old"] += 1
            else:
                stats["in_flight_new"] += 1
    state["names"] = worlds[match][0]
    stats["files_checked"] += len(seen)
    stats["bytes_verified"] += sum(v[1] for v in seen.values())
    if os.path.exists(prev):
        stats["rounds_checked"] += 1
    return {k: bytearray(v[2]) for k, v in seen.items()}


# ----------------------------------------------------------------------------------- workload

class Workload:
    def __init__(self, args, model):
        self.args = args
        self.mnt = args.mnt
        self.model = model  # name -> bytearray: current content, including unflushed writes
        self.rng = random.Random(f"{args.seed}:{args.round}")
        self.log_fd = os.open(os.path.join(args.work, f"log.{args.round}.jsonl"),
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.seq = 0
        self.ops = 0
        self.bytes = 0
        self.writes = 0
        self.killed_marker = os.path.join(args.work, f"killed.{args.round}")

    # ---- log
    def _line(self, rec):
        os.write(self.log_fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())

    def intent(self, **rec):
        self.seq += 1
        rec["seq"] = self.seq
        self._line(rec)
        return self.seq

    def ack(self, seq, durable=False):
        self._line({"ack": seq})
        if durable:
            os.fsync(self.log_fd)
        self.ops += 1

    def logged(self, fn, durable=False, **rec):
        s = self.intent(**rec)
        result = fn()
        self.ack(s, durable)
        return result

    def flush_point(self, kind, name, content, fn, sync=False):
        return self.logged(fn, durable=sync, op="flush", kind=kind, name=name, h=sha(bytes(content)),
                           n=len(content), sync=sync)

    def p(self, name):
        return os.path.join(self.mnt, name)

    # ---- choices
    def existing(self):
        return sorted(self.model)

    def free_names(self):
        return [n for n in NAMES if n not in self.model]

    def random_data(self, n):
        return self.rng.randbytes(n)

    def pick_len(self):
        r = self.rng.random()
        if r < 0.3:
            return self.rng.randint(1, 512)
        if r < 0.7:
            return self.rng.randint(512, EXTENT + 4096)
        return self.rng.randint(EXTENT, 3 * EXTENT)

    # ---- operations
    def session(self, idle=0.0):
        """open (create / O_TRUNC), writes and ftruncates, maybe rename/unlink while open,
        maybe fsync or fdatasync, close. With `idle`, write first, then leave the file dirty and
        open for that many seconds (long enough for a timer flush) and only then report ready."""
        rng = self.rng
        free = self.free_names()
        if free and (len(self.model) < MIN_FILES or rng.random() < 0.15):
            name = rng.choice(free)
            fd = self.logged(lambda: os.open(self.p(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644),
                             op="create", name=name)
            self.model[name] = bytearray()
        else:
            name = rng.choice(self.existing())
            if rng.random() < 0.15:
                fd = self.flush_point("otrunc", name, b"", lambda: os.open(self.p(name), os.O_RDWR | os.O_TRUNC))
                self.model[name] = bytearray()
            else:
                fd = os.open(self.p(name), os.O_RDWR)
        buf = self.model[name]
        self.open_fd = fd
        if idle:  # a long-running writer that never closes: the round ends with the kill
            for _ in range(rng.randint(1, 3)):
                self.pwrite(fd, buf, rng.randint(0, len(buf)), self.pick_len(), name)
            time.sleep(idle)
            self.ready()
            while True:
                self.pwrite(fd, buf, rng.randint(0, len(buf)), self.pick_len(), name)
                time.sleep(0.005)
        for _ in range(rng.randint(1, 6)):
            r = rng.random()
            if r < 0.30:  # append
                self.pwrite(fd, buf, len(buf), self.pick_len(), name)
            elif r < 0.62:  # overwrite, often across an extent boundary
                if rng.random() < 0.5 and len(buf) > EXTENT:
                    off = rng.randrange(EXTENT, len(buf), EXTENT) - rng.randint(1, 4096)
                else:
                    off = rng.randint(0, len(buf))
                self.pwrite(fd, buf, off, self.pick_len(), name)
            elif r < 0.68:  # sparse write past the end
                self.pwrite(fd, buf, len(buf) + rng.randint(1, 2 * EXTENT), rng.randint(1, 3000), name)
            elif r < 0.82:  # ftruncate, grow or shrink
                size = rng.randint(0, MAX_SIZE) if rng.random() < 0.5 else rng.randint(0, len(buf) + 1)
                new = self.resized(buf, size)
                self.flush_point("ftruncate", name, new, lambda: os.ftruncate(fd, size))
                buf[:] = new
            elif r < 0.90:  # read back what is buffered
                got = self.read_all(fd, len(buf))
                if got != bytes(buf):
                    raise Violation(f"round {self.args.round}: {name}: reading the open file back gave "
                                    f"length {len(got)} sha {short(sha(got))}, wrote length {len(buf)} "
                                    f"sha {short(sha(bytes(buf)))} (daemon alive)")
            elif r < 0.95 and name is not None:  # rename the open file (replacing, maybe)
                others = [n for n in NAMES if n != name]
                dst = rng.choice(others)
                self.logged(lambda: os.rename(self.p(name), self.p(dst)), op="rename", src=name, dst=dst)
                self.model[dst] = self.model.pop(name)
                name = dst
            elif name is not None and rng.random() < 0.5:  # unlink the open file, keep writing
                self.logged(lambda: os.unlink(self.p(name)), op="unlink", name=name)
                del self.model[name]
                name = None
        r = rng.random()
        if r < 0.25:
            self.flush_point("fsync", name, buf, lambda: os.fsync(fd), sync=True)
        elif r < 0.35:
            self.flush_point("fdatasync", name, buf, lambda: os.fdatasync(fd), sync=True)
        self.open_fd = None
        self.flush_point("close", name, buf, lambda: os.close(fd))

    @staticmethod
    def resized(buf, size):
        return bytearray(buf[:size]) + bytearray(max(0, size - len(buf)))

    def pwrite(self, fd, buf, off, n, name):
        off = min(off, MAX_SIZE - 1)
        n = max(1, min(n, MAX_SIZE - off))
        data = self.random_data(n)
        done = 0
        while done < n:
            done += os.pwrite(fd, data[done:], off + done)
        if off > len(buf):
            buf.extend(bytearray(off - len(buf)))
        buf[off:off + n] = data
        self.bytes += n
        self.writes += 1
        if name is not None:  # the buffer state a timer flush could commit from now on
            self.intent(op="write", name=name, h=sha(bytes(buf)), n=len(buf), t=time.time())

    @staticmethod
    def read_all(fd, size):
        out = bytearray()
        while True:
            b = os.pread(fd, 1 << 20, len(out))
            if not b:
                return bytes(out)
            out += b

    def truncate_path(self):
        name = self.rng.choice(self.existing())
        buf = self.model[name]
        size = self.rng.randint(0, MAX_SIZE) if self.rng.random() < 0.5 else self.rng.randint(0, len(buf))
        new = self.resized(buf, size)
        self.flush_point("truncate", name, new, lambda: os.truncate(self.p(name), size))
        buf[:] = new

    def rename(self):
        src = self.rng.choice(self.existing())
        if self.rng.random() < 0.5 and len(self.model) > 1:
            dst = self.rng.choice([n for n in self.existing() if n != src])  # over an existing file
        else:
            dst = self.rng.choice(self.free_names() or [src])
        if dst == src:
            return
        self.logged(lambda: os.rename(self.p(src), self.p(dst)), op="rename", src=src, dst=dst)
        self.model[dst] = self.model.pop(src)

    def exchange(self):
        if len(self.model) < 2:
            return
        a, b = self.rng.sample(self.existing(), 2)

        def do():
            if libc.renameat2(AT_FDCWD, os.fsencode(self.p(a)), AT_FDCWD, os.fsencode(self.p(b)), RENAME_EXCHANGE) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e), self.p(a))
        self.logged(do, op="exchange", a=a, b=b)
        self.model[a], self.model[b] = self.model[b], self.model[a]

    def unlink(self):
        name = self.rng.choice(self.existing())
        self.logged(lambda: os.unlink(self.p(name)), op="unlink", name=name)
        del self.model[name]

    def fsync_only(self):
        """close happened earlier; fsync the file through a new descriptor."""
        name = self.rng.choice(self.existing())
        fd = os.open(self.p(name), self.rng.choice([os.O_RDONLY, os.O_WRONLY, os.O_RDWR]))
        self.open_fd = fd
        self.flush_point("fsync", name, self.model[name], lambda: os.fsync(fd), sync=True)
        self.open_fd = None
        self.flush_point("close", name, self.model[name], lambda: os.close(fd))

    def fsync_dir(self):
        d = self.rng.choice(DIRS)
        fd = os.open(os.path.join(self.mnt, d), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_file(self):
        name = self.rng.choice(self.existing())
        with open(self.p(name), "rb") as f:
            got = f.read()
        if got != bytes(self.model[name]):
            raise Violation(f"round {self.args.round}: {name}: read length {len(got)} sha {short(sha(got))}, "
                            f"expected length {len(self.model[name])} sha {short(sha(bytes(self.model[name])))} "
                            f"(daemon alive)")

    def step(self):
        n = len(self.model)
        r = self.rng.random()
        if n == 0 or r < 0.45:
            self.session()
        elif r < 0.52:
            self.truncate_path()
        elif r < 0.64:
            self.rename()
        elif r < 0.68:
            self.exchange()
        elif r < 0.76:
            if n > MIN_FILES or self.rng.random() < 0.2:
                self.unlink()
            else:
                self.session()
        elif r < 0.86:
            self.fsync_only()
        elif r < 0.90:
            self.fsync_dir()
        else:
            self.read_file()

    def ready(self):
        open(os.path.join(self.args.work, f"ready.{self.args.round}"), "w").close()

    def run(self):
        self.open_fd = None
        try:
            for d in DIRS[1:]:
                if not os.path.isdir(self.p(d)):
                    self.logged(lambda: os.mkdir(self.p(d)), op="mkdir", name=d)
            if self.rng.random() < IDLE_ROUNDS:
                self.session(idle=IDLE_SECONDS)
            else:
                self.ready()
            while True:
                self.step()
        except OSError as e:
            killed = os.path.exists(self.killed_marker)
            self._line({"stop": e.errno, "ops": self.ops, "writes": self.writes, "bytes": self.bytes, "killed": killed,
                        "what": str(e)})
            if not killed:
                raise Violation(f"round {self.args.round}: an operation failed while the daemon was alive "
                                f"(before the kill): {e} ({errname(e.errno)})")


# --------------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["round", "stats"])
    ap.add_argument("--mnt")
    ap.add_argument("--work", required=True)
    ap.add_argument("--round", type=int, default=0)
    ap.add_argument("--seed", default="0")
    ap.add_argument("--run", action="store_true")
    ap.add_argument("--keep-going", action="store_true")
    args = ap.parse_args()
    state_path = os.path.join(args.work, "state.json")
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
    else:
        state = {"names": {}, "next_id": 0,
                 "stats": {k: 0 for k in ["files_checked", "bytes_verified", "rounds_checked", "ops_acked",
                                          "writes", "fsyncs_acked", "bytes_written", "kills_in_flight",
                                          "in_flight_old", "in_flight_new", "in_flight_same",
                                          "violations", "kills_timer_eligible", "timer_state_found"]}}
        state["stats"]["stop_errnos"] = {}
    if args.cmd == "stats":
        s = state["stats"]
        for k, v in s.items():
            print(f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, dict) else v}")
        return 0
    try:
        model = check(args, state)
    except Violation as v:
        print(f"VIOLATION\n{v}", file=sys.stderr)
        return 1
    tmp = state_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state_path)
    if not args.run:
        return 0
    try:
        Workload(args, model).run()
    except Violation as v:
        print(f"VIOLATION\n{v}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
