"""What lofictl prints: progress lines on stderr, results on stdout (text or ``--json``),
and errors as ``lofictl: CODE: message``.

Besides the daemon's codes (lofid.errors), lofictl's own, shared with the Neovim plugin
(clients/nvim/lua/lofi/errors.lua): NOT_RUNNING, START_FAILED, TIMEOUT, DISCONNECTED,
BAD_FRAME, NO_PLAYER, PLAYER_FAILED, CANCELLED, UNTRUSTED_DAEMON; and INVALID_CONFIG, TRACK_NOT_READY,
SERVICE_FAILED. Bad arguments are INVALID_PARAMS, as the daemon says of bad parameters.
"""

from __future__ import annotations

import json
import sys

NOT_RUNNING = "NOT_RUNNING"  # nothing answers on the socket
START_FAILED = "START_FAILED"  # lofictl started lofid but it does not answer
TIMEOUT = "TIMEOUT"  # no answer within --timeout
DISCONNECTED = "DISCONNECTED"  # the daemon closed the connection with the request unanswered
BAD_FRAME = "BAD_FRAME"  # the daemon sent bytes that are not msgpack-rpc
NO_PLAYER = "NO_PLAYER"
PLAYER_FAILED = "PLAYER_FAILED"
CANCELLED = "CANCELLED"  # the user said no
UNTRUSTED_DAEMON = "UNTRUSTED_DAEMON"  # the socket is another user's, or lofid gave a path no lofid gives
INVALID_PARAMS = "INVALID_PARAMS"  # a bad argument (the daemon's code for bad parameters)
INTERNAL = "INTERNAL"  # a bug in lofictl
INVALID_CONFIG = "INVALID_CONFIG"
TRACK_NOT_READY = "TRACK_NOT_READY"
SERVICE_FAILED = "SERVICE_FAILED"


class CliError(Exception):
    """An error found by lofictl itself (not sent by the daemon), with its code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def print_error(code: str, message: str) -> None:
    print(f"lofictl: {code}: {message}", file=sys.stderr)


def note(text: str) -> None:
    """A remark on stderr that is not an error."""
    print(f"lofictl: {text}", file=sys.stderr)


class Bar:
    """One progress line on stderr, redrawn in place on a terminal, else a line per 10 %
    (``show``) or per new label (``say``: a line without a percentage)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last_text = None
        self.last_label, self.last_decile = None, -1

    def _draw(self, text: str) -> None:
        if text != self.last_text:
            sys.stderr.write(text.ljust(78))
            sys.stderr.flush()
            self.last_text = text

    def show(self, label: str, percent: float, extra: str = "") -> None:
        if self.quiet:
            return
        percent = max(0.0, min(100.0, percent))
        if self.tty:
            filled = int(percent / 100 * 30)
            self._draw(f"\r{label:<10} [{'#' * filled}{'.' * (30 - filled)}] {percent:3.0f}% {extra}")
        elif (label, int(percent // 10)) != (self.last_label, self.last_decile):
            self.last_label, self.last_decile = label, int(percent // 10)
            print(f"{label} {percent:.0f}% {extra}".rstrip(), file=sys.stderr)

    def say(self, label: str, text: str, ticking: str = "") -> None:
        """``label text``; ``ticking`` (an elapsed time) is redrawn on a terminal only."""
        if self.quiet:
            return
        if self.tty:
            self._draw(f"\r{label:<10} {text} {ticking}".rstrip())
        elif label != self.last_label:
            self.last_label, self.last_decile = label, -1
            print(f"{label} {text}", file=sys.stderr)

    def done(self) -> None:
        if not self.quiet and self.tty and self.last_text:
            sys.stderr.write("\n")
        self.last_text, self.last_label, self.last_decile = None, None, -1


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} GB"


def human_age(sec: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if sec >= size:
            return f"{sec / size:.0f} {unit} ago"
    return f"{max(0, sec):.0f} s ago"


def emit(args, value, text: str) -> None:
    """The command's result on stdout: ``value`` as JSON with --json, else ``text``."""
    print(json.dumps(value, ensure_ascii=False) if args.json else text)
