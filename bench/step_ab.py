#!/usr/bin/env python3
"""The int4 decoder step with and without session 3's rewrites, at fixed cache lengths.

    python bench/step_ab.py [--model /tmp/lofid-full] [--lengths 1,250,750,1500] [--rounds 5]

Builds four int4 decoders from the int8 file in this process, each adding one rewrite:
the session 2 graph (float cache, q/k/v as three MatMulNBits), q/k/v fused
(nbits.fuse_qkv), the step's ids at a fixed shape and its cross-attention as one
MultiHeadAttention (``share_kv_graph(step_rows=)``), and the int8 cache with scales
calibrated as a first load does (kvquant.py): the shipped graph. Each step rewrites the
same cache position, so the length stays fixed; the decoders take turns round by round,
so a busy minute hits all of them. Prints the median ms per step per length and
decoder, and checks that fusing changes no logit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lofid import variants  # noqa: E402
from lofid.worker import sessions  # noqa: E402
from lofid.worker.decoder import Decoder  # noqa: E402
from lofid.worker.graphs import kvquant  # noqa: E402
from lofid.worker.graphs.kvshare import share_kv_graph  # noqa: E402
from lofid.worker.graphs.nbits import fuse_qkv, to_nbits  # noqa: E402
from lofid.worker.musicgen import MusicGen  # noqa: E402


def build(root: Path, config, threads: int, *, fuse: bool, fixed: bool = False,
          scales=None) -> Decoder:
    model = onnx.load(str(root / "small_i8" / "decoder_model_merged.onnx"))
    to_nbits(model, bits=4, block=variants.NBITS_BLOCK)
    share_kv_graph(model, config.num_heads, config.head_dim, scales,
                   step_rows=2 * config.num_codebooks if fixed else None)
    if fuse:
        fuse_qkv(model)
    sess = ort.InferenceSession(model.SerializeToString(), sessions.options("decoder", threads),
                                providers=["CPUExecutionProvider"])
    return Decoder(sess, sess, config)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/lofid-full"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="1,250,750,1500")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    root = args.model / "music_gen"
    engine = MusicGen.load(root, "int8", threads=args.threads)   # text encoder, config
    config, k = engine.config, engine.num_codebooks
    decoders = {"session 2 (float cache, q/k/v apart)": build(root, config, args.threads, fuse=False),
                "q/k/v fused": build(root, config, args.threads, fuse=True),
                "+ fixed shapes, cross-attention op": build(root, config, args.threads, fuse=True,
                                                            fixed=True)}
    engine.decoder = decoders["+ fixed shapes, cross-attention op"]
    calibration = kvquant.Calibration()
    for prompt in kvquant.PROMPTS:
        engine.calibration_run(prompt, calibration)
    decoders["+ int8 cache (shipped)"] = build(root, config, args.threads, fuse=True, fixed=True,
                                                scales=calibration.scales())
    hidden, mask = engine.encode_text("lofi hip hop, jazzy piano")
    rng = np.random.default_rng(0)
    prefill, ids = rng.integers(0, 2048, (2 * k, 9)), rng.integers(0, 2048, (2 * k, 1))
    a, b = (decoders[n] for n in ("session 2 (float cache, q/k/v apart)", "q/k/v fused"))
    same = np.array_equal(a.begin(prefill, hidden, mask, 20), b.begin(prefill, hidden, mask, 20))
    same = same and np.array_equal(a.step(ids), b.step(ids))
    a.release(), b.release()
    print(f"fused q/k/v: logits identical to the unfused graph: {same}")
    lengths = [int(x) for x in args.lengths.split(",")]
    times = {(name, n): [] for name in decoders for n in lengths}
    cap = max(lengths) + 2
    for _ in range(args.rounds):
        for n in lengths:
            for name, dec in decoders.items():
                dec.begin(prefill[:, :1], hidden, mask, cap)
                ts = []
                for _ in range(args.steps):
                    dec.length = n
                    t = time.perf_counter()
                    dec.step(ids)
                    ts.append(time.perf_counter() - t)
                dec.release()
                times[name, n].append(float(np.median(ts[3:])) * 1e3)
    print(f"median ms per step over {args.rounds} interleaved rounds of {args.steps} steps")
    print("| cache length | " + " | ".join(decoders) + " |")
    print("|---|" + "---|" * len(decoders))
    for n in lengths:
        print(f"| {n} | " + " | ".join(f"{np.median(times[name, n]):.2f}" for name in decoders) + " |")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
