"""Faults (issue 8): the worker killed at random points, out of memory, unable to write;
the broker killed while a WAV is being written. Each test runs a real lofid with the
scripted engine (tests/engines.py) and checks what the contract promises: an error
notification for the running job, no half file under a final name, a restarted
worker, and every queued job still completed. Figures go to docs/reliability.md."""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import subprocess
import time
import wave

import pytest
from conftest import wait_for

from lofid.errors import LofiError

KILL_ROUNDS = 11  # two worker SIGKILLs per round: 22 in all
FAULT_SEED = int(os.environ.get("LOFID_FAULT_SEED", "20240508"))


def expect_error(c, track_id, code="MODEL_INFERENCE_FAILED", timeout=30):
    with pytest.raises(LofiError) as e:
        c.wait_track(track_id, timeout=timeout)
    assert e.value.code == code, e.value
    return e.value


def assert_valid_wav(record):
    with wave.open(record["path"]) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 32000)
        assert w.getnframes() == round(record["duration_sec"] * 32000)


def final_files(cache_dir, tid):
    return [p for p in (cache_dir / f"{tid}.wav", cache_dir / f"{tid}.json") if p.exists()]


def temp_files(cache_dir):
    return sorted(p.name for p in cache_dir.iterdir() if p.name.startswith("."))


def gen(c, prompt, duration=5, seed=1, **kw):
    return c.call("generate", {"prompt": prompt, "duration_sec": duration, "seed": seed, **kw})


def test_worker_sigkill_storm(make_daemon):
    """22 SIGKILLs of the worker: 11 while it loads the model, 6 mid-generation at a random
    percentage, 5 while the WAV is being written (temporary file present, final name not yet).
    Each round also queues 1-3 jobs behind the victims; all of them must complete."""
    rnd = random.Random(FAULT_SEED)
    daemon = make_daemon(env={"LOFID_TEST_LOAD_SLEEP": "0.4"})
    kills = {"loading": 0, "generating": 0, "writing": 0}
    completed = 0
    with daemon.client() as c:
        for i in range(KILL_ROUNDS):
            phase = "writing" if i % 2 else "generating"
            a = gen(c, f"victim {i} step=0.003" + (" wslow=2" if phase == "writing" else ""), seed=i)
            b = gen(c, f"loader {i} step=0.003", seed=i)
            queued = [gen(c, f"queued {i}.{k} step=0", seed=i) for k in range(rnd.randint(1, 3))]

            # victim A: killed mid-generation or while its WAV is written
            if phase == "generating":
                percent = rnd.randrange(5, 95, 5)
                c.notification(30, match=lambda m, p, tid=a["track_id"], pct=percent: p.get("track_id") == tid
                               and m == "generation_progress" and p["percent"] >= pct)
            else:
                pattern = str(daemon.cache_dir / f".{a['track_id']}.wav.*.tmp")
                wait_for(lambda pattern=pattern: glob.glob(pattern), 30,
                         "the temporary WAV")
                time.sleep(rnd.uniform(0, 0.5))  # well inside the 2 s fsync window
            status = c.call("status")
            assert status["running"]["track_id"] == a["track_id"]
            pid_a = status["worker"]["pid"]
            os.kill(pid_a, signal.SIGKILL)
            kills[phase] += 1
            err = expect_error(c, a["track_id"])
            assert "signal 9" in err.message
            assert final_files(daemon.cache_dir, a["track_id"]) == []  # no half file under a final name

            # victim B: the next job starts a fresh worker, which loads the model (0.4 s): killed then
            def loading(tid=b["track_id"], old=pid_a):
                s = c.call("status")
                return (s.get("running", {}).get("track_id") == tid and s["model"]["state"] == "loading"
                        and s["worker"]["pid"] not in (None, old) and s["worker"]["pid"])
            pid_b = wait_for(loading, 30, "the new worker to load")
            time.sleep(rnd.uniform(0, 0.2))
            os.kill(pid_b, signal.SIGKILL)
            kills["loading"] += 1
            err = expect_error(c, b["track_id"], code="MODEL_LOAD_FAILED")  # likely out of memory: what fits
            assert "signal 9" in err.message and "while loading the" in err.message
            assert final_files(daemon.cache_dir, b["track_id"]) == []

            # everything queued behind them completes, on a third worker
            for r in queued:
                record = c.wait_track(r["track_id"], timeout=30)
                assert record["status"] == "complete"
                assert_valid_wav(record)
                completed += 1
            assert temp_files(daemon.cache_dir) == []  # a killed writer's temporary file is removed too
            s = c.call("status")
            assert s["worker"]["restarts"] == 2 * (i + 1) and s["pid"] == daemon.proc.pid
        assert sum(kills.values()) >= 20
        listed = {t["track_id"] for t in c.call("tracks")}
    assert len(listed) == completed
    assert daemon.proc.poll() is None
    print(f"\nworker SIGKILLs: {kills} (seed {FAULT_SEED}); {completed} queued jobs completed")


def test_worker_out_of_memory_is_a_real_allocation_failure(make_daemon):
    """worker_memory_mb=512 sets RLIMIT_AS in the worker; a 2 GiB numpy allocation then fails."""
    daemon = make_daemon(worker_memory_mb=512)
    with daemon.client() as c:
        warm = gen(c, "warm step=0 alloc=64", seed=1)  # a modest real allocation is fine under the limit
        c.wait_track(warm["track_id"])
        worker = c.call("status")["worker"]["pid"]
        limits = open(f"/proc/{worker}/limits").read()
        assert any(line.startswith("Max address space") and "536870912" in line for line in limits.splitlines())
        broker_limits = open(f"/proc/{daemon.proc.pid}/limits").read()
        assert "536870912" not in broker_limits  # the broker keeps its own (unlimited) address space
        hungry = gen(c, "hungry step=0 alloc=2048", seed=2)
        waiting = gen(c, "waiting behind it step=0", seed=3)
        err = expect_error(c, hungry["track_id"])
        assert "out of memory" in err.message
        assert c.wait_track(waiting["track_id"])["status"] == "complete"
        s = c.call("status")
        assert s["pid"] == daemon.proc.pid and s["worker"] == {"pid": worker, "restarts": 0}
        assert final_files(daemon.cache_dir, hungry["track_id"]) == []
    assert daemon.proc.poll() is None


def test_file_size_limit_is_storage_failed(daemon):
    """RLIMIT_FSIZE in the worker (works unprivileged): the WAV write gets EFBIG."""
    with daemon.client() as c:
        r = gen(c, "too big to write step=0 fsize=4096", seed=1)
        nxt = gen(c, "fits step=0", seed=2)
        err = expect_error(c, r["track_id"], "STORAGE_FAILED")
        assert "File too large" in err.message
        assert final_files(daemon.cache_dir, r["track_id"]) == []
        assert temp_files(daemon.cache_dir) == []
        assert c.wait_track(nxt["track_id"])["status"] == "complete"
        assert c.call("status")["worker"]["restarts"] == 0


def _can_unshare_mounts() -> bool:
    if os.getuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mount_ns = pytest.mark.skipif(not _can_unshare_mounts(), reason="needs root and a private mount namespace")


def _start_in_mount_ns(daemon, setup: str):
    """Run the daemon in its own mount namespace after ``setup`` (shell) mounted its cache dir."""
    argv = daemon.argv()
    daemon.argv = lambda: ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                           setup + '\nexec "$0" "$@"', *argv]
    daemon.start()
    return __import__("pathlib").Path(f"/proc/{daemon.proc.pid}/root") / str(daemon.cache_dir).lstrip("/")


@needs_mount_ns
@pytest.mark.parametrize("kind", ["disk full", "read-only"])
def test_full_or_read_only_cache_is_storage_failed(make_daemon, short_tmp, kind):
    """As root, chmod cannot make a folder unwritable, so the cache dir is a 64 KiB tmpfs (a
    5 s WAV is 320 KB: ENOSPC) or a read-only bind mount (EROFS), in the daemon's own mount
    namespace; the test looks at it through /proc/<pid>/root."""
    cache = short_tmp / "tracks"
    cache.mkdir()
    daemon = make_daemon(start=False, cache_dir=cache)
    setup = (f"mount -t tmpfs -o size=64k,mode=0700 tmpfs '{cache}'" if kind == "disk full"
             else f"mount --bind '{cache}' '{cache}'; mount -o remount,ro,bind '{cache}'")
    seen = _start_in_mount_ns(daemon, setup)
    with daemon.client() as c:
        r = gen(c, f"{kind} step=0", seed=1)
        err = expect_error(c, r["track_id"], "STORAGE_FAILED")
        assert ("No space left" if kind == "disk full" else "Read-only") in err.message
        assert os.listdir(seen) == []  # neither a final file nor a temporary one
        assert c.call("track", {"track_id": r["track_id"]})["error"]["code"] == "STORAGE_FAILED"  # failed, not complete
        assert c.call("status")["pid"] == daemon.proc.pid
    assert os.listdir(cache) == []  # the namespace's mount never leaked into ours


def test_broker_sigkill_while_the_wav_is_written(make_daemon):
    """test_daemon covers a broker killed mid-generation; here it dies while the worker is in
    the middle of writing the WAV. The worker must exit, the next daemon must remove the
    temporary file and must not resume or record the track."""
    daemon = make_daemon()
    with daemon.client() as c:
        done = gen(c, "kept step=0", seed=1)
        c.wait_track(done["track_id"])
        doomed = gen(c, "half written step=0 wslow=3", seed=2)
        wait_for(lambda: glob.glob(str(daemon.cache_dir / f".{doomed['track_id']}.wav.*.tmp")), 20, "temp WAV")
        worker = c.call("status")["worker"]["pid"]
    daemon.kill()
    wait_for(lambda: not os.path.exists(f"/proc/{worker}"), 10, "the orphaned worker to exit")
    assert not (daemon.cache_dir / f"{doomed['track_id']}.json").exists()
    daemon.start()
    with daemon.client() as c:
        assert [t["track_id"] for t in c.call("tracks")] == [done["track_id"]]
        with pytest.raises(LofiError) as e:
            c.call("track", {"track_id": doomed["track_id"]})
        assert e.value.code == "TRACK_NOT_FOUND"
        assert c.call("status")["queue"] == [] and "running" not in c.call("status")
    assert temp_files(daemon.cache_dir) == []
    assert final_files(daemon.cache_dir, doomed["track_id"]) == []
    assert_valid_wav(json_record(daemon.cache_dir, done["track_id"]))


def json_record(cache_dir, tid):
    import json

    return json.loads((cache_dir / f"{tid}.json").read_text())
