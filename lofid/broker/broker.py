"""The broker: the rpc methods, the job runner and notification fan-out.

It owns the queue, the track cache and the supervisor, and never imports numpy or
onnxruntime: everything heavy happens in the worker process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import weakref
from typing import Any

import lofid
from lofid import errors, memory, models, rpc, variants
from lofid.broker import systemd
from lofid.broker.params import one_map, parse_generate
from lofid.broker.progress import PROGRESS_STEP, Progress
from lofid.broker.queue import Job, JobQueue
from lofid.broker.server import Connection
from lofid.broker.supervisor import Supervisor
from lofid.broker.tracks import Failures, TrackCache, check_track_id, now, track_id
from lofid.config import Settings
from lofid.errors import LofiError

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MB = 1_000_000  # cache_max_mb is in MB, as lofictl prints sizes


class Broker:
    def __init__(self, settings: Settings, sources: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.sources = sources or {}  # per setting, where its value came from (config.load_with_sources)
        self.cache = TrackCache(settings.cache_dir)
        self.failures = Failures()  # the last tracks that failed: `track` answers them
        self.queue = JobQueue()
        self.supervisor = Supervisor(settings)
        self.subscribers: set[Connection] = set()
        self.ended_streams: weakref.WeakSet = weakref.WeakSet()  # held by their pumps until they are done
        self.started = time.monotonic()
        self.model: dict[str, Any] = {"state": "locating", "variant": settings.variant, "model_version": None,
                                      "device": None, "provider": None}
        self.model_since = time.monotonic()  # when model["state"] last changed
        self.location: models.ModelLocation | None = None
        self.progress: Progress | None = None
        self.download_waiters: set[Connection] = set()
        self.download_variant: tuple[str, bool] | None = None  # requested (variant, force)
        self.downloading = False
        self.stopping = asyncio.Event()
        self.closing = False  # set once shutdown began: no new jobs
        self._wake = asyncio.Event()
        self._locating: asyncio.Task | None = None
        self._idle_watch: asyncio.Task | None = None
        self.last_activity = time.monotonic()  # of a request or a job, for idle_exit_sec
        self._status_text: str | None = None
        self._cache_lock = asyncio.Lock()  # one eviction or removal at a time

    # -- start / stop -------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.cache.prepare)
        self._locating = asyncio.create_task(self.locate())
        self._runner = asyncio.create_task(self.run())
        if self.settings.idle_exit_sec is not None:
            self._idle_watch = asyncio.create_task(self.exit_when_idle(self.settings.idle_exit_sec))

    async def locate(self) -> models.ModelLocation:
        s = self.settings
        loc = await asyncio.to_thread(models.locate, s.variant, s.model_dir, hash_cache_dir=s.state_dir)
        self.location = loc
        self.model.update(model_version=loc.model_version)
        if self.model["state"] in ("locating", "missing", "present"):
            self.set_model(state="missing" if loc.missing else "present")
        return loc

    def set_model(self, **fields: Any) -> None:
        """Update what status tells of the model, and when its state changed."""
        if fields.get("state", self.model["state"]) != self.model["state"]:
            self.model_since = time.monotonic()
        self.model.update(fields)

    async def settle_model_state(self) -> None:
        """After a worker call failed or a download ended: nothing downloads any more (the
        worker does one thing at a time; idle_exit_sec counts again), and a state the worker
        left midway (downloading, preparing, loading) becomes what the files on disk say."""
        self.downloading = False
        if self.model["state"] in ("downloading", "preparing", "loading"):
            self.set_model(state="locating")
            await self.locate()

    async def model_location(self) -> models.ModelLocation:
        if self.location is None:
            await asyncio.shield(self._locating)
        return self.location

    async def stop(self) -> None:
        """Fail the running and queued jobs (they are not resumed), then stop the worker."""
        self.closing = True
        running = self.queue.running
        self._runner.cancel()
        if self._idle_watch is not None:
            self._idle_watch.cancel()
        if running is not None:
            self.fail(running, LofiError(errors.INTERNAL, "the daemon shut down during this generation; "
                                         "it is not resumed: ask again", shutting_down=True))
        for job in self.queue.drain():
            self.fail(job, LofiError(errors.INTERNAL, "the daemon shut down before this track was generated",
                                     shutting_down=True))
        await self.supervisor.stop()

    # -- the runner ---------------------------------------------------------------

    def _kick(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            if self.download_variant is not None:
                variant, force = self.download_variant
                self.download_variant = None
                await self._run_download(variant, force)
                continue
            job = self.queue.start_next()
            if job is None:
                self._wake.clear()
                self.set_status("idle")
                await self._wake.wait()
                continue
            try:
                await self._run_job(job)
            finally:
                self.queue.finish()

    async def _run_job(self, job: Job) -> None:
        log.info("generating %s (%g s, seed %d): %r", job.track_id, job.duration_sec, job.seed, job.prompt[:80])
        self.progress = Progress()  # 0 % goes out with the first decoder step, after any model load
        self.set_status(self._generating_status())
        try:
            result = await self.supervisor.call({"op": "generate", "job": job.to_worker()},
                                                lambda ev: self.on_worker_event(ev, job), writes=job.wav_path)
            record = {"track_id": job.track_id, "prompt": job.prompt, "seed": job.seed,
                      "duration_sec": job.duration_sec, **self.sampling(), "created_at": now(), **result}
            record = await asyncio.to_thread(self.cache.put, record)
        except LofiError as e:
            e = self._load_failure(e)
            await self.settle_model_state()  # before anyone hears of the failure and asks status
            self.fail(job, e)
            if e.code == errors.MODEL_DOWNLOAD_FAILED:  # every job waiting for that model fails with it
                for other in self.queue.drain():
                    self.fail(other, e)
            elif e.code == errors.MODEL_NOT_FOUND:
                await self.locate()
            return
        finally:
            self.progress = None
        if self.location.missing:  # the worker downloaded the model for this job
            await self.locate()
        await self.enforce_cache_cap(keep=job.track_id)  # within the cap before anyone hears of it
        log.info("track %s complete in %.1f s", job.track_id, record.get("generation_time_sec", 0))
        self.fan_out(job, "generation_complete", record, final=True)

    def _load_failure(self, e: LofiError) -> LofiError:
        """A worker that died while it loaded the model failed the load (MODEL_LOAD_FAILED), not
        an inference; killed by SIGKILL it most likely ran out of memory: say what would fit."""
        died = e.code == errors.MODEL_INFERENCE_FAILED and e.data.get("exitcode") is not None
        if not died or self.model["state"] not in ("preparing", "loading"):
            return e
        s = self.settings
        if e.data["exitcode"] == -signal.SIGKILL:
            message = memory.out_of_memory_at_load(s.variant, s.device, s.worker_memory_mb, why=e.message)
        else:
            message = f"{e.message} while loading the {s.variant} model"
        return LofiError(errors.MODEL_LOAD_FAILED, message, **e.data)

    async def _run_download(self, variant: str, force: bool) -> None:
        waiters, self.download_waiters = self.download_waiters, set()
        self.downloading = True
        try:
            result = await self.supervisor.call({"op": "download", "variant": variant, "force": force},
                                                lambda ev: self.on_worker_event(ev, None, waiters))
        except LofiError as e:
            self._broadcast(waiters, "download_error", {**e.to_dict(), "code": errors.MODEL_DOWNLOAD_FAILED}
                            if e.code != errors.MODEL_DOWNLOAD_FAILED else e.to_dict())
        else:
            await self.settle_model_state()
            await self.locate()  # before telling anyone: the next generate must hash with the new version
            self._broadcast(waiters, "download_complete", {"repo": variants.REPO, **result})
        finally:
            await self.settle_model_state()
            if self.location is None or self.location.missing:
                await self.locate()

    def on_worker_event(self, ev: dict, job: Job | None, waiters: set | None = None) -> None:
        kind = ev.pop("ev")
        if kind == "progress" and job is not None and self.progress is not None:
            for step in self.progress.update(ev["tokens_generated"], ev["tokens_estimated"],
                                             bool(ev.get("decoded"))):
                self.fan_out(job, "generation_progress", {"track_id": job.track_id, **step})
                self.set_status(self._generating_status())
        elif kind == "audio" and job is not None:
            job.stream.add(ev)
        elif kind == "model":
            if ev["state"] == "preparing":
                self._broadcast(waiters if waiters is not None else job.waiters, "model_preparing",
                                {"variant": ev["variant"]})
                self.set_status(f"preparing the {ev['variant']} model (one-time)")
            if ev.get("variant", self.settings.variant) != self.settings.variant:
                return  # a download of another variant: status describes this daemon's model
            self.set_model(**ev)
            self.downloading = ev["state"] == "downloading"
        elif kind == "download_progress":
            if ev.get("percent") is not None:
                self.set_status(f"downloading the model {int(ev['percent']) // PROGRESS_STEP * PROGRESS_STEP}%")
            self._broadcast(waiters if waiters is not None else job.waiters, "download_progress", ev)

    # -- notifications ------------------------------------------------------------

    def _broadcast(self, conns: set, method: str, payload: dict) -> None:
        for conn in conns | self.subscribers:
            conn.notify(method, payload)

    def fan_out(self, job: Job, method: str, payload: dict, final: bool = False) -> None:
        """Tell those who asked for ``job`` (and the subscribers). The ``final`` word on a
        track reaches a connection that streams it after its last audio chunk."""
        if not final:
            self._broadcast(job.waiters, method, payload)
            return
        frame = rpc.notification(method, [payload])
        streaming = {}
        for conn in job.waiters | self.subscribers:
            if job.stream.streaming(conn):
                streaming[conn] = frame
            else:
                conn.send(frame)
        job.stream.end(streaming)
        if streaming:
            self.ended_streams.add(job.stream)

    def fail(self, job: Job, err: LofiError) -> None:
        log.warning("track %s failed: %s: %s", job.track_id, err.code, err.message)
        self.failures.add({"track_id": job.track_id, "prompt": job.prompt, "seed": job.seed,
                           "duration_sec": job.duration_sec, **self.sampling()}, err)
        self.fan_out(job, "generation_error", {**err.data, "track_id": job.track_id, "code": err.code,
                                               "message": err.message}, final=True)

    def expects(self, conn: Connection) -> bool:
        """Whether notifications are still due to ``conn``: a subscriber, a download's or a
        job's waiter (a streaming connection is one), or the reader of an ended track's audio
        that its pump is still sending."""
        jobs = [job for job in [self.queue.running, *self.queue.pending()] if job is not None]
        return (conn in self.subscribers or conn in self.download_waiters or any(conn in job.waiters for job in jobs)
                or any(stream.streaming(conn) for stream in self.ended_streams))

    def closed(self, conn: Connection) -> None:
        self.subscribers.discard(conn)
        self.download_waiters.discard(conn)
        for job in [self.queue.running, *self.queue.pending()]:
            if job is not None:
                job.waiters.discard(conn)
                job.stream.leave(conn)

    # -- methods ------------------------------------------------------------------

    async def handle(self, conn: Connection, method: str, params: list) -> Any:
        handler = getattr(self, "rpc_" + method, None) if method.isidentifier() else None
        if handler is None:
            raise LofiError(errors.UNKNOWN_METHOD, f"unknown method {method!r}")
        log.debug("%r calls %s", conn, method)
        self.last_activity = time.monotonic()
        return await handler(conn, params)

    async def rpc_generate(self, conn: Connection, params: list) -> dict:
        req = parse_generate(params)
        if self.closing or self.stopping.is_set():
            raise LofiError(errors.INTERNAL, "the daemon is shutting down; ask again when it is back",
                            shutting_down=True)
        await asyncio.to_thread(self.cache.check)
        loc = await self.model_location()
        tid = track_id(req["prompt"], req["seed"], req["duration_sec"], loc.model_version, **self.sampling())
        record = await asyncio.to_thread(self.cache.get, tid)
        if record is not None:
            return {"track_id": tid, "seed": req["seed"], "status": "complete", "position": 0, "cached": True,
                    "path": record["path"]}
        job = self.queue.find(tid)
        if job is None:
            allow = await self.may_download(loc, req["allow_download"])
            job = Job(tid, req["prompt"], req["duration_sec"], req["seed"], self.cache.wav_path(tid),
                      req["priority"], allow_download=allow)
            position = self.queue.push(job)
            self.failures.discard(tid)  # asked again: it is retried
            self._kick()
            log.info("queued %s at position %d (%s)", tid, position, req["priority"])
        job.waiters.add(conn)
        if req["stream"]:
            job.stream.join(conn)
        status = "running" if job is self.queue.running else "queued"
        return {"track_id": tid, "seed": job.seed, "status": status, "position": self.queue.position(job),
                "cached": False}

    def sampling(self) -> dict:
        """The sampling settings: part of every track id and record (they change the audio)."""
        s = self.settings
        return {"top_k": s.top_k, "temperature": s.temperature, "guidance_scale": s.guidance_scale}

    async def may_download(self, loc: models.ModelLocation, asked: bool) -> bool:
        """``models.may_download``; where the user must be asked, the question carries the
        size the hub gives for the missing files (asked in a thread, bounded: the event
        loop never waits on the network), else the variant's estimate."""
        s = self.settings
        try:
            return models.may_download(loc, s.model_dir, s.state_dir, allow_download=s.allow_download, asked=asked)
        except LofiError as e:
            if not e.data.get("consent_required"):
                raise
        try:
            size = await asyncio.wait_for(asyncio.to_thread(models.download_size, loc.missing),
                                          models.HUB_QUERY_SEC + 1)
        except TimeoutError:
            size = None
        raise models.missing_error(loc, s.model_dir, size)

    async def rpc_status(self, conn: Connection, params: list) -> dict:
        one_map(params, set())
        running = self.queue.running
        result = {
            "version": lofid.__version__, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
            "uptime_sec": round(time.monotonic() - self.started, 3),
            "model": {**self.model, "state_sec": round(time.monotonic() - self.model_since, 1)},
            "worker": {"pid": self.supervisor.pid, "restarts": self.supervisor.restarts},
            "queue": [{"track_id": j.track_id, "position": self.queue.position(j), "priority": j.priority,
                       "prompt": j.prompt} for j in self.queue.pending()],
            "downloading": self.downloading or self.download_variant is not None,
            "settings": self.settings.to_dict(),  # clients play only WAVs in its cache_dir
            "settings_sources": dict(self.sources),
        }
        if running is not None:
            result["running"] = {"track_id": running.track_id,
                                 "percent": self.progress.percent if self.progress else 0}
        return result

    async def rpc_track(self, conn: Connection, params: list) -> dict:
        arg = one_map(params, {"track_id"})
        tid = check_track_id(arg.get("track_id"))
        record = await asyncio.to_thread(self.cache.get, tid)
        if record is not None:
            return record
        failed = self.failures.get(tid)   # asking to generate it again forgets it
        if failed is not None:
            return failed
        job = self.queue.find(tid)
        if job is not None:
            return {"track_id": tid, "status": "running" if job is self.queue.running else "queued",
                    "prompt": job.prompt, "seed": job.seed, "duration_sec": job.duration_sec,
                    "position": self.queue.position(job)}
        raise LofiError(errors.TRACK_NOT_FOUND, f"no track {tid}")

    async def rpc_tracks(self, conn: Connection, params: list) -> list:
        limit = one_map(params, {"limit"}).get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise LofiError(errors.INVALID_PARAMS, "limit must be a non-negative integer")
        return await asyncio.to_thread(self.cache.list, limit)

    async def rpc_download_model(self, conn: Connection, params: list) -> dict:
        arg = one_map(params, {"variant", "force"})
        variant = arg.get("variant") or self.settings.variant
        if variant not in variants.NAMES:
            raise LofiError(errors.INVALID_PARAMS, f"variant must be one of {', '.join(variants.NAMES)}")
        if self.settings.model_dir is not None:
            raise LofiError(errors.INVALID_PARAMS, f"models come from --model-dir {self.settings.model_dir}; "
                            "nothing is downloaded there")
        models.give_consent(self.settings.state_dir)
        self.download_waiters.add(conn)
        if not (self.downloading or self.download_variant is not None):
            self.download_variant = (variant, bool(arg.get("force")))
            self._kick()
        return {"ok": True, "repo": variants.REPO, "variant": variant, "state": "downloading"}

    async def rpc_subscribe(self, conn: Connection, params: list) -> dict:
        one_map(params, set())
        self.subscribers.add(conn)
        return {"ok": True}

    async def rpc_shutdown(self, conn: Connection, params: list) -> dict:
        one_map(params, set())
        log.info("shutdown requested by %r", conn)
        asyncio.get_running_loop().call_soon(self.stopping.set)
        return {"ok": True}

    async def rpc_track_delete(self, conn: Connection, params: list) -> dict:
        tid = check_track_id(one_map(params, {"track_id"}).get("track_id"))
        job = self.queue.find(tid)
        if job is not None:
            state = "running" if job is self.queue.running else "queued"
            raise LofiError(errors.INVALID_PARAMS, f"track {tid} is {state}; only a complete track can be removed")
        async with self._cache_lock:
            freed = await asyncio.to_thread(self.cache.delete, tid)
        log.info("removed track %s (%d bytes) at the request of %r", tid, freed, conn)
        return {"ok": True, "track_id": tid, "bytes_freed": freed}

    async def rpc_cache_prune(self, conn: Connection, params: list) -> dict:
        arg = one_map(params, {"all", "max_mb"})
        everything, max_mb = arg.get("all", False), arg.get("max_mb")
        if not isinstance(everything, bool):
            raise LofiError(errors.INVALID_PARAMS, "all must be true or false")
        if max_mb is not None and (not isinstance(max_mb, int) or isinstance(max_mb, bool) or max_mb < 0):
            raise LofiError(errors.INVALID_PARAMS, "max_mb must be a non-negative integer")
        if everything:
            max_mb = 0
        elif max_mb is None:
            max_mb = self.settings.cache_max_mb
            if max_mb is None:
                raise LofiError(errors.INVALID_PARAMS, "no cache_max_mb is set: give max_mb, or all to remove "
                                "every track")
        removed = await self._shrink_cache(max_mb, keep=frozenset(), why=f"pruned by {conn!r}")
        entries = await asyncio.to_thread(self.cache.entries)
        return {"removed": [e.track_id for e in removed], "bytes_freed": sum(e.size for e in removed),
                "tracks_left": len(entries), "bytes_left": sum(e.size for e in entries), "max_mb": max_mb}

    # -- cache cap, idle exit, service status ---------------------------------------

    async def enforce_cache_cap(self, keep: str) -> None:
        """After a track completes: evict least recently used tracks down to cache_max_mb."""
        if self.settings.cache_max_mb is not None:
            await self._shrink_cache(self.settings.cache_max_mb, keep=frozenset({keep}), why="cache_max_mb")

    async def _shrink_cache(self, max_mb: int, keep: frozenset[str], why: str) -> list:
        running = self.queue.running
        keep = keep | ({running.track_id} if running is not None else set())
        try:
            async with self._cache_lock:
                removed = await asyncio.to_thread(self.cache.shrink, max_mb * MB, keep)
        except OSError as e:
            log.warning("cannot shrink the track cache %s: %s", self.cache.root, e)
            return []
        for e in removed:
            log.info("evicted track %s (%d bytes, least recently used) to stay under %d MB (%s)",
                     e.track_id, e.size, max_mb, why)
        return removed

    def busy(self) -> bool:
        return (self.queue.running is not None or len(self.queue) > 0 or self.downloading
                or self.download_variant is not None)

    async def exit_when_idle(self, limit: float) -> None:
        """Stop the daemon after ``limit`` seconds without a job, a download or a request."""
        while not self.stopping.is_set():
            if self.busy():
                self.last_activity = time.monotonic()
            idle = time.monotonic() - self.last_activity
            if idle >= limit:
                log.info("idle for %.1f s (idle_exit_sec %g); exiting", idle, limit)
                self.stopping.set()
                return
            await asyncio.sleep(min(1.0, limit - idle))

    def _generating_status(self) -> str:
        percent = self.progress.percent if self.progress is not None else 0
        queued = len(self.queue)
        return f"generating {percent}%" + (f", {queued} queued" if queued else "")

    def set_status(self, text: str) -> None:
        """The one-line status systemd shows (STATUS=); sent only when it changes."""
        if text != self._status_text:
            self._status_text = text
            systemd.notify(f"STATUS={text}")
