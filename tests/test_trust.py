"""What the clients trust (issue 17): lofictl and the Neovim plugin against a real lofid and
against a hostile one (tests/fakedaemon.py: answers anything it likes on the socket), and
the private files the plugin writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from conftest import Daemon, make_fake_model, shutdown_daemon_at
from test_nvim import _lofid_wrapper, start_nvim  # noqa: F401  (start_nvim is a fixture)


def test_the_plugin_writes_the_daemon_log_privately_whatever_the_umask(short_tmp, start_nvim):  # noqa: F811
    d = Daemon(short_tmp, model_dir=make_fake_model(short_tmp / "model"))  # the plugin starts it
    bindir = _lofid_wrapper(d, short_tmp / "bin")
    old = os.umask(0)
    try:
        nvim = start_nvim(env={"LOFID_SOCKET": str(d.socket)}, path_prepend=bindir, setup={"auto_start": True})
    finally:
        os.umask(old)
    try:
        nvim.cmd("LofiGenerate a secret prompt step=0.002 duration=5")
        track = Path(nvim.wait("local t = require('lofi').state.last_track; return t and t.path", timeout=30))
        log = Path(nvim.lua("return require('lofi.daemon').log_path()"))
    finally:
        shutdown_daemon_at(d.socket)
    assert "lofid" in log.read_text()
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(log.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(track).st_mode) == 0o600  # the daemon it started: umask 000 too
