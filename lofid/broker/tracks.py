"""Track ids and the track cache.

A track id is the first 16 hex digits of SHA-256 over the canonical JSON of
``{"prompt", "seed", "duration_sec", "model_version"}`` (keys sorted, UTF-8, no
spaces, duration as a float). The same four values always give the same id.

The cache folder holds ``<track_id>.wav`` (written by the worker) and
``<track_id>.json`` (the track record, written here). Both are written to a
temporary name beginning with ``.`` and renamed, so a final name is never half
written; the JSON is renamed last and marks the track complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from lofid import errors
from lofid.errors import LofiError

log = logging.getLogger(__name__)

TRACK_ID_LEN = 16
_TRACK_ID = re.compile(rf"^[0-9a-f]{{{TRACK_ID_LEN}}}$")
TMP_PREFIX = "."


def track_id(prompt: str, seed: int, duration_sec: float, model_version: str) -> str:
    canonical = json.dumps(
        {"prompt": prompt, "seed": int(seed), "duration_sec": float(duration_sec), "model_version": model_version},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:TRACK_ID_LEN]


def check_track_id(value: object) -> str:
    """Validate a client-supplied id before any path is built from it."""
    if not isinstance(value, str) or not _TRACK_ID.match(value):
        raise LofiError(errors.INVALID_PARAMS, f"track_id must be {TRACK_ID_LEN} lowercase hex digits")
    return value


def tmp_path(final: Path) -> Path:
    """The temporary name a final file is written under before its rename."""
    return final.with_name(f"{TMP_PREFIX}{final.name}.{os.getpid()}.tmp")


def write_atomic(final: Path, data: bytes) -> None:
    tmp = tmp_path(final)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class TrackCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def prepare(self) -> None:
        """Create the folder; remove temporary files and half tracks of dead runs."""
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.root.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.name.endswith(".tmp"):
                log.info("removing leftover temporary file %s", p.name)
                p.unlink(missing_ok=True)
            elif p.suffix == ".wav" and not p.with_suffix(".json").exists():
                log.info("removing %s: its run died before the track was recorded", p.name)
                p.unlink(missing_ok=True)

    def wav_path(self, tid: str) -> Path:
        return self.root / f"{check_track_id(tid)}.wav"

    def get(self, tid: str) -> dict | None:
        """The record of a complete track, or None."""
        check_track_id(tid)
        try:
            record = json.loads((self.root / f"{tid}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        if not self.wav_path(tid).exists():
            return None
        record["path"] = str(self.wav_path(tid))
        return record

    def put(self, record: dict) -> dict:
        """Record a finished track whose WAV is already in place."""
        tid = check_track_id(record["track_id"])
        record = {**record, "status": "complete", "path": str(self.wav_path(tid))}
        try:
            write_atomic(self.root / f"{tid}.json", json.dumps(record, indent=1, ensure_ascii=False).encode())
        except OSError as e:
            raise LofiError(errors.STORAGE_FAILED, f"cannot write the track record in {self.root}: {e}") from None
        return record

    def list(self, limit: int | None = None) -> list[dict]:
        records = []
        for p in self.root.glob("*.json"):
            if _TRACK_ID.match(p.stem):
                record = self.get(p.stem)
                if record is not None:
                    records.append(record)
        records.sort(key=lambda r: r.get("created_at", 0), reverse=True)
        return records[:limit] if limit is not None else records


def now() -> float:
    return round(time.time(), 3)
