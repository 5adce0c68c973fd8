"""The delay pattern against a line-by-line port of transformers' build_delay_pattern_mask."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lofid.worker import delay

PAD = 2048


def transformers_pattern(num_codebooks: int, max_length: int) -> np.ndarray:
    """transformers MusicgenForCausalLM.build_delay_pattern_mask for a BOS-only prompt:
    -1 where the model generates, PAD where the pattern forces it."""
    shifted = np.full((num_codebooks, max_length), -1)
    for k in range(num_codebooks):   # input_ids_shifted[:, k, k : seq_len + k] = BOS
        shifted[k, k : 1 + k] = PAD
    pattern = np.triu(np.ones((num_codebooks, max_length), bool), max_length - num_codebooks + 1)
    pattern |= np.tril(np.ones((num_codebooks, max_length), bool))
    return np.where(~pattern, shifted, PAD)


@pytest.mark.parametrize("num_codebooks", [1, 2, 4, 8])
@pytest.mark.parametrize("frames", [1, 2, 5, 50])
def test_template_matches_transformers(num_codebooks, frames):
    empty = np.zeros((num_codebooks, 0), np.int64)
    seq = delay.build_template(empty, frames, PAD)
    # transformers: max_length = 1 (BOS) + max_new_tokens, max_new_tokens = N + K - 1
    expected = transformers_pattern(num_codebooks, 1 + frames + num_codebooks - 1)
    np.testing.assert_array_equal(seq, expected)
    assert delay.generated_positions(frames, num_codebooks) == seq.shape[1] - 1
    assert delay.prefill_length(seq) == 1


def test_four_codebooks_by_hand():
    codes = np.array([[10, 11], [20, 21], [30, 31], [40, 41]])
    seq = delay.build_template(codes, 2, PAD)
    P = PAD
    np.testing.assert_array_equal(seq, [
        [P, 10, 11, P, P, P],
        [P, P, 20, 21, P, P],
        [P, P, P, 30, 31, P],
        [P, P, P, P, 40, 41],
    ])
    np.testing.assert_array_equal(delay.undo(seq), codes)


@given(st.integers(1, 6), st.integers(1, 40), st.data())
def test_prime_roundtrip(num_codebooks, frames, data):
    primed = data.draw(st.integers(0, frames))
    codes = np.arange(num_codebooks * frames).reshape(num_codebooks, frames)
    seq = delay.build_template(codes[:, :primed], frames, PAD)
    # every position of frames < primed is known; the prefill covers positions 0..primed
    assert delay.prefill_length(seq) == (primed + 1 if primed < frames else seq.shape[1])
    unknown = seq == delay.UNKNOWN
    for k in range(num_codebooks):
        seq[k, 1 + k : 1 + k + frames] = np.where(unknown[k, 1 + k : 1 + k + frames],
                                                   codes[k], seq[k, 1 + k : 1 + k + frames])
    np.testing.assert_array_equal(delay.undo(seq), codes)


def test_undo_refuses_unknown_and_prime_too_long():
    seq = delay.build_template(np.zeros((4, 0), np.int64), 3, PAD)
    with pytest.raises(ValueError):
        delay.undo(seq)
    with pytest.raises(ValueError):
        delay.build_template(np.zeros((4, 5), np.int64), 3, PAD)
