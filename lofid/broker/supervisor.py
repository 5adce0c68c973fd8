"""The worker process: spawned lazily, talked to over a Pipe, watched, restarted.

One request at a time goes to the worker (``call``); the worker answers with any
number of intermediate events (progress, model state, download progress) and then
exactly one ``done`` or ``error``. A reader thread turns the blocking pipe into an
asyncio queue, so the event loop never blocks on the worker. If the worker dies or
stays silent past ``worker_stall_sec``, the call fails with MODEL_INFERENCE_FAILED
and the next call starts a fresh worker after a capped back-off.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lofid import errors, paths
from lofid.config import Settings
from lofid.errors import LofiError

log = logging.getLogger(__name__)

_EOF = {"ev": "eof"}
BACKOFF_CAP_SEC = 10.0
STOP_BUDGET_SEC = 6.0


class StopRung(enum.Enum):
    """How far the stop ladder had to go."""

    NOT_RUNNING = "not_running"
    ASKED = "asked"
    TERMINATED = "terminated"
    KILLED = "killed"


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "the worker stopped responding"
    if exitcode < 0:
        sig = -exitcode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        text = f"the worker was killed by signal {sig} ({name})"
        return text + ", likely out of memory" if sig == signal.SIGKILL else text
    return f"the worker exited with status {exitcode}"


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.restarts = 0  # workers started after the first one
        self._failures = 0  # consecutive failed calls since the last success
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn = None
        self._events: asyncio.Queue | None = None
        self._started_once = False
        self._writes: Path | None = None  # the file the call in progress has the worker write

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    # -- lifecycle -------------------------------------------------------------

    def _idle_worker_alive(self) -> bool:
        """Alive and its pipe still open. A worker killed a moment ago may not be reaped yet,
        but the reader thread has already queued EOF: then it counts as dead."""
        if self._process is None or not self._process.is_alive():
            return False
        while not self._events.empty():
            ev = self._events.get_nowait()
            if ev is _EOF:
                _signal(self._process.pid, signal.SIGKILL)  # make sure: it is on its way out anyway
                return False
            log.warning("dropping a stale %r message from the worker", ev.get("ev"))
        return True

    async def _ensure_started(self) -> None:
        if self._idle_worker_alive():
            return
        self._cleanup()
        if self._failures > 0:
            delay = min(BACKOFF_CAP_SEC, 0.25 * 2 ** (self._failures - 1))
            log.info("restarting the worker in %.2f s (%d failure(s) in a row)", delay, self._failures)
            await asyncio.sleep(delay)
        from lofid.worker import main as worker_main  # the module only; its imports stay in the child

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(target=worker_main.run, args=(child, self.settings), name="lofid-worker", daemon=True)
        process.start()
        child.close()
        loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()
        threading.Thread(target=self._read_pipe, args=(parent, loop, self._events), daemon=True,
                         name="lofid-worker-reader").start()
        self._process, self._conn = process, parent
        if self._started_once:
            self.restarts += 1
        self._started_once = True
        log.info("worker started (pid %d)", process.pid)

    @staticmethod
    def _read_pipe(conn, loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = _EOF
            except Exception as e:  # an unpicklable message: report it, keep reading
                log.error("unreadable message from the worker: %r", e)
                continue
            try:
                loop.call_soon_threadsafe(events.put_nowait, msg)
            except RuntimeError:  # loop closed
                return
            if msg is _EOF:
                return

    def _cleanup(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            self._process.join(timeout=0)
            if self._process.exitcode is not None:
                self._remove_temp_file(self._process.pid)
                self._process.close()
        self._process = self._conn = None

    def _remove_temp_file(self, pid: int) -> None:
        """A worker killed while writing leaves its temporary file behind; nobody will finish it."""
        if self._writes is None:
            return
        writes, self._writes = self._writes, None
        try:
            for name in paths.remove_temps(writes, pid):
                log.info("removed %s, left by the dead worker", name)
        except OSError as e:
            log.warning("cannot remove the dead worker's temporary file: %s", e)

    async def _reap(self, timeout: float = 2.0) -> int | None:
        process = self._process
        deadline = time.monotonic() + timeout
        while process is not None and process.exitcode is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return process.exitcode if process is not None else None

    async def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            _signal(self._process.pid, signal.SIGKILL)
            await self._reap()
        self._cleanup()

    # -- calls -----------------------------------------------------------------

    async def call(self, msg: dict[str, Any], on_event: Callable[[dict], None], writes: Path | None = None) -> dict:
        """Send one request to the worker; pass intermediate events to ``on_event``;
        return the ``done`` payload or raise the worker's LofiError. ``writes``: the file
        the request has the worker write, whose temporary copy is removed if the worker
        dies before it is renamed."""
        await self._ensure_started()
        self._writes = writes
        events = self._events
        try:
            self._conn.send(msg)
        except (OSError, ValueError):
            pass  # the worker is gone; the reader thread reports EOF below
        stall = self.settings.worker_stall_sec
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=stall)
            except TimeoutError:
                self._failures += 1
                log.error("the worker sent nothing for %.1f s; killing it", stall)
                await self._kill()
                raise LofiError(errors.MODEL_INFERENCE_FAILED,
                                f"worker stopped responding (nothing for {stall:g} s); it was restarted") from None
            kind = ev.get("ev")
            if kind == "eof":
                self._failures += 1
                exitcode = await self._reap()
                why = describe_exit(exitcode)
                log.error("%s during %s", why, msg.get("op"))
                self._cleanup()
                raise LofiError(errors.MODEL_INFERENCE_FAILED, why, exitcode=exitcode)
            if kind == "done":
                self._failures, self._writes = 0, None
                return ev.get("result") or {}
            if kind == "error":
                self._writes = None
                raise LofiError.from_dict(ev.get("error") or {})
            try:
                on_event(ev)
            except Exception:
                log.exception("event handler failed on %r", kind)

    async def stop(self) -> StopRung:
        """Ask, then SIGTERM, then SIGKILL; each rung waits a share of the budget."""
        process = self._process
        if process is None or not process.is_alive():
            self._cleanup()
            return StopRung.NOT_RUNNING
        rung = StopRung.ASKED
        try:
            self._conn.send({"op": "stop"})
        except (OSError, ValueError):
            pass
        if await self._reap(STOP_BUDGET_SEC / 2) is None:
            rung = StopRung.TERMINATED
            _signal(process.pid, signal.SIGTERM)
            if await self._reap(STOP_BUDGET_SEC / 2) is None:
                rung = StopRung.KILLED
                _signal(process.pid, signal.SIGKILL)
                if await self._reap(2.0) is None:
                    log.warning("worker %d did not exit after SIGKILL", process.pid)
        log.info("worker stopped (%s)", rung.value)
        self._cleanup()
        return rung


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # already gone
