"""EnCodec span by span (lofid/worker/spans.py), the streamed chunks (stream.py) and the
player's wait (pacing.py), on the tiny model's real EnCodec graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lofid.worker import pacing
from lofid.worker import spans as spans_mod
from lofid.worker.musicgen import MusicGen, plan_windows
from lofid.worker.pacing import Pacer, remaining_work
from lofid.worker.spans import SpanDecoder, plan_spans

MODEL = Path(__file__).resolve().parent / "fixtures" / "music_gen"
HOP = 640


@pytest.fixture(scope="module")
def encodec():
    sess = ort.InferenceSession(str(MODEL / "small_fp32" / "encodec_decode.onnx"),
                                providers=["CPUExecutionProvider"])

    def run(codes: np.ndarray) -> np.ndarray:    # one EnCodec run, as the engine makes it
        (audio,) = sess.run(["audio_values"], {"audio_codes": codes[None, None]})
        return np.clip(audio.reshape(-1)[:codes.shape[-1] * HOP], -1, 1).astype(np.float32)
    return run


@pytest.fixture(scope="module")
def engine():
    return MusicGen.load(MODEL, "fp32", threads=1)


@pytest.mark.parametrize("frames", [1, 9, 10, 19, 20, 250, 1500, 6000])
def test_plan_spans_covers_the_track_short_first_then_doubling(frames):
    first, longest, tail = spans_mod.FIRST_SPAN, spans_mod.MAX_SPAN, spans_mod.MIN_TAIL
    bounds = plan_spans(frames)
    sizes = np.diff(bounds)
    assert bounds[0] == 0 and bounds[-1] == frames and (sizes > 0).all()
    assert sizes[0] == min(frames, first) or len(sizes) == 1
    assert (sizes[:-1] <= longest).all() and (len(sizes) == 1 or sizes[-1] >= tail)
    assert list(sizes[1:-1]) == [min(longest, first * 2 ** (i + 1)) for i in range(len(sizes) - 2)]


def test_each_span_is_decoded_as_soon_as_its_frames_are_complete(encodec):
    frames = 400
    codes = np.random.default_rng(0).integers(0, 2048, (4, frames), dtype=np.int64)
    emitted = []
    spans = SpanDecoder(frames, HOP, encodec, lambda ch: emitted.append((complete, ch)))
    for complete in range(frames + 1):
        spans.feed(codes, complete)
    assert spans.done
    assert [c for c, _ in emitted] == [spans.needed(i) for i in range(len(spans.bounds) - 1)]
    assert [ch.offset for _, ch in emitted] == [b * HOP for b in spans.bounds[:-1]]
    whole = SpanDecoder(frames, HOP, encodec).finish(codes)        # all at once: the same samples
    np.testing.assert_array_equal(np.concatenate([ch.audio for _, ch in emitted]), whole)


def test_span_joins_stay_close_to_one_encodec_run(encodec):
    frames = 1000
    codes = np.random.default_rng(1).integers(0, 2048, (4, frames), dtype=np.int64)
    one_run = SpanDecoder(frames, HOP, encodec, bounds=[0, frames]).finish(codes)
    spans = SpanDecoder(frames, HOP, encodec).finish(codes)
    err = spans - one_run
    assert spans.shape == one_run.shape == (frames * HOP,) and np.abs(err).max() > 0
    assert 10 * np.log10((one_run ** 2).mean() / (err ** 2).mean()) > 60
    no_context = SpanDecoder(frames, HOP, encodec, left=0, right=0, fade=0).finish(codes)
    assert ((no_context - one_run) ** 2).mean() > 10 * (err ** 2).mean()   # the context matters


@pytest.mark.parametrize("duration", [5, 40])   # 40 s: through a long-form window's re-prime
def test_generate_streams_chunks_that_are_exactly_its_audio(engine, duration):
    chunks = []
    audio = engine.generate("stream test", duration, seed=4, on_chunk=chunks.append)
    assert [c.seq for c in chunks] == list(range(len(chunks))) and len(chunks) > 3
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[0].start_after_sec is not None and all(c.start_after_sec is None for c in chunks[1:])
    np.testing.assert_array_equal(np.concatenate([c.audio for c in chunks]), audio)
    codes = engine.generate_codes("stream test", engine.frames_for(duration), seed=4)
    np.testing.assert_array_equal(engine.decode_audio(codes), audio)   # one decode path


def test_remaining_work_replays_the_engine_order():
    plans = plan_windows(200, 60, 36)
    spans = SpanDecoder(200, HOP, lambda c: np.zeros(c.shape[-1] * HOP, np.float32), bounds=plan_spans(200))
    spans.next = 1                                  # chunk 0 is out
    work, starts = remaining_work(plans, 4, 0, 40, spans)
    steps = [n for kind, n in work if kind == "step"]
    assert steps[:3] == [41, 42, 43] and len(steps) == (64 - 41) + sum(n + 4 - (p + 1) for _, p, n in plans[1:])
    assert [n for kind, n in work if kind == "prime"] == [p + 1 for _, p, _ in plans[1:]]
    assert starts == spans.bounds[1:-1]
    chunk_at = [i for i, (kind, _) in enumerate(work) if kind == "chunk"]
    assert len(chunk_at) == len(spans.bounds) - 2


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("step_sec, expect_wait", [(0.004, False), (0.05, True)])
def test_start_after_is_zero_ahead_of_real_time_and_covers_the_latest_chunk(step_sec, expect_wait):
    """50 frames a second: steps of 4 ms run ahead of real time, steps of 50 ms do not."""
    clock = Clock()
    pacer = Pacer(clock)
    for position in range(1, 31):
        clock.now += step_sec
        pacer.step(position)
    pacer.codec(35, 0.01)
    spans = SpanDecoder(500, HOP, lambda c: c, bounds=plan_spans(500))
    spans.next = 1
    work, starts = remaining_work([(0, 0, 500)], 4, 0, 30, spans)
    offsets = [s / 50 for s in starts]
    wait = pacer.start_after(work, offsets)
    if not expect_wait:
        assert wait == 0
        return
    # replay: every chunk arrives by its play time, stretched by the margin, and no less
    elapsed, late, stretched = 0.0, [], []
    base = pacer.base_step_sec()
    for kind, n in work:
        elapsed += {"step": base * (1 + pacing.STEP_GROWTH * n), "prime": base * pacing.PREFILL_SHARE * n,
                    "chunk": 0.01 / 35 * n}[kind]
        if kind == "chunk":
            late.append(elapsed - offsets[len(late)])
            stretched.append(elapsed * (1 + pacing.MARGIN) + pacing.SLACK_SEC - offsets[len(stretched)])
    assert wait >= max(late) > 0
    assert wait == pytest.approx(max(stretched), abs=1e-3)


def test_each_request_teaches_the_next_its_step_growth_and_encodec_pace():
    clock = Clock()
    pacer = Pacer(clock)
    for position in range(1, 600):
        clock.now += 0.02 * (1 + 2e-3 * position)      # 20 ms, growing 0.2 % a position
        pacer.step(position)
    pacer.codec(20, 0.5)                               # the first run pays for the session
    pacer.codec(100, 0.2)
    pacer.codec(100, 0.2)
    pace = pacer.learned()
    assert pace.step_growth == pytest.approx(2e-3, rel=0.02)
    assert pace.codec_sec_per_frame == pytest.approx(0.002)
    later = Pacer(clock, pace)
    later.codec(20, 0.5)
    assert later.codec_sec_per_frame() == pytest.approx(0.002)
    assert pacing.fit_growth([(p, 0.02) for p in range(1, 60)]) is None   # too few positions to tell
    short = Pacer(clock, pace)                          # a shorter request keeps the wider fit
    for position in range(1, 300):
        clock.now += 0.02
        short.step(position)
    assert short.learned().step_growth == pace.step_growth


def test_a_busy_minute_barely_moves_the_fitted_growth():
    steps = [(p, 0.02 * (1 + 1e-3 * p) * (3 if 400 <= p < 500 else 1)) for p in range(1, 1000)]
    assert pacing.fit_growth(steps) == pytest.approx(1e-3, rel=0.1)
    flat_then_spike = [(p, 0.02 * (10 if p > 900 else 1)) for p in range(1, 1000)]
    assert pacing.fit_growth(flat_then_spike) <= 1e-4


def test_the_next_request_follows_the_measured_shape_of_the_steps():
    """Steps flat for 500 positions, then twice as steep: the profile keeps the bend that
    one straight line would smooth away."""
    clock = Clock()
    pacer = Pacer(clock)

    def cost(p: int) -> float:
        return 0.02 if p < 500 else 0.02 * (1 + 2e-3 * (p - 500))

    for position in range(1, 1500):
        clock.now += cost(position)
        pacer.step(position)
    pace = pacer.learned()
    for position in (100, 400, 800, 1400):
        assert pace.cost(position) * 0.02 == pytest.approx(cost(position), rel=0.05)
    assert pace.cost(3000) > pace.cost(1400)    # past the profile, it keeps growing
