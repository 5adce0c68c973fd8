"""EnCodec span by span, as the decoder completes frames: the one way lofid turns codes
into audio, whether or not anyone listens to the stream.

The track is cut at fixed frame boundaries (``plan_spans``: a short first span so that
sound starts soon, then longer ones). Span i owns frames ``[b_i, b_{i+1})``. It is decoded
with ``left`` frames of context before it, so that EnCodec's LSTM has warmed up, and
``right`` frames after it, so that its non-causal convolutions see what follows. The
first ``fade`` frames of span i are a linear crossfade from the previous span's decode
(which ran ``right`` frames past its end) to this one's. Everything depends on the frame
count and the codes only, never on timing, so the audio is deterministic.

A span can be decoded once frame ``b_{i+1} + right`` is complete; its samples are then
final and go out as one chunk. How far the joins move the audio against one EnCodec run
over the whole track is in bench/RESULTS.md ("Streaming").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Frames at 50 Hz (the real model's frame rate); chosen by measurement, bench/RESULTS.md.
FIRST_SPAN = 10      # 0.2 s: the first chunk, small so that sound starts soon
MAX_SPAN = 50        # 1 s: spans double up to this (a player waits about a span longer
                     # than the machine's speed forces, where generation is slower than real time)
LEFT_CONTEXT = 25    # 0.5 s decoded before a span and thrown away (EnCodec's LSTM warms up)
RIGHT_CONTEXT = 10   # 0.2 s decoded after a span: the convolutions' look-ahead, and the fade
FADE = 5             # 0.1 s crossfade at the start of each span after the first
MIN_TAIL = 10        # a last span shorter than this is merged into the one before


def plan_spans(frames: int, first: int = FIRST_SPAN, longest: int = MAX_SPAN,
               min_tail: int = MIN_TAIL) -> list[int]:
    """The span boundaries ``[0, b_1, ..., frames]``: ``first``, then doubling up to
    ``longest``; a last span shorter than ``min_tail`` joins the one before it."""
    if frames < 1:
        raise ValueError("a track has at least one frame")
    bounds, size = [0], first
    while bounds[-1] < frames:
        bounds.append(min(frames, bounds[-1] + size))
        size = min(longest, size * 2)
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < min_tail:
        del bounds[-2]
    return bounds


@dataclass(frozen=True)
class Chunk:
    """Final samples ``[offset, offset + len(audio))`` of the track (float32 in [-1, 1])."""
    seq: int
    offset: int
    audio: np.ndarray
    last: bool


DecodeRun = Callable[[np.ndarray], np.ndarray]   # codes [K, n] -> float32 samples [n * hop]


class SpanDecoder:
    """Feed it the codes as frames complete; it decodes each span once its frames (and its
    right-hand context) are known and hands the span's final samples to ``emit``."""

    def __init__(self, frames: int, hop: int, run: DecodeRun, emit: Callable[[Chunk], None] | None = None,
                 *, bounds: list[int] | None = None, left: int = LEFT_CONTEXT, right: int = RIGHT_CONTEXT,
                 fade: int = FADE) -> None:
        if not 0 <= fade <= right:
            raise ValueError(f"the fade ({fade}) must fit in the right context ({right})")
        self.frames, self.hop, self.run, self.emit = frames, hop, run, emit
        self.bounds = bounds if bounds is not None else plan_spans(frames)
        self.left, self.right, self.fade = left, right, fade
        self.audio = np.zeros(frames * hop, np.float32)   # [T * hop], the whole track
        self.next = 0                                       # the next span to decode
        self._tail: np.ndarray | None = None                # previous decode past its span's end
        fade_samples = fade * hop
        self._ramp = (np.arange(fade_samples, dtype=np.float32) + 0.5) / max(1, fade_samples)

    @property
    def done(self) -> bool:
        return self.next == len(self.bounds) - 1

    def needed(self, span: int) -> int:
        """How many frames must be complete before ``span`` can be decoded."""
        return min(self.frames, self.bounds[span + 1] + self.right)

    def feed(self, codes: np.ndarray, complete: int) -> None:
        """``codes`` ``[K, frames]`` whose first ``complete`` frames are final."""
        while not self.done and complete >= self.needed(self.next):
            self._decode(codes, self.next)

    def finish(self, codes: np.ndarray) -> np.ndarray:
        """Decode what is left of the complete ``codes``; -> the whole track's samples."""
        self.feed(codes, self.frames)
        return self.audio

    def _decode(self, codes: np.ndarray, i: int) -> None:
        start, end = self.bounds[i], self.bounds[i + 1]
        lo, hi = max(0, start - self.left), self.needed(i)
        piece = self.run(codes[:, lo:hi])                    # [(hi - lo) * hop]
        hop = self.hop
        own = piece[(start - lo) * hop:(end - lo) * hop]     # this span's samples
        out = self.audio[start * hop:end * hop]
        out[:] = own
        if self._tail is not None:                           # crossfade from the previous decode
            n = min(self._ramp.size, self._tail.size, out.size)
            ramp = self._ramp[:n] if n == self._ramp.size else (np.arange(n, dtype=np.float32) + 0.5) / n
            out[:n] = self._tail[:n] * (1 - ramp) + own[:n] * ramp
        self._tail = piece[(end - lo) * hop:]                # decoded past the end: the next fade
        self.next += 1
        if self.emit is not None:
            self.emit(Chunk(i, start * hop, out, self.done))
