"""The Unix-socket server: connections, framing, peer checks, dispatch.

Each connection decodes its own byte stream; whatever a client sends can cost that
client an error response or its connection, never the daemon or another client.
Requests are handed to ``handler.handle(conn, method, params)``; its ``LofiError``
becomes the rpc error map, anything else is logged and answered as INTERNAL.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import stat
import struct
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from lofid import errors, paths, rpc
from lofid.errors import LofiError

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
OUTPUT_LIMIT = 4 * 1024 * 1024  # bytes queued for a client that does not read; beyond: dropped
MAX_CONNECTIONS = 256
MAX_PER_PEER = 64  # connections one process may hold; its next one closes its least recently used idle one
NEAR_LIMIT = MAX_CONNECTIONS * 7 // 8  # from here on a newcomer closes connections idle for idle_close_sec


class Handler(Protocol):
    async def handle(self, conn: Connection, method: str, params: list) -> Any: ...

    def closed(self, conn: Connection) -> None: ...

    def expects(self, conn: Connection) -> bool:
        """Whether notifications are still due to ``conn`` (a job or download it waits for, a
        subscription): such a connection is not idle, however long ago it asked."""
        ...


def peer_cred(sock: socket.socket) -> tuple[int | None, int | None]:
    """(pid, uid) of the process on the other end: Linux SO_PEERCRED, macOS LOCAL_PEERPID and
    LOCAL_PEERCRED; None where the platform cannot tell."""
    if hasattr(socket, "SO_PEERCRED"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        return pid, uid
    if sys.platform == "darwin":
        sol_local, local_peercred, local_peerpid = 0, 1, 2  # <sys/un.h>; LOCAL_PEERCRED gives a struct xucred
        creds = sock.getsockopt(sol_local, local_peercred, struct.calcsize("2I"))
        uid = struct.unpack("2I", creds[: struct.calcsize("2I")])[1]
        pid = struct.unpack("i", sock.getsockopt(sol_local, local_peerpid, struct.calcsize("i")))[0]
        return pid, uid
    return None, None


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process on the other end (SO_PEERCRED, LOCAL_PEERCRED)."""
    return peer_cred(sock)[1]


class Connection:
    _ids = itertools.count(1)

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame_bytes: int,
                 peer_pid: int | None = None) -> None:
        self.id = next(self._ids)
        self.reader, self.writer = reader, writer
        self.decoder = rpc.Decoder(max_frame_bytes)
        self.closed = False
        self.peer_pid = peer_pid
        self.last_request = time.monotonic()  # or the connect, before the first request

    def __repr__(self) -> str:
        return f"<client {self.id}>"

    def send(self, data: bytes) -> None:
        """Queue bytes for the client; a client that stopped reading is dropped."""
        if self.closed:
            return
        transport = self.writer.transport
        if transport.get_write_buffer_size() + len(data) > OUTPUT_LIMIT:
            log.warning("%r does not read its messages; dropping it", self)
            self.abort()
            return
        self.writer.write(data)

    async def drain(self) -> None:
        """Wait until the client has read what was sent (down to the transport's low mark)."""
        await self.writer.drain()

    def notify(self, method: str, payload: dict) -> None:
        self.send(rpc.notification(method, [payload]))

    def reply(self, msgid: int | None, error: dict | None, result: Any = None) -> None:
        self.send(rpc.response(msgid, error, result))

    def abort(self) -> None:
        self.closed = True
        self.writer.transport.abort()


class Server:
    def __init__(self, handler: Handler, socket_path: Path, max_frame_bytes: int = rpc.MAX_FRAME_BYTES,
                 frame_timeout_sec: float = 10.0, idle_close_sec: float = 30.0) -> None:
        self.handler = handler
        self.socket_path = socket_path
        self.max_frame_bytes = max_frame_bytes
        self.frame_timeout_sec = frame_timeout_sec  # a frame started must be finished within this
        self.idle_close_sec = idle_close_sec  # near the limit, connections without a request this long go
        self.connections: set[Connection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._owns_path = False

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on ``sock`` (inherited, e.g. from systemd) or bind the socket path."""
        if sock is None:
            sock = self._bind()
            self._owns_path = True
        self._server = await asyncio.start_unix_server(self._on_client, sock=sock, limit=READ_CHUNK)

    def _bind(self) -> socket.socket:
        path = self.socket_path
        paths.socket_dir(path.parent)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:  # the lock is ours, so whatever is here belongs to a dead daemon
            if not stat.S_ISSOCK(st.st_mode):
                raise RuntimeError(f"{path} exists and is not a socket; refusing to remove it")
            log.info("replacing the stale socket of a dead daemon at %s", path)
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(MAX_CONNECTIONS)
        return sock

    def stop_listening(self) -> None:
        """Accept no new clients; the connected ones stay until ``close``."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Close every connection (what was sent to it is flushed first) and the socket."""
        self.stop_listening()
        for conn in list(self.connections):
            try:
                conn.writer.close()
            except Exception:
                pass
        if self._owns_path:
            self.socket_path.unlink(missing_ok=True)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            pid, uid = peer_cred(sock) if sock is not None else (None, None)
        except OSError as e:
            log.warning("cannot tell who a client is (%s); refusing it", e)
            writer.transport.abort()
            return
        if uid is not None and uid != os.getuid():
            log.warning("refusing a client of uid %d", uid)
            writer.transport.abort()
            return
        conn = Connection(reader, writer, self.max_frame_bytes, peer_pid=pid)
        if not self._make_room(conn):
            writer.transport.abort()
            return
        self.connections.add(conn)
        log.debug("%r connected", conn)
        try:
            await self._serve(conn)
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("%r failed", conn)
        finally:
            self.connections.discard(conn)
            conn.closed = True
            try:
                self.handler.closed(conn)
            finally:
                writer.transport.abort()
            log.debug("%r disconnected", conn)

    def _make_room(self, newcomer: Connection) -> bool:
        """Bound the connections: a process at MAX_PER_PEER loses its least recently used idle
        one; from NEAR_LIMIT on, connections idle for ``idle_close_sec`` are closed, the
        longest idle first. Idle: no request, and nothing due to it (``Handler.expects``: a
        connection that waits for a track, streams one or is subscribed is never closed
        here). -> whether the newcomer fits; why not is logged."""
        if newcomer.peer_pid is not None:
            mine = [c for c in self.connections if c.peer_pid == newcomer.peer_pid]
            if len(mine) >= MAX_PER_PEER:
                idle = [c for c in mine if not self.handler.expects(c)]
                if not idle:
                    log.warning("process %d holds %d connections, each waiting for something; refusing its next",
                                newcomer.peer_pid, len(mine))
                    return False
                oldest = min(idle, key=lambda c: c.last_request)
                log.warning("process %d holds %d connections; closing its least recently used one, %r",
                            newcomer.peer_pid, len(mine), oldest)
                self._drop(oldest)
        if len(self.connections) >= NEAR_LIMIT:
            now = time.monotonic()
            idle = sorted((c for c in self.connections
                           if now - c.last_request >= self.idle_close_sec and not self.handler.expects(c)),
                          key=lambda c: c.last_request)
            for c in idle[:len(self.connections) - NEAR_LIMIT + 1]:
                log.info("closing %r: no request for %.0f s and %d clients connected", c, now - c.last_request,
                         len(self.connections))
                self._drop(c)
        if len(self.connections) >= MAX_CONNECTIONS:
            log.warning("too many clients (%d), none of them idle; refusing one", MAX_CONNECTIONS)
            return False
        return True

    def _drop(self, conn: Connection) -> None:
        self.connections.discard(conn)  # its own task sees the connection end and cleans up
        conn.abort()

    async def _serve(self, conn: Connection) -> None:
        deadline = 0.0  # when the frame being received must be complete (a trickle does not extend it)
        while not conn.closed:
            try:
                if conn.decoder.pending:
                    left = max(0.0, deadline - time.monotonic())
                    data = await asyncio.wait_for(conn.reader.read(READ_CHUNK), left)
                else:
                    data = await conn.reader.read(READ_CHUNK)
            except TimeoutError:
                log.warning("%r stalled mid-frame; dropping it", conn)
                return
            if not data:
                return
            was_pending = conn.decoder.pending
            try:
                values = conn.decoder.feed(data)
            except rpc.FrameError as e:
                conn.reply(None, LofiError(errors.INVALID_PARAMS, f"bad frame: {e}; closing").to_dict())
                await _drain(conn)
                return
            new_frame = conn.decoder.pending and (values or not was_pending)  # a frame began in this chunk
            for value in values:
                await self._on_value(conn, value)
            if new_frame:
                deadline = time.monotonic() + self.frame_timeout_sec

    async def _on_value(self, conn: Connection, value: Any) -> None:
        try:
            msg = rpc.parse(value)
        except rpc.MessageError as e:
            conn.reply(e.msgid, LofiError(errors.INVALID_PARAMS, str(e)).to_dict())
            return
        if not isinstance(msg, rpc.Request):
            return  # clients have nothing to tell us unasked: notifications and responses are ignored
        conn.last_request = time.monotonic()
        try:
            result = await self.handler.handle(conn, msg.method, msg.params)
        except LofiError as e:
            conn.reply(msg.msgid, e.to_dict())
        except Exception as e:
            log.exception("%s failed", msg.method)
            conn.reply(msg.msgid, LofiError(errors.INTERNAL, f"{type(e).__name__}: {e}").to_dict())
        else:
            conn.reply(msg.msgid, None, result)


async def _drain(conn: Connection) -> None:
    try:
        await asyncio.wait_for(conn.writer.drain(), 1.0)
    except Exception:
        pass
