"""What the clients trust (issue 17): lofictl and the Neovim plugin against a real lofid and
against a hostile one (tests/fakedaemon.py: answers anything it likes on the socket), and
the private files the plugin writes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import fakedaemon
import pytest
from conftest import Daemon, _pythonpath, make_fake_model, shutdown_daemon_at
from nvim.editor import editors, lofid_wrapper, needs_nvim

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="becoming another uid needs root")


@pytest.fixture
def start_nvim(short_tmp):
    yield from editors(short_tmp)


class FakeDaemon:
    """tests/fakedaemon.py on ``sock``, answering ``path`` for every track, in a forked child
    (of uid ``uid`` when given)."""

    def __init__(self, sock: Path, path: str, cache_dir: str | None = None, uid: int | None = None) -> None:
        sock.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(sock.parent, 0o700)  # as lofid makes it
        if uid is not None:
            os.chown(sock.parent, uid, uid)
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            try:
                os.close(r)
                if uid is not None:
                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)
                fakedaemon.main(str(sock), path, cache_dir, ready=lambda: os.write(w, b"listening\n"))
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                os.write(w, f"{type(e).__name__}: {e}\n".encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            line = f.readline().strip()
        assert line == "listening", line

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def recording_player(tmp: Path, name: str = "pw-play") -> Path:
    """A player (by default lofictl's first choice) that records its argv as JSON; -> its bin dir."""
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    player = bindir / name
    player.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"json.dump(sys.argv[1:], open({str(tmp / 'player-argv.json')!r}, 'w'))\n")
    player.chmod(0o755)
    return bindir


def lofictl(sock: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "LOFID_SOCKET": str(sock),
           "LOFID_CONFIG": str(tmp / "config.toml"), "PATH": f"{tmp / 'bin'}:{os.environ['PATH']}"}
    (tmp / "config.toml").write_text("")
    return subprocess.run([sys.executable, "-m", "lofictl", "--no-start", *args], env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


# ------------------------------------------------------------------ lofictl and a hostile daemon


@pytest.mark.parametrize("path, cache_dir", [
    ("--script=/tmp/evil.lua", None),  # an option for mpv: it would run the script
    ("evil.wav", None),  # relative
    ("/tmp/evil.lua", None),  # not a WAV
    ("/tmp/cache/../../etc/evil.wav", None),  # not normalized
    ("/tmp/elsewhere/0123456789abcdef.wav", "/tmp/cache"),  # outside the track cache the daemon named
    ("/tmp/cache/x.wav\n--script=/tmp/evil.lua", "/tmp/cache"),
])
def test_lofictl_plays_only_a_wav_path_it_can_trust(short_tmp, path, cache_dir):
    recording_player(short_tmp)
    fake = FakeDaemon(short_tmp / "run" / "lofid.sock", path, cache_dir)
    try:
        for args in (("play", "0123456789abcdef"), ("generate", "x", "--play")):
            r = lofictl(short_tmp / "run" / "lofid.sock", short_tmp, *args)
            assert r.returncode == 1 and "lofictl: UNTRUSTED_DAEMON: lofid gave" in r.stderr, (args, r.stderr)
            assert not (short_tmp / "player-argv.json").exists(), args  # the player never ran
    finally:
        fake.stop()


def test_lofictl_passes_the_file_after_double_dash(short_tmp):
    wav = "/tmp/cache/0123456789abcdef.wav"
    recording_player(short_tmp, "pw-play")
    fake = FakeDaemon(short_tmp / "run" / "lofid.sock", wav, "/tmp/cache")
    try:
        r = lofictl(short_tmp / "run" / "lofid.sock", short_tmp, "play", "0123456789abcdef")
    finally:
        fake.stop()
    assert r.returncode == 0, r.stderr
    assert json.loads((short_tmp / "player-argv.json").read_text()) == ["--", wav]


@root_only
def test_lofictl_refuses_a_daemon_of_another_uid(short_tmp):
    """Another user planted a socket where lofid's should be, and answers a harmless-looking path."""
    recording_player(short_tmp)
    sock = short_tmp / "planted" / "lofid.sock"
    os.chmod(short_tmp, 0o711)  # the other user must reach its folder
    fake = FakeDaemon(sock, "/tmp/x/0123456789abcdef.wav", uid=65534)
    try:
        assert os.stat(sock).st_uid == 65534
        r = lofictl(sock, short_tmp, "play", "0123456789abcdef")
    finally:
        fake.stop()
    assert r.returncode == 1 and "UNTRUSTED_DAEMON" in r.stderr and "is served by uid 65534" in r.stderr, r.stderr
    assert not (short_tmp / "player-argv.json").exists()


@pytest.mark.parametrize("how", ["writable by others", "another user's"])
def test_lofid_refuses_a_socket_folder_below_one_others_control(short_tmp, how):
    """The per-user runtime fallback lives under /tmp, where anyone can make a folder first:
    every folder above the socket must be this user's (or root's) and closed to others."""
    planted = short_tmp / "runtime-0"
    planted.mkdir()
    os.chmod(planted, 0o777)
    if how == "another user's":
        if os.geteuid() != 0:
            pytest.skip("giving a folder away needs root")
        os.chmod(planted, 0o755)
        os.chown(planted, 65534, 65534)
    sock = planted / "lofid" / "lofid.sock"
    d = Daemon(short_tmp, socket=sock, model_dir=make_fake_model(short_tmp / "model"))
    d.start(wait=False)
    try:
        assert d.proc.wait(30) == 1
    finally:
        d.stop()  # one that did start must not outlive the test
    assert f"{planted}, above {planted / 'lofid'}," in d.logs()
    assert not sock.exists()


@needs_nvim
def test_the_plugin_writes_the_daemon_log_privately_whatever_the_umask(short_tmp, start_nvim):
    d = Daemon(short_tmp, model_dir=make_fake_model(short_tmp / "model"))  # the plugin starts it
    bindir = lofid_wrapper(d, short_tmp / "bin")
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


# -------------------------------------------------------------- the plugin and a hostile daemon


def player_log(tmp: Path, name: str) -> tuple[Path, Path]:
    """A player script named ``name`` that appends its arguments, one run per line; -> (bin dir, log)."""
    bindir, log = tmp / "bin", tmp / f"{name}.log"
    bindir.mkdir(exist_ok=True)
    script = bindir / name
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\nsleep 5\n')
    script.chmod(0o755)
    return bindir, log


@needs_nvim
@pytest.mark.parametrize("path", ["--script=/tmp/evil.lua", "evil.wav", "/tmp/evil.lua", "/tmp/a/../evil.wav",
                                  "/tmp/x.wav\n--script=/tmp/evil.lua"])
def test_the_plugin_plays_only_an_absolute_wav_path(short_tmp, start_nvim, path):
    bindir, log = player_log(short_tmp, "mpv")
    fake = FakeDaemon(short_tmp / "run" / "lofid.sock", path)
    try:
        nvim = start_nvim(env={"LOFID_SOCKET": str(short_tmp / "run" / "lofid.sock")}, path_prepend=bindir,
                          setup={"players": ["mpv"]})
        nvim.cmd("LofiPlay 0123456789abcdef")
        msg = nvim.wait("return _G.lofi_test.texts('UNTRUSTED_DAEMON')[1]")
        nvim.lua("require('lofi').generate('x', {play = true})")
        nvim.wait("return #_G.lofi_test.texts('UNTRUSTED_DAEMON') == 2")
    finally:
        fake.stop()
    assert "is not an absolute path to a .wav; refusing to play it" in msg, msg
    assert not log.exists()  # the player never ran


@needs_nvim
def test_the_plugin_passes_the_file_after_double_dash(short_tmp, start_nvim):
    bindir, log = player_log(short_tmp, "mpv")
    wav = "/tmp/cache/0123456789abcdef.wav"
    fake = FakeDaemon(short_tmp / "run" / "lofid.sock", wav)
    try:
        nvim = start_nvim(env={"LOFID_SOCKET": str(short_tmp / "run" / "lofid.sock")}, path_prepend=bindir,
                          setup={"players": ["mpv"]})
        nvim.cmd("LofiPlay 0123456789abcdef")
        nvim.wait("return vim.fn.filereadable(...) == 1", str(log))
        nvim.cmd("LofiStop")
    finally:
        fake.stop()
    assert log.read_text().split()[-2:] == ["--", wav]


@needs_nvim
@pytest.mark.parametrize("how", ["another uid's socket", "a folder open to others"])
def test_the_plugin_refuses_a_socket_it_cannot_trust(short_tmp, start_nvim, how):
    sock = short_tmp / "planted" / "lofid.sock"
    if how == "another uid's socket":
        if os.geteuid() != 0:
            pytest.skip("becoming another uid needs root")
        os.chmod(short_tmp, 0o711)
        fake = FakeDaemon(sock, "/tmp/x/0123456789abcdef.wav", uid=65534)
        words = f"{sock} is a socket of uid 65534, not your lofid's socket"
    else:
        fake = FakeDaemon(sock, "/tmp/x/0123456789abcdef.wav")
        os.chmod(sock.parent, 0o777)
        words = f"its folder {sock.parent} is open to others (mode 0777)"
    try:
        nvim = start_nvim(env={"LOFID_SOCKET": str(sock)}, setup={"auto_start": True})
        nvim.cmd("LofiStatus")
        msg = nvim.wait("return _G.lofi_test.texts('UNTRUSTED_DAEMON')[1]")
    finally:
        fake.stop()
    assert words in msg and "refusing to connect" in msg, msg
    assert nvim.lua("return require('lofi.daemon').last_start") is None  # auto_start did not start a lofid
