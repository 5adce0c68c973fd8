"""lofid as a service (issue 7): socket activation and sd_notify through Debian's own
systemd-socket-activate, the unit files through systemd-analyze verify, the LaunchAgent
plist through plistlib (launchd itself cannot run here), `lofictl service` against fake
systemctl/launchctl scripts that log their argv, idle exit, and the log lines."""

from __future__ import annotations

import json
import os
import plistlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, SCRIPTED_ENGINE, _pythonpath, make_fake_model
from lofictl import service
from lofictl.client import Client

from lofid.broker import systemd

needs_activate = pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                                    reason="systemd-socket-activate is not installed (apt-get install systemd)")
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed (apt-get install systemd)")


# -- sd_notify and LISTEN_FDS, in process ---------------------------------------------


def test_notify_sends_datagrams_to_a_path_and_an_abstract_socket(short_tmp, monkeypatch):
    path = short_tmp / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(path))
        rx.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd.notify("READY=1") is True
        assert rx.recv(4096) == b"READY=1"
    name = f"lofid-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind("\0" + name)
        rx.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("STATUS=generating 45%") is True
        assert rx.recv(4096) == b"STATUS=generating 45%"


def test_notify_never_raises(short_tmp, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False  # outside systemd: nothing to do
    for bogus in (str(short_tmp / "nobody-listens"), "@no-such-abstract-socket-lofid", "relative", "/" + "x" * 200):
        monkeypatch.setenv("NOTIFY_SOCKET", bogus)
        assert systemd.notify("READY=1") is False


def test_listen_fds_ignores_another_process_and_garbage(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds() == []
    assert os.environ["LISTEN_PID"] == str(os.getpid() + 1)  # not ours: left alone
    monkeypatch.setenv("LISTEN_PID", "not a pid")
    assert systemd.listen_fds() == []
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    assert systemd.listen_fds() == []
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ  # ours: unset


# -- socket activation, end to end ------------------------------------------------------


class NotifySocket:
    """The service manager's side of sd_notify: a datagram socket the test owns, read by a
    thread as systemd reads it (lofid never blocks on it: unread datagrams beyond the
    queue length are dropped)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self.changed:
                self.messages.append(data.decode())
                self.changed.notify_all()

    def wait_for(self, predicate, after: int = 0, timeout: float = 20.0) -> int:
        """The index of the first message from ``after`` on that ``predicate`` accepts."""
        found = None

        def match() -> bool:
            nonlocal found
            found = next((i for i in range(after, len(self.messages)) if predicate(self.messages[i])), None)
            return found is not None

        with self.changed:
            if not self.changed.wait_for(match, timeout):
                raise AssertionError(f"no matching notification after {after}; got {self.messages}")
        return found

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def activated_lofid(tmp: Path, sock: Path, notify: Path, *extra: str) -> subprocess.Popen:
    """lofid under systemd-socket-activate, which passes only the -E variables on."""
    env = {"PYTHONPATH": _pythonpath(), "LOFID_ENGINE": SCRIPTED_ENGINE, "HF_HOME": str(tmp / "hf"),
           "NOTIFY_SOCKET": str(notify)}
    (tmp / "config.toml").write_text("")
    argv = ["systemd-socket-activate", "-l", str(sock)]
    for k, v in env.items():
        argv += ["-E", f"{k}={v}"]
    argv += [sys.executable, "-m", "lofid", "--cache-dir", str(tmp / "tracks"), "--state-dir", str(tmp / "state"),
             "--config", str(tmp / "config.toml"), "--model-dir", str(make_fake_model(tmp / "model")),
             "--socket", str(sock), *extra]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(tmp / "lofid.log", "ab"),
                            start_new_session=True)


def connect(path: Path, timeout: float = 20.0) -> Client:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(path, timeout=30)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@needs_activate
def test_socket_activation_ready_status_stopping(short_tmp):
    run = short_tmp / "run"
    run.mkdir(mode=0o700)
    sock = run / "lofid.sock"
    notify = NotifySocket(short_tmp / "notify")
    proc = activated_lofid(short_tmp, sock, notify.path)
    log = short_tmp / "lofid.log"
    try:
        # systemd-socket-activate listens; the first connection makes it exec lofid with the socket as fd 3
        with connect(sock) as c:
            status = c.call("status")
            assert status["pid"] == proc.pid  # it exec'd: the same process, LISTEN_PID matched
            ready = notify.wait_for(lambda m: m == "READY=1")
            notify.wait_for(lambda m: m == "STATUS=idle")
            r = c.call("generate", {"prompt": "activated step=0.006", "duration_sec": 5, "seed": 3})
            record = c.wait_track(r["track_id"])
            assert Path(record["path"]).exists()
        # the status follows the 5 % steps, "generating 0%" … "generating 95%", then it is idle again
        first = notify.wait_for(lambda m: m == "STATUS=generating 0%", after=ready)
        last = notify.wait_for(lambda m: m == "STATUS=generating 95%", after=first)
        notify.wait_for(lambda m: m == "STATUS=idle", after=last)
        generating = [m for m in notify.messages if m.startswith("STATUS=generating ")]
        assert len(generating) == 20, generating  # at progress steps, not at every token
        with Client(sock, timeout=10) as c:  # a second connection on the same inherited socket
            c.call("shutdown")
        assert proc.wait(20) == 0
        notify.wait_for(lambda m: m.startswith("STOPPING=1"), after=last)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    text = log.read_text()
    assert "the socket passed by systemd" in text, text
    # the socket and its directory belong to the service manager: lofid neither replaced nor removed them
    assert sock.is_socket() and (run / "lofid.sock.lock").exists()
    assert "replacing the stale socket" not in text


def test_an_inherited_socket_still_takes_the_lock(make_daemon, short_tmp):
    """A lofid started by hand serves the path; systemd then binds the same path anew and
    starts another lofid with it: that one must see the lock and leave (exit 1)."""
    first = make_daemon()
    first.socket.unlink()  # what the service manager does before it binds the path again
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(first.socket))
    listener.listen(8)
    second = subprocess.run(
        ["sh", "-c", 'exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh", *first.argv()],
        stdin=listener.fileno(), env=first.env, capture_output=True, text=True, timeout=30)
    listener.close()
    assert second.returncode == 1, second.stderr
    assert f"another lofid (pid {first.proc.pid}) is already serving {first.socket}" in second.stderr
    assert first.proc.poll() is None  # the first one is untouched


def test_idle_exit_waits_for_the_running_job(make_daemon):
    d = make_daemon(idle_exit_sec=1.5)
    with d.client() as c:
        r = c.call("generate", {"prompt": "long step=0.01", "duration_sec": 5, "seed": 1})  # ~2.5 s of work
        record = c.wait_track(r["track_id"])  # not interrupted by the idle timer
    assert Path(record["path"]).exists()
    t0 = time.monotonic()
    assert d.proc.wait(15) == 0  # then it gives its memory back, exit status 0 (no restart)
    assert 0.5 < time.monotonic() - t0 < 10
    assert "idle for" in d.logs() and "idle_exit_sec 1.5" in d.logs()


# -- unit files and the plist -------------------------------------------------------------


def test_repository_files_are_the_templates_lofictl_installs():
    assert (ROOT / "systemd" / "lofid.socket").read_text() == service.SOCKET_UNIT
    assert (ROOT / "systemd" / "lofid.service").read_text() == service.SERVICE_UNIT
    shipped = plistlib.loads((ROOT / "launchd" / f"{service.LABEL}.plist").read_bytes())
    assert shipped == service.plist(["@LOFID@"], "@HOME@")
    for line in ("ListenStream=%t/lofid/lofid.sock", "SocketMode=0600", "DirectoryMode=0700"):
        assert line in service.SOCKET_UNIT.splitlines()
    for line in ("Type=notify", "Restart=on-failure"):
        assert line in service.SERVICE_UNIT.splitlines()


def test_the_plist_has_the_launchd_keys():
    """Parsed only: launchd itself cannot run on this machine."""
    shipped = plistlib.loads((ROOT / "launchd" / f"{service.LABEL}.plist").read_bytes())
    assert shipped["Label"] == service.LABEL
    assert shipped["ProgramArguments"] == ["@LOFID@"]
    assert shipped["RunAtLoad"] is True
    assert shipped["KeepAlive"] == {"SuccessfulExit": False}  # restarted when it fails, not after a clean exit
    assert shipped["StandardErrorPath"] == "@HOME@/Library/Logs/lofid.log"


def verify(*units: Path, user: bool = False, runtime: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    argv = ["systemd-analyze"]
    if user:
        argv.append("--user")
        env["XDG_RUNTIME_DIR"] = str(runtime)
    return subprocess.run([*argv, "verify", *map(str, units)], capture_output=True, text=True, env=env,
                          cwd=units[0].parent, timeout=60)


@needs_analyze
def test_systemd_analyze_verify_passes(short_tmp):
    # as shipped (ExecStart=/usr/bin/env lofid)
    r = verify(ROOT / "systemd" / "lofid.socket", ROOT / "systemd" / "lofid.service")
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    # as installed, with this installation's absolute lofid (it must exist for verify to pass)
    units = short_tmp / "units"
    units.mkdir()
    command = service.lofid_command()
    assert Path(command[0]).is_absolute() and os.access(command[0], os.X_OK)
    for name, text in service.render_units(command).items():
        (units / name).write_text(text)
    assert f"ExecStart={' '.join(command)}" in (units / "lofid.service").read_text().splitlines()
    runtime = short_tmp / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    for user in (False, True):
        r = verify(units / "lofid.socket", units / "lofid.service", user=user, runtime=runtime)
        assert r.returncode == 0 and r.stdout + r.stderr == "", (user, r.stdout + r.stderr)
    # and it does catch a broken unit (the check is not vacuous)
    (units / "lofid.service").write_text(service.SERVICE_UNIT.replace("/usr/bin/env lofid", "/nonexistent/lofid"))
    assert verify(units / "lofid.socket", units / "lofid.service").returncode != 0


def test_exec_start_quoting():
    unit = service.render_units(["/opt/my apps/bin/lofid", "--cache-dir", "/tmp/100%$x"])["lofid.service"]
    assert 'ExecStart="/opt/my apps/bin/lofid" --cache-dir /tmp/100%%$$x' in unit.splitlines()
    custom = service.render_units(["/usr/bin/lofid"], Path("/srv/lofid/s.sock"))["lofid.socket"]
    assert "ListenStream=/srv/lofid/s.sock" in custom.splitlines()


# -- lofictl service, with fake service managers ----------------------------------------


@pytest.fixture
def fake_tools(short_tmp):
    """systemctl and launchctl scripts that log their argv; a private HOME and XDG_CONFIG_HOME."""
    bindir = short_tmp / "bin"
    bindir.mkdir()
    log = short_tmp / "argv.log"
    for name, out in (("systemctl", 'case "$*" in *is-enabled*) echo enabled;; *is-active*) echo active; '
                                    'echo inactive;; esac'),
                      ("launchctl", 'case "$1" in print) exit 0;; bootout) exit 3;; esac')):
        script = bindir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n{out}\n')
        script.chmod(0o755)
    home = short_tmp / "home"
    home.mkdir()
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "HOME": str(home),
           "XDG_CONFIG_HOME": str(home / ".config"), "PYTHONPATH": _pythonpath(),
           "LOFID_SOCKET": str(short_tmp / "run" / "lofid.sock"), "LOFID_CONFIG": str(short_tmp / "config.toml"),
           "LOFID_STATE_DIR": str(short_tmp / "state"), "LOFID_CACHE_DIR": str(short_tmp / "tracks")}
    env.pop("XDG_RUNTIME_DIR", None)
    (short_tmp / "config.toml").write_text("")
    return env, log, home


def lofictl(env, *args):
    return subprocess.run([sys.executable, "-m", "lofictl", *args], env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_service_install_status_uninstall_with_systemd(fake_tools):
    env, log, home = fake_tools
    units = home / ".config" / "systemd" / "user"
    r = lofictl(env, "service", "status", "--manager", "systemd")
    assert r.returncode == 3 and "not installed" in r.stdout
    r = lofictl(env, "service", "install", "--manager", "systemd")
    assert r.returncode == 0, r.stderr
    service_unit = (units / "lofid.service").read_text()
    command = service.lofid_command()
    assert f"ExecStart={' '.join(command)}" in service_unit.splitlines()
    assert Path(command[0]).is_absolute()
    # the socket is not the default one (LOFID_SOCKET points elsewhere): the unit listens where lofictl looks
    assert f"ListenStream={env['LOFID_SOCKET']}" in (units / "lofid.socket").read_text().splitlines()
    assert log.read_text().splitlines() == ["systemctl --user daemon-reload",
                                            "systemctl --user enable --now lofid.socket"]
    assert "LOFID_SOCKET" in r.stderr  # told that the service does not see this shell's variables
    log.unlink()
    r = lofictl(env, "--json", "service", "status", "--manager", "systemd")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["enabled"] == "enabled" and status["socket"] == "active" and status["service"] == "inactive"
    assert status["stale"] == [] and len(status["installed"]) == 2
    (units / "lofid.service").write_text(service_unit.replace(command[0], "/old/venv/bin/lofid"))
    assert "differs from what this installation would write" in lofictl(env, "service", "status").stdout
    log.unlink()
    r = lofictl(env, "service", "uninstall", "--manager", "systemd")
    assert r.returncode == 0, r.stderr
    assert not (units / "lofid.service").exists() and not (units / "lofid.socket").exists()
    assert log.read_text().splitlines() == ["systemctl --user disable --now lofid.socket lofid.service",
                                            "systemctl --user daemon-reload"]


def test_service_install_with_launchd(fake_tools):
    """launchctl is a fake here: the plist is checked, not loaded by a real launchd."""
    env, log, home = fake_tools
    agents = home / "agents"
    r = lofictl(env, "service", "install", "--manager", "launchd", "--dir", str(agents))
    assert r.returncode == 0, r.stderr
    plist_path = agents / f"{service.LABEL}.plist"
    p = plistlib.loads(plist_path.read_bytes())
    assert p["ProgramArguments"] == service.lofid_command()
    assert p["StandardErrorPath"] == f"{home}/Library/Logs/lofid.log" and (home / "Library" / "Logs").is_dir()
    assert p["KeepAlive"] == {"SuccessfulExit": False} and p["RunAtLoad"] is True
    uid = os.getuid()
    assert log.read_text().splitlines() == [f"launchctl bootout gui/{uid}/{service.LABEL}",
                                            f"launchctl bootstrap gui/{uid} {plist_path}"]
    assert lofictl(env, "service", "status", "--manager", "launchd", "--dir", str(agents)).returncode == 0
    r = lofictl(env, "service", "uninstall", "--manager", "launchd", "--dir", str(agents))
    assert r.returncode == 0 and not plist_path.exists()


def test_service_install_fails_clearly_without_systemctl(fake_tools, short_tmp):
    env, log, home = fake_tools
    env = {**env, "PATH": os.path.dirname(sys.executable)}
    r = lofictl(env, "service", "install", "--manager", "systemd")
    assert r.returncode != 0 and r.stderr.strip().endswith(
        f"systemctl not found on PATH; the files are in {home}/.config/systemd/user")
    assert (home / ".config" / "systemd" / "user" / "lofid.service").exists()


# -- logs -----------------------------------------------------------------------------------


def test_log_level_debug_shows_connections_one_line_per_event(make_daemon, short_tmp):
    d = make_daemon(log_level="debug")
    with d.client() as c:
        c.call("status")
    d.stop()
    text = d.logs()
    assert "connected" in text and "calls status" in text and "disconnected" in text
    for line in text.splitlines():  # a timestamp, then lofid[pid] (the worker has its own prefix)
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} lofid\[\d+\] [A-Z]+ ", line) \
            or line.startswith("lofid-worker["), line


def test_default_level_is_quiet_and_journald_gets_priorities(make_daemon, short_tmp):
    d = make_daemon(start=False)
    d.log.touch()
    st = os.stat(d.log)
    d.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"  # as if stderr were the journal
    d.start()
    with d.client() as c:
        c.call("status")
    d.stop()
    lines = d.logs().splitlines()
    assert not any("connected" in line for line in lines)  # debug lines stay out at the default level
    assert any(line.startswith("<6>lofid: lofid ") and "listening on" in line for line in lines), lines


def test_service_install_stops_a_lofid_started_by_hand(fake_tools, make_daemon):
    """Otherwise that daemon would keep the lock while systemd takes over its socket path."""
    env, log, home = fake_tools
    d = make_daemon()
    assert str(d.socket) == env["LOFID_SOCKET"]
    r = lofictl(env, "service", "install", "--manager", "systemd")
    assert r.returncode == 0, r.stderr
    assert f"stopped the running lofid (pid {d.proc.pid})" in r.stderr
    assert d.proc.wait(20) == 0
    assert log.read_text().splitlines()[-1] == "systemctl --user enable --now lofid.socket"
