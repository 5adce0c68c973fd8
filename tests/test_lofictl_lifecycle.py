"""The daemon lofictl starts, as a user sees it: stop it, see its settings (and when they
are not the shell's), config and models list of the running daemon, the first load's
one-time preparation. A real lofictl against a real daemon (the scripted engine)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fakehub import FakeHub, write_random_model
from test_lofictl import env, lofictl  # noqa: F401  (env is a fixture)


def wait_status(env, until, timeout=30):  # noqa: F811  (env: the fixture's value, passed in)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = lofictl(env, "--json", "status")
        if r.returncode == 0 and until(status := json.loads(r.stdout)):
            return status
        time.sleep(0.1)
    raise AssertionError(f"status never matched: {r.stdout} {r.stderr}")


def test_stop_stops_the_daemon_and_drops_unfinished_jobs(env):  # noqa: F811
    r = lofictl(env, "--json", "generate", "long step=0.05", "--duration", "5", "--seed", "1", "--no-wait")
    job = json.loads(r.stdout)["track_id"]
    pid = wait_status(env, lambda s: s.get("running"))["pid"]
    r = lofictl(env, "--json", "stop")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"stopped": True, "pid": pid, "dropped": [job]}
    assert not Path(env["LOFID_SOCKET"]).exists()  # gone, and its lock released (stop waits for both)
    r = lofictl(env, "status")
    assert r.returncode != 0 and r.stderr.startswith("lofictl: NOT_RUNNING: ")
    r = lofictl(env, "stop")
    assert r.returncode != 0 and r.stderr.startswith("lofictl: NOT_RUNNING: ")
    # the next generate starts a new daemon at once
    r = lofictl(env, "generate", "after stop step=0", "--duration", "5", "--seed", "2")
    assert r.returncode == 0 and "started lofid" in r.stderr, r.stderr
    assert f"stopped lofid (pid {json.loads(lofictl(env, '--json', 'status').stdout)['pid']})" in \
        lofictl(env, "stop").stdout
    help_text = lofictl(env, "--help").stdout
    assert "stop the running lofid" in help_text and "until `lofictl stop`" in help_text


def test_status_reports_the_settings_and_a_different_shell_is_told(env, short_tmp):  # noqa: F811
    started = {**env, "LOFID_TOP_K": "7"}
    assert lofictl(started, "generate", "settings step=0", "--duration", "5", "--seed", "1").returncode == 0
    status = json.loads(lofictl(started, "--json", "status").stdout)
    settings, sources = status["settings"], status["settings_sources"]
    assert settings["top_k"] == 7 and sources["top_k"] == "env LOFID_TOP_K"
    assert settings["model_dir"] == env["LOFID_MODEL_DIR"] and sources["model_dir"] == "env LOFID_MODEL_DIR"
    assert settings["variant"] == "int8" and sources["variant"] == "default"
    assert settings["cache_dir"] == env["LOFID_CACHE_DIR"] and settings["threads"] is None
    assert {"device", "temperature", "guidance_scale"} <= set(settings)
    same = lofictl(started, "status")
    assert same.returncode == 0 and "other settings" not in same.stderr and "top_k=7" in same.stdout
    # this shell asks for another model dir and sampling: the daemon keeps its own, and says so
    other = {**env, "LOFID_MODEL_DIR": str(short_tmp / "other-model"), "LOFID_TEMPERATURE": "0.5"}
    for args in (["status"], ["tracks"], ["generate", "settings step=0", "--duration", "5", "--seed", "1"]):
        r = lofictl(other, *args)
        assert r.returncode == 0, r.stderr
        note = r.stderr
        assert f"the running lofid (pid {status['pid']}) has other settings than this shell" in note
        assert f'model_dir is "{short_tmp / "other-model"}" here (env LOFID_MODEL_DIR)' in note
        assert "top_k is 250 here (default), 7 in lofid (env LOFID_TOP_K)" in note
        assert "temperature is 0.5 here (env LOFID_TEMPERATURE), 1.0 in lofid (default)" in note
        assert "`lofictl stop`" in note
    assert "other settings" not in lofictl(other, "stop").stderr


def test_config_and_models_list_describe_the_running_daemon(env, short_tmp):  # noqa: F811
    empty = short_tmp / "empty-model"
    empty.mkdir()
    shell = {**env, "LOFID_MODEL_DIR": str(empty)}
    # nothing running: this shell's settings
    rows = {r["variant"]: r for r in json.loads(lofictl(shell, "--json", "models", "list").stdout)}
    assert rows["int8"]["present"] is False and "daemon_state" not in rows["int8"]
    out = json.loads(lofictl(shell, "--json", "config").stdout)
    assert out["daemon"] is None and out["settings"]["model_dir"] == str(empty)
    assert "no lofid answers on" in lofictl(shell, "config").stdout
    # a daemon started with the placeholder model and top_k 12
    started = {**env, "LOFID_TOP_K": "12"}
    assert lofictl(started, "generate", "config step=0", "--duration", "5", "--seed", "1").returncode == 0
    r = lofictl(shell, "--json", "models", "list")
    rows = {row["variant"]: row for row in json.loads(r.stdout)}
    assert rows["int8"]["present"] is True and rows["int8"]["where"] == env["LOFID_MODEL_DIR"]
    assert rows["int8"]["daemon_state"] == "ready" and rows["int8"]["default"] is True
    assert "the models as the running lofid (pid" in r.stderr and "model_dir is" in r.stderr
    r = lofictl(shell, "--json", "config")
    out = json.loads(r.stdout)
    assert out["daemon"]["pid"] > 0 and out["settings"]["model_dir"] == env["LOFID_MODEL_DIR"]
    assert out["settings"]["top_k"] == 12 and out["sources"]["top_k"] == "env LOFID_TOP_K"
    assert "model_dir is" in r.stderr and "top_k is 250 here (default), 12 in lofid" in r.stderr
    text = lofictl(shell, "config").stdout
    assert text.startswith(f"# the running lofid's settings (pid {out['daemon']['pid']}")
    assert "# env LOFID_TOP_K" in text


def test_the_first_load_says_it_prepares_the_model(env, short_tmp):  # noqa: F811
    env = {**env, "LOFID_TEST_PREPARE_SLEEP": "2", "LOFID_OPTIMIZED_DIR": str(short_tmp / "optimized")}
    r = lofictl(env, "--json", "generate", "first step=0.005", "--duration", "5", "--seed", "1", "--no-wait")
    status = wait_status(env, lambda s: s["model"]["state"] == "preparing")
    assert status["model"]["variant"] == "int8" and status["model"]["state_sec"] >= 0
    assert "model: preparing (" in lofictl(env, "status").stdout
    r = lofictl(env, "generate", "first step=0.005", "--duration", "5", "--seed", "2")
    assert r.returncode == 0, r.stderr
    # a later load of the same variant needs no preparation, not even in a new daemon
    assert lofictl(env, "stop").returncode == 0
    r = lofictl(env, "generate", "second step=0.005", "--duration", "5", "--seed", "3")
    assert r.returncode == 0 and "preparing" not in r.stderr and "loading 0% the int8 model" in r.stderr


def test_a_watched_first_load_shows_the_preparation(env, short_tmp):  # noqa: F811
    env = {**env, "LOFID_TEST_PREPARE_SLEEP": "2", "LOFID_OPTIMIZED_DIR": str(short_tmp / "optimized")}
    r = lofictl(env, "generate", "watched step=0.005", "--duration", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "preparing the int8 model for this machine (once per variant" in r.stderr
    assert r.stderr.index("preparing the int8 model") < r.stderr.index("generating 0%")


def test_models_download_prepares_the_model_at_once(env, short_tmp):  # noqa: F811
    with FakeHub(write_random_model(short_tmp / "served", onnx_size=50_000)) as hub:
        env = {**hub.env(short_tmp / "hf", base=env), "LOFID_TEST_PREPARE_SLEEP": "1",
               "LOFID_OPTIMIZED_DIR": str(short_tmp / "optimized")}
        del env["LOFID_MODEL_DIR"]
        r = lofictl(env, "models", "download")
        assert r.returncode == 0 and r.stdout.startswith("downloaded int8 "), r.stderr
        assert r.stderr.index("download 100%") < r.stderr.index("preparing the int8 model for this machine")
        # the daemon's own variant is prepared, loaded and ready before any request
        assert json.loads(lofictl(env, "--json", "status").stdout)["model"]["state"] == "ready"
        assert (short_tmp / "optimized" / "scripted-int8.prepared").is_file()
        r = lofictl(env, "--json", "models", "download", "--variant", "fp16")  # another: prepared, then dropped
        assert r.returncode == 0 and json.loads(r.stdout)["variant"] == "fp16", r.stderr
        assert (short_tmp / "optimized" / "scripted-fp16.prepared").is_file()
        assert json.loads(lofictl(env, "--json", "status").stdout)["model"]["variant"] == "int8"
        r = lofictl(env, "generate", "downloaded step=0", "--duration", "5", "--seed", "1")
        assert r.returncode == 0 and "preparing" not in r.stderr, r.stderr


def test_a_failed_preparation_does_not_fail_the_download(env, short_tmp):  # noqa: F811
    with FakeHub(write_random_model(short_tmp / "served", onnx_size=50_000)) as hub:
        # the scripted engine refuses a GPU: the download succeeds, its first load fails
        env = {**hub.env(short_tmp / "hf", base=env), "LOFID_DEVICE": "cuda"}
        del env["LOFID_MODEL_DIR"]
        r = lofictl(env, "models", "download")
        assert r.returncode == 0 and r.stdout.startswith("downloaded fp16 "), r.stderr
        assert "lofictl: downloaded, but the first load failed: MODEL_LOAD_FAILED: " in r.stderr
        model = json.loads(lofictl(env, "--json", "status").stdout)["model"]
        assert model["state"] == "present" and model["variant"] == "fp16"  # not left "loading"
