"""Dependency floors and the onnxruntime builds (lofid/dependencies.py, issue 18).

setup.cfg, constraints/floors.txt and FLOORS must say the same; what lofid says where
the installed packages fall short. The installed packages are real distribution
metadata: ``<name>-<version>.dist-info`` folders, as pip leaves them, put first on the
path of a subprocess or a daemon (no mocked importlib).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURE_MODEL, ROOT, _pythonpath

from lofid import dependencies, errors
from lofid.errors import LofiError

REAL_ENGINE = {"LOFID_ENGINE": "lofid.worker.musicgen:MusicGen"}


def fake_site(folder: Path, **dists: str) -> Path:
    """``folder`` holding a dist-info per ``name=version`` (``_`` for ``-`` in names)."""
    for name, version in dists.items():
        info = folder / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\n"
                                       f"Version: {version}\n")
        (info / "RECORD").write_text("")
    return folder


def run_python(code: str, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), _pythonpath()])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------ the floors


def declared_floors() -> dict[str, str]:
    meta = configparser.ConfigParser()
    meta.read(ROOT / "setup.cfg")
    out = {}
    for line in meta["options"]["install_requires"].strip().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", line.strip())
        assert m, f"setup.cfg: {line!r} is not name>=floor (no caps: lofid runs the newest releases too)"
        out[m[1]] = m[2]
    return out


def constrained_floors() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[name.strip()] = version.strip()
    return out


def test_setup_cfg_constraints_and_code_declare_the_same_floors():
    assert declared_floors() == dependencies.FLOORS
    assert constrained_floors() == dependencies.FLOORS


# ------------------------------------------------------------------ too old, missing


def test_packages_older_than_their_floor_are_named_with_version_found_and_needed(tmp_path):
    site = fake_site(tmp_path / "site", onnxruntime="1.31.1", tokenizers="0.15.2")
    r = run_python("from lofid import dependencies\nfrom lofid.errors import LofiError\n"
                   "try:\n    dependencies.require('onnxruntime', 'onnx', 'numpy', 'tokenizers')\n"
                   "except LofiError as e:\n    print(e.message)\n", site)
    assert r.returncode == 0, r.stderr
    assert "onnxruntime 1.31.1 is installed; lofid needs onnxruntime >= 1.32.0: " \
           "pip install -U 'onnxruntime>=1.32.0'" in r.stdout
    assert "tokenizers 0.15.2 is installed; lofid needs tokenizers >= 0.19.0" in r.stdout
    assert "numpy" not in r.stdout and "onnx " not in r.stdout   # those are fine here


def test_the_floor_itself_passes_and_a_missing_package_is_named(tmp_path):
    site = fake_site(tmp_path / "site", onnxruntime=dependencies.FLOORS["onnxruntime"])
    r = run_python("from lofid import dependencies\n"
                   "print(dependencies.shortfalls(['onnxruntime', 'numpy']))\n"
                   "print(dependencies.shortfalls(['scipy']) and 'x' or 'ok')\n", site)
    assert r.stdout.splitlines() == ["[]", "ok"], r.stderr
    assert dependencies.installed(["no-such-package-lofid"]) == {}


def test_an_old_onnxruntime_fails_the_model_load_on_a_real_daemon(make_daemon, tmp_path, monkeypatch):
    """pip installs an older onnxruntime where the user forces it; the daemon's answer
    names it instead of giving int4 NaN logits later."""
    monkeypatch.setenv("PYTHONPATH", str(fake_site(tmp_path / "site", onnxruntime="1.31.1")))
    daemon = make_daemon(env=REAL_ENGINE, model_dir=FIXTURE_MODEL, threads=1)
    with daemon.client() as c:
        r = c.call("generate", {"prompt": "too old", "duration_sec": 5, "seed": 1})
        with pytest.raises(LofiError) as e:
            c.wait_track(r["track_id"])
    assert e.value.code == errors.MODEL_LOAD_FAILED
    assert "onnxruntime 1.31.1 is installed; lofid needs onnxruntime >= 1.32.0" in e.value.message


# -------------------------------------------------------------- onnxruntime builds


def test_onnxruntime_and_onnxruntime_gpu_together_are_reported_with_the_fix(tmp_path, short_tmp):
    site = fake_site(tmp_path / "site", onnxruntime_gpu="1.32.0", onnxruntime="1.32.0")
    r = run_python("from lofid import dependencies\nprint(dependencies.onnxruntime_conflict())", site)
    assert r.stdout.strip() == (
        "onnxruntime 1.32.0 and onnxruntime-gpu 1.32.0 are both installed, in one folder: neither works "
        "reliably. For the GPU: `pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu`; "
        "for the CPU only: `pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime`"), r.stderr
    alone = run_python("from lofid import dependencies\nprint(dependencies.onnxruntime_conflict())",
                       fake_site(tmp_path / "gpu-only", onnxruntime_gpu="1.32.0"))
    # the real onnxruntime of this venv is found after the fake gpu one: still two builds
    assert "onnxruntime-gpu 1.32.0" in alone.stdout

    env = {"PYTHONPATH": os.pathsep.join([str(site), _pythonpath()]), "PATH": "/usr/bin:/bin",
           "HOME": str(short_tmp / "home"), "HF_HOME": str(short_tmp / "hf")}
    cfg = subprocess.run([sys.executable, "-m", "lofictl", "--socket", str(short_tmp / "s.sock"), "config"],
                         env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert cfg.returncode == 0, cfg.stderr
    assert "# warnings (this Python's packages)" in cfg.stdout and dependencies.GPU_FIX in cfg.stdout
    out = subprocess.run([sys.executable, "-m", "lofictl", "--socket", str(short_tmp / "s.sock"), "--json",
                          "config"], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert any("onnxruntime-gpu 1.32.0" in w for w in json.loads(out.stdout)["warnings"])
    helped = subprocess.run([sys.executable, "-m", "lofid", "--help"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert dependencies.GPU_FIX in " ".join(helped.stdout.split())


def test_the_daemon_logs_the_two_builds_at_start_and_at_the_model_load(make_daemon, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(fake_site(tmp_path / "site", onnxruntime_gpu="1.32.0")))
    daemon = make_daemon(env=REAL_ENGINE, model_dir=FIXTURE_MODEL, device="cpu", variant="int8", threads=1)
    with daemon.client() as c:
        assert "onnxruntime-gpu 1.32.0 are both installed" in daemon.logs()   # the broker, at start
        r = c.call("generate", {"prompt": "two builds", "duration_sec": 5, "seed": 1})
        assert c.wait_track(r["track_id"])["status"] == "complete"   # it warns, it does not refuse
    warnings = [ln for ln in daemon.logs().splitlines() if "are both installed" in ln]
    assert len(warnings) == 2 and all(dependencies.GPU_FIX in ln for ln in warnings)   # and the worker's load


def test_one_build_gives_no_warning(make_daemon):
    daemon = make_daemon()
    with daemon.client() as c:
        c.call("status")
    assert dependencies.onnxruntime_conflict() is None   # this venv: onnxruntime alone
    assert "both installed" not in daemon.logs()


# ---------------------------------------------------------------------- tokenizer


def test_a_tokenizer_this_tokenizers_cannot_read_blames_the_package_not_the_file(tmp_path):
    """A tokenizer.json written by a newer tokenizers (here: a pre-tokenizer type this one
    does not know, as tokenizers 0.15 meets in MusicGen's file) is not a corrupt file."""
    import tokenizers

    from lofid.worker.musicgen import MusicGen

    root = tmp_path / "model"
    shutil.copytree(FIXTURE_MODEL, root)
    path = root / "small" / "tokenizer.json"
    data = json.loads(path.read_text())
    data["pre_tokenizer"] = {"type": "AFutureSplitter", "behavior": "Isolated"}
    path.write_text(json.dumps(data))
    with pytest.raises(LofiError) as e:
        MusicGen.load(root, "fp32", threads=1)
    assert e.value.code == errors.MODEL_LOAD_FAILED
    assert e.value.message.startswith(f"tokenizers {tokenizers.__version__} cannot read {path} (")
    assert e.value.message.endswith("it needs a newer tokenizers: pip install -U tokenizers")
    assert "download" not in e.value.message and e.value.data["package"] == "tokenizers"
