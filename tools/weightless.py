#!/usr/bin/env python3
"""Carry a full-size model's graphs without their weights, and refill them with noise.

A machine that cannot receive the few GB of tools/make_full_model.py's output (the GPU
machine takes 64 MiB per call) can still time the real shapes: ``strip`` writes each
graph with its large float and int8 tensors emptied (a few MB in all), ``fill`` writes
them back as seeded random values (floats N(0, 0.02), int8 uniform). Speed and memory
depend on the shapes only; the music is noise either way (the weights were random).

    python tools/weightless.py strip /tmp/lofid-full/music_gen OUT [REL ...]
    python tools/weightless.py fill OUT /tmp/full/music_gen
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

MARK = "lofid:weightless"
MIN_ELEMENTS = 1024
NOISE = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16,
         TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}
DEFAULT_FILES = [
    "small/config.json", "small/tokenizer.json",
    "small_fp32/text_encoder.onnx", "small_fp32/decoder_model_merged.onnx",
    "small_fp32/encodec_decode.onnx",
    "small_fp16/text_encoder.onnx", "small_fp16/decoder_model.onnx",
    "small_fp16/decoder_with_past_model.onnx", "small_fp16/encodec_decode.onnx",
    "small_i8/decoder_model_merged.onnx",
]


def tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.type == AttributeProto.TENSOR:
                yield a.t
            elif a.type == AttributeProto.GRAPH:
                yield from tensors(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from tensors(g)


def strip(model: onnx.ModelProto) -> int:
    n = 0
    for t in tensors(model.graph):
        if t.data_type in NOISE and int(np.prod(t.dims)) > MIN_ELEMENTS:
            dims, dtype, name = list(t.dims), t.data_type, t.name
            t.Clear()
            t.dims.extend(dims)
            t.data_type, t.name, t.doc_string = dtype, name, MARK
            n += 1
    return n


def fill(model: onnx.ModelProto, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    n = 0
    for t in tensors(model.graph):
        if t.doc_string != MARK:
            continue
        dtype, shape = NOISE[t.data_type], tuple(t.dims)
        if np.issubdtype(dtype, np.floating):
            values = (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype)
        else:
            info = np.iinfo(dtype)
            values = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        t.CopyFrom(numpy_helper.from_array(values, t.name))
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["strip", "fill"])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("files", nargs="*", help="paths under SRC (default: what bench/gpu_check.py runs)")
    args = ap.parse_args()
    files = args.files or (DEFAULT_FILES if args.action == "strip" else
                           [str(p.relative_to(args.src)) for p in sorted(args.src.rglob("*"))
                            if p.is_file()])
    for rel in files:
        src, dst = args.src / rel, args.dst / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not rel.endswith(".onnx"):
            shutil.copyfile(src, dst)
            continue
        model = onnx.load(str(src))
        n = strip(model) if args.action == "strip" else fill(model)
        onnx.save(model, str(dst))
        print(f"{args.action} {rel}: {n} tensors, {dst.stat().st_size / 1e6:.1f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
