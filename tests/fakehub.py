"""A fake Hugging Face hub on 127.0.0.1 for tests: the real huggingface_hub code runs
against it unchanged, selected with ``HF_ENDPOINT``.

It serves one folder, in the hub layout, as the model repo ``gabotechs/music_gen``
(branch ``main``), speaking what huggingface_hub 0.x, 1.x and 2.x use (read from their
``file_download.py`` / ``hf_api.py`` / ``utils/_http.py``):

* ``HEAD|GET /{repo}/resolve/{main|commit}/{path}``
  - small files (config, tokenizer): 200, ``ETag: "<git blob sha1>"``,
    ``X-Repo-Commit``, ``Content-Length``, ``Accept-Ranges``, Range -> 206.
  - LFS files (``*.onnx``, ``*.bin``, ...): 302 to ``/lfs-cdn/<sha256>`` on a second
    server, the CDN, named ``localhost`` (absolute ``Location`` to another host, as the
    real CDN redirect: huggingface_hub 1.x+ follows a redirect that stays on the hub's
    host, some releases comparing host names only) with ``X-Linked-Etag:
    "<sha256>"``, ``X-Linked-Size``, ``X-Repo-Commit``; the CDN answers GET/HEAD with
    Range support. ``get_hf_file_metadata`` takes etag/size from the X-Linked headers
    and downloads from ``Location``.
  - a missing file: 404 + ``X-Error-Code: EntryNotFound``; unknown revision 404 +
    ``RevisionNotFound``; unknown repo 404 + ``RepoNotFound`` (so hf_raise_for_status
    raises the same exception classes as against the real hub).
* ``POST /api/models/{repo}/paths-info/{revision}`` (``HfApi.get_paths_info``),
  ``GET /api/models/{repo}[/revision/{revision}]`` (``HfApi.model_info``, siblings
  with sizes and lfs when ``blobs=true``).

The commit id is a hash of the served tree unless set (``hub.commit = ...``), so
changing a served file gives a new commit, as a push would.

Fault injection, settable at any time from the test thread:
``drop_after(path, nbytes, times=1)``, ``fail(path, status, times=None)``,
``fail_api(status, times=None)``, ``corrupt(path, times=None)``, ``rate`` (bytes per
second per response, None = unthrottled), ``plain`` (True: files are served without the
hub's headers, as a plain web server would), ``clear()``. ``requests`` logs every request;
``count(...)`` counts them.

Environment caveat: huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME``,
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, when ``huggingface_hub.constants`` is
imported. Run the code under test in a subprocess with ``env=hub.env(hf_home)`` (what
the daemon's spawned worker does anyway) rather than patching constants in-process.
A persistent 5xx costs ~23 s of huggingface_hub's own backoff per request (it retries
500/502/503/504 five times); use ``times=`` or a 404 where that matters.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = "gabotechs/music_gen"
LFS_SUFFIXES = (".onnx", ".onnx_data", ".bin", ".safetensors", ".pt", ".wav")
_API = "/api"  # key of the API fault in the fail table
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "music_gen"

# every file of every variant, for write_random_model (the hub's layout; lofid/variants.py
# says which files each variant takes)
ALL_FILES = (
    "small/config.json",
    "small/tokenizer.json",
    "small_fp32/text_encoder.onnx",
    "small_fp32/decoder_model_merged.onnx",
    "small_fp32/encodec_decode.onnx",
    "small_fp16/text_encoder.onnx",
    "small_fp16/decoder_model.onnx",
    "small_fp16/decoder_with_past_model.onnx",
    "small_fp16/encodec_decode.onnx",
    "small_i8/decoder_model_merged.onnx",
)


def write_random_model(root: Path, *, onnx_size: int = 300_000, seed: int = 0) -> Path:
    """Fill ``root`` with random files in the hub layout (all variants); returns root.

    The .onnx files are random bytes of varied sizes around ``onnx_size``: enough for
    download tests, not loadable by onnxruntime (the tiny real model is a fixture).
    """
    rng = random.Random(seed)
    root = Path(root)
    for i, rel in enumerate(ALL_FILES):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("config.json"):
            p.write_text(json.dumps({"model_type": "musicgen", "seed": seed}, indent=1))
        elif rel.endswith(".json"):
            p.write_text(json.dumps({"version": "1.0", "model": {"type": "Unigram", "seed": seed}}))
        else:
            n = onnx_size // 2 + rng.randrange(onnx_size) + i
            p.write_bytes(rng.randbytes(n))
    return root


@dataclass
class _Entry:
    path: str
    size: int
    sha256: str
    git_oid: str  # git blob id of the content (small files) or of the LFS pointer
    lfs: bool
    pointer_size: int


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """``hub = FakeHub(folder).start(); ...; hub.stop()`` (also a context manager)."""

    def __init__(self, root: Path | str, repo: str = REPO, *, commit: str | None = None) -> None:
        self.root = Path(root)
        self.repo = repo
        self._commit = commit
        self.rate: float | None = None  # bytes/s per response
        self.plain = False  # files without X-Repo-Commit / X-Linked-*: not a hub
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._drops: dict[str, list] = {}  # path -> [nbytes, times_left|None]
        self._fails: dict[str, list] = {}  # path -> [status, times_left|None]
        self._corrupt: dict[str, list] = {}  # path -> [times_left|None]
        self._meta: dict[str, tuple] = {}
        # "hub": the endpoint (HF_ENDPOINT); "cdn": where LFS files are redirected, another
        # origin as the real CDN is (huggingface_hub 1.x+ follows a redirect to its own host)
        self._servers: dict[str, ThreadingHTTPServer] = {}

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, name=f"fakehub-{role}", daemon=True).start()
            self._servers[role] = server
        return self

    def stop(self) -> None:
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> FakeHub:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The hub's endpoint (HF_ENDPOINT)."""
        return self._url("hub")

    @property
    def cdn_url(self) -> str:
        """Where LFS downloads are redirected: the CDN server, by another host name."""
        return self._url("cdn").replace("127.0.0.1", "localhost")

    def _url(self, role: str) -> str:
        assert role in self._servers, "FakeHub not started"
        host, port = self._servers[role].server_address[:2]
        return f"http://{host}:{port}"

    def env(self, hf_home: Path | str, *, offline: bool = False, base: dict | None = None) -> dict:
        """An environment for a subprocess using this hub and a private HF cache."""
        env = dict(os.environ if base is None else base)
        for k in (
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "HF_HUB_ENABLE_HF_TRANSFER",
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
        ):
            env.pop(k, None)
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(hf_home),
            HF_HUB_CACHE=str(Path(hf_home) / "hub"),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
            HF_HUB_DISABLE_XET="1",  # the fake serves no Xet headers; make it explicit
        )
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        return env

    # ------------------------------------------------------------------- knobs
    @property
    def commit(self) -> str:
        if self._commit is not None:
            return self._commit
        h = hashlib.sha1(b"fakehub-tree\n")
        for rel in self.files():
            h.update(f"{rel}\0{self.entry(rel).git_oid}\n".encode())
        return h.hexdigest()

    @commit.setter
    def commit(self, value: str | None) -> None:
        assert value is None or re.fullmatch(r"[0-9a-f]{40}", value), "a commit is 40 hex digits"
        self._commit = value

    def drop_after(self, path: str, nbytes: int, times: int | None = 1) -> None:
        """Cut the connection once the response for ``path`` reaches file offset
        ``nbytes`` (a resumed request starting at or past it is cut at once), for the
        next ``times`` content responses (None: always)."""
        with self._lock:
            self._drops[path] = [nbytes, times]

    def fail(self, path: str, status: int, times: int | None = None) -> None:
        """Answer HEAD/GET of ``path`` (``"*"``: every file) with ``status``."""
        with self._lock:
            self._fails[path] = [status, times]

    def fail_api(self, status: int, times: int | None = None) -> None:
        """Answer the /api/ endpoints with ``status``."""
        with self._lock:
            self._fails[_API] = [status, times]

    def corrupt(self, path: str, times: int | None = None) -> None:
        """Serve ``path`` with its first byte flipped (same size, wrong hash)."""
        with self._lock:
            self._corrupt[path] = [times]

    def clear(self) -> None:
        """Remove every fault (the request log stays; see ``requests.clear()``)."""
        with self._lock:
            self._drops.clear()
            self._fails.clear()
            self._corrupt.clear()
            self.rate = None
            self.plain = False

    def count(self, method: str | None = None, path: str | None = None, kind: str | None = None) -> int:
        """Requests seen, filtered by method, hub file path and kind
        (``resolve``, ``cdn``, ``api``)."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r["method"] == method)
                and (path is None or r.get("file") == path)
                and (kind is None or r["kind"] == kind)
            )

    # ------------------------------------------------------------------ content
    def files(self) -> list[str]:
        out = []
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.root).parts):
                out.append(p.relative_to(self.root).as_posix())
        return out

    def entry(self, rel: str) -> _Entry:
        p = self.root / rel
        st = p.stat()
        key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            hit = self._meta.get(rel)
        if hit is not None and hit[0] == key:
            return hit[1]
        data = p.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        lfs = rel.endswith(LFS_SUFFIXES)
        if lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
            e = _Entry(rel, len(data), sha, _git_oid(pointer), True, len(pointer))
        else:
            e = _Entry(rel, len(data), sha, _git_oid(data), False, 0)
        with self._lock:
            self._meta[rel] = (key, e)
        return e

    def _take(self, table: dict, key: str):
        """Consume one use of a knob; returns its values or None."""
        with self._lock:
            k = table.get(key)
            if k is None:
                return None
            left = k[-1]
            if left is not None:
                if left <= 0:
                    del table[key]
                    return None
                k[-1] = left - 1
            return tuple(k[:-1]) or (True,)


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1"

    def log_message(self, fmt, *args) -> None:  # keep pytest output clean
        pass

    # --------------------------------------------------------------- plumbing
    def _log(self, kind: str, file: str | None, status: int) -> None:
        with self.hub._lock:
            self.hub.requests.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "kind": kind,
                    "file": file,
                    "range": self.headers.get("Range"),
                    "status": status,
                    "time": time.time(),
                }
            )

    def _send(self, status: int, headers: dict, body: bytes = b"") -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **headers}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, msg: str, kind: str, file: str | None) -> None:
        self._log(kind, file, status)
        headers = {"Content-Type": "application/json", "X-Request-Id": "fakehub"}
        if code:
            headers["X-Error-Code"] = code
            headers["X-Error-Message"] = msg
        if kind == "resolve":
            headers["X-Repo-Commit"] = self.hub.commit
        self._send(status, headers, json.dumps({"error": msg}).encode())

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        self._body = self.rfile.read(n) if n else b""
        self._route()

    def _route(self) -> None:
        try:
            u = urllib.parse.urlsplit(self.path)
            path = urllib.parse.unquote(u.path)
            if path.startswith("/api/"):
                return self._api(path, urllib.parse.parse_qs(u.query))
            if path.startswith("/lfs-cdn/"):
                return self._cdn(path[len("/lfs-cdn/") :])
            m = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
            if m:
                return self._resolve(m["repo"], m["rev"], m["file"])
            self._error(404, None, "not found", "other", None)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # ----------------------------------------------------------------- resolve
    def _check_repo(self, repo: str, rev: str, kind: str, file: str | None) -> bool:
        hub = self.hub
        if repo != hub.repo:
            self._error(404, "RepoNotFound", "Repository not found", kind, file)
            return False
        if rev not in ("main", hub.commit):
            self._error(404, "RevisionNotFound", "Invalid rev id: " + rev, kind, file)
            return False
        return True

    def _resolve(self, repo: str, rev: str, file: str) -> None:
        hub = self.hub
        if not self._check_repo(repo, rev, "resolve", file):
            return
        fail = hub._take(hub._fails, file) or hub._take(hub._fails, "*")
        if fail is not None:
            status = fail[0]
            code = "EntryNotFound" if status == 404 else None
            return self._error(status, code, f"fault injected: HTTP {status}", "resolve", file)
        if not (hub.root / file).is_file() or file not in hub.files():
            return self._error(404, "EntryNotFound", "Entry not found", "resolve", file)
        e = hub.entry(file)
        common = {"X-Repo-Commit": hub.commit, "Accept-Ranges": "bytes", "Vary": "Origin"}
        if hub.plain:
            return self._content(e, {"Accept-Ranges": "bytes"}, "resolve")
        if e.lfs:
            location = f"{hub.cdn_url}/lfs-cdn/{e.sha256}?file={urllib.parse.quote(file)}"
            self._log("resolve", file, 302)
            self._send(
                302,
                {
                    **common,
                    "Location": location,
                    "ETag": f'"{e.git_oid}"',
                    "X-Linked-Etag": f'"{e.sha256}"',
                    "X-Linked-Size": str(e.size),
                },
                b"Found. Redirecting",
            )
            return
        self._content(e, {**common, "ETag": f'"{e.git_oid}"'}, "resolve")

    def _cdn(self, rest: str) -> None:
        hub = self.hub
        sha = rest.split("?")[0]
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        file = (q.get("file") or [None])[0]
        for rel in hub.files():
            e = hub.entry(rel)
            if e.lfs and e.sha256 == sha:
                fail = hub._take(hub._fails, rel) or hub._take(hub._fails, "*")
                if fail is not None:
                    return self._error(fail[0], None, f"fault injected: HTTP {fail[0]}", "cdn", rel)
                return self._content(e, {"ETag": f'"{e.sha256}"', "Accept-Ranges": "bytes"}, "cdn")
        self._error(404, None, "NoSuchKey", "cdn", file)

    def _content(self, e: _Entry, headers: dict, kind: str) -> None:
        hub = self.hub
        start, end = 0, e.size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m and (m[1] or m[2]):
                if m[1]:
                    start = int(m[1])
                    end = min(int(m[2]), e.size - 1) if m[2] else e.size - 1
                else:
                    start, end = max(0, e.size - int(m[2])), e.size - 1
                if start >= e.size or start > end:
                    self._log(kind, e.path, 416)
                    return self._send(416, {**headers, "Content-Range": f"bytes */{e.size}"})
                status = 206
                headers = {**headers, "Content-Range": f"bytes {start}-{end}/{e.size}"}
        length = end - start + 1
        self._log(kind, e.path, status)
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(length), "Content-Type": "application/octet-stream"}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        drop = hub._take(hub._drops, e.path) if self.command == "GET" else None
        corrupt = hub._take(hub._corrupt, e.path) is not None
        stop_at = end + 1 if drop is None else max(start, min(end + 1, drop[0]))
        with open(hub.root / e.path, "rb") as f:
            f.seek(start)
            pos = start
            while pos < stop_at:
                chunk = f.read(min(64 * 1024, stop_at - pos))
                if not chunk:
                    break
                if corrupt and pos == 0:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                self.wfile.write(chunk)
                pos += len(chunk)
                if hub.rate:
                    time.sleep(len(chunk) / hub.rate)
        if drop is not None and stop_at <= end:
            self.wfile.flush()
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.close_connection = True

    # --------------------------------------------------------------------- api
    def _api(self, path: str, query: dict) -> None:
        hub = self.hub
        fail = hub._take(hub._fails, _API)
        if fail is not None:
            return self._error(fail[0], None, f"fault injected: HTTP {fail[0]}", "api", None)
        m = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)", path)
        if m and self.command == "POST":
            if not self._check_repo(m["repo"], m["rev"], "api", None):
                return
            form = urllib.parse.parse_qs(self._body.decode())
            if "json" in (self.headers.get("Content-Type") or ""):
                form = {"paths": json.loads(self._body or b"{}").get("paths", [])}
            wanted = form.get("paths", [])
            have = set(hub.files())
            out = []
            for p in wanted:
                if p in have:
                    out.append(self._file_json(hub.entry(p)))
                elif any(h.startswith(p.rstrip("/") + "/") for h in have):
                    out.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": p})
            self._log("api", None, 200)
            return self._send(200, {"Content-Type": "application/json"}, json.dumps(out).encode())
        m = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", path)
        if m and self.command in ("GET", "HEAD"):
            if not self._check_repo(m["repo"], m["rev"] or "main", "api", None):
                return
            blobs = (query.get("blobs") or ["false"])[0].lower() == "true"
            siblings = []
            for p in hub.files():
                s = {"rfilename": p}
                if blobs:
                    e = hub.entry(p)
                    s.update(size=e.size, blobId=e.git_oid)
                    if e.lfs:
                        s["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
                siblings.append(s)
            body = {
                "_id": "fakehub",
                "id": hub.repo,
                "modelId": hub.repo,
                "sha": hub.commit,
                "private": False,
                "disabled": False,
                "gated": False,
                "tags": [],
                "lastModified": "2024-01-01T00:00:00.000Z",
                "siblings": siblings,
            }
            self._log("api", None, 200)
            return self._send(200, {"Content-Type": "application/json"}, json.dumps(body).encode())
        self._error(404, None, "not found", "api", None)

    @staticmethod
    def _file_json(e: _Entry) -> dict:
        d = {"type": "file", "oid": e.git_oid, "size": e.size, "path": e.path}
        if e.lfs:
            d["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
        return d
