"""Streamed audio (generate with stream: true): audio_chunk notifications on a real daemon."""

from __future__ import annotations

import hashlib
import threading
import wave
from pathlib import Path

import pytest
from conftest import FIXTURE_MODEL
from lofictl.client import Client

from lofid.errors import LofiError

REAL_ENGINE = {"LOFID_ENGINE": "lofid.worker.musicgen:MusicGen"}


def stream_track(c: Client, prompt: str, duration: float = 5, seed: int = 7, stream: bool = True,
                 on_chunk=None) -> tuple[dict, list[dict], list[str]]:
    """-> (record, chunks, the order of the track's notifications by method)."""
    r = c.call("generate", {"prompt": prompt, "duration_sec": duration, "seed": seed, "stream": stream})
    chunks, order = [], []

    def seen(method: str, payload: dict) -> None:
        order.append(method)
        if method == "audio_chunk":
            chunks.append(payload)
            if on_chunk is not None:
                on_chunk(payload)

    record = c.wait_track(r["track_id"], on_event=seen)
    return record, chunks, order


def wav_samples(path: str) -> bytes:
    with wave.open(path) as w:
        return w.readframes(w.getnframes())


def check_chunks(chunks: list[dict], record: dict) -> bytes:
    """The chunks are contiguous, in order, last flagged once; -> their joined PCM."""
    assert [ch["seq"] for ch in chunks] == list(range(len(chunks)))
    offset = 0
    for ch in chunks:
        assert ch["offset"] == offset and ch["sample_rate"] == 32000 and ch["track_id"] == record["track_id"]
        assert isinstance(ch["pcm"], bytes) and len(ch["pcm"]) % 2 == 0
        offset += len(ch["pcm"]) // 2
    assert [ch["last"] for ch in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[0]["start_after_sec"] >= 0 and all("start_after_sec" not in ch for ch in chunks[1:])
    return b"".join(ch["pcm"] for ch in chunks)


@pytest.mark.parametrize("duration", [5, 40])   # 40 s crosses a long-form window's re-prime
def test_real_engine_chunks_are_the_wav_and_come_before_complete(make_daemon, short_tmp, duration):
    streamed = make_daemon(env=REAL_ENGINE, model_dir=FIXTURE_MODEL, variant="int8", threads=1)
    with streamed.client() as c:
        record, chunks, order = stream_track(c, "rainy night jazz", duration=duration)
    assert len(chunks) > 2
    assert order[-1] == "generation_complete" and order.count("audio_chunk") == len(chunks)
    assert order.index("generation_complete") > max(i for i, m in enumerate(order) if m == "audio_chunk")
    pcm = check_chunks(chunks, record)
    assert pcm == wav_samples(record["path"]) and len(pcm) == duration * 32000 * 2
    streamed.stop()

    # the same request, not streamed, in a fresh daemon with its own cache: the same WAV
    plain = make_daemon(env=REAL_ENGINE, model_dir=FIXTURE_MODEL, variant="int8", threads=1,
                        cache_dir=short_tmp / "plain", socket=short_tmp / "run2" / "s.sock")
    with plain.client() as c:
        again, none, _ = stream_track(c, "rainy night jazz", duration=duration, stream=False)
    assert none == [] and again["track_id"] == record["track_id"] and again["path"] != record["path"]
    assert hashlib.sha256(Path(again["path"]).read_bytes()).digest() == \
        hashlib.sha256(Path(record["path"]).read_bytes()).digest()


def test_cache_hit_sends_no_chunks_and_plain_waiters_get_none(daemon):
    with daemon.client() as streamer, daemon.client() as plain:
        r = plain.call("generate", {"prompt": "step=0.004 cached", "duration_sec": 5, "seed": 1})
        record, chunks, _ = stream_track(streamer, "step=0.004 cached", seed=1)
        assert len(chunks) > 2 and check_chunks(chunks, record) == wav_samples(record["path"])
        assert plain.wait_track(r["track_id"])["path"] == record["path"]
        assert not [m for m, p in plain.notifications if m == "audio_chunk"]
        hit = streamer.call("generate", {"prompt": "step=0.004 cached", "duration_sec": 5, "seed": 1,
                                         "stream": True})
        assert hit["cached"] is True and hit["status"] == "complete" and hit["path"] == record["path"]
        with pytest.raises(TimeoutError):
            streamer.notification(timeout=0.5, match=lambda m, p: m == "audio_chunk")


def test_late_joiner_gets_every_chunk_from_0(daemon):
    prompt = "step=0.01 late joiner"          # 10 s: ~5 s of generation, chunks all along
    with daemon.client() as first, daemon.client() as late:
        r = first.call("generate", {"prompt": prompt, "duration_sec": 10, "seed": 3, "stream": True})
        early = [first.notification(match=lambda m, p: m == "audio_chunk") for _ in range(3)]
        assert [p["seq"] for _, p in early] == [0, 1, 2]
        joined = late.call("generate", {"prompt": prompt, "duration_sec": 10, "seed": 3, "stream": True})
        assert joined["track_id"] == r["track_id"] and joined["status"] == "running"
        late_record, late_chunks, late_order = None, [], []

        def seen(m, p):
            late_order.append(m)
            if m == "audio_chunk":
                late_chunks.append(p)
        late_record = late.wait_track(r["track_id"], on_event=seen)
        first_record, rest, _ = None, [], None
        first_record = first.wait_track(r["track_id"], on_event=lambda m, p: m == "audio_chunk" and rest.append(p))
    chunks = [p for _, p in early] + rest
    assert late_order[-1] == "generation_complete"
    assert check_chunks(late_chunks, late_record) == check_chunks(chunks, first_record) \
        == wav_samples(first_record["path"])


def test_a_streamer_that_leaves_or_stalls_disturbs_nobody(daemon):
    prompt = "step=0.01 leaving"
    with daemon.client() as stays, daemon.client() as stalls:
        leaves = daemon.client()
        r = leaves.call("generate", {"prompt": prompt, "duration_sec": 10, "seed": 5, "stream": True})
        leaves.notification(match=lambda m, p: m == "audio_chunk")
        leaves.close()                                        # gone mid-stream
        stalls.send("generate", {"prompt": prompt, "duration_sec": 10, "seed": 5, "stream": True})  # never reads
        record, chunks, _ = stream_track(stays, prompt, duration=10, seed=5)
        assert record["track_id"] == r["track_id"]
        assert check_chunks(chunks, record) == wav_samples(record["path"])
        # the daemon still serves everyone, the stalled client included once it reads
        assert stays.call("status")["worker"]["pid"]
        assert stalls.wait_track(r["track_id"])["path"] == record["path"]


def test_stream_must_be_a_bool(daemon):
    with daemon.client() as c:
        with pytest.raises(LofiError) as e:
            c.call("generate", {"prompt": "x", "stream": "yes"})
    assert e.value.code == "INVALID_PARAMS" and "stream" in e.value.message


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_broker_stays_small_streaming_120_s_to_three_clients(daemon):
    prompt = "step=0.0005 long stream"
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], _rss_kib(daemon.proc.pid))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        clients = [daemon.client(timeout=120) for _ in range(3)]
        results: list = [None] * 3

        def listen(i: int) -> None:
            results[i] = stream_track(clients[i], prompt, duration=120, seed=9)

        threads = [threading.Thread(target=listen, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    finally:
        done.set()
        watcher.join()
    for record, chunks, _ in results:
        assert len(check_chunks(chunks, record)) == 120 * 32000 * 2
    assert peak[0] < 40 * 1024, f"broker VmRSS peaked at {peak[0] / 1024:.1f} MiB"
