#!/usr/bin/env python3
"""A trivial wrapper around the renameat2 syscall, like xfstests' src/renameat2 (coreutils here has
no `mv --exchange`). Usage: renameat2.py [-n|-x|-w] OLD NEW. On failure prints
`renameat2: OLD -> NEW: <strerror>` on stderr and exits 1."""
import ctypes
import os
import sys

RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
AT_FDCWD = -100


def main(argv):
    flags, paths = 0, []
    for arg in argv[1:]:
        if arg == "-n":
            flags |= RENAME_NOREPLACE
        elif arg == "-x":
            flags |= RENAME_EXCHANGE
        elif arg == "-w":
            flags |= RENAME_WHITEOUT
        else:
            paths.append(arg)
    if len(paths) != 2:
        sys.stderr.write("usage: renameat2.py [-n|-x|-w] OLD NEW\n")
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                               ctypes.c_uint]
    old, new = (os.fsencode(p) for p in paths)
    if libc.renameat2(AT_FDCWD, old, AT_FDCWD, new, flags) != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"renameat2: {paths[0]} -> {paths[1]}: {os.strerror(err)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
