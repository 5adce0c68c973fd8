"""Data safety and trust at the daemon's edges (issue 17): which files lofid may remove,
how it writes temporary files, who can read what it writes, which settings enter a track
id, failures that stay answerable, model state after a failed download, connection
limits, out of memory at load, and small hardening. Each test runs a real lofid with the
scripted engine (tests/engines.py) on a temporary socket."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FIXTURE_MODEL, SCRIPTED_ENGINE, _pythonpath, make_fake_model, shutdown_daemon_at, wait_for
from hog import Hog

from lofid.errors import LofiError


def gen(c, prompt, seed=1, duration=5, **kw):
    return c.call("generate", {"prompt": prompt, "duration_sec": duration, "seed": seed, **kw})


def done(c, prompt, seed=1, **kw):
    r = gen(c, prompt, seed, **kw)
    return r if r["status"] == "complete" else c.wait_track(r["track_id"], timeout=60)


def expect_error(c, track_id, timeout=60):
    with pytest.raises(LofiError) as e:
        c.wait_track(track_id, timeout=timeout)
    return e.value


# ------------------------------------------------------- 1. only lofid's own files are removed


def test_only_names_lofid_makes_are_ever_removed(make_daemon, short_tmp):
    """A cache dir the user shares with their own files: start, eviction, track_delete,
    cache_prune and a worker killed mid-job remove lofid's names and nothing else."""
    cache = short_tmp / "music"
    cache.mkdir(mode=0o700)
    mine = {"my_song.wav": b"RIFF my own song", ".notes.tmp": b"notes", "my_song.json": b"{}",
            ".my_song.wav.123.tmp": b"an editor's temp", "0123456789abcdef.wav.bak": b"backup",
            "0123456789ABCDEF.wav": b"upper case", ".0123456789abcdef.wav.tmp": b"no pid",
            "notes.txt": b"text"}
    for name, data in mine.items():
        (cache / name).write_bytes(data)
    (cache / "a folder.tmp").mkdir()
    leftovers = [".0123456789abcdef.wav.999.tmp", ".0123456789abcdef.json.999.0badcafe.tmp",
                 "fedcba9876543210.wav"]  # an older run's temporary files, a WAV without its record
    for name in leftovers:
        (cache / name).write_bytes(b"half")

    d = make_daemon(cache_dir=cache, cache_max_mb=1)  # room for three 5 s tracks
    with d.client() as c:
        tracks = [done(c, "mine step=0", seed) for seed in range(1, 6)]  # eviction twice
        worker = c.call("status")["worker"]["pid"]
        (cache / f".my_song.wav.{worker}.tmp").write_bytes(b"named like the worker's")  # the dead worker's pid
        crashed = gen(c, "crash@3 step=0", 9)
        assert expect_error(c, crashed["track_id"]).code == "MODEL_INFERENCE_FAILED"
        c.call("track_delete", {"track_id": tracks[-1]["track_id"]})
        assert c.call("cache_prune", {"all": True})["tracks_left"] == 0
    d.stop()
    mine[f".my_song.wav.{worker}.tmp"] = b"named like the worker's"
    left = {p.name: p.read_bytes() for p in cache.iterdir() if p.is_file()}
    assert left == mine  # every file of the user's, byte for byte; none of lofid's
    assert (cache / "a folder.tmp").is_dir()
    assert "removing leftover temporary file .0123456789abcdef.wav.999.tmp" in d.logs()


# ------------------------------------------- 2. temporary files are exclusive; the cache dir is checked


def test_a_planted_symlink_at_a_temporary_name_is_never_followed(daemon, short_tmp):
    """Symlinks at the temporary names lofid once used (``.<id>.wav.<worker pid>.tmp`` and
    ``.<id>.json.<broker pid>.tmp``, predictable) point at files of the user's: they stay
    untouched, and the track is written anyway."""
    victims = {n: short_tmp / n for n in ("victim.wav", "victim.json")}
    for path in victims.values():
        path.write_bytes(b"precious")
    with daemon.client() as c:
        done(c, "start the worker step=0", 1)
        worker = c.call("status")["worker"]["pid"]
        r = gen(c, "slow step=0.01", 2)
        cache = daemon.cache_dir
        os.symlink(victims["victim.wav"], cache / f".{r['track_id']}.wav.{worker}.tmp")
        os.symlink(victims["victim.json"], cache / f".{r['track_id']}.json.{daemon.proc.pid}.tmp")
        record = c.wait_track(r["track_id"], timeout=60)
    assert all(p.read_bytes() == b"precious" for p in victims.values())
    for name in (f"{r['track_id']}.wav", f"{r['track_id']}.json"):
        st = os.lstat(cache / name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, name
    assert os.path.getsize(record["path"]) == 5 * 32000 * 2 + 44


@pytest.mark.parametrize("how", ["group and others can write", "another user's"])
def test_a_cache_dir_others_control_is_refused_with_the_fix(make_daemon, short_tmp, how):
    cache = short_tmp / "shared"
    cache.mkdir()
    if how == "another user's":
        if os.geteuid() != 0:
            pytest.skip("giving a folder away needs root")
        os.chown(cache, 65534, 65534)
    else:
        os.chmod(cache, 0o777)
    (cache / "fedcba9876543210.wav").write_bytes(b"planted")  # lofid's name, in a folder it does not trust
    d = make_daemon(cache_dir=cache)
    with d.client() as c:
        with pytest.raises(LofiError) as e:
            gen(c, "refused step=0")
        assert e.value.code == "STORAGE_FAILED"
        assert str(cache) in e.value.message
        fix = "belongs to uid 65534" if how == "another user's" else "chmod go-w"
        assert fix in e.value.message, e.value.message
        assert c.call("status")["queue"] == []  # nothing was queued
        if how == "another user's":
            os.chown(cache, os.getuid(), os.getgid())
        else:
            os.chmod(cache, 0o755)  # the user's fix; read access for others is the user's choice
        assert done(c, "fixed step=0")["status"] == "complete"  # no restart needed
    assert (cache / "fedcba9876543210.wav").exists()  # nothing removed in the folder at start
    assert "no track is written until it is fixed" in d.logs()


# ------------------------------------------------------------- 4. private whatever the umask


def modes(root: Path) -> dict[str, int]:
    """Path (relative to root) -> permission bits, for root and everything under it."""
    out = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def test_everything_lofid_writes_is_private_whatever_the_umask(short_tmp):
    """lofictl under umask 000 starts lofid and generates: the state dir, the daemon's log
    (it holds prompts), the track cache (created three levels deep), the tracks, the hash
    cache: folders 0700, files 0600."""
    base = short_tmp / "home"
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "LOFID_ENGINE": SCRIPTED_ENGINE,
           "LOFID_SOCKET": str(short_tmp / "run" / "lofid.sock"), "LOFID_CACHE_DIR": str(base / "cache" / "lofid"
                                                                                        / "tracks"),
           "LOFID_STATE_DIR": str(base / "state"), "LOFID_MODEL_DIR": str(make_fake_model(short_tmp / "model")),
           "LOFID_CONFIG": str(short_tmp / "config.toml"), "HF_HOME": str(short_tmp / "hf")}
    (short_tmp / "config.toml").write_text("")
    base.mkdir(mode=0o700)
    try:
        r = subprocess.run([sys.executable, "-m", "lofictl", "generate", "a secret prompt step=0", "--duration", "5"],
                           env=env, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL,
                           preexec_fn=lambda: os.umask(0))
        assert r.returncode == 0, r.stderr
    finally:
        shutdown_daemon_at(short_tmp / "run" / "lofid.sock")
    found = modes(base)
    assert "a secret prompt" in (base / "state" / "lofid.log").read_text()
    assert {"state/lofid.log", "state/model-hashes.json"} <= set(found)
    assert any(name.endswith(".wav") for name in found) and any(name.endswith(".json") for name in found)
    loose = {name: f"{mode:04o}" for name, mode in found.items()
             if mode != (0o700 if (base / name).is_dir() else 0o600)}
    assert loose == {}, loose


def test_the_optimized_graph_cache_is_private_whatever_the_umask(make_daemon, short_tmp):
    """The real engine on the tiny model writes its optimized graphs under a umask of 000."""
    old = os.umask(0)
    try:
        d = make_daemon(model_dir=FIXTURE_MODEL, variant="int8", threads=1,
                        env={"LOFID_ENGINE": "lofid.worker.musicgen:MusicGen"})
    finally:
        os.umask(old)
    with d.client() as c:
        done(c, "lofi, privately", 1)
    optimized = short_tmp / "optimized"  # LOFID_OPTIMIZED_DIR of the Daemon fixture
    found = modes(optimized)
    assert any(name.endswith(".onnx") for name in found), found
    loose = {name: f"{mode:04o}" for name, mode in found.items()
             if mode != (0o700 if (optimized / name).is_dir() else 0o600)}
    assert loose == {}, loose
    assert modes(d.cache_dir) == {".": 0o700, **{n: 0o600 for n in modes(d.cache_dir) if n != "."}}


# ----------------------------------------------------------- 5. sampling settings in the track id


def test_changed_sampling_settings_make_a_new_track(make_daemon):
    """The same prompt, seed and duration under other top_k / temperature / guidance_scale is
    another track, generated (not the old one from the cache); unchanged settings hit the cache."""
    d = make_daemon()
    with d.client() as c:
        first = done(c, "lofi sampling step=0", 7)
        assert first["top_k"] == 250 and first["temperature"] == 1.0 and first["guidance_scale"] == 3.0
        assert gen(c, "lofi sampling step=0", 7)["cached"] is True
    d.stop()
    ids = {first["track_id"]}
    for flag, value in (("top_k", 50), ("temperature", 0.7), ("guidance_scale", 1.5)):
        d.flags = {k: v for k, v in d.flags.items() if k not in ("top_k", "temperature", "guidance_scale")}
        d.flags[flag] = value
        d.start()
        with d.client() as c:
            r = gen(c, "lofi sampling step=0", 7)
            assert r["cached"] is False and r["track_id"] not in ids, (flag, r)
            record = c.wait_track(r["track_id"])
            assert record[flag] == value
            assert gen(c, "lofi sampling step=0", 7)["cached"] is True  # the same settings: the same track
        ids.add(r["track_id"])
        d.stop()
    assert len(ids) == 4


# ------------------------------------------------------------------ 6. failures stay answerable


def test_a_failed_track_stays_answerable_and_asking_again_retries(daemon):
    with daemon.client() as c:
        r = gen(c, "doomed nan@3 step=0", 5)
        err = expect_error(c, r["track_id"])
        assert err.code == "MODEL_INFERENCE_FAILED"
        record = c.call("track", {"track_id": r["track_id"]})
        assert record["status"] == "failed" and record["track_id"] == r["track_id"]
        assert record["error"] == {"code": "MODEL_INFERENCE_FAILED", "message": err.message}
        assert (record["prompt"], record["seed"], record["duration_sec"]) == ("doomed nan@3 step=0", 5, 5.0)
        assert r["track_id"] not in {t["track_id"] for t in c.call("tracks")}  # tracks lists complete ones
        # asking again retries: a new job, not the old failure
        again = gen(c, "doomed nan@3 step=0", 5)
        assert again["track_id"] == r["track_id"] and again["status"] in ("queued", "running")
        assert c.call("track", {"track_id": r["track_id"]})["status"] in ("queued", "running", "failed")
        assert expect_error(c, r["track_id"]).code == "MODEL_INFERENCE_FAILED"
        assert c.call("track", {"track_id": r["track_id"]})["status"] == "failed"

        # the last 100 failures are kept
        failed = []
        for batch in range(11):
            jobs = [gen(c, f"failing {batch}.{k} nan@0 step=0", k) for k in range(10)]
            for j in jobs:
                expect_error(c, j["track_id"])
            failed += [j["track_id"] for j in jobs]
        assert [c.call("track", {"track_id": t})["status"] for t in failed[-100:]] == ["failed"] * 100
        for gone in (r["track_id"], *failed[:-100]):
            with pytest.raises(LofiError) as e:
                c.call("track", {"track_id": gone})
            assert e.value.code == "TRACK_NOT_FOUND"


# ----------------------------------------------------- 7. a failed download leaves no "downloading"


def test_a_generate_whose_download_failed_resets_the_model_state(make_daemon, short_tmp):
    from fakehub import FakeHub, write_random_model

    with FakeHub(write_random_model(short_tmp / "served", onnx_size=200_000)) as hub:
        hub.drop_after("small_i8/decoder_model_merged.onnx", 50_000, times=None)  # every retry too
        d = make_daemon(model_dir=None, env=hub.env(short_tmp / "hf"), allow_download=True, idle_exit_sec=2)
        with d.client() as c:
            r = gen(c, "needs the model step=0")
            assert expect_error(c, r["track_id"]).code == "MODEL_DOWNLOAD_FAILED"
            s = c.call("status")
            assert s["model"]["state"] == "missing" and s["downloading"] is False, s
        assert d.proc.wait(20) == 0  # idle_exit_sec fires: nothing is downloading any more
    assert "idle for" in d.logs()


# ------------------------------------------------------------------------ 8. connection limits


def test_300_idle_connections_of_one_process_do_not_lock_out_a_new_client(daemon):
    hog = Hog(daemon.socket, 300)
    try:
        with daemon.client(timeout=10) as c:
            assert c.call("status")["pid"] == daemon.proc.pid
            assert done(c, "served step=0")["status"] == "complete"
        assert hog.open_count() == 64  # one process holds at most 64; each newer one closed its oldest
    finally:
        hog.close()
    assert "holds 64 connections; closing its least recently used one" in daemon.logs()


def test_idle_connections_of_many_processes_make_room_busy_ones_do_not(make_daemon):
    """Five processes x 60 connections, each with one request: at most 256 stay; once they have
    been idle for idle_close_sec a newcomer is served, and a connection waiting for its track
    is never closed as idle (test_fuzz's cap test: while they are fresh it is refused)."""
    d = make_daemon(env={"LOFID_IDLE_CLOSE_SEC": "2"})
    with d.client(timeout=60) as waiting:
        slow = gen(waiting, "a long wait step=0.02", 3)  # ~5 s; its client sends nothing meanwhile
        hogs = [Hog(d.socket, 60, request=True) for _ in range(5)]
        try:
            assert sum(h.open_count() for h in hogs) + 1 <= 256
            time.sleep(2.5)  # every hog connection is idle now; the waiting client is not
            with d.client(timeout=10) as c:
                assert c.call("status")["pid"] == d.proc.pid
            assert waiting.wait_track(slow["track_id"])["status"] == "complete"
            assert sum(h.open_count() for h in hogs) < 256
        finally:
            for h in hogs:
                h.close()
    assert "no request for" in d.logs()


def test_a_connection_streaming_an_ended_track_is_never_closed_as_idle(make_daemon):
    """A streaming client that has not read yet still has chunks to come after its track
    ended (its pump sends them at its pace): near the limit, idle for longer than
    idle_close_sec, it is not closed as idle; it gets every chunk, then generation_complete."""
    d = make_daemon(env={"LOFID_IDLE_CLOSE_SEC": "1"})
    chunks = []
    with d.client(timeout=60) as streaming, d.client(timeout=60) as other:
        r = gen(streaming, "streamed step=0", 4, duration=30, stream=True)  # 1.9 MB: more than the socket holds
        wait_for(lambda: other.call("track", {"track_id": r["track_id"]})["status"] == "complete", what="the track")
        hogs = [Hog(d.socket, 60, request=True) for _ in range(4)]  # with these two: past 224 (NEAR_LIMIT)
        try:
            time.sleep(1.5)  # everyone idle past idle_close_sec; the streaming client asked first of all
            with d.client(timeout=10) as newcomer:
                assert newcomer.call("status")["pid"] == d.proc.pid
            assert sum(h.open_count() for h in hogs) < 240  # idle ones were closed to make room
            record = streaming.wait_track(r["track_id"], on_event=lambda m, p: m == "audio_chunk" and chunks.append(p))
        finally:
            for h in hogs:
                h.close()
    assert record["status"] == "complete" and chunks[-1]["last"]
    assert sum(len(ch["pcm"]) for ch in chunks) == 30 * 32000 * 2
    assert "no request for" in d.logs()


def test_a_process_whose_connections_all_wait_is_refused_another_not_served_by_closing_one(daemon):
    """64 connections of one process all waiting for a track: its 65th is refused rather
    than one of them closed, and all 64 get their track."""
    from rawclient import Raw

    waiting = [Raw(daemon.socket, timeout=60) for _ in range(64)]
    try:
        for raw in waiting:
            raw.send_obj([0, 1, "generate", [{"prompt": "shared wait step=0.01", "duration_sec": 5, "seed": 1}]])
            assert raw.response(1)[2] is None
        extra = Raw(daemon.socket)
        extra.send_obj([0, 1, "status", []])
        assert extra.closed(timeout=5)
        for raw in waiting:
            while (msg := raw.recv_obj(timeout=60))[0:2] != [2, "generation_complete"]:
                assert msg is not None and msg[1] != "generation_error", msg
    finally:
        for raw in waiting:
            raw.close()
    assert "each waiting for something; refusing its next" in daemon.logs()


# ------------------------------------------------------------------- 9. out of memory at load


def test_out_of_memory_while_loading_is_model_load_failed_with_what_fits(make_daemon):
    """A real allocation failure at load (a 4 GiB numpy array under a 1200 MiB address-space
    limit) is MODEL_LOAD_FAILED naming the variant's need and the smaller variant that fits."""
    d = make_daemon(variant="int8", worker_memory_mb=1200, env={"LOFID_TEST_LOAD_ALLOC": "4096"})
    with d.client() as c:
        r = gen(c, "too big step=0")
        err = expect_error(c, r["track_id"])
        assert err.code == "MODEL_LOAD_FAILED", err
        assert "out of memory while loading the int8 model: it needs about 1.3 GB" in err.message
        assert "1.2 GB is available (worker_memory_mb)" in err.message
        assert 'the int4 variant needs about 1.1 GB and would fit: set variant = "int4"' in err.message
        assert c.call("track", {"track_id": r["track_id"]})["error"]["code"] == "MODEL_LOAD_FAILED"
        assert c.call("status")["model"]["state"] == "present"  # not "loading" any more


def test_a_worker_killed_while_loading_is_model_load_failed(make_daemon):
    """SIGKILL (what the kernel's OOM killer sends) while the model loads."""
    d = make_daemon(variant="fp32", env={"LOFID_TEST_LOAD_SLEEP": "3"})
    with d.client() as c:
        r = gen(c, "killed at load step=0")
        worker = wait_for(lambda: (s := c.call("status"))["model"]["state"] == "loading" and s["worker"]["pid"],
                          what="the model load")
        os.kill(worker, signal.SIGKILL)
        err = expect_error(c, r["track_id"])
        assert err.code == "MODEL_LOAD_FAILED", err
        assert "signal 9 (SIGKILL)" in err.message and "while loading the fp32 model" in err.message
        assert "it needs about 3.3 GB" in err.message and "variant" in err.message.split("needs about 3.3 GB")[1]
        assert done(c, "after it step=0", 2)["status"] == "complete"  # a new worker loads it


# ---------------------------------------------------------------------------- 10. smaller


def test_the_unknown_keys_error_does_not_echo_the_request(daemon):
    from rawclient import Raw

    raw = Raw(daemon.socket)
    keys = {f"key{i:06d}" + "x" * 200: i for i in range(4000)}  # ~0.85 MB, under the 1 MiB frame limit
    raw.send_obj([0, 1, "generate", [{"prompt": "lofi", **keys}]])
    reply = raw.response(1)
    err = reply[2]
    assert err["code"] == "INVALID_PARAMS" and err["message"].startswith("unknown key(s): key000000xxx")
    assert err["message"].endswith("and 3995 more") and len(err["message"]) < 400, len(err["message"])
    with daemon.client() as c:
        with pytest.raises(LofiError) as e:
            c.call("status", {"durations": 1, 5: 2})
        assert e.value.message == "unknown key(s): 5, durations"
