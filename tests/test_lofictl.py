"""lofictl as a user runs it: a real process against a real (auto-started) daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SCRIPTED_ENGINE, _pythonpath, make_fake_model, shutdown_daemon_at


@pytest.fixture
def env(short_tmp):
    e = {**os.environ, "PYTHONPATH": _pythonpath(), "LOFID_ENGINE": SCRIPTED_ENGINE,
         "LOFID_SOCKET": str(short_tmp / "run" / "lofid.sock"), "LOFID_CACHE_DIR": str(short_tmp / "tracks"),
         "LOFID_STATE_DIR": str(short_tmp / "state"),
         "LOFID_MODEL_DIR": str(make_fake_model(short_tmp / "model", ("int8",))),
         "LOFID_CONFIG": str(short_tmp / "config.toml"), "HF_HOME": str(short_tmp / "hf")}
    (short_tmp / "config.toml").write_text("")
    yield e
    shutdown_daemon_at(Path(e["LOFID_SOCKET"]))


def lofictl(env, *args, timeout=60):
    return subprocess.run([sys.executable, "-m", "lofictl", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_generate_starts_the_daemon_and_prints_the_path(env):
    # a model load that takes a while (the first load of a variant rewrites it) is shown
    r = lofictl({**env, "LOFID_TEST_LOAD_SLEEP": "3"}, "generate", "lofi hip hop, jazzy piano step=0.002",
                "--duration", "5", "--seed", "9")
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert path.suffix == ".wav" and path.exists() and path.parent == Path(env["LOFID_CACHE_DIR"])
    assert "started lofid" in r.stderr and "generating" in r.stderr  # progress went to stderr
    assert r.stderr.index("loading 0% the int8 model") < r.stderr.index("generating 0%")
    # the second call finds the running daemon and the cached track
    again = lofictl(env, "--json", "generate", "lofi hip hop, jazzy piano step=0.002", "--duration", "5",
                    "--seed", "9")
    assert again.returncode == 0 and "started lofid" not in again.stderr
    out = json.loads(again.stdout)
    assert out["cached"] is True and out["path"] == str(path)


def test_no_start_and_errors(env):
    r = lofictl(env, "--no-start", "status")
    assert r.returncode != 0 and r.stderr.startswith("lofictl: DAEMON_NOT_RUNNING: ")
    r = lofictl(env, "generate", "x", "--duration", "500")
    assert r.returncode != 0 and r.stderr.strip().endswith(
        "lofictl: INVALID_DURATION: duration_sec must be between 5 and 120, not 500.0")
    r = lofictl(env, "play", "../../etc/passwd")
    assert r.returncode != 0 and "lofictl: INVALID_PARAMS:" in r.stderr
    r = lofictl(env, "play", "0123456789abcdef")
    assert r.returncode != 0 and "lofictl: TRACK_NOT_FOUND:" in r.stderr


def test_no_wait_status_tracks_and_json(env):
    r = lofictl(env, "--json", "generate", "queued step=0.002", "--duration", "5", "--seed", "1", "--no-wait")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["status"] in ("queued", "running") and len(first["track_id"]) == 16
    done = lofictl(env, "--json", "generate", "queued step=0.002", "--duration", "5", "--seed", "1")
    assert json.loads(done.stdout)["track_id"] == first["track_id"]
    status = json.loads(lofictl(env, "--json", "status").stdout)
    assert status["worker"]["restarts"] == 0 and status["model"]["state"] == "ready"
    text = lofictl(env, "status").stdout
    assert text.startswith("lofid ") and "model: ready" in text
    tracks = lofictl(env, "tracks").stdout
    assert first["track_id"] in tracks and "queued step" in tracks
    assert json.loads(lofictl(env, "--json", "tracks").stdout)[0]["track_id"] == first["track_id"]


def test_play_uses_the_first_player_without_a_shell(env, short_tmp):
    bindir = short_tmp / "bin"
    bindir.mkdir()
    log = short_tmp / "player.log"
    for name in ("aplay", "mpv"):  # aplay comes first in the preference order
        script = bindir / name
        script.write_text(f"#!/bin/sh\necho {name} \"$@\" >> {log}\n")
        script.chmod(0o755)
    env = {**env, "PATH": f"{bindir}:{os.path.dirname(sys.executable)}:/usr/bin:/bin"}
    for player in ("pw-play", "paplay"):
        assert not any((Path(d) / player).exists() for d in env["PATH"].split(":")[1:]), "real player on PATH"
    r = lofictl(env, "--json", "generate", "play me; rm -rf / step=0", "--duration", "5", "--seed", "2")
    track = json.loads(r.stdout)
    r = lofictl(env, "play", track["track_id"])
    assert r.returncode == 0, r.stderr
    assert log.read_text().split() == ["aplay", "-q", "--", track["path"]]


def test_models_list(env):
    r = lofictl(env, "--json", "models", "list")
    rows = {row["variant"]: row for row in json.loads(r.stdout)}
    assert rows["int8"]["present"] is True and rows["int8"]["default"] is True  # the CPU default
    assert rows["fp32"]["present"] is False and rows["fp32"]["missing"] == ["small_fp32/decoder_model_merged.onnx"]
    assert rows["fp16"]["present"] is False and not rows["fp16"]["default"]


def test_daemon_subcommand_is_lofid(env):
    r = lofictl(env, "daemon", "--version")
    assert r.returncode == 0 and r.stdout.startswith("lofid ")
