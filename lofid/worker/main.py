"""The worker process: receive a request over the pipe, do it, answer.

Requests (dicts): ``{"op": "generate", "job": {...}}``, ``{"op": "download",
"variant", "force"}``, ``{"op": "stop"}``. Every request is answered by any number of
events (``progress``; one more ``progress`` with ``decoded: true`` once the audio is
decoded; ``model``, ``download_progress``) and then exactly one
``{"ev": "done", "result"}`` or ``{"ev": "error", "error": {code, message, ...}}``.

The worker exits when the broker's end of the pipe closes or the broker dies, so a
killed broker never leaves an orphan generating into the void.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lofid import errors, memory, models
from lofid.config import Settings
from lofid.errors import LofiError
from lofid.logs import setup_logging

log = logging.getLogger("lofid.worker")


class _Exit(BaseException):
    """Raised by the SIGTERM handler to leave the loop (after a file write finished)."""


class Worker:
    def __init__(self, conn, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings
        self.engine = None
        self.engine_version: str | None = None
        self._writing = False
        self._term_pending = False

    # -- plumbing --------------------------------------------------------------

    def send(self, msg: dict[str, Any]) -> None:
        try:
            self.conn.send(msg)
        except (OSError, ValueError):  # the broker is gone
            os._exit(0)

    def on_sigterm(self, signum, frame) -> None:
        if self._writing:
            self._term_pending = True  # finish the file first
        else:
            raise _Exit()

    def serve(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                return
            op = msg.get("op")
            if op == "stop":
                return
            handler = {"generate": self.generate, "download": self.download}.get(op)
            try:
                if handler is None:
                    raise LofiError(errors.INTERNAL, f"unknown worker request {op!r}")
                result = handler(msg)
            except LofiError as e:
                self.send({"ev": "error", "error": e.to_dict()})
            except MemoryError:
                self.engine = None  # its buffers may be half built
                self.send({"ev": "error", "error": {"code": errors.MODEL_INFERENCE_FAILED,
                                                     "message": "out of memory during generation"}})
            except Exception as e:
                log.exception("request %s failed", op)
                self.send({"ev": "error", "error": {"code": errors.INTERNAL, "message": f"{type(e).__name__}: {e}"}})
            else:
                self.send({"ev": "done", "result": result})

    # -- model -----------------------------------------------------------------

    def _locate(self, allow_download: bool):
        """The model's files, downloaded first where the broker allowed it (the broker
        decides: ``models.may_download``)."""
        s = self.settings
        loc = models.locate(s.variant, s.model_dir, hash_cache_dir=s.state_dir)
        if not loc.missing:
            return loc
        if s.model_dir is not None:
            raise models.missing_error(loc, s.model_dir)
        if not allow_download:
            raise models.missing_error(loc, None, models.download_size(loc.missing))
        return self._download(s.variant, force=False)

    def _download(self, variant: str, force: bool):
        from lofid.worker import download

        self.send({"ev": "model", "state": "downloading", "variant": variant})
        loc = download.download(variant, progress=lambda p: self.send({"ev": "download_progress", **p}), force=force)
        if self.engine is not None and variant != self.settings.variant:
            self.send({"ev": "model", "state": "present", "variant": self.settings.variant})
        self.engine = None  # files may have changed under a loaded engine
        return loc

    def _engine_class(self):
        module, _, name = self.settings.engine.partition(":")
        return getattr(importlib.import_module(module), name)

    def _load_state(self, engine_cls, root: Path, variant: str) -> str:
        """"preparing" where this load is the variant's one-time preparation for this machine
        (the engine's ``needs_preparing``: a graph rewrite to make and cache), else "loading"."""
        needs_preparing = getattr(engine_cls, "needs_preparing", None)
        if needs_preparing is None:
            return "loading"
        s = self.settings
        return "preparing" if needs_preparing(root, variant, device=s.device, threads=s.threads) else "loading"

    def _ensure_engine(self, allow_download: bool):
        loc = self._locate(allow_download)
        if self.engine is not None and self.engine_version == loc.model_version:
            return loc
        s = self.settings
        engine_cls = self._engine_class()
        self.send({"ev": "model", "state": self._load_state(engine_cls, loc.root, s.variant), "variant": s.variant,
                   "model_version": loc.model_version})
        self.engine = None
        try:
            self.engine = engine_cls.load(loc.root, s.variant, device=s.device, threads=s.threads)
        except MemoryError:
            raise LofiError(errors.MODEL_LOAD_FAILED, memory.out_of_memory_at_load(s.variant, s.device,
                            s.worker_memory_mb), variant=s.variant) from None
        self.engine_version = loc.model_version
        self.send({"ev": "model", "state": "ready", "variant": s.variant, "model_version": loc.model_version,
                   "device": self.engine.device, "provider": self.engine.provider, "threads": self.engine.threads,
                   "load_time_sec": round(self.engine.load_time_sec, 3)})
        return loc

    # -- requests --------------------------------------------------------------

    def download(self, msg: dict) -> dict:
        """Download a variant, then prepare it at once rather than on the first request: this
        daemon's own variant is loaded (and kept); another one is loaded where it needs
        preparing, then dropped. A failed preparation does not fail the download: the result
        carries it as ``prepare_error`` (the next load reports it again)."""
        variant = msg.get("variant") or self.settings.variant
        loc = self._download(variant, bool(msg.get("force")))
        result = {"variant": loc.variant, "model_version": loc.model_version}
        try:
            if variant == self.settings.variant:
                self._ensure_engine(allow_download=False)
            else:
                self._prepare_other(loc.root, variant)
        except LofiError as e:
            log.warning("downloaded %s but cannot prepare it: %s: %s", variant, e.code, e.message)
            result["prepare_error"] = e.to_dict()
        except Exception as e:  # MemoryError, or a bug in the engine's load
            log.exception("downloaded %s but cannot prepare it", variant)
            result["prepare_error"] = {"code": errors.INTERNAL, "message": f"{type(e).__name__}: {e}"}
        return result

    def _prepare_other(self, root: Path, variant: str) -> None:
        engine_cls = self._engine_class()
        if self._load_state(engine_cls, root, variant) == "preparing":
            s = self.settings
            self.send({"ev": "model", "state": "preparing", "variant": variant})
            engine_cls.load(root, variant, device=s.device, threads=s.threads)  # cached by the engine; dropped

    def generate(self, msg: dict) -> dict:
        from lofid.worker import wav

        job = msg["job"]
        s = self.settings
        loc = self._ensure_engine(bool(job.get("allow_download")))
        tid = job["track_id"]
        started = time.monotonic()

        counts = [0, 0]

        def progress(done: int, total: int) -> None:
            counts[:] = [int(done), int(total)]
            self.send({"ev": "progress", "track_id": tid, "tokens_generated": int(done),
                       "tokens_estimated": int(total)})

        def audio_chunk(chunk) -> None:
            msg = {"ev": "audio", "seq": chunk.seq, "offset": chunk.offset, "sample_rate": self.engine.sample_rate,
                   "pcm": wav.pcm16(chunk.audio).astype("<i2").tobytes(), "last": chunk.last}
            if chunk.start_after_sec is not None:
                msg["start_after_sec"] = chunk.start_after_sec
            self.send(msg)

        audio = self.engine.generate(job["prompt"], job["duration_sec"], job["seed"], top_k=s.top_k,
                                     temperature=s.temperature, guidance_scale=s.guidance_scale,
                                     progress=progress, on_chunk=audio_chunk)
        self.send({"ev": "progress", "track_id": tid, "tokens_generated": counts[0],
                   "tokens_estimated": counts[1], "decoded": True})
        final = Path(job["wav_path"])   # the track cache's name for it
        self._writing = True
        try:
            wav.write(final, audio, self.engine.sample_rate)
        except OSError as e:
            raise LofiError(errors.STORAGE_FAILED, f"cannot write {final}: {e.strerror or e}") from None
        finally:
            self._writing = False
            if self._term_pending:
                raise _Exit()
        return {"path": str(final), "sample_rate": self.engine.sample_rate, "model_version": loc.model_version,
                "variant": s.variant, "device": self.engine.device,
                "generation_time_sec": round(time.monotonic() - started, 3)}


def _watch_parent(ppid: int) -> None:
    """Exit at once if the broker dies (we are re-parented)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != ppid:
            os._exit(1)


def _limit_memory(megabytes: int | None) -> None:
    if megabytes:
        import resource

        limit = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run(conn, settings: Settings) -> None:
    """Entry point of the spawned worker process."""
    setup_logging(settings.log_level, "lofid-worker")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the broker's to handle
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit becomes an OSError, not death
    worker = Worker(conn, settings)
    signal.signal(signal.SIGTERM, worker.on_sigterm)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    _limit_memory(settings.worker_memory_mb)
    try:
        worker.serve()
    except _Exit:
        log.info("worker terminated")
    sys.exit(0)
