"""msgpack-rpc framing, shared by the broker and the Python client.

The stream is plain concatenated msgpack arrays (the dialect Neovim speaks):
request ``[0, msgid, method, params]``, response ``[1, msgid, error, result]``,
notification ``[2, method, params]``. This module turns bytes into checked message
objects and back; it knows nothing about methods or sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
MAX_FRAME_BYTES = 1 << 20
MAX_MSGID = 2**32 - 1


class FrameError(Exception):
    """The byte stream cannot be decoded any further; the connection must close."""


class MessageError(Exception):
    """A well-formed msgpack value that is not a valid rpc message.

    ``msgid`` is set when the value looked enough like a request to answer it.
    """

    def __init__(self, message: str, msgid: int | None = None) -> None:
        super().__init__(message)
        self.msgid = msgid


@dataclass(frozen=True)
class Request:
    msgid: int
    method: str
    params: list


@dataclass(frozen=True)
class Response:
    msgid: int
    error: Any
    result: Any


@dataclass(frozen=True)
class Notification:
    method: str
    params: list


Message = Request | Response | Notification


class Decoder:
    """Feed bytes, get whole msgpack values. A frame larger than the limit is a FrameError."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max_frame_bytes)
        self._fed = 0  # bytes fed in total
        self._consumed = 0  # bytes up to the end of the last whole value

    def feed(self, data: bytes) -> list[Any]:
        self._fed += len(data)
        values = []
        try:
            self._unpacker.feed(data)
            for value in self._unpacker:
                values.append(value)
                self._consumed = self._unpacker.tell()  # read at the yield: the value's end
            return values
        except msgpack.BufferFull:
            raise FrameError("frame larger than the size limit") from None
        except Exception as e:  # FormatError, StackError, ExtraData, UnicodeDecodeError, ...
            raise FrameError(f"undecodable msgpack ({type(e).__name__})") from None

    @property
    def pending(self) -> bool:
        """True while part of a frame is buffered (bytes fed but not yet decoded)."""
        return self._fed > self._consumed


def parse(value: Any) -> Message:
    """Check one decoded value and return the message it is, or raise MessageError."""
    if not isinstance(value, list) or not value or type(value[0]) is not int \
            or value[0] not in (REQUEST, RESPONSE, NOTIFICATION):
        raise MessageError("not a msgpack-rpc message (expected [type, ...] with type 0, 1 or 2)")
    kind = value[0]
    if kind == REQUEST:
        msgid = value[1] if len(value) > 1 else None
        if not _is_msgid(msgid):
            raise MessageError("request msgid must be an integer 0..2^32-1")
        if len(value) != 4:
            raise MessageError("a request is [0, msgid, method, params]", msgid)
        _, msgid, method, params = value
        if not isinstance(method, str):
            raise MessageError("method must be a string", msgid)
        if not isinstance(params, list):
            raise MessageError("params must be an array", msgid)
        return Request(msgid, method, params)
    if kind == RESPONSE:
        if len(value) != 4 or not _is_msgid(value[1]):
            raise MessageError("a response is [1, msgid, error, result]")
        return Response(value[1], value[2], value[3])
    if len(value) != 3 or not isinstance(value[1], str) or not isinstance(value[2], list):
        raise MessageError("a notification is [2, method, params]")
    return Notification(value[1], value[2])


def _is_msgid(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_MSGID


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def request(msgid: int, method: str, params: list) -> bytes:
    return pack([REQUEST, msgid, method, params])


def response(msgid: int | None, error: Any, result: Any) -> bytes:
    return pack([RESPONSE, msgid, error, result])


def notification(method: str, params: list) -> bytes:
    return pack([NOTIFICATION, method, params])
