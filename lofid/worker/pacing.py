"""How long a player should buffer after the first chunk (``start_after_sec``) so that no
later chunk arrives after its play time.

When the first chunk goes out, the generation so far has shown how long a decoder step
takes here now. ``Pacer`` replays the rest of the request on that clock: every remaining
step (a step's cost grows with the attention's length), every window's re-prime, every
span's EnCodec run, and finds the chunk that would be latest against its play time. The
wait is that lateness with a margin, or 0 when generation runs ahead of real time.

How a step's cost grows along the positions (its shape: the cache leaving the CPU's caches
bends it) and what an EnCodec frame costs depend on the machine and the variant, so each
request teaches the next (``Pace``: the steps' cost per 50 positions, their growth past
that, EnCodec's pace); the first request of a worker uses the linear defaults here,
measured on a full-size model (bench/RESULTS.md, "Streaming").
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

STEP_GROWTH = 1e-3     # a step's cost grows by this share of the first step's per position
PREFILL_SHARE = 0.25   # a re-prime costs this share of a step per primed position
MARGIN = 0.05          # predicted work is stretched by this share (other load, noise) ...
SLACK_SEC = 0.3        # ... plus this much
GROWTH_BIN = 50        # positions per bin when a request's step times are fitted ...
MIN_BINS = 5           # ... and the fewest bins a fit goes on
MAX_GROWTH = 3e-3      # a fitted growth above this is noise (attention over 1500 positions
                       # would cost more than 5 steps at position 0)


@dataclass(frozen=True)
class Pace:
    """What one request measured, for the next one's prediction."""
    step_growth: float = STEP_GROWTH            # per position, as a share of a step at 0
    codec_sec_per_frame: float | None = None    # EnCodec, once its session is warm
    growth_positions: int = 0                   # the positions the growth was fitted over
    # a step's cost at each bin's centre, as a share of the first bin's: the measured shape
    # (the cache's fit in the CPU's caches bends it); the growth carries it past its end
    profile: tuple[tuple[float, float], ...] = ()

    def cost(self, position: int) -> float:
        """A step's cost at ``position``, as a share of a step at the first positions."""
        points = self.profile
        if not points:
            return 1 + self.step_growth * position
        if position <= points[0][0]:
            return points[0][1]
        for (x1, y1), (x2, y2) in itertools.pairwise(points):
            if position <= x2:
                return y1 + (y2 - y1) * (position - x1) / (x2 - x1)
        x, y = points[-1]
        return y + self.step_growth * points[0][1] * (position - x)


class Pacer:
    """Records the step and EnCodec times of one request and predicts the rest.

    ``pace``: what an earlier request measured (a request's first EnCodec run also pays
    the session's one-time costs, and chunk 0 comes too early to see the growth)."""

    def __init__(self, clock=time.monotonic, pace: Pace | None = None) -> None:
        self.clock = clock
        self.step_times: list[tuple[int, float]] = []    # (attention length, seconds)
        self.codec_runs: list[tuple[int, float]] = []    # (frames decoded, seconds)
        self.pace = pace or Pace()
        self.predicted_sec: float | None = None   # the work left, as start_after saw it
        self._last = clock()

    def mark(self) -> None:
        """A new phase starts now (the first step's clock starts here)."""
        self._last = self.clock()

    def step(self, position: int) -> None:
        now = self.clock()
        self.step_times.append((position, now - self._last))
        self._last = now

    def codec(self, frames: int, seconds: float) -> None:
        self.codec_runs.append((frames, seconds))
        self._last = self.clock()   # the EnCodec run is not a step's time

    def codec_sec_per_frame(self) -> float:
        """The learned pace, else this request's first run (the only one at chunk 0)."""
        if self.pace.codec_sec_per_frame is not None:
            return self.pace.codec_sec_per_frame
        frames, seconds = self.codec_runs[0] if self.codec_runs else (1, 0.0)
        return seconds / max(1, frames)

    def learned(self) -> Pace:
        """This request's pace: EnCodec's seconds per frame after its first run, and the
        steps' growth fitted over their positions. The growth is a property of the machine
        and the variant, seen best over many positions: a fit over fewer positions than the
        one before it (a short request after a long one) keeps the one before."""
        runs = self.codec_runs[1:] or self.codec_runs
        frames = sum(f for f, _ in runs)
        codec = sum(s for _, s in runs) / frames if frames else self.pace.codec_sec_per_frame
        growth = fit_growth(self.step_times)
        positions = max((p for p, _ in self.step_times), default=0)
        if growth is None or positions < self.pace.growth_positions:
            return Pace(self.pace.step_growth, codec, self.pace.growth_positions, self.pace.profile)
        return Pace(growth, codec, positions, step_profile(self.step_times))

    def base_step_sec(self) -> float:
        """The cost of a step at position 0, from the median observed step."""
        if not self.step_times:
            return 0.0
        per_base = [sec / self.pace.cost(pos) for pos, sec in self.step_times]
        return statistics.median(per_base)

    def start_after(self, remaining: Sequence[tuple[str, int]], chunk_offsets_sec: Sequence[float]) -> float:
        """``remaining``: the rest of the request in order, each ``("step", position)``,
        ``("prime", positions)`` or ``("chunk", frames decoded)``; the chunks after the
        first, whose play times (seconds from the first chunk's start) are
        ``chunk_offsets_sec``. -> seconds to wait before playing the first chunk."""
        base, codec = self.base_step_sec(), self.codec_sec_per_frame()
        elapsed, lateness, chunk = 0.0, 0.0, 0
        for kind, n in remaining:
            if kind == "step":
                elapsed += base * self.pace.cost(n)
            elif kind == "prime":
                elapsed += base * PREFILL_SHARE * n
            else:
                elapsed += codec * n
                arrival = elapsed * (1 + MARGIN) + SLACK_SEC
                lateness = max(lateness, arrival - chunk_offsets_sec[chunk])
                chunk += 1
        self.predicted_sec = elapsed
        return round(lateness, 3) if lateness > SLACK_SEC else 0.0


def _bins(step_times: Sequence[tuple[int, float]]) -> list[tuple[float, float]]:
    """(bin centre, median step time) of each bin of ``GROWTH_BIN`` positions with enough
    steps in it, in order."""
    bins: dict[int, list[float]] = {}
    for position, seconds in step_times:
        bins.setdefault(position // GROWTH_BIN, []).append(seconds)
    return sorted(((b + 0.5) * GROWTH_BIN, statistics.median(v)) for b, v in bins.items()
                  if len(v) >= GROWTH_BIN // 2)


def step_profile(step_times: Sequence[tuple[int, float]]) -> tuple[tuple[float, float], ...]:
    """Each bin's median step time as a share of the first bin's (``Pace.profile``)."""
    points = _bins(step_times)
    if not points or points[0][1] <= 0:
        return ()
    first = points[0][1]
    return tuple((x, y / first) for x, y in points)


def fit_growth(step_times: Sequence[tuple[int, float]]) -> float | None:
    """A step's cost as ``a * (1 + growth * position)``, fitted robustly: the median step
    time of each bin of ``GROWTH_BIN`` positions, the median of the slopes between bins
    (one busy minute on a shared machine moves it little), as a share of the cost at 0,
    within ``[0, MAX_GROWTH]``. None with fewer than ``MIN_BINS`` bins to go on."""
    points = _bins(step_times)
    if len(points) < MIN_BINS:
        return None
    slope = statistics.median((y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points)
                              for x2, y2 in points[i + 1:])
    at_zero = statistics.median(y - slope * x for x, y in points)
    if at_zero <= 0:
        return None
    return min(MAX_GROWTH, max(0.0, slope / at_zero))


def remaining_work(plans: Sequence[tuple[int, int, int]], num_codebooks: int, window: int, position: int,
                   spans) -> tuple[list[tuple[str, int]], list[int]]:
    """The work left after ``position`` of window ``window`` was sampled, in the order the
    engine does it, and the first sample frame of each chunk still to come.

    ``plans``: the windows ``(offset, primed, length)``; ``spans``: the SpanDecoder (its
    ``bounds``, ``next``, ``needed`` and ``left``)."""
    work: list[tuple[str, int]] = []
    starts: list[int] = []
    span = spans.next
    last = len(spans.bounds) - 1

    def spans_ready(complete: int) -> None:
        nonlocal span
        while span < last and complete >= spans.needed(span):
            work.append(("chunk", spans.needed(span) - max(0, spans.bounds[span] - spans.left)))
            starts.append(spans.bounds[span])
            span += 1

    k = num_codebooks
    for w in range(window, len(plans)):
        offset, primed, length = plans[w]
        first = position + 1 if w == window else primed + 1
        if w != window:
            work.append(("prime", primed + 1))
        for t in range(first, length + k):
            work.append(("step", t))
            spans_ready(offset + min(length, max(primed, t - k + 1)))
    return work, starts
