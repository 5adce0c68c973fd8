"""Checking what clients send: every method takes at most one argument, a map with known
keys; ``generate``'s values are checked here so that bad input is answered at once with
INVALID_PARAMS or INVALID_DURATION and never queued."""

from __future__ import annotations

import math
import secrets
from typing import Any

from lofid import errors
from lofid.errors import LofiError

PROMPT_MAX = 2000
DURATION_MIN, DURATION_MAX, DURATION_DEFAULT = 5.0, 120.0, 30.0
SEED_MAX = 2**32 - 1


def one_map(params: list, allowed: set[str]) -> dict:
    """Every method takes at most one argument, a map with known keys."""
    if len(params) > 1:
        raise LofiError(errors.INVALID_PARAMS, "expected at most one argument, a map")
    arg = params[0] if params else {}
    if arg is None:
        arg = {}
    if not isinstance(arg, dict):
        raise LofiError(errors.INVALID_PARAMS, "the argument must be a map")
    unknown = [k for k in arg if k not in allowed]
    if unknown:
        raise LofiError(errors.INVALID_PARAMS, f"unknown key(s): {_some(unknown)}")
    return arg


def _some(keys: list, shown: int = 5, width: int = 40) -> str:
    """A few of ``keys`` for an error message, each cut short: never an echo of the whole request."""
    names = sorted(repr(k)[:width] if not isinstance(k, str) else k[:width] for k in keys[:1000])[:shown]
    more = len(keys) - len(names)
    return ", ".join(names) + (f" and {more} more" if more else "")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_generate(params: list) -> dict:
    arg = one_map(params, {"prompt", "duration_sec", "seed", "priority", "allow_download", "stream"})
    prompt = arg.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise LofiError(errors.INVALID_PARAMS, "prompt is required: a non-empty string")
    if len(prompt) > PROMPT_MAX:
        raise LofiError(errors.INVALID_PARAMS, f"prompt is {len(prompt)} characters; at most {PROMPT_MAX}")
    duration = arg.get("duration_sec", DURATION_DEFAULT)
    if not _is_number(duration):
        raise LofiError(errors.INVALID_PARAMS, "duration_sec must be a number of seconds")
    if not (math.isfinite(duration) and DURATION_MIN <= duration <= DURATION_MAX):
        raise LofiError(errors.INVALID_DURATION,
                        f"duration_sec must be between {DURATION_MIN:g} and {DURATION_MAX:g}, not {duration}")
    seed = arg.get("seed")
    if seed is None:
        seed = secrets.randbelow(SEED_MAX + 1)
    elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise LofiError(errors.INVALID_PARAMS, f"seed must be an integer 0..{SEED_MAX}")
    priority = arg.get("priority", "normal")
    if priority not in ("normal", "high"):
        raise LofiError(errors.INVALID_PARAMS, 'priority must be "normal" or "high"')
    allow = arg.get("allow_download")
    if allow is not None and not isinstance(allow, bool):
        raise LofiError(errors.INVALID_PARAMS, "allow_download must be true or false")
    stream = arg.get("stream", False)
    if not isinstance(stream, bool):
        raise LofiError(errors.INVALID_PARAMS, "stream must be true or false")
    return {"prompt": prompt, "duration_sec": float(duration), "seed": seed, "priority": priority,
            "allow_download": allow, "stream": stream}
