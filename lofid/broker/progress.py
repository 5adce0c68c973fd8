"""Progress of the running job: token counts in, notifications at each 5 % step out."""

from __future__ import annotations

import time

PROGRESS_STEP = 5


class Progress:
    """Turns token counts into notifications at each 5 % step, with an ETA from the rate."""

    def __init__(self) -> None:
        self.next_percent = 0
        self.percent = 0
        self.started: float | None = None  # time of the first token

    def update(self, generated: int, estimated: int) -> list[dict]:
        t = time.monotonic()
        if self.started is None and generated > 0:
            self.started, self.first = t, generated
        percent = min(99, (100 * generated) // max(1, estimated))
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
