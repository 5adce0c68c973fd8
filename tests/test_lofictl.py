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
    for args in (["status"], ["tracks"], ["stop"], ["--no-start", "generate", "x"], ["generate", "x", "--no-start"]):
        r = lofictl(env, *args)  # only generate, play and models download start lofid, and never with --no-start
        assert r.returncode != 0 and r.stderr.startswith("lofictl: NOT_RUNNING: no lofid answers on "), (args, r)
        assert not Path(env["LOFID_SOCKET"]).exists() and "started lofid" not in r.stderr
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


def test_bad_input_gets_a_code_and_no_traceback(env):
    assert lofictl(env, "generate", "start me step=0", "--duration", "5", "--seed", "1").returncode == 0
    bad = [
        (["generate", b"lofi \xff\xfe piano", "--duration", "5"], "INVALID_PARAMS: the prompt is not UTF-8 text"),
        (["generate", "x", "--seed", str(2**64)], "INVALID_PARAMS: argument --seed: seed must be an integer"),
        (["generate", "x", "--seed", "-1"], "INVALID_PARAMS: argument --seed"),
        (["generate", "x", "--seed", "1.5"], "INVALID_PARAMS: argument --seed"),
        (["generate", "x", "--duration", "abc"], "INVALID_PARAMS: argument --duration"),
        (["generate", "x", "--duration", "nan"], "INVALID_DURATION: "),
        (["generate", " ", "--duration", "5"], "INVALID_PARAMS: prompt is required"),
        (["generate", "x" * 2001, "--duration", "5"], "INVALID_PARAMS: prompt is 2001 characters"),
        (["--timeout", "-1", "status"], "INVALID_PARAMS: argument --timeout"),
        (["status", "--timeout", "nan"], "INVALID_PARAMS: argument --timeout"),
        (["tracks", "--limit", str(2**70)], "INVALID_PARAMS: cannot send tracks"),
        (["tracks", "--limit", "-1"], "INVALID_PARAMS: limit must be a non-negative integer"),
        (["tracks", "prune", "--max-mb", str(2**70)], "INVALID_PARAMS: cannot send cache_prune"),
        (["play", b"\xff\xfe"], "INVALID_PARAMS: cannot send track: an argument is not UTF-8 text"),
        (["models", "download", "--variant", "fp64"], "INVALID_PARAMS: argument --variant"),
        (["bogus"], "INVALID_PARAMS: argument COMMAND: invalid choice: 'bogus'"),
        ([], "INVALID_PARAMS: the following arguments are required: COMMAND"),
        (["--socket", "/nonexistent/dir/" + "x" * 120, "status"], "NOT_RUNNING: cannot connect to /nonexistent"),
    ]
    for args, expected in bad:
        r = subprocess.run([sys.executable, "-m", "lofictl", *args], env=env, capture_output=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        err = r.stderr.decode()
        assert r.returncode not in (0, None) and "Traceback" not in err, (args, err)
        assert err.strip().splitlines()[-1].startswith(f"lofictl: {expected}"), (args, err)
    status = json.loads(lofictl(env, "--json", "status").stdout)  # the daemon took none of it badly
    assert status["queue"] == [] and status["worker"]["restarts"] == 0


def test_global_flags_go_before_or_after_the_command(env, short_tmp):
    before = lofictl(env, "--json", "--timeout", "30", "generate", "flags step=0", "--duration", "5", "--seed", "4")
    after = lofictl(env, "generate", "flags step=0", "--json", "--duration", "5", "--seed", "4", "--timeout", "30")
    assert before.returncode == 0 and after.returncode == 0, (before.stderr, after.stderr)
    fresh, cached = json.loads(before.stdout), json.loads(after.stdout)
    # a cached result carries the same fields as a fresh one
    assert (fresh["cached"], cached["cached"]) == (False, True) and set(fresh) == set(cached)
    assert {k: v for k, v in fresh.items() if k not in ("cached", "accessed_at")} == \
        {k: v for k, v in cached.items() if k not in ("cached", "accessed_at")}
    assert json.loads(lofictl(env, "status", "--json").stdout)["pid"] > 0
    assert json.loads(lofictl(env, "tracks", "--json").stdout)[0]["track_id"] == fresh["track_id"]
    r = lofictl(env, "status", "--socket", str(short_tmp / "elsewhere.sock"))
    assert r.returncode != 0 and f"NOT_RUNNING: no lofid answers on {short_tmp / 'elsewhere.sock'}" in r.stderr
    r = lofictl(env, "generate", "other step=0", "--socket", str(short_tmp / "elsewhere.sock"), "--no-start")
    assert r.returncode != 0 and "--no-start was given" in r.stderr
    other = short_tmp / "other.toml"
    other.write_text("top_k = 9\n")
    out = json.loads(lofictl(env, "config", "--no-start", "--config", str(other), "--socket",
                             str(short_tmp / "elsewhere.sock"), "--json").stdout)
    assert out["settings"]["top_k"] == 9 and out["sources"]["config"] == "flag --config"
    r = lofictl(env, "tracks", "rm", fresh["track_id"], "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["track_id"] == fresh["track_id"]
