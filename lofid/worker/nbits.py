"""Rewrite the int8 decoder's quantized MatMuls onto onnxruntime's MatMulNBits.

The hub's int8 decoder (``quantize_dynamic``) multiplies through
``DynamicQuantizeLinear(x) -> MatMulInteger(x_q, W, x_zp, W_zp) -> Cast -> Mul(x_scale *
W_scale)``, which onnxruntime fuses into ``DynamicQuantizeMatMul``: per-tensor uint8
activations against per-tensor int8 weights. ``to_nbits`` replaces each such chain by one
``MatMulNBits(x, B, scales)`` (``com.microsoft``; weights in blocks of
``block_size`` along K, ``accuracy_level`` 4: int8 activations per block) holding
the dequantized int8 weights requantized per block (symmetric round-to-nearest, one
scale per block). ``bits=4`` (the int4 variant) halves the bytes a step reads, at the cost
of precision; ``bits=8`` was measured slower than ``DynamicQuantizeMatMul`` here
(bench/RESULTS.md) and is kept for measuring.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS = "com.microsoft"


def _blocks(weight: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` [K, N] float32 -> (B [N, K/block, block*bits/8] uint8, scales [N*K/block])
    with the implicit zero point 2**(bits-1), symmetric per block."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = weight.shape
    blocks = -(-k // block)
    packed = np.zeros((n, blocks, block * bits // 8), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero_points = np.zeros((n, -(-blocks * bits // 8)), np.uint8)
    quant = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    quant(packed, np.ascontiguousarray(weight, np.float32), scales, zero_points, block, n, k, True)
    return packed, scales.reshape(-1)


def _reads(nodes) -> set[str]:
    """Every name ``nodes`` read, their subgraphs' outer-scope reads included."""
    names: set[str] = set()
    for n in nodes:
        names.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names |= _reads(a.g.node)
    return names


def to_nbits(model: onnx.ModelProto, bits: int = 4, block: int = 32,
             accuracy_level: int = 4) -> int:
    """Rewrite ``model`` in place (every graph, the merged decoder's ``If`` branches too);
    -> the number of MatMuls rewritten."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    consts = {t.name: t for t in model.graph.initializer}
    added: list[onnx.TensorProto] = []
    packed_as: dict[tuple, str] = {}   # int8 weight -> its packed stem (the merged graph's
    done = 0                           # two branches share their weights)

    def const(graph, name):
        for t in graph.initializer:
            if t.name == name:
                return numpy_helper.to_array(t)
        for node in graph.node:
            if node.op_type == "Constant" and node.output[0] == name:
                return numpy_helper.to_array(node.attribute[0].t)
        if name in consts:
            return numpy_helper.to_array(consts[name])
        return None

    def rewrite(graph: onnx.GraphProto) -> None:
        nonlocal done
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    rewrite(a.g)
        made = {o: n for n in graph.node for o in n.output}
        users: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                users.setdefault(i, []).append(n)
        drop, new = set(), {}
        for mmi in [n for n in graph.node if n.op_type == "MatMulInteger"]:
            dql = made.get(mmi.input[0])
            w, w_zp = const(graph, mmi.input[1]), const(graph, mmi.input[3])
            cast = users.get(mmi.output[0], [])
            if dql is None or dql.op_type != "DynamicQuantizeLinear" or w is None or \
                    w_zp is None or len(cast) != 1 or cast[0].op_type != "Cast":
                continue
            mul = users.get(cast[0].output[0], [])
            if len(mul) != 1 or mul[0].op_type != "Mul":
                continue
            mul = mul[0]
            scale_mul = made.get(mul.input[1])
            if scale_mul is None or scale_mul.op_type != "Mul":
                continue
            w_scale = next((const(graph, i) for i in scale_mul.input if i != dql.output[1]), None)
            if w_scale is None or w_scale.size != 1 or w.ndim != 2:
                continue
            key = (mmi.input[1], float(w_zp.reshape(-1)[0]), float(w_scale.reshape(-1)[0]))
            stem = packed_as.get(key)
            if stem is None:
                weight = (w.astype(np.float32) - w_zp.astype(np.float32)) * w_scale.astype(np.float32)
                packed, scales = _blocks(weight, bits, block)
                stem = packed_as[key] = f"{mmi.input[1]}_nbits{len(packed_as)}"
                added.extend([numpy_helper.from_array(packed, stem + "_B"),
                              numpy_helper.from_array(scales, stem + "_scales")])
            new[mul.name or id(mul)] = helper.make_node(
                "MatMulNBits", [dql.input[0], stem + "_B", stem + "_scales"], [mul.output[0]],
                name=(mmi.name or stem) + "_nbits", domain=MS, K=w.shape[0], N=w.shape[1],
                bits=bits, block_size=block, accuracy_level=accuracy_level)
            drop.update(id(n) for n in (mmi, cast[0]))
            done += 1
        if not new:
            return
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

    rewrite(model.graph)
    model.graph.initializer.extend(added)
    read = _reads(model.graph.node) | {o.name for o in model.graph.output}
    unused = [t for t in model.graph.initializer if t.name not in read]
    for t in unused:   # the int8 weights now packed into MatMulNBits' B
        model.graph.initializer.remove(t)
    if done and not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    return done
