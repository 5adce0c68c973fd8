"""onnxruntime sessions: their options per role, opening them, running them; and the
tokenizer beside them.

Every onnxruntime failure becomes a LofiError with a code: a file that cannot be loaded
MODEL_LOAD_FAILED (``open_session``, ``open_tokenizer``), a failed run
MODEL_INFERENCE_FAILED (``guard``).
All session options come from ``options``, so a benchmark can wrap
``session_options`` here (profiling, spinning) for every session the engine opens.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import tokenizers

from lofid.errors import MODEL_INFERENCE_FAILED, MODEL_LOAD_FAILED, LofiError
from lofid.worker.device import session_options

log = logging.getLogger(__name__)

REPAIR = "run `lofictl models download --force` to fetch it again"
# passed to each EnCodec run (``options`` says why)
SHRINK_ARENA = ort.RunOptions()
SHRINK_ARENA.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


def options(role: str, threads: int):
    """Session options for the graph of ``role`` (text_encoder, decoder,
    decoder_with_past, encodec). The text encoder (a few tokens once per request) and
    EnCodec (once per request) run without prepacked weights: the packed copy costs
    memory for the whole life of the worker and saves little time. EnCodec also runs
    without memory patterns (with them its arena grows on every request, one pattern per
    audio length), and each EnCodec run shrinks the arena when it ends (``SHRINK_ARENA``):
    its activations go back to the OS instead of staying reserved under the next
    request's KV buffers and text encoder. The figures: bench/HISTORY.md, "Worker memory
    at load and per request"."""
    opts = session_options(threads)
    if role in ("text_encoder", "encodec"):
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if role == "encodec":
        opts.enable_mem_pattern = False
    return opts


def open_session(root: Path, rel: str, opts, providers: list) -> ort.InferenceSession:
    """The graph ``root / rel`` as a session; MODEL_LOAD_FAILED where onnxruntime cannot
    load it (a truncated or corrupt file, most likely)."""
    try:
        return ort.InferenceSession(str(root / rel), sess_options=opts, providers=providers)
    except MemoryError:
        raise
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LofiError(MODEL_LOAD_FAILED, f"onnxruntime cannot load {rel} "
                        f"({first_line}); the file may be truncated or corrupt: "
                        f"{REPAIR}", file=rel) from e


def open_tokenizer(root: Path, rel: str) -> tokenizers.Tokenizer:
    """The tokenizer ``root / rel``; MODEL_LOAD_FAILED where it cannot be read. A
    well-formed tokenizer file (JSON with its ``model``) that this tokenizers rejects was
    written by a newer tokenizers: the error then names the package and its version
    instead of blaming the file."""
    path = root / rel
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:
        problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not _tokenizer_shaped(path):
            raise LofiError(MODEL_LOAD_FAILED, f"cannot load {path}: {problem}; {REPAIR}",
                            file=rel) from e
        raise LofiError(MODEL_LOAD_FAILED, f"tokenizers {tokenizers.__version__} cannot read "
                        f"{path} ({problem}), a well-formed tokenizer file: it needs a newer "
                        "tokenizers: pip install -U tokenizers", file=rel, package="tokenizers",
                        version=tokenizers.__version__) from e


def _tokenizer_shaped(path: Path) -> bool:
    """Whether ``path`` is JSON of a tokenizer's shape (an object with a ``model`` object)."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("model"), dict)


def upcast_session(root: Path, rel: str, opts, providers: list) -> ort.InferenceSession | None:
    """``rel`` (an fp16 graph) upcast to fp32 in memory (graphs/upcast.py says why). None
    where the onnx package is missing or onnxruntime rejects the upcast graph (the caller
    loads the file as it is)."""
    try:
        import onnx

        from lofid.worker.graphs.upcast import upcast_fp16
    except ImportError:
        log.info("the onnx package is not installed: running %s in fp16", rel)
        return None
    try:
        model = onnx.load(str(root / rel))
    except Exception:
        return open_session(root, rel, opts, providers)   # its load error says what is wrong
    upcast_fp16(model)
    data = model.SerializeToString()
    del model
    try:
        return ort.InferenceSession(data, sess_options=opts, providers=providers)
    except Exception as e:
        log.warning("onnxruntime rejects %s upcast to fp32 (%s): running it in fp16", rel, e)
        return None


def run(sess: ort.InferenceSession, outputs: list[str] | None, feeds: dict,
        run_options: ort.RunOptions | None = None) -> list:
    """``sess.run``, its failures as MODEL_INFERENCE_FAILED."""
    return guard(lambda: sess.run(outputs, feeds, run_options))


def guard(call: Callable[[], object]):
    """Run an onnxruntime call, turning its failures into MODEL_INFERENCE_FAILED."""
    try:
        return call()
    except MemoryError:
        raise
    except Exception as e:  # onnxruntime raises its own exception types
        text = str(e)
        if "alloc" in text.lower() or "out of memory" in text.lower():
            raise LofiError(MODEL_INFERENCE_FAILED, f"out of memory: {text}") from e
        raise LofiError(MODEL_INFERENCE_FAILED, f"inference failed: {text}") from e


def release_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise: a worker whose
    first load rewrote the decoder would stay that much larger for its whole life)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass   # not glibc
