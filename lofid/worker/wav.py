"""16-bit PCM mono WAV, written to a temporary name and renamed."""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np


def pcm16(audio: np.ndarray) -> bytes:
    """float audio in [-1, 1] -> little-endian int16 samples (clipped, rounded)."""
    samples = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    return np.round(samples * 32767.0).astype("<i2").tobytes()


def write(final: Path, audio: np.ndarray, sample_rate: int, tmp: Path) -> None:
    """Write ``audio`` to ``tmp``, fsync, rename to ``final``; remove ``tmp`` on failure."""
    try:
        with open(tmp, "wb") as f:
            with wave.open(f, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(int(sample_rate))
                w.writeframes(pcm16(audio))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
