"""Fixtures: a real lofid on a temp socket with temp cache, config, state and HF dirs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lofictl.client import Client

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_MODEL = ROOT / "tests" / "fixtures" / "music_gen"
SCRIPTED_ENGINE = "engines:ScriptedEngine"


def make_fake_model(root: Path, variants: tuple[str, ...] = ("fp32", "fp16", "int8")) -> Path:
    """Placeholder files in the hub layout, for the scripted engine (it reads none of them)."""
    from lofid.variants import hub_files

    for rel in {rel for variant in variants for rel in hub_files(variant)}:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"placeholder " + rel.encode())
    return root


class Daemon:
    """One lofid process, started with the given settings (flags)."""

    def __init__(self, tmp: Path, env: dict | None = None, **flags) -> None:
        self.tmp = tmp
        self.socket = Path(flags.pop("socket", tmp / "run" / "lofid.sock"))
        self.cache_dir = Path(flags.pop("cache_dir", tmp / "tracks"))
        self.state_dir = Path(flags.pop("state_dir", tmp / "state"))
        self.config = tmp / "config.toml"
        if not self.config.exists():
            self.config.write_text("")
        self.flags = flags
        self.env = {**os.environ, "HF_HOME": str(tmp / "hf"), "LOFID_ENGINE": SCRIPTED_ENGINE,
                    "LOFID_OPTIMIZED_DIR": str(tmp / "optimized"), **(env or {}),
                    "PYTHONPATH": _pythonpath()}
        self.env.pop("LOFID_SOCKET", None)
        self.proc: subprocess.Popen | None = None
        self.log = tmp / "lofid.log"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "lofid", "--socket", str(self.socket), "--cache-dir", str(self.cache_dir),
                "--state-dir", str(self.state_dir), "--config", str(self.config)]
        for key, value in self.flags.items():
            if value is None:  # not given
                continue
            flag = "--" + key.replace("_", "-")
            argv += [flag] if value is True else [flag, str(value)]
        return argv

    def start(self, wait: bool = True) -> Daemon:
        self.proc = subprocess.Popen(self.argv(), env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"), start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lofid exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with self.client() as c:
                    c.call("status", timeout=5)
                return
            except (OSError, TimeoutError):
                time.sleep(0.05)
        raise RuntimeError(f"lofid did not answer:\n{self.log.read_text()}")

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL the broker alone (its worker must notice and exit by itself)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def shutdown_daemon_at(sock: Path) -> None:
    """Ask whatever lofid serves ``sock`` to exit (for daemons a test did not start itself)."""
    if not Path(sock).exists():
        return
    try:
        with Client(sock, timeout=5) as c:
            c.call("shutdown")
    except (OSError, TimeoutError):
        pass


def wait_for(predicate, timeout=20.0, what="condition"):
    """``predicate()``'s first true value, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def _pythonpath() -> str:
    parts = [str(ROOT / "tests"), str(ROOT), str(ROOT / "clients" / "cli")]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)


@pytest.fixture
def short_tmp(tmp_path_factory) -> Path:
    """A short temp dir: Unix socket paths must stay under ~100 bytes."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="lofid-", dir="/tmp"))
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.fixture
def make_daemon(short_tmp):
    """Factory: make_daemon(**flags) starts a lofid; all are stopped at the end."""
    daemons: list[Daemon] = []

    def factory(start: bool = True, env: dict | None = None, **flags) -> Daemon:
        flags.setdefault("model_dir", make_fake_model(short_tmp / "model"))
        d = Daemon(short_tmp, env=env, **flags)
        daemons.append(d)
        return d.start() if start else d

    yield factory
    for d in daemons:
        d.stop()


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    """A running lofid with the scripted engine and a placeholder model dir."""
    return make_daemon()
