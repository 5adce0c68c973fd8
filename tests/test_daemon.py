"""The daemon, end to end over its socket: the contract's methods, queue, progress,
supervision and track cache (issue 3). The scripted engine (tests/engines.py) stands in
for inference so that timing, crashes and failures can be asked for by the prompt."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from rawclient import Raw

from lofid.errors import LofiError


def gen(c, prompt="lofi", duration=5, seed=1, **kw):
    return c.call("generate", {"prompt": prompt, "duration_sec": duration, "seed": seed, **kw})


def failure(c, track_id, timeout=60) -> LofiError:
    """The error a track ends with (fails the test if it completes)."""
    with pytest.raises(LofiError) as e:
        c.wait_track(track_id, timeout=timeout)
    return e.value


def events_of(c, track_id, timeout=60):
    """Every notification of one track up to its complete/error notification."""
    out = []
    while True:
        method, payload = c.notification(timeout, match=lambda m, p: p.get("track_id") == track_id)
        out.append((method, payload))
        if method in ("generation_complete", "generation_error"):
            return out


def test_generate_answers_at_once_while_the_worker_is_busy(daemon):
    with daemon.client() as busy, daemon.client() as c:
        long = gen(busy, "busy step=0.01", seed=1)  # ~2.5 s of work
        busy.notification(20, match=lambda m, p: m == "generation_progress" and p["percent"] >= 5)
        t0 = time.monotonic()
        r = gen(c, "second", seed=2)
        latency = time.monotonic() - t0
        # answered while the first job still runs: the broker never waits on the worker
        assert c.call("status")["running"]["track_id"] == long["track_id"]
        assert r["status"] == "queued" and r["position"] == 1 and r["cached"] is False
        print(f"generate answered in {latency * 1000:.1f} ms while the worker was busy")
        busy.wait_track(long["track_id"])
        c.wait_track(r["track_id"])


def test_progress_every_5_percent_then_complete(daemon):
    with daemon.client() as c:
        r = gen(c, "progress step=0.004", seed=5)
        evs = events_of(c, r["track_id"])
    progress = [p for m, p in evs if m == "generation_progress"]
    assert [p["percent"] for p in progress] == list(range(0, 100, 5))
    assert all(p["tokens_estimated"] == 253 for p in progress[1:])  # 5 s * 50 frames + 3 delay steps
    gen_counts = [p["tokens_generated"] for p in progress]
    assert gen_counts == sorted(gen_counts)
    assert all(p["eta_sec"] is None or p["eta_sec"] >= 0 for p in progress)
    assert progress[-1]["eta_sec"] is not None
    method, record = evs[-1]
    assert method == "generation_complete"
    for key in ("track_id", "status", "path", "prompt", "seed", "duration_sec", "sample_rate", "model_version",
                "variant", "device", "generation_time_sec", "created_at"):
        assert key in record, key
    assert record["status"] == "complete" and record["sample_rate"] == 32000 and record["seed"] == 5
    import wave

    with wave.open(record["path"]) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 32000, 5 * 32000)


def test_same_request_is_served_from_the_cache(daemon):
    with daemon.client() as c:
        r1 = gen(c, "cache me", seed=7)
        c.wait_track(r1["track_id"])
        r2 = gen(c, "cache me", seed=7)
        assert r2 == {"track_id": r1["track_id"], "seed": 7, "status": "complete", "position": 0, "cached": True,
                      "path": str(daemon.cache_dir / f"{r1['track_id']}.wav")}
        r3 = gen(c, "cache me", seed=8)
        assert r3["track_id"] != r1["track_id"] and r3["cached"] is False
        assert gen(c, "cache me", seed=7, duration=6)["track_id"] != r1["track_id"]


def test_random_seed_is_returned(daemon):
    with daemon.client() as c:
        r = c.call("generate", {"prompt": "no seed step=0"})
        assert isinstance(r["seed"], int) and 0 <= r["seed"] < 2**32
        c.wait_track(r["track_id"], timeout=60)


def test_queue_full_priority_and_every_accepted_job_finishes(daemon):
    with daemon.client() as c:
        running = gen(c, "runner step=0.01", seed=100)
        c.notification(20, match=lambda m, p: m == "generation_progress" and p["percent"] >= 5)
        normal = [gen(c, f"normal {i} step=0", seed=i) for i in range(9)]
        assert [r["position"] for r in normal] == list(range(1, 10))
        high = gen(c, "urgent step=0", seed=50, priority="high")
        assert high["position"] == 1  # ahead of all nine normal ones
        with pytest.raises(LofiError) as e:
            gen(c, "one too many", seed=99)
        assert e.value.code == "QUEUE_FULL"
        q = c.call("status")["queue"]
        assert len(q) == 10 and q[0]["track_id"] == high["track_id"] and q[0]["priority"] == "high"
        order = []
        ids = {r["track_id"] for r in [running, high, *normal]}
        while ids - set(order):
            m, p = c.notification(60, match=lambda m, p: m in ("generation_complete", "generation_error"))
            assert m == "generation_complete", p
            order.append(p["track_id"])
    assert order[0] == running["track_id"]
    assert order[1] == high["track_id"]
    assert order[2:] == [r["track_id"] for r in normal]  # FIFO within a class


def test_duplicate_request_joins_the_queued_job(daemon):
    with daemon.client() as a, daemon.client() as b:
        first = gen(a, "shared step=0.005", seed=3)
        second = gen(b, "shared step=0.005", seed=3)
        assert second["track_id"] == first["track_id"]
        assert len(a.call("status")["queue"]) + (1 if a.call("status").get("running") else 0) == 1
        ra = a.wait_track(first["track_id"])
        rb = b.wait_track(first["track_id"])  # the joiner is told too
        assert ra == rb


def test_invalid_requests_are_answered_at_once_and_never_queued(daemon):
    bad = [
        ({"prompt": "x", "duration_sec": 4.9}, "INVALID_DURATION"),
        ({"prompt": "x", "duration_sec": 121}, "INVALID_DURATION"),
        ({"prompt": "x", "duration_sec": float("nan")}, "INVALID_DURATION"),
        ({"prompt": "x", "duration_sec": float("inf")}, "INVALID_DURATION"),
        ({"prompt": "x", "duration_sec": "30"}, "INVALID_PARAMS"),
        ({"prompt": "x", "duration_sec": True}, "INVALID_PARAMS"),
        ({"prompt": ""}, "INVALID_PARAMS"),
        ({"prompt": "   "}, "INVALID_PARAMS"),
        ({"prompt": "x" * 2001}, "INVALID_PARAMS"),
        ({"prompt": 5}, "INVALID_PARAMS"),
        ({}, "INVALID_PARAMS"),
        ({"prompt": "x", "seed": -1}, "INVALID_PARAMS"),
        ({"prompt": "x", "seed": 2**32}, "INVALID_PARAMS"),
        ({"prompt": "x", "seed": 1.5}, "INVALID_PARAMS"),
        ({"prompt": "x", "priority": "urgent"}, "INVALID_PARAMS"),
        ({"prompt": "x", "duration": 30}, "INVALID_PARAMS"),
        ({"prompt": "x", "allow_download": "yes"}, "INVALID_PARAMS"),
    ]
    with daemon.client() as c:
        for arg, code in bad:
            with pytest.raises(LofiError) as e:
                c.call("generate", arg)
            assert e.value.code == code, (arg, e.value)
            assert e.value.message
        status = c.call("status")
        assert status["queue"] == [] and "running" not in status
        # 2000 characters and unicode are fine
        r = c.call("generate", {"prompt": "🎹 لوفاي\x00" + "x" * 1990, "duration_sec": 5, "seed": 1})
        c.wait_track(r["track_id"])


def test_status_track_tracks(daemon):
    with daemon.client() as c:
        s = c.call("status")
        assert s["protocol"] == 1 and s["pid"] == daemon.proc.pid and s["version"]
        assert set(s["model"]) >= {"state", "variant", "model_version", "device", "provider"}
        assert s["worker"] == {"pid": None, "restarts": 0}  # started lazily, on the first job
        ids = []
        for seed in (1, 2, 3):
            r = gen(c, "list step=0", seed=seed)
            c.wait_track(r["track_id"])
            ids.append(r["track_id"])
        assert [t["track_id"] for t in c.call("tracks")] == ids[::-1]
        assert [t["track_id"] for t in c.call("tracks", {"limit": 2})] == ids[:0:-1]
        assert c.call("track", {"track_id": ids[0]})["status"] == "complete"
        assert c.call("status")["worker"]["pid"] is not None
        for bad, code in [("0" * 16, "TRACK_NOT_FOUND"), ("../../etc/passwd", "INVALID_PARAMS"),
                          ("/etc/passwd", "INVALID_PARAMS"), (ids[0].upper(), "INVALID_PARAMS"), (5, "INVALID_PARAMS")]:
            with pytest.raises(LofiError) as e:
                c.call("track", {"track_id": bad})
            assert e.value.code == code
        with pytest.raises(LofiError) as e:
            c.call("tracks", {"limit": -1})
        assert e.value.code == "INVALID_PARAMS"


def test_unknown_method_gets_its_own_msgid(daemon):
    raw = Raw(daemon.socket)
    raw.send_obj([0, 77, "cancel", [{}]])
    assert raw.response(77) == [1, 77, {"code": "UNKNOWN_METHOD", "message": "unknown method 'cancel'"}, None]
    raw.send_obj([0, 78, "status", [{}, {}]])
    assert raw.response(78)[2]["code"] == "INVALID_PARAMS"
    raw.send_obj([0, 79, "status", []])
    assert raw.response(79)[2] is None


def test_hostile_frames_cost_only_their_own_connection(make_daemon):
    daemon = make_daemon(env={"LOFID_FRAME_TIMEOUT_SEC": "0.5", "LOFID_MAX_FRAME_BYTES": "65536"})
    with daemon.client() as good:
        r = gen(good, "keeps going step=0.005", seed=1)
        # not msgpack at all
        raw = Raw(daemon.socket)
        raw.send(b"\xc1\xc1 GET / HTTP/1.1\r\n\r\n")
        reply = raw.recv_obj()
        assert reply[0] == 1 and reply[1] is None and reply[2]["code"] == "INVALID_PARAMS"
        assert raw.closed()
        # msgpack, but not rpc: answered, connection kept
        raw = Raw(daemon.socket)
        for value in ({"a": 1}, [9, 1, 2], [0, "id", "status", []], [0, 1, 2, 3], [0, 2, "status", {}], "str", None):
            raw.send_obj(value)
            reply = raw.recv_obj()
            assert reply[0] == 1 and reply[2]["code"] == "INVALID_PARAMS", (value, reply)
        raw.send_obj([0, 5, "status", []])
        assert raw.response(5)[2] is None
        # wrong shapes inside a valid request
        raw.send_obj([0, 6, "generate", ["prompt"]])
        assert raw.response(6)[2]["code"] == "INVALID_PARAMS"
        raw.send_obj([0, 7, "generate", [{"prompt": {"nested": [1, 2]}, "duration_sec": [5]}]])
        assert raw.response(7)[2]["code"] == "INVALID_PARAMS"
        # an oversized frame
        big = Raw(daemon.socket)
        big.send_obj([0, 1, "generate", [{"prompt": "x" * 200_000}]])
        assert big.closed()
        # deep nesting
        deep = Raw(daemon.socket)
        deep.send(b"\x91" * 5000 + b"\xc0")
        assert deep.closed()
        # half a frame, then silence
        stall = Raw(daemon.socket)
        stall.send(b"\x94\x00\x01\xa6sta")
        assert stall.closed(timeout=5)
        # the honest client and the daemon never noticed
        assert good.call("status")["pid"] == daemon.proc.pid
        assert good.wait_track(r["track_id"])["status"] == "complete"
    assert daemon.proc.poll() is None


def test_subscribe_receives_every_notification(daemon):
    with daemon.client() as watcher, daemon.client() as c:
        assert watcher.call("subscribe") == {"ok": True}
        r = gen(c, "observed step=0", seed=4)
        c.wait_track(r["track_id"])
        record = watcher.wait_track(r["track_id"])
        assert record["track_id"] == r["track_id"]


def test_worker_sigkill_mid_job_fails_that_job_and_keeps_the_queue(daemon):
    with daemon.client() as c:
        doomed = gen(c, "doomed step=0.01", seed=1)
        after = gen(c, "after step=0", seed=2)
        c.notification(20, match=lambda m, p: m == "generation_progress" and p["percent"] >= 10)
        pid = c.call("status")["worker"]["pid"]
        os.kill(pid, signal.SIGKILL)
        err = failure(c, doomed["track_id"])
        assert err.code == "MODEL_INFERENCE_FAILED"
        assert "signal 9" in err.message and "out of memory" in err.message
        assert c.wait_track(after["track_id"])["status"] == "complete"
        s = c.call("status")
        assert s["worker"]["restarts"] == 1 and s["worker"]["pid"] not in (None, pid)
        assert not (daemon.cache_dir / f"{doomed['track_id']}.wav").exists()
        assert [p.name for p in daemon.cache_dir.iterdir() if p.name.startswith(".")] == []
        # a crash that the engine itself causes, at token 30
        crash = gen(c, "self crash@30", seed=3)
        err = failure(c, crash["track_id"])
        assert err.code == "MODEL_INFERENCE_FAILED" and "signal 9" in err.message
        ok = gen(c, "fine again step=0", seed=4)
        assert c.wait_track(ok["track_id"])["status"] == "complete"
        assert c.call("status")["worker"]["restarts"] == 2


def test_memory_error_and_nan_become_model_inference_failed(daemon):
    with daemon.client() as c:
        r = gen(c, "oom@20", seed=1)
        err = failure(c, r["track_id"])
        assert err.code == "MODEL_INFERENCE_FAILED" and "out of memory" in err.message
        r = gen(c, "nan@20", seed=1)
        err = failure(c, r["track_id"])
        assert err.code == "MODEL_INFERENCE_FAILED" and "NaN" in err.message
        r = gen(c, "healthy step=0", seed=1)
        assert c.wait_track(r["track_id"])["status"] == "complete"
        assert c.call("status")["worker"]["restarts"] == 0  # no crash: the same worker went on


def test_hung_worker_is_killed_and_replaced(make_daemon):
    daemon = make_daemon(worker_stall_sec=1.5)
    with daemon.client() as c:
        r = gen(c, "hang@10", seed=1)
        nxt = gen(c, "next step=0", seed=2)
        err = failure(c, r["track_id"])
        assert err.code == "MODEL_INFERENCE_FAILED" and "stopped responding" in err.message
        assert c.wait_track(nxt["track_id"])["status"] == "complete"
        assert c.call("status")["worker"]["restarts"] == 1


def test_socket_permissions_lock_and_stale_socket(make_daemon, short_tmp):
    daemon = make_daemon()
    assert stat.S_IMODE(os.stat(daemon.socket.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    # a second lofid on the same socket exits with a clear message
    second = subprocess.run(daemon.argv(), env=daemon.env, capture_output=True, text=True, timeout=30)
    assert second.returncode != 0 and "already serving" in second.stderr
    # a dead daemon's socket is replaced
    daemon.kill()
    assert daemon.socket.exists()
    daemon.start()
    with daemon.client() as c:
        assert c.call("status")["pid"] == daemon.proc.pid


def test_broker_never_loads_numpy_or_onnxruntime(daemon):
    with daemon.client() as c:
        r = gen(c, "heavy lifting happens elsewhere step=0", seed=1)
        c.wait_track(r["track_id"])
        worker = c.call("status")["worker"]["pid"]
    broker_maps = open(f"/proc/{daemon.proc.pid}/maps").read()
    worker_maps = open(f"/proc/{worker}/maps").read()
    assert "_multiarray_umath" in worker_maps  # the check can see numpy where it is
    for lib in ("_multiarray_umath", "onnxruntime"):
        assert lib not in broker_maps, lib
    code = ("import sys, lofid.daemon, lofid.broker.broker; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('numpy', 'onnxruntime', 'scipy', 'tokenizers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_shutdown_finishes_and_exits_zero(daemon):
    with daemon.client() as c:
        r = gen(c, "quick step=0", seed=1)
        c.wait_track(r["track_id"])
        worker = c.call("status")["worker"]["pid"]
        assert c.call("shutdown") == {"ok": True}
    assert daemon.proc.wait(20) == 0
    assert not daemon.socket.exists()
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{worker}") or "zombie" in open(f"/proc/{worker}/status").read().lower()


@pytest.mark.parametrize(("prompt", "rung"), [
    ("mid-generation step=0.05", "terminated"),  # the polite stop waits behind the job: SIGTERM
    ("deaf to SIGTERM step=0.05 noterm@1", "killed"),  # then SIGKILL
])
def test_shutdown_ladder_while_generating(make_daemon, prompt, rung):
    daemon = make_daemon()
    with daemon.client() as c:
        r = gen(c, prompt, seed=1)
        c.notification(20, match=lambda m, p: m == "generation_progress" and p["percent"] >= 5)
        queued = gen(c, "never started", seed=2)
        worker = c.call("status")["worker"]["pid"]
        c.call("shutdown")
        # both clients of unfinished work are told before the connection closes
        running_err = failure(c, r["track_id"])
        assert running_err.code == "INTERNAL" and "not resumed" in running_err.message
        assert failure(c, queued["track_id"]).code == "INTERNAL"
    assert daemon.proc.wait(30) == 0
    assert f"worker stopped ({rung})" in daemon.logs()
    assert not os.path.exists(f"/proc/{worker}")
    assert not (daemon.cache_dir / f"{r['track_id']}.wav").exists()
    assert [p.name for p in daemon.cache_dir.iterdir() if p.name.startswith(".")] == []


def test_shutdown_between_jobs_only_asks(daemon):
    with daemon.client() as c:
        c.wait_track(gen(c, "done step=0", seed=1)["track_id"])
        c.call("shutdown")
    assert daemon.proc.wait(30) == 0
    assert "worker stopped (asked)" in daemon.logs()


def test_restart_cleans_temp_files_and_does_not_resume(make_daemon):
    daemon = make_daemon()
    with daemon.client() as c:
        done = gen(c, "finished step=0", seed=1)
        c.wait_track(done["track_id"])
        unfinished = gen(c, "unfinished step=0.02", seed=2)
        c.notification(20, match=lambda m, p: m == "generation_progress" and p["percent"] >= 10)
        worker = c.call("status")["worker"]["pid"]
    stray = daemon.cache_dir / ".0123456789abcdef.wav.999.tmp"
    stray.write_bytes(b"half")
    orphan_wav = daemon.cache_dir / "fedcba9876543210.wav"
    orphan_wav.write_bytes(b"no record")
    daemon.kill()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{worker}"), "the orphaned worker should exit with its broker"
    daemon.start()
    with daemon.client() as c:
        assert [t["track_id"] for t in c.call("tracks")] == [done["track_id"]]
        assert c.call("track", {"track_id": done["track_id"]})["status"] == "complete"
        with pytest.raises(LofiError) as e:
            c.call("track", {"track_id": unfinished["track_id"]})
        assert e.value.code == "TRACK_NOT_FOUND"
        assert c.call("status")["queue"] == []
    assert not stray.exists() and not orphan_wav.exists()
    record = json.loads((daemon.cache_dir / f"{done['track_id']}.json").read_text())
    assert record["track_id"] == done["track_id"]


def test_notifications_to_a_disconnected_client_are_harmless(daemon):
    c = daemon.client()
    r = gen(c, "abandoned step=0.002", seed=1)
    c.close()
    with daemon.client() as c2:
        assert gen(c2, "abandoned step=0.002", seed=1)["track_id"] == r["track_id"]
        c2.wait_track(r["track_id"])
