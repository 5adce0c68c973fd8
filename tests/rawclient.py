"""Raw socket helpers for protocol tests: bytes in, decoded msgpack values out."""

from __future__ import annotations

import socket
import time

import msgpack


class Raw:
    def __init__(self, path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    def send(self, data: bytes) -> None:
        """Send; if the daemon already closed the connection (as it may, mid-send, for an
        oversized or bad frame), remember it for ``closed`` instead of raising."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.peer_closed = True

    def send_obj(self, obj) -> None:
        self.send(msgpack.packb(obj, use_bin_type=True))

    peer_closed = False

    def recv_obj(self, timeout: float = 10.0):
        """The next decoded value; None when the daemon closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            for value in self.unpacker:
                return value
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                return None
            self.unpacker.feed(data)

    def response(self, msgid, timeout: float = 10.0):
        """The response to ``msgid`` (notifications before it are skipped)."""
        while True:
            value = self.recv_obj(timeout)
            if value is None or (value[0] == 1 and value[1] == msgid):
                return value

    def closed(self, timeout: float = 5.0) -> bool:
        """True if the daemon closes this connection within ``timeout``."""
        if self.peer_closed:
            return True
        try:
            while self.recv_obj(timeout) is not None:
                pass
            return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()
