"""The real ONNX engine behind a real daemon, on the tiny model (issue 4, "through the daemon")."""

from __future__ import annotations

import hashlib
import shutil
import wave

import numpy as np
import pytest
from conftest import FIXTURE_MODEL

from lofid import variants
from lofid.errors import LofiError

REAL_ENGINE = {"LOFID_ENGINE": "lofid.worker.musicgen:MusicGen"}


def real_daemon(make_daemon, **flags):
    flags.setdefault("model_dir", FIXTURE_MODEL)
    return make_daemon(env=REAL_ENGINE, **flags)


def generate(c, prompt="lofi hip hop, jazzy piano", seed=7, duration=5):
    r = c.call("generate", {"prompt": prompt, "duration_sec": duration, "seed": seed})
    events = []
    record = c.wait_track(r["track_id"], on_event=lambda m, p: events.append((m, p)))
    return r, record, events


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8", "int4"])
def test_playable_wav_with_progress(make_daemon, variant):
    daemon = real_daemon(make_daemon, variant=variant, threads=1)
    with daemon.client() as c:
        r, record, events = generate(c)
        status = c.call("status")
    assert [p["percent"] for m, p in events if m == "generation_progress"] == list(range(0, 100, 5))
    assert record["variant"] == variant and record["device"] == "cpu"
    label = variants.get(variant).label   # int4 -> int4b256-kv8
    assert record["model_version"].startswith("local:") and record["model_version"].endswith(f"/{label}")
    with wave.open(record["path"]) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 32000)
        assert w.getnframes() == 5 * 32000
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    assert np.abs(pcm).max() > 0  # not silence
    m = status["model"]
    assert m["state"] == "ready" and m["provider"] == "CPUExecutionProvider" and m["threads"] == 1
    assert m["load_time_sec"] >= 0


def test_same_seed_is_byte_identical_across_daemon_runs(make_daemon, short_tmp):
    first = real_daemon(make_daemon, cache_dir=short_tmp / "a", threads=1)
    with first.client() as c:
        _, a, _ = generate(c, seed=11)
        _, other, _ = generate(c, seed=12)
    first.stop()
    second = real_daemon(make_daemon, cache_dir=short_tmp / "b", threads=1)
    with second.client() as c:
        _, b, _ = generate(c, seed=11)
    assert a["track_id"] == b["track_id"] and a["path"] != b["path"]
    assert sha(a["path"]) == sha(b["path"])
    assert sha(other["path"]) != sha(a["path"])


def test_missing_file_is_model_not_found(make_daemon, short_tmp):
    model = short_tmp / "partial"
    shutil.copytree(FIXTURE_MODEL, model)
    (model / "small_fp32" / "encodec_decode.onnx").unlink()  # the int8 default uses fp32 EnCodec
    daemon = real_daemon(make_daemon, model_dir=model)
    with daemon.client() as c:
        with pytest.raises(LofiError) as e:
            c.call("generate", {"prompt": "x", "duration_sec": 5, "seed": 1})
    assert e.value.code == "MODEL_NOT_FOUND" and "small_fp32/encodec_decode.onnx" in e.value.message
    assert "consent_required" not in e.value.data  # a model dir is never downloaded to


def test_truncated_file_is_model_load_failed(make_daemon, short_tmp):
    model = short_tmp / "truncated"
    shutil.copytree(FIXTURE_MODEL, model)
    f = model / "small_i8" / "decoder_model_merged.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    daemon = real_daemon(make_daemon, model_dir=model)
    with daemon.client() as c:
        r = c.call("generate", {"prompt": "x", "duration_sec": 5, "seed": 1})
        with pytest.raises(LofiError) as e:
            c.wait_track(r["track_id"])
        assert e.value.code == "MODEL_LOAD_FAILED" and "lofictl models download --force" in e.value.message
        assert c.call("status")["pid"] == daemon.proc.pid


def test_unavailable_explicit_device_is_model_load_failed(make_daemon):
    daemon = real_daemon(make_daemon, device="cuda")
    with daemon.client() as c:
        r = c.call("generate", {"prompt": "x", "duration_sec": 5, "seed": 1})
        with pytest.raises(LofiError) as e:
            c.wait_track(r["track_id"])
    assert e.value.code == "MODEL_LOAD_FAILED" and "onnxruntime-gpu" in e.value.message


def test_long_form_through_the_daemon(make_daemon):
    daemon = real_daemon(make_daemon, variant="int8", threads=2)
    with daemon.client() as c:
        _, record, events = generate(c, duration=45, seed=3)
    progress = [p for m, p in events if m == "generation_progress"]
    assert [p["percent"] for p in progress] == list(range(0, 100, 5))
    assert progress[-1]["tokens_estimated"] > 45 * 50  # every window's tokens are counted
    with wave.open(record["path"]) as w:
        assert w.getnframes() == 45 * 32000
