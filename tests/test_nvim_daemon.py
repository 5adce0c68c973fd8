"""The plugin and lofid's life: a killed or shut down daemon brought back with the work it
lost, and :LofiDaemon start|stop|restart|log. A real lofid (scripted engine) started by the
plugin through a `lofid` wrapper on PATH, or by the test."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import Daemon, make_fake_model, shutdown_daemon_at
from lofictl.client import Client
from nvim.editor import LAST_TRACK, editors, lofid_wrapper, needs_nvim, pid_alive

pytestmark = needs_nvim


@pytest.fixture
def start_nvim(short_tmp):
    yield from editors(short_tmp)


@pytest.fixture
def auto_started(short_tmp, start_nvim):
    """An editor with auto_start, and the daemon it will start (not running yet)."""
    d = Daemon(short_tmp, model_dir=make_fake_model(short_tmp / "model"))
    bindir = lofid_wrapper(d, short_tmp / "bin")
    nvim = start_nvim(env={"LOFID_SOCKET": str(d.socket)}, path_prepend=bindir, setup={"auto_start": True})
    yield nvim, d
    shutdown_daemon_at(d.socket)


def wait_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not pid_alive(pid)


def track_record(sock: Path, track_id: str) -> dict:
    with Client(sock) as c:
        return c.call("track", {"track_id": track_id})


def test_killed_auto_started_daemon_is_started_again_and_the_track_completes(auto_started):
    nvim, d = auto_started
    nvim.cmd("LofiGenerate phoenix step=0.02 duration=5 seed=9")
    nvim.wait("local _, j = next(require('lofi').state.jobs); return j and (j.percent or 0) >= 10", timeout=30)
    pid = nvim.lua("return require('lofi.daemon').last_start.pid")
    os.kill(pid, signal.SIGKILL)
    msg = nvim.wait("return _G.lofi_test.texts('DISCONNECTED')[1]", timeout=10)
    assert "lofid went away during “phoenix step=0.02” (" in msg and "starting it again" in msg, msg
    # no command, no key: the plugin starts lofid again and sends the generation again
    track = nvim.wait(LAST_TRACK, timeout=60)
    new_pid = nvim.lua("return require('lofi.daemon').last_start.pid")
    assert new_pid != pid and wait_gone(pid) and pid_alive(new_pid)
    record = track_record(d.socket, track["track_id"])
    assert record["prompt"] == "phoenix step=0.02" and record["seed"] == 9 and Path(record["path"]).is_file()
    assert nvim.texts("reconnected to lofid; sending 1 interrupted generation")
    assert nvim.statusline() == ""


def test_clean_shutdown_during_a_generation_is_retried(daemon, start_nvim):
    """`lofictl stop` (or systemctl restart) during a generation: resent once lofid is
    back, not reported as INTERNAL."""
    nvim = start_nvim(env={"LOFID_SOCKET": str(daemon.socket)})
    nvim.cmd("LofiGenerate interrupted step=0.02 duration=5 seed=4")
    nvim.wait("local _, j = next(require('lofi').state.jobs); return j and (j.percent or 0) >= 10", timeout=30)
    shutdown_daemon_at(daemon.socket)
    daemon.proc.wait(15)
    msg = nvim.wait("return _G.lofi_test.texts('DISCONNECTED')[1]", timeout=10)
    assert "lofid went away during “interrupted step=0.02” (" in msg and "sent again" in msg, msg
    assert nvim.statusline() == "♪ offline"
    daemon.start()
    track = nvim.wait(LAST_TRACK, timeout=30)
    assert track_record(daemon.socket, track["track_id"])["seed"] == 4
    assert not nvim.texts("INTERNAL"), nvim.texts()


def test_status_only_reports(short_tmp, start_nvim):
    sock = short_tmp / "run" / "lofid.sock"
    nvim = start_nvim(env={"LOFID_SOCKET": str(sock)}, setup={"auto_start": True, "lofid_cmd": ["/bin/true"]})
    nvim.cmd("LofiStatus")
    msg = nvim.wait("return _G.lofi_test.texts('NOT_RUNNING')[1]")
    assert "lofid is not running" in msg, msg
    assert nvim.lua("return require('lofi.daemon').last_start") is None  # nothing was started


def test_daemon_command_start_restart_log_stop(auto_started):
    nvim, d = auto_started
    nvim.lua("require('lofi').config.auto_start = false")  # :LofiDaemon starts it all the same
    nvim.cmd("LofiDaemon start")
    nvim.wait("return _G.lofi_test.texts('lofid started')[1]", timeout=30)
    assert nvim.texts("starting lofid")
    first = nvim.lua("return require('lofi.daemon').last_start.pid")
    nvim.cmd("LofiDaemon start")
    nvim.wait("return _G.lofi_test.texts('running already')[1]")

    # restart during a generation: it goes on in the new daemon
    nvim.cmd("LofiGenerate restarted step=0.02 duration=5 seed=5")
    nvim.wait("local _, j = next(require('lofi').state.jobs); return j and (j.percent or 0) >= 5", timeout=30)
    nvim.cmd("LofiDaemon restart")
    nvim.wait("return _G.lofi_test.texts('lofid restarted')[1]", timeout=30)
    second = nvim.lua("return require('lofi.daemon').last_start.pid")
    assert second != first and wait_gone(first)
    track = nvim.wait(LAST_TRACK, timeout=30)
    assert track_record(d.socket, track["track_id"])["seed"] == 5

    nvim.cmd("LofiDaemon log")
    assert nvim.lua("return vim.api.nvim_buf_get_name(0)") == nvim.lua("return require('lofi.daemon').log_path()")
    assert any("lofid" in line for line in nvim.lua("return vim.api.nvim_buf_get_lines(0, 0, -1, false)"))
    nvim.cmd("close")

    # stop during a generation: it fails, and nothing starts lofid again
    nvim.lua("require('lofi').config.auto_start = true")
    nvim.cmd("LofiGenerate stopped step=0.02 duration=5")
    nvim.wait("local _, j = next(require('lofi').state.jobs); return j and (j.percent or 0) >= 5", timeout=30)
    nvim.cmd("LofiDaemon stop")
    nvim.wait("return _G.lofi_test.texts('lofid stopped')[1]", timeout=30)
    assert wait_gone(second)
    msg = nvim.texts("CANCELLED")[-1]
    assert msg.startswith("lofi: CANCELLED: “stopped step=0.02” (") and "not finished: lofid was stopped" in msg, msg
    assert not nvim.texts("INTERNAL"), nvim.texts()
    time.sleep(1.5)
    assert not d.socket.exists() and nvim.lua("return require('lofi.daemon').last_start.pid") == second
    assert nvim.statusline() == ""
    nvim.cmd("LofiDaemon bogus")
    assert "unknown action" in nvim.wait("return _G.lofi_test.texts('INVALID_PARAMS')[1]")
