"""Download a variant's files from the Hugging Face hub, with byte progress.

Every file goes through ``huggingface_hub.hf_hub_download`` into the standard cache
(lofid/models.py finds them there); its progress is watched from the outside
(``_download_one`` says how), each file is checked against the hub's size and hashes,
and every failure becomes one clear MODEL_DOWNLOAD_FAILED sentence
(``hub_errors.download_error``). Only the worker downloads: the broker decides the consent
(``models.may_download``).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lofid import variants
from lofid.errors import MODEL_DOWNLOAD_FAILED, LofiError
from lofid.models import ModelLocation, hash_file, hub_cache_dir, hub_storage, locate, sha256_file
from lofid.variants import REPO, REVISION
from lofid.worker.hub_errors import download_error

Progress = Callable[[dict], None]


@dataclass(frozen=True)
class Remote:
    """One file as the hub's paths-info call describes it."""

    path: str
    size: int
    sha256: str | None  # LFS files only
    blob_id: str | None  # git blob sha1 (of the LFS pointer for LFS files)

    @property
    def etag(self) -> str | None:
        """The name hf_hub_download gives the blob: LFS sha256, else the git blob id."""
        return self.sha256 or self.blob_id


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def remote_info(variant: str) -> dict[str, Remote]:
    """The variant's files as the hub describes them (network), in ``hub_files`` order."""
    files = variants.hub_files(variant)
    try:
        from huggingface_hub import HfApi

        infos = HfApi().get_paths_info(REPO, files, revision=REVISION)
    except Exception as e:
        raise download_error(e, variant, None) from e
    out = {}
    for info in infos:
        if getattr(info, "size", None) is None:  # a folder
            continue
        lfs = getattr(info, "lfs", None)
        out[info.path] = Remote(info.path, int(info.size), getattr(lfs, "sha256", None) if lfs else None, info.blob_id)
    absent = [f for f in files if f not in out]
    if absent:
        raise LofiError(
            MODEL_DOWNLOAD_FAILED,
            f"{REPO} on {_endpoint()} has no {', '.join(absent)} on branch {REVISION}",
            repo=REPO,
            variant=variant,
            file=absent[0],
        )
    return {f: out[f] for f in files}


# ------------------------------------------------------------------------ download


def download(
    variant: str,
    progress: Progress | None = None,
    force: bool = False,
    *,
    hub_cache: Path | str | None = None,
    poll_interval: float = 0.2,
) -> ModelLocation:
    """Fetch the variant's files into the Hugging Face cache; returns where they are.

    Every file goes through ``hf_hub_download`` (revision ``main``), which does the
    HEAD/etag/commit dance, the ``.incomplete`` temporary file, retries, locking and the
    size check. A variant that is already complete (and ``force`` is false) returns at
    once without touching the network. ``force`` re-downloads every file.

    ``progress`` is called, in the caller's thread, with
    ``{repo, file, bytes_done, bytes_total, percent, file_bytes_done, file_bytes_total}``;
    the ``bytes_*`` and ``percent`` are overall (never decreasing, 100 only at the end).

    Any failure raises ``LofiError(MODEL_DOWNLOAD_FAILED, one clear sentence)``; nothing is
    left under a final name. Where huggingface_hub keeps the partial file (``<etag>.incomplete``,
    before 1.18) the next call resumes from it, and the sentence says how much was kept.
    """
    from huggingface_hub import constants

    files = variants.hub_files(variant)
    cache = Path(hub_cache) if hub_cache is not None else hub_cache_dir()
    if not force:
        loc = locate(variant, None, hub_cache=cache)
        if loc.complete:
            return loc
    if constants.HF_HUB_OFFLINE:
        missing = locate(variant, None, hub_cache=cache).missing if not force else files
        what = f"all {len(files)} files" if len(missing) == len(files) else ", ".join(missing)
        raise LofiError(
            MODEL_DOWNLOAD_FAILED,
            f"HF_HUB_OFFLINE is set, so {what} of model variant {variant} cannot be "
            f"downloaded from {REPO} into {cache}; unset HF_HUB_OFFLINE or use --model-dir",
            missing=missing,
            repo=REPO,
            variant=variant,
            offline=True,
        )

    remote = remote_info(variant)
    total = sum(r.size for r in remote.values())
    reporter = _Reporter(progress, total)
    storage = hub_storage(cache)
    done = 0
    for f in files:
        r = remote[f]
        _download_one(variant, r, cache, storage, force, reporter, done, poll_interval)
        done += r.size
        reporter.emit(f, done, r.size, r.size)

    loc = locate(variant, None, hub_cache=cache)
    if loc.missing:  # e.g. main moved to a new commit in the middle of the download
        raise LofiError(
            MODEL_DOWNLOAD_FAILED,
            f"{REPO} changed while downloading (main is now {loc.revision}); "
            f"{', '.join(loc.missing)} still missing, run the download again",
            repo=REPO,
            variant=variant,
        )
    return loc


class _Reporter:
    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.best = -1

    def emit(self, file: str, done: int, file_done: int, file_total: int) -> None:
        if self.progress is None:
            return
        done = max(done, self.best)  # a restarted file never moves the bar backwards
        if done == self.best and file_done < file_total:
            return
        self.best = done
        total = max(self.total, 1)
        pct = 100 if done >= self.total else min(99, done * 100 // total)
        self.progress(
            {
                "repo": REPO,
                "file": file,
                "bytes_done": done,
                "bytes_total": self.total,
                "percent": pct,
                "file_bytes_done": min(file_done, file_total),
                "file_bytes_total": file_total,
            }
        )


def _download_one(variant, r: Remote, cache: Path, storage: Path, force, reporter, done, poll):
    """Run hf_hub_download for one file in a helper thread and watch its bytes arrive.

    How progress is observed: ``hf_hub_download`` takes no progress callback, and a
    ``tqdm_class`` only from huggingface_hub 1.x on; patching its private tqdm plumbing
    would break with the next release. What is stable and public is the cache layout: the
    file streams into a partial file in ``blobs/`` named after its etag (the LFS sha256,
    or the git blob id for small files, both given by the paths-info call;
    ``_partial_size`` names them), renamed when complete. So the caller's thread polls the
    size of that file while a helper thread runs the real download. This sees resumed
    bytes too, costs a stat() or two per poll, and keeps every progress callback in the
    caller's thread.
    """
    from huggingface_hub import hf_hub_download

    blobs = storage / "blobs"
    started = time.time()
    fresh = force or not _cached_file_ok(cache, r)
    result: dict = {}

    def run() -> None:
        try:
            result["path"] = hf_hub_download(
                REPO, r.path, revision=REVISION, cache_dir=str(cache), force_download=force
            )
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = e

    t = threading.Thread(target=run, name=f"lofid-download-{r.path}", daemon=True)
    file_done = 0
    reporter.emit(r.path, done, 0, r.size)
    t.start()
    while True:
        t.join(poll)
        if not t.is_alive():
            break
        size = _partial_size(blobs, r.etag)
        if size is None:
            size = _newest_partial_size(blobs, started)
        if size is not None and size != file_done:
            file_done = min(size, r.size)
            reporter.emit(r.path, done + file_done, file_done, r.size)
    if "error" in result:
        e = result["error"]
        kept = _partial_size(blobs, r.etag) or 0   # what the next call can resume from
        raise download_error(e, variant, r, kept, cache) from e
    path = Path(result["path"])
    _verify(variant, r, path, storage, fresh)
    _clear_no_exist(storage, path)


def _clear_no_exist(storage: Path, path: Path) -> None:
    """Drop a ``.no_exist`` marker that an earlier 404 left for a file we now have.

    huggingface_hub records a 404 at a commit as ``.no_exist/<commit>/<file>`` and
    ``try_to_load_from_cache`` (used by us and by transformers & co) believes it before
    the snapshot; once the file is downloaded at that same commit the marker is wrong.
    """
    try:
        rel = path.relative_to(storage / "snapshots")
        (storage / ".no_exist" / rel).unlink(missing_ok=True)
    except (ValueError, OSError):
        pass


def _partial_size(blobs: Path, etag: str | None) -> int | None:
    """Bytes of the partial file of blob ``etag`` in ``blobs``, None when there is none:
    ``<etag>.incomplete`` (huggingface_hub before 1.18: kept after a failure, and
    resumed), else the largest ``<etag>.<id>.incomplete`` (later releases: one per
    download, removed when it fails)."""
    if not etag:
        return None
    try:
        return (blobs / f"{etag}.incomplete").stat().st_size
    except OSError:
        pass
    sizes = []
    for p in blobs.glob(f"{etag}.*.incomplete"):
        try:
            sizes.append(p.stat().st_size)
        except OSError:
            pass
    return max(sizes, default=None)


def _newest_partial_size(blobs: Path, since: float) -> int | None:
    """Fallback when the etag misses (e.g. a hub that names blobs differently): the size
    of the .incomplete file written last since ``since``."""
    try:
        best = None
        for p in blobs.glob("*.incomplete"):
            st = p.stat()
            if st.st_mtime >= since - 1 and (best is None or st.st_mtime > best[0]):
                best = (st.st_mtime, st.st_size)
        return best[1] if best else None
    except OSError:
        return None


def _cached_file_ok(cache: Path, r: Remote) -> bool:
    return bool(r.etag) and (hub_storage(cache) / "blobs" / r.etag).is_file()


def _verify(variant: str, r: Remote, path: Path, storage: Path, fresh: bool) -> None:
    """Sizes always; content hashes (LFS sha256, git blob id) for freshly fetched files.

    huggingface_hub checks the size against the HEAD's; it does not hash. A bad file is
    removed (blob and snapshot link), so nothing wrong stays under a final name.
    """
    try:
        size = path.stat().st_size
        bad = None
        if size != r.size:
            bad = f"has {size} bytes, the hub says {r.size}"
        elif fresh and r.sha256:
            got = sha256_file(path)
            if got != r.sha256:
                bad = f"has sha256 {got[:12]}…, the hub says {r.sha256[:12]}…"
        elif fresh and r.blob_id and not r.sha256:
            got = _git_blob_sha1(path)
            if got != r.blob_id:
                bad = f"has git blob id {got[:12]}…, the hub says {r.blob_id[:12]}…"
    except OSError as e:
        raise download_error(e, variant, r) from e
    if bad is None:
        return
    try:
        blob = path.resolve()
        path.unlink(missing_ok=True)
        if blob != path and blob.is_relative_to(storage):
            blob.unlink(missing_ok=True)
    except OSError:
        pass
    raise LofiError(
        MODEL_DOWNLOAD_FAILED,
        f"downloaded {r.path} {bad}; the damaged copy was removed, run the download again",
        repo=REPO,
        variant=variant,
        file=r.path,
    )


def _git_blob_sha1(path: Path) -> str:
    """The git blob id the hub gives small (non-LFS) files as their ETag."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
    return hash_file(h, path)
