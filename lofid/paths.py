"""Where lofid keeps things, and the socket directory and lock file it owns."""

from __future__ import annotations

import fcntl
import os
import warnings
from pathlib import Path

import platformdirs

APP = "lofid"


def default_socket() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        base = Path(runtime) / APP
    else:  # platformdirs warns and falls back to a per-user folder under /tmp
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = Path(platformdirs.user_runtime_dir(APP))
    return base / "lofid.sock"


def default_config_file() -> Path:
    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP)) / "tracks"


def default_state_dir() -> Path:
    return Path(platformdirs.user_state_dir(APP))


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700; refuse one owned by someone else."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


class LockHeld(Exception):
    """Another lofid holds the lock."""


def acquire_lock(socket_path: Path) -> int:
    """Take an exclusive lock next to the socket; the fd must stay open while we run."""
    lock_path = socket_path.with_name(socket_path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            pid = os.pread(fd, 32, 0).decode().strip()
        finally:
            os.close(fd)
        raise LockHeld(f"another lofid (pid {pid or '?'}) is already serving {socket_path}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def tmp_path(final: Path, pid: int | None = None) -> Path:
    """The temporary name ``final`` is written under before its rename: ``.<name>.<pid>.tmp``
    (hidden, and tied to the writing process so that its leftovers can be found)."""
    return final.with_name(f".{final.name}.{os.getpid() if pid is None else pid}.tmp")


def is_tmp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def write_atomic(final: Path, data: bytes) -> None:
    """Write, fsync, rename: ``final`` is either absent, the old file or all of ``data``."""
    tmp = tmp_path(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
