"""Error codes of the lofid protocol and the one exception type that carries them.

Every error a user can cause maps to exactly one code (see docs/protocol.md).
A ``LofiError`` raised anywhere in the broker or the worker travels to the client
as the rpc error map ``{code, message, **data}``.
"""

from __future__ import annotations

# Spec codes
MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
MODEL_INFERENCE_FAILED = "MODEL_INFERENCE_FAILED"
QUEUE_FULL = "QUEUE_FULL"
INVALID_DURATION = "INVALID_DURATION"
MODEL_DOWNLOAD_FAILED = "MODEL_DOWNLOAD_FAILED"
# Added by lofid
INVALID_PARAMS = "INVALID_PARAMS"
UNKNOWN_METHOD = "UNKNOWN_METHOD"
TRACK_NOT_FOUND = "TRACK_NOT_FOUND"
STORAGE_FAILED = "STORAGE_FAILED"
INTERNAL = "INTERNAL"

CODES = frozenset(
    {
        MODEL_NOT_FOUND,
        MODEL_LOAD_FAILED,
        MODEL_INFERENCE_FAILED,
        QUEUE_FULL,
        INVALID_DURATION,
        MODEL_DOWNLOAD_FAILED,
        INVALID_PARAMS,
        UNKNOWN_METHOD,
        TRACK_NOT_FOUND,
        STORAGE_FAILED,
        INTERNAL,
    }
)


class LofiError(Exception):
    """An error with a protocol code, a human sentence and optional extra fields."""

    def __init__(self, code: str, message: str, **data: object) -> None:
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_dict(self) -> dict:
        """The wire form: ``{code, message, **data}`` (data never overrides the two)."""
        return {**self.data, "code": self.code, "message": self.message}

    @classmethod
    def from_dict(cls, d: dict) -> LofiError:
        data = {k: v for k, v in d.items() if k not in ("code", "message")}
        code = d.get("code", INTERNAL)
        if code not in CODES:
            code = INTERNAL
        return cls(code, str(d.get("message", "")), **data)

    def __reduce__(self):  # picklable across the worker pipe, data included
        return (_rebuild, (self.code, self.message, self.data))

    def __repr__(self) -> str:
        return f"LofiError({self.code}, {self.message!r})"


def _rebuild(code: str, message: str, data: dict) -> LofiError:
    return LofiError(code, message, **data)
