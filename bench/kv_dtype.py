#!/usr/bin/env python3
"""fp32, fp16 and int8 self-attention KV buffers for com.microsoft.GroupQueryAttention on the CPU.

    python bench/kv_dtype.py [--threads 2] [--batch 2] [--layers 24]

lofid's decoder step runs one GQA per layer over a shared ``[batch, 16, capacity, 64]``
K/V buffer pair. This times one step's worth of attention (``--layers`` GQA calls, each on
its own buffers, so the caches come from DRAM as in the real step) at several cache
lengths, with fp32 buffers (as lofid runs int8 and fp32), fp16 buffers (Cast of q/k/v to
fp16 before the node and of its output back to fp32 after: half the KV bytes) and int8
buffers with per-channel scales (as lofid runs int4, kvquant.py: a quarter of the bytes).
Prints ms per step.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

H, D = 16, 64


CACHE = {"fp32": (TensorProto.FLOAT, np.float32, 4), "fp16": (TensorProto.FLOAT16, np.float16, 2),
         "int8": (TensorProto.INT8, np.int8, 1)}


def graph(dtype: str) -> bytes:
    kv16, kv8 = dtype == "fp16", dtype == "int8"
    f32, kt = TensorProto.FLOAT, CACHE[dtype][0]
    ins = [helper.make_tensor_value_info(n, f32, ["b", "s", H * D]) for n in "qkv"]
    ins += [helper.make_tensor_value_info(n, kt, ["b", H, "c", D]) for n in ("pk", "pv")]
    ins += [helper.make_tensor_value_info("sl", TensorProto.INT32, ["b"]),
            helper.make_tensor_value_info("tot", TensorProto.INT32, [])]
    nodes, names = [], list("qkv")
    if kv16:
        nodes = [helper.make_node("Cast", [n], [n + "16"], to=TensorProto.FLOAT16) for n in "qkv"]
        names = [n + "16" for n in "qkv"]
    inputs, quant, inits = [*names, "pk", "pv", "sl", "tot"], {}, []
    if kv8:   # inputs 12, 13: the per-channel scales (values ~N(0, 1): |x| <= 5 in range)
        inputs += ["", "", "", "", "", "ks", "vs"]
        inits = [helper.make_tensor(n, f32, [H * D], [5 / 127] * (H * D)) for n in ("ks", "vs")]
        quant = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
    nodes.append(helper.make_node(
        "GroupQueryAttention", inputs, ["o16" if kv16 else "o", "prk", "prv"],
        domain="com.microsoft", num_heads=H, kv_num_heads=H, scale=D ** -0.5, **quant))
    if kv16:
        nodes.append(helper.make_node("Cast", ["o16"], ["o"], to=f32))
    outs = [helper.make_tensor_value_info("o", f32, None),
            helper.make_tensor_value_info("prk", kt, None),
            helper.make_tensor_value_info("prv", kt, None)]
    m = helper.make_model(helper.make_graph(nodes, "gqa", ins, outs, inits), opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    return m.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--lengths", default="1,250,500,1000,1500")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.log_severity_level = 3
    cap, rng = 1504, np.random.default_rng(0)
    lengths = [int(x) for x in args.lengths.split(",")]
    q, k, v = (rng.standard_normal((args.batch, 1, H * D)).astype(np.float32) for _ in "qkv")
    outs = {}
    print(f"ort {ort.__version__}, batch {args.batch}, {args.layers} layers, "
          f"{args.threads} threads: ms per step (all layers' attention)")
    for dtype in CACHE:
        dt, size = CACHE[dtype][1:]
        sess = ort.InferenceSession(graph(dtype), opts, providers=["CPUExecutionProvider"])
        init = np.random.default_rng(1)   # the same cache values for every dtype
        bufs = []
        for _ in range(args.layers):
            pair = []
            for _ in "kv":
                x = init.standard_normal((args.batch, H, cap, D), np.float32)
                if dtype == "int8":
                    x = np.clip(np.rint(x * 127 / 5), -128, 127)
                pair.append(ort.OrtValue.ortvalue_from_numpy(x.astype(dt)))
            bufs.append(pair)
        row = []
        for length in lengths:
            binds = []
            for pk, pv in bufs:
                b = sess.io_binding()
                for n, x in zip("qkv", (q, k, v), strict=True):
                    b.bind_cpu_input(n, x)
                b.bind_ortvalue_input("pk", pk)
                b.bind_ortvalue_input("pv", pv)
                b.bind_cpu_input("sl", np.full(args.batch, length - 1, np.int32))
                b.bind_cpu_input("tot", np.array(length, np.int32))
                b.bind_output("o")
                b.bind_ortvalue_output("prk", pk)
                b.bind_ortvalue_output("prv", pv)
                binds.append(b)
            for b in binds:
                sess.run_with_iobinding(b)
            best = float("inf")
            for _ in range(args.reps):
                t = time.perf_counter()
                for b in binds:
                    sess.run_with_iobinding(b)
                best = min(best, time.perf_counter() - t)
            outs[dtype, length] = binds[0].get_outputs()[0].numpy()
            mb = args.layers * 2 * args.batch * H * length * D * size / 1e6
            row.append(f"{length}: {best * 1e3:.2f} ms ({mb:.0f} MB)")
        print(f"  {dtype} KV: " + ", ".join(row), flush=True)
    for dtype in ("fp16", "int8"):
        print(f"  max |{dtype} - fp32| of the attention output: " + ", ".join(
            f"{n}: {np.abs(outs[dtype, n] - outs['fp32', n]).max():.1e}" for n in lengths))


if __name__ == "__main__":
    main()
