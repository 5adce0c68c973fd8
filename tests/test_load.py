"""Load (issue 8): many clients at once, many short connections, a client that never reads,
and how fast `status` answers while the worker generates. Wall-clock figures are printed
(and written as JSON to $LOFID_RELIABILITY_FIGURES when set) for docs/reliability.md;
they are never asserted beyond generous sanity bounds: the machines running CI are noisy."""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
import wave

import msgpack

CLIENTS, REQUESTS = 50, 20
CYCLES = 1000
QUEUE_CAP = 10  # pending jobs; the running one is not counted


def gen(c, prompt, duration=5, seed=1, **kw):
    return c.call("generate", {"prompt": prompt, "duration_sec": duration, "seed": seed, **kw})


def record_figures(name: str, figures: dict) -> None:
    print(f"\n{name}: {json.dumps(figures)}")
    path = os.environ.get("LOFID_RELIABILITY_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


def percentiles(samples_ms: list[float]) -> dict:
    s = sorted(samples_ms)
    return {"n": len(s), "p50_ms": round(statistics.median(s), 2), "p99_ms": round(s[int(0.99 * (len(s) - 1))], 2),
            "max_ms": round(s[-1], 2)}


def time_status(c, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.call("status")
        out.append((time.perf_counter() - t0) * 1000)
    return out


def broker_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_links(pid: int) -> dict:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


def broker_rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class StrictConn:
    """A raw connection that checks every message the daemon sends is well formed."""

    def __init__(self, path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.responses: dict[int, list] = {}
        self.notifications: list[list] = []

    def pump(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("closed by the daemon")
        self.unpacker.feed(data)
        for msg in self.unpacker:
            assert isinstance(msg, list), msg
            if msg[0] == 1:
                assert len(msg) == 4 and isinstance(msg[1], int) and msg[1] not in self.responses, msg
                err, result = msg[2], msg[3]
                if err is None:
                    assert isinstance(result, dict) and {"track_id", "seed", "status", "position", "cached"} <= set(
                        result), msg
                else:
                    assert isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(
                        err.get("message"), str) and err["message"] and result is None, msg
                self.responses[msg[1]] = msg
            else:
                assert msg[0] == 2 and len(msg) == 3 and isinstance(msg[1], str) and isinstance(msg[2], list), msg
                assert len(msg[2]) == 1 and isinstance(msg[2][0], dict), msg
                self.notifications.append(msg)


def test_50_clients_x_20_generates_at_once(make_daemon):
    daemon = make_daemon()
    with daemon.client() as c:
        blocker = gen(c, "blocker step=0.004", duration=24, seed=0)  # ~5 s of work holds the worker
        c.notification(30, match=lambda m, p: m == "generation_progress" and p["percent"] >= 5)
        conns = [StrictConn(daemon.socket) for _ in range(CLIENTS)]
        barrier = threading.Barrier(CLIENTS)
        failures: list[BaseException] = []

        def burst(i: int) -> None:
            try:
                conn = conns[i]
                frames = b"".join(msgpack.packb([0, j, "generate", [{"prompt": f"load {i}/{j} step=0",
                                                                       "duration_sec": 5, "seed": j}]])
                                  for j in range(REQUESTS))
                barrier.wait()
                conn.sock.sendall(frames)  # all twenty requests in one write
                while len(conn.responses) < REQUESTS:
                    conn.pump()
            except BaseException as e:  # noqa: BLE001 - reported below
                failures.append(e)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=burst, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        burst_sec = time.perf_counter() - t0
        assert not failures, failures[:3]
        status = c.call("status")
        assert status["running"]["track_id"] == blocker["track_id"], "the blocker ended before the burst did"

        accepted, codes = [], {}
        for i, conn in enumerate(conns):
            assert sorted(conn.responses) == list(range(REQUESTS))
            for _, _, err, result in conn.responses.values():
                if err is None:
                    assert result["status"] == "queued" and result["cached"] is False
                    accepted.append((i, result))
                else:
                    codes[err["code"]] = codes.get(err["code"], 0) + 1
        # the cap, exactly: ten pending behind the running blocker, everything else refused
        assert len(accepted) == QUEUE_CAP
        assert sorted(r["position"] for _, r in accepted) == list(range(1, QUEUE_CAP + 1))
        assert codes == {"QUEUE_FULL": CLIENTS * REQUESTS - QUEUE_CAP}
        assert len(status["queue"]) == QUEUE_CAP

        c.wait_track(blocker["track_id"], timeout=120)
        for i, result in accepted:  # every accepted job completes, and its client is told
            conn = conns[i]
            tid = result["track_id"]
            while not any(n[1] == "generation_complete" and n[2][0]["track_id"] == tid for n in conn.notifications):
                conn.pump()
            record = next(n[2][0] for n in conn.notifications if n[1] == "generation_complete"
                          and n[2][0]["track_id"] == tid)
            with wave.open(record["path"]) as w:
                assert w.getnframes() == 5 * 32000
        for conn in conns:
            assert not any(n[1] == "generation_error" for n in conn.notifications)
            conn.sock.close()
        assert daemon.proc.poll() is None
    record_figures("burst", {"clients": CLIENTS, "requests": CLIENTS * REQUESTS, "accepted": len(accepted),
                             "queue_full": codes["QUEUE_FULL"], "burst_sec": round(burst_sec, 2)})


def _cycle(path, k: int, cached: dict) -> None:
    """One short connection, of one of six kinds (the ways clients come and go)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    kind = k % 6
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    def reply():
        while True:
            for msg in unpacker:
                if msg[0] == 1:
                    return msg
            data = s.recv(65536)
            assert data, "closed before replying"
            unpacker.feed(data)

    try:
        if kind == 0:
            s.sendall(msgpack.packb([0, 1, "status", []]))
            assert reply()[2] is None
        elif kind == 1:  # a cache hit
            s.sendall(msgpack.packb([0, 1, "generate", [cached]]))
            assert reply()[3]["cached"] is True
        elif kind == 2:  # a subscriber that leaves
            s.sendall(msgpack.packb([0, 1, "subscribe", []]))
            assert reply()[2] is None
        elif kind == 3:  # half a frame, then gone
            s.sendall(msgpack.packb([0, 1, "status", []])[:3])
        elif kind == 4:  # garbage: answered, then closed by the daemon
            s.sendall(b"\xc1garbage")
            assert reply()[2]["code"] == "INVALID_PARAMS"
        else:  # a request, gone before the answer
            s.sendall(msgpack.packb([0, 1, "tracks", []]))
    finally:
        s.close()


def test_1000_short_connections_leak_no_fds_or_memory(daemon):
    pid = daemon.proc.pid
    with daemon.client() as c:
        cached = {"prompt": "cached step=0", "duration_sec": 5, "seed": 1}
        c.wait_track(c.call("generate", cached)["track_id"])
        # warm up: thread pool, allocator arenas, caches (300 cycles left up to 1.1 MB of
        # growth still to come on some starts; by 1000 it is ~0.1 KB per cycle)
        for k in range(1000):
            _cycle(daemon.socket, k, cached)
        time.sleep(0.3)
        c.call("status")
        fds0, rss0 = broker_fds(pid), broker_rss_kb(pid)
        links0 = fd_links(pid)
        t0 = time.perf_counter()
        for k in range(CYCLES):
            _cycle(daemon.socket, k, cached)
        cycles_sec = time.perf_counter() - t0
        deadline = time.monotonic() + 5
        while broker_fds(pid) > fds0 and time.monotonic() < deadline:  # the last closes may still be in flight
            time.sleep(0.05)
        c.call("status")
        fds1, rss1 = broker_fds(pid), broker_rss_kb(pid)
        # a leaked connection costs several KB (reader, writer, transport, buffers): 1000 of
        # them would show as megabytes in every window of 1000. The allocator's warm-up can
        # still add ~1 MiB once (one CI run saw +1.3 MiB): a window over 1 MiB gets up to
        # two more, and one of the three must stay under it.
        growth = [rss1 - rss0]
        while growth[-1] >= 1024 and len(growth) < 3:
            before = broker_rss_kb(pid)
            for k in range(CYCLES):
                _cycle(daemon.socket, k, cached)
            c.call("status")
            growth.append(broker_rss_kb(pid) - before)
        assert c.call("status")["pid"] == pid
    record_figures("cycles", {"cycles": CYCLES, "fds_before": fds0, "fds_after": fds1, "rss_kb_before": rss0,
                              "rss_kb_after": rss1, "rss_kb_growth_per_window": growth,
                              "cycles_sec": round(cycles_sec, 2)})
    # a leak in any one of the six kinds would show as 166+ fds; 2 spare for something in flight
    assert fds1 <= fds0 + 2, {fd: link for fd, link in fd_links(pid).items() if links0.get(fd) != link}
    assert min(growth) < 1024, (rss0, rss1, growth)


def test_status_latency_while_generating(daemon):
    with daemon.client() as c, daemon.client() as busy:
        idle = time_status(c, 300)
        r = gen(busy, "long step=0.004", duration=15, seed=1)  # ~3 s
        busy.notification(30, match=lambda m, p: m == "generation_progress" and p["percent"] >= 5)
        during = time_status(c, 1000)
        status = c.call("status")
        assert status["running"]["track_id"] == r["track_id"], "the generation ended before the measurement"
        busy.wait_track(r["track_id"], timeout=120)
    figures = {"idle": percentiles(idle), "generating": percentiles(during)}
    record_figures("status_latency", figures)
    assert figures["generating"]["p50_ms"] < 250  # sanity only: a few ms is normal


def _unread_subscriber(path, rcvbuf=4096) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect(str(path))
    s.sendall(msgpack.packb([0, 1, "subscribe", []]))
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        unpacker.feed(s.recv(4096))
        for msg in unpacker:
            assert msg[:3] == [1, 1, None]
            return s


def _drain_until_closed(s: socket.socket) -> int:
    """Read what the kernel still holds for ``s``; returns the bytes read before EOF."""
    total = 0
    s.settimeout(10)
    try:
        while True:
            data = s.recv(1 << 20)
            if not data:
                return total
            total += len(data)
    except ConnectionResetError:
        return total


def test_a_subscriber_that_never_reads_is_dropped_and_slows_no_one(make_daemon):
    """Notifications pile up for a subscriber that never reads; at 4 MiB it is dropped. A
    reading subscriber receives every notification and `status` stays fast meanwhile."""
    shm = tempfile.mkdtemp(prefix="lofid-", dir="/dev/shm") if os.path.isdir("/dev/shm") else None
    try:
        _unread_subscriber_run(make_daemon, shm)
    finally:
        if shm:
            shutil.rmtree(shm, ignore_errors=True)


def _unread_subscriber_run(make_daemon, cache_dir):
    daemon = make_daemon(**({"cache_dir": cache_dir} if cache_dir else {}))  # tmpfs: no fsync cost per job
    prompt = "🎛" * 1980  # ~8 KB of UTF-8 in every generation_complete
    hostile = _unread_subscriber(daemon.socket)
    dropped = threading.Event()
    seen = {"complete": 0}
    with daemon.client() as good, daemon.client() as driver, daemon.client() as prober:
        good.call("subscribe")

        def read_everything():
            while not (dropped.is_set() and seen["complete"] >= seen.get("target", 1 << 30)):
                try:
                    m, _ = good.notification(0.5)
                except TimeoutError:
                    continue
                if m == "generation_complete":
                    seen["complete"] += 1

        reader = threading.Thread(target=read_everything, daemon=True)
        reader.start()
        latencies, jobs, pending = [], 0, set()
        t0 = time.perf_counter()
        while not dropped.is_set():
            assert jobs < 2000, "the non-reading subscriber was never dropped"
            while len(pending) < QUEUE_CAP and not dropped.is_set():
                r = gen(driver, f"{prompt} {jobs} step=0", seed=jobs)
                pending.add(r["track_id"])
                jobs += 1
            m, p = driver.notification(60, match=lambda m, p: m in ("generation_complete", "generation_error"))
            assert m == "generation_complete", p
            pending.discard(p["track_id"])
            latencies += time_status(prober, 2)
            if "does not read its messages; dropping it" in daemon.logs():
                dropped.set()
        for tid in list(pending):
            driver.wait_track(tid, timeout=60)
        flood_sec = time.perf_counter() - t0
        seen["target"] = jobs
        reader.join(60)
        assert seen["complete"] == jobs  # the reading subscriber missed nothing
        buffered = _drain_until_closed(hostile)  # what the kernel held for it, then EOF: it was dropped
        assert buffered < 2 * 1024 * 1024
        assert prober.call("status")["pid"] == daemon.proc.pid
    hostile.close()
    record_figures("unread_subscriber", {"jobs": jobs, "kernel_buffered_bytes": buffered,
                                         "flood_sec": round(flood_sec, 2), "status": percentiles(latencies)})


def test_a_client_that_pipelines_requests_and_never_reads_is_dropped(daemon):
    """The same bound holds for responses: `tracks` over and over, never read."""
    with daemon.client() as c:
        for seed in range(3):
            c.wait_track(gen(c, "🎚" * 1900 + " step=0", seed=seed)["track_id"])
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(str(daemon.socket))
        s.settimeout(0.5)
        request = msgpack.packb([0, 1, "tracks", []])  # ~25 KB answer for 16 bytes asked
        sent = 0
        try:
            for _ in range(2000):
                s.sendall(request * 10)
                sent += 10
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass
        deadline = time.monotonic() + 10
        while "does not read its messages" not in daemon.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "does not read its messages; dropping it" in daemon.logs()
        buffered = _drain_until_closed(s)
        s.close()
        assert buffered < 2 * 1024 * 1024
        assert c.call("status")["pid"] == daemon.proc.pid
    record_figures("unread_responses", {"requests_sent": sent, "kernel_buffered_bytes": buffered})
