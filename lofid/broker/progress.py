"""Progress of the running job: token counts in, notifications at each 5 % step out."""

from __future__ import annotations

import time

PROGRESS_STEP = 5
# EnCodec decodes the audio span by span while the tokens come (spans.py); after the last
# token only the last span (about 1 s of audio, with its context) is decoded and the WAV
# is written: a few % of a request's time. The tokens fill the first 97 %; the rest goes
# out when the worker says the audio is decoded.
TAIL_SHARE = 0.03


class Progress:
    """Turns token counts into notifications at each 5 % step, with an ETA from the rate."""

    def __init__(self) -> None:
        self.next_percent = 0
        self.percent = 0
        self.started: float | None = None  # time of the first token

    def update(self, generated: int, estimated: int, decoded: bool = False) -> list[dict]:
        """``decoded``: the audio is decoded too (only the WAV write is left)."""
        t = time.monotonic()
        if self.started is None and generated > 0:
            self.started, self.first = t, generated
        share = 1.0 if decoded else (1 - TAIL_SHARE) * generated / max(1, estimated)
        percent = min(99, int(100 * share))
        out = []
        while self.next_percent <= percent and self.next_percent < 100:
            eta = None
            if self.started is not None and generated > self.first:
                rate = (generated - self.first) / max(1e-6, t - self.started)
                eta = round((estimated - generated) / rate, 1)
            out.append({"percent": self.next_percent, "tokens_generated": generated,
                        "tokens_estimated": estimated, "eta_sec": eta})
            self.percent = self.next_percent
            self.next_percent += PROGRESS_STEP
        return out
