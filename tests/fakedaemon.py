"""A hostile stand-in for lofid: it listens on a socket and answers like a daemon, with a
track path of its choosing. ``main(SOCKET, PATH, CACHE_DIR)`` (or ``python tests/fakedaemon.py
SOCKET PATH [CACHE_DIR]``): every ``generate`` is a cache hit and every ``track`` is complete,
both with ``path`` = PATH; ``status`` reports CACHE_DIR (if given) as the track cache (``settings.cache_dir``). It
calls ``ready`` (prints ``listening``) once it listens, and serves until killed."""

from __future__ import annotations

import os
import socket
import sys
import threading

import msgpack

TRACK_ID = "0123456789abcdef"


def answer(method: str, path: str, cache_dir: str | None):
    if method == "status":
        status = {"version": "6.6.6", "protocol": 1, "pid": os.getpid(), "uptime_sec": 1.0, "queue": [],
                  "model": {"state": "ready", "variant": "int8"}, "worker": {"pid": None, "restarts": 0}}
        return {**status, "settings": {"cache_dir": cache_dir}} if cache_dir else status
    if method == "generate":
        return {"track_id": TRACK_ID, "seed": 1, "status": "complete", "position": 0, "cached": True, "path": path}
    if method == "track":
        return {"track_id": TRACK_ID, "status": "complete", "path": path, "prompt": "x", "seed": 1,
                "duration_sec": 5.0}
    return {"ok": True}


def serve(conn: socket.socket, path: str, cache_dir: str | None) -> None:
    unpacker = msgpack.Unpacker(raw=False)
    with conn:
        while data := conn.recv(65536):
            unpacker.feed(data)
            for msg in unpacker:
                if isinstance(msg, list) and len(msg) == 4 and msg[0] == 0:
                    conn.sendall(msgpack.packb([1, msg[1], None, answer(msg[2], path, cache_dir)]))


def main(sock_path: str, path: str, cache_dir: str | None, ready=lambda: print("listening", flush=True)) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    os.chmod(sock_path, 0o777)  # anyone may connect: it wants to be found
    server.listen(16)
    ready()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn, path, cache_dir), daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
