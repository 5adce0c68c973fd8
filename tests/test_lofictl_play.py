"""`lofictl generate --play` and `lofictl play` with recording players on PATH: a player
that reads PCM on stdin plays the track from the stream while it is generated; one that
cannot (afplay) plays the file once complete, and so does every cache hit."""

from __future__ import annotations

import json
import os
import shlex
import sys
import wave
from pathlib import Path

from test_lofictl import env, lofictl  # noqa: F401  (env is a fixture)


def fake_players(short_tmp: Path, names: tuple[str, ...], status: int = 0) -> tuple[Path, Path]:
    """Players that record their argv (one JSON line per run) and what they read on stdin
    (when their argv ends in a stdin marker); -> (bin dir, record dir)."""
    bindir, records = short_tmp / "bin", short_tmp / "played"
    bindir.mkdir(exist_ok=True)
    records.mkdir(exist_ok=True)
    for name in names:
        script = bindir / name
        script.write_text(f"""#!{sys.executable}
import json, sys
with open({str(records / "argv.jsonl")!r}, "a") as f:
    f.write(json.dumps([{name!r}, *sys.argv[1:]]) + "\\n")
if sys.argv[-1] in ("-", "pipe:0") or {name!r} == "paplay":
    with open({str(records / "stdin.pcm")!r}, "wb") as f:
        f.write(sys.stdin.buffer.read())
sys.exit({status})
""")
        script.chmod(0o755)
    return bindir, records


def with_path(env: dict, bindir: Path) -> dict:  # noqa: F811
    env = {**env, "PATH": f"{bindir}:{os.path.dirname(sys.executable)}:/usr/bin:/bin"}
    for player in ("pw-play", "paplay", "aplay", "afplay", "ffplay", "mpv", "play"):
        if not (bindir / player).exists():
            assert not any((Path(d) / player).exists() for d in env["PATH"].split(":")), f"real {player} on PATH"
    return env


def runs(records: Path) -> list[list[str]]:
    path = records / "argv.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pcm_of(wav_path: str) -> bytes:
    with wave.open(wav_path, "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 32000)
        return w.readframes(w.getnframes())


def test_generate_play_streams_to_a_player_reading_stdin(env, short_tmp):  # noqa: F811
    bindir, records = fake_players(short_tmp, ("aplay", "afplay"))
    env = with_path(env, bindir)
    assert lofictl(env, "status").returncode != 0  # none yet: the next one starts it
    assert lofictl(env, "generate", "start step=0", "--duration", "5", "--seed", "9").returncode == 0
    r = lofictl(env, "--json", "generate", "streamed step=0.005", "--duration", "6", "--seed", "1", "--play")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["cached"] is False
    # aplay (the first player that reads stdin; afplay cannot) got raw PCM, and exactly the WAV's samples
    assert runs(records) == [["aplay", "-q", "-t", "raw", "-f", "S16_LE", "-r", "32000", "-c", "1", "-"]]
    assert (records / "stdin.pcm").read_bytes() == pcm_of(record["path"])
    # a cache hit sends no chunks: the file is played
    r = lofictl(env, "--json", "generate", "streamed step=0.005", "--duration", "6", "--seed", "1", "--play")
    assert r.returncode == 0 and json.loads(r.stdout)["cached"] is True, r.stderr
    assert runs(records)[-1] == ["aplay", "-q", "--", record["path"]]


def test_a_player_that_cannot_read_stdin_plays_the_file_when_complete(env, short_tmp):  # noqa: F811
    bindir, records = fake_players(short_tmp, ("afplay",))
    env = with_path(env, bindir)
    r = lofictl(env, "--json", "generate", "file step=0.002", "--duration", "5", "--seed", "2", "--play")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert runs(records) == [["afplay", record["path"]]] and Path(record["path"]).is_file()
    assert not (records / "stdin.pcm").exists()


def test_a_failing_player_is_player_failed(env, short_tmp):  # noqa: F811
    bindir, records = fake_players(short_tmp, ("aplay",), status=3)
    env = with_path(env, bindir)
    r = lofictl(env, "generate", "fails step=0.002", "--duration", "5", "--seed", "3", "--play")
    assert r.returncode != 0 and "lofictl: PLAYER_FAILED: aplay exited with status 3; the track is " in r.stderr
    assert len(runs(records)) == 1
    r = lofictl(with_path(env, short_tmp / "nothing"), "play", Path(r.stderr.split()[-1]).stem)
    assert r.returncode != 0 and "lofictl: NO_PLAYER: no audio player found" in r.stderr


def failing_player(bindir: Path, name: str, message: str, status: int) -> Path:
    """A player that cannot play here: it says why on stderr (after a line of noise) and exits
    with ``status`` at once, reading nothing; each run appends its name to tried.log."""
    bindir.mkdir(exist_ok=True)
    tried = bindir.parent / "tried.log"
    script = bindir / name
    script.write_text(f"#!/bin/sh\necho {name} >> {shlex.quote(str(tried))}\n"
                      f"echo {shlex.quote(name + ' noise before the reason')} >&2\n"
                      f"echo {shlex.quote(message)} >&2\nexit {status}\n")
    script.chmod(0o755)
    return tried


APLAY_BUSY = "aplay: audio open error: Device or resource busy"


def test_a_player_that_fails_at_once_gives_way_to_the_next(env, short_tmp):  # noqa: F811
    tried = failing_player(short_tmp / "bin", "aplay", APLAY_BUSY, 1)  # first in the order
    bindir, records = fake_players(short_tmp, ("mpv",))
    env = with_path(env, bindir)
    r = lofictl(env, "--json", "generate", "file first step=0.002", "--duration", "5", "--seed", "4")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    r = lofictl(env, "play", record["track_id"])
    assert r.returncode == 0, r.stderr
    assert runs(records) == [["mpv", "--no-video", "--really-quiet", "--", record["path"]]]
    assert tried.read_text() == "aplay\n" and "aplay" not in r.stderr  # its stderr did not spill
    # from the stream: mpv gets the PCM from the start, exactly the WAV's samples
    r = lofictl(env, "--json", "generate", "streamed after aplay step=0.005", "--duration", "6", "--seed", "5",
                "--play")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["cached"] is False and "aplay" not in r.stderr
    assert tried.read_text() == "aplay\naplay\n"
    assert runs(records)[1:] == [["mpv", "--no-video", "--really-quiet", "--demuxer=rawaudio",
                                  "--demuxer-rawaudio-format=s16le", "--demuxer-rawaudio-rate=32000",
                                  "--demuxer-rawaudio-channels=1", "-"]]
    assert (records / "stdin.pcm").read_bytes() == pcm_of(record["path"])


def test_when_every_player_fails_player_failed_names_each_with_its_stderr(env, short_tmp):  # noqa: F811
    bindir = short_tmp / "bin"
    tried = failing_player(bindir, "aplay", APLAY_BUSY, 1)
    failing_player(bindir, "mpv", "Could not open/initialize audio device -> no sound.", 2)
    env = with_path(env, bindir)
    why = (f"lofictl: PLAYER_FAILED: {APLAY_BUSY} (exited with status 1); "
           "mpv: Could not open/initialize audio device -> no sound. (exited with status 2); the track is ")
    r = lofictl(env, "--json", "generate", "nowhere to play step=0.005", "--duration", "6", "--seed", "6", "--play")
    assert r.returncode != 0 and r.stderr.splitlines()[-1].startswith(why), r.stderr
    path = r.stderr.splitlines()[-1][len(why):]
    assert Path(path).is_file() and "noise" not in r.stderr  # the track is kept; no other player output
    assert tried.read_text() == "aplay\nmpv\n"
    r = lofictl(env, "play", Path(path).stem)
    assert r.returncode != 0 and r.stderr.splitlines()[-1] == why + path, r.stderr
    assert "noise" not in r.stderr and tried.read_text() == "aplay\nmpv\n" * 2
