"""Classifier-free guidance and top-k / temperature sampling with a seeded numpy Generator.

Kept apart from the decode loop (audiocraft's ``_sample_next_token``): the loop hands
over one step's logits and gets one token per codebook back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """Set once per request. top_k 1 (or temperature 0) is greedy argmax."""

    top_k: int = 250
    temperature: float = 1.0
    guidance_scale: float = 3.0

    def __post_init__(self) -> None:
        if int(self.top_k) != self.top_k or self.top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale!r}")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0


def guide(logits: np.ndarray, scale: float) -> np.ndarray:
    """``[2K, V]`` logits (rows 0..K-1 conditional, K..2K-1 unconditional) -> ``[K, V]``.

    ``uncond + (cond - uncond) * scale``, computed in float32 like transformers.
    """
    cond, uncond = np.split(logits.astype(np.float32, copy=False), 2, axis=0)
    return uncond + (cond - uncond) * np.float32(scale)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """One token per row of ``[K, V]`` logits -> ``[K]`` int64.

    Greedy takes the argmax and draws nothing from ``rng``. Otherwise the ``top_k``
    largest logits (in index order, so the draw does not depend on a sort's tie order)
    are softmaxed at ``temperature`` in float64, and one uniform per row picks a token.
    """
    if params.greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)
    k = min(int(params.top_k), logits.shape[-1])
    top = np.sort(np.argpartition(-logits, k - 1, axis=-1)[:, :k], axis=-1)   # [K, k]
    vals = np.take_along_axis(logits, top, axis=-1).astype(np.float64) / params.temperature
    vals -= vals.max(axis=-1, keepdims=True)
    cdf = np.cumsum(np.exp(vals), axis=-1)                                    # [K, k]
    u = rng.random(logits.shape[0]) * cdf[:, -1]                               # [K]
    pick = np.array([np.searchsorted(c, x, side="right") for c, x in zip(cdf, u, strict=True)])
    pick = np.minimum(pick, k - 1)
    return top[np.arange(top.shape[0]), pick].astype(np.int64)
