"""What lofictl prints: progress bars on stderr, results on stdout (text or ``--json``),
and errors as ``lofictl: CODE: message``."""

from __future__ import annotations

import json
import sys


class CliError(Exception):
    """An error found by lofictl itself (not sent by the daemon), with its code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def print_error(code: str, message: str) -> None:
    print(f"lofictl: {code}: {message}", file=sys.stderr)


class Bar:
    """One progress line on stderr, redrawn in place on a terminal, else a line per 10 %."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last_text = None
        self.last_label, self.last_decile = None, -1

    def show(self, label: str, percent: float, extra: str = "") -> None:
        if self.quiet:
            return
        percent = max(0.0, min(100.0, percent))
        if self.tty:
            filled = int(percent / 100 * 30)
            text = f"\r{label:<10} [{'#' * filled}{'.' * (30 - filled)}] {percent:3.0f}% {extra}"
            if text != self.last_text:
                sys.stderr.write(text.ljust(78))
                sys.stderr.flush()
                self.last_text = text
        elif (label, int(percent // 10)) != (self.last_label, self.last_decile):
            self.last_label, self.last_decile = label, int(percent // 10)
            print(f"{label} {percent:.0f}% {extra}".rstrip(), file=sys.stderr)

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
