"""lofid.models: where a variant's files are (hub cache or --model-dir), its
model_version, and the consent to download. Offline and in-process: the hub cache is
filled from a fake hub in test_worker_download.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fakehub import write_random_model

from lofid import models, variants
from lofid.errors import MODEL_NOT_FOUND, LofiError

ROOT = Path(__file__).resolve().parent.parent


def test_import_is_cheap():
    code = (
        "import sys, lofid.models, lofid.variants\n"
        "bad = [m for m in ('numpy', 'onnxruntime', 'huggingface_hub', 'requests') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "import lofid.daemon\n"   # the whole broker side: nothing of the worker, nothing heavy
        "bad = [m for m in sys.modules if m.startswith('lofid.worker') or m in ('numpy', 'onnxruntime')]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_locate_empty_cache(tmp_path):
    loc = models.locate("fp16", None, hub_cache=tmp_path / "nothing")
    assert loc.root is None and loc.revision is None
    assert loc.missing == variants.hub_files("fp16")
    assert loc.model_version == "gabotechs/music_gen@main/fp16"
    assert not loc.complete


# ------------------------------------------------------------------------ model dir


def test_model_dir_used_as_is(tmp_path):
    md = write_random_model(tmp_path / "model")
    hc = tmp_path / "state"
    a = models.locate("fp16", md, hash_cache_dir=hc)
    b = models.locate("fp16", md, hash_cache_dir=hc)
    assert a == b and a.complete and a.root == md
    assert a.revision.startswith("local-") and len(a.revision) == len("local-") + 16
    h = a.revision.removeprefix("local-")
    assert a.model_version == f"local:{h}/fp16"
    assert (hc / models.HASH_CACHE_FILE).is_file()
    assert models.locate("fp32", md, hash_cache_dir=hc).revision != a.revision
    # int4 is int8's files made into another model here: same files, another version
    int8, int4 = (models.locate(v, md, hash_cache_dir=hc) for v in ("int8", "int4"))
    assert int8.revision == int4.revision and int8.model_version.endswith("/int8")
    assert int4.model_version == int8.model_version.removesuffix("int8") + "int4b256-kv8"

    # a changed file changes the revision
    f = md / "small_fp16/decoder_model.onnx"
    data = bytearray(f.read_bytes())
    data[0] ^= 1
    f.write_bytes(bytes(data))
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10_000_000))
    c = models.locate("fp16", md, hash_cache_dir=hc)
    assert c.revision != a.revision and c.complete

    # a missing file is listed; nothing is downloaded or written into the model dir
    (md / "small_fp16/encodec_decode.onnx").unlink()
    before = sorted(p.name for p in md.rglob("*"))
    d = models.locate("fp16", md, hash_cache_dir=hc)
    assert d.missing == ["small_fp16/encodec_decode.onnx"] and not d.complete
    assert sorted(p.name for p in md.rglob("*")) == before


def test_model_dir_hashes_are_cached(tmp_path, monkeypatch):
    md = write_random_model(tmp_path / "model")
    hc = tmp_path / "state"
    first = models.locate("fp16", md, hash_cache_dir=hc)
    calls = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p: calls.append(p) or real(p))
    models.HashCache.memo.clear()  # as in a fresh process: only the JSON cache remains
    assert models.locate("fp16", md, hash_cache_dir=hc) == first
    assert calls == []
    f = md / "small/config.json"
    f.write_text(f.read_text() + " ")
    assert models.locate("fp16", md, hash_cache_dir=hc).revision != first.revision
    assert [p.name for p in calls] == ["config.json"]


# ------------------------------------------------------------------------- consent


def test_consent_round_trip(tmp_path):
    state = tmp_path / "state" / "lofid"
    assert not models.consent_given(state)
    models.give_consent(state)
    assert models.consent_given(state)
    f = state / models.CONSENT_FILE
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert json.loads(f.read_text())["repo"] == "gabotechs/music_gen"
    assert [p.name for p in state.iterdir()] == [models.CONSENT_FILE]  # no temp leftovers
    models.give_consent(state)  # idempotent
    assert models.consent_given(state)


def test_may_download_decides_consent_in_one_place(tmp_path):
    """Nothing missing: nothing to download. A --model-dir: never downloaded into. The
    hub: with the setting, with the request's own consent (remembered for good), or
    with consent given before; else MODEL_NOT_FOUND saying how big the download is."""
    state = tmp_path / "state"
    md = write_random_model(tmp_path / "model")
    present = models.locate("fp16", md, hash_cache_dir=state)
    assert models.may_download(present, md, state, asked=True) is False
    (md / "small_fp16/encodec_decode.onnx").unlink()
    partial = models.locate("fp16", md, hash_cache_dir=state)
    with pytest.raises(LofiError) as e:
        models.may_download(partial, md, state, allow_download=True, asked=True)
    assert e.value.code == MODEL_NOT_FOUND and "consent_required" not in e.value.data
    assert e.value.data["files"] == ["small_fp16/encodec_decode.onnx"] and str(md) in e.value.message
    assert not models.consent_given(state)

    absent = models.locate("int8", None, hub_cache=tmp_path / "nothing")
    with pytest.raises(LofiError) as e:
        models.may_download(absent, None, state)
    assert e.value.code == MODEL_NOT_FOUND and e.value.data["consent_required"] is True
    assert e.value.data["repo"] == variants.REPO and e.value.data["variant"] == "int8"
    assert e.value.data["download_bytes"] == variants.get("int8").download_bytes
    assert e.value.data["files"] == variants.hub_files("int8") and "1.0 GB" in e.value.message
    assert models.may_download(absent, None, state, allow_download=True) is True
    assert not models.consent_given(state)                  # the setting is not a consent
    assert models.may_download(absent, None, state, asked=True) is True
    assert models.consent_given(state)                      # the request's consent stays
    assert models.may_download(absent, None, state) is True
