"""The Neovim plugin (clients/nvim) in a real headless Neovim against a real lofid.

Neovim runs with ``--listen <socket>`` and the plugin on its runtimepath; the test
drives it over Neovim's own msgpack-rpc (the same dialect as lofid's, so
``lofictl.client.Client`` speaks it) with ``nvim_exec_lua`` / ``nvim_command`` /
``nvim_eval``. tests/nvim/harness.lua records ``vim.notify`` messages and answers
``vim.ui.select`` / ``vim.ui.input`` from queues the test fills. The daemon runs the
scripted engine (tests/engines.py): ``step=S`` in a prompt sets the time per token.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, Daemon, make_fake_model, shutdown_daemon_at
from lofictl.client import Client

from lofid import rpc
from lofid.models import size_text
from lofid.variants import hub_files

NVIM = os.environ.get("LOFI_TEST_NVIM") or shutil.which("nvim")  # LOFI_TEST_NVIM: another Neovim to test
pytestmark = pytest.mark.skipif(NVIM is None, reason="nvim is not installed")

PLUGIN = ROOT / "clients" / "nvim"
HARNESS = ROOT / "tests" / "nvim" / "harness.lua"
LAST_TRACK = "local t = require('lofi').state.last_track; return t and {track_id = t.track_id, path = t.path}"


class Nvim(Client):
    """A msgpack-rpc client for Neovim's --listen socket."""

    def request(self, method: str, *params, timeout: float | None = None):
        msgid = next(self._ids)
        self.sock.sendall(rpc.request(msgid, method, list(params)))
        return self.response(msgid, timeout)

    def lua(self, code: str, *args, timeout: float | None = None):
        return self.request("nvim_exec_lua", code, list(args), timeout=timeout)

    def cmd(self, command: str) -> None:
        self.request("nvim_command", command)

    def wait(self, code: str, *args, timeout: float = 20.0, interval: float = 0.05):
        """Evaluate Lua until it returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.lua(code, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for: {code}\nmessages: {self.texts()}")
            time.sleep(interval)

    def texts(self, pattern: str | None = None) -> list[str]:
        return self.lua("return _G.lofi_test.texts(...)", pattern) or []

    def answer(self, kind: str, *answers) -> None:
        self.lua("vim.list_extend(_G.lofi_test.answers[...], {select(2, ...)})", kind, *answers)

    def asked(self) -> list[dict]:
        return self.lua("return _G.lofi_test.asked")

    def last_track(self):
        return self.lua(LAST_TRACK)

    def statusline(self) -> str:
        return self.lua("return require('lofi').statusline()")


@pytest.fixture
def start_nvim(short_tmp):
    """start_nvim(env=..., setup={...}) -> Nvim, a headless editor with the plugin loaded."""
    procs: list[tuple[subprocess.Popen, Nvim]] = []

    def start(env: dict | None = None, setup: dict | None = None, path_prepend: Path | None = None) -> Nvim:
        n = len(procs)
        sock = short_tmp / f"nvim{n}.sock"
        xdg = short_tmp / f"xdg{n}"
        e = {**os.environ, "XDG_CONFIG_HOME": str(xdg / "config"), "XDG_DATA_HOME": str(xdg / "data"),
             "XDG_CACHE_HOME": str(xdg / "cache"), "XDG_STATE_HOME": str(xdg / "state")}
        e.pop("LOFID_SOCKET", None)
        if path_prepend is not None:
            e["PATH"] = f"{path_prepend}{os.pathsep}{e.get('PATH', '')}"
        e.update(env or {})
        argv = [NVIM, "--headless", "--clean", "-n", "--listen", str(sock),
                "--cmd", f"set rtp^={PLUGIN}", "--cmd", f"luafile {HARNESS}"]
        proc = subprocess.Popen(argv, env=e, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(short_tmp / f"nvim{n}.log", "ab"), cwd=short_tmp)
        deadline = time.monotonic() + 10
        while True:
            try:
                client = Nvim(sock, timeout=10)
                break
            except OSError as e:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nvim did not start: {(short_tmp / f'nvim{n}.log').read_text()}") from e
                time.sleep(0.02)
        procs.append((proc, client))
        client.lua("require('lofi').setup(...)", {"progress_interval_ms": 1000, **(setup or {})})
        return client

    yield start
    for proc, client in procs:
        try:
            client.close()
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def fake_player(tmp: Path) -> tuple[Path, Path]:
    """A 'player' script that logs "<pid> <file>" per run and plays for 0.4 s."""
    log = tmp / "player.log"
    script = tmp / "fakeplay"
    script.write_text(f'#!/bin/sh\necho "$$ $1" >> {log}\nsleep 0.4\n')
    script.chmod(0o755)
    return script, log


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------


def test_generate_progress_complete(daemon, start_nvim, short_tmp):
    player, _ = fake_player(short_tmp)
    nvim = start_nvim(env={"LOFID_SOCKET": str(daemon.socket)}, setup={"players": [[str(player)]]})
    assert nvim.lua("return require('lofi.daemon').socket_path()") == str(daemon.socket)
    t0 = time.monotonic()
    nvim.cmd("LofiGenerate rainy night step=0.006 duration=5 seed=7")
    assert nvim.wait("return require('lofi').statusline():find('%%') ~= nil", timeout=10)
    track = nvim.wait(LAST_TRACK)
    elapsed = time.monotonic() - t0
    with daemon.client() as c:
        record = c.call("track", {"track_id": track["track_id"]})
    assert record["status"] == "complete" and record["path"] == track["path"] and Path(track["path"]).is_file()
    assert record["seed"] == 7 and record["duration_sec"] == 5 and record["prompt"] == "rainy night step=0.006"
    texts = nvim.texts()
    progress = [t for t in texts if "generating" in t or "queued" in t]
    # ~1.5 s of generation, 20 progress steps: throttled to about one message per second
    assert 1 <= len(progress) <= 2 + elapsed, texts
    assert texts[-1] == f"lofi: ♪ ready: {track['path']}", texts
    assert nvim.statusline() == ""
    # the same request again: served from the cache at once
    nvim.cmd("LofiGenerate rainy night step=0.006 duration=5 seed=7")
    nvim.wait("return #_G.lofi_test.texts('ready %(cached%)') == 1")
    # :LofiStatus
    nvim.cmd("LofiStatus")
    status = nvim.wait("return _G.lofi_test.texts('pid')[1]")
    assert "lofid" in status and "model: int8" in status, status
    # errors: the code and the daemon's sentence, at a level fitting the code
    nvim.cmd("LofiGenerate too long duration=500")
    msg = nvim.wait("return _G.lofi_test.texts('INVALID_DURATION')[1]")
    assert msg == "lofi: INVALID_DURATION: duration_sec must be between 5 and 120, not 500", msg
    assert nvim.lua("return _G.lofi_test.messages[#_G.lofi_test.messages].level") == 3  # WARN
    nvim.cmd("LofiGenerate broken nan@20 step=0.002 duration=5")
    msg = nvim.wait("return _G.lofi_test.texts('MODEL_INFERENCE_FAILED')[1]")
    assert msg == "lofi: “broken nan@20 step=0.002” failed: MODEL_INFERENCE_FAILED: the decoder produced NaN/inf logits"
    assert nvim.lua("return next(require('lofi').state.jobs)") is None
    assert not nvim.texts("deprecated"), nvim.texts("deprecated")


def test_editor_stays_responsive_during_generation(daemon, start_nvim):
    nvim = start_nvim(env={"LOFID_SOCKET": str(daemon.socket)})
    nvim.cmd("LofiGenerate slow beats step=0.02 duration=5")  # ~5 s
    nvim.wait("return next(require('lofi').state.jobs) ~= nil")
    latencies, lines = [], set()
    while nvim.lua("return next(require('lofi').state.jobs) ~= nil"):
        t = time.perf_counter()
        assert nvim.request("nvim_eval", "1+1") == 2
        latencies.append(time.perf_counter() - t)
        lines.add(nvim.statusline())
        time.sleep(0.01)
    assert nvim.last_track() is not None
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"nvim_eval round trip during generation: n={len(latencies)} p50={p50 * 1e3:.2f} ms "
          f"p99={p99 * 1e3:.2f} ms max={latencies[-1] * 1e3:.2f} ms")
    assert len(latencies) > 50
    assert p99 < 0.2, latencies[-10:]
    # the statusline followed the progress: "♪ 45% ~0:03"
    assert any(line.startswith("♪ ") and "%" in line and "~0:0" in line for line in lines), lines


def test_no_daemon_gives_a_clear_message(start_nvim, short_tmp):
    nvim = start_nvim(env={"LOFID_SOCKET": str(short_tmp / "nothing" / "lofid.sock")})
    nvim.cmd("LofiGenerate some music")
    msg = nvim.wait("return _G.lofi_test.texts('NOT_RUNNING')[1]")
    assert "no lofid answers on" in msg and "nothing/lofid.sock" in msg and "auto_start" in msg, msg
    assert nvim.lua("return _G.lofi_test.messages[1].level") == 4  # vim.log.levels.ERROR


def _lofid_wrapper(d: Daemon, bindir: Path) -> Path:
    """A `lofid` first on PATH that runs `python -m lofid` with the test's flags and env."""
    bindir.mkdir(parents=True, exist_ok=True)
    argv = d.argv()
    i = argv.index("--socket")
    del argv[i:i + 2]  # the plugin passes --socket itself
    keep = ("HF_HOME", "PYTHONPATH", "LOFID_ENGINE")
    exports = "".join(f"export {k}='{d.env[k]}'\n" for k in keep)
    script = bindir / "lofid"
    script.write_text("#!/bin/sh\n" + exports + "exec " + " ".join(f"'{a}'" for a in argv) + ' "$@"\n')
    script.chmod(0o755)
    return bindir


def test_auto_start(short_tmp, start_nvim):
    d = Daemon(short_tmp, model_dir=make_fake_model(short_tmp / "model"))  # not started: the plugin starts it
    bindir = _lofid_wrapper(d, short_tmp / "bin")
    nvim = start_nvim(env={"LOFID_SOCKET": str(d.socket)}, path_prepend=bindir, setup={"auto_start": True})
    try:
        nvim.cmd("LofiGenerate started for me step=0.002 duration=5")
        track = nvim.wait("local t = require('lofi').state.last_track; return t and t.path", timeout=30)
        assert Path(track).is_file()
        pid = nvim.lua("return require('lofi.daemon').last_start.pid")
        log = nvim.lua("return require('lofi.daemon').log_path()")
        assert "lofid" in Path(log).read_text()  # the daemon's own log went there
    finally:
        shutdown_daemon_at(d.socket)
    deadline = time.monotonic() + 15
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)


def test_daemon_killed_mid_generation_then_recovery(daemon, start_nvim):
    nvim = start_nvim(env={"LOFID_SOCKET": str(daemon.socket)})
    nvim.cmd("LofiGenerate doomed step=0.02 duration=5 seed=3")
    nvim.wait("local _, j = next(require('lofi').state.jobs); return j and (j.percent or 0) >= 10")
    daemon.kill()
    msg = nvim.wait("return _G.lofi_test.texts('DISCONNECTED')[1]", timeout=10)
    assert "lofid went away while generating “doomed step=0.02" in msg and "sent again" in msg, msg
    assert nvim.lua("return _G.lofi_test.messages[#_G.lofi_test.messages].level") == 4
    assert nvim.statusline() == "♪ offline"
    # a request while it is down fails with a clear message (and does not hang)
    nvim.cmd("LofiStatus")
    nvim.wait("return _G.lofi_test.texts('NOT_RUNNING')[1]")
    time.sleep(0.5)
    daemon.start()
    nvim.wait("return _G.lofi_test.texts('reconnected')[1]", timeout=15)
    track = nvim.wait(LAST_TRACK, timeout=30)
    with daemon.client() as c:
        record = c.call("track", {"track_id": track["track_id"]})
    assert record["seed"] == 3 and record["prompt"] == "doomed step=0.02" and Path(record["path"]).is_file()
    # and new work goes through the new connection
    nvim.cmd("LofiGenerate after step=0.002 duration=5")
    nvim.wait("return #_G.lofi_test.texts('ready') == 2")


def _health_lines(nvim: Nvim) -> str:
    nvim.cmd("checkhealth lofi")
    return "\n".join(nvim.lua("return vim.api.nvim_buf_get_lines(0, 0, -1, false)"))


def test_checkhealth(daemon, start_nvim, short_tmp):
    player, _ = fake_player(short_tmp)
    nvim = start_nvim(env={"LOFID_SOCKET": str(daemon.socket)}, setup={"players": [[str(player)]]})
    report = _health_lines(nvim)
    assert "ERROR" not in report and "WARNING" not in report, report
    assert "OK: lofid 0" in report or "OK lofid 0" in report, report
    assert "model int8: present" in report and "fakeplay" in report, report

    daemon.stop()
    report = _health_lines(nvim)
    assert "ERROR" in report and "lofid is not reachable: NOT_RUNNING" in report, report
    assert "start it" in report, report
    assert not nvim.texts("deprecated"), nvim.texts("deprecated")
    # lofid left with nothing in flight (as an idle_exit_sec daemon does): no message, no
    # reconnect loop (that would wake a socket-activated one), the next request connects
    assert not nvim.texts("DISCONNECTED") and not nvim.lua("return require('lofi.daemon').reconnecting()")
    daemon.start()
    report = _health_lines(nvim)
    assert "ERROR" not in report and "is running" in report, report


def test_consent_flow_against_the_fake_hub(short_tmp, start_nvim):
    from fakehub import FakeHub

    served = make_fake_model(short_tmp / "served")
    with FakeHub(served) as hub:
        d = Daemon(short_tmp, env=hub.env(short_tmp / "hf"))  # no --model-dir: the HF cache, empty
        d.start()
        try:
            nvim = start_nvim(env={"LOFID_SOCKET": str(d.socket)})
            # first: the user says no
            nvim.answer("select", False)
            nvim.cmd("LofiGenerate consent please step=0.002 duration=5")
            msg = nvim.wait("return _G.lofi_test.texts('MODEL_NOT_FOUND')[1]")
            assert "declined" in msg and "consent is needed" in msg, msg
            assert hub.count("GET") == 0
            # then yes: download with progress, then the track
            nvim.answer("select", 1)
            nvim.cmd("LofiGenerate consent please step=0.002 duration=5")
            track = nvim.wait("local t = require('lofi').state.last_track; return t and t.path", timeout=30)
            assert Path(track).is_file()
            asked = nvim.asked()
            assert [a["kind"] for a in asked] == ["select", "select"]
            size = size_text(sum((served / f).stat().st_size for f in hub_files("int8")))  # the hub's
            assert f"int8 model ({size} from gabotechs/music_gen)" in asked[1]["prompt"], asked
            assert asked[1]["items"][0].startswith("Download"), asked
            texts = nvim.texts()
            assert any("downloading the model" in t for t in texts), texts
            assert "lofi: model downloaded" in texts, texts
            assert hub.count("GET") >= len(hub_files("int8"))  # the variant's files came from the hub
            with Client(d.socket) as c:
                assert c.call("status")["model"]["state"] in ("present", "loaded", "ready")
        finally:
            d.stop()


def test_tracks_pick_play_loop_stop(daemon, start_nvim, short_tmp):
    player, log = fake_player(short_tmp)
    nvim = start_nvim(env={"LOFID_SOCKET": str(daemon.socket)}, setup={"players": ["no-such-player", [str(player)]]})
    nvim.cmd("LofiGenerate first step=0.002 duration=5 seed=1")
    nvim.wait("return #_G.lofi_test.texts('ready') == 1")
    nvim.cmd("LofiGenerate second step=0.002 duration=5 seed=2")
    nvim.wait("return #_G.lofi_test.texts('ready') == 2")
    second = nvim.last_track()

    nvim.answer("select", 2)  # newest first: the first track
    nvim.cmd("LofiTracks")
    nvim.wait("return _G.lofi_test.texts('playing')[1]")
    asked = nvim.asked()[-1]
    assert asked["kind"] == "select" and "second" in asked["items"][0] and "first" in asked["items"][1], asked
    deadline = time.monotonic() + 10
    while (not log.exists() or len(log.read_text().splitlines()) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    runs = [line.split() for line in log.read_text().splitlines()]
    assert len(runs) >= 2, runs  # it ended and was started again: a loop
    assert all(r[1].endswith(".wav") and "second" not in r[1] for r in runs)
    assert runs[0][1] != second["path"]
    assert nvim.statusline() == "♪"

    # :LofiPlay <track id> replaces it
    nvim.cmd(f"LofiPlay {second['track_id']}")
    nvim.wait("local p = require('lofi.player').current; return p and p.path == ...", second["path"])
    time.sleep(0.5)
    nvim.cmd("LofiStop")
    n = len(log.read_text().splitlines())
    last_pid = int(log.read_text().splitlines()[-1].split()[0])
    time.sleep(1.0)
    assert len(log.read_text().splitlines()) == n  # no more runs
    assert not pid_alive(last_pid)
    assert nvim.statusline() == ""
    assert log.read_text().splitlines()[-1].split()[1] == second["path"]
    # leaving the editor stops the music too
    nvim.cmd("LofiPlay")
    nvim.wait("return #vim.fn.readfile(...) > " + str(n), str(log))
    pid = int(log.read_text().splitlines()[-1].split()[0])
    with pytest.raises((ConnectionError, OSError, TimeoutError)):
        nvim.cmd("qa!")
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)
    runs = len(log.read_text().splitlines())
    time.sleep(0.8)
    assert len(log.read_text().splitlines()) == runs  # and it is not started again


def test_parse_args_and_no_player(start_nvim, short_tmp):
    nvim = start_nvim(setup={"players": ["no-such-player"]})
    prompt, opts, err = nvim.lua("local p, o, e = require('lofi.commands').parse_args(...); return {p, o, e or false}",
                                 ["lofi", "rain", "duration=12.5", "seed=42", "priority=high", "step=0.02"])
    assert (prompt, opts, err) == ("lofi rain step=0.02", {"duration_sec": 12.5, "seed": 42, "priority": "high"}, False)
    nvim.cmd("LofiGenerate rain seed=-1")
    assert "INVALID_PARAMS: seed must be a non-negative integer" in nvim.wait("return _G.lofi_test.texts('seed')[1]")
    wav = short_tmp / "x.wav"
    wav.write_bytes(b"RIFF")
    nvim.cmd(f"LofiPlay {wav}")
    msg = nvim.wait("return _G.lofi_test.texts('NO_PLAYER')[1]")
    assert "no audio player found (tried no-such-player)" in msg
    # no prompt: vim.ui.input asks; cancelling does nothing
    nvim.answer("input", False)
    nvim.cmd("LofiGenerate")
    nvim.wait("return #_G.lofi_test.asked == 1")
    assert nvim.asked()[0]["kind"] == "input"


def test_default_socket_matches_the_daemons(start_nvim, short_tmp):
    """The plugin's default socket is lofid's: $LOFID_SOCKET (the setting's variable), else
    lofid.paths.default_socket() in the same environment."""
    import json
    import sys

    probe = "import json, lofid.paths as p; print(json.dumps(str(p.default_socket())))"
    nvim = start_nvim()
    for env in ({"XDG_RUNTIME_DIR": str(short_tmp / "rt")}, {}):
        e = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "LOFID_SOCKET")}
        e.update(env, PYTHONPATH=str(ROOT))
        expected = json.loads(subprocess.run([sys.executable, "-c", probe], env=e, check=True,
                                             capture_output=True, text=True).stdout)
        got = nvim.lua("vim.env.XDG_RUNTIME_DIR = ...; vim.env.LOFID_SOCKET = select(2, ...);"
                       "return require('lofi.daemon').default_socket()",
                       env.get("XDG_RUNTIME_DIR"), env.get("LOFID_SOCKET"))
        assert got == expected, env
    sock = str(short_tmp / "x.sock")
    assert nvim.lua("vim.env.LOFID_SOCKET = ...; return require('lofi.daemon').default_socket()", sock) == sock


def test_help_tags(short_tmp):
    doc = short_tmp / "doc"
    shutil.copytree(PLUGIN / "doc", doc)
    out = subprocess.run([NVIM, "--headless", "--clean", "-c", f"helptags {doc}", "-c", "qa!"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "E" not in out.stderr, out.stderr
    tags = (doc / "tags").read_text()
    for tag in ("lofi-setup", ":LofiGenerate", "lofi.statusline()", "lofi-errors"):
        assert tag in tags


def test_rpc_layer_framing_timeouts_disconnect(start_nvim, short_tmp):
    """lofi.rpc against a scripted server: a frame split byte by byte, nil in maps, a
    notification, a timeout (the late answer dropped), and pending requests failed on close."""
    path = short_tmp / "fake.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        decoder = rpc.Decoder()
        late = None
        while True:
            data = conn.recv(65536)
            if not data:
                return
            for value in decoder.feed(data):
                msg = rpc.parse(value)
                if msg.method == "split":
                    frame = rpc.notification("hello", [{"eta_sec": None, "n": 1}]) + rpc.response(
                        msg.msgid, None, {"echo": msg.params, "gone": None}
                    )
                    for i in range(len(frame)):
                        conn.sendall(frame[i : i + 1])
                        time.sleep(0.001)
                elif msg.method == "error":
                    conn.sendall(rpc.response(msg.msgid, {"code": "QUEUE_FULL", "message": "full", "x": None}, None))
                elif msg.method == "slow":
                    late = msg.msgid
                elif msg.method == "close":
                    if late is not None:
                        conn.sendall(rpc.response(late, None, "too late"))
                    conn.close()
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    nvim = start_nvim()
    nvim.lua(
        """
        local r = {}
        _G.rpc_results = r
        local c = require('lofi.rpc').new({
          path = ...,
          on_notification = function(m, p) r.note = {m, p.eta_sec == nil, p.n} end,
          on_close = function(err) r.closed = err.code end,
        })
        _G.rpc_client = c
        c:connect(function(err)
          r.connected = err == nil
          c:request('split', {a = 1, s = 'x'}, function(e, res)
            r.split = {e == nil, res.echo[1].a, res.gone == nil}
          end)
          c:request('error', nil, function(e) r.error = e end)
          c:request('slow', nil, function(e) r.slow = e.code end, {timeout_ms = 200})
        end)
        """,
        str(path),
    )
    results = nvim.wait("return _G.rpc_results.slow and _G.rpc_results")
    assert results["connected"] and results["split"] == [True, 1, True]
    assert results["note"] == ["hello", True, 1]
    assert results["error"] == {"code": "QUEUE_FULL", "message": "full"}
    assert results["slow"] == "TIMEOUT"
    nvim.lua(
        """
        local r = _G.rpc_results
        _G.rpc_client:request('close', nil, function(e) r.pending = e.code end)
        _G.rpc_client:request('never', nil, function(e) r.never = e.code end, {timeout_ms = 60000})
        """
    )
    results = nvim.wait("return _G.rpc_results.closed and _G.rpc_results")
    assert results["pending"] == "DISCONNECTED" and results["never"] == "DISCONNECTED"
    assert results["closed"] == "DISCONNECTED"
    assert not nvim.lua("return _G.rpc_client:is_connected()")
    thread.join(5)
    server.close()
