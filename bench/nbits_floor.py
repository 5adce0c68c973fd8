#!/usr/bin/env python3
"""The int4 step's 4-bit MatMuls alone: what MatMulNBits costs without the rest of the graph.

    python bench/nbits_floor.py [--threads 2] [--rounds 3] [--block 128 256]

One graph of the 24 decoder layers' weight MatMuls at musicgen-small's shapes (hidden
1024, ffn 4096; batch 2 rows: the CFG pair), random 4-bit blocks of ``--block`` (lofid's,
256, by default), accuracy level 4 as lofid's int4 uses: q, k, v (apart, or fused as nbits.fuse_qkv makes them), out,
cross-attention q and out, fc1, fc2. Prints the median ms per run and the read bandwidth
it reaches over the weights' bytes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lofid.variants import NBITS_BLOCK  # noqa: E402

LAYERS, HIDDEN, FFN = 24, 1024, 4096


def build(fused: bool, threads: int, block: int) -> tuple[ort.InferenceSession, int]:
    rng = np.random.default_rng(0)
    nodes, inits, size = [], [], 0

    def matmul(name: str, x: str, k: int, n: int) -> str:
        nonlocal size
        b = rng.integers(0, 255, (n, k // block, block // 2), dtype=np.uint8)
        s = rng.random(n * k // block, dtype=np.float32) * 0.01 + 0.001
        inits.extend([numpy_helper.from_array(b, name + "_B"), numpy_helper.from_array(s, name + "_S")])
        size += b.nbytes + s.nbytes
        nodes.append(helper.make_node("MatMulNBits", [x, name + "_B", name + "_S"], [name + "_y"],
                                      domain="com.microsoft", K=k, N=n, bits=4,
                                      block_size=block, accuracy_level=4))
        return name + "_y"

    x = "x"
    for layer in range(LAYERS):
        p = f"l{layer}"
        outs = [matmul(p + "qkv", x, HIDDEN, 3 * HIDDEN)] if fused else \
            [matmul(p + m, x, HIDDEN, HIDDEN) for m in "qkv"]
        if fused:   # keep the layer's output [2, HIDDEN]: the q part
            nodes.append(helper.make_node("Slice", [outs[0], "start", "end", "axis"], [p + "q"]))
            outs = [p + "q"]
        outs += [matmul(p + m, x, HIDDEN, HIDDEN) for m in ("o", "cq", "co")]
        outs.append(matmul(p + "fc2", matmul(p + "fc1", x, HIDDEN, FFN), FFN, HIDDEN))
        nodes.append(helper.make_node("Sum", outs, [p + "sum"]))
        nodes.append(helper.make_node("Mul", [p + "sum", "small"], [p + "x"]))
        x = p + "x"
    inits += [numpy_helper.from_array(np.array([v], np.int64), n)
              for n, v in (("start", 0), ("end", HIDDEN), ("axis", 1))]
    inits.append(numpy_helper.from_array(np.array(1e-3, np.float32), "small"))
    g = helper.make_graph(nodes, "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, HIDDEN])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, HIDDEN])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = threads, 3
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]), size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, nargs="+", default=[NBITS_BLOCK],
                    help="block sizes to compare (e.g. 128 256)")
    args = ap.parse_args()
    sessions = {f"{name}, blocks of {block}": build(name == "q/k/v fused", args.threads, block)
                for block in args.block for name in ("q/k/v apart", "q/k/v fused")}
    x = np.random.default_rng(1).standard_normal((2, HIDDEN), dtype=np.float32)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, (sess, _) in sessions.items():
            for _ in range(5):
                sess.run(None, {"x": x})
            ts = []
            for _ in range(50):
                t = time.perf_counter()
                sess.run(None, {"x": x})
                ts.append(time.perf_counter() - t)
            times[name].append(float(np.median(ts)))
    for name, (_, size) in sessions.items():
        med = float(np.median(times[name]))
        print(f"{name}: {med * 1e3:.2f} ms per step's MatMulNBits ({size / 1e6:.0f} MB of "
              f"weights and scales: {size / med / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main()
