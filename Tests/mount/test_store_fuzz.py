"""Seeded mutation fuzzer of the backing store.

A store holds every kind of object: small, multi-extent, holey and empty files, a directory
tree, long (hashed) names, symlinks (one of them retargeted), hard links, a FIFO, a device node,
xattrs on a file and a directory, and a file with a history (written, overwritten in place,
extended, truncated, then an overwrite interrupted by the daemon's death with its journal shadow
waiting to be replayed), with the whole backing store saved after each stage. Each trial restores
a copy of that store, applies ONE mutation to it (bit flips in headers, extents and `.d` files,
truncations, zeroed ranges, damaged journal shadows, swapped backing files, slots or extents, stale copies of whole
backing files from an earlier stage, changed or moved backing names, damaged or swapped xattr
values), mounts it and reads everything: every read must give the plaintext of a state that
object has had (contents, symlink target, type and device number, xattr value, directory
entries, size) or an error; never other bytes, never a dead daemon, never a hang.

ENCFSD_FUZZ_SEED (default 14) and ENCFSD_FUZZ_TRIALS (default 400) choose the run;
ENCFSD_FUZZ_ONLY=T runs trial T alone (each trial draws from its own Random(f"{seed}:{T}"), so a
failure reproduces by its seed and trial number). The counts per mutation kind are one line of
the terminal summary."""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import struct
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import Volume, _pid_alive, call_with_timeout, read_all, run, wait_pids_gone

E = 4096
HEADER = 4096
STRIDE = E + 32
OP_TIMEOUT = 10
SEED = int(os.environ.get("ENCFSD_FUZZ_SEED", "14"))
TRIALS = int(os.environ.get("ENCFSD_FUZZ_TRIALS", "400"))
ONLY = os.environ.get("ENCFSD_FUZZ_ONLY")
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
LONG_FILE = "L" * 200
LONG_DIR = "D" * 190


@dataclass
class Model:
    """Everything each plaintext path has ever been (oldest first), and where it lives now."""
    files: dict = field(default_factory=dict)       # path -> [contents]; hard links share the list
    links: dict = field(default_factory=dict)       # path -> [targets]
    specials: dict = field(default_factory=dict)    # path -> (S_IFMT, rdev)
    dirs: dict = field(default_factory=lambda: {"": set()})  # path -> every name it has held
    xattrs: dict = field(default_factory=dict)      # (path, name) -> [values]
    backing: dict = field(default_factory=dict)     # path -> backing path relative to the store ("" = root)
    stages: list = field(default_factory=list)      # [{backing relpath: bytes}] after each stage
    shadow: str = ""                                # the interrupted write's .journal/<object ID>

    def add_name(self, path: str):
        parent, _, name = path.rpartition("/")
        self.dirs[parent].add(name)

    def objects(self) -> list[str]:
        """Non-directory paths, one per backing file (hard links once)."""
        seen, out = set(), []
        for path in sorted([*self.files, *self.links, *self.specials]):
            history = id(self.files.get(path, path))    # hard links share one history list
            if path in self.backing and history not in seen:
                seen.add(history)
                out.append(path)
        return out

    def label(self, rel: str) -> str:
        """A backing path as the plaintext it holds (backing names differ from build to build)."""
        if rel == self.shadow:
            return "the journal shadow of /hist"
        for path in sorted(self.backing):
            if self.backing[path] == rel:
                return f"/{path}"
            if os.path.join(self.backing[path], ".d") == rel:
                return f"/{path} (.d)"
        return rel

    def headers(self) -> list[str]:
        """Backing paths of every header file: objects' backing files and directories' `.d`."""
        return [self.backing[p] for p in self.objects()] + [os.path.join(self.backing[d], ".d") for d in sorted(self.dirs)]


@pytest.fixture(scope="module")
def pristine(encfsd_bin, tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    key = base / "master.key"
    run(encfsd_bin, "key", "generate", "-o", key)
    (base / "pristine").mkdir()
    v = Volume(encfsd_bin, base / "pristine", key, extent_size=E)
    model = Model()
    rng = random.Random(SEED)
    try:
        build(v, model, rng)
    finally:
        v.force_cleanup()
    return v, model


def build(v: Volume, model: Model, rng: random.Random):
    m, s = v.mnt, v.store
    model.backing[""] = ""

    def stage_done(remount: bool = True):
        v.unmount()
        snap = {}
        for dirpath, _dirs, names in os.walk(s):
            for name in names:
                p = Path(dirpath, name)
                if p.is_file() and not p.is_symlink():
                    snap[os.path.relpath(p, s)] = p.read_bytes()
        model.stages.append(snap)
        if remount:
            v.mount(by_key_file=True)

    def where(path: str) -> Path:
        return s / model.backing[path.rpartition("/")[0]]

    def new(path: str, create):
        model.backing[path] = v.new_backing(where(path), create)
        model.add_name(path)

    # A new object's first header (sequence 0, in slot 0) has size 0: open(O_CREAT) makes the
    # file visible empty before its data is flushed, and a symlink's target follows in a second
    # header before the name is linked. Destroying the newer slot brings that header back, the
    # rollback by one header version that FORMAT.md 14 and SECURITY.md accept: so the empty
    # state is a state of every file and symlink.
    def file(path: str, data: bytes):
        new(path, lambda: (m / path).write_bytes(data))
        model.files[path] = [b"", data]

    def directory(path: str):
        new(path, lambda: (m / path).mkdir())
        model.dirs[path] = set()

    def xattr(path: str, name: str, value: bytes):
        os.setxattr(m / path, name, value)
        model.xattrs.setdefault((path, name), []).append(value)

    v.mount(by_key_file=True)
    # stage 0: one of everything
    file("small", rng.randbytes(100))
    xattr("small", "user.a", b"value a")
    xattr("small", "user.b", b"value b")
    file("multi", rng.randbytes(3 * E + 123))
    holey_data = rng.randbytes(500)

    def make_holey():
        with open(m / "holey", "wb") as f:
            f.truncate(6 * E)
            f.seek(4 * E)
            f.write(holey_data)
    new("holey", make_holey)
    model.files["holey"] = [b"", bytes(6 * E), bytes(4 * E) + holey_data + bytes(2 * E - 500)]
    file("empty", b"")
    directory("tree")
    xattr("tree", "user.d", b"value of the directory")
    directory("tree/a")
    directory("tree/a/b")
    file("tree/a/b/leaf", rng.randbytes(2 * E))
    file("tree/a/file2", rng.randbytes(50))
    file(LONG_FILE, rng.randbytes(1000))
    directory(LONG_DIR)
    file(f"{LONG_DIR}/inner", rng.randbytes(300))
    new("link", lambda: os.symlink("target/of/the/link", m / "link"))
    model.links["link"] = ["", "target/of/the/link"]
    long_target = "x/" * 150
    new("longlink", lambda: os.symlink(long_target, m / "longlink"))
    model.links["longlink"] = ["", long_target]
    file("hard1", rng.randbytes(E + 1))
    new("tree/hard2", lambda: os.link(m / "hard1", m / "tree" / "hard2"))
    model.files["tree/hard2"] = model.files["hard1"]
    new("fifo", lambda: os.mkfifo(m / "fifo"))
    model.specials["fifo"] = (stat.S_IFIFO, 0)
    new("null", lambda: os.mknod(m / "null", 0o644 | stat.S_IFCHR, os.makedev(1, 3)))
    model.specials["null"] = (stat.S_IFCHR, os.makedev(1, 3))
    file("hist", rng.randbytes(2 * E + 10))
    xattr("hist", "user.h", b"history")
    file("tree/moved-from", rng.randbytes(700))
    stage_done()

    # stage 1: an in-place overwrite (journaled), a directory's header rewritten, an xattr
    # replaced, a symlink replaced under the same name (so the same backing name)
    hist = model.files["hist"]
    patch = rng.randbytes(100)
    with open(m / "hist", "r+b") as f:
        f.seek(E - 50)
        f.write(patch)
    hist.append(hist[-1][:E - 50] + patch + hist[-1][E + 50:])
    os.chmod(m / "tree" / "a", 0o750)
    xattr("small", "user.a", b"value a, second")
    os.unlink(m / "link")
    os.symlink("second/target", m / "link")
    model.links["link"] += ["", "second/target"]
    stage_done()

    # stage 2: extend, rewrite a whole file, rename across directories
    more = rng.randbytes(2 * E - 5)
    with open(m / "hist", "ab") as f:
        f.write(more)
    hist.append(hist[-1] + more)
    small = rng.randbytes(150)
    (m / "small").write_bytes(small)
    model.files["small"] += [b"", small]        # O_TRUNC, then the data
    before = set(os.listdir(s))
    os.rename(m / "tree" / "moved-from", m / "moved")
    (added,) = set(os.listdir(s)) - before
    model.backing["moved"] = added
    model.files["moved"] = model.files["tree/moved-from"]
    model.add_name("moved")
    del model.backing["tree/moved-from"]
    stage_done()

    # stage 3: shrink into an extent
    os.truncate(m / "hist", E + 100)
    hist.append(hist[-1][:E + 100])
    stage_done()

    # stage 4: an interrupted in-place overwrite. The daemon dies once hist's header carries the
    # pending flag (its shadow complete in .journal), so every trial's first open of hist replays
    # the shadow, whatever the mutation did to it, the header or anything else.
    v.unmount()
    v.mount(by_key_file=True, env={**os.environ, "ENCFSD_FAULT_POINT": "pending-flag-set"})
    patch = rng.randbytes(200)
    try:
        with open(m / "hist", "r+b") as f:
            f.seek(10)
            f.write(patch)
    except OSError:
        pass  # the daemon died in the flush of close
    assert wait_pids_gone(v.pids, 10) == [], "the armed daemon did not die at pending-flag-set"
    v.force_cleanup()
    hist.append(hist[-1][:10] + patch + hist[-1][210:])
    stage_done(remount=False)
    model.shadow = next(rel for rel in model.stages[-1] if rel.startswith(".journal/"))


# --- mutations ---------------------------------------------------------------------------------

class Trial:
    def __init__(self, rng: random.Random, store: Path, model: Model):
        self.rng, self.store, self.model = rng, store, model
        self.root_touched = False     # a mount may be refused only when the root's header was hit

    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def path(self, rel: str) -> Path:
        return self.store / rel

    def header_span(self, data: bytes) -> tuple[int, int]:
        """(start, length) of the used part of a slot in use, for flips that hit the header."""
        slots = [i for i in (0, 1) if any(data[i * 2048:(i + 1) * 2048])] or [0]
        slot = self.pick(slots)
        (length,) = struct.unpack_from("<H", data, slot * 2048 + 6)
        return slot * 2048, (length + 40 if 112 <= length <= 2008 else 2048)

    def flip(self, rel: str, offset: int) -> str:
        p = self.path(rel)
        bit = self.rng.randrange(8)
        with open(p, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ (1 << bit)]))
        return f"byte {offset} bit {bit}"

    def note_root(self, rel: str):
        if rel in (".d", ""):
            self.root_touched = True

    def header_bitflip(self):
        path = self.pick(self.model.objects())
        rel = self.model.backing[path]
        start, length = self.header_span(self.path(rel).read_bytes()[:HEADER])
        return f"header of /{path}: {self.flip(rel, start + self.rng.randrange(length))}"

    def extent_bitflip(self):
        paths = [p for p in self.model.objects() if self.path(self.model.backing[p]).stat().st_size > HEADER]
        path = self.pick(paths)
        rel = self.model.backing[path]
        return f"extents of /{path}: {self.flip(rel, self.rng.randrange(HEADER, self.path(rel).stat().st_size))}"

    def dird_bitflip(self):
        d = self.pick(sorted(self.model.dirs))
        rel = os.path.join(self.model.backing[d], ".d")
        self.note_root(rel)
        start, length = self.header_span(self.path(rel).read_bytes())
        return f".d of /{d}: {self.flip(rel, start + self.rng.randrange(length))}"

    def truncate(self, rel: str | None = None):
        rel = rel or self.pick(self.model.headers())
        self.note_root(rel)
        size = self.rng.randrange(self.path(rel).stat().st_size)
        os.truncate(self.path(rel), size)
        return f"{self.model.label(rel)} truncated to {size}"

    def zero_range(self, rel: str | None = None):
        rel = rel or self.pick(self.model.headers())
        self.note_root(rel)
        total = self.path(rel).stat().st_size
        offset = self.rng.randrange(total)
        length = min(total - offset, self.rng.randint(1, STRIDE))
        with open(self.path(rel), "r+b") as f:
            f.seek(offset)
            f.write(bytes(length))
        return f"{self.model.label(rel)}: {length} bytes zeroed at {offset}"

    def swap_files(self):
        group = self.pick([[self.model.backing[p] for p in self.model.objects()],
                           [h for h in self.model.headers() if h.endswith(".d")]])
        a, b = self.rng.sample(group, 2)
        self.note_root(a)
        self.note_root(b)
        da, db = self.path(a).read_bytes(), self.path(b).read_bytes()
        self.path(a).write_bytes(db)
        self.path(b).write_bytes(da)
        return f"contents of {self.model.label(a)} and {self.model.label(b)} swapped"

    def stale_copy(self):
        candidates = sorted(((rel, i) for i, snap in enumerate(self.model.stages[:-1]) for rel in snap
                             if rel in self.model.stages[-1] and snap[rel] != self.model.stages[-1][rel]
                             and rel != "encfsd.conf"), key=lambda c: (self.model.label(c[0]), c[1]))
        rel, i = self.pick(candidates)
        self.note_root(rel)
        with open(self.path(rel), "r+b") as f:      # in place: the backing xattrs stay
            f.write(self.model.stages[i][rel])
            f.truncate()
        return f"{self.model.label(rel)} restored to its copy after stage {i}"

    def journal(self):
        """Damages the shadow that hist's first open must replay."""
        rel = self.model.shadow
        how = self.pick(["flip", "truncate", "zero"])
        if how == "flip":
            return f"{self.model.label(rel)}: {self.flip(rel, self.rng.randrange(self.path(rel).stat().st_size))}"
        return self.truncate(rel) if how == "truncate" else self.zero_range(rel)

    def entries(self) -> list[str]:
        return sorted({self.model.backing[p] for p in self.model.backing if p})

    def name_change(self):
        rel = self.pick(self.entries())
        parent, _, name = rel.rpartition("/")
        i = self.rng.randrange(1 if name.startswith("~") else 0, len(name))
        new = name[:i] + self.pick([c for c in B64 if c != name[i]]) + name[i + 1:]
        os.rename(self.path(rel), self.path(os.path.join(parent, new)))
        return f"backing name of {self.model.label(rel)} changed at character {i}"

    def entry_move(self):
        rel = self.pick(self.entries())
        parent, _, name = rel.rpartition("/")
        targets = [self.model.backing[d] for d in sorted(self.model.dirs)
                   if self.model.backing[d] != parent and self.model.backing[d] != rel
                   and not self.model.backing[d].startswith(rel + "/")]
        target = self.pick(targets)
        os.rename(self.path(rel), self.path(os.path.join(target, name)))
        return f"backing entry of {self.model.label(rel)} moved into {self.model.label(target)}"

    def backing_xattrs(self) -> list[tuple[str, str]]:
        found = []
        for path in sorted({p for p, _ in self.model.xattrs}):
            rel = self.model.backing[path]
            found += [(rel, a) for a in sorted(os.listxattr(self.path(rel))) if a.startswith("user.encfsd.")]
        return found

    def xattr_bitflip(self):
        rel, name = self.pick(self.backing_xattrs())
        value = bytearray(os.getxattr(self.path(rel), name))
        i, bit = self.rng.randrange(len(value)), self.rng.randrange(8)
        value[i] ^= 1 << bit
        os.setxattr(self.path(rel), name, bytes(value))
        return f"xattr {name} of {self.model.label(rel)}: byte {i} bit {bit}"

    def xattr_swap(self):
        (ra, na), (rb, nb) = self.rng.sample(self.backing_xattrs(), 2)
        va, vb = os.getxattr(self.path(ra), na), os.getxattr(self.path(rb), nb)
        os.setxattr(self.path(ra), na, vb)
        os.setxattr(self.path(rb), nb, va)
        return f"xattr values {self.model.label(ra)}:{na} and {self.model.label(rb)}:{nb} swapped"

    def slot_swap(self):
        rel = self.pick(self.model.headers())
        self.note_root(rel)
        with open(self.path(rel), "r+b") as f:
            region = f.read(HEADER)
            f.seek(0)
            f.write(region[2048:] + region[:2048])
        return f"header slots of {self.model.label(rel)} swapped"

    def extent_swap(self):
        full = {p: (self.path(self.model.backing[p]).stat().st_size - HEADER) // STRIDE for p in self.model.objects()}
        full = {p: n for p, n in full.items() if n >= 1}
        a, b = self.pick(sorted(full)), self.pick(sorted(full))
        i, j = self.rng.randrange(full[a]), self.rng.randrange(full[b])
        if a == b and i == j:
            j = (i + 1) % full[a] if full[a] > 1 else j
        ra, rb = self.model.backing[a], self.model.backing[b]
        with open(self.path(ra), "r+b") as fa:
            fa.seek(HEADER + i * STRIDE)
            ea = fa.read(STRIDE)
        with open(self.path(rb), "r+b") as fb:
            fb.seek(HEADER + j * STRIDE)
            eb = fb.read(STRIDE)
            fb.seek(HEADER + j * STRIDE)
            fb.write(ea)
        with open(self.path(ra), "r+b") as fa:
            fa.seek(HEADER + i * STRIDE)
            fa.write(eb)
        return f"stored extent {i} of /{a} swapped with extent {j} of /{b}"


MUTATIONS = ["header_bitflip", "extent_bitflip", "dird_bitflip", "truncate", "zero_range", "swap_files",
             "stale_copy", "journal", "name_change", "entry_move", "xattr_bitflip", "xattr_swap", "slot_swap", "extent_swap"]


# --- reading everything back -------------------------------------------------------------------

def classify(got, states: list, counts: Counter) -> str | None:
    """Counts one successful read; returns a description if it matches no state."""
    if got == states[-1]:
        counts["current"] += 1
    elif got in states:
        counts["older"] += 1
    else:
        return "matches none of its states"
    return None


def verify(call, model: Model, m: Path, counts: Counter, problems: list) -> list:
    """Reads every object the model knows, and every name the listings show. `call(what, fn)`
    runs fn with a timeout. Returns the problems (wrong results, hangs, lost daemon)."""

    def read(what, fn, check):
        status, value = call(what, fn)
        if status == "hang":
            problems.append(f"{what}: hung")
            raise Hung
        if status == "err":
            if value in (errno.ENOTCONN, errno.ECONNABORTED):
                problems.append(f"{what}: {errno.errorcode[value]} (the daemon is gone)")
                raise Hung
            counts["error"] += 1
            return None
        why = check(value)
        if why:
            problems.append(f"{what}: {why} ({value!r:.120})")
        return value

    def known(path: str) -> bool:
        return path in model.files or path in model.links or path in model.specials or path in model.dirs

    try:
        todo = [""] + sorted(p for p in [*model.files, *model.links, *model.specials, *model.dirs]
                             if p and p in model.backing)
        seen = set()
        while todo:
            path = todo.pop(0)
            if path in seen:
                continue
            seen.add(path)
            p = m / path if path else m
            if path in model.files:
                states = model.files[path]
                read(f"stat /{path}", lambda: os.stat(p),
                     lambda st: None if stat.S_ISREG(st.st_mode) and st.st_size in {len(s) for s in states}
                     else f"mode {oct(st.st_mode)} size {st.st_size}: no state of this file")
                read(f"read /{path}", lambda: read_all(p), lambda got: classify(got, states, counts))
            elif path in model.links:
                targets = model.links[path]
                read(f"readlink /{path}", lambda: os.readlink(p), lambda got: classify(got, targets, counts))
            elif path in model.specials:
                fmt, rdev = model.specials[path]
                read(f"lstat /{path}", lambda: os.lstat(p),
                     lambda st: classify((stat.S_IFMT(st.st_mode), st.st_rdev), [(fmt, rdev)], counts))
            elif path in model.dirs:
                names = model.dirs[path]
                listed = read(f"list /{path}", lambda: os.listdir(p),
                              lambda got: None if set(got) <= names else f"names never created: {set(got) - names}")
                if listed is not None:
                    counts["current"] += 1
                    todo += [f"{path}/{n}".lstrip("/") for n in listed if known(f"{path}/{n}".lstrip("/"))]
            for (xpath, name), values in sorted(model.xattrs.items()):
                if xpath == path:
                    read(f"getxattr /{path} {name}", lambda: os.getxattr(p, name),
                         lambda got: classify(got, values, counts))
    except Hung:
        pass
    return problems


class Hung(Exception):
    pass


def test_store_fuzz(pristine, volumes, tmp_path, summary_line):
    v0, model = pristine
    by_kind: dict[str, Counter] = {k: Counter() for k in MUTATIONS}
    failures: list[str] = []
    trials = [int(ONLY)] if ONLY else range(TRIALS)
    work = tmp_path / "trial"
    work.mkdir()
    v = Volume(v0.binary, work, v0.key_file, E, create=False)
    volumes.append(v)

    # Control: unmutated, everything reads as its last state (hist after replaying its shadow).
    run("cp", "-a", v0.store, v.store)
    v.mount(by_key_file=True)
    counts = Counter()
    problems = verify(lambda what, fn: call_with_timeout(fn, OP_TIMEOUT), model, v.mnt, counts, [])
    v.unmount()
    assert problems == [] and counts["error"] == counts["older"] == 0 and counts["current"] >= 25, (problems, counts)

    for t in trials:
        rng = random.Random(f"{SEED}:{t}")
        kind = MUTATIONS[t % len(MUTATIONS)]
        if v.store.exists():
            shutil.rmtree(v.store)
        run("cp", "-a", v0.store, v.store)
        trial = Trial(rng, v.store, model)
        what = getattr(trial, kind)()
        counts = by_kind[kind]
        counts["trials"] += 1
        label = f"seed {SEED} trial {t} ({kind}: {what})"
        try:
            v.mount(by_key_file=True, timeout=30)
        except (AssertionError, subprocess.TimeoutExpired) as e:
            v.force_cleanup()
            if trial.root_touched and not isinstance(e, subprocess.TimeoutExpired):
                counts["refused"] += 1
            else:
                failures.append(f"{label}: mount failed: {str(e)[:300]}")
            continue
        problems = verify(lambda w, fn: call_with_timeout(fn, OP_TIMEOUT), model, v.mnt, counts, [])
        dead = [p for p in v.pids if not _pid_alive(p)]
        if dead or not v.pids:
            problems.append(f"daemon {dead} died")
        else:
            try:
                v.unmount()
            except AssertionError as e:
                problems.append(str(e))
        v.force_cleanup()
        failures += [f"{label}: {p}" for p in problems]

    summary_line(f"store fuzz seed={SEED} trials={sum(c['trials'] for c in by_kind.values())}: " + "; ".join(
        f"{k} {c['trials']} trials {c['current']} current/{c['older']} older/{c['error']} errors"
        + (f"/{c['refused']} mounts refused" if c["refused"] else "") for k, c in by_kind.items() if c["trials"]))
    assert not failures, f"{len(failures)} wrong results:\n  " + "\n  ".join(failures[:30])
