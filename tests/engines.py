"""A scripted engine for supervision tests: it behaves as its prompt tells it.

Directives in the prompt (anything else is plain text):
  step=SECONDS   time per token (default 0.002)
  crash@N        SIGKILL itself at token N        oom@N   raise MemoryError at token N
  hang@N         stop sending anything at token N nan@N   report non-finite logits at token N
  loadfail       fail to load the model (on the first job only if the prompt asks)
It loads through the same worker code path as the real engine (files located by
lofid.worker.assets first), and returns deterministic audio from the seed.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np

from lofid import errors
from lofid.errors import LofiError


class ScriptedEngine:
    sample_rate = 32000
    frame_rate = 50
    provider = "CPUExecutionProvider"
    device = "cpu"

    def __init__(self, root: Path, variant: str, threads: int) -> None:
        self.root, self.variant, self.threads = root, variant, threads
        self.load_time_sec = 0.0

    @classmethod
    def load(cls, root: Path, variant: str, *, device: str = "auto", threads: int | None = None) -> "ScriptedEngine":
        if os.environ.get("LOFID_TEST_LOAD_SLEEP"):
            time.sleep(float(os.environ["LOFID_TEST_LOAD_SLEEP"]))
        if device not in ("auto", "cpu"):
            raise LofiError(errors.MODEL_LOAD_FAILED, f"device {device!r} is not available in the scripted engine")
        return cls(root, variant, threads or 1)

    def generate(self, prompt, duration_sec, seed, *, top_k=250, temperature=1.0, guidance_scale=3.0, progress=None):
        directives = dict(re.findall(r"(\w+)[=@]([\d.]+)", prompt))
        step = float(directives.get("step", 0.002))
        frames = round(duration_sec * self.frame_rate)
        total = frames + 3
        for i in range(total + 1):
            if i == int(directives.get("crash", -1)):
                os.kill(os.getpid(), signal.SIGKILL)
            if i == int(directives.get("oom", -1)):
                raise MemoryError()
            if i == int(directives.get("nan", -1)):
                raise LofiError(errors.MODEL_INFERENCE_FAILED, "the decoder produced NaN/inf logits")
            if i == int(directives.get("hang", -1)):
                time.sleep(3600)
            if progress is not None:
                progress(i, total)
            if i < total:
                time.sleep(step)
        rng = np.random.default_rng(seed)
        t = np.arange(frames * 640) / self.sample_rate
        return (0.3 * np.sin(2 * np.pi * rng.uniform(110, 880) * t)).astype(np.float32)
