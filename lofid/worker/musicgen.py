"""The ONNX MusicGen pipeline: text -> T5 encoder -> decoder with KV cache -> EnCodec.

Files come in the ``gabotechs/music_gen`` hub layout (docs: CONTRACT.md "Model files").
Every dimension (codebooks, layers, heads, hidden sizes, pad token, sample rate, hop)
comes from ``small/config.json`` and the graphs, so the tiny test model in
``tests/fixtures/music_gen`` runs through exactly the same code as musicgen-small.

One request: tokenize -> text encoder ``[1, L, D]`` -> classifier-free guidance batch
[conditional, unconditional (zero states, zero mask)] -> per window: delayed template
(delay.py) -> prefill the known positions -> one decoder step per position with the KV
cache, guided logits, top-k sampling (sampling.py) -> undo the delay -> EnCodec.
Requests longer than one window continue the way audiocraft's ``_generate_tokens`` does:
the next window is primed with the last ``window - stride`` frames and the same text.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from lofid import paths
from lofid.errors import (
    INVALID_DURATION,
    INVALID_PARAMS,
    MODEL_INFERENCE_FAILED,
    MODEL_LOAD_FAILED,
    MODEL_NOT_FOUND,
    LofiError,
)
from lofid.worker import delay, kvquant
from lofid.worker.device import INSTALL_HINT, PROVIDER, resolve_threads, select, session_options
from lofid.worker.sampling import SamplingParams, guide, sample

Progress = Callable[[int, int], None]
log = logging.getLogger("lofid.worker.musicgen")

CONFIG = "small/config.json"
TOKENIZER = "small/tokenizer.json"
# The folders the engine reads per variant: (text encoder, decoder, EnCodec). int8 takes
# the fp32 text encoder and EnCodec, as MusicGPT's "small-quant" does.
VARIANT_DIRS: dict[str, tuple[str, str, str]] = {
    "fp32": ("small_fp32", "small_fp32", "small_fp32"),
    "fp16": ("small_fp16", "small_fp16", "small_fp16"),
    "int8": ("small_fp32", "small_i8", "small_fp32"),
    "int4": ("small_fp32", "small_i8", "small_fp32"),
}
# int4 is made here from the int8 files: their MatMuls requantized to 4-bit blocks (nbits.py)
NBITS = {"int4": 4}
NBITS_BLOCK = 256
# variants whose self-attention cache is int8, with calibrated scales (kvquant.py; CPU,
# merged decoder): the speed-first variant only
KV_INT8 = {"int4"}
# The hub's small_fp16/ has no merged decoder, so fp16 uses the split pair.
DEFAULT_DECODER_FORM = {"fp32": "merged", "fp16": "split", "int8": "merged", "int4": "merged"}
REPAIR = "run `lofictl models download --force` to fetch it again"
WINDOW_SEC = 30.0    # MusicGen was trained on 30 s
STRIDE_SEC = 18.0    # audiocraft's extend_stride: the next window keeps the last 12 s
MIN_DECODE_FRAMES = 8
ENCODEC_CHUNK_SEC = 10.0     # decode_audio: EnCodec runs on at most this much audio at once
ENCODEC_OVERLAP_SEC = 1.0    # ... plus this much context on either side, crossfaded
_PAST = re.compile(r"past_key_values\.(\d+)\.(decoder|encoder)\.(key|value)$")
_NP_TYPE = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


def engine_file_roles(variant: str, decoder_form: str | None = None) -> dict[str, str]:
    """role -> hub-relative path of each ONNX file the engine opens for ``variant``.

    ``decoder_form`` "merged" (one graph with ``use_cache_branch``) or "split"
    (``decoder_model`` + ``decoder_with_past_model``); None takes the variant's default.
    """
    if variant not in VARIANT_DIRS:
        raise LofiError(INVALID_PARAMS, f"unknown variant {variant!r}; choose one of "
                        f"{', '.join(VARIANT_DIRS)}", variant=variant)
    form = decoder_form or DEFAULT_DECODER_FORM[variant]
    if form not in ("merged", "split"):
        raise LofiError(INVALID_PARAMS, f"decoder_form must be merged or split, not {form!r}")
    text, dec, codec = VARIANT_DIRS[variant]
    roles = {"text_encoder": f"{text}/text_encoder.onnx"}
    if form == "merged":
        roles["decoder"] = f"{dec}/decoder_model_merged.onnx"
    else:
        roles["decoder"] = f"{dec}/decoder_model.onnx"
        roles["decoder_with_past"] = f"{dec}/decoder_with_past_model.onnx"
    roles["encodec"] = f"{codec}/encodec_decode.onnx"
    return roles


def engine_files(variant: str, decoder_form: str | None = None) -> list[str]:
    """Hub-relative paths the engine needs for ``variant`` (config and tokenizer too)."""
    return [CONFIG, TOKENIZER, *engine_file_roles(variant, decoder_form).values()]


def plan_windows(frames: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(offset, primed, length)`` per window, as audiocraft's ``_generate_tokens``.

    Window i covers frames ``[offset, offset + length)``; its first ``primed`` frames are
    the previous window's last frames, fed as a prompt; the rest are new.
    """
    if not 0 < stride < window:
        raise ValueError(f"need 0 < stride ({stride}) < window ({window})")
    plans, offset, primed = [], 0, 0
    while offset + primed < frames:
        length = min(frames - offset, window)
        plans.append((offset, primed, length))
        primed, offset = length - stride, offset + stride
    return plans


@dataclass(frozen=True)
class ModelConfig:
    """What the engine reads from ``small/config.json``."""

    num_codebooks: int
    pad_token_id: int
    max_positions: int
    num_heads: int
    head_dim: int
    sample_rate: int
    hop_length: int

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sample_rate / self.hop_length)

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            cfg = json.loads(path.read_text())
            dec, audio = cfg["decoder"], cfg["audio_encoder"]
            heads = int(dec["num_attention_heads"])
            return cls(
                num_codebooks=int(dec["num_codebooks"]),
                pad_token_id=int(dec["pad_token_id"]),
                max_positions=int(dec["max_position_embeddings"]),
                num_heads=heads,
                head_dim=int(dec["hidden_size"]) // heads,
                sample_rate=int(audio["sampling_rate"]),
                hop_length=int(np.prod(audio["upsampling_ratios"])),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LofiError(MODEL_LOAD_FAILED, f"cannot read {path}: {e}; {REPAIR}",
                            file=str(path)) from e


def _run(sess: ort.InferenceSession, outputs: list[str] | None, feeds: dict,
         options: ort.RunOptions | None = None) -> list:
    return _guard(lambda: sess.run(outputs, feeds, options))


def _guard(call: Callable[[], object]):
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


# ----------------------------------------------------------- KV-cache buffer sharing
# The exported with-past decoder appends each step's key/value to the self-attention
# cache with a Concat, i.e. it copies the whole growing cache every step (24 layers x
# K and V x 2 CFG rows: ~200 MB per step at 10 s). ``share_kv_graph`` rewrites each
# self-attention onto onnxruntime's com.microsoft.GroupQueryAttention (kv heads = heads,
# i.e. plain multi-head attention) whose past and present are one preallocated buffer
# ``[batch, heads, capacity, head_dim]``: the step writes its new key/value in place and
# attends over the first ``kv_total_sequence_length`` positions. The position embedding,
# which the export derives from the past's length, is derived from that input instead.
_SHRINK_ARENA = ort.RunOptions()
_SHRINK_ARENA.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
# bumped when a rewrite changes, so that graphs cached by an older lofid are rebuilt
# (2: the int4 decoder's q/k/v in one MatMulNBits, nbits.fuse_qkv; 3: fixed step shapes;
# 4: cross-attention on MultiHeadAttention). int4's cache name carries its block size
# (``_rewrite_kind``), so its blocks of 256 with searched scales needed no bump.
REWRITE_VERSION = 4
KV_SEQLENS = "kv_seqlens_k"                 # int32 [batch]: total length - 1 per row
KV_TOTAL = "kv_total_sequence_length"       # int32 scalar: past + new positions


def optimized_dir() -> Path:
    """Where rewritten, onnxruntime-optimized decoder graphs are cached (user cache)."""
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
                if stale.is_dir():   # a crashed first load's stage (MusicGen._staged)
                    freed += sum(f.stat().st_size for f in stale.iterdir())
                    shutil.rmtree(stale)
                else:
                    freed += stale.stat().st_size
                    stale.unlink()
        except OSError as e:
            log.info("cannot prune %s: %s", marker, e)
    return freed


def _cpu_signature() -> str:
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


def _release_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise: a worker whose
    first load rewrote the decoder would stay ~0.5 GB larger for its whole life)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass   # not glibc


def share_kv_graph(model, heads: int, head_dim: int,
                   kv_scales: dict[str, np.ndarray] | None = None,
                   step_rows: int | None = None) -> int:
    """Rewrite ``model`` (onnx ModelProto, split with-past or merged decoder) in place.

    ``step_rows`` (float32 graphs): the rows of a step's ``input_ids`` (2 x codebooks: the
    CFG pair), each one position long. The step graph reshapes its ids to that fixed
    shape, so that onnxruntime folds the shape arithmetic the export derives from them,
    and runs each cross-attention as one MultiHeadAttention (``cross_attention``): the
    step branch goes from ~1150 nodes to ~430 after onnxruntime's optimizations
    (bench/RESULTS.md). Both move the float rounding a little (fused kernels), which
    fp16 graphs do not take without changing their codes.

    ``kv_scales`` (merged decoder only): ``present.<i>.decoder.key``/``.value`` -> its
    per-channel scale ``[heads * head_dim]``; the self-attention cache is then int8
    (kvquant.py says how the scales are chosen), and the prefill branch quantizes what it
    hands over the same way.

    Returns the number of self-attention layers rewritten; raises ValueError when the
    graph does not have the expected shape (the caller then keeps the original graph).
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    past = {i.name for i in graph.input if _PAST.match(i.name) and ".decoder." in i.name}
    if not past:
        raise ValueError("no decoder past inputs")
    target, prefill = None, None
    if any(i in past for n in graph.node for i in n.input):
        target = graph
    else:   # merged: the If branch that reads the past (the other one is the prefill)
        for node in graph.node:
            branches = [a.g for a in node.attribute if a.HasField("g")]
            for g in branches:
                if any(i in past for n in g.node for i in n.input):
                    target = g
                    prefill = next((b for b in branches if b is not g), None)
    if target is None:
        raise ValueError("no graph reads the decoder past")
    if kv_scales is not None and prefill is None:
        raise ValueError("an int8 KV cache needs the merged decoder")
    if kv_scales is not None and head_dim % 8:   # GroupQueryAttention's quantized kernels
        raise ValueError(f"an int8 KV cache needs a head size divisible by 8, not {head_dim}")
    # protobuf hands out fresh wrappers on each access: hold one list of the nodes so
    # that identities (id()) stay stable while the graph is edited
    nodes = list(target.node)
    # only the small constants (scalars, shape vectors): converting the weights too would
    # hold a second copy of the model in memory during the rewrite
    consts = {t.name: numpy_helper.to_array(t) for g in (graph, target)
              for t in g.initializer if math.prod(t.dims) <= 64}
    for n in [*graph.node, *nodes] if target is not graph else nodes:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    producers = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def made_by(name, op):
        n = producers.get(name)
        if n is None or n.op_type != op:
            raise ValueError(f"{name} is not made by {op}")
        return n

    def used_by(name, op):
        c = consumers.get(name, [])
        if len(c) != 1 or c[0].op_type != op:
            raise ValueError(f"{name} is not used by exactly one {op}")
        return c[0]

    def new_projection(name):   # [B, H, S, D] key/query -> the [B, S, H*D] projection
        return made_by(made_by(name, "Transpose").input[0], "Reshape").input[0]

    def scalar(name):
        if name not in consts or np.asarray(consts[name]).size != 1:
            raise ValueError(f"{name} is not a constant scalar")
        return float(np.asarray(consts[name]).reshape(-1)[0])

    def cross_attention(i):
        """Layer ``i``'s attention over the encoder keys/values (cached by the prefill) as
        one com.microsoft.MultiHeadAttention, in place of the export's ~20 nodes
        (reshapes, transposes, two MatMuls, the mask Add, Softmax, their shape arithmetic)."""
        ek, ev = (f"past_key_values.{i}.encoder.{x}" for x in ("key", "value"))
        for cached in (ek, ev):   # the export copies each through a one-input Concat
            aliases = {cached} | {n.output[0] for n in nodes if n.op_type in ("Concat", "Identity")
                                  and list(n.input) == [cached]}
            for n in nodes:
                n.input[:] = [cached if x in aliases else x for x in n.input]
        tr_k = [n for n in consumers_of(ek) if n.op_type == "Transpose"]
        if len(tr_k) != 1 or list(tr_k[0].attribute[0].ints) != [0, 1, 3, 2]:
            raise ValueError(f"layer {i}: unexpected cross-attention keys")
        mul_k = used_by(tr_k[0].output[0], "Mul")
        qk = used_by(mul_k.output[0], "MatMul")
        mul_q = made_by(qk.input[0], "Mul")
        bias = used_by(qk.output[0], "Add")
        soft = used_by(bias.output[0], "Softmax")
        av = used_by(soft.output[0], "MatMul")
        tr_o = used_by(av.output[0], "Transpose")
        out = used_by(tr_o.output[0], "Reshape")
        tr_q = made_by(mul_q.input[0], "Transpose")
        reshape_q = made_by(tr_q.input[0], "Reshape")
        if qk.input[1] != mul_k.output[0] or av.input[1] != ev or \
                [list(t.attribute[0].ints) for t in (tr_q, tr_o)] != [[0, 2, 1, 3]] * 2:
            raise ValueError(f"layer {i}: unexpected cross-attention")
        drop.update(id(n) for n in (reshape_q, tr_q, mul_q, tr_k[0], mul_k, qk, bias, soft,
                                    av, tr_o, out))
        mask = next(x for x in bias.input if x != qk.output[0])   # [B, 1, 1, L] additive
        cut = producers.get(mask)
        if cut is not None and cut.op_type == "Slice" and len(cut.input) == 5 and \
                [np.asarray(consts.get(x, np.nan)).reshape(-1).tolist()
                 for x in (cut.input[1], cut.input[3], cut.input[4])] in ([[0], [3], [1]],
                                                                          [[0], [-1], [1]]):
            mask = cut.input[0]   # cut to the keys' length: the encoder's, the mask's own
        return helper.make_node(
            "MultiHeadAttention", [reshape_q.input[0], ek, ev, "", "", mask],
            [out.output[0]], name=f"/lofid/cross/{i}/MultiHeadAttention", domain="com.microsoft",
            num_heads=heads, scale=scalar(mul_q.input[1]) * scalar(mul_k.input[1]))

    def consumers_of(name):   # read live: cross_attention rewires inputs after `consumers`
        return [n for n in nodes if name in n.input]

    outputs = {o.name for o in target.output}
    layers = sorted(int(m.group(1)) for o in outputs
                    if (m := re.match(r"present\.(\d+)\.decoder\.key$", o)))
    if not layers:
        raise ValueError("no decoder present outputs")
    drop, add = set(), []
    for i in layers:
        pk, pv = f"present.{i}.decoder.key", f"present.{i}.decoder.value"
        cat_k, cat_v = made_by(pk, "Concat"), made_by(pv, "Concat")
        tr_k = used_by(pk, "Transpose")
        mul_k = used_by(tr_k.output[0], "Mul")
        qk = used_by(mul_k.output[0], "MatMul")
        mul_q = made_by(qk.input[0], "Mul")
        soft = used_by(qk.output[0], "Softmax")
        av = used_by(soft.output[0], "MatMul")
        if qk.input[1] != mul_k.output[0] or av.input[1] != pv or len(consumers[pv]) != 1:
            raise ValueError(f"layer {i}: unexpected self-attention")
        scale = scalar(mul_q.input[1]) * scalar(mul_k.input[1])
        pre = f"/lofid/kvshare/{i}"
        inputs = [new_projection(mul_q.input[0]),
                  new_projection(cat_k.input[-1]), new_projection(cat_v.input[-1]),
                  f"past_key_values.{i}.decoder.key", f"past_key_values.{i}.decoder.value",
                  KV_SEQLENS, KV_TOTAL]
        quant = {}
        if kv_scales is not None:
            # inputs 7-11 (rotary caches, position ids, bias, sink) unused; 12, 13 scales
            inputs += ["", "", "", "", "", pre + "/k_scale", pre + "/v_scale"]
            for name, present in ((pre + "/k_scale", pk), (pre + "/v_scale", pv)):
                target.initializer.append(numpy_helper.from_array(
                    kvquant.channel_scale(kv_scales, present, heads * head_dim), name))
            quant = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL",
                         kv_cache_bit_width=8)
        add.append(helper.make_node(
            "GroupQueryAttention", inputs, [pre + "/attn", pk, pv],
            name=pre + "/GroupQueryAttention", domain="com.microsoft", num_heads=heads,
            kv_num_heads=heads, scale=scale, **quant))
        target.initializer.append(numpy_helper.from_array(
            np.array([0, 0, heads, head_dim], np.int64), pre + "/shape"))
        add.append(helper.make_node("Reshape", [pre + "/attn", pre + "/shape"],
                                    [pre + "/bshd"], name=pre + "/Reshape"))
        add.append(helper.make_node("Transpose", [pre + "/bshd"], [av.output[0]],
                                    name=pre + "/Transpose", perm=[0, 2, 1, 3]))
        drop.update(id(n) for n in (cat_k, cat_v, tr_k, mul_k, qk, soft, av))
        if step_rows:
            add.append(cross_attention(i))
    # The past length (for the positions) was Shape(past)[2]: now total - new length.
    aliases = set(past)
    for n in nodes:
        if n.op_type in ("Concat", "Identity") and len(n.input) == 1 and n.input[0] in aliases:
            aliases.add(n.output[0])
    ids = next((i for i in graph.input if i.name == "input_ids"), None)
    if ids is None:
        raise ValueError("no input_ids")
    pre = "/lofid/kvshare/past_length"
    length_nodes = [
        helper.make_node("Cast", [KV_TOTAL], [pre + "/total"], to=TensorProto.INT64),
        helper.make_node("Shape", ["input_ids"], [pre + "/ids_shape"]),
        helper.make_node("Gather", [pre + "/ids_shape", pre + "/one"], [pre + "/new"], axis=0),
        helper.make_node("Sub", [pre + "/total", pre + "/new"], [pre + "/value"]),
    ]
    target.initializer.append(numpy_helper.from_array(np.array(1, np.int64), pre + "/one"))
    replaced = 0
    for n in nodes:
        if n.op_type == "Shape" and n.input[0] in aliases and id(n) not in drop:
            for g in consumers.get(n.output[0], []):
                if g.op_type != "Gather" or scalar(g.input[1]) != 2:
                    raise ValueError(f"{n.name}: past shape used for more than its length")
                drop.add(id(g))
                add.append(helper.make_node("Identity", [pre + "/value"], [g.output[0]]))
                replaced += 1
    if step_rows:
        pinned = "/lofid/kvshare/step_ids"
        for n in [*nodes, *add, *length_nodes]:
            n.input[:] = [pinned if x == "input_ids" else x for x in n.input]
        target.initializer.append(numpy_helper.from_array(
            np.array([step_rows, 1], np.int64), pinned + "/shape"))
        length_nodes.insert(0, helper.make_node("Reshape", ["input_ids", pinned + "/shape"],
                                                [pinned], name=pinned + "/Reshape"))
    add[:0] = length_nodes
    _prune(target, [n for n in nodes if id(n) not in drop] + add, outputs)
    graph.input.extend([
        helper.make_tensor_value_info(KV_SEQLENS, TensorProto.INT32, ["batch_size"]),
        helper.make_tensor_value_info(KV_TOTAL, TensorProto.INT32, []),
    ])
    for g in {id(graph): graph, id(target): target}.values():
        for o in g.output:
            if o.name.startswith("present.") and ".decoder." in o.name:
                o.type.tensor_type.shape.dim[2].Clear()
                o.type.tensor_type.shape.dim[2].dim_param = "kv_capacity"
    if kv_scales is not None:
        kvquant.quantize_prefill(prefill, kv_scales, heads, head_dim)
        for v in [*graph.input, *graph.output, *target.output]:
            if (_PAST.match(v.name) or v.name.startswith("present.")) and ".decoder." in v.name:
                v.type.tensor_type.elem_type = TensorProto.INT8
    return len(layers)


def _prune(graph, nodes: list, outputs: set[str]) -> None:
    """Set ``graph``'s nodes to ``nodes`` less those whose outputs nothing reads, in
    topological order."""
    while True:
        used = set(outputs)
        for n in nodes:
            used.update(n.input)
            for a in n.attribute:
                if a.HasField("g"):
                    used.update(i for sub in a.g.node for i in sub.input)
        alive = [n for n in nodes if any(o in used for o in n.output)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    made = {o for n in nodes for o in n.output}
    ready, order, pending = set(), [], nodes
    while pending:
        rest = []
        for n in pending:
            if all(i == "" or i not in made or i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError("graph has a cycle after the rewrite")
        pending = rest
    order = [type(n)().__class__.FromString(n.SerializeToString()) for n in order]
    del graph.node[:]
    graph.node.extend(order)


class _Decoder:
    """The MusicGen decoder with its KV cache: merged (one session) or split (two).

    ``begin`` runs the positions known up front with no cache and keeps the encoder
    (cross-attention) keys/values, computed once per request; ``step`` feeds one
    position and grows the decoder cache.
    """

    def __init__(self, first: ort.InferenceSession, with_past: ort.InferenceSession,
                 config: ModelConfig) -> None:
        self.first, self.with_past = first, with_past
        self.merged = first is with_past
        past_inputs = {i.name: i for i in with_past.get_inputs() if _PAST.match(i.name)}
        self.past_names = sorted(past_inputs)
        inputs = {i.name: i for i in first.get_inputs()}
        missing = {"input_ids", "encoder_hidden_states", "encoder_attention_mask"} - set(inputs)
        if missing or not self.past_names or (self.merged and "use_cache_branch" not in inputs):
            raise ValueError(f"not a MusicGen decoder graph (missing {sorted(missing)})")
        self.dtype = _NP_TYPE[inputs["encoder_hidden_states"].type]
        shape = past_inputs[self.past_names[0]].shape   # [batch, heads, len, head_dim]
        self.heads = shape[1] if isinstance(shape[1], int) else config.num_heads
        self.head_dim = shape[3] if isinstance(shape[3], int) else config.head_dim
        self.step_inputs = {i.name for i in with_past.get_inputs()}
        self.dec_names = [n for n in self.past_names if ".decoder." in n]
        # each past's element type: the decoder's is int8 where its cache is quantized
        self.past_dtype = {n: _NP_TYPE[past_inputs[n].type] for n in self.past_names}
        self.step_outputs = ["logits"] + [self._present(n) for n in self.dec_names]
        self.device_type = "cuda" if first.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.cache: dict[str, ort.OrtValue] = {}
        # share_kv_graph'd decoder: the self-attention cache lives in preallocated
        # buffers, bound as both past and present, written in place.
        self.shared = KV_SEQLENS in self.step_inputs
        self.length = 0
        self.binding, self.bound = None, {}   # the shared decoder's step (``_bind_steps``)

    def release(self) -> None:
        """Drop the KV buffers and the encoder states between requests (the KV buffers
        are the largest allocation of a long generation; EnCodec runs after them)."""
        self.cache, self.hidden, self.mask, self.length = {}, None, None, 0
        self.binding, self.bound = None, {}

    @staticmethod
    def _present(past_name: str) -> str:
        return past_name.replace("past_key_values.", "present.", 1)

    def _value(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, 0)

    def _bound_run(self, sess: ort.InferenceSession, inputs: dict, outputs: list[str]) -> list:
        """Run through IOBinding: the KV cache stays in onnxruntime's OrtValues (on the
        device for CUDA) and is bound straight back as the next step's past, with no
        copy into numpy and back. Only the logits are read out. (The shared decoder's
        steps keep one binding instead: ``_bind_steps``.)"""
        binding = sess.io_binding()
        for name, value in inputs.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, value)
        for name in outputs:
            binding.bind_output(name, self.device_type)
        _guard(lambda: sess.run_with_iobinding(binding))
        return binding.get_outputs()

    def begin(self, ids: np.ndarray, hidden: np.ndarray, mask: np.ndarray,
              capacity: int = 0) -> np.ndarray:
        """ids ``[2K, L]`` -> logits of the last position ``[2K, V]``; fills the cache.

        ``capacity``: the most positions this sequence will reach (the size of the
        shared KV buffers; ignored by the unshared graphs)."""
        self.hidden, self.mask = self._value(hidden), self._value(mask)
        batch, length = hidden.shape[0], ids.shape[1]
        inputs = {"input_ids": ids, "encoder_hidden_states": self.hidden,
                  "encoder_attention_mask": self.mask}
        if self.merged:
            inputs.update({n: np.zeros((batch, self.heads, 0, self.head_dim),
                                       self.past_dtype[n]) for n in self.past_names})
            inputs["use_cache_branch"] = np.array([False])
            if self.shared:
                inputs[KV_SEQLENS] = np.full(batch, length - 1, np.int32)
                inputs[KV_TOTAL] = np.array(length, np.int32)
        names = ["logits"] + [self._present(n) for n in self.past_names]
        out = self._bound_run(self.first, inputs, names)
        self.cache = dict(zip(self.past_names, out[1:], strict=True))   # encoder K/V: computed once
        if self.shared:
            # one zeroed buffer per layer's key and value, the prefill copied in once
            capacity = max(capacity, length + 1)
            for name in self.dec_names:
                buf = np.zeros((batch, self.heads, capacity, self.head_dim),
                               self.past_dtype[name])
                buf[:, :, :length] = self.cache[name].numpy()
                self.cache[name] = self._value(buf)
            self.length = length
        logits = out[0].numpy()
        if self.shared:
            self._bind_steps(logits.shape[0], logits.shape[-1], logits.dtype)
        return logits[:, -1]

    def _bind_steps(self, rows: int, vocab: int, dtype) -> None:
        """Bind the shared decoder's step once per sequence: every step runs on the same
        buffers (the KV cache in place, the encoder states, the logits), so only the
        step's ids and the two lengths change, written into their bound values. Binding
        the ~150 names anew each step cost ~0.3 ms of a ~10 ms step."""
        batch = self.mask.shape()[0]
        self.step_ids = self._value(np.zeros((rows, 1), np.int64))
        self.seqlens = self._value(np.zeros(batch, np.int32))
        self.total = self._value(np.zeros((), np.int32))
        self.logits = np.zeros((rows, 1, vocab), dtype)
        b = self.binding = self.with_past.io_binding()
        inputs = {"input_ids": self.step_ids, "encoder_attention_mask": self.mask,
                  KV_SEQLENS: self.seqlens, KV_TOTAL: self.total, **self.cache}
        if "encoder_hidden_states" in self.step_inputs:
            inputs["encoder_hidden_states"] = self.hidden
        if self.merged:
            inputs["use_cache_branch"] = self._value(np.array([True]))
        # OrtValues made from numpy wrap its memory and keep it alive: held here with
        # the binding (the logits' one: each run writes the logits into self.logits)
        self.bound = {**inputs, "logits": ort.OrtValue.ortvalue_from_numpy(self.logits)}
        for name, value in inputs.items():
            b.bind_ortvalue_input(name, value)
        b.bind_ortvalue_output("logits", self.bound["logits"])
        for name in self.dec_names:
            b.bind_ortvalue_output(self._present(name), self.cache[name])

    def step(self, ids: np.ndarray) -> np.ndarray:
        """ids ``[2K, 1]`` -> logits ``[2K, V]``; appends to the decoder cache."""
        if not self.shared:
            inputs = {"input_ids": ids, "encoder_attention_mask": self.mask, **self.cache}
            if "encoder_hidden_states" in self.step_inputs:
                inputs["encoder_hidden_states"] = self.hidden
            if self.merged:
                inputs["use_cache_branch"] = np.array([True])
            out = self._bound_run(self.with_past, inputs, self.step_outputs)
            self.cache.update(zip(self.dec_names, out[1:], strict=True))
            return out[0].numpy()[:, -1]
        capacity = self.cache[self.dec_names[0]].shape()[2]
        if self.length + 1 > capacity or ids.shape[1] != 1:
            raise LofiError(MODEL_INFERENCE_FAILED, f"a step of {ids.shape[1]} positions at "
                            f"position {self.length} of a {capacity}-position KV buffer")
        self.step_ids.update_inplace(np.ascontiguousarray(ids, np.int64))
        self.seqlens.update_inplace(np.full(self.seqlens.shape(), self.length, np.int32))
        self.total.update_inplace(np.array(self.length + 1, np.int32))
        _guard(lambda: self.with_past.run_with_iobinding(self.binding))
        self.length += 1
        return self.logits[:, -1].copy()


class MusicGen:
    """A loaded MusicGen variant. Build with ``MusicGen.load``; call ``generate``."""

    def __init__(self, *, root: Path, variant: str, config: ModelConfig,
                 tokenizer: Tokenizer,
                 text_encoder: ort.InferenceSession | Callable[[], ort.InferenceSession],
                 decoder: _Decoder,
                 encodec: ort.InferenceSession | Callable[[], ort.InferenceSession], device: str,
                 threads: int, load_time_sec: float) -> None:
        self.root, self.variant, self.config = root, variant, config
        self.tokenizer = tokenizer
        # the text encoder: a resident session, or (CPU) a function that maps the cached
        # graph for the one run a request needs, so it holds no memory in between
        self.text_encoder = text_encoder if isinstance(text_encoder,
                                                       ort.InferenceSession) else None
        self._open_text_encoder = None if self.text_encoder is not None else text_encoder
        self.decoder = decoder
        # EnCodec likewise (CPU): mapped for a request's decode_audio only, so its weights
        # (~170 MB resident) are not held beside the KV cache while the decoder runs
        self.encodec = encodec if isinstance(encodec, ort.InferenceSession) else None
        self._open_encodec = None if self.encodec is not None else encodec
        self.device, self.threads, self.load_time_sec = device, threads, load_time_sec
        self.provider = decoder.first.get_providers()[0]
        self.sample_rate = config.sample_rate
        self.frame_rate = config.frame_rate
        self.hop_length = config.hop_length
        self.num_codebooks = config.num_codebooks
        # Long-form windows, in frames; settable (tests use short ones on the tiny model).
        self.window_frames = min(round(WINDOW_SEC * self.frame_rate),
                                 config.max_positions - config.num_codebooks)
        self.stride_frames = min(round(STRIDE_SEC * self.frame_rate), self.window_frames - 1)
        # EnCodec in chunks past 10 s (decode_audio); settable like the windows
        self.encodec_chunk_frames = round(ENCODEC_CHUNK_SEC * self.frame_rate)
        self.encodec_overlap_frames = round(ENCODEC_OVERLAP_SEC * self.frame_rate)

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, root: Path | str, variant: str, *, device: str = "auto",
             threads: int | None = None, decoder_form: str | None = None,
             share_kv: bool = True) -> MusicGen:
        """Open ``variant`` (fp32 / fp16 / int8) from a folder in the hub layout.

        ``decoder_form`` overrides the variant's decoder files ("merged" or "split").
        ``share_kv`` (CPU only) runs the with-past decoder rewritten by ``share_kv_graph``
        (cached under ``optimized_dir()``); False runs the files as exported.

        Raises LofiError MODEL_NOT_FOUND (files missing, named in ``missing``) or
        MODEL_LOAD_FAILED (unreadable/corrupt files, unavailable device).
        """
        start = time.perf_counter()
        root = Path(root)
        freed = prune_optimized()
        if freed:
            log.info("removed %.0f MB of cached graphs whose model files are gone", freed / 1e6)
        spec = engine_file_roles(variant, decoder_form)
        files = [CONFIG, TOKENIZER, *spec.values()]
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise LofiError(MODEL_NOT_FOUND, f"model files missing under {root}: "
                            f"{', '.join(missing)}", missing=missing, variant=variant,
                            root=str(root))
        nbits = NBITS.get(variant)
        if nbits:   # a CPU format: auto means the CPU, a GPU is refused
            if (device or "auto").lower() not in ("auto", "cpu"):
                raise LofiError(MODEL_LOAD_FAILED, f"the {variant} variant runs on the CPU "
                                f"only; use fp16 on {device}, or --device cpu",
                                variant=variant, device=device)
            device = "cpu"
        choice = select(device, ort.get_available_providers())
        n_threads = resolve_threads(threads)
        config = ModelConfig.from_file(root / CONFIG)
        try:
            tokenizer = Tokenizer.from_file(str(root / TOKENIZER))
        except Exception as e:
            raise LofiError(MODEL_LOAD_FAILED, f"cannot load {root / TOKENIZER}: {e}; "
                            f"{REPAIR}", file=TOKENIZER) from e
        sessions = {}
        kv_int8 = (variant in KV_INT8 and share_kv and choice.device == "cpu"
                   and "decoder_with_past" not in spec)
        calibrate = False
        # The decoder first: its load has the largest transient (the file read while
        # the weights are packed), best passed while nothing else is in memory.
        for role in sorted(spec, key=lambda r: not r.startswith("decoder")):
            rel = spec[role]
            step_role = "decoder_with_past" if "decoder_with_past" in spec else "decoder"
            if role == step_role and (share_kv or nbits) and choice.device == "cpu":
                if kv_int8:   # calibrated before: the int8-cache graph is cached
                    sessions[role] = cls._cached_session(
                        root, rel, cls._rewrite_kind(nbits, share_kv, kv_int8=True),
                        session_options(n_threads), choice.session_providers)
                    calibrate = sessions[role] is None
                if sessions.get(role) is None:
                    sessions[role] = cls._rewritten_session(root, rel, n_threads,
                                                            choice.session_providers, config,
                                                            share_kv=share_kv, nbits=nbits)
            if role == "encodec" and variant == "fp16":
                sessions[role] = cls._upcast_session(root, rel, cls._options(role, n_threads),
                                                     choice.session_providers)
            elif role in ("text_encoder", "encodec") and choice.device == "cpu":
                sessions[role] = cls._mapped_session(root, rel, cls._options(role, n_threads),
                                                     choice.session_providers)
            if role not in sessions or sessions[role] is None:
                sessions[role] = cls._session(root, rel, cls._options(role, n_threads),
                                              choice.session_providers)
        first = sessions["decoder"]
        used = first.get_providers()[0]
        device_used = next((d for d, p in PROVIDER.items() if p == used), "cpu")
        if (device or "auto").lower() == "auto" and device_used != choice.device:
            log.warning("onnxruntime could not start %s (%s): running on the CPU",
                        PROVIDER[choice.device], INSTALL_HINT.get(choice.device, ""))
        elif device_used != choice.device:
            # onnxruntime falls back to the CPU when a provider's libraries fail to load
            raise LofiError(MODEL_LOAD_FAILED, f"onnxruntime could not start {used!r} for "
                            f"device {choice.device!r} (it fell back to {used}); "
                            f"{INSTALL_HINT.get(choice.device, '')}, or use --device cpu",
                            device=choice.device)
        try:
            decoder = _Decoder(first, sessions.get("decoder_with_past", first), config)
            encodec = sessions["encodec"]
            if not isinstance(encodec, ort.InferenceSession):
                encodec = encodec()   # the mapped copy: opened once here to check it
            if "audio_codes" not in {i.name for i in encodec.get_inputs()}:
                raise ValueError("EnCodec graph has no audio_codes input")
            del encodec
        except (ValueError, KeyError) as e:
            raise LofiError(MODEL_LOAD_FAILED, f"unexpected model graph in {root}: {e}; "
                            f"{REPAIR}", variant=variant) from e
        engine = cls(root=root, variant=variant, config=config, tokenizer=tokenizer,
                     text_encoder=sessions["text_encoder"], decoder=decoder,
                     encodec=sessions["encodec"], device=device_used, threads=n_threads,
                     load_time_sec=0.0)
        # only the engine holds the sessions now: its float-cache decoder can be freed
        # before the int8-cache rewrite comes in (0.5 GB of the first load's peak)
        del sessions, first, decoder
        if calibrate and engine.decoder.shared:
            engine._quantize_kv_cache(spec["decoder"], nbits, choice.session_providers)
        engine.load_time_sec = time.perf_counter() - start
        return engine

    @staticmethod
    def _options(role: str, threads: int):
        """Session options per role. The text encoder (a few tokens once per request) and
        EnCodec (once per request) run without prepacked weights (the packed copy costs
        ~130 MB and ~50 MB for ~10 ms). EnCodec also runs without memory patterns (with
        them its arena grew by another ~0.4 GB on every request, a pattern per audio
        length), and each EnCodec run shrinks the arena when it ends (``_SHRINK_ARENA``):
        its activations (~0.45 GB for 10 s of audio, ~1.2 GB for 30 s) go back to the OS
        instead of staying reserved under the next request's KV buffers and text
        encoder. Measured for 10 s: 0.66 s per run against 0.55 s keeping the arena and
        0.75-1.3 s without an arena."""
        opts = session_options(threads)
        if role in ("text_encoder", "encodec"):
            opts.add_session_config_entry("session.disable_prepacking", "1")
        if role == "encodec":
            opts.enable_mem_pattern = False
        return opts

    @staticmethod
    def _cache_file(root: Path, rel: str, kind: str) -> tuple[Path, str]:
        """(cached graph path, the stem all versions of it share) for ``rel``. The name
        carries the source's path, size and mtime, the onnxruntime version, the CPU's
        features and ``REWRITE_VERSION``, so a re-downloaded file, another onnxruntime,
        another CPU or a changed rewrite rebuilds it."""
        src = (root / rel).resolve()
        st = src.stat()
        where = hashlib.sha1(str(src).encode()).hexdigest()[:12]
        stem = f"{where}-{rel.replace('/', '__').removesuffix('.onnx')}"
        tag = (f"{stem}.{st.st_size}-{st.st_mtime_ns}.ort{ort.__version__}-"
               f"{_cpu_signature()}-r{REWRITE_VERSION}.{kind}.onnx")
        marker = optimized_dir() / f"{where}.source"   # for prune_optimized
        if not marker.is_file():
            try:
                paths.make_dirs(marker.parent)
                marker.write_text(str(src))
            except OSError:
                pass   # not caching anyway: _saving reports why
        return optimized_dir() / tag, stem

    @staticmethod
    def _saving(opts, cache: Path, stem: str, kind: str, prepacked: bool) -> tuple[Path, Path]:
        """Point ``opts`` at a temporary copy of ``cache`` (graph) and its weights file;
        removes older versions (and a crashed first load's stage, ``_staged``). ->
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

    @classmethod
    def _mapped_session(cls, root: Path, rel: str, opts, providers: list[str]
                        ) -> Callable[[], ort.InferenceSession] | None:
        """A function opening ``rel`` from its optimized copy under ``optimized_dir()``
        (weights in a separate file, which onnxruntime maps instead of reading): ~10 ms
        and only the touched pages (the text encoder: ~0.33 GB of its 0.44 GB, the
        embedding rows of a prompt's tokens) against ~0.2-0.4 s and a copy of the whole
        file. None where the copy cannot be written (the caller loads ``rel``). Where the
        copy is gone or damaged by the time of a request, that request loads ``rel``."""
        cache, stem = cls._cache_file(root, rel, "mapped")

        def open_cached() -> ort.InferenceSession:
            return ort.InferenceSession(str(cache), sess_options=opts, providers=providers)

        def open_for_request() -> ort.InferenceSession:
            try:
                return open_cached()
            except Exception as e:   # removed or damaged since the load
                log.warning("cannot open %s (%s): loading %s whole", cache, e, rel)
                return cls._session(root, rel, opts, providers)

        if cls._cached_session(root, rel, "mapped", opts, providers) is not None:
            return open_for_request   # it opens: reuse it
        save = ort.SessionOptions()
        save.intra_op_num_threads, save.log_severity_level = 1, 3
        save.graph_optimization_level = opts.graph_optimization_level
        save.add_session_config_entry("session.disable_prepacking", "1")
        try:
            tmp, weights = cls._saving(save, cache, stem, "mapped", prepacked=False)
        except OSError as e:
            log.info("not caching %s: %s", rel, e)
            return None
        try:
            cls._session(root, rel, save, providers)   # a damaged file raises here
        except Exception:
            tmp.unlink(missing_ok=True)
            weights.unlink(missing_ok=True)
            raise
        if not tmp.is_file():
            return None
        os.replace(tmp, cache)
        _release_heap()
        try:
            open_cached()
        except Exception as e:
            log.warning("cannot open %s just cached (%s): loading it whole", cache, e)
            return None
        return open_for_request

    @staticmethod
    def _rewrite_kind(nbits: int | None, share_kv: bool, kv_int8: bool = False) -> str:
        """The cache-name tag of a decoder rewrite."""
        return "-".join(([f"int{nbits}b{NBITS_BLOCK}"] if nbits else []) +
                        (["kvshare"] if share_kv else []) + (["kv8"] if kv_int8 else []))

    @classmethod
    def _cached_session(cls, root: Path, rel: str, kind: str, opts,
                        providers: list[str]) -> ort.InferenceSession | None:
        """The cached copy ``kind`` of ``rel`` (a rewrite, or ``mapped``); None where there
        is none (a damaged one is removed)."""
        cache, _ = cls._cache_file(root, rel, kind)
        if not cache.is_file():
            return None
        try:
            return ort.InferenceSession(str(cache), sess_options=opts, providers=providers)
        except Exception as e:   # a damaged cache: rebuild it
            log.warning("ignoring cached %s: %s", cache, e)
            cache.unlink(missing_ok=True)
            return None

    @classmethod
    def _rewritten_session(cls, root: Path, rel: str, threads: int, providers: list[str],
                           config: ModelConfig, *, share_kv: bool = True,
                           nbits: int | None = None,
                           kv_scales: dict[str, np.ndarray] | None = None
                           ) -> ort.InferenceSession | None:
        """``rel`` rewritten: its MatMuls onto ``nbits``-bit blocks (``nbits.to_nbits``;
        required: failing raises MODEL_LOAD_FAILED) and/or its self-attention onto shared
        KV buffers (``share_kv_graph``; optional: None where it does not apply), int8
        ones with ``kv_scales`` (kvquant.py).

        The first load rewrites the graph (needs the ``onnx`` package) and saves
        onnxruntime's optimized result under ``optimized_dir()``: the graph in
        ``<tag>.onnx``, its weights and onnxruntime's prepacked copies of them in
        ``<tag>.onnx.<pid>.data``; then it opens that cache like every later load does.
        onnxruntime maps the data file and uses the prepacked weights from it, so the
        unpacked originals are not kept in memory (the merged graph kept both: ~0.45 GB
        more for int8) and the pages are the page cache's, shared and reclaimable.
        """
        src = (root / rel).resolve()
        kind = cls._rewrite_kind(nbits, share_kv, kv_int8=kv_scales is not None)
        cache, stem = cls._cache_file(root, rel, kind)
        session = cls._cached_session(root, rel, kind, session_options(threads), providers)
        if session is not None:
            return session

        def cannot(problem: str, e: Exception) -> None:
            """int{nbits} has no exported form to fall back to: raise. The shared-KV
            rewrite alone is an optimization: log, and the caller runs ``rel`` as exported."""
            if nbits:
                raise LofiError(MODEL_LOAD_FAILED, f"the int{nbits} decoder from {rel}: "
                                f"{problem} ({e}); {REPAIR}", file=rel) from e
            log.warning("%s: %s (%s): running it as exported", rel, problem, e)

        opts = session_options(threads)
        tmp = weights = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        try:
            tmp, weights = cls._saving(opts, cache, stem, kind, prepacked=True)
        except OSError as e:
            log.info("not caching the rewritten %s: %s", rel, e)
        stage = cache.with_name(f"{cache.name}.stage")
        layers = 0
        try:
            import onnx

            model = onnx.load(str(src))
            if nbits:
                from lofid.worker.nbits import fuse_qkv, to_nbits

                if not to_nbits(model, bits=nbits, block=NBITS_BLOCK):
                    raise ValueError("it has no int8 MatMuls")
            if share_kv:
                # fixed step shapes in float32 graphs: in fp16 ones the fusions they
                # allow round differently (codes parted from the exported graph's)
                fp32 = any(i.name == "encoder_hidden_states" and
                           i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
                           for i in model.graph.input)
                layers = share_kv_graph(model, config.num_heads, config.head_dim, kv_scales,
                                        step_rows=2 * config.num_codebooks if fp32 else None)
                if nbits:
                    fuse_qkv(model)
            data = cls._staged(model, stage)
            del model
        except ImportError as e:
            return cannot("the onnx package is not installed (the KV cache is copied "
                          "every step without it)", e)
        except Exception as e:
            shutil.rmtree(stage, ignore_errors=True)
            return cannot("cannot rewrite it", e)
        _release_heap()
        try:
            session = ort.InferenceSession(data, sess_options=opts, providers=providers)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            weights.unlink(missing_ok=True)
            return cannot("onnxruntime rejects the rewritten graph", e)
        finally:
            shutil.rmtree(stage, ignore_errors=True)   # read (or mapped) by now
        del data
        log.info("%s: %s%d self-attention layers on shared %s KV buffers", rel,
                 f"{nbits}-bit MatMuls, " if nbits else "", layers,
                 "int8" if kv_scales is not None else "float")
        if not tmp.is_file():
            return session   # not cached: run this session
        os.replace(tmp, cache)
        del session   # the cache opens with less memory than this first session holds
        _release_heap()
        try:
            return ort.InferenceSession(str(cache), sess_options=session_options(threads),
                                        providers=providers)
        except Exception as e:
            cache.unlink(missing_ok=True)
            return cannot("cannot open the rewritten graph just cached", e)

    @staticmethod
    def _staged(model, stage: Path) -> str | bytes:
        """``model`` (onnx ModelProto) for onnxruntime to open: saved in the folder
        ``stage`` with its weights in a file beside the graph, -> the graph's path; its
        bytes where ``stage`` cannot be written. From the file onnxruntime parses a graph
        without the weights and reads each weight once, where from bytes it holds the
        whole serialized model, the parsed model and the weights at the same time: the
        first load's peak drops from 1.41 to 1.05 GB for int8 (bench/RESULTS.md).
        The caller removes ``stage``; a failed write raises OSError."""
        import onnx

        shutil.rmtree(stage, ignore_errors=True)
        try:
            stage.mkdir(parents=True)
        except OSError as e:
            log.info("cannot stage the rewritten graph in %s (%s): handing it over in memory",
                     stage, e)
            return model.SerializeToString()
        onnx.save_model(model, str(stage / "graph.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="graph.data",
                        size_threshold=1024)
        return str(stage / "graph.onnx")

    def _quantize_kv_cache(self, rel: str, nbits: int | None, providers: list[str]) -> None:
        """The first load of a ``KV_INT8`` variant: calibrate the cache's scales on this
        engine (float cache, kvquant.py), then swap in ``rel`` rewritten onto an int8
        cache, which is cached: later loads open it directly, and the float-cache
        rewrite it supersedes is removed. Where that fails the float cache stays (logged)."""
        start = time.perf_counter()
        calibration = kvquant.Calibration()
        try:
            for prompt in kvquant.PROMPTS:
                self._calibration_run(prompt, calibration)
        except LofiError as e:
            log.warning("cannot calibrate the int8 KV cache (%s): keeping the float cache", e)
            return
        float_kind = self._rewrite_kind(nbits, True)
        self.decoder = None   # its session: out of memory before the rewrite comes in
        _release_heap()
        try:
            session = self._rewritten_session(self.root, rel, self.threads, providers,
                                              self.config, nbits=nbits,
                                              kv_scales=calibration.scales())
        except LofiError as e:   # an nbits rewrite raises where the int8 cache fails
            log.warning("cannot rewrite %s onto an int8 KV cache (%s): keeping the float "
                        "cache", rel, e)
            session = None
        if session is None:   # logged above or by _rewritten_session
            session = self._rewritten_session(self.root, rel, self.threads, providers,
                                              self.config, nbits=nbits)
        else:
            superseded, _ = self._cache_file(self.root, rel, float_kind)
            for old in [superseded, *superseded.parent.glob(superseded.name + ".*.data")]:
                old.unlink(missing_ok=True)
            log.info("%s: int8 KV cache calibrated in %.1f s", rel, time.perf_counter() - start)
        self.decoder = _Decoder(session, session, self.config)

    def _calibration_run(self, prompt: str, calibration: kvquant.Calibration) -> None:
        """One window of ``kvquant.FRAMES`` frames of ``prompt``, sampled as a request is;
        then every layer's decoder keys/values go to ``calibration``."""
        k, frames = self.num_codebooks, min(kvquant.FRAMES, self.window_frames)
        hidden, mask = self._encode_text(prompt)
        counter = _Counter(delay.generated_positions(frames, k), None)
        dec = self.decoder
        try:
            self._window(hidden, mask, np.zeros((k, 0), np.int64), frames,
                         SamplingParams(250, 1.0, 3.0), np.random.default_rng(kvquant.SEED),
                         counter)
            for name in dec.dec_names:
                calibration.observe(dec._present(name), dec.cache[name].numpy()[:, :, :dec.length])
        finally:
            dec.release()

    @classmethod
    def _upcast_session(cls, root: Path, rel: str, opts, providers: list
                        ) -> ort.InferenceSession | None:
        """``rel`` (an fp16 graph) upcast to fp32 in memory (upcast.py says why): ~0.5 s
        for the full-size EnCodec. None where the onnx package is missing (the caller
        loads the file as it is)."""
        try:
            import onnx

            from lofid.worker.upcast import upcast_fp16
        except ImportError:
            log.info("the onnx package is not installed: running %s in fp16", rel)
            return None
        try:
            model = onnx.load(str(root / rel))
        except Exception:
            return cls._session(root, rel, opts, providers)   # its load error says what is wrong
        upcast_fp16(model)
        data = model.SerializeToString()
        del model
        try:
            return ort.InferenceSession(data, sess_options=opts, providers=providers)
        except Exception as e:
            log.warning("onnxruntime rejects %s upcast to fp32 (%s): running it in fp16", rel, e)
            return None

    @staticmethod
    def _session(root: Path, rel: str, opts, providers: list[str]) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(str(root / rel), sess_options=opts,
                                        providers=providers)
        except MemoryError:
            raise
        except Exception as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LofiError(MODEL_LOAD_FAILED, f"onnxruntime cannot load {rel} "
                            f"({first_line}); the file may be truncated or corrupt: "
                            f"{REPAIR}", file=rel) from e

    # ------------------------------------------------------------- generation
    def frames_for(self, duration_sec: float) -> int:
        return round(duration_sec * self.frame_rate)

    def generate(self, prompt: str, duration_sec: float, seed: int, *, top_k: int = 250,
                 temperature: float = 1.0, guidance_scale: float = 3.0,
                 progress: Progress | None = None) -> np.ndarray:
        """float32 mono audio in [-1, 1]: exactly ``round(duration_sec * frame_rate)``
        frames of ``hop_length`` samples. ``progress(tokens_generated, tokens_estimated)``
        is called after every decoder step, across all windows."""
        codes = self.generate_codes(prompt, self.frames_for(duration_sec), seed,
                                    top_k=top_k, temperature=temperature,
                                    guidance_scale=guidance_scale, progress=progress)
        return self.decode_audio(codes)

    def generate_codes(self, prompt: str, frames: int, seed: int, *, top_k: int = 250,
                       temperature: float = 1.0, guidance_scale: float = 3.0,
                       progress: Progress | None = None) -> np.ndarray:
        """The audio codes ``[K, frames]`` for ``prompt`` (windowed past one window)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise LofiError(INVALID_PARAMS, "prompt must be a non-empty string")
        if frames < 1:
            raise LofiError(INVALID_DURATION, "duration is shorter than one frame")
        try:
            params = SamplingParams(top_k, temperature, guidance_scale)
            rng = np.random.default_rng(seed)
        except (ValueError, TypeError) as e:
            raise LofiError(INVALID_PARAMS, str(e)) from e
        hidden, mask = self._encode_text(prompt)
        k = self.num_codebooks
        plans = plan_windows(frames, self.window_frames, self.stride_frames)
        estimated = sum(delay.generated_positions(n, k) - p for _, p, n in plans)
        counter = _Counter(estimated, progress)
        codes = np.full((k, frames), delay.UNKNOWN, dtype=np.int64)      # [K, T]
        try:
            for offset, primed, length in plans:
                prime = codes[:, offset : offset + primed]
                window = self._window(hidden, mask, prime, length, params, rng, counter)
                codes[:, offset + primed : offset + length] = window[:, primed:]
        finally:
            self.decoder.release()
        if (codes < 0).any() or counter.done != estimated:
            raise LofiError(MODEL_INFERENCE_FAILED, "generation left frames unfilled")
        return codes

    def _encode_text(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """-> CFG batch: hidden ``[2, L, D]`` (row 1 zeros), mask ``[2, L]`` (row 1 zeros)."""
        ids = np.array([self.tokenizer.encode(prompt).ids], dtype=np.int64)   # [1, L]
        ones = np.ones_like(ids)
        encoder = self.text_encoder or self._open_text_encoder()
        (hidden,) = _run(encoder, ["last_hidden_state"],
                         {"input_ids": ids, "attention_mask": ones})
        del encoder
        hidden = hidden.astype(self.decoder.dtype, copy=False)
        hidden = np.concatenate([hidden, np.zeros_like(hidden)])
        mask = np.concatenate([ones, np.zeros_like(ones)])
        return hidden, mask

    def _window(self, hidden, mask, prime, frames, params, rng, counter) -> np.ndarray:
        """Decode one window of ``frames`` frames whose first ``prime`` frames are known."""
        seq = delay.build_template(prime, frames, self.config.pad_token_id)   # [K, T+K]
        total = seq.shape[1]
        start = delay.prefill_length(seq)
        logits = self.decoder.begin(np.concatenate([seq[:, :start]] * 2), hidden, mask, total)
        for t in range(start, total):
            if not np.isfinite(logits).all():
                raise LofiError(MODEL_INFERENCE_FAILED,
                                f"the decoder produced NaN/inf logits at step {t}")
            unknown = seq[:, t] == delay.UNKNOWN
            if unknown.any():
                token = sample(guide(logits, params.guidance_scale), params, rng)
                seq[unknown, t] = token[unknown]
            counter.tick()
            if t + 1 < total:
                logits = self.decoder.step(np.concatenate([seq[:, t : t + 1]] * 2))
        return delay.undo(seq)

    def decode_audio(self, codes: np.ndarray) -> np.ndarray:
        """``[K, T]`` codes -> float32 mono ``[T * hop]`` through EnCodec.

        Up to ``encodec_chunk_frames`` frames decode in one run. Longer sequences decode
        in chunks of that many frames, each with ``encodec_overlap_frames`` of context
        on either side, joined by a linear crossfade across the shared context: EnCodec's
        activations grow with the audio (~0.45 GB for 10 s, ~1.2 GB for 30 s, ~4.8 GB
        for 120 s in one run) and are the peak of a long request, while the chunks' join
        moves the audio by little (bench/RESULTS.md).

        A request ends here, so the memory it freed goes back to the OS here
        (``_release_heap``, 10–40 ms): the KV buffers came partly from the heap, and a
        worker that rewrote the decoder on its first load kept ~300 MB of them between
        requests.
        """
        try:
            return self._decode_audio(codes, self.encodec or self._open_encodec())
        finally:
            _release_heap()

    def _decode_audio(self, codes: np.ndarray, encodec: ort.InferenceSession) -> np.ndarray:
        frames, chunk = codes.shape[-1], self.encodec_chunk_frames
        if frames <= chunk:
            return self._decode_run(codes, encodec)
        hop, ov = self.hop_length, self.encodec_overlap_frames
        out = np.zeros(frames * hop, np.float32)
        fade = None
        for start in range(0, frames, chunk):
            lo, hi = max(0, start - ov), min(frames, start + chunk + ov)
            piece = self._decode_run(codes[:, lo:hi], encodec)
            if start == 0:
                out[:hi * hop] = piece
                continue
            # [lo, start + ov) is shared with the previous piece: fade from it to this one
            shared = (min(start + ov, hi) - lo) * hop
            if fade is None or fade.size != shared:
                fade = (np.arange(shared, dtype=np.float32) + 0.5) / shared
            a = lo * hop
            out[a:a + shared] = out[a:a + shared] * (1 - fade) + piece[:shared] * fade
            out[a + shared:hi * hop] = piece[shared:]
        return out

    def _decode_run(self, codes: np.ndarray, encodec: ort.InferenceSession) -> np.ndarray:
        """One EnCodec run. Its reflect padding needs a few frames: a shorter sequence
        is extended by repeating its last frame, and the extra samples are cut off."""
        short = MIN_DECODE_FRAMES - codes.shape[-1]
        padded = np.pad(codes, ((0, 0), (0, short)), mode="edge") if short > 0 else codes
        (audio,) = _run(encodec, ["audio_values"], {"audio_codes": padded[None, None]},
                        _SHRINK_ARENA)
        audio = audio.astype(np.float32).reshape(-1)
        if not np.isfinite(audio).all():
            raise LofiError(MODEL_INFERENCE_FAILED, "EnCodec produced NaN/inf samples")
        expected = codes.shape[-1] * self.hop_length
        if audio.shape[0] < expected:
            raise LofiError(MODEL_INFERENCE_FAILED, f"EnCodec returned {audio.shape[0]} "
                            f"samples for {codes.shape[-1]} frames ({expected} expected)")
        return np.clip(audio[:expected], -1.0, 1.0)


class _Counter:
    """Steps done across windows, reported as ``progress(done, estimated)``."""

    def __init__(self, estimated: int, progress: Progress | None) -> None:
        self.done, self.estimated, self.progress = 0, estimated, progress

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.estimated)
