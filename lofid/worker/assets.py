"""Model files: which files a variant needs, where they are, and how to get them.

The broker imports this module (to answer ``status`` and to ask for consent), so it
imports neither numpy nor onnxruntime, and imports huggingface_hub only inside the
functions that need it: ``import lofid.worker.assets`` costs nothing.

Two sources of model files:

* ``--model-dir``: a local folder in the hub layout, used as it is and never written to.
  Its version is ``local-<hash>`` of the content of the variant's files; per-file hashes
  are cached in a small JSON file keyed on (path, size, mtime_ns, ctime_ns), so a 2 GB
  model is hashed once, not at every start.
* the standard Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), filled with
  ``hf_hub_download`` from ``HF_ENDPOINT`` (``HF_HUB_OFFLINE`` honoured). The model
  version names the commit that ``refs/main`` points to.

huggingface_hub reads its environment variables once, when ``huggingface_hub.constants``
is first imported. A process that wants other values must set them before its first
call into this module (the worker is a spawned process with its environment set).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lofid import paths
from lofid.errors import (
    INVALID_PARAMS,
    MODEL_DOWNLOAD_FAILED,
    MODEL_LOAD_FAILED,
    MODEL_NOT_FOUND,
    LofiError,
)

REPO = "gabotechs/music_gen"
REVISION = "main"
VARIANTS = ("fp32", "fp16", "int8", "int4")

_COMMON = ["small/config.json", "small/tokenizer.json"]
_FILES = {
    "fp32": _COMMON
    + [
        "small_fp32/text_encoder.onnx",
        "small_fp32/decoder_model_merged.onnx",
        "small_fp32/encodec_decode.onnx",
    ],
    "fp16": _COMMON
    + [
        "small_fp16/text_encoder.onnx",
        "small_fp16/decoder_model.onnx",
        "small_fp16/decoder_with_past_model.onnx",
        "small_fp16/encodec_decode.onnx",
    ],
    "int8": _COMMON
    + [
        "small_i8/decoder_model_merged.onnx",
        "small_fp32/text_encoder.onnx",
        "small_fp32/encodec_decode.onnx",
    ],
}

# int4 is made on this machine from the int8 files (lofid/worker/nbits.py)
_FILES["int4"] = _FILES["int8"]
# A variant made on this machine is named in its model_version by what it is made into:
# the same files rewritten another way make other audio, so other track ids (int4 with
# blocks of 256 with searched scales, lofid/worker/nbits.py, and its int8 KV cache,
# lofid/worker/kvquant.py)
VERSION_LABEL = {"int4": "int4b256-kv8"}

CONSENT_FILE = "download-consent.json"
HASH_CACHE_FILE = "model-hashes.json"

Progress = Callable[[dict], None]


def variant_files(variant: str) -> list[str]:
    """The hub-relative paths of the files a variant needs (config and tokenizer first)."""
    try:
        return list(_FILES[variant])
    except (KeyError, TypeError):
        raise LofiError(
            INVALID_PARAMS,
            f"unknown model variant {variant!r}; choose one of {', '.join(VARIANTS)}",
            variant=str(variant),
        ) from None


@dataclass(frozen=True)
class ModelLocation:
    variant: str
    root: Path | None  # folder in hub layout, None if not in the cache at all
    missing: list[str] = field(default_factory=list)  # hub-relative paths not under root
    revision: str | None = None  # hub commit, or "local-<hash>" for a model dir
    model_version: str = ""  # f"{REPO}@{revision}/{label}" or "local:<hash>/<label>" (_label)

    @property
    def complete(self) -> bool:
        return self.root is not None and not self.missing

    def path(self, hub_path: str) -> Path:
        """Local path of one hub-relative file (it may be missing)."""
        if self.root is None:
            raise LofiError(
                MODEL_NOT_FOUND, f"model variant {self.variant} is not on this machine", variant=self.variant
            )
        return self.root.joinpath(*hub_path.split("/"))


# ---------------------------------------------------------------------------- locate


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache in use (``HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def locate(
    variant: str,
    model_dir: Path | str | None,
    *,
    hash_cache_dir: Path | str | None = None,
    hub_cache: Path | str | None = None,
) -> ModelLocation:
    """Where the variant's files are, offline (no network ever) and fast.

    With ``model_dir`` the folder is used as it is; its revision is ``local-<hash>`` of
    the files' content (per-file hashes cached under ``hash_cache_dir`` when given).
    Without it the Hugging Face cache (``hub_cache``, default: huggingface_hub's
    ``HF_HUB_CACHE``) is searched at the commit ``refs/main`` points to.
    """
    files = variant_files(variant)
    if model_dir is not None:
        return _locate_local(variant, files, Path(model_dir), hash_cache_dir)
    return _locate_hub(variant, files, hub_cache)


def _label(variant: str) -> str:
    return VERSION_LABEL.get(variant, variant)


def _locate_hub(variant: str, files: list[str], hub_cache) -> ModelLocation:
    from huggingface_hub import try_to_load_from_cache

    cache = Path(hub_cache) if hub_cache is not None else hub_cache_dir()
    storage = cache / ("models--" + REPO.replace("/", "--"))
    commit = None
    try:
        commit = (storage / "refs" / REVISION).read_text().strip() or None
    except OSError:
        pass
    if commit is None:
        return ModelLocation(variant, None, list(files), None, f"{REPO}@{REVISION}/{_label(variant)}")
    missing = []
    for f in files:
        found = try_to_load_from_cache(REPO, f, cache_dir=str(cache), revision=commit)
        # a str is a cached file; None or _CACHED_NO_EXIST mean we do not have it, but
        # a .no_exist marker left by an earlier (transient) 404 must not hide a file
        # that was downloaded since: the snapshot link is the truth
        if not isinstance(found, str):
            found = str(storage / "snapshots" / commit / f)
        if not os.path.isfile(found):
            missing.append(f)
    snap = storage / "snapshots" / commit
    root = snap if snap.is_dir() else None
    return ModelLocation(variant, root, missing, commit, f"{REPO}@{commit}/{_label(variant)}")


def _locate_local(variant: str, files: list[str], root: Path, hash_cache_dir) -> ModelLocation:
    root = root.expanduser()
    cache = _HashCache(Path(hash_cache_dir) if hash_cache_dir is not None else None)
    missing = []
    digest = hashlib.sha256(b"lofid-model-dir-v1\n")
    for f in files:
        p = root.joinpath(*f.split("/"))
        if not p.is_file():
            missing.append(f)
            continue
        try:
            digest.update(f"{f}\0{cache.sha256(p)}\n".encode())
        except OSError as e:
            raise LofiError(
                MODEL_LOAD_FAILED, f"cannot read {p} in the model dir: {e.strerror or e}", variant=variant, file=f
            ) from e
    cache.save()
    h = digest.hexdigest()[:16]
    return ModelLocation(variant, root, missing, f"local-{h}", f"local:{h}/{_label(variant)}")


# In-process memo, shared by all _HashCache instances: {abs path: (key, sha256)}.
_MEMO: dict[str, tuple[tuple, str]] = {}
_MEMO_LOCK = threading.Lock()


class _HashCache:
    """sha256 of files keyed on (path, size, mtime_ns, ctime_ns), memoised in memory and,
    when a directory is given, in ``<dir>/model-hashes.json`` (written atomically)."""

    def __init__(self, directory: Path | None) -> None:
        self.file = directory / HASH_CACHE_FILE if directory is not None else None
        self.entries: dict[str, dict] = {}
        self.dirty = False
        if self.file is not None:
            try:
                data = json.loads(self.file.read_text())
                if isinstance(data, dict) and data.get("version") == 1:
                    self.entries = dict(data.get("files") or {})
            except (OSError, ValueError):
                pass

    def sha256(self, path: Path) -> str:
        path = path.resolve()
        st = path.stat()
        key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        name = str(path)
        with _MEMO_LOCK:
            hit = _MEMO.get(name)
        if hit is not None and hit[0] == key:
            value = hit[1]
        else:
            e = self.entries.get(name)
            if isinstance(e, dict) and (e.get("size"), e.get("mtime_ns"), e.get("ctime_ns")) == key:
                value = str(e.get("sha256"))
            else:
                value = _sha256_file(path)
            with _MEMO_LOCK:
                _MEMO[name] = (key, value)
        e = {"size": key[0], "mtime_ns": key[1], "ctime_ns": key[2], "sha256": value}
        if self.entries.get(name) != e:
            self.entries[name] = e
            self.dirty = True
        return value

    def save(self) -> None:
        if self.file is None or not self.dirty:
            return
        live = {k: v for k, v in self.entries.items() if os.path.exists(k)}  # forget deleted files
        data = {"version": 1, "files": live}
        try:
            paths.write_atomic(paths.make_dirs(self.file.parent) / self.file.name,
                               json.dumps(data, indent=1, sort_keys=True).encode())
        except OSError:
            pass  # a cache: losing it costs time, not correctness


def _hash_file(h, path: Path, chunk: int = 1 << 20) -> str:
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    return _hash_file(hashlib.sha256(), path)


def _git_blob_sha1(path: Path) -> str:
    """The git blob id the hub gives small (non-LFS) files as their ETag."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
    return _hash_file(h, path)


# ------------------------------------------------------------------------- remote


@dataclass(frozen=True)
class _Remote:
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


def _remote_info(variant: str) -> dict[str, _Remote]:
    files = variant_files(variant)
    try:
        from huggingface_hub import HfApi

        infos = HfApi().get_paths_info(REPO, files, revision=REVISION)
    except Exception as e:
        raise _download_error(e, variant, None) from e
    out = {}
    for info in infos:
        if getattr(info, "size", None) is None:  # a folder
            continue
        lfs = getattr(info, "lfs", None)
        out[info.path] = _Remote(info.path, int(info.size), getattr(lfs, "sha256", None) if lfs else None, info.blob_id)
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


def remote_files(variant: str) -> list[tuple[str, int]]:
    """(hub path, size in bytes) of the variant's files, asked of the hub (network)."""
    return [(r.path, r.size) for r in _remote_info(variant).values()]


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
    HEAD/etag/commit dance, the ``.incomplete`` temporary file, resuming, locking and the
    size check. A variant that is already complete (and ``force`` is false) returns at
    once without touching the network. ``force`` re-downloads every file.

    ``progress`` is called, in the caller's thread, with
    ``{repo, file, bytes_done, bytes_total, percent, file_bytes_done, file_bytes_total}``;
    the ``bytes_*`` and ``percent`` are overall (never decreasing, 100 only at the end).

    Any failure raises ``LofiError(MODEL_DOWNLOAD_FAILED, one clear sentence)``; nothing is
    left under a final name, and the next call resumes from the ``.incomplete`` file.
    """
    from huggingface_hub import constants

    files = variant_files(variant)
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

    remote = _remote_info(variant)
    total = sum(r.size for r in remote.values())
    reporter = _Reporter(progress, total)
    storage = cache / ("models--" + REPO.replace("/", "--"))
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


def _download_one(variant, r: _Remote, cache: Path, storage: Path, force, reporter, done, poll):
    """Run hf_hub_download for one file in a helper thread and watch its bytes arrive.

    How progress is observed: huggingface_hub 0.x's ``hf_hub_download`` takes no
    progress callback or ``tqdm_class`` (only ``snapshot_download`` does, and there it
    counts files, not bytes); patching its private tqdm plumbing would break with the
    next release. What is stable and public is the cache layout: the file streams into
    ``blobs/<etag>.incomplete`` (etag = the LFS sha256, or the git blob id for small
    files, both given by the paths-info call), opened in append mode, renamed when
    complete. So the caller's thread polls the size of that file while a helper thread
    runs the real download. This sees resumed bytes too, costs one stat() per poll,
    and keeps every progress callback in the caller's thread.
    """
    from huggingface_hub import hf_hub_download

    blobs = storage / "blobs"
    incomplete = blobs / f"{r.etag}.incomplete" if r.etag else None
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
        size = _incomplete_size(incomplete, blobs, started)
        if size is not None and size != file_done:
            file_done = min(size, r.size)
            reporter.emit(r.path, done + file_done, file_done, r.size)
    if "error" in result:
        e = result["error"]
        try:
            file_done = incomplete.stat().st_size if incomplete is not None else file_done
        except OSError:
            pass
        raise _download_error(e, variant, r, file_done, cache) from e
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


def _incomplete_size(incomplete: Path | None, blobs: Path, since: float) -> int | None:
    try:
        if incomplete is not None:
            return incomplete.stat().st_size
    except OSError:
        pass
    # Fallback when the etag guess misses (e.g. a hub that names blobs differently):
    # the .incomplete file written since this file's download started.
    try:
        best = None
        for p in blobs.glob("*.incomplete"):
            st = p.stat()
            if st.st_mtime >= since - 1 and (best is None or st.st_mtime > best[0]):
                best = (st.st_mtime, st.st_size)
        return best[1] if best else None
    except OSError:
        return None


def _cached_file_ok(cache: Path, r: _Remote) -> bool:
    storage = cache / ("models--" + REPO.replace("/", "--"))
    return bool(r.etag) and (storage / "blobs" / r.etag).is_file()


def _verify(variant: str, r: _Remote, path: Path, storage: Path, fresh: bool) -> None:
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
            got = _sha256_file(path)
            if got != r.sha256:
                bad = f"has sha256 {got[:12]}…, the hub says {r.sha256[:12]}…"
        elif fresh and r.blob_id and not r.sha256:
            got = _git_blob_sha1(path)
            if got != r.blob_id:
                bad = f"has git blob id {got[:12]}…, the hub says {r.blob_id[:12]}…"
    except OSError as e:
        raise _download_error(e, variant, r) from e
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


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def _chain(e: BaseException) -> Iterable[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _download_error(
    e: BaseException,
    variant: str,
    r: _Remote | None,
    file_done: int = 0,
    cache: Path | None = None,
) -> LofiError:
    """One clear sentence for any failure of a download (MODEL_DOWNLOAD_FAILED)."""
    if isinstance(e, LofiError):
        return e
    what = r.path if r is not None else f"the file list of {variant}"
    data = {"repo": REPO, "variant": variant}
    if r is not None:
        data["file"] = r.path
    try:
        import requests
        from huggingface_hub import constants
        from huggingface_hub.errors import (
            GatedRepoError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return LofiError(MODEL_DOWNLOAD_FAILED, f"downloading {what} failed: {e}", **data)
    endpoint = constants.ENDPOINT
    chain = list(_chain(e))

    def first(types):
        return next((x for x in chain if isinstance(x, types)), None)

    if first(OfflineModeIsEnabled) is not None or constants.HF_HUB_OFFLINE:
        return LofiError(
            MODEL_DOWNLOAD_FAILED,
            f"HF_HUB_OFFLINE is set, so {what} cannot be downloaded from {REPO}; "
            "unset HF_HUB_OFFLINE or use --model-dir",
            offline=True,
            **data,
        )
    # The HTTP answer, if any, comes first. (LocalEntryNotFoundError subclasses
    # EntryNotFoundError but means "could not ask the hub": its cause tells why.)
    http = next((x for x in chain if getattr(getattr(x, "response", None), "status_code", None)), None)
    status = http.response.status_code if http is not None else None
    if first(GatedRepoError) is not None:
        return LofiError(
            MODEL_DOWNLOAD_FAILED, f"{REPO} on {endpoint} is gated: access to {what} was refused", status=status, **data
        )
    if status == 404:
        if first(RepositoryNotFoundError) is not None:
            msg = f"the repository {REPO} was not found on {endpoint} (HTTP 404)"
        elif first(RevisionNotFoundError) is not None:
            msg = f"{REPO} on {endpoint} has no branch {REVISION} (HTTP 404)"
        else:
            msg = f"{REPO} on {endpoint} has no file {what} (HTTP 404)"
        return LofiError(MODEL_DOWNLOAD_FAILED, msg, status=404, **data)
    if status is not None:
        hint = "try again later" if status >= 500 else "check HF_ENDPOINT and your token"
        return LofiError(
            MODEL_DOWNLOAD_FAILED,
            f"the hub at {endpoint} answered HTTP {status} for {what} of {REPO}; {hint}",
            status=status,
            **data,
        )
    net = first((requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError))
    if net is not None:
        if r is None or (not file_done and isinstance(net, requests.ConnectionError)):
            return LofiError(
                MODEL_DOWNLOAD_FAILED,
                f"could not reach the hub at {endpoint} for {what} ({type(net).__name__}); "
                "check the network (or HF_ENDPOINT) and try again",
                **data,
            )
        kept = f" ({_mb(file_done)} of {_mb(r.size)} kept)" if file_done else ""
        return LofiError(
            MODEL_DOWNLOAD_FAILED,
            f"the connection to {endpoint} broke while downloading {what}{kept}; run the download again to resume",
            **data,
        )
    osr = next((x for x in chain if isinstance(x, OSError) and not isinstance(x, requests.RequestException)), None)
    if osr is not None:
        place = str(cache) if cache is not None else "the Hugging Face cache"
        if osr.errno in (errno.ENOSPC, errno.EDQUOT):
            need = f" ({_mb(r.size)} needed)" if r is not None else ""
            return LofiError(
                MODEL_DOWNLOAD_FAILED,
                f"no space left to write {what} in {place}{need}: {osr.strerror or osr}",
                **data,
            )
        if "Consistency check failed" in str(osr):
            return LofiError(
                MODEL_DOWNLOAD_FAILED,
                f"{what} arrived with the wrong size (the connection was probably cut); run the download again",
                **data,
            )
        return LofiError(MODEL_DOWNLOAD_FAILED, f"could not write {what} in {place}: {osr.strerror or osr}", **data)
    return LofiError(
        MODEL_DOWNLOAD_FAILED,
        f"downloading {what} from {endpoint} failed: {type(e).__name__}: {e}",
        **data,
    )


# ------------------------------------------------------------------------- consent


def consent_given(state_dir: Path | str) -> bool:
    """Whether the user has agreed, once, to model downloads."""
    return (Path(state_dir) / CONSENT_FILE).is_file()


def give_consent(state_dir: Path | str) -> None:
    """Remember the user's consent to download model files (atomic, mode 0600)."""
    state_dir = paths.make_dirs(Path(state_dir))
    body = {"repo": REPO, "given_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    paths.write_atomic(state_dir / CONSENT_FILE, (json.dumps(body) + "\n").encode())
