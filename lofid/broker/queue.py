"""The pending jobs: at most ``MAX_PENDING``, high priority ahead of normal, FIFO within
a class, one job per track id. The running job is held here too but not counted."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lofid import errors
from lofid.broker.streams import TrackStream
from lofid.errors import LofiError

MAX_PENDING = 10
PRIORITIES = ("high", "normal")


@dataclass(eq=False)
class Job:
    track_id: str
    prompt: str
    duration_sec: float
    seed: int
    wav_path: Path  # where the worker writes the audio: the track cache's name for it
    priority: str = "normal"
    allow_download: bool = False
    waiters: set = field(default_factory=set)  # connections that asked for this track
    stream: TrackStream = field(init=False)     # its audio so far, and who streams it

    def __post_init__(self) -> None:
        self.stream = TrackStream(self.track_id)

    def to_worker(self) -> dict[str, Any]:
        return {"track_id": self.track_id, "prompt": self.prompt, "duration_sec": self.duration_sec,
                "seed": self.seed, "allow_download": self.allow_download, "wav_path": str(self.wav_path)}


class JobQueue:
    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self.max_pending = max_pending
        self._lanes: dict[str, collections.deque[Job]] = {p: collections.deque() for p in PRIORITIES}
        self.running: Job | None = None

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def pending(self) -> list[Job]:
        return [job for p in PRIORITIES for job in self._lanes[p]]

    def find(self, track_id: str) -> Job | None:
        if self.running is not None and self.running.track_id == track_id:
            return self.running
        return next((j for j in self.pending() if j.track_id == track_id), None)

    def position(self, job: Job) -> int:
        """0 = running or next; n = n jobs run before it."""
        if job is self.running:
            return 0
        ahead = self.pending().index(job)
        return ahead + (1 if self.running is not None else 0)

    def push(self, job: Job) -> int:
        if len(self) >= self.max_pending:
            raise LofiError(errors.QUEUE_FULL, f"the queue already holds {self.max_pending} pending requests; "
                            "try again when one has finished", max_pending=self.max_pending)
        self._lanes[job.priority].append(job)
        return self.position(job)

    def start_next(self) -> Job | None:
        """Make the first pending job the running one and return it (None when empty)."""
        lane = next((self._lanes[p] for p in PRIORITIES if self._lanes[p]), None)
        self.running = lane.popleft() if lane else None
        return self.running

    def finish(self) -> None:
        self.running = None

    def drain(self) -> list[Job]:
        """Remove and return every pending job."""
        jobs = self.pending()
        for lane in self._lanes.values():
            lane.clear()
        return jobs
