"""16-bit PCM mono WAV (scipy.io.wavfile), written to a temporary name and renamed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy.io import wavfile


def pcm16(audio: np.ndarray) -> np.ndarray:
    """float audio in [-1, 1] -> int16 samples (clipped, rounded)."""
    samples = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    return np.round(samples * 32767.0).astype(np.int16)


def write(final: Path, audio: np.ndarray, sample_rate: int, tmp: Path) -> None:
    """Write ``audio`` to ``tmp``, fsync, rename to ``final``; remove ``tmp`` on failure."""
    try:
        with open(tmp, "wb") as f:
            wavfile.write(f, int(sample_rate), pcm16(audio))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
