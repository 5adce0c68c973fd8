"""Playing a track as lofid makes it: `play=true` asks for the stream, and the PCM of its
audio_chunk notifications goes to a raw-PCM player's stdin. The fake player here writes
its stdin to a file, which must be byte for byte the WAV's samples. Skipped only when the
daemon under test does not take generate's `stream` (INVALID_PARAMS).
"""

from __future__ import annotations

import time
import wave
from pathlib import Path

import pytest
from conftest import wait_for
from nvim.editor import LAST_TRACK, editors, fake_player, needs_nvim, pid_alive

pytestmark = needs_nvim


@pytest.fixture
def start_nvim(short_tmp):
    yield from editors(short_tmp)


def raw_player(tmp: Path) -> tuple[Path, Path]:
    """A player of raw PCM: its arguments to <pid>.args, its stdin to <pid>.pcm."""
    out = tmp / "streamed"
    out.mkdir()
    script = tmp / "rawplay"
    script.write_text(f'#!/bin/sh\necho "$@" > {out}/$$.args\nexec cat > {out}/$$.pcm\n')
    script.chmod(0o755)
    return script, out


def samples(wav: str) -> bytes:
    with wave.open(wav) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 32000)
        return w.readframes(w.getnframes())


def test_play_from_the_stream(daemon, start_nvim, short_tmp):
    raw, out = raw_player(short_tmp)
    fileplay, log = fake_player(short_tmp)
    nvim = start_nvim(env={"LOFID_SOCKET": str(daemon.socket)},
                      setup={"stream_players": [[str(raw), "--rate={rate}"]], "players": [[str(fileplay)]]})
    nvim.cmd("LofiGenerate streamed wait=0.3 step=0.01 duration=5 seed=3 play=true")
    lines = set()
    while not nvim.last_track():
        lines.add(nvim.statusline())
        time.sleep(0.02)
    track = nvim.last_track()
    # the stream played, then the file loops
    runs = wait_for(lambda: log.exists() and log.read_text().splitlines())
    assert runs[0].split()[1] == track["path"], runs
    streamed = sorted(out.glob("*.pcm"))
    assert len(streamed) == 1 and streamed[0].read_bytes() == samples(track["path"])
    assert streamed[0].with_suffix(".args").read_text().strip() == "--rate=32000"
    assert any(line.startswith("♪ ▶ ") for line in lines), lines  # playing while generating
    assert nvim.texts("as it is made") == ["lofi: ♪ playing “streamed wait=0.3 step=0.01” as it is made (rawplay)"]
    nvim.cmd("LofiStop")
    assert nvim.statusline() == ""

    # a cache hit sends no chunks: the file plays
    n = len(log.read_text().splitlines())
    nvim.cmd("LofiGenerate streamed wait=0.3 step=0.01 duration=5 seed=3 play=true")
    wait_for(lambda: len(log.read_text().splitlines()) > n)
    assert len(list(out.glob("*.pcm"))) == 1
    nvim.cmd("LofiStop")

    # :LofiStop while it plays from the stream: the player goes, and nothing loops after
    n = len(log.read_text().splitlines())
    nvim.cmd("LofiGenerate stopped step=0.02 duration=5 play=true")
    args = wait_for(lambda: [p for p in out.glob("*.args") if p.stem != streamed[0].stem])
    pid = int(args[0].stem)
    wait_for(lambda: nvim.statusline().startswith("♪ ▶ "))
    nvim.cmd("LofiStop")
    wait_for(lambda: not pid_alive(pid), timeout=5)
    assert not nvim.statusline().startswith("♪ ▶")
    nvim.wait(LAST_TRACK + " and t.path ~= ...", track["path"], timeout=30)  # the track completes all the same
    time.sleep(0.5)
    assert len(log.read_text().splitlines()) == n  # and the file does not play


def test_no_raw_player_plays_the_file_when_complete(daemon, start_nvim, short_tmp):
    """No player that reads raw PCM on PATH (only file players, as afplay): the track is
    not streamed, and the finished file plays."""
    fileplay, log = fake_player(short_tmp)
    nvim = start_nvim(env={"LOFID_SOCKET": str(daemon.socket)},
                      setup={"stream_players": ["no-such-raw-player"], "players": [[str(fileplay)]]})
    nvim.cmd("LofiGenerate not streamed step=0.002 duration=5 play=true")
    track = nvim.wait(LAST_TRACK)
    runs = wait_for(lambda: log.exists() and log.read_text().splitlines())
    assert runs[0].split()[1] == track["path"]
    assert not nvim.texts("NO_PLAYER") and not nvim.texts("INVALID_PARAMS"), nvim.texts()


def test_stream_goes_on_after_lofid_is_killed(short_tmp, start_nvim):
    """With auto_start, lofid SIGKILLed mid-stream: started again, the generation sent
    again, and the player's input is still exactly the track's samples (the chunks that
    come again are not played twice)."""
    import os
    import signal

    from conftest import Daemon, make_fake_model, shutdown_daemon_at
    from nvim.editor import lofid_wrapper

    d = Daemon(short_tmp, model_dir=make_fake_model(short_tmp / "model"))
    bindir = lofid_wrapper(d, short_tmp / "bin")
    raw, out = raw_player(short_tmp)
    fileplay, log = fake_player(short_tmp)
    nvim = start_nvim(env={"LOFID_SOCKET": str(d.socket)}, path_prepend=bindir,
                      setup={"auto_start": True, "stream_players": [[str(raw)]], "players": [[str(fileplay)]]})
    try:
        nvim.cmd("LofiDaemon start")
        nvim.wait("return _G.lofi_test.texts('lofid started')[1]", timeout=30)
        nvim.cmd("LofiGenerate phoenix step=0.02 duration=8 seed=2 play=true")
        wait_for(lambda: nvim.statusline().startswith("♪ ▶ "))
        os.kill(nvim.lua("return require('lofi.daemon').last_start.pid"), signal.SIGKILL)
        track = nvim.wait(LAST_TRACK, timeout=60)
        wait_for(lambda: log.exists() and log.read_text().splitlines())  # the stream ended, the file loops
        streamed = list(out.glob("*.pcm"))
        assert len(streamed) == 1 and streamed[0].read_bytes() == samples(track["path"])
    finally:
        shutdown_daemon_at(d.socket)
