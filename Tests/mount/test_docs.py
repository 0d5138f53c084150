"""The man page is generated from the binary's own argument definitions: regenerating it gives
the committed file, and it renders without warnings. Completions come from the same tree."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import REPO, run

MAN = REPO / "docs" / "man" / "encfsd.8"


def test_man_page_is_up_to_date(encfsd_bin):
    generated = run("python3", REPO / "scripts" / "gen-man.py", encfsd_bin).stdout
    assert generated == MAN.read_text(), "docs/man/encfsd.8 is stale: run scripts/gen-man.sh"
    for command in ["init", "mount", "status", "info", "fsck", "key add", "--idle", "--log-level", "fuse.encfsd"]:
        assert command.replace("-", "\\-") in generated, command


def test_man_page_renders_cleanly():
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", str(MAN)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completions(encfsd_bin, shell):
    script = run(encfsd_bin, "--generate-completion-script", shell).stdout
    assert "status" in script and "mount" in script and "idle" in script and "log-level" in script
