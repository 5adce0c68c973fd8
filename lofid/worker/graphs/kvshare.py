"""Rewrite the decoder's self-attention onto shared KV buffers (GroupQueryAttention).

The exported with-past decoder appends each step's key/value to the self-attention cache
with a Concat, i.e. it copies the whole growing cache every step. ``share_kv_graph``
rewrites each self-attention onto onnxruntime's com.microsoft.GroupQueryAttention (kv
heads = heads, i.e. plain multi-head attention) whose past and present are one
preallocated buffer ``[batch, heads, capacity, head_dim]``: the step writes its new
key/value in place and attends over the first ``kv_total_sequence_length`` positions.
The position embedding, which the export derives from the past's length, is derived from
that input instead.

The rewrite in steps: find the graph that reads the past (``_step_graph``), index its
nodes (``_Index``), replace each layer's self-attention (``_self_attention``) and, with
fixed step shapes, its cross-attention (``_cross_attention``), derive the past length
from the new input (``_past_length``), pin the step ids' shape (``_pin_step_ids``), drop
what nothing reads any more (``_prune``), and declare the new inputs, the buffers'
capacity and the int8 cache's types (``_declare_io``).
"""

from __future__ import annotations

import math
import re

import numpy as np

from lofid.worker.graphs import kvquant

PAST = re.compile(r"past_key_values\.(\d+)\.(decoder|encoder)\.(key|value)$")
KV_SEQLENS = "kv_seqlens_k"                 # int32 [batch]: total length - 1 per row
KV_TOTAL = "kv_total_sequence_length"       # int32 scalar: past + new positions
PAST_LENGTH = "/lofid/kvshare/past_length"
STEP_IDS = "/lofid/kvshare/step_ids"


def share_kv_graph(model, heads: int, head_dim: int,
                   kv_scales: dict[str, np.ndarray] | None = None,
                   step_rows: int | None = None) -> int:
    """Rewrite ``model`` (onnx ModelProto, split with-past or merged decoder) in place.

    ``step_rows`` (float32 graphs): the rows of a step's ``input_ids`` (2 x codebooks: the
    CFG pair), each one position long. The step graph reshapes its ids to that fixed
    shape, so that onnxruntime folds the shape arithmetic the export derives from them,
    and runs each cross-attention as one MultiHeadAttention (``_cross_attention``): far
    fewer nodes per step after onnxruntime's optimizations (bench/RESULTS.md). Both move
    the float rounding a little (fused kernels), which fp16 graphs do not take without
    changing their codes.

    ``kv_scales`` (merged decoder only): ``present.<i>.decoder.key``/``.value`` -> its
    per-channel scale ``[heads * head_dim]``; the self-attention cache is then int8
    (kvquant.py says how the scales are chosen), and the prefill branch quantizes what it
    hands over the same way.

    Returns the number of self-attention layers rewritten; raises ValueError when the
    graph does not have the expected shape (the caller then keeps the original graph).
    """
    graph = model.graph
    past = {i.name for i in graph.input if PAST.match(i.name) and ".decoder." in i.name}
    if not past:
        raise ValueError("no decoder past inputs")
    target, prefill = _step_graph(graph, past)
    if kv_scales is not None and prefill is None:
        raise ValueError("an int8 KV cache needs the merged decoder")
    if kv_scales is not None and head_dim % 8:   # GroupQueryAttention's quantized kernels
        raise ValueError(f"an int8 KV cache needs a head size divisible by 8, not {head_dim}")
    ix = _Index(graph, target)
    outputs = {o.name for o in target.output}
    layers = sorted(int(m.group(1)) for o in outputs
                    if (m := re.match(r"present\.(\d+)\.decoder\.key$", o)))
    if not layers:
        raise ValueError("no decoder present outputs")
    add = []
    for i in layers:
        add += _self_attention(ix, i, heads, head_dim, kv_scales)
        if step_rows:
            add.append(_cross_attention(ix, i, heads))
    length_nodes, identities = _past_length(ix, graph, past)
    add += identities
    if step_rows:
        length_nodes.insert(0, _pin_step_ids(ix, [*ix.nodes, *add, *length_nodes], step_rows))
    _prune(target, [n for n in ix.nodes if id(n) not in ix.drop] + length_nodes + add, outputs)
    _declare_io(graph, target, prefill, kv_scales, heads, head_dim)
    return len(layers)


def _step_graph(graph, past: set[str]):
    """-> (the graph that reads the decoder past, the other branch of the merged
    decoder's If: its prefill, None for a split decoder)."""
    if any(i in past for n in graph.node for i in n.input):
        return graph, None
    target, prefill = None, None
    for node in graph.node:
        branches = [a.g for a in node.attribute if a.HasField("g")]
        for g in branches:
            if any(i in past for n in g.node for i in n.input):
                target = g
                prefill = next((b for b in branches if b is not g), None)
    if target is None:
        raise ValueError("no graph reads the decoder past")
    return target, prefill


class _Index:
    """The step graph's nodes, who makes and who reads each value, its small constants,
    and the nodes the rewrite drops (by id)."""

    def __init__(self, graph, target) -> None:
        from onnx import numpy_helper

        self.target = target
        # protobuf hands out fresh wrappers on each access: hold one list of the nodes so
        # that identities (id()) stay stable while the graph is edited
        self.nodes = list(target.node)
        # only the small constants (scalars, shape vectors): converting the weights too would
        # hold a second copy of the model in memory during the rewrite
        self.consts = {t.name: numpy_helper.to_array(t) for g in (graph, target)
                       for t in g.initializer if math.prod(t.dims) <= 64}
        for n in [*graph.node, *self.nodes] if target is not graph else self.nodes:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)
        self.producers = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.drop: set[int] = set()

    def made_by(self, name: str, op: str):
        n = self.producers.get(name)
        if n is None or n.op_type != op:
            raise ValueError(f"{name} is not made by {op}")
        return n

    def used_by(self, name: str, op: str):
        c = self.consumers.get(name, [])
        if len(c) != 1 or c[0].op_type != op:
            raise ValueError(f"{name} is not used by exactly one {op}")
        return c[0]

    def readers(self, name: str) -> list:
        """The nodes reading ``name`` now (``consumers`` is as the graph was indexed)."""
        return [n for n in self.nodes if name in n.input]

    def new_projection(self, name: str) -> str:
        """``[B, H, S, D]`` key/query -> the ``[B, S, H*D]`` projection it was made of."""
        return self.made_by(self.made_by(name, "Transpose").input[0], "Reshape").input[0]

    def scalar(self, name: str) -> float:
        if name not in self.consts or np.asarray(self.consts[name]).size != 1:
            raise ValueError(f"{name} is not a constant scalar")
        return float(np.asarray(self.consts[name]).reshape(-1)[0])


def _self_attention(ix: _Index, i: int, heads: int, head_dim: int,
                    kv_scales: dict[str, np.ndarray] | None) -> list:
    """Layer ``i``'s self-attention (Concat onto the past, attention over it) as one
    GroupQueryAttention over the shared buffers, -> its nodes; the old ones are dropped."""
    from onnx import helper, numpy_helper

    pk, pv = f"present.{i}.decoder.key", f"present.{i}.decoder.value"
    cat_k, cat_v = ix.made_by(pk, "Concat"), ix.made_by(pv, "Concat")
    tr_k = ix.used_by(pk, "Transpose")
    mul_k = ix.used_by(tr_k.output[0], "Mul")
    qk = ix.used_by(mul_k.output[0], "MatMul")
    mul_q = ix.made_by(qk.input[0], "Mul")
    soft = ix.used_by(qk.output[0], "Softmax")
    av = ix.used_by(soft.output[0], "MatMul")
    if qk.input[1] != mul_k.output[0] or av.input[1] != pv or len(ix.consumers[pv]) != 1:
        raise ValueError(f"layer {i}: unexpected self-attention")
    scale = ix.scalar(mul_q.input[1]) * ix.scalar(mul_k.input[1])
    pre = f"/lofid/kvshare/{i}"
    inputs = [ix.new_projection(mul_q.input[0]),
              ix.new_projection(cat_k.input[-1]), ix.new_projection(cat_v.input[-1]),
              f"past_key_values.{i}.decoder.key", f"past_key_values.{i}.decoder.value",
              KV_SEQLENS, KV_TOTAL]
    quant = {}
    if kv_scales is not None:
        # inputs 7-11 (rotary caches, position ids, bias, sink) unused; 12, 13 scales
        inputs += ["", "", "", "", "", pre + "/k_scale", pre + "/v_scale"]
        for name, present in ((pre + "/k_scale", pk), (pre + "/v_scale", pv)):
            ix.target.initializer.append(numpy_helper.from_array(
                kvquant.channel_scale(kv_scales, present, heads * head_dim), name))
        quant = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL",
                     kv_cache_bit_width=8)
    attention = helper.make_node(
        "GroupQueryAttention", inputs, [pre + "/attn", pk, pv],
        name=pre + "/GroupQueryAttention", domain="com.microsoft", num_heads=heads,
        kv_num_heads=heads, scale=scale, **quant)
    ix.target.initializer.append(numpy_helper.from_array(
        np.array([0, 0, heads, head_dim], np.int64), pre + "/shape"))
    ix.drop.update(id(n) for n in (cat_k, cat_v, tr_k, mul_k, qk, soft, av))
    return [attention,
            helper.make_node("Reshape", [pre + "/attn", pre + "/shape"], [pre + "/bshd"],
                             name=pre + "/Reshape"),
            helper.make_node("Transpose", [pre + "/bshd"], [av.output[0]],
                             name=pre + "/Transpose", perm=[0, 2, 1, 3])]


def _cross_attention(ix: _Index, i: int, heads: int):
    """Layer ``i``'s attention over the encoder keys/values (cached by the prefill) as
    one com.microsoft.MultiHeadAttention, in place of the export's ~20 nodes (reshapes,
    transposes, two MatMuls, the mask Add, Softmax, their shape arithmetic)."""
    from onnx import helper

    ek, ev = (f"past_key_values.{i}.encoder.{x}" for x in ("key", "value"))
    for cached in (ek, ev):   # the export copies each through a one-input Concat
        aliases = {cached} | {n.output[0] for n in ix.nodes if n.op_type in ("Concat", "Identity")
                              and list(n.input) == [cached]}
        for n in ix.nodes:
            n.input[:] = [cached if x in aliases else x for x in n.input]
    tr_k = [n for n in ix.readers(ek) if n.op_type == "Transpose"]
    if len(tr_k) != 1 or list(tr_k[0].attribute[0].ints) != [0, 1, 3, 2]:
        raise ValueError(f"layer {i}: unexpected cross-attention keys")
    mul_k = ix.used_by(tr_k[0].output[0], "Mul")
    qk = ix.used_by(mul_k.output[0], "MatMul")
    mul_q = ix.made_by(qk.input[0], "Mul")
    bias = ix.used_by(qk.output[0], "Add")
    soft = ix.used_by(bias.output[0], "Softmax")
    av = ix.used_by(soft.output[0], "MatMul")
    tr_o = ix.used_by(av.output[0], "Transpose")
    out = ix.used_by(tr_o.output[0], "Reshape")
    tr_q = ix.made_by(mul_q.input[0], "Transpose")
    reshape_q = ix.made_by(tr_q.input[0], "Reshape")
    if qk.input[1] != mul_k.output[0] or av.input[1] != ev or \
            [list(t.attribute[0].ints) for t in (tr_q, tr_o)] != [[0, 2, 1, 3]] * 2:
        raise ValueError(f"layer {i}: unexpected cross-attention")
    ix.drop.update(id(n) for n in (reshape_q, tr_q, mul_q, tr_k[0], mul_k, qk, bias, soft,
                                   av, tr_o, out))
    mask = next(x for x in bias.input if x != qk.output[0])   # [B, 1, 1, L] additive
    cut = ix.producers.get(mask)
    if cut is not None and cut.op_type == "Slice" and len(cut.input) == 5 and \
            [np.asarray(ix.consts.get(x, np.nan)).reshape(-1).tolist()
             for x in (cut.input[1], cut.input[3], cut.input[4])] in ([[0], [3], [1]],
                                                                      [[0], [-1], [1]]):
        mask = cut.input[0]   # cut to the keys' length: the encoder's, the mask's own
    return helper.make_node(
        "MultiHeadAttention", [reshape_q.input[0], ek, ev, "", "", mask],
        [out.output[0]], name=f"/lofid/cross/{i}/MultiHeadAttention", domain="com.microsoft",
        num_heads=heads, scale=ix.scalar(mul_q.input[1]) * ix.scalar(mul_k.input[1]))


def _past_length(ix: _Index, graph, past: set[str]) -> tuple[list, list]:
    """The past length (for the positions) was ``Shape(past)[2]``; with shared buffers
    the past is the whole buffer, so it becomes ``KV_TOTAL`` - the new ids' length.
    -> (the nodes computing it, the Identity nodes that replace each old Gather)."""
    from onnx import TensorProto, helper, numpy_helper

    aliases = set(past)
    for n in ix.nodes:
        if n.op_type in ("Concat", "Identity") and len(n.input) == 1 and n.input[0] in aliases:
            aliases.add(n.output[0])
    if not any(i.name == "input_ids" for i in graph.input):
        raise ValueError("no input_ids")
    pre = PAST_LENGTH
    length_nodes = [
        helper.make_node("Cast", [KV_TOTAL], [pre + "/total"], to=TensorProto.INT64),
        helper.make_node("Shape", ["input_ids"], [pre + "/ids_shape"]),
        helper.make_node("Gather", [pre + "/ids_shape", pre + "/one"], [pre + "/new"], axis=0),
        helper.make_node("Sub", [pre + "/total", pre + "/new"], [pre + "/value"]),
    ]
    ix.target.initializer.append(numpy_helper.from_array(np.array(1, np.int64), pre + "/one"))
    identities = []
    for n in ix.nodes:
        if n.op_type == "Shape" and n.input[0] in aliases and id(n) not in ix.drop:
            for g in ix.consumers.get(n.output[0], []):
                if g.op_type != "Gather" or ix.scalar(g.input[1]) != 2:
                    raise ValueError(f"{n.name}: past shape used for more than its length")
                ix.drop.add(id(g))
                identities.append(helper.make_node("Identity", [pre + "/value"], [g.output[0]]))
    return length_nodes, identities


def _pin_step_ids(ix: _Index, nodes: list, step_rows: int):
    """Make ``nodes`` read the step's ids reshaped to ``[step_rows, 1]``: a fixed shape
    onnxruntime folds the export's shape arithmetic with. -> the Reshape node."""
    from onnx import helper, numpy_helper

    for n in nodes:
        n.input[:] = [STEP_IDS if x == "input_ids" else x for x in n.input]
    ix.target.initializer.append(numpy_helper.from_array(
        np.array([step_rows, 1], np.int64), STEP_IDS + "/shape"))
    return helper.make_node("Reshape", ["input_ids", STEP_IDS + "/shape"], [STEP_IDS],
                            name=STEP_IDS + "/Reshape")


def _declare_io(graph, target, prefill, kv_scales: dict[str, np.ndarray] | None,
                heads: int, head_dim: int) -> None:
    """The two length inputs, the presents' ``kv_capacity`` dimension and, for an int8
    cache, the prefill's quantized hand-over and the int8 types of the past/present."""
    from onnx import TensorProto, helper

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
            if (PAST.match(v.name) or v.name.startswith("present.")) and ".decoder." in v.name:
                v.type.tensor_type.elem_type = TensorProto.INT8


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
