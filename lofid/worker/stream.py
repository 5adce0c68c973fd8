"""The audio of one request as it is made: the generation loop reports each completed
frame, the spans decode as soon as they can (spans.py), and each span's samples go out
as a chunk; the first chunk carries how long a player should buffer (pacing.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lofid.worker.pacing import Pace, Pacer, remaining_work
from lofid.worker.spans import Chunk, SpanDecoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AudioChunk:
    """Samples ``[offset, offset + audio.size)`` of the track, final."""
    seq: int
    offset: int
    audio: np.ndarray          # float32 mono in [-1, 1]
    last: bool
    start_after_sec: float | None = None   # chunk 0 only


OnChunk = Callable[[AudioChunk], None]
# after each decoder step: (position, the window's frame it completed or None, that frame's codes [K])
StepHook = Callable[[int, "int | None", "np.ndarray | None"], None]


class AudioStream:
    """Decodes the codes of one request span by span while they are generated."""

    def __init__(self, frames: int, hop: int, sample_rate: int, num_codebooks: int,
                 plans: Sequence[tuple[int, int, int]], run: Callable[[np.ndarray], np.ndarray],
                 on_chunk: OnChunk | None = None, clock=time.monotonic,
                 pace: Pace | None = None) -> None:
        self.plans, self.num_codebooks = plans, num_codebooks
        self.hop, self.sample_rate = hop, sample_rate
        self.on_chunk, self.clock = on_chunk, clock
        self.pacer = Pacer(clock, pace)
        self._run = run
        self.spans = SpanDecoder(frames, hop, self._timed_run, self._emit)
        self._at: tuple[int, int] = (0, 0)   # (window, position) last sampled
        self._first_at: float | None = None  # when chunk 0 went out

    def window_hook(self, codes: np.ndarray, window: int, offset: int) -> StepHook:
        """The hook for window ``window`` (at frame ``offset`` of the track): it fills
        ``codes`` ``[K, T]`` frame by frame and decodes what it can."""
        def on_step(position: int, frame: int | None, column: np.ndarray | None) -> None:
            if frame is None:
                self.step(window, position)
            else:
                codes[:, offset + frame] = column
                self.frames_done(codes, offset + frame + 1, window, position)
        return on_step

    def step(self, window: int, position: int) -> None:
        """Position ``position`` of window ``window`` was sampled."""
        self.pacer.step(position)
        self._at = (window, position)

    def frames_done(self, codes: np.ndarray, complete: int, window: int, position: int) -> None:
        """As ``step``, and ``codes`` ``[K, T]`` now holds the track's first ``complete``
        frames."""
        self.step(window, position)
        self.spans.feed(codes, complete)

    def finish(self, codes: np.ndarray) -> np.ndarray:
        """Decode the spans left; -> the whole track, float32 ``[T * hop]``."""
        self._at = (len(self.plans), 0)
        audio = self.spans.finish(codes)
        if self._first_at is not None and self.pacer.predicted_sec is not None:
            log.info("stream: at chunk 0 the work left was predicted at %.2f s (%d steps seen, %.1f ms a step "
                     "at position 0, EnCodec %.2f ms a frame); it took %.2f s", self.pacer.predicted_sec,
                     len(self.pacer.step_times), 1000 * self.pacer.base_step_sec(),
                     1000 * self.pacer.codec_sec_per_frame(), self.clock() - self._first_at)
        return audio

    def _timed_run(self, codes: np.ndarray) -> np.ndarray:
        began = self.clock()
        audio = self._run(codes)
        self.pacer.codec(codes.shape[-1], self.clock() - began)
        return audio

    def _emit(self, chunk: Chunk) -> None:
        if self.on_chunk is None:
            return
        start_after = None
        if chunk.seq == 0:
            self._first_at = self.clock()
            start_after = 0.0
            window, position = self._at
            if window < len(self.plans):
                work, starts = remaining_work(self.plans, self.num_codebooks, window, position, self.spans)
                offsets = [s * self.hop / self.sample_rate for s in starts]
                start_after = self.pacer.start_after(work, offsets)
        self.on_chunk(AudioChunk(chunk.seq, chunk.offset, chunk.audio, chunk.last, start_after))
