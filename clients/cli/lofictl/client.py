"""A small synchronous msgpack-rpc client for the lofid socket (used by lofictl and tests)."""

from __future__ import annotations

import collections
import itertools
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lofid import rpc
from lofid.errors import LofiError


class Disconnected(ConnectionError):
    """The daemon closed the connection."""


class Client:
    def __init__(self, path: str | Path, timeout: float | None = 30.0) -> None:
        """``timeout``: the default wait for responses and notifications (None = forever)."""
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._connect(timeout)
        self.timeout = timeout
        self.decoder = rpc.Decoder(64 << 20)
        self.notifications: collections.deque[tuple[str, dict]] = collections.deque()
        self._responses: dict[int, rpc.Response] = {}
        self._ids = itertools.count(1)

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
        msgid = next(self._ids)
        self.sock.sendall(rpc.request(msgid, method, [] if arg is None else [arg]))
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
