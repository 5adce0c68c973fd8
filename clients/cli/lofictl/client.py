"""A small synchronous msgpack-rpc client for the lofid socket (used by lofictl and tests)."""

from __future__ import annotations

import collections
import itertools
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lofid import errors, rpc
from lofid.errors import LofiError


class Disconnected(ConnectionError):
    """The daemon closed the connection."""


class UntrustedDaemon(Exception):
    """What answers on the socket is not this user's lofid, or it said something no lofid says
    (lofictl: UNTRUSTED_DAEMON)."""


def check_peer(sock: socket.socket, path: str) -> None:
    """Refuse a socket served by another user (SO_PEERCRED / LOCAL_PEERCRED): whoever could
    plant a socket where lofid's should be must not get to answer for it."""
    from lofid.broker.server import peer_uid

    uid = peer_uid(sock)
    if uid is not None and uid != os.getuid():
        raise UntrustedDaemon(f"{path} is served by uid {uid}, not by you (uid {os.getuid()}); "
                              "refusing to talk to it")


def check_track_path(path: object, cache_dir: str | None = None) -> Path:
    """A track path the daemon gave, accepted only as a normalized absolute path to a ``.wav``
    (inside ``cache_dir`` when the daemon said which): never something a player could take for
    an option, a URL or a playlist."""
    ok = (isinstance(path, str) and os.path.isabs(path) and os.path.normpath(path) == path
          and path.lower().endswith(".wav") and not any(ch in path for ch in "\0\n\r"))
    if ok and cache_dir:
        ok = os.path.dirname(path) == os.path.normpath(cache_dir)
    if not ok:
        where = f" in its track cache {cache_dir}" if cache_dir else ""
        raise UntrustedDaemon(f"lofid gave {str(path)[:200]!r} as the track's file, which is not an absolute "
                              f"path to a .wav{where}; refusing to play it")
    return Path(path)


class Client:
    def __init__(self, path: str | Path, timeout: float | None = 30.0) -> None:
        """``timeout``: the default wait for responses and notifications (None = forever)."""
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self._connect(timeout)
            check_peer(self.sock, self.path)
        except BaseException:
            self.sock.close()
            raise
        self.timeout = timeout
        self.decoder = rpc.Decoder(64 << 20)
        self.notifications: collections.deque[tuple[str, dict]] = collections.deque()
        self._responses: dict[int, rpc.Response] = {}
        self._ids = itertools.count(1)
        self._cache_dir: str | None = None  # the daemon's, once asked

    def _connect(self, timeout: float | None) -> None:
        deadline = time.monotonic() + (timeout if timeout is not None else 30.0)
        while True:
            try:
                self.sock.connect(self.path)
                return
            except BlockingIOError:  # a Unix socket's listen backlog is full for a moment: wait
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> float:
        timeout = self.timeout if timeout is None else timeout
        return float("inf") if timeout is None else time.monotonic() + timeout

    def _read(self, timeout: float) -> None:
        self.sock.settimeout(None if timeout == float("inf") else max(0.001, timeout))
        data = self.sock.recv(65536)
        if not data:
            raise Disconnected("the daemon closed the connection")
        for value in self.decoder.feed(data):
            msg = rpc.parse(value)
            if isinstance(msg, rpc.Response):
                self._responses[msg.msgid] = msg
            elif isinstance(msg, rpc.Notification):
                self.notifications.append((msg.method, msg.params[0] if msg.params else {}))

    def send(self, method: str, arg: dict | None = None) -> int:
        """Send a request; INVALID_PARAMS where msgpack cannot carry ``arg`` (an integer past
        64 bits, a string that is not Unicode text)."""
        msgid = next(self._ids)
        try:
            frame = rpc.request(msgid, method, [] if arg is None else [arg])
        except UnicodeEncodeError:
            raise LofiError(errors.INVALID_PARAMS, f"cannot send {method}: an argument is not UTF-8 text") from None
        except (OverflowError, TypeError, ValueError) as e:
            raise LofiError(errors.INVALID_PARAMS, f"cannot send {method}: {e}") from None
        self.sock.sendall(frame)
        return msgid

    def response(self, msgid: int, timeout: float | None = None) -> Any:
        deadline = self._deadline(timeout)
        while msgid not in self._responses:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no response to request {msgid}")
            try:
                self._read(left)
            except TimeoutError:
                raise TimeoutError(f"no response to request {msgid}") from None
        msg = self._responses.pop(msgid)
        if msg.error is not None:
            raise LofiError.from_dict(msg.error if isinstance(msg.error, dict) else {"message": str(msg.error)})
        return msg.result

    def call(self, method: str, arg: dict | None = None, timeout: float | None = None) -> Any:
        return self.response(self.send(method, arg), timeout)

    def track_path(self, path: object) -> Path:
        """``check_track_path`` against the daemon's track cache (asked once: ``status``'s
        ``settings.cache_dir``)."""
        if self._cache_dir is None:
            settings = self.call("status").get("settings")
            self._cache_dir = str(settings.get("cache_dir") or "") if isinstance(settings, dict) else ""
        return check_track_path(path, self._cache_dir)

    def notification(self, timeout: float | None = None,
                     match: Callable[[str, dict], bool] | None = None) -> tuple[str, dict]:
        """The next notification (that ``match`` accepts); earlier non-matching ones are kept."""
        deadline = self._deadline(timeout)
        while True:
            for i, (method, payload) in enumerate(self.notifications):
                if match is None or match(method, payload):
                    del self.notifications[i]
                    return method, payload
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no notification")
            try:
                self._read(left)
            except TimeoutError:
                raise TimeoutError("no notification") from None

    def wait_track(self, track_id: str, timeout: float | None = None,
                   on_event: Callable[[str, dict], None] | None = None) -> dict:
        """Wait for the track's completion (returns the record) or error (raises LofiError)."""
        while True:
            method, payload = self.notification(timeout, match=lambda m, p: p.get("track_id") == track_id)
            if on_event is not None:
                on_event(method, payload)
            if method == "generation_complete":
                return payload
            if method == "generation_error":
                raise LofiError.from_dict(payload)
