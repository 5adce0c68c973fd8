"""Upcast an fp16 ONNX graph to fp32: initializers, constants, Casts and declared types.

The fp16 variant's EnCodec computes its padding from the audio length in float16
(``Cast(length) -> Div -> Ceil -> Cast(int64) -> Pad``), and float16 ends at 65504: past
2.05 s of 32 kHz audio the length is inf and the Pad fails ("Integer overflow"). On
onnxruntime's CPU provider the fp16 arithmetic happens to run in fp32 (it has no fp16
kernels for those ops and folds the Casts), on CUDA it does not (seen on an H200,
bench/RESULTS.md "GPU"). EnCodec runs once per request, so lofid runs it in fp32 on
every device: the same weights, upcast once at load.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def _tensor(t: TensorProto) -> bool:
    if t.data_type != F16:
        return False
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    return True


def _graph(g: onnx.GraphProto) -> int:
    changed = sum(_tensor(t) for t in g.initializer)
    for node in g.node:
        for a in node.attribute:
            if a.type == AttributeProto.TENSOR:
                changed += _tensor(a.t)
            elif a.type == AttributeProto.GRAPH:
                changed += _graph(a.g)
            elif a.type == AttributeProto.INT and a.name in ("to", "dtype") and a.i == F16:
                a.i = F32
                changed += 1
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.tensor_type.elem_type == F16:
            vi.type.tensor_type.elem_type = F32
            changed += 1
    return changed


def upcast_fp16(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` in place so that nothing in it is float16; -> items changed."""
    return _graph(model.graph)
