"""Track cache management (issue 7): the size cap with least-recently-used eviction,
`track_delete` / `cache_prune`, and `lofictl tracks rm|prune`."""

from __future__ import annotations

import json
import os
import time

import pytest
from test_lofictl import env, lofictl  # noqa: F401  (env is a fixture)

from lofid.broker.tracks import TrackCache
from lofid.errors import LofiError

TRACK_5S = 5 * 32000 * 2 + 44  # bytes of a 5 s WAV


def fake_track(root, tid: str, size: int, accessed: float) -> None:
    (root / f"{tid}.wav").write_bytes(b"\0" * size)
    (root / f"{tid}.json").write_text(json.dumps({"track_id": tid, "created_at": accessed}))
    os.utime(root / f"{tid}.json", (accessed, accessed))


def test_shrink_evicts_least_recently_used_first(tmp_path):
    cache = TrackCache(tmp_path)
    t0 = time.time() - 1000
    ids = [f"{i:016x}" for i in range(5)]
    for i, tid in enumerate(ids):  # ids[0] is the least recently used
        fake_track(tmp_path, tid, 1000, t0 + i)
    (tmp_path / f".{ids[0]}.wav.123.tmp").write_bytes(b"\0" * 5000)  # being written: not a track yet
    (tmp_path / "aaaaaaaaaaaaaaaa.wav").write_bytes(b"\0" * 5000)  # no record yet: not complete
    assert cache.get(ids[1]) is not None  # an access: ids[1] becomes the most recent
    removed = cache.shrink(3 * 1100, keep={ids[0]})  # ids[0] is the one just finished
    assert [e.track_id for e in removed] == [ids[2], ids[3]]
    assert {r["track_id"] for r in cache.list()} == {ids[0], ids[1], ids[4]}
    assert (tmp_path / f".{ids[0]}.wav.123.tmp").exists() and (tmp_path / "aaaaaaaaaaaaaaaa.wav").exists()
    assert not (tmp_path / f"{ids[2]}.wav").exists() and not (tmp_path / f"{ids[2]}.json").exists()
    # one kept track larger than the cap: everything else goes, it stays
    assert [e.track_id for e in cache.shrink(0, keep={ids[4]})] == [ids[0], ids[1]]
    assert [r["track_id"] for r in cache.list()] == [ids[4]]


def test_get_touches_list_does_not(tmp_path):
    cache = TrackCache(tmp_path)
    old = time.time() - 3600
    fake_track(tmp_path, "0" * 16, 10, old)
    record = cache.list()[0]
    assert record["accessed_at"] == pytest.approx(old, abs=0.01) and record["size_bytes"] > 10
    assert cache.get("0" * 16)["accessed_at"] > old + 3000
    with pytest.raises(LofiError) as e:
        cache.delete("1" * 16)
    assert e.value.code == "TRACK_NOT_FOUND"


def gen(c, prompt, seed, duration=5):
    r = c.call("generate", {"prompt": prompt, "duration_sec": duration, "seed": seed})
    return r if r["status"] == "complete" else c.wait_track(r["track_id"])


def test_the_cap_evicts_the_least_recently_used_and_keeps_the_newest(make_daemon):
    d = make_daemon(cache_max_mb=1)  # room for three 5 s tracks (320 kB each), not four
    with d.client() as c:
        a, b, cc = (gen(c, "cap step=0", seed) for seed in (1, 2, 3))
        assert {t["track_id"] for t in c.call("tracks")} == {a["track_id"], b["track_id"], cc["track_id"]}
        time.sleep(0.01)
        assert c.call("track", {"track_id": a["track_id"]})["status"] == "complete"  # a is used again
        again = c.call("generate", {"prompt": "cap step=0", "duration_sec": 5, "seed": 1})
        assert again["cached"] is True
        newest = gen(c, "cap step=0", 4)
        left = {t["track_id"] for t in c.call("tracks")}
        assert left == {a["track_id"], cc["track_id"], newest["track_id"]}  # b was the least recently used
        assert sum(t["size_bytes"] for t in c.call("tracks")) <= 1_000_000
        # a track larger than the whole cap is still kept: it is the one just finished
        big = gen(c, "big step=0", 5, duration=20)
        assert [t["track_id"] for t in c.call("tracks")] == [big["track_id"]]
    assert f"evicted track {b['track_id']}" in d.logs()


def test_pruning_never_touches_the_running_track(make_daemon):
    d = make_daemon()
    with d.client() as c, d.client() as w:
        done = [gen(c, "prune step=0", seed)["track_id"] for seed in (1, 2)]
        with pytest.raises(LofiError) as e:
            c.call("cache_prune")  # no cap configured: say so instead of guessing
        assert e.value.code == "INVALID_PARAMS" and "cache_max_mb" in e.value.message
        running = w.call("generate", {"prompt": "running step=0.01", "duration_sec": 5, "seed": 3})
        w.notification(20, match=lambda m, p: m == "generation_progress" and p["percent"] >= 10)
        with pytest.raises(LofiError) as e:
            c.call("track_delete", {"track_id": running["track_id"]})
        assert e.value.code == "INVALID_PARAMS" and "running" in e.value.message
        r = c.call("cache_prune", {"all": True})
        assert sorted(r["removed"]) == sorted(done) and r["tracks_left"] == 0
        record = w.wait_track(running["track_id"])  # it finishes and is written as usual
        assert os.path.exists(record["path"])
        assert [t["track_id"] for t in c.call("tracks")] == [running["track_id"]]
        r = c.call("track_delete", {"track_id": running["track_id"]})
        assert r["ok"] and r["bytes_freed"] > TRACK_5S
        assert not os.path.exists(record["path"]) and c.call("tracks") == []
        with pytest.raises(LofiError) as e:
            c.call("track_delete", {"track_id": running["track_id"]})
        assert e.value.code == "TRACK_NOT_FOUND"
        for bad in ({"track_id": "../x"}, {"all": "yes"}, {"max_mb": -1}, {"colour": 1}):
            with pytest.raises(LofiError) as e:
                c.call("cache_prune" if "track_id" not in bad else "track_delete", bad)
            assert e.value.code == "INVALID_PARAMS"


def test_lofictl_tracks_rm_and_prune(env):  # noqa: F811
    ids = []
    for seed in (1, 2, 3):
        r = lofictl(env, "--json", "generate", "cli cache step=0", "--duration", "5", "--seed", str(seed))
        assert r.returncode == 0, r.stderr
        ids.append(json.loads(r.stdout)["track_id"])
    listing = lofictl(env, "tracks").stdout
    assert all(tid in listing for tid in ids) and "3 tracks, " in listing
    r = lofictl(env, "tracks", "rm", ids[0], "0123456789abcdef")
    assert r.returncode == 1 and f"removed {ids[0]}" in r.stdout and "lofictl: TRACK_NOT_FOUND:" in r.stderr
    r = lofictl(env, "tracks", "prune")
    assert r.returncode != 0 and "cache_max_mb" in r.stderr
    r = lofictl(env, "--json", "tracks", "prune", "--max-mb", "0")
    assert r.returncode == 0 and sorted(json.loads(r.stdout)["removed"]) == sorted(ids[1:])
    assert lofictl(env, "tracks").stdout.strip() == "no tracks yet"
    r = lofictl(env, "tracks", "prune", "--all")
    assert r.returncode == 0 and r.stdout.startswith("removed 0 tracks")
