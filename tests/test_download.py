"""Model acquisition through the daemon (issue 5): consent, download progress, failures,
against a fake Hugging Face hub on 127.0.0.1. The real huggingface_hub code runs in the
daemon's worker; only the files (placeholders, read by the scripted engine) are fake."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time

import pytest
from fakehub import FakeHub, write_random_model
from lofictl.output import human_bytes

from lofid import variants
from lofid.errors import LofiError
from lofid.models import size_text


@pytest.fixture
def hub(short_tmp):
    with FakeHub(write_random_model(short_tmp / "served", onnx_size=200_000)) as hub:
        yield hub


def hub_daemon(make_daemon, hub, short_tmp, **kw):
    return make_daemon(model_dir=None, env=hub.env(short_tmp / "hf"), **kw)


def model_state(c):
    deadline = time.monotonic() + 20
    while (state := c.call("status")["model"]["state"]) == "locating" and time.monotonic() < deadline:
        time.sleep(0.05)
    return state


def gen(c, prompt, seed=1, **kw):
    return c.call("generate", {"prompt": prompt, "duration_sec": 5, "seed": seed, **kw})


def test_consent_download_generate_and_never_asked_again(make_daemon, hub, short_tmp):
    daemon = hub_daemon(make_daemon, hub, short_tmp)
    with daemon.client() as c:
        assert model_state(c) == "missing"
        with pytest.raises(LofiError) as e:
            gen(c, "first step=0")
        err = e.value
        assert err.code == "MODEL_NOT_FOUND" and err.data["consent_required"] is True
        assert err.data["repo"] == "gabotechs/music_gen" and err.data["variant"] == "int8"
        assert "small_i8/decoder_model_merged.onnx" in err.data["files"]
        assert_hub_size(err, hub)
        assert hub.count("GET") == 0  # asking fetched metadata only
        assert c.call("status")["queue"] == []

        r = gen(c, "first step=0", allow_download=True)
        progress = []
        record = c.wait_track(r["track_id"], on_event=None)
        while c.notifications:
            m, p = c.notifications.popleft()
            if m == "download_progress":
                progress.append(p)
    assert record["status"] == "complete" and record["model_version"] == f"gabotechs/music_gen@{hub.commit}/int8"
    assert progress and progress[-1]["percent"] == 100
    done = [p["bytes_done"] for p in progress]
    assert done == sorted(done) and progress[-1]["bytes_done"] == progress[-1]["bytes_total"]
    assert {p["file"] for p in progress} >= {"small_i8/decoder_model_merged.onnx"}

    # consent is remembered: with the model gone, a new daemon downloads without asking
    daemon.stop()
    shutil.rmtree(short_tmp / "hf")
    daemon.start()
    with daemon.client() as c:
        r = gen(c, "second step=0", seed=2)
        assert c.wait_track(r["track_id"])["status"] == "complete"
        assert c.call("status")["model"]["state"] == "ready"


def assert_hub_size(err: LofiError, hub: FakeHub) -> None:
    """The consent question gives the size of the files the hub serves, not the estimate."""
    served = sum((hub.root / f).stat().st_size for f in err.data["files"])
    assert err.data["download_bytes"] == served and err.data["download_bytes_estimated"] is False
    assert f"not downloaded yet: {size_text(served)} from gabotechs/music_gen" in err.message
    assert "estimate" not in err.message


@pytest.mark.parametrize("how", ["offline", "unreachable"])
def test_consent_size_is_the_labelled_estimate_without_an_answer(make_daemon, hub, short_tmp, how):
    env = hub.env(short_tmp / "hf", offline=how == "offline")
    if how == "unreachable":
        hub.stop()  # nothing listens on HF_ENDPOINT any more
    daemon = make_daemon(model_dir=None, env=env)
    with daemon.client() as c:
        with pytest.raises(LofiError) as e:
            gen(c, "no hub step=0")
    estimate = variants.get("int8").download_bytes
    assert e.value.data["download_bytes"] == estimate and e.value.data["download_bytes_estimated"] is True
    assert "about 1.0 GB (estimate: the hub did not answer)" in e.value.message
    assert not hub.requests
    assert "_multiarray_umath" not in open(f"/proc/{daemon.proc.pid}/maps").read()


def test_consent_size_through_lofictl(make_daemon, hub, short_tmp):
    """lofictl's consent question, on a terminal, says the size the hub gives."""
    daemon = hub_daemon(make_daemon, hub, short_tmp)
    primary, secondary = os.openpty()
    p = subprocess.Popen([sys.executable, "-m", "lofictl", "--socket", str(daemon.socket), "--no-start",
                          "generate", "a prompt step=0", "--duration", "5"], stdin=secondary, stdout=secondary,
                         stderr=secondary, env=daemon.env)
    os.close(secondary)
    seen = read_until(primary, b"[y/N]")
    os.write(primary, b"n\n")
    seen += read_until(primary, None)
    os.close(primary)
    served = sum((hub.root / f).stat().st_size for f in variants.hub_files("int8"))
    assert f"Download {human_bytes(served)} of model files from gabotechs/music_gen? [y/N]" in seen.decode()
    assert p.wait(30) != 0 and "lofictl: CANCELLED: no consent to download the model" in seen.decode()
    assert hub.count("GET") == 0


def read_until(fd: int, marker: bytes | None, timeout: float = 30) -> bytes:
    """What a terminal's other end shows until ``marker`` (None: until it closes)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while (marker is None or marker not in seen) and time.monotonic() < deadline:
        if select.select([fd], [], [], 1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:   # EIO: the process closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_dropped_connection_fails_every_waiting_job_then_recovers(make_daemon, hub, short_tmp):
    daemon = hub_daemon(make_daemon, hub, short_tmp, allow_download=True)
    # every attempt: huggingface_hub 1.18+ retries a cut transfer within one download
    hub.drop_after("small_i8/decoder_model_merged.onnx", 50_000, times=None)
    with daemon.client() as c:
        jobs = [gen(c, f"waiting {i} step=0", seed=i) for i in range(3)]
        for j in jobs:
            with pytest.raises(LofiError) as e:
                c.wait_track(j["track_id"])
            assert e.value.code == "MODEL_DOWNLOAD_FAILED"
            assert "small_i8/decoder_model_merged.onnx" in e.value.message
        assert c.call("status")["pid"] == daemon.proc.pid
        hf_files = [p.name for p in (short_tmp / "hf").rglob("*") if p.is_file()]
        assert not any(n.endswith(".onnx") for n in hf_files if "decoder_model" in n)
        hub.clear()
        r = gen(c, "after the drop step=0", seed=9)
        assert c.wait_track(r["track_id"])["status"] == "complete"


def test_404_and_offline_give_clear_errors(make_daemon, hub, short_tmp):
    hub.fail("small_fp32/encodec_decode.onnx", 404)
    daemon = hub_daemon(make_daemon, hub, short_tmp, allow_download=True)
    with daemon.client() as c:
        r = gen(c, "missing upstream step=0")
        with pytest.raises(LofiError) as e:
            c.wait_track(r["track_id"])
        assert e.value.code == "MODEL_DOWNLOAD_FAILED" and "404" in e.value.message
        assert "small_fp32/encodec_decode.onnx" in e.value.message
    daemon.stop()
    offline = make_daemon(model_dir=None, env=hub.env(short_tmp / "hf2", offline=True), allow_download=True,
                          socket=short_tmp / "run2" / "lofid.sock")
    with offline.client() as c:
        r = gen(c, "offline step=0")
        with pytest.raises(LofiError) as e:
            c.wait_track(r["track_id"])
        assert e.value.code == "MODEL_DOWNLOAD_FAILED" and "offline" in e.value.message.lower()


def test_download_model_method_reports_progress(make_daemon, hub, short_tmp):
    daemon = hub_daemon(make_daemon, hub, short_tmp)
    with daemon.client() as c, daemon.client() as watcher:
        watcher.call("subscribe")
        assert c.call("download_model", {"variant": "fp16"})["state"] == "downloading"
        m, p = c.notification(60, match=lambda m, p: m in ("download_complete", "download_error"))
        assert m == "download_complete" and p["variant"] == "fp16", p
        assert any(m == "download_progress" for m, _ in c.notifications)
        wm, _ = watcher.notification(10, match=lambda m, p: m == "download_complete")
        # consent given by download_model: the default int8 model is fetched without asking
        r = gen(c, "after consent step=0")
        assert c.wait_track(r["track_id"])["status"] == "complete"
        with pytest.raises(LofiError) as e:
            c.call("download_model", {"variant": "fp64"})
        assert e.value.code == "INVALID_PARAMS"


def test_real_engine_on_a_downloaded_tiny_model(make_daemon, short_tmp):
    """The whole first-run path with nothing faked but the hub: consent, download, load, generate."""
    from conftest import FIXTURE_MODEL

    with FakeHub(FIXTURE_MODEL) as hub:
        env = {**hub.env(short_tmp / "hf"), "LOFID_ENGINE": "lofid.worker.musicgen:MusicGen"}
        daemon = make_daemon(model_dir=None, env=env, variant="int8")
        with daemon.client() as c:
            with pytest.raises(LofiError) as e:
                gen(c, "lofi hip hop, jazzy piano")
            assert e.value.data["consent_required"] is True and e.value.data["variant"] == "int8"
            r = gen(c, "lofi hip hop, jazzy piano", allow_download=True)
            record = c.wait_track(r["track_id"])
            assert record["model_version"] == f"gabotechs/music_gen@{hub.commit}/int8"
            assert c.call("status")["model"]["model_version"] == record["model_version"]
            # the next identical request uses the resolved version, then hits the cache
            again = gen(c, "lofi hip hop, jazzy piano")
            c.wait_track(again["track_id"])
            assert gen(c, "lofi hip hop, jazzy piano")["cached"] is True
