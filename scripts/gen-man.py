#!/usr/bin/env python3
"""Writes encfsd(8) in roff from the command tree the binary itself describes
(`encfsd --experimental-dump-help`: swift-argument-parser's dump of every subcommand, abstract,
discussion, argument and option, the same definitions `--help` prints). Deterministic: no date,
so regenerating gives the committed file byte for byte (Tests/mount/test_docs.py checks it).

Usage: gen-man.py ENCFSD_BINARY > docs/man/encfsd.8"""

import json
import subprocess
import sys


def esc(text: str) -> str:
    """Escapes roff: backslashes, leading dots and quotes, and hyphens in option names."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def name_of(n: dict) -> str:
    return ("-" if n["kind"] in ("short", "longWithSingleDash") else "--") + n["name"]


def visible(items):
    return [i for i in items or [] if i.get("shouldDisplay", True)]


def synopsis(path: list[str], command: dict) -> str:
    parts = [f"\\fB{esc(' '.join(path))}\\fR"]
    if visible(command.get("subcommands")):
        parts.append("\\fISUBCOMMAND\\fR")
    for a in visible(command.get("arguments")):
        if a["kind"] == "positional":
            word = f"\\fI{esc(a['valueName'])}\\fR" + ("..." if a.get("isRepeating") else "")
            parts.append(f"[{word}]" if a.get("isOptional") else word)
        elif a.get("preferredName") and a["preferredName"]["name"] not in ("help", "version"):
            flag = f"\\fB{esc(name_of(a['preferredName']))}\\fR"
            if a["kind"] == "option":
                flag += f" \\fI{esc(a['valueName'])}\\fR"
            parts.append(flag if not a.get("isOptional") else f"[{flag}]")
    return " ".join(parts)


def options(command: dict) -> list[str]:
    out = []
    for a in visible(command.get("arguments")):
        if a["kind"] == "positional":
            head = f"\\fI{esc(a['valueName'])}\\fR"
        else:
            if a.get("preferredName", {}).get("name") in ("help", "version"):
                continue
            names = ", ".join(f"\\fB{esc(name_of(n))}\\fR" for n in a.get("names", []))
            head = names + (f" \\fI{esc(a['valueName'])}\\fR" if a["kind"] == "option" else "")
        text = a.get("abstract", "")
        if a.get("defaultValue") not in (None, "", "false") and a["kind"] == "option":
            text += f" (default: {a['defaultValue']})"
        if a.get("allValues"):
            text += f" Values: {', '.join(a['allValues'])}."
        out += [".TP", head, esc(text)]
    return out


def section(path: list[str], command: dict) -> list[str]:
    out = []
    if len(path) > 1 and not visible(command.get("subcommands")):
        out += [".SS " + esc(" ".join(path[1:])), ".B Usage:", synopsis(path, command), ".PP", esc(command.get("abstract", ""))]
        if command.get("discussion"):
            out += [".PP", esc(command["discussion"])]
        out += options(command)
    for sub in visible(command.get("subcommands")):
        if sub["commandName"] != "help":
            out += section(path + [sub["commandName"]], sub)
    return out


STATIC_TAIL = r"""
.SH MOUNT(8) AND FSTAB
encfsd is also the helper mount(8) runs for file systems of type \fBfuse.encfsd\fR: installed as
\fB/sbin/mount.fuse.encfsd\fR (a link to encfsd), or found by mount.fuse3 as \fBencfsd\fR on the
default PATH. Then
.PP
.RS
mount \-t fuse.encfsd STORE MOUNTPOINT \-o allow_other,key_file=/root/vault.key
.RE
.PP
and an
.BR fstab (5)
line such as
.PP
.RS
/var/lib/encfsd/vault /mnt/vault fuse.encfsd allow_other,nofail,x\-systemd.automount,key_file=/root/vault.key 0 0
.RE
.PP
mount the store; \fBumount MOUNTPOINT\fR unmounts it. encfsd's own settings are spelled as
\fB\-o\fR options: \fBkey_file=\fR\fIPATH\fR (repeatable), \fBthreads=\fR\fIN\fR,
\fBkey_quota=\fR\fIN\fR, \fBlog_file=\fR\fIPATH\fR, \fBlog_level=\fR\fILEVEL\fR,
\fBidle=\fR\fIDURATION\fR, \fBno_keyring\fR, \fBallow_other\fR, \fBwriteback_cache\fR, \fBro\fR;
the kernel's mount flags (\fBnosuid\fR, \fBnodev\fR, \fBnoexec\fR, \fBnoatime\fR, ...) go to the
mount; the options of mount(8), fstab and systemd (\fBnofail\fR, \fBnoauto\fR, \fB_netdev\fR,
\fBuser\fR, \fBdefaults\fR, \fBrw\fR, \fBx\-*\fR, \fBcomment=\fR) are dropped. Any other option, or
a malformed value, is refused before anything is mounted.
.SH LOGGING
A daemon in the background logs to syslog (identifier \fBencfsd\fR, facility \fBdaemon\fR; on
systemd machines read it with \fBjournalctl \-t encfsd\fR); in the foreground it logs to standard
error; \fB\-\-log\-file\fR sends it to a file. \fB\-\-log\-level\fR keeps \fBerror\fR,
\fBwarning\fR, \fBnotice\fR (the default), \fBinfo\fR or \fBdebug\fR and everything more severe.
Integrity failures (with the plaintext path and extent) are errors; keys added, removed and wiped
are notices; recovered interrupted writes and skipped undecryptable entries are warnings.
.SH FILES
.TP
.I STORE/encfsd.conf
The store's format version, features, extent size, root policy and passphrase parameters.
.TP
.I /lib/systemd/system/encfsd@.service
Mounts \fI/var/lib/encfsd/NAME\fR at \fI/mnt/encfsd/NAME\fR at boot, the key from an encrypted
systemd credential.
.SH EXIT STATUS
0 on success, 1 on error. \fBfsck\fR exits as fsck(8) does: 0, 1 corrected, 4 left uncorrected,
8 operational error, 16 usage. As a mount helper: 0, 1 bad invocation or options, 32 mount failure.
.SH SEE ALSO
.BR mount (8),
.BR fstab (5),
.BR fusermount3 (1),
.BR systemd.mount (5),
.BR keyctl (1),
.BR xfs_io (8),
.I /usr/share/doc/encfsd/README.md
"""


def main():
    tree = json.loads(subprocess.run([sys.argv[1], "--experimental-dump-help"], capture_output=True, text=True, check=True).stdout)
    root = tree["command"]
    version = subprocess.run([sys.argv[1], "--version"], capture_output=True, text=True, check=True).stdout.strip()
    out = [
        ".\\\" Generated by scripts/gen-man.sh from encfsd's own argument definitions; do not edit.",
        f'.TH ENCFSD 8 "" "encfsd {version}" "System Administration"',
        ".SH NAME",
        "encfsd \\- " + esc(root["abstract"][0].lower() + root["abstract"][1:].rstrip(".")),
        ".SH SYNOPSIS",
    ]
    for sub in visible(root.get("subcommands")):
        if sub["commandName"] == "help":
            continue
        leaves = visible(sub.get("subcommands")) or [None]
        for leaf in leaves:
            path, command = (["encfsd", sub["commandName"]], sub) if leaf is None else (["encfsd", sub["commandName"], leaf["commandName"]], leaf)
            out += [synopsis(path, command), ".br"]
    out += ["\\fBencfsd\\fR \\fISTORE\\fR \\fIMOUNTPOINT\\fR [\\fB\\-o\\fR \\fIOPTIONS\\fR]   (as mount.fuse.encfsd)", ".br",
            "\\fBencfsd \\-\\-version\\fR"]
    out += [".SH DESCRIPTION",
            "encfsd mounts a directory of ciphertext (the \\fIstore\\fR) as a plaintext directory through FUSE. "
            "File contents, names and symlink targets are encrypted and authenticated (AES\\-256\\-GCM with a key "
            "per extent, derived by HKDF\\-SHA512); master keys are managed as Linux fscrypt v2 manages them, in "
            "the kernel keyring, with the same key identifiers. Every command takes \\fB\\-\\-help\\fR.",
            ".SH COMMANDS"]
    out += section(["encfsd"], root)
    text = "\n".join(out) + "\n" + STATIC_TAIL.lstrip("\n")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
