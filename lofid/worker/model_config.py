"""What the engine reads from the model's ``small/config.json``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lofid.errors import MODEL_LOAD_FAILED, LofiError
from lofid.worker.sessions import REPAIR


@dataclass(frozen=True)
class ModelConfig:
    """What the engine reads from ``small/config.json``."""

    num_codebooks: int
    pad_token_id: int
    max_positions: int
    num_heads: int
    head_dim: int
    sample_rate: int
    hop_length: int

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sample_rate / self.hop_length)

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            cfg = json.loads(path.read_text())
            dec, audio = cfg["decoder"], cfg["audio_encoder"]
            heads = int(dec["num_attention_heads"])
            return cls(
                num_codebooks=int(dec["num_codebooks"]),
                pad_token_id=int(dec["pad_token_id"]),
                max_positions=int(dec["max_position_embeddings"]),
                num_heads=heads,
                head_dim=int(dec["hidden_size"]) // heads,
                sample_rate=int(audio["sampling_rate"]),
                hop_length=int(np.prod(audio["upsampling_ratios"])),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LofiError(MODEL_LOAD_FAILED, f"cannot read {path}: {e}; {REPAIR}",
                            file=str(path)) from e
