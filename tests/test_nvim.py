"""The Neovim plugin (clients/nvim) in a real headless Neovim against a real lofid.

The editor is tests/nvim/editor.py's; the daemon runs the scripted engine
(tests/engines.py): ``step=S`` in a prompt sets the time per token.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, Daemon, make_fake_model, shutdown_daemon_at
from lofictl.client import Client
from nvim.editor import (
    LAST_TRACK,
    Nvim,
    editors,
    failing_player,
    fake_player,
    lofid_wrapper,
    needs_nvim,
    pid_alive,
)

from lofid import rpc
from lofid.models import size_text
from lofid.variants import hub_files

pytestmark = needs_nvim


@pytest.fixture
def start_nvim(short_tmp):
    yield from editors(short_tmp)


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
    assert msg == "lofi: MODEL_INFERENCE_FAILED: “broken nan@20 step=0.002” failed: the decoder produced NaN/inf logits"
    assert nvim.lua("return next(require('lofi').state.jobs)") is None
    assert not nvim.texts("deprecated"), nvim.texts("deprecated")


def test_editor_stays_responsive_during_generation(daemon, start_nvim):
    nvim = start_nvim(env={"LOFID_SOCKET": str(daemon.socket)})
    nvim.cmd("LofiGenerate slow beats step=0.02 duration=5")  # ~5 s
    nvim.wait("return next(require('lofi').state.jobs) ~= nil")
    latencies, lines = [], set()
    while nvim.lua("return next(require('lofi').state.jobs) ~= nil"):
        t = time.perf_counter()
        assert nvim.request("nvim_eval", "1+1", timeout=2) == 2  # a hang check; speed is printed
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
    # the statusline followed the progress: "♪ 45% ~0:03"
    assert any(line.startswith("♪ ") and "%" in line and "~0:0" in line for line in lines), lines


def test_no_daemon_gives_a_clear_message(start_nvim, short_tmp):
    nvim = start_nvim(env={"LOFID_SOCKET": str(short_tmp / "nothing" / "lofid.sock")})
    nvim.cmd("LofiGenerate some music")
    msg = nvim.wait("return _G.lofi_test.texts('NOT_RUNNING')[1]")
    assert "lofid is not running" in msg and "nothing/lofid.sock" in msg and "auto_start" in msg, msg
    assert nvim.lua("return _G.lofi_test.messages[1].level") == 4  # vim.log.levels.ERROR


def test_auto_start(short_tmp, start_nvim):
    d = Daemon(short_tmp, model_dir=make_fake_model(short_tmp / "model"))  # not started: the plugin starts it
    bindir = lofid_wrapper(d, short_tmp / "bin")
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
    assert "lofid went away during “doomed step=0.02” (" in msg and "sent again" in msg, msg
    assert nvim.lua("return _G.lofi_test.messages[#_G.lofi_test.messages].level") == 3  # WARN: it is resumed
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
    nvim = start_nvim(env={"LOFID_SOCKET": str(daemon.socket)},
                      setup={"players": [[str(player)]], "stream_players": [[str(player)]]})
    report = _health_lines(nvim)
    assert "ERROR" not in report and "WARNING" not in report, report
    assert "stream player (tracks play as they are made): " + str(player) in report, report
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


def wait_lines(path: Path, n: int, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while (not path.exists() or len(path.read_text().splitlines()) < n) and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.read_text().splitlines() if path.exists() else []


def test_a_failing_player_gives_way_to_the_next(daemon, start_nvim, short_tmp):
    bad = failing_player(short_tmp, "badplay", "badplay: audio open error: No such device")
    worse = failing_player(short_tmp, "worseplay", "cannot connect to the sound server")
    good, log = fake_player(short_tmp)
    nvim = start_nvim(env={"LOFID_SOCKET": str(daemon.socket)}, setup={"players": [[str(bad)], [str(good)]]})
    nvim.cmd("LofiGenerate fallback step=0.002 duration=5")
    track = nvim.wait(LAST_TRACK)
    nvim.cmd("LofiPlay")
    runs = wait_lines(log, 2)
    assert len(runs) >= 2 and all(r.split()[1] == track["path"] for r in runs), runs  # it plays, in a loop
    msg = nvim.texts("playing")[-1]
    assert msg == "lofi: ♪ playing “fallback step=0.002” with fakeplay (badplay: audio open error: No such device)"
    assert nvim.lua("return require('lofi.player').current.argv[1]") == str(good)
    assert nvim.statusline() == "♪"
    nvim.cmd("LofiStop")
    # all fail: each one's reason
    nvim.lua("require('lofi').config.players = ...", [[str(bad)], [str(worse)]])
    nvim.cmd("LofiPlay")
    msg = nvim.wait("return _G.lofi_test.texts('PLAYER_FAILED')[1]")
    assert msg == ("lofi: PLAYER_FAILED: cannot play it: badplay: audio open error: No such device; "
                   "worseplay: cannot connect to the sound server"), msg
    assert nvim.statusline() == ""
    # :checkhealth opens the players with a silent sample, and says which cannot play
    report = _health_lines(nvim)
    assert ("no player could play a silent sample: badplay: audio open error: No such device; "
            "worseplay: cannot connect") in report, report
    nvim.lua("require('lofi').config.players = ...", [[str(bad)], [str(good)]])
    n = len(log.read_text().splitlines())
    report = _health_lines(nvim)
    assert "cannot play here: badplay: audio open error" in report, report
    assert "played a silent sample" in report and str(good) in report, report
    sample = log.read_text().splitlines()[n].split()[1]
    assert sample.endswith(".wav") and sample != track["path"]


def test_command_details(daemon, start_nvim, short_tmp):
    """Completion, quoted prompts, play= values, `duration` in setup, and "playing" naming
    the prompt."""
    player, _ = fake_player(short_tmp)
    nvim = start_nvim(env={"LOFID_SOCKET": str(daemon.socket)}, setup={"duration": 6, "players": [[str(player)]]})

    def complete(line: str) -> list[str]:
        return nvim.request("nvim_call_function", "getcompletion", [line, "cmdline"])

    assert complete("LofiGenerate rain ") == ["duration=", "seed=", "priority=", "play="]
    assert complete("LofiGenerate rain pri") == ["priority="]
    assert complete("LofiGenerate rain priority=") == ["priority=normal", "priority=high"]
    assert complete("LofiGenerate rain play=f") == ["play=false"]
    assert complete("LofiDaemon re") == ["restart"]
    nvim.cmd("LofiGenerate rain play=maybe")
    assert "play must be true or false, not maybe" in nvim.wait("return _G.lofi_test.texts('INVALID_PARAMS')[1]")
    nvim.cmd('LofiGenerate "rainy night, piano step=0.002" play=yes')
    nvim.wait("return _G.lofi_test.texts('playing')[1]")
    track = nvim.last_track()
    with daemon.client() as c:
        record = c.call("track", {"track_id": track["track_id"]})
    assert record["prompt"] == "rainy night, piano step=0.002" and record["duration_sec"] == 6, record
    assert nvim.texts("playing")[0] == "lofi: ♪ playing “rainy night, piano step=0.002” (fakeplay)"
    nvim.cmd("LofiStop")
    # another editor completes :LofiPlay with the daemon's tracks
    other = start_nvim(env={"LOFID_SOCKET": str(daemon.socket)})
    assert other.request("nvim_call_function", "getcompletion", ["LofiPlay ", "cmdline"]) == [track["track_id"]]
    assert other.request("nvim_call_function", "getcompletion", ["LofiPlay 0", "cmdline"]) in ([], [track["track_id"]])


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
