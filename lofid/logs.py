"""Logging for the broker and the worker: one line per event on stderr, which journald
(with a syslog priority prefix) or launchd takes from there."""

from __future__ import annotations

import logging
import os
import sys

# syslog priorities, understood by journald at the start of a line (SyslogLevelPrefix=)
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class OneLineFormatter(logging.Formatter):
    """One line per event, tracebacks included; a syslog priority prefix for journald."""

    def __init__(self, journal: bool, program: str = "lofid") -> None:
        plain = f"%(asctime)s {program}[%(process)d] %(levelname)s %(name)s: %(message)s"
        super().__init__("%(name)s: %(message)s" if journal else plain)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " | ")
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{text}"
        return text


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=dev:ino when stderr is connected to the journal."""
    try:
        dev, ino = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str, program: str = "lofid") -> None:
    """Log lofid's own events at ``level`` (other libraries: warnings and up) to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(_stderr_is_journal(), program))
    lofid_level = getattr(logging, level.upper())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(lofid_level, logging.WARNING))  # other libraries: warnings and up
    logging.getLogger("lofid").setLevel(lofid_level)
