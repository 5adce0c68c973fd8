"""Graphs as onnxruntime optimized them, cached on disk under ``optimized_dir()``.

Two kinds of entries, each named after its source file (``cache_file``):

* ``mapped``: the text encoder and EnCodec with their weights in a file beside the
  graph, which onnxruntime maps instead of reading (``mapped_session``);
* a rewrite of the decoder (``rewrite_kind``: 4-bit MatMuls, shared KV buffers, an int8
  cache; rewrite.py), saved with onnxruntime's prepacked weights
  (``rewritten_session``).

The first load writes an entry under a temporary name and renames it (``saving``);
later loads open it. Entries whose source file is gone are removed
(``prune_optimized``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lofid import paths, variants
from lofid.errors import MODEL_LOAD_FAILED, LofiError
from lofid.worker import sessions
from lofid.worker.model_config import ModelConfig

log = logging.getLogger(__name__)

# in every cached graph's name: bumped when a rewrite changes what it makes, so that
# graphs cached by an older lofid are rebuilt
REWRITE_VERSION = 4


def optimized_dir() -> Path:
    """Where rewritten, onnxruntime-optimized graphs are cached (user cache)."""
    env = os.environ.get("LOFID_OPTIMIZED_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("lofid")) / "optimized"


def prune_optimized(directory: Path | None = None) -> int:
    """Remove the cached graphs whose source file is gone (a deleted ``--model-dir``, a
    hub revision pruned from the Hugging Face cache); -> bytes freed. Each source's
    entries share the prefix ``<where>-`` and a ``<where>.source`` file naming it."""
    directory = directory or optimized_dir()
    freed = 0
    for marker in directory.glob("*.source"):
        try:
            if Path(marker.read_text().strip()).exists():
                continue
            where = marker.name.removesuffix(".source")
            for stale in [*directory.glob(f"{where}-*"), marker]:
                if stale.is_dir():   # a crashed first load's stage (``stage``)
                    freed += sum(f.stat().st_size for f in stale.iterdir())
                    shutil.rmtree(stale)
                else:
                    freed += stale.stat().st_size
                    stale.unlink()
        except OSError as e:
            log.info("cannot prune %s: %s", marker, e)
    return freed


def cpu_signature() -> str:
    """A short hash of the CPU's architecture and feature flags. The cached decoder keeps
    onnxruntime's prepacked weights, whose layout depends on the instruction set: a
    cache written on another CPU (a migrated VM, a copied home) must not be reused."""
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:8]


def rewrite_kind(nbits: int | None, share_kv: bool, kv_int8: bool = False) -> str:
    """The cache-name tag of a decoder rewrite."""
    return "-".join(([f"int{nbits}b{variants.NBITS_BLOCK}"] if nbits else []) +
                    (["kvshare"] if share_kv else []) + (["kv8"] if kv_int8 else []))


def cache_file(root: Path, rel: str, kind: str) -> tuple[Path, str]:
    """(cached graph path, the stem all versions of it share) for ``rel``. The name
    carries the source's path, size and mtime, the onnxruntime version, the CPU's
    features and ``REWRITE_VERSION``, so a re-downloaded file, another onnxruntime,
    another CPU or a changed rewrite rebuilds it."""
    src = (root / rel).resolve()
    st = src.stat()
    where = hashlib.sha1(str(src).encode()).hexdigest()[:12]
    stem = f"{where}-{rel.replace('/', '__').removesuffix('.onnx')}"
    tag = (f"{stem}.{st.st_size}-{st.st_mtime_ns}.ort{ort.__version__}-"
           f"{cpu_signature()}-r{REWRITE_VERSION}.{kind}.onnx")
    marker = optimized_dir() / f"{where}.source"   # for prune_optimized
    if not marker.is_file():
        try:
            paths.make_dirs(marker.parent)
            marker.write_text(str(src))
        except OSError:
            pass   # not caching anyway: saving reports why
    return optimized_dir() / tag, stem


def remove(root: Path, rel: str, kind: str) -> None:
    """Remove the cached ``kind`` of ``rel`` and its weights (superseded by another)."""
    cache, _ = cache_file(root, rel, kind)
    for old in [cache, *cache.parent.glob(cache.name + ".*.data")]:
        old.unlink(missing_ok=True)


def saving(opts, cache: Path, stem: str, kind: str, prepacked: bool) -> tuple[Path, Path]:
    """Point ``opts`` at a temporary copy of ``cache`` (graph) and its weights file;
    removes older versions (and a crashed first load's stage, ``stage``). ->
    (temporary graph path, weights path). Raises OSError."""
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    weights = cache.with_name(f"{cache.name}.{os.getpid()}.data")
    paths.make_dirs(cache.parent)
    for pattern in (f"{stem}.*.{kind}.onnx", f"{stem}.*.{kind}.onnx.*.data"):
        for old in cache.parent.glob(pattern):
            old.unlink(missing_ok=True)
    for old in cache.parent.glob(f"{stem}.*.{kind}.onnx.stage"):   # a crashed first load's
        shutil.rmtree(old, ignore_errors=True)
    opts.optimized_model_filepath = str(tmp)
    for key, value in (
            ("session.optimized_model_external_initializers_file_name", weights.name),
            ("session.optimized_model_external_initializers_min_size_in_bytes", "1024"),
            ("session.save_external_prepacked_constant_initializers",
             "1" if prepacked else "0")):
        opts.add_session_config_entry(key, value)
    return tmp, weights


def cached_session(root: Path, rel: str, kind: str, opts,
                   providers: list) -> ort.InferenceSession | None:
    """The cached copy ``kind`` of ``rel`` (a rewrite, or ``mapped``); None where there
    is none (a damaged one is removed)."""
    cache, _ = cache_file(root, rel, kind)
    if not cache.is_file():
        return None
    try:
        return ort.InferenceSession(str(cache), sess_options=opts, providers=providers)
    except Exception as e:   # a damaged cache: rebuild it
        log.warning("ignoring cached %s: %s", cache, e)
        cache.unlink(missing_ok=True)
        return None


def mapped_session(root: Path, rel: str, opts, providers: list
                   ) -> Callable[[], ort.InferenceSession] | None:
    """A function opening ``rel`` from its optimized copy under ``optimized_dir()``
    (weights in a separate file, which onnxruntime maps instead of reading): fast, and
    only the touched pages are read (the text encoder's embedding rows of a prompt's
    tokens), against a read and a copy of the whole file. None where the copy cannot be
    written (the caller loads ``rel``). Where the copy is gone or damaged by the time of
    a request, that request loads ``rel``."""
    cache, stem = cache_file(root, rel, "mapped")

    def open_cached() -> ort.InferenceSession:
        return ort.InferenceSession(str(cache), sess_options=opts, providers=providers)

    def open_for_request() -> ort.InferenceSession:
        try:
            return open_cached()
        except Exception as e:   # removed or damaged since the load
            log.warning("cannot open %s (%s): loading %s whole", cache, e, rel)
            return sessions.open_session(root, rel, opts, providers)

    if cached_session(root, rel, "mapped", opts, providers) is not None:
        return open_for_request   # it opens: reuse it
    save = ort.SessionOptions()
    save.intra_op_num_threads, save.log_severity_level = 1, 3
    save.graph_optimization_level = opts.graph_optimization_level
    save.add_session_config_entry("session.disable_prepacking", "1")
    try:
        tmp, weights = saving(save, cache, stem, "mapped", prepacked=False)
    except OSError as e:
        log.info("not caching %s: %s", rel, e)
        return None
    try:
        sessions.open_session(root, rel, save, providers)   # a damaged file raises here
    except Exception:
        tmp.unlink(missing_ok=True)
        weights.unlink(missing_ok=True)
        raise
    if not tmp.is_file():
        return None
    os.replace(tmp, cache)
    sessions.release_heap()
    try:
        open_cached()
    except Exception as e:
        log.warning("cannot open %s just cached (%s): loading it whole", cache, e)
        return None
    return open_for_request


def rewritten_session(root: Path, rel: str, threads: int, providers: list, config: ModelConfig, *,
                      share_kv: bool = True, nbits: int | None = None,
                      kv_scales: dict[str, np.ndarray] | None = None
                      ) -> ort.InferenceSession | None:
    """The decoder ``rel`` rewritten (rewrite.py): its MatMuls onto ``nbits``-bit blocks
    (required: failing raises MODEL_LOAD_FAILED) and/or its self-attention onto shared
    KV buffers (optional: None where it does not apply), int8 ones with ``kv_scales``.

    The first load rewrites the graph (needs the ``onnx`` package) and saves
    onnxruntime's optimized result under ``optimized_dir()``: the graph in
    ``<tag>.onnx``, its weights and onnxruntime's prepacked copies of them in
    ``<tag>.onnx.<pid>.data``; then it opens that cache like every later load does.
    onnxruntime maps the data file and uses the prepacked weights from it, so the
    unpacked originals are not kept in memory and the pages are the page cache's,
    shared and reclaimable.
    """
    kind = rewrite_kind(nbits, share_kv, kv_int8=kv_scales is not None)
    cache, stem = cache_file(root, rel, kind)
    session = cached_session(root, rel, kind, sessions.options("decoder", threads), providers)
    if session is not None:
        return session
    opts = sessions.options("decoder", threads)
    tmp = weights = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        tmp, weights = saving(opts, cache, stem, kind, prepacked=True)
    except OSError as e:
        log.info("not caching the rewritten %s: %s", rel, e)
    stage_dir = cache.with_name(f"{cache.name}.stage")
    try:
        from lofid.worker.graphs.rewrite import rewrite_decoder

        model, layers = rewrite_decoder((root / rel).resolve(), config, share_kv=share_kv,
                                        nbits=nbits, kv_scales=kv_scales)
        data = stage(model, stage_dir)
        del model
    except ImportError as e:
        return _cannot(rel, nbits, "the onnx package is not installed (the KV cache is "
                       "copied every step without it)", e)
    except Exception as e:
        shutil.rmtree(stage_dir, ignore_errors=True)
        return _cannot(rel, nbits, "cannot rewrite it", e)
    sessions.release_heap()
    try:
        session = ort.InferenceSession(data, sess_options=opts, providers=providers)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        weights.unlink(missing_ok=True)
        return _cannot(rel, nbits, "onnxruntime rejects the rewritten graph", e)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)   # read (or mapped) by now
    del data
    log.info("%s: %s%d self-attention layers on shared %s KV buffers", rel,
             f"{nbits}-bit MatMuls, " if nbits else "", layers,
             "int8" if kv_scales is not None else "float")
    if not tmp.is_file():
        return session   # not cached: run this session
    del session   # the cache opens with less memory than this first session holds
    return _reopen_cached(tmp, cache, rel, nbits, threads, providers)


def _reopen_cached(tmp: Path, cache: Path, rel: str, nbits: int | None, threads: int,
                   providers: list) -> ort.InferenceSession | None:
    """Move the first load's saved graph ``tmp`` into the cache and open it there."""
    os.replace(tmp, cache)
    sessions.release_heap()
    try:
        return ort.InferenceSession(str(cache), sess_options=sessions.options("decoder", threads),
                                    providers=providers)
    except Exception as e:
        cache.unlink(missing_ok=True)
        return _cannot(rel, nbits, "cannot open the rewritten graph just cached", e)


def _cannot(rel: str, nbits: int | None, problem: str, e: Exception) -> None:
    """A rewrite that failed. int{nbits} has no exported form to fall back to: raise. The
    shared-KV rewrite alone is an optimization: log, and the caller runs ``rel`` as
    exported."""
    if nbits:
        raise LofiError(MODEL_LOAD_FAILED, f"the int{nbits} decoder from {rel}: "
                        f"{problem} ({e}); {sessions.REPAIR}", file=rel) from e
    log.warning("%s: %s (%s): running it as exported", rel, problem, e)


def stage(model, stage_dir: Path) -> str | bytes:
    """``model`` (onnx ModelProto) for onnxruntime to open: saved in the folder
    ``stage_dir`` with its weights in a file beside the graph, -> the graph's path; its
    bytes where ``stage_dir`` cannot be written. From the file onnxruntime parses a graph
    without the weights and reads each weight once, where from bytes it holds the whole
    serialized model, the parsed model and the weights at the same time: a lower peak
    for the first load (bench/HISTORY.md, "Worker memory at load and per request").
    The caller removes ``stage_dir``; a failed write raises OSError."""
    import onnx

    shutil.rmtree(stage_dir, ignore_errors=True)
    try:
        paths.make_dirs(stage_dir)
    except OSError as e:
        log.info("cannot stage the rewritten graph in %s (%s): handing it over in memory",
                 stage_dir, e)
        return model.SerializeToString()
    onnx.save_model(model, str(stage_dir / "graph.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="graph.data",
                    size_threshold=1024)
    return str(stage_dir / "graph.onnx")
