"""A process that holds many connections to lofid, for the connection-limit tests.

``Hog(socket, n)`` runs ``python tests/hog.py SOCKET N [request]``: it opens N connections
(each sends one ``status`` and reads its answer when ``request`` is given), prints
``opened N``, then answers each line on stdin with the number of its connections the
daemon has not closed; it exits when stdin closes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack


class Hog:
    """Another process holding ``n`` connections to the daemon (tests/hog.py)."""

    def __init__(self, sock: Path, n: int, request: bool = False) -> None:
        argv = [sys.executable, __file__, str(sock), str(n)]
        self.proc = subprocess.Popen(argv + (["request"] if request else []), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == f"opened {n}"

    def open_count(self) -> int:
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def still_open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def connect(s: socket.socket, path: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            return s.connect(path)
        except BlockingIOError:  # the listen backlog is full for a moment
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def main(path: str, n: int, request: bool) -> None:
    conns = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            connect(s, path)
            if request:
                s.sendall(msgpack.packb([0, 1, "status", []]))
                s.recv(65536)  # its answer, or b"" when the daemon refused it
        except OSError:
            pass
        conns.append(s)
    print(f"opened {n}", flush=True)
    while sys.stdin.readline():
        print(sum(still_open(s) for s in conns), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["request"])
