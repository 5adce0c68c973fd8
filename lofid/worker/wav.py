"""16-bit PCM mono WAV (scipy.io.wavfile), written to a temporary name and renamed."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from scipy.io import wavfile

from lofid import paths


def pcm16(audio: np.ndarray) -> np.ndarray:
    """float audio in [-1, 1] -> int16 samples (clipped, rounded)."""
    samples = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    return np.round(samples * 32767.0).astype(np.int16)


def write(final: Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write ``audio`` as ``final`` atomically (temporary name, fsync, rename)."""
    buf = io.BytesIO()
    wavfile.write(buf, int(sample_rate), pcm16(audio))
    paths.write_atomic(final, buf.getvalue())
