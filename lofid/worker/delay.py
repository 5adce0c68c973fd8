"""The codebook delay pattern of MusicGen, in numpy, exactly as transformers builds it.

A sequence of ``frames`` frames of ``K`` codebooks is decoded over ``frames + K`` positions:
position 0 holds the start token for every codebook, and position ``t`` holds frame
``t - 1 - k`` of codebook ``k``. Where that frame does not exist (before the start, past
the end) the position holds the pad token. transformers forces the pad into the *last*
positions too (codebook k is padded in its final ``K - 1 - k`` positions), so N frames
take ``N + K - 1`` generated positions and come out as exactly N frames.

Arrays here are ``[K, T]`` (codebooks first). ``UNKNOWN`` (-1) marks a position the
decoder still has to generate.
"""

from __future__ import annotations

import numpy as np

UNKNOWN = -1


def generated_positions(frames: int, num_codebooks: int) -> int:
    """How many positions the decoder produces for ``frames`` frames (N + K - 1)."""
    return frames + num_codebooks - 1


def build_template(prime: np.ndarray, frames: int, pad: int) -> np.ndarray:
    """The delayed sequence for a window of ``frames`` frames, primed with known frames.

    prime: ``[K, P]`` codes already known (P may be 0), P <= frames.
    Returns ``[K, frames + K]`` int64: the start token at position 0, ``pad`` where the
    pattern forces it, the primed codes where they fall, and ``UNKNOWN`` elsewhere.
    """
    num_codebooks, primed = prime.shape
    if primed > frames:
        raise ValueError(f"prime of {primed} frames is longer than the window ({frames})")
    seq = np.full((num_codebooks, frames + num_codebooks), UNKNOWN, dtype=np.int64)
    seq[:, 0] = pad
    for k in range(num_codebooks):
        seq[k, 1 : 1 + k] = pad                       # start padding
        seq[k, 1 + k : 1 + k + primed] = prime[k]     # teacher-forced frames
        seq[k, 1 + k + frames :] = pad                # end padding
    return seq


def undo(seq: np.ndarray) -> np.ndarray:
    """``[K, N + K]`` delayed sequence -> ``[K, N]`` frames (codebook k shifted back by k+1)."""
    num_codebooks, length = seq.shape
    frames = length - num_codebooks
    out = np.stack([seq[k, 1 + k : 1 + k + frames] for k in range(num_codebooks)])
    if (out < 0).any():
        raise ValueError("delayed sequence still has unknown positions")
    return out


def prefill_length(seq: np.ndarray) -> int:
    """Number of leading positions whose every codebook is known (>= 1: the start)."""
    unknown = (seq == UNKNOWN).any(axis=0)
    idx = np.flatnonzero(unknown)
    return int(idx[0]) if idx.size else seq.shape[1]
