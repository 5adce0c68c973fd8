"""nbits.py: the int8 decoder's MatMuls on MatMulNBits blocks (the int4 variant).

The packing is checked against the weights themselves (dequantized as MatMulNBits
defines it, every block errs no more than plain peak scaling would) and against the op
(its product is x times that dequantized weight).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from lofid.worker.graphs.nbits import to_nbits

ROOT = Path(__file__).resolve().parent.parent
INT8 = ROOT / "tests" / "fixtures" / "music_gen" / "small_i8" / "decoder_model_merged.onnx"


def _graphs(g):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)


def _int8_weights(model) -> dict[str, np.ndarray]:
    """(graph, MatMul output) -> the int8 weight's float values, (W - zero point) * scale, from the graph."""
    consts = {t.name: numpy_helper.to_array(t) for g in _graphs(model.graph) for t in g.initializer}
    for g in _graphs(model.graph):
        for n in g.node:
            if n.op_type == "Constant":
                consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    out = {}
    for gi, g in enumerate(_graphs(model.graph)):
        made = {o: n for n in g.node for o in n.output}
        users = {}
        for n in g.node:
            for i in n.input:
                users.setdefault(i, []).append(n)
        for mmi in (n for n in g.node if n.op_type == "MatMulInteger"):
            mul = users[users[mmi.output[0]][0].output[0]][0]
            scale_mul = made[mul.input[1]]
            scale = next(consts[i] for i in scale_mul.input if i in consts)
            w, zp = consts[mmi.input[1]], consts[mmi.input[3]]
            out[gi, mul.output[0]] = (w.astype(np.float32) - zp.astype(np.float32)) * scale
    return out


def _nbits_weights(model) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    consts = {t.name: numpy_helper.to_array(t) for g in _graphs(model.graph) for t in g.initializer}
    out = {}
    for gi, g in enumerate(_graphs(model.graph)):
        for n in g.node:
            if n.op_type == "MatMulNBits":
                attrs = {a.name: a.i for a in n.attribute}
                out[gi, n.output[0]] = (consts[n.input[1]], consts[n.input[2]], attrs)
    return out


def _dequantize(packed: np.ndarray, scales: np.ndarray, attrs: dict) -> np.ndarray:
    """MatMulNBits' B [N, blocks, bytes] + scales -> the float weight [K, N]."""
    n, blocks, _ = packed.shape
    if attrs["bits"] == 8:
        q = packed.astype(np.float32)
    else:   # two 4-bit values per byte, the low nibble first
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, -1).astype(np.float32)
    zero = 2 ** (attrs["bits"] - 1)
    w = (q - zero) * scales.reshape(n, blocks, 1)
    return w.reshape(n, -1)[:, :attrs["K"]].T


def _peak_scaled_error(weight: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Squared error per block [N, blocks] of plain peak scaling (each block's largest
    magnitude on the grid's end), the baseline the searched scales must not lose to."""
    k, n = weight.shape
    w = np.zeros((n, -(-k // block) * block), np.float32)
    w[:, :k] = weight.T
    w = w.reshape(n, -1, block)
    peak = np.take_along_axis(w, np.abs(w).argmax(-1)[..., None], -1)
    scale = np.where(peak == 0, 1, peak / -(2 ** (bits - 1)))
    q = np.clip(np.rint(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return ((w - q * scale) ** 2).sum(-1)


@pytest.mark.parametrize("bits, block", [(4, 32), (4, 256), (8, 32)])
def test_blocks_hold_the_int8_weights_no_worse_than_peak_scaling(bits, block):
    """Dequantizing MatMulNBits' B the way the op defines it (column-major blocks, low
    nibble first, zero point 2**(bits-1)) gives the int8 weights back with, in every
    block, no more squared error than scaling the block by its peak, and less in all."""
    model = onnx.load(str(INT8))
    want = _int8_weights(model)
    assert to_nbits(model, bits=bits, block=block) == len(want) == 45
    got = _nbits_weights(model)
    assert set(got) == set(want)
    searched = baseline = 0.0
    for name, (packed, scales, attrs) in got.items():
        k, n = want[name].shape
        assert (attrs["K"], attrs["N"]) == (k, n)
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (bits, block, 4)
        err = _dequantize(packed, scales, attrs) - want[name]                  # [K, N]
        padded = np.zeros((n, -(-k // block) * block))
        padded[:, :k] = err.T
        per_block = (padded.reshape(n, -1, block) ** 2).sum(-1)
        peak = _peak_scaled_error(want[name], bits, block)
        assert (per_block <= peak * (1 + 1e-4) + 1e-12).all()
        searched, baseline = searched + per_block.sum(), baseline + peak.sum()
        if bits == 4:
            assert err.any()   # 4 bits do lose something
    assert searched < baseline if bits == 4 else searched <= baseline


@pytest.mark.parametrize("bits, k", [(4, 64), (4, 1000), (8, 300)])
def test_matmulnbits_multiplies_by_the_weights_the_packing_describes(bits, k):
    """The op itself, on a packed random weight (K a multiple of the block or not):
    its product is x times the weight ``_dequantize`` reads from B and the scales."""
    from onnx import TensorProto, helper

    from lofid.worker.graphs.nbits import pack_blocks

    rng = np.random.default_rng(bits + k)
    n, block = 48, 256
    weight = rng.standard_normal((k, n)).astype(np.float32)
    packed, scales = pack_blocks(weight, bits, block)
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
    graph = helper.make_graph(
        [helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft",
                          accuracy_level=0, **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, k)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ _dequantize(packed, scales, attrs),
                               rtol=1e-4, atol=1e-4)
    # and that weight is the original, within a few steps of its block's grid
    assert np.abs(_dequantize(packed, scales, attrs) - weight).max() < 0.35 * np.abs(weight).max()


def test_rewrite_leaves_no_int8_matmul_and_shares_weights_across_branches():
    model = onnx.load(str(INT8))
    n_weights = len({n.input[1] for g in _graphs(model.graph) for n in g.node
                     if n.op_type == "MatMulInteger"})
    assert to_nbits(model, bits=4) == 45
    ops = {n.op_type for g in _graphs(model.graph) for n in g.node}
    assert not ops & {"MatMulInteger", "DynamicQuantizeLinear"} and "MatMulNBits" in ops
    # the merged graph's two branches read the same weights: packed once
    assert len([t for t in model.graph.initializer if t.name.endswith("_B")]) == n_weights == 25
    # nothing dead left behind: every initializer is read
    read = {i for g in _graphs(model.graph) for n in g.node for i in n.input}
    assert all(t.name in read for g in _graphs(model.graph) for t in g.initializer)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_rewrite_refuses_nothing_to_do_and_bad_bits():
    model = onnx.load(str(ROOT / "tests" / "fixtures" / "music_gen" / "small_fp32" /
                          "decoder_model_merged.onnx"))
    assert to_nbits(model, bits=4) == 0
    with pytest.raises(ValueError):
        to_nbits(model, bits=3)


def test_fused_qkv_computes_what_the_three_matmuls_did():
    """fuse_qkv: each step-branch attention reads one MatMulNBits of three times the
    width (the packed QKV), the prefill branch splits the same fused weights back in
    three, no weight is stored twice, and prefill and step logits are bit-identical."""
    from lofid.worker import sessions
    from lofid.worker.decoder import Decoder
    from lofid.worker.graphs.kvshare import share_kv_graph
    from lofid.worker.graphs.nbits import fuse_qkv
    from lofid.worker.musicgen import MusicGen

    engine = MusicGen.load(ROOT / "tests" / "fixtures" / "music_gen", "fp32", threads=1)
    hidden, mask = engine.encode_text("fused attention")
    logits = {}
    for fuse in (False, True):
        model = onnx.load(str(INT8))
        to_nbits(model, bits=4)
        share_kv_graph(model, 2, 8)
        before = sum(t.ByteSize() for t in model.graph.initializer)
        if fuse:
            assert fuse_qkv(model) == 2
            step, prefill = (next(a.g for n in model.graph.node for a in n.attribute
                                  if a.name == name) for name in ("then_branch", "else_branch"))
            gqa = [n for n in step.node if n.op_type == "GroupQueryAttention"]
            assert all(list(n.input[1:3]) == ["", ""] for n in gqa)
            widths = {a.i for n in step.node if n.op_type == "MatMulNBits"
                      for a in n.attribute if a.name == "N"}
            assert 3 * 16 in widths                                  # q, k and v in one
            assert sum(n.op_type == "Split" for n in prefill.node) == 2
            assert abs(sum(t.ByteSize() for t in model.graph.initializer) - before) < 1024
            read = {i for g in _graphs(model.graph) for n in g.node for i in n.input}
            assert all(t.name in read for t in model.graph.initializer)
        sess = ort.InferenceSession(model.SerializeToString(), sessions.options("decoder", 1),
                                    providers=["CPUExecutionProvider"])
        dec = Decoder(sess, sess, engine.config)
        ids = np.random.default_rng(2).integers(0, 2048, (8, 30))
        first = dec.begin(ids, hidden, mask, 40)
        logits[fuse] = [first] + [dec.step(ids[:, t:t + 1]) for t in range(5)]
    for a, b in zip(logits[False], logits[True], strict=True):
        np.testing.assert_array_equal(a, b)
