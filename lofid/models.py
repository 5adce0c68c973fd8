"""Where a variant's model files are, its model_version, and the consent to download.

The broker and lofictl import this module, so it imports neither numpy nor onnxruntime,
and imports huggingface_hub only inside the functions that need it: ``import
lofid.models`` costs nothing. The download itself is the worker's
(worker/download.py).

Two sources of model files:

* ``--model-dir``: a local folder in the hub layout, used as it is and never written to.
  Its version is ``local-<hash>`` of the content of the variant's files; per-file hashes
  are cached in a small JSON file keyed on (path, size, mtime_ns, ctime_ns), so a 2 GB
  model is hashed once, not at every start.
* the standard Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), filled by
  worker/download.py from ``HF_ENDPOINT``. The model version names the commit
  that ``refs/main`` points to.

Whether missing files may be downloaded is decided here too (``may_download``): never
into a ``--model-dir``, and from the hub only with the user's consent, given once and
remembered in the state dir. The consent question says how big the download is: the
hub's own sizes where it answers (``download_size``: metadata only, a few seconds at
most), else the variant's estimate, labelled as such.

huggingface_hub reads its environment variables once, when ``huggingface_hub.constants``
is first imported. A process that wants other values must set them before its first
call into this module (the worker is a spawned process with its environment set).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lofid import paths, variants
from lofid.errors import MODEL_LOAD_FAILED, MODEL_NOT_FOUND, LofiError
from lofid.variants import REPO, REVISION

CONSENT_FILE = "download-consent.json"
HASH_CACHE_FILE = "model-hashes.json"
HUB_QUERY_SEC = 5.0  # the most the consent question waits for the hub's file sizes

log = logging.getLogger("lofid.models")


@dataclass(frozen=True)
class ModelLocation:
    variant: str
    root: Path | None  # folder in hub layout, None if not in the cache at all
    missing: list[str] = field(default_factory=list)  # hub-relative paths not under root
    revision: str | None = None  # hub commit, or "local-<hash>" for a model dir
    model_version: str = ""  # f"{REPO}@{revision}/{label}" or "local:<hash>/<label>" (Variant.label)

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


def hub_storage(cache: Path) -> Path:
    """The folder of ``REPO`` in the hub cache ``cache`` (refs/, snapshots/, blobs/)."""
    return cache / ("models--" + REPO.replace("/", "--"))


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
    files = variants.hub_files(variant)
    if model_dir is not None:
        return _locate_local(variant, files, Path(model_dir), hash_cache_dir)
    return _locate_hub(variant, files, hub_cache)


def _label(variant: str) -> str:
    return variants.get(variant).label


def _locate_hub(variant: str, files: list[str], hub_cache) -> ModelLocation:
    from huggingface_hub import try_to_load_from_cache

    cache = Path(hub_cache) if hub_cache is not None else hub_cache_dir()
    storage = hub_storage(cache)
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
    cache = HashCache(Path(hash_cache_dir) if hash_cache_dir is not None else None)
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


class HashCache:
    """sha256 of files keyed on (path, size, mtime_ns, ctime_ns), memoised in memory and,
    when a directory is given, in ``<dir>/model-hashes.json`` (written atomically)."""

    # the in-process memo, shared by all instances: {abs path: (key, sha256)}
    memo: dict[str, tuple[tuple, str]] = {}
    memo_lock = threading.Lock()

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
        with self.memo_lock:
            hit = self.memo.get(name)
        if hit is not None and hit[0] == key:
            value = hit[1]
        else:
            e = self.entries.get(name)
            if isinstance(e, dict) and (e.get("size"), e.get("mtime_ns"), e.get("ctime_ns")) == key:
                value = str(e.get("sha256"))
            else:
                value = sha256_file(path)
            with self.memo_lock:
                self.memo[name] = (key, value)
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


def hash_file(h, path: Path, chunk: int = 1 << 20) -> str:
    """``h`` (a hashlib object) updated with the content of ``path``, -> its hex digest."""
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return hash_file(hashlib.sha256(), path)


# ------------------------------------------------------------------------- consent


def may_download(loc: ModelLocation, model_dir: Path | None, state_dir: Path | str, *,
                 allow_download: bool = False, asked: bool | None = None) -> bool:
    """Whether the files ``loc`` misses may be downloaded: False when none is missing;
    True with the user's consent: ``allow_download`` (the setting), ``asked`` (this
    request asks for the download, which gives the consent for good) or consent given
    before. Raises ``missing_error`` where they may not."""
    if not loc.missing:
        return False
    if model_dir is None:
        if asked:
            give_consent(state_dir)
        if allow_download or asked or consent_given(state_dir):
            return True
    raise missing_error(loc, model_dir)


def missing_error(loc: ModelLocation, model_dir: Path | None, download_bytes: int | None = None) -> LofiError:
    """MODEL_NOT_FOUND for the files ``loc`` misses: a ``--model-dir`` is never
    downloaded into; the hub's files need consent (``consent_required``, with the size
    of the download: ``download_bytes`` as ``download_size`` gave it, or where that is
    None the variant's estimate, with ``download_bytes_estimated``)."""
    if model_dir is not None:
        return LofiError(MODEL_NOT_FOUND, f"model files missing in {model_dir}: {', '.join(loc.missing)}",
                         variant=loc.variant, files=loc.missing)
    estimated = download_bytes is None
    size = variants.get(loc.variant).download_bytes if estimated else download_bytes
    how = f"about {size_text(size)} (estimate: the hub did not answer)" if estimated else size_text(size)
    return LofiError(MODEL_NOT_FOUND,
                     f"the {loc.variant} model is not downloaded yet: {how} from {REPO}; consent is needed",
                     consent_required=True, repo=REPO, variant=loc.variant, files=loc.missing,
                     download_bytes=size, download_bytes_estimated=estimated)


def size_text(n: int) -> str:
    """``n`` bytes for people: 1.0 GB, 9.2 MB, 812 kB, 64 bytes (the Neovim plugin's
    ``download_size`` writes the same)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.0f} kB" if n >= 1e3 else f"{n} bytes"


def download_size(files: list[str], timeout: float = HUB_QUERY_SEC) -> int | None:
    """The bytes the hub holds for ``files`` (hub paths) at ``REVISION``: one HEAD request
    each, metadata only, nothing downloaded. None where the hub does not answer them all
    within ``timeout`` seconds: ``HF_HUB_OFFLINE``, no network, an HTTP error. It blocks:
    the broker runs it in a thread."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    if constants.HF_HUB_OFFLINE:
        return None
    deadline = time.monotonic() + timeout
    total = 0
    for f in files:
        left = deadline - time.monotonic()
        if left <= 0:
            log.info("no download size from the hub: it took over %.0f s", timeout)
            return None
        try:
            size = get_hf_file_metadata(hf_hub_url(REPO, f, revision=REVISION), timeout=left).size
        except Exception as e:  # noqa: BLE001 - any failure to answer leaves the estimate
            log.info("no download size from the hub for %s: %s", f, str(e).splitlines()[0] if str(e) else
                     type(e).__name__)
            return None
        if size is None:
            return None
        total += size
    return total


def consent_given(state_dir: Path | str) -> bool:
    """Whether the user has agreed, once, to model downloads."""
    return (Path(state_dir) / CONSENT_FILE).is_file()


def give_consent(state_dir: Path | str) -> None:
    """Remember the user's consent to download model files (atomic, private: ``paths.write_atomic``)."""
    state_dir = paths.make_dirs(Path(state_dir))
    body = {"repo": REPO, "given_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    paths.write_atomic(state_dir / CONSENT_FILE, (json.dumps(body) + "\n").encode())
