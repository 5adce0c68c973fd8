"""Rewrite the int8 decoder's quantized MatMuls onto onnxruntime's MatMulNBits.

The hub's int8 decoder (``quantize_dynamic``) multiplies through
``DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W, x_zp, W_zp) -> Cast -> Mul(x_scale *
W_scale)``, which onnxruntime fuses into ``DynamicQuantizeMatMul``: per-tensor uint8
activations against per-tensor int8 weights. ``to_nbits`` replaces each such chain by one
``MatMulNBits(x, B, scales)`` (``com.microsoft``; weights in blocks of
``block_size`` along K, ``accuracy_level`` 4: int8 activations per block) holding
the dequantized int8 weights requantized per block (symmetric, one scale per block,
chosen by ``pack_blocks``'s search). ``bits=4`` (the int4 variant) halves the bytes a step
reads, at the cost of precision; ``bits=8`` was measured slower than
``DynamicQuantizeMatMul`` here (bench/RESULTS.md) and is kept for measuring.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS = "com.microsoft"


# The clipping ranges ``pack_blocks`` tries per block, as shares of the block's peak. Blocks of
# 256 searched this way stay closer to fp32 than plain peak-scaled blocks of 128, and
# their MatMuls run faster (bench/RESULTS.md).
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8)


def pack_blocks(weight: np.ndarray, bits: int, block: int, chunk: int = 128
                ) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` [K, N] float32 -> (B [N, K/block, block*bits/8] uint8, scales [N*K/block])
    as MatMulNBits reads them: blocks along K, two 4-bit values per byte (low nibble
    first) or one 8-bit value, the implicit zero point 2**(bits-1), one scale per block.

    Each block's scale is searched rather than set by its peak: for each clip in
    ``CLIPS`` the block is rounded onto the grid that spans that share of its peak (the
    peak's own sign on the grid's long end, -2**(bits-1)), the scale is refitted to those
    levels by least squares, and the candidate with the smallest squared error is kept.
    The first candidate is the peak itself, so no block errs more than plain peak scaling
    would. Columns go ``chunk`` at a time, small enough to stay in the CPU's cache.
    """
    k, n = weight.shape
    blocks = -(-k // block)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    packed = np.empty((n, blocks, block * bits // 8), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    padded = np.zeros((min(chunk, n), blocks * block), np.float32)   # K padded with zeros
    for c0 in range(0, n, chunk):
        cols = min(chunk, n - c0)
        padded[:cols, :k] = weight[:, c0:c0 + cols].T
        w = padded[:cols].reshape(cols, blocks, block)
        peak = np.take_along_axis(w, np.abs(w).argmax(-1)[..., None], -1)[..., 0]
        base = np.where(peak == 0, np.float32(1), peak / np.float32(low))
        ww = np.einsum("ijk,ijk->ij", w, w)
        q = np.empty_like(w)
        best_err = np.full(base.shape, np.inf, np.float32)
        best_clip = np.ones(base.shape, np.float32)
        for clip in CLIPS:
            wq, qq = _levels(w, base * np.float32(clip), low, high, q)
            err = ww - wq * wq / np.maximum(qq, 1)   # with the least-squares scale wq / qq
            better = err < best_err
            best_err[better], best_clip[better] = err[better], clip
        wq, qq = _levels(w, base * best_clip, low, high, q)
        scales[c0:c0 + cols] = np.where(qq > 0, wq / np.maximum(qq, 1), base)
        u = (q - low).astype(np.uint8)
        packed[c0:c0 + cols] = u if bits == 8 else u[..., 0::2] | (u[..., 1::2] << 4)
    return packed, scales.reshape(-1)


def _levels(w: np.ndarray, scale: np.ndarray, low: int, high: int, q: np.ndarray):
    """Blocks ``w`` [cols, blocks, block] rounded onto their ``scale``'s grid, into ``q``
    -> (sum w*q, sum q*q) per block."""
    np.multiply(w, (1 / scale)[..., None], out=q)
    np.clip(np.rint(q, out=q), low, high, out=q)
    return np.einsum("ijk,ijk->ij", w, q), np.einsum("ijk,ijk->ij", q, q)


def _reads(nodes) -> set[str]:
    """Every name ``nodes`` read, their subgraphs' outer-scope reads included."""
    names: set[str] = set()
    for n in nodes:
        names.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names |= _reads(a.g.node)
    return names


def to_nbits(model: onnx.ModelProto, bits: int = 4, block: int = 256,
             accuracy_level: int = 4) -> int:
    """Rewrite ``model`` in place (every graph, the merged decoder's ``If`` branches too);
    -> the number of MatMuls rewritten."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    packer = _Packer(model, bits, block, accuracy_level)
    packer.rewrite(model.graph)
    model.graph.initializer.extend(packer.added)
    read = _reads(model.graph.node) | {o.name for o in model.graph.output}
    unused = [t for t in model.graph.initializer if t.name not in read]
    for t in unused:   # the int8 weights now packed into MatMulNBits' B
        model.graph.initializer.remove(t)
    if packer.done and not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    return packer.done


class _Packer:
    """``to_nbits`` over one model: finds each graph's int8 MatMul chains and packs their
    weights, each once (the merged decoder's two branches share their int8 weights, and
    share the packed ones the same way)."""

    def __init__(self, model: onnx.ModelProto, bits: int, block: int, accuracy_level: int) -> None:
        self.consts = {t.name: t for t in model.graph.initializer}
        self.bits, self.block, self.accuracy_level = bits, block, accuracy_level
        self.added: list[onnx.TensorProto] = []   # the packed weights and scales
        self.packed_as: dict[tuple, str] = {}     # int8 weight -> its packed stem
        self.done = 0

    def const(self, graph: onnx.GraphProto, name: str) -> np.ndarray | None:
        for t in graph.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
        for node in graph.node:
            if node.op_type == "Constant" and node.output[0] == name:
                return numpy_helper.to_array(node.attribute[0].t)
        if name in self.consts:
            return numpy_helper.to_array(self.consts[name])
        return None

    def rewrite(self, graph: onnx.GraphProto) -> None:
        """Every int8 MatMul chain of ``graph`` (its subgraphs first) as one MatMulNBits."""
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    self.rewrite(a.g)
        made = {o: n for n in graph.node for o in n.output}
        users: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                users.setdefault(i, []).append(n)
        drop, new = set(), {}
        for mmi in [n for n in graph.node if n.op_type == "MatMulInteger"]:
            chain = self._chain(graph, mmi, made, users)
            if chain is None:
                continue
            dql, cast, mul, w, w_zp, w_scale = chain
            stem = self._packed(mmi.input[1], w, w_zp, w_scale)
            new[mul.name or id(mul)] = helper.make_node(
                "MatMulNBits", [dql.input[0], stem + "_B", stem + "_scales"], [mul.output[0]],
                name=(mmi.name or stem) + "_nbits", domain=MS, K=w.shape[0], N=w.shape[1],
                bits=self.bits, block_size=self.block, accuracy_level=self.accuracy_level)
            drop.update(id(n) for n in (mmi, cast))
            self.done += 1
        if new:
            _replace(graph, new, drop)

    def _chain(self, graph: onnx.GraphProto, mmi, made: dict, users: dict):
        """``DynamicQuantizeLinear -> MatMulInteger (mmi) -> Cast -> Mul(x_scale * W_scale)``
        -> (the DynamicQuantizeLinear, the Cast, the Mul, W, W's zero point, W's scale);
        None where ``mmi`` is not in such a chain with constant per-tensor weights."""
        dql = made.get(mmi.input[0])
        w, w_zp = self.const(graph, mmi.input[1]), self.const(graph, mmi.input[3])
        cast = users.get(mmi.output[0], [])
        if dql is None or dql.op_type != "DynamicQuantizeLinear" or w is None or \
                w_zp is None or len(cast) != 1 or cast[0].op_type != "Cast":
            return None
        mul = users.get(cast[0].output[0], [])
        if len(mul) != 1 or mul[0].op_type != "Mul":
            return None
        mul = mul[0]
        scale_mul = made.get(mul.input[1])
        if scale_mul is None or scale_mul.op_type != "Mul":
            return None
        w_scale = next((self.const(graph, i) for i in scale_mul.input if i != dql.output[1]), None)
        if w_scale is None or w_scale.size != 1 or w.ndim != 2:
            return None
        return dql, cast[0], mul, w, w_zp, w_scale

    def _packed(self, name: str, w: np.ndarray, w_zp: np.ndarray, w_scale: np.ndarray) -> str:
        """The stem of the packed weight ``name`` (``<stem>_B``, ``<stem>_scales``),
        packed here on its first use."""
        key = (name, float(w_zp.reshape(-1)[0]), float(w_scale.reshape(-1)[0]))
        stem = self.packed_as.get(key)
        if stem is None:
            weight = (w.astype(np.float32) - w_zp.astype(np.float32)) * w_scale.astype(np.float32)
            packed, scales = pack_blocks(weight, self.bits, self.block)
            stem = self.packed_as[key] = f"{name}_nbits{len(self.packed_as)}"
            self.added.extend([numpy_helper.from_array(packed, stem + "_B"),
                               numpy_helper.from_array(scales, stem + "_scales")])
        return stem


def _replace(graph: onnx.GraphProto, new: dict, drop: set[int]) -> None:
    """Put the MatMulNBits ``new`` (by the name, or id, of the Mul each replaces) into
    ``graph`` without the ``drop``ped nodes and what fed only them."""
    nodes = [new.get(n.name or id(n), n) for n in graph.node if id(n) not in drop]
    # the DynamicQuantizeLinear and scale Mul nodes now feed nothing: drop them
    while True:
        used = {o.name for o in graph.output} | _reads(nodes)
        alive = [n for n in nodes if any(o in used for o in n.output)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    del graph.node[:]
    graph.node.extend(nodes)
    read = _reads(nodes) | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(t)   # the int8 weights' scales and zero points


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)


def fuse_qkv(model: onnx.ModelProto) -> int:
    """After ``to_nbits`` and ``kvshare.share_kv_graph``: every GroupQueryAttention whose
    query, key and value are three MatMulNBits of one input gets them as one MatMulNBits
    of three times the width, the packed QKV GroupQueryAttention reads when its key and
    value inputs are empty: one call and one activation quantization instead of three
    (bench/RESULTS.md). The other branch's MatMulNBits of the same three weights (the
    merged decoder's prefill) become the fused one and a Split, so both branches still
    share each packed weight. -> the number of attention layers fused."""
    inits = {t.name: t for t in model.graph.initializer}
    fused: dict[tuple[str, ...], str] = {}
    layers = 0

    def width(node) -> int:
        return next(a.i for a in node.attribute if a.name == "N")

    def fusable(nodes) -> bool:
        attrs = {str(sorted((a.name, a.i) for a in n.attribute if a.name != "N"))
                 for n in nodes}
        return (len({n.input[0] for n in nodes}) == 1 and len(attrs) == 1
                and all(len(n.input) == 3 and n.input[1] in inits and n.input[2] in inits
                        for n in nodes))

    def matmul(nodes, stem: str, out: str):
        node = helper.make_node("MatMulNBits", [nodes[0].input[0], stem + "_B", stem + "_scales"],
                                [out], name=out + "/MatMulNBits", domain=MS)
        node.attribute.extend(a for a in nodes[0].attribute if a.name != "N")
        node.attribute.append(helper.make_attribute("N", sum(map(width, nodes))))
        return node

    graphs = list(_graphs(model.graph))
    for g in graphs:   # the step: the packed QKV straight into GroupQueryAttention
        nodes = list(g.node)
        made = {o: n for n in nodes for o in n.output}
        readers: dict[str, int] = {}
        for n in nodes:
            for i in n.input:
                readers[i] = readers.get(i, 0) + 1
        swaps = []
        for gqa in [n for n in nodes if n.op_type == "GroupQueryAttention"]:
            mm = [made.get(i) for i in gqa.input[:3]]
            if any(n is None or n.op_type != "MatMulNBits" or readers[n.output[0]] != 1
                   for n in mm) or not fusable(mm):
                continue
            stem = _fused_weights(model, inits, mm, fused)
            swaps.append((mm, [matmul(mm, stem, stem + "/qkv")]))
            gqa.input[0], gqa.input[1], gqa.input[2] = stem + "/qkv", "", ""
            layers += 1
        _swap(g, nodes, swaps)
    for g in graphs:   # elsewhere (the prefill): the fused MatMul, split back in three
        nodes = list(g.node)
        by_weight = {n.input[1]: n for n in nodes if n.op_type == "MatMulNBits"}
        swaps = []
        for key, stem in fused.items():
            mm = [by_weight.get(w) for w in key]
            if any(n is None for n in mm) or not fusable(mm):
                continue
            out = f"{stem}/g{graphs.index(g)}/qkv"
            g.initializer.append(numpy_helper.from_array(
                np.array([width(n) for n in mm], np.int64), out + "/split"))
            swaps.append((mm, [matmul(mm, stem, out), helper.make_node(
                "Split", [out, out + "/split"], [n.output[0] for n in mm],
                name=out + "/Split", axis=-1)]))
        _swap(g, nodes, swaps)
    read = _reads(model.graph.node)
    for t in [t for t in model.graph.initializer if t.name not in read]:
        model.graph.initializer.remove(t)   # the three weights now packed into one
    return layers


def _fused_weights(model, inits, nodes, fused) -> str:
    """The stem of ``nodes``' three weights (and scales) concatenated along N."""
    key = tuple(n.input[1] for n in nodes)
    if key not in fused:
        stem = fused[key] = f"/lofid/qkv{len(fused)}"
        for suffix, index in (("_B", 1), ("_scales", 2)):
            joined = np.concatenate([numpy_helper.to_array(inits[n.input[index]])
                                     for n in nodes])
            model.graph.initializer.append(numpy_helper.from_array(joined, stem + suffix))
            inits[stem + suffix] = model.graph.initializer[-1]
    return fused[key]


def _swap(graph: onnx.GraphProto, nodes: list, swaps: list) -> None:
    """Rebuild ``graph``'s nodes from ``nodes`` (held, so that identities stay stable),
    each group of old nodes in ``swaps`` replaced by its new ones where the first was."""
    if not swaps:
        return
    at = {id(n): i for i, n in enumerate(nodes)}
    first = {id(min(old, key=lambda n: at[id(n)])): new for old, new in swaps}
    gone = {id(n) for old, _ in swaps for n in old}
    order = []
    for n in nodes:
        order.extend(first.get(id(n), []) if id(n) in gone else [n])
    order = [type(n).FromString(n.SerializeToString()) for n in order]
    del graph.node[:]
    graph.node.extend(order)
