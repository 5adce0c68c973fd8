"""nbits.py: the int8 decoder's MatMuls on MatMulNBits blocks (the int4 variant).

The packing is checked against the weights themselves: dequantized as MatMulNBits
defines it, every block stays within a quantization step of the int8 weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from lofid.worker.nbits import to_nbits

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


@pytest.mark.parametrize("bits, block", [(4, 32), (4, 128), (8, 32)])
def test_blocks_stay_within_a_step_of_the_int8_weights(bits, block):
    """Dequantizing MatMulNBits' B the way the op defines it gives the int8 weights back
    to within a quantization step: the layout (column-major blocks, low nibble
    first, zero point 2**(bits-1)) and the scales are right."""
    model = onnx.load(str(INT8))
    want = _int8_weights(model)
    assert to_nbits(model, bits=bits, block=block) == len(want) == 45
    got = _nbits_weights(model)
    assert set(got) == set(want)
    for name, (packed, scales, attrs) in got.items():
        assert (attrs["K"], attrs["N"]) == want[name].shape
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (bits, block, 4)
        step = np.repeat(np.abs(scales).reshape(attrs["N"], -1), block, axis=1)[:, :attrs["K"]].T
        err = np.abs(_dequantize(packed, scales, attrs) - want[name]) / step
        # rounding: half a step; the symmetric grid ([-8, 7] steps for 4 bits) is a step
        # short at one end, so the block's largest value of the other sign can lose one
        assert err.max() <= 1 + 1e-5 and err.mean() < 0.3
        if bits == 4:
            assert err.max() > 0   # 4 bits do lose something


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
    from lofid.worker import musicgen as mg
    from lofid.worker.nbits import fuse_qkv

    engine = mg.MusicGen.load(ROOT / "tests" / "fixtures" / "music_gen", "fp32", threads=1)
    hidden, mask = engine._encode_text("fused attention")
    logits = {}
    for fuse in (False, True):
        model = onnx.load(str(INT8))
        to_nbits(model, bits=4, block=128)
        mg.share_kv_graph(model, 2, 8)
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
        sess = ort.InferenceSession(model.SerializeToString(), mg.session_options(1),
                                    providers=["CPUExecutionProvider"])
        dec = mg._Decoder(sess, sess, engine.config)
        ids = np.random.default_rng(2).integers(0, 2048, (8, 30))
        first = dec.begin(ids, hidden, mask, 40)
        logits[fuse] = [first] + [dec.step(ids[:, t:t + 1]) for t in range(5)]
    for a, b in zip(logits[False], logits[True], strict=True):
        np.testing.assert_array_equal(a, b)
