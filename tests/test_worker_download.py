"""lofid/worker/download.py against a fake Hugging Face hub (tests/fakehub.py).

The download code under test is the real one (huggingface_hub's hf_hub_download over
HTTP). huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE when
it is first imported, so every download runs in a fresh subprocess with the environment
set (as the daemon's spawned worker does); models.locate() runs in-process with an
explicit hub_cache, and once in the subprocess to show the environment is honoured.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fakehub import FIXTURE, FakeHub, write_random_model

from lofid import models, variants
from lofid.errors import MODEL_DOWNLOAD_FAILED
from lofid.worker import download

ROOT = Path(__file__).resolve().parent.parent
STORAGE = "models--gabotechs--music_gen"

# Runs in the subprocess: one download (or locate), events and outcome as JSON lines.
DRIVER = r"""
import json, os, sys, time, types
if os.environ.get("LOFID_TEST_FAST_RETRY"):
    # Shorten huggingface_hub's retry sleeps (5xx backoff 1+2+4+8+8 s) in this
    # throwaway process only; the code path stays the real one.
    import huggingface_hub.utils._http as _h, huggingface_hub.file_download as _fd
    shim = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    shim.sleep = lambda s: time.sleep(min(s, 0.01))
    _h.time = shim; _fd.time = shim
if os.environ.get("LOFID_TEST_FSIZE"):
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    n = int(os.environ["LOFID_TEST_FSIZE"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
from lofid import models
from lofid.worker import download
from lofid.errors import LofiError
op, variant, force = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
def out(**kw):
    print(json.dumps(kw), flush=True)
def loc_dict(loc):
    return {"root": str(loc.root) if loc.root else None, "missing": loc.missing,
            "revision": loc.revision, "model_version": loc.model_version}
try:
    if op == "download":
        loc = download.download(variant, progress=lambda e: out(progress=e), force=force, poll_interval=0.02)
        out(ok=loc_dict(loc))
    elif op == "remote":
        out(ok=[[r.path, r.size] for r in download.remote_info(variant).values()])
    else:
        out(ok=loc_dict(models.locate(variant, None)), cache=str(models.hub_cache_dir()))
except LofiError as e:
    out(error=e.to_dict())
"""


def run(hub: FakeHub, home: Path, op="download", variant="fp16", force=False, offline=False, **extra_env):
    env = hub.env(home, offline=offline)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update({k: str(v) for k, v in extra_env.items()})
    p = subprocess.run(
        [sys.executable, "-c", DRIVER, op, variant, "1" if force else "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert lines and ("ok" in lines[-1] or "error" in lines[-1]), (p.returncode, p.stdout, p.stderr[-4000:])
    events = [x["progress"] for x in lines if "progress" in x]
    return lines[-1], events


@pytest.fixture
def served(tmp_path):
    """A folder in the hub layout: random files (the tiny real model is not needed here)."""
    return write_random_model(tmp_path / "served", onnx_size=400_000)


@pytest.fixture
def hub(served):
    h = FakeHub(served).start()
    yield h
    h.stop()


@pytest.fixture
def home(tmp_path):
    return tmp_path / "hf_home"


def cache_of(home: Path) -> Path:
    return home / "hub"


def snapshot_files(home: Path) -> list[Path]:
    return [p for p in (cache_of(home) / STORAGE / "snapshots").rglob("*") if p.is_file()]


# ------------------------------------------------------------------------ download


def test_full_download_with_progress_then_locate(hub, home, served):
    # huggingface_hub streams in 10 MB chunks (constants.DOWNLOAD_CHUNK_SIZE): one file
    # of 25 MB, served at 50 MB/s, shows progress from inside a file
    (served / "small_fp16/decoder_model.onnx").write_bytes(os.urandom(25_000_000))
    hub.rate = 50_000_000
    res, events = run(hub, home)
    assert "ok" in res, res
    files = variants.hub_files("fp16")
    sizes = {f: (served / f).stat().st_size for f in files}
    total = sum(sizes.values())

    # progress: overall bytes and percent never go back, end at 100 % exactly once
    assert events, "no progress events"
    assert all(e["repo"] == "gabotechs/music_gen" and e["bytes_total"] == total for e in events)
    done = [e["bytes_done"] for e in events]
    pct = [e["percent"] for e in events]
    assert done == sorted(done) and pct == sorted(pct)
    assert events[-1]["bytes_done"] == total and pct[-1] == 100 and pct.count(100) == 1
    assert {e["file"] for e in events} == set(files)
    for f in files:  # per-file bytes too, each file reported complete
        fe = [e for e in events if e["file"] == f]
        assert all(e["file_bytes_total"] == sizes[f] for e in fe)
        assert fe[-1]["file_bytes_done"] == sizes[f]
    partial = [e for e in events if 0 < e["file_bytes_done"] < e["file_bytes_total"]]
    assert partial and all(e["file"] == "small_fp16/decoder_model.onnx" for e in partial)

    # locate (in-process, explicit cache) finds everything at the hub's commit
    loc = models.locate("fp16", None, hub_cache=cache_of(home))
    assert loc.complete and loc.missing == []
    assert loc.revision == hub.commit
    assert loc.model_version == f"gabotechs/music_gen@{hub.commit}/fp16"
    assert res["ok"]["model_version"] == loc.model_version
    assert loc.root == cache_of(home) / STORAGE / "snapshots" / hub.commit
    for f in files:
        assert loc.path(f).read_bytes() == (served / f).read_bytes()

    # the subprocess's locate() honours HF_HOME/HF_HUB_CACHE from the environment
    res2, _ = run(hub, home, op="locate")
    assert res2["ok"]["revision"] == hub.commit and res2["ok"]["missing"] == []
    assert res2["cache"] == str(cache_of(home))

    # a complete variant: download() returns without touching the network
    n = len(hub.requests)
    res3, ev3 = run(hub, home)
    assert res3["ok"]["revision"] == hub.commit and ev3 == []
    assert len(hub.requests) == n


def test_remote_info_sizes(hub, home, served):
    res, _ = run(hub, home, op="remote", variant="int8")
    assert res["ok"] == [[f, (served / f).stat().st_size] for f in variants.hub_files("int8")]


def test_shared_files_reused_and_force(hub, home):
    assert "ok" in run(hub, home, variant="int8")[0]
    gets = hub.count("GET")
    res, _ = run(hub, home, variant="fp32")  # config, tokenizer, encoder, encodec shared
    assert "ok" in res
    assert hub.count("GET") - gets == 1  # only small_fp32/decoder_model_merged.onnx
    gets = hub.count("GET")
    res, _ = run(hub, home, variant="fp32", force=True)
    assert "ok" in res and hub.count("GET") - gets == 5


def hub_keeps_partial_files() -> bool:
    """huggingface_hub before 1.18 keeps ``<etag>.incomplete`` after a failed download and
    resumes from it; later releases download into a file of their own per call and remove
    it when the download fails."""
    import huggingface_hub

    return tuple(int(x) for x in huggingface_hub.__version__.split(".")[:2]) < (1, 18)


def test_connection_drop_mid_file_then_resume(hub, home, served):
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE as CHUNK  # 10 MB

    # huggingface_hub writes whole 10 MB chunks: a 12 MB file cut at 11 MB leaves 10 MB
    f = "small_fp16/decoder_model.onnx"
    (served / f).write_bytes(os.urandom(12_000_000))
    size = (served / f).stat().st_size
    hub.drop_after(f, 11_000_000, times=None)  # every attempt dies at the same offset
    res, events = run(hub, home)
    err = res["error"]
    assert err["code"] == MODEL_DOWNLOAD_FAILED and err["file"] == f
    broke = f"the connection to {hub.url} broke while downloading {f}"
    blobs = cache_of(home) / STORAGE / "blobs"
    partial = list(blobs.glob("*.incomplete"))
    if hub_keeps_partial_files():
        assert err["message"] == f"{broke} (10.5 MB of 12.0 MB kept); run the download again to resume"
        assert len(partial) == 1 and partial[0].stat().st_size == CHUNK
    else:  # nothing kept, and the sentence promises nothing
        assert err["message"] == f"{broke}; run the download again"
        assert partial == []
    # nothing under a final name: no snapshot entry, no blob
    assert not any(p.name == "decoder_model.onnx" for p in snapshot_files(home))
    loc = models.locate("fp16", None, hub_cache=cache_of(home))
    assert f in loc.missing
    assert not (blobs / hashlib.sha256((served / f).read_bytes()).hexdigest()).exists()
    assert events and events[-1]["percent"] < 100

    hub.clear()
    res, events = run(hub, home)
    assert "ok" in res, res
    ranges = [r["range"] for r in hub.requests if r["file"] == f and r["method"] == "GET"]
    # resumed with a Range request from the partial size, or fetched whole
    assert ranges[-1] == (f"bytes={CHUNK}-" if partial else None)
    loc = models.locate("fp16", None, hub_cache=cache_of(home))
    assert loc.complete and loc.path(f).read_bytes() == (served / f).read_bytes()
    assert loc.path(f).stat().st_size == size
    assert not list(blobs.glob("*.incomplete"))
    assert events[-1]["percent"] == 100


def test_http_404(hub, home):
    f = "small_fp16/encodec_decode.onnx"
    hub.fail(f, 404)
    res, _ = run(hub, home)
    err = res["error"]
    assert err["code"] == MODEL_DOWNLOAD_FAILED and err["status"] == 404
    assert f in err["message"] and "404" in err["message"]
    hub.clear()
    assert "ok" in run(hub, home)[0]


def test_file_absent_from_hub(hub, home, served):
    (served / "small_fp16/encodec_decode.onnx").unlink()
    res, _ = run(hub, home)
    assert res["error"]["code"] == MODEL_DOWNLOAD_FAILED
    assert "small_fp16/encodec_decode.onnx" in res["error"]["message"]


def test_http_5xx_on_file_then_the_hub_is_back(hub, home):
    """Whether and how often huggingface_hub retries a 5xx itself depends on its release
    (up to 0.35, and in 1.0, a 5xx on a file's metadata is not retried; 0.36 and the 2.x
    line retry it): what lofid promises is the sentence, and the next run once the hub is
    back."""
    f = "small/tokenizer.json"
    hub.fail(f, 503)  # persistent: whatever the retries, they all fail
    res, _ = run(hub, home, LOFID_TEST_FAST_RETRY=1)
    err = res["error"]
    assert err["code"] == MODEL_DOWNLOAD_FAILED and err["status"] == 503
    assert "503" in err["message"] and f in err["message"] and "try again later" in err["message"]
    assert hub.count("HEAD", f) >= 1
    hub.clear()
    assert "ok" in run(hub, home)[0]


def test_an_endpoint_that_is_not_a_hub(hub, home):
    hub.plain = True  # files served, but without X-Repo-Commit and the X-Linked headers
    res, _ = run(hub, home)
    err = res["error"]
    assert err["code"] == MODEL_DOWNLOAD_FAILED
    assert err["message"] == (f"{hub.url} answered for small/config.json without the file's hub metadata: it is "
                              "not a Hugging Face hub (or a proxy strips its headers); check HF_ENDPOINT")


def test_http_500_on_api(hub, home):
    hub.fail_api(500)
    res, _ = run(hub, home)
    err = res["error"]
    assert err["code"] == MODEL_DOWNLOAD_FAILED and err["status"] == 500
    assert "HTTP 500" in err["message"]


def test_hub_unreachable(hub, home):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    res, _ = run(hub, home, HF_ENDPOINT=dead)
    err = res["error"]
    assert err["code"] == MODEL_DOWNLOAD_FAILED
    assert err["message"].startswith(f"could not reach the hub at {dead}")


def test_offline_with_nothing_cached(hub, home):
    res, _ = run(hub, home, offline=True)
    err = res["error"]
    assert err["code"] == MODEL_DOWNLOAD_FAILED and err["offline"] is True
    assert "HF_HUB_OFFLINE" in err["message"] and "all 6 files" in err["message"]
    assert err["missing"] == variants.hub_files("fp16")
    assert hub.requests == []


def test_offline_with_everything_cached(hub, home):
    assert "ok" in run(hub, home)[0]
    n = len(hub.requests)
    res, _ = run(hub, home, offline=True)
    assert res["ok"]["revision"] == hub.commit
    assert len(hub.requests) == n


def test_corrupt_transfer_is_caught_and_removed(hub, home, served):
    f = "small_fp16/text_encoder.onnx"
    hub.corrupt(f, times=1)  # same size, one flipped byte: only a hash check sees it
    res, _ = run(hub, home)
    err = res["error"]
    assert err["code"] == MODEL_DOWNLOAD_FAILED and err["file"] == f and "sha256" in err["message"]
    loc = models.locate("fp16", None, hub_cache=cache_of(home))
    assert f in loc.missing  # the damaged copy is not left under its final name
    res, _ = run(hub, home)
    assert "ok" in res, res
    loc = models.locate("fp16", None, hub_cache=cache_of(home))
    assert loc.path(f).read_bytes() == (served / f).read_bytes()


def test_write_failure_then_success(hub, home):
    # RLIMIT_FSIZE makes the write itself fail (EFBIG), like a full disk would
    res, _ = run(hub, home, LOFID_TEST_FSIZE=150_000)
    err = res["error"]
    assert err["code"] == MODEL_DOWNLOAD_FAILED
    assert "could not write" in err["message"] and "File too large" in err["message"]
    assert err["file"].endswith(".onnx")
    res, _ = run(hub, home)
    assert "ok" in res, res


def test_main_moves_to_a_new_commit(hub, home, served):
    assert "ok" in run(hub, home)[0]
    old = hub.commit
    (served / "small_fp16/decoder_model.onnx").write_bytes(os.urandom(1234))
    assert hub.commit != old
    res, _ = run(hub, home, force=True)
    assert res["ok"]["revision"] == hub.commit
    loc = models.locate("fp16", None, hub_cache=cache_of(home))
    assert loc.complete and loc.revision == hub.commit


def test_error_mapping_disk_full():
    r = download.Remote("small_fp32/decoder_model_merged.onnx", 2_000_000_000, "ab" * 32, "cd" * 20)
    e = download.download_error(OSError(errno.ENOSPC, "No space left on device"), "fp32", r, 10, Path("/x/hub"))
    assert e.code == MODEL_DOWNLOAD_FAILED
    assert e.message.startswith("no space left to write small_fp32/decoder_model_merged.onnx in /x/hub")


@pytest.mark.skipif(not (FIXTURE / "small/config.json").is_file(), reason="tiny fixture model not present")
def test_fixture_model_served_and_located(tmp_path):
    """The tiny real model (another engineer's fixture), when present: as a model dir,
    and downloaded from the fake hub byte for byte."""
    loc = models.locate("fp32", FIXTURE, hash_cache_dir=tmp_path)
    assert loc.revision.startswith("local-")
    if loc.missing:
        pytest.skip(f"fixture lacks {loc.missing}")
    with FakeHub(FIXTURE) as hub:
        res, _ = run(hub, tmp_path / "hf_home", variant="fp32")
    assert "ok" in res, res
    got = models.locate("fp32", None, hub_cache=tmp_path / "hf_home" / "hub")
    for f in variants.hub_files("fp32"):
        assert got.path(f).read_bytes() == loc.path(f).read_bytes()
