"""Track ids and the track cache.

A track id is the first 16 hex digits of SHA-256 over the canonical JSON of
``{"prompt", "seed", "duration_sec", "model_version", "top_k", "temperature",
"guidance_scale"}`` (keys sorted, UTF-8, no spaces, duration, temperature and guidance
as floats): everything that changes the audio. The same values always give the same id.

The cache folder holds ``<track_id>.wav`` (written by the worker) and
``<track_id>.json`` (the track record, written here). Both are written to a
temporary name beginning with ``.`` and renamed, so a final name is never half
written; the JSON is renamed last and marks the track complete.

Least recently used: the modification time of ``<track_id>.json`` is the track's last
access. Writing the record sets it; a cache hit of ``generate`` and every ``track``
look-up (``lofictl play`` uses it) touch it. Listing the tracks does not. Eviction
removes the JSON first, so a track is never complete without its WAV; a WAV left
without its JSON by a crash is removed at the next start.

The folder may be the user's own (``--cache-dir ~/Music/lofi``): only names lofid makes
(``<track_id>.wav``, ``<track_id>.json`` and their temporary files,
``.<track_id>.wav.<pid>.<random>.tmp``) are ever removed, at start, by eviction, by
``cache_prune`` and by ``track_delete``; anything else there is left alone.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from lofid import errors, paths
from lofid.errors import LofiError

log = logging.getLogger(__name__)

TRACK_ID_LEN = 16
FAILURES_KEPT = 100
_TRACK_ID = re.compile(rf"[0-9a-f]{{{TRACK_ID_LEN}}}")  # always with fullmatch
_TRACK_FILE = re.compile(rf"([0-9a-f]{{{TRACK_ID_LEN}}})\.(wav|json)")
_TRACK_TEMP = paths.temp_name_re(rf"[0-9a-f]{{{TRACK_ID_LEN}}}\.(?:wav|json)")  # paths.create_temp's names


def track_id(prompt: str, seed: int, duration_sec: float, model_version: str, *, top_k: int,
             temperature: float, guidance_scale: float) -> str:
    canonical = json.dumps(
        {"prompt": prompt, "seed": int(seed), "duration_sec": float(duration_sec), "model_version": model_version,
         "top_k": int(top_k), "temperature": float(temperature), "guidance_scale": float(guidance_scale)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:TRACK_ID_LEN]


def check_track_id(value: object) -> str:
    """Validate a client-supplied id before any path is built from it."""
    if not isinstance(value, str) or not _TRACK_ID.fullmatch(value):
        raise LofiError(errors.INVALID_PARAMS, f"track_id must be {TRACK_ID_LEN} lowercase hex digits")
    return value


class TrackCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def prepare(self) -> None:
        """Create the folder (0700); remove lofid's temporary files and half tracks of dead
        runs. A folder others could write in is left alone (``check`` says why)."""
        paths.make_dirs(self.root)
        try:
            self.check()
        except LofiError as e:
            log.error("%s; no track is written until it is fixed", e.message)
            return
        for p in self.root.iterdir():
            if is_temp_file(p.name):
                log.info("removing leftover temporary file %s", p.name)
                _unlink_file(p)
            elif (m := _TRACK_FILE.fullmatch(p.name)) and m[2] == "wav" and not p.with_suffix(".json").exists():
                log.info("removing %s: its run died before the track was recorded", p.name)
                _unlink_file(p)

    def check(self) -> None:
        """STORAGE_FAILED unless the folder is this user's and no one else can write in it
        (others could plant files, or symlinks for lofid to follow)."""
        try:
            paths.check_own_dir(self.root, "track cache")
        except OSError as e:
            raise LofiError(errors.STORAGE_FAILED, str(e)) from None

    def wav_path(self, tid: str) -> Path:
        return self.root / f"{check_track_id(tid)}.wav"

    def json_path(self, tid: str) -> Path:
        return self.root / f"{check_track_id(tid)}.json"

    def get(self, tid: str, touch: bool = True) -> dict | None:
        """The record of a complete track, or None. Counts as an access unless ``touch`` is false."""
        check_track_id(tid)
        json_path, wav = self.json_path(tid), self.wav_path(tid)
        try:
            record = json.loads(json_path.read_text())
            wav_size = wav.stat().st_size
            if touch:
                os.utime(json_path)
            st = json_path.stat()
        except (FileNotFoundError, ValueError):
            return None
        record["path"] = str(wav)
        record["size_bytes"] = wav_size + st.st_size
        record["accessed_at"] = round(st.st_mtime, 3)
        return record

    def put(self, record: dict) -> dict:
        """Record a finished track whose WAV is already in place."""
        tid = check_track_id(record["track_id"])
        record = {**record, "status": "complete", "path": str(self.wav_path(tid))}
        try:
            paths.write_atomic(self.root / f"{tid}.json", json.dumps(record, indent=1, ensure_ascii=False).encode())
        except OSError as e:
            raise LofiError(errors.STORAGE_FAILED, f"cannot write the track record in {self.root}: {e}") from None
        return record

    def list(self, limit: int | None = None) -> list[dict]:
        """Complete tracks, newest first (by creation)."""
        records = []
        for p in self.root.glob("*.json"):
            if _TRACK_ID.fullmatch(p.stem):
                record = self.get(p.stem, touch=False)
                if record is not None:
                    records.append(record)
        records.sort(key=lambda r: r.get("created_at", 0), reverse=True)
        return records[:limit] if limit is not None else records

    # -- size cap -------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Complete tracks with their size, least recently used first."""
        out = []
        for p in self.root.glob("*.json"):
            if not _TRACK_ID.fullmatch(p.stem):
                continue
            try:
                st, wav = p.stat(), (p.with_suffix(".wav")).stat()
            except FileNotFoundError:
                continue
            out.append(Entry(p.stem, st.st_size + wav.st_size, st.st_mtime_ns))
        out.sort(key=lambda e: (e.accessed_ns, e.track_id))
        return out

    def delete(self, tid: str) -> int:
        """Remove a complete track; returns the bytes freed. TRACK_NOT_FOUND if there is none."""
        json_path, wav = self.json_path(tid), self.wav_path(tid)
        try:
            size = json_path.stat().st_size + wav.stat().st_size
            json_path.unlink()  # first: without its record the track is no longer complete
        except FileNotFoundError:
            raise LofiError(errors.TRACK_NOT_FOUND, f"no track {tid} in the cache") from None
        except OSError as e:
            raise LofiError(errors.STORAGE_FAILED, f"cannot remove track {tid}: {e}") from None
        wav.unlink(missing_ok=True)
        return size

    def shrink(self, max_bytes: int, keep: frozenset[str] | set[str] = frozenset()) -> list[Entry]:
        """Remove least recently used tracks until the cache holds at most ``max_bytes``.

        Tracks in ``keep`` (the one just finished) are never removed, nor is anything not
        complete yet (a WAV being written has no record). Returns the removed entries.
        """
        entries = self.entries()
        total = sum(e.size for e in entries)
        removed = []
        for e in entries:
            if total <= max_bytes:
                break
            if e.track_id in keep:
                continue
            try:
                self.delete(e.track_id)
            except LofiError as err:  # removed meanwhile, or the disk refuses: skip it
                log.warning("cannot evict %s: %s", e.track_id, err.message)
                continue
            total -= e.size
            removed.append(e)
        return removed


class Failures:
    """The tracks that failed in this daemon's lifetime, the last ``FAILURES_KEPT``: their
    record ``{track_id, status: "failed", error: {code, message}, ...}`` answers ``track``,
    so a client that missed ``generation_error`` still learns why. Asking for the track
    again (a new job) forgets it."""

    def __init__(self, keep: int = FAILURES_KEPT) -> None:
        self.keep = keep
        self._records: collections.OrderedDict[str, dict] = collections.OrderedDict()

    def add(self, record: dict, err: LofiError) -> None:
        tid = record["track_id"]
        self._records.pop(tid, None)
        self._records[tid] = {**record, "status": "failed", "error": {"code": err.code, "message": err.message},
                              "failed_at": now()}
        while len(self._records) > self.keep:
            self._records.popitem(last=False)

    def get(self, tid: str) -> dict | None:
        record = self._records.get(tid)
        return dict(record) if record is not None else None

    def discard(self, tid: str) -> None:
        self._records.pop(tid, None)


def is_temp_file(name: str) -> bool:
    """Whether ``name`` is a temporary track file lofid writes (``paths.create_temp``)."""
    return _TRACK_TEMP.fullmatch(name) is not None


def _unlink_file(p: Path) -> None:
    """Remove a file or a symlink (never what it points to), not a folder."""
    try:
        p.unlink()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        pass


@dataclass(frozen=True)
class Entry:
    track_id: str
    size: int  # bytes of the WAV and the JSON
    accessed_ns: int  # last access (the JSON's mtime)


def now() -> float:
    return round(time.time(), 3)
