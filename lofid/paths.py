"""Where lofid keeps things; the private folders and temporary files it makes; the socket
directory and the lock file it owns."""

from __future__ import annotations

import fcntl
import glob
import os
import re
import secrets
import stat
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


def make_dirs(path: Path) -> Path:
    """Create ``path`` and its missing parents, each 0700 whatever the umask; folders that
    exist already are left as they are."""
    path = Path(path)
    missing = []
    p = path
    while not p.is_dir() and p.parent != p:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue
        os.chmod(d, 0o700)  # a umask such as 0277 takes bits mkdir's mode cannot give back
    return path


class UnsafeDir(PermissionError):
    """A folder lofid would write in or trust is another user's, or others can write in it."""


def check_own_dir(path: Path, what: str) -> None:
    """Raise UnsafeDir unless ``path`` belongs to this user and neither its group nor others
    can write in it (they could plant or swap files there); the message says how to fix it."""
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise UnsafeDir(f"the {what} {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}): "
                        f"use a folder of your own")
    if st.st_mode & 0o022:
        raise UnsafeDir(f"the {what} {path} can be written by other users (mode {stat.S_IMODE(st.st_mode):04o}): "
                        f"run `chmod go-w {path}`")


def check_trusted_parents(path: Path) -> None:
    """Raise UnsafeDir unless every folder above ``path`` belongs to this user or root and no one
    else can rename what is in it (not writable by group or others, or sticky like /tmp)."""
    for parent in Path(path).absolute().parents:
        st = os.stat(parent)
        if st.st_uid not in (0, os.getuid()):
            raise UnsafeDir(f"{parent}, above {path}, belongs to uid {st.st_uid}: another user could replace "
                            f"what lofid keeps there; choose another place (--socket)")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafeDir(f"{parent}, above {path}, can be written by other users (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}); run `chmod go-w {parent}` or choose another place")


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents, 0700) and make it 0700; refuse one owned by someone else."""
    make_dirs(path)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise UnsafeDir(f"{path} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def socket_dir(path: Path) -> Path:
    """The socket's folder: private (``private_dir``), below folders no other user controls
    (``check_trusted_parents``): the per-user fallback under /tmp is checked all the way up."""
    private_dir(path)
    check_trusted_parents(path)
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


def open_private_log(path: Path):
    """Open a log file for appending, 0600 whatever the umask (a log holds prompts); never
    through a symlink. -> a binary file object."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # also one an older version left readable
    return os.fdopen(fd, "ab")


TEMP_RANDOM_HEX = 8  # hex digits of a temporary name's random part


def create_temp(final: Path) -> tuple[int, Path]:
    """Create a new temporary file beside ``final`` for lofid alone: ``.<name>.<pid>.<random>.tmp``
    (hidden; the pid tells whose leftover it is), opened with O_EXCL and O_NOFOLLOW, mode
    0600. A name that exists, a planted symlink included, is never opened: another is drawn.
    This is the one way lofid names and creates a temporary file. -> (an fd open for
    writing, the path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(TEMP_RANDOM_HEX // 2)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
        os.fchmod(fd, 0o600)  # whatever the umask
        return fd, tmp
    raise FileExistsError(f"no free temporary name beside {final}")


def temp_name_re(final: str) -> re.Pattern:
    """The temporary names ``create_temp`` gives a file whose final name matches ``final``
    (a regular expression: ``re.escape`` of one name, or a pattern), the writer's pid in
    group ``pid``; also the older form without the random part. Use with fullmatch."""
    return re.compile(rf"\.(?:{final})\.(?P<pid>\d+)(?:\.[0-9a-f]{{{TEMP_RANDOM_HEX}}})?\.tmp")


def remove_temps(final: Path, pid: int) -> list[str]:
    """Remove the temporary files process ``pid`` created for ``final`` (a writer killed
    before its rename); never anything else, nor what a symlink points to. -> the names."""
    pattern = temp_name_re(re.escape(final.name))
    removed = []
    for p in final.parent.glob(f".{glob.escape(final.name)}.{pid}.*tmp"):
        m = pattern.fullmatch(p.name)
        if m is None or int(m["pid"]) != pid:
            continue
        try:
            p.unlink()
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            continue
        removed.append(p.name)
    return removed


def write_atomic(final: Path, data: bytes) -> None:
    """Write a private (0600) file: a new temporary file (``create_temp``), fsync, rename.
    ``final`` is either absent, the old file or all of ``data``. The folder must be this
    user's and closed to others (``check_own_dir``)."""
    check_own_dir(final.parent, "folder")
    fd, tmp = create_temp(final)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
