"""Security (issue 8): who may talk to the daemon, what paths a client can make it build,
how the player is started, which model files are opened, and who can give the download
consent. The peer-uid tests need root (to become another user); the others run anywhere."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from conftest import FIXTURE_MODEL, SCRIPTED_ENGINE, _pythonpath, make_fake_model, shutdown_daemon_at

from lofid import models, variants
from lofid.errors import LofiError

OTHER_UID = 65534  # nobody
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="becoming another uid needs root")


def as_other_user(fn, uid: int = OTHER_UID):
    """Run ``fn()`` in a forked child that dropped to ``uid``; returns what it returned (JSON)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            assert os.getuid() == uid and os.geteuid() == uid
            result = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            result = f"{type(e).__name__}: {e}"
        os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def talk(path, requests: list) -> list:
    """Connect, send requests, return what comes back until the daemon closes (or 3 s pass)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(str(path))
    except OSError as e:
        return [f"connect: {type(e).__name__} errno {e.errno}"]
    out = []
    try:
        for i, (method, arg) in enumerate(requests):
            s.sendall(msgpack.packb([0, i, method, [arg] if arg is not None else []]))
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            data = s.recv(65536)
            if not data:
                out.append("closed")
                break
            unpacker.feed(data)
            out += list(unpacker)
    except ConnectionResetError:
        out.append("closed")
    except (TimeoutError, BrokenPipeError) as e:
        out.append(type(e).__name__)
    finally:
        s.close()
    return out


def relax(paths_modes: dict):
    """chmod each path; returns the old modes to restore."""
    old = {p: stat.S_IMODE(os.stat(p).st_mode) for p in paths_modes}
    for p, mode in paths_modes.items():
        os.chmod(p, mode)
    return old


# ---------------------------------------------------------------- peers of another uid


@root_only
def test_another_uid_cannot_reach_the_socket_nor_pass_the_peer_check(daemon, short_tmp):
    sock = daemon.socket
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert os.stat(sock).st_uid == os.getuid() == 0
    # 1. the directory stops it: it cannot even reach the socket
    got = as_other_user(lambda: talk(sock, [("status", None)]))
    assert got == ["connect: PermissionError errno 13"], got
    # 2. with the directory and socket opened up (as a careless admin might), SO_PEERCRED stops it
    old = relax({short_tmp: 0o711, sock.parent: 0o711, sock: 0o666})
    try:
        got = as_other_user(lambda: talk(sock, [("status", None), ("shutdown", None)]))
        with daemon.client() as c:  # root's own client is served meanwhile
            assert c.call("status")["pid"] == daemon.proc.pid
    finally:
        relax(old)
    assert got in (["closed"], ["BrokenPipeError"]), got  # no answer at all, the connection dropped
    assert "refusing a client of uid 65534" in daemon.logs()
    assert daemon.proc.poll() is None  # its shutdown request was never read


@root_only
def test_consent_cannot_be_given_by_another_user(make_daemon, short_tmp):
    daemon = make_daemon(model_dir=None, env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    consent = daemon.state_dir / models.CONSENT_FILE
    sock = daemon.socket
    old = relax({short_tmp: 0o711, sock.parent: 0o711, sock: 0o666})
    try:
        got = as_other_user(lambda: talk(sock, [("download_model", {}),
                                                ("generate", {"prompt": "x", "allow_download": True})]))
    finally:
        relax(old)
    assert got in (["closed"], ["BrokenPipeError"]), got
    assert not consent.exists()
    with daemon.client() as c:  # still no consent: the daemon asks its own user
        with pytest.raises(LofiError) as e:
            c.call("generate", {"prompt": "lofi", "duration_sec": 5, "seed": 1})
        assert e.value.code == "MODEL_NOT_FOUND" and e.value.data.get("consent_required") is True
        # the user's own consent is recorded, privately
        r = c.call("generate", {"prompt": "lofi", "duration_sec": 5, "seed": 1, "allow_download": True})
        with pytest.raises(LofiError):
            c.wait_track(r["track_id"], timeout=60)  # offline: the download itself fails
    assert consent.is_file() and os.stat(consent).st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(consent).st_mode) == 0o600
    assert not stat.S_IMODE(os.stat(daemon.state_dir).st_mode) & 0o022  # nobody else can plant one
    # and the other user cannot plant one either
    planted = as_other_user(lambda: open(str(daemon.state_dir / "x.json"), "w").close())
    assert planted.startswith("PermissionError"), planted


# ------------------------------------------------------------------- paths from clients


def test_track_and_play_reject_paths_before_building_any(daemon, tmp_path):
    bait = daemon.cache_dir.parent / "bait.json"  # a record-shaped file just outside the cache
    bait.write_text(json.dumps({"track_id": "x", "status": "complete"}))
    (daemon.cache_dir.parent / "bait.wav").write_bytes(b"RIFF")
    with daemon.client() as c:
        for bad in ["../bait", "../../etc/passwd", "/etc/passwd", str(bait.with_suffix("")), "0123456789abcde/",
                    "..", ".", "", "0123456789abcdef/../bait", "0123456789ABCDEF", "0123456789abcdef0",
                    "0123456789abcde\x00", "%2e%2e%2fbait", "~/x", "0123456789abcdeg", None, 5, ["a"], {"a": 1}]:
            for method in ("track",):
                with pytest.raises(LofiError) as e:
                    c.call(method, {"track_id": bad})
                assert e.value.code == "INVALID_PARAMS", (bad, e.value)
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "LOFID_SOCKET": str(daemon.socket),
           "LOFID_CONFIG": str(daemon.config), "PATH": f"{_fake_player(tmp_path)}:{os.environ['PATH']}"}
    for bad in ["../bait", "/etc/passwd", "../../etc/passwd"]:
        r = subprocess.run([sys.executable, "-m", "lofictl", "--no-start", "play", bad], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "INVALID_PARAMS" in r.stderr, r.stderr
    assert not (tmp_path / "player-argv.json").exists()  # the player was never started


def _fake_player(tmp_path: Path) -> Path:
    """A `pw-play` (lofictl's first choice) that records its argv as JSON."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    player = bindir / "pw-play"
    player.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"json.dump(sys.argv[1:], open({str(tmp_path / 'player-argv.json')!r}, 'w'))\n")
    player.chmod(0o755)
    return bindir


def test_the_player_is_spawned_without_a_shell(short_tmp, tmp_path):
    """Shell metacharacters in the prompt and in the cache dir path reach the player as one
    argument, after "--"; nothing is executed."""
    evil = short_tmp / "tr $(touch PWNED1); `touch PWNED2` | touch PWNED3 & 'x' \"y\""
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "LOFID_ENGINE": SCRIPTED_ENGINE,
           "LOFID_SOCKET": str(short_tmp / "run" / "lofid.sock"), "LOFID_CACHE_DIR": str(evil),
           "LOFID_STATE_DIR": str(short_tmp / "state"), "LOFID_MODEL_DIR": str(make_fake_model(short_tmp / "model")),
           "LOFID_CONFIG": str(short_tmp / "config.toml"), "HF_HOME": str(short_tmp / "hf"),
           "PATH": f"{_fake_player(tmp_path)}:{os.environ['PATH']}"}
    (short_tmp / "config.toml").write_text("")
    prompt = "lofi $(touch PWNED4); `touch PWNED5` | touch PWNED6 && echo 'a' \"b\" ; step=0"
    try:
        r = subprocess.run([sys.executable, "-m", "lofictl", "--json", "generate", prompt, "--duration", "5",
                            "--seed", "3", "--play"], env=env, capture_output=True, text=True, timeout=90,
                           cwd=short_tmp, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        path = json.loads(r.stdout)["path"]
        assert Path(path).parent == evil and path.endswith(".wav") and Path(path).is_file()
        argv = json.loads((tmp_path / "player-argv.json").read_text())
        (tmp_path / "player-argv.json").unlink()
        # played from the stream (PCM on stdin: no path in its argv), or the file by its path, after "--"
        assert argv in (["--format", "s16", "--rate", "32000", "--channels", "1", "-"], ["--", path])
        r = subprocess.run([sys.executable, "-m", "lofictl", "--no-start", "play", Path(path).stem], env=env,
                           capture_output=True, text=True, timeout=60, cwd=short_tmp)
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / "player-argv.json").read_text()) == ["--", path]
    finally:
        shutdown_daemon_at(short_tmp / "run" / "lofid.sock")
    for where in (short_tmp, evil, tmp_path, Path.cwd(), Path("/")):
        assert not any(p.name.startswith("PWNED") for p in where.iterdir()), where


# -------------------------------------------------------------- model files opened


class Inotify:
    """IN_OPEN events (from any process) for files in watched directories, via libc."""

    IN_OPEN, IN_NONBLOCK, IN_CLOEXEC = 0x20, 0o4000, 0o2000000

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
        if self.fd < 0:
            pytest.skip("inotify is not available")
        self.dirs: dict[int, Path] = {}

    def watch_tree(self, root: Path) -> None:
        for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            wd = self.libc.inotify_add_watch(self.fd, str(d).encode(), self.IN_OPEN)
            assert wd >= 0, ctypes.get_errno()
            self.dirs[wd] = d

    def opened(self) -> set[Path]:
        out = set()
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out
            off = 0
            while off < len(data):
                wd, mask, _cookie, length = struct.unpack_from("iIII", data, off)
                name = data[off + 16:off + 16 + length].rstrip(b"\0").decode()
                off += 16 + length
                if wd in self.dirs:
                    out.add(self.dirs[wd] / name if name else self.dirs[wd])

    def close(self) -> None:
        os.close(self.fd)


def _copy_variant(dst: Path, variant: str) -> Path:
    for rel in variants.hub_files(variant):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(FIXTURE_MODEL / rel, dst / rel)
    return dst


def test_model_files_are_opened_only_inside_the_model_dir(make_daemon, short_tmp):
    """The real engine on the tiny model with --model-dir. Decoys with the same layout sit
    where a wrong root would land: the Hugging Face cache (a full snapshot of the repo), the
    model dir's parent. inotify sees every open, by any process."""
    variant = "fp16"
    models = short_tmp / "models"
    mine = _copy_variant(models / "music_gen", variant)
    commit = "0" * 40
    hub = short_tmp / "hf" / "hub" / "models--gabotechs--music_gen"
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text(commit)
    decoys = [_copy_variant(hub / "snapshots" / commit, variant), _copy_variant(models, variant)]
    ino = Inotify()
    try:
        ino.watch_tree(mine)
        for d in decoys:
            for sub in ("small", f"small_{variant}"):
                ino.watch_tree(d / sub)
        daemon = make_daemon(model_dir=mine, variant=variant, threads=1,
                             env={"LOFID_ENGINE": "lofid.worker.musicgen:MusicGen", "HF_HUB_OFFLINE": "1"})
        with daemon.client() as c:
            r = c.call("generate", {"prompt": "lofi, a model that stays home", "duration_sec": 5, "seed": 1})
            record = c.wait_track(r["track_id"], timeout=120)
            assert record["model_version"].startswith("local:")
        opened = ino.opened()
    finally:
        ino.close()
    files = {p for p in opened if p.is_file()}
    assert {mine / f for f in variants.hub_files(variant)} <= files  # the engine's opens were seen
    escaped = {p for p in files if mine not in p.parents}
    assert escaped == set(), escaped
