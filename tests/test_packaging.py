"""What ships with the package and what CI does on a fresh machine."""

from __future__ import annotations

import configparser
import os
import subprocess
from pathlib import Path

from conftest import ROOT


def test_the_license_setup_cfg_promises_is_there():
    meta = configparser.ConfigParser()
    meta.read(ROOT / "setup.cfg")
    assert meta["metadata"]["license"] == "MIT" and meta["metadata"]["license_files"].strip() == "LICENSE"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Copyright (c) 2026 the lofid authors" in text


def test_ci_run_survives_a_failing_apt_get(tmp_path):
    """apt-get cannot install (offline mirror, no sudo): .ci/run says what that costs and
    goes on to install the package, run the floors, then README's test command last (a
    recording python3 stands in, and for the floors venv's python too)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    for name, status in (("apt-get", 100), ("sudo", 1)):
        (bindir / name).write_text(f"#!/bin/sh\necho {name} \"$@\" >> {log}\nexit {status}\n")
        (bindir / name).chmod(0o755)
    (bindir / "python3").write_text(
        f"#!/bin/sh\necho \"$(basename \"$0\")\" \"$@\" >> {log}\n"
        'if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin" && ln -s "$0" "$3/bin/python"; fi\n')
    (bindir / "python3").chmod(0o755)
    r = subprocess.run(["bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": f"{bindir}:/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert ".ci/run: apt-get install neovim systemd failed" in r.stderr and "tests/test_nvim.py" in r.stderr
    calls = Path(log).read_text().splitlines()
    assert any(c.startswith(("apt-get install", "sudo apt-get install")) for c in calls)
    assert calls[-1] == "python3 -m pytest -q"  # README's test command, exactly, and last
    floors = calls[next(i for i, c in enumerate(calls) if c.startswith("python3 -m venv ")):-1]
    assert "python -m pip install -q --only-binary :all: -c constraints/floors.txt -e .[test]" in floors
    assert floors[-1].startswith("python -m pytest -q -p no:cacheprovider tests/test_engine.py ")
    assert "floors run: msgpack==" in r.stdout
