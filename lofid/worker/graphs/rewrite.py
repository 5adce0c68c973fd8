"""The decoder as lofid runs it: the exported graph rewritten on the first load.

The steps, each optional, in this order: the int8 MatMuls onto ``nbits``-bit blocks
(nbits.py), the self-attention onto shared KV buffers, float or int8 (kvshare.py,
kvquant.py), and with both, each layer's query/key/value MatMuls fused into one
(``nbits.fuse_qkv``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from lofid import variants
from lofid.worker.graphs.kvshare import share_kv_graph
from lofid.worker.graphs.nbits import fuse_qkv, to_nbits
from lofid.worker.model_config import ModelConfig


def rewrite_decoder(src: Path, config: ModelConfig, *, share_kv: bool, nbits: int | None,
                    kv_scales: dict[str, np.ndarray] | None) -> tuple[onnx.ModelProto, int]:
    """Load the decoder graph ``src`` and rewrite it for the model ``config`` (heads, head
    size, codebooks). -> (the rewritten model, the number of self-attention layers on
    shared buffers). Raises ValueError (or onnx's errors) where the graph is not what
    the rewrites expect."""
    model = onnx.load(str(src))
    layers = 0
    if nbits:
        if not to_nbits(model, bits=nbits, block=variants.NBITS_BLOCK):
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
    return model, layers
