"""The running track's audio chunks, forwarded to every connection that streams it.

The worker sends each chunk as it is made. The broker keeps the running track's chunks
(a 120 s track is ~7.7 MB), packed once as ``audio_chunk`` notifications, so that a
client that joins late first gets every chunk from 0. Each streaming connection has a
pump task that writes the chunks in order, waiting for the client to read before it
writes more, so a slow reader costs nobody else anything; one that reads nothing for
``STALL_SEC`` is dropped (as a client that does not read its messages always is). The
track's last word for a streaming connection (``generation_complete`` or
``generation_error``) goes through the same pump, after the last chunk. When the track
ends, the broker drops its chunks; a pump still writing holds them until it is done.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from lofid import rpc

log = logging.getLogger(__name__)

STALL_SEC = 30.0


class Conn(Protocol):
    closed: bool

    def send(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def abort(self) -> None: ...


class TrackStream:
    """The chunks of one track so far, and the pumps that send them."""

    def __init__(self, track_id: str) -> None:
        self.track_id = track_id
        self.frames: list[bytes] = []        # packed audio_chunk notifications, in seq order
        self.size = 0                        # bytes of PCM so far
        self.ended = False
        self._final: dict[Conn, bytes] = {}   # the last notification per streaming connection
        self._pumps: dict[Conn, asyncio.Task] = {}
        self._more = asyncio.Condition()

    def __len__(self) -> int:
        return len(self.frames)

    def add(self, chunk: dict) -> None:
        """A chunk from the worker: ``seq``, ``offset``, ``sample_rate``, ``pcm``, ``last``
        (and ``start_after_sec`` on chunk 0)."""
        if chunk["seq"] != len(self.frames):
            log.warning("track %s: chunk %s out of order (expected %d); dropped", self.track_id,
                        chunk["seq"], len(self.frames))
            return
        self.frames.append(rpc.notification("audio_chunk", [{"track_id": self.track_id, **chunk}]))
        self.size += len(chunk["pcm"])
        self._wake()

    def join(self, conn: Conn) -> None:
        """``conn`` streams this track from chunk 0 (once, however often it asks)."""
        if conn not in self._pumps and not self.ended:
            self._pumps[conn] = asyncio.create_task(self._pump(conn))

    def leave(self, conn: Conn) -> None:
        task = self._pumps.pop(conn, None)
        self._final.pop(conn, None)
        if task is not None:
            task.cancel()

    def streaming(self, conn: Conn) -> bool:
        return conn in self._pumps

    def end(self, finals: dict[Conn, bytes]) -> None:
        """The track is complete or failed: each streaming connection gets its final
        notification from ``finals`` after the chunks it has not had yet."""
        self.ended = True
        self._final.update({c: f for c, f in finals.items() if c in self._pumps})
        self._wake()

    def _wake(self) -> None:
        async def notify() -> None:
            async with self._more:
                self._more.notify_all()
        if self._pumps:
            asyncio.get_running_loop().create_task(notify())

    async def _pump(self, conn: Conn) -> None:
        sent = 0
        try:
            while not conn.closed:
                while sent < len(self.frames) and not conn.closed:
                    conn.send(self.frames[sent])
                    sent += 1
                    await asyncio.wait_for(conn.drain(), STALL_SEC)
                if self.ended and sent == len(self.frames):
                    final = self._final.get(conn)
                    if final is not None:
                        conn.send(final)
                    return
                async with self._more:
                    await self._more.wait_for(lambda sent=sent: self.ended or sent < len(self.frames))
        except TimeoutError:
            log.warning("client reads no audio for %g s; dropping it", STALL_SEC)
            conn.abort()
        except (ConnectionError, OSError):
            pass
        finally:
            self._pumps.pop(conn, None)
            self._final.pop(conn, None)
