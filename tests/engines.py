"""A scripted engine for supervision tests: it behaves as its prompt tells it.

Directives in the prompt (anything else is plain text):
  step=SECONDS   time per token (default 0.002)
  crash@N        SIGKILL itself at token N        oom@N   raise MemoryError at token N
  hang@N         stop sending anything at token N nan@N   report non-finite logits at token N
  noterm@N       ignore SIGTERM from token N on (to reach the SIGKILL rung of the stop ladder)
  alloc=MB       really allocate (and touch) MB megabytes at token 1, so a worker_memory_mb
                 address-space limit makes a genuine numpy allocation fail (MemoryError)
  fsize=BYTES    set RLIMIT_FSIZE to BYTES before returning the audio, so the worker's WAV
                 write really fails with EFBIG (-> STORAGE_FAILED); undone by the next job
  wslow=SECONDS  the WAV write's fsync waits SECONDS first (once): a window in which the
                 temporary file exists and the final name does not, to kill the worker in that window
  wait=SECONDS   the start_after_sec its first audio chunk carries (default 0)
Audio chunks go out as the real engine cuts them (lofid.worker.spans), one per span as
its frames complete.
It loads through the same worker code path as the real engine (files located by
lofid.models first), and returns deterministic audio from the seed.

Environment: LOFID_TEST_LOAD_SLEEP=SECONDS makes every load take that long;
LOFID_TEST_PREPARE_SLEEP=SECONDS makes a variant's first load on this machine (a mark in
LOFID_OPTIMIZED_DIR, where the real engine caches its rewritten graphs) a preparation
(``needs_preparing``) that takes that long; LOFID_TEST_LOAD_ALLOC=MB makes every load
allocate (and touch) MB megabytes.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import time
from pathlib import Path

import numpy as np

from lofid import errors
from lofid.errors import LofiError
from lofid.worker.spans import plan_spans
from lofid.worker.stream import AudioChunk


class ScriptedEngine:
    sample_rate = 32000
    frame_rate = 50
    provider = "CPUExecutionProvider"
    device = "cpu"

    def __init__(self, root: Path, variant: str, threads: int) -> None:
        self.root, self.variant, self.threads = root, variant, threads
        self.load_time_sec = 0.0

    @staticmethod
    def _prepared_mark(variant: str) -> Path | None:
        if not (os.environ.get("LOFID_TEST_PREPARE_SLEEP") and os.environ.get("LOFID_OPTIMIZED_DIR")):
            return None
        return Path(os.environ["LOFID_OPTIMIZED_DIR"]) / f"scripted-{variant}.prepared"

    @classmethod
    def needs_preparing(cls, root: Path, variant: str, *, device: str = "auto", threads: int | None = None) -> bool:
        mark = cls._prepared_mark(variant)
        return mark is not None and not mark.exists()

    @classmethod
    def load(cls, root: Path, variant: str, *, device: str = "auto", threads: int | None = None) -> ScriptedEngine:
        if os.environ.get("LOFID_TEST_LOAD_SLEEP"):
            time.sleep(float(os.environ["LOFID_TEST_LOAD_SLEEP"]))
        if cls.needs_preparing(root, variant):
            time.sleep(float(os.environ["LOFID_TEST_PREPARE_SLEEP"]))
            mark = cls._prepared_mark(variant)
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.write_text(str(root))
        if os.environ.get("LOFID_TEST_LOAD_ALLOC"):  # MB, really allocated: under worker_memory_mb a MemoryError
            block = np.ones(int(float(os.environ["LOFID_TEST_LOAD_ALLOC"]) * 2**20), dtype=np.uint8)
            del block
        if device not in ("auto", "cpu"):
            raise LofiError(errors.MODEL_LOAD_FAILED, f"device {device!r} is not available in the scripted engine")
        return cls(root, variant, threads or 1)

    _FSIZE = resource.getrlimit(resource.RLIMIT_FSIZE)  # the worker's own limit, restored per job

    def generate(self, prompt, duration_sec, seed, *, top_k=250, temperature=1.0, guidance_scale=3.0, progress=None,
                 on_chunk=None):
        directives = dict(re.findall(r"(\w+)[=@]([\d.]+)", prompt))
        resource.setrlimit(resource.RLIMIT_FSIZE, self._FSIZE)
        _slow_fsync(float(directives["wslow"]) if "wslow" in directives else None)
        step = float(directives.get("step", 0.002))
        frames = round(duration_sec * self.frame_rate)
        total = frames + 3
        rng = np.random.default_rng(seed)
        t = np.arange(frames * 640) / self.sample_rate
        audio = (0.3 * np.sin(2 * np.pi * rng.uniform(110, 880) * t)).astype(np.float32)
        bounds, span = plan_spans(frames), 0   # chunks as the real engine cuts them, one per span
        for i in range(total + 1):
            if i == int(directives.get("crash", -1)):
                os.kill(os.getpid(), signal.SIGKILL)
            if i == int(directives.get("oom", -1)):
                raise MemoryError()
            if i == int(directives.get("nan", -1)):
                raise LofiError(errors.MODEL_INFERENCE_FAILED, "the decoder produced NaN/inf logits")
            if i == int(directives.get("noterm", -1)):
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if i == int(directives.get("hang", -1)):
                time.sleep(3600)
            if i == 1 and "alloc" in directives:
                block = np.ones(int(float(directives["alloc"]) * 2**20), dtype=np.uint8)  # MemoryError under RLIMIT_AS
                del block
            if progress is not None:
                progress(i, total)
            while on_chunk is not None and span < len(bounds) - 1 and (i >= total or i - 3 >= bounds[span + 1]):
                last = span == len(bounds) - 2
                on_chunk(AudioChunk(span, bounds[span] * 640, audio[bounds[span] * 640:bounds[span + 1] * 640], last,
                                    float(directives.get("wait", 0)) if span == 0 else None))
                span += 1
            if i < total:
                time.sleep(step)
        if "fsize" in directives:
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(directives["fsize"]), self._FSIZE[1]))
        return audio


class _SlowOs:
    """Stands in for ``os`` inside lofid.paths (whose write_atomic writes the WAV): its next fsync
    sleeps first, then it steps aside."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __getattr__(self, name):
        return getattr(os, name)

    def fsync(self, fd: int) -> None:
        _slow_fsync(None)
        time.sleep(self.seconds)
        os.fsync(fd)


def _slow_fsync(seconds: float | None) -> None:
    from lofid import paths

    paths.os = os if seconds is None else _SlowOs(seconds)
